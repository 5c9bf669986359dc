//! Network-namespace tier: two "nodes" (netns) joined by a veth pair, each running a real
//! ztunnel process in dedicated mode behind real iptables REDIRECT rules.
//!
//! Checks: captured app traffic crosses between the nodes only as TCP to :15008 and never as
//! the app's plaintext; the bytes arrive intact; the server sees the client's real source IP
//! (IP_TRANSPARENT + connmark routing); plaintext into a node goes through :15006 and is
//! refused once a STRICT-style policy is in force; sockets marked 0x539 bypass capture;
//! captured DNS is answered for mesh names and forwarded, marked, for the rest.
//!
//! Needs root. Everything created (namespaces, veths, processes) is removed by name/PID on
//! drop. Without root the tests print a skip notice, unless MESH_REQUIRE_NETNS=1 (CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs::File,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

fn runnable() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    if std::env::var("MESH_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("network-namespace tests need root (MESH_REQUIRE_NETNS=1 is set)");
    }
    eprintln!("SKIPPED: network-namespace tests need root");
    false
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it creates stay there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap();
        nix::sched::setns(fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Two nodes A (10.N.0.1) and B (10.N.0.2) on one veth link, torn down on drop.
struct Lab {
    a: String,
    b: String,
    net: u8,
    dir: tempfile::TempDir,
    children: Vec<Child>,
    /// More namespaces a test created (removed on drop).
    extra_ns: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b].into_iter().chain(&self.extra_ns) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Istio's in-pod redirection rules (redirection-cni.md §1.2, without DNS capture), used for
/// both modes: in dedicated mode ztunnel runs in the same netns and its sockets carry the
/// mark 0x539, exactly like its in-pod sockets do in shared mode.
const CAPTURE_RULES: &str = "\
*mangle
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:ISTIO_PRERT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -s 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_OUTPUT -d 169.254.7.127 -p tcp -m tcp -j ACCEPT
-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001
COMMIT
";

impl Lab {
    fn new(net: u8) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            a: format!("mzt-{pid}-{net}-a"),
            b: format!("mzt-{pid}-{net}-b"),
            net,
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
            extra_ns: Vec::new(),
        };
        let (va, vb) = (format!("mz{pid}{net}a"), format!("mz{pid}{net}b"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        sh(&["ip", "netns", "add", &lab.a]);
        sh(&["ip", "netns", "add", &lab.b]);
        sh(&[
            "ip", "link", "add", va, "netns", &lab.a, "type", "veth", "peer", "name", vb, "netns",
            &lab.b,
        ]);
        for (ns, dev, host) in [(&lab.a, va, 1), (&lab.b, vb, 2)] {
            let addr = format!("10.{net}.0.{host}/24");
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            // Replies to transparently-sourced connections are delivered back to ztunnel.
            sh(&[
                "ip",
                "-n",
                ns,
                "rule",
                "add",
                "fwmark",
                "0x111/0xfff",
                "pref",
                "32764",
                "lookup",
                "100",
            ]);
            sh(&[
                "ip",
                "-n",
                ns,
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ]);
            let mut p = Command::new("ip")
                .args(["netns", "exec", ns, "iptables-restore", "--noflush"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            p.stdin
                .take()
                .unwrap()
                .write_all(CAPTURE_RULES.as_bytes())
                .unwrap();
            assert!(p.wait().unwrap().success(), "iptables-restore failed");
        }
        // Accounting on B for everything that arrives from A over the link (not over lo,
        // where ztunnel's transparent connections to the app also carry A's address).
        let a_ip = lab.ip(1).to_string();
        for rule in [
            vec![
                "-A", "INPUT", "-i", vb, "-s", &a_ip, "-m", "string", "--string", MARKER, "--algo",
                "bm", "-j", "ACCEPT",
            ],
            vec![
                "-A", "INPUT", "-i", vb, "-s", &a_ip, "-p", "tcp", "--dport", "15008", "-j",
                "ACCEPT",
            ],
            vec![
                "-A", "INPUT", "-i", vb, "-s", &a_ip, "-p", "tcp", "--sport", "15008", "-j",
                "ACCEPT",
            ],
            vec!["-A", "INPUT", "-i", vb, "-s", &a_ip, "-j", "ACCEPT"],
            // Positive control: the app's plaintext does flow on B's loopback.
            vec![
                "-A", "OUTPUT", "-o", "lo", "-m", "string", "--string", MARKER, "--algo", "bm",
                "-j", "ACCEPT",
            ],
        ] {
            let mut args = vec!["ip", "netns", "exec", &lab.b, "iptables"];
            args.extend(rule);
            sh(&args);
        }
        let ca = lab.dir.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        let pem = mesh_tls::ca::LocalCa::generate_pem("cluster.local").unwrap();
        for (name, body) in pem.files() {
            std::fs::write(ca.join(name), body).unwrap();
        }
        lab
    }

    fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, self.net, 0, host))
    }

    fn config(&self, policies: &str) -> String {
        format!(
            "workloads:
- uid: bar/sleep
  name: sleep
  namespace: bar
  serviceAccount: sleep
  workloadIps: [{a}]
  protocol: HBONE
  node: node-a
- uid: foo/echo
  name: echo
  namespace: foo
  serviceAccount: echo
  workloadIps: [{b}]
  protocol: HBONE
  node: node-b
policies: {policies}
",
            a = self.ip(1),
            b = self.ip(2)
        )
    }

    fn write_config(&self, node: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{node}.yaml"));
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    fn start_ztunnel(&mut self, ns: &str, node: &str) -> PathBuf {
        let body = self.config("[]");
        self.start_ztunnel_with(ns, node, &body, &[])
    }

    fn start_ztunnel_with(&mut self, ns: &str, node: &str, body: &str, extra: &[&str]) -> PathBuf {
        let cfg = self.write_config(node, body);
        let log = self.dir.path().join(format!("{node}.log"));
        let child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ztunnel")])
            .arg("--local-xds-path")
            .arg(&cfg)
            .arg("--local-ca-dir")
            .arg(self.dir.path().join("ca"))
            .args([
                "--node-name",
                node,
                "--preserve-source-ip",
                "true",
                "--inbound-addr",
                "0.0.0.0:15008",
            ])
            .args([
                "--outbound-addr",
                "0.0.0.0:15001",
                "--inbound-plaintext-addr",
                "0.0.0.0:15006",
            ])
            .args([
                "--stats-addr",
                "0.0.0.0:15020",
                "--readiness-addr",
                "0.0.0.0:15021",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.children.push(child);
        log
    }

    fn wait_ready(&self, log: &Path) {
        self.wait_for(log, "certificates ready");
    }

    fn wait_for(&self, log: &Path, line: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains(line)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(log).unwrap_or_default();
        panic!("ztunnel never logged {line:?}: {log}");
    }

    /// (packets, bytes) of each rule of `chain` in B, in order.
    fn counters(&self, chain: &str) -> Vec<(u64, u64)> {
        sh_out(&[
            "ip", "netns", "exec", &self.b, "iptables", "-L", chain, "-v", "-n", "-x",
        ])
        .lines()
        .skip(2)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
    }
}

const MARKER: &str = "PLAINTEXT-APP-MARKER-7f3a";

/// A service backed by B's echo workload (appended to [`Lab::config`]).
const ECHO_SERVICE: &str = "services:
- name: echo
  namespace: foo
  hostname: echo.foo.svc.cluster.local
  vips: [/10.96.0.10]
  ports: {80: 8080}
";

/// Sends one A query from inside `ns` (unmarked, so capture applies) and returns the
/// answers' addresses and the address the reply came from.
fn dns_ask(ns: &str, server: SocketAddr, name: &str) -> (Vec<String>, SocketAddr) {
    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{Name, RData, RecordType},
    };
    let mut q = Message::new(0x7e57, MessageType::Query, OpCode::Query);
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let bytes = q.to_vec().unwrap();
    let (n, from, buf) = in_netns(ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.send_to(&bytes, server).unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, from) = s.recv_from(&mut buf).expect("no DNS answer");
        (n, from, buf)
    });
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, 0x7e57);
    let answers = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    (answers, from)
}

/// An upstream resolver inside B on :53 answering every A query with 192.0.2.1; records
/// the source of each query.
fn start_upstream_dns(lab: &Lab) -> Arc<Mutex<Vec<SocketAddr>>> {
    use hickory_proto::{
        op::{Message, OpCode},
        rr::{RData, Record, rdata::A},
    };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = SocketAddr::new(lab.ip(2), 53);
    let s = in_netns(&lab.b, move || std::net::UdpSocket::bind(addr).unwrap());
    let s2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, src)) = s.recv_from(&mut buf) {
            s2.lock().unwrap().push(src);
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::response(req.metadata.id, OpCode::Query);
            let q = req.queries[0].clone();
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A::new(192, 0, 2, 1)),
            ));
            resp.add_query(q);
            let _ = s.send_to(&resp.to_vec().unwrap(), src);
        }
    });
    seen
}

/// Echo server inside B recording each client's address.
fn start_echo(lab: &Lab, port: u16) -> Arc<Mutex<Vec<SocketAddr>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = SocketAddr::new(lab.ip(2), port);
    let l = in_netns(&lab.b, move || TcpListener::bind(addr).unwrap());
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            s2.lock().unwrap().push(c.peer_addr().unwrap());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    seen
}

/// Connects from inside A (optionally with mark 0x539 to bypass capture), sends `data`,
/// half-closes, returns what came back.
fn client(lab: &Lab, dst: SocketAddr, data: Vec<u8>, mark: bool) -> std::io::Result<Vec<u8>> {
    let s = in_netns(&lab.a, move || -> std::io::Result<TcpStream> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if mark {
            sock.set_mark(0x539)?;
        }
        sock.connect_timeout(&dst.into(), Duration::from_secs(5))?;
        Ok(sock.into())
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || {
        let _ = w.write_all(&data);
        let _ = w.shutdown(std::net::Shutdown::Write);
    });
    let mut out = Vec::new();
    let mut r = s;
    let res = r.read_to_end(&mut out);
    let _ = writer.join();
    match res {
        Ok(_) => Ok(out),
        Err(e) if out.is_empty() => Err(e),
        Err(_) => Ok(out),
    }
}

#[test]
fn captured_traffic_crosses_nodes_only_as_tls_on_15008() {
    if !runnable() {
        return;
    }
    let mut lab = Lab::new(231);
    let log_a = lab.start_ztunnel(&lab.a.clone(), "node-a");
    let log_b = lab.start_ztunnel(&lab.b.clone(), "node-b");
    lab.wait_ready(&log_a);
    lab.wait_ready(&log_b);
    let seen = start_echo(&lab, 8080);
    let dst = SocketAddr::new(lab.ip(2), 8080);

    let mut data = Vec::new();
    while data.len() < 1 << 20 {
        data.extend_from_slice(MARKER.as_bytes());
        data.extend((0..200u8).map(|i| i.wrapping_mul(31)));
    }
    let got = client(&lab, dst, data.clone(), false).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes corrupted");

    // The server saw the client's own address, not ztunnel's.
    assert_eq!(seen.lock().unwrap()[0].ip(), lab.ip(1));

    let input = lab.counters("INPUT");
    let (marker, to_hbone, other) = (input[0].0, input[1].1, input[3].0);
    assert_eq!(marker, 0, "app plaintext crossed between nodes");
    assert!(
        to_hbone > data.len() as u64,
        "the 1 MiB must cross as tunnel traffic to :15008, saw {to_hbone} bytes"
    );
    assert_eq!(
        other, 0,
        "{other} packets from A to B on ports other than 15008"
    );
    let output = lab.counters("OUTPUT");
    assert!(
        output[0].0 > 0,
        "positive control: the marker must be seen on B's loopback"
    );

    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        log.contains("src.identity=\"spiffe://cluster.local/ns/bar/sa/sleep\""),
        "{log}"
    );
}

#[test]
fn captured_dns_is_answered_for_mesh_names_and_forwarded_with_the_mark() {
    if !runnable() {
        return;
    }
    let mut lab = Lab::new(234);
    // Istio's DNS capture rule (redirection-cni.md §1.2), first in ISTIO_OUTPUT.
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.a.clone(),
        "iptables",
        "-t",
        "nat",
        "-I",
        "ISTIO_OUTPUT",
        "1",
        "!",
        "-o",
        "lo",
        "-p",
        "udp",
        "-m",
        "mark",
        "!",
        "--mark",
        "0x539/0xfff",
        "-m",
        "udp",
        "--dport",
        "53",
        "-j",
        "REDIRECT",
        "--to-port",
        "15053",
    ]);
    let upstream = lab.ip(2);
    let rc = lab.dir.path().join("resolv.conf");
    std::fs::write(
        &rc,
        format!(
            "search bar.svc.cluster.local svc.cluster.local cluster.local\nnameserver {upstream}\n"
        ),
    )
    .unwrap();
    let body = lab.config("[]") + ECHO_SERVICE;
    let rc_s = rc.display().to_string();
    let log = lab.start_ztunnel_with(
        &lab.a.clone(),
        "node-a",
        &body,
        &[
            "--dns-proxy-addr",
            "127.0.0.1:15053",
            "--dns-resolv-conf",
            &rc_s,
        ],
    );
    lab.wait_ready(&log);
    let seen = start_upstream_dns(&lab);
    let resolver = SocketAddr::new(upstream, 53);

    // A mesh name: answered by ztunnel in A, although the app asked B's resolver; the
    // reply appears to come from that resolver (the REDIRECT is undone on the way back).
    let (answers, from) = dns_ask(&lab.a, resolver, "echo.foo.");
    assert_eq!(answers, vec!["10.96.0.10".to_owned()]);
    assert_eq!(from, resolver);
    assert!(
        seen.lock().unwrap().is_empty(),
        "a mesh name reached the upstream"
    );

    // Anything else: forwarded once from A with ztunnel's mark (not captured again).
    let (answers, from) = dns_ask(&lab.a, resolver, "www.example.org.");
    assert_eq!(answers, vec!["192.0.2.1".to_owned()]);
    assert_eq!(from, resolver);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "forwarded exactly once: {seen:?}");
    assert_eq!(seen[0].ip(), lab.ip(1));
}

#[test]
fn plaintext_inbound_is_captured_and_strict_policy_refuses_it() {
    if !runnable() {
        return;
    }
    let mut lab = Lab::new(232);
    let log_a = lab.start_ztunnel(&lab.a.clone(), "node-a");
    let log_b = lab.start_ztunnel(&lab.b.clone(), "node-b");
    lab.wait_ready(&log_a);
    lab.wait_ready(&log_b);
    let seen = start_echo(&lab, 9090);
    let dst = SocketAddr::new(lab.ip(2), 9090);

    // A socket marked 0x539 bypasses A's capture: it reaches B in plaintext, where B's
    // PREROUTING sends it to ztunnel's :15006. PERMISSIVE (no policy): it goes through.
    let got = client(&lab, dst, b"plain hello".to_vec(), true).unwrap();
    assert_eq!(got, b"plain hello");
    assert_eq!(
        seen.lock().unwrap()[0].ip(),
        lab.ip(1),
        "source IP preserved on :15006 too"
    );
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(log.contains("inbound_plaintext"), "{log}");

    // PeerAuthentication STRICT, as istiod converts it: deny anything without an identity.
    let strict = "
- name: istio_converted_static_strict
  namespace: istio-system
  scope: Global
  action: Deny
  rules: [[[{notPrincipals: [{Presence: []}]}]]]";
    std::thread::sleep(Duration::from_millis(1100));
    lab.write_config("node-b", &lab.config(strict));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log_b)
        .unwrap()
        .contains("configuration reloaded")
    {
        assert!(Instant::now() < deadline, "config not reloaded");
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = client(&lab, dst, b"plain again".to_vec(), true).unwrap_or_default();
    assert!(got.is_empty(), "STRICT must refuse plaintext");
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "the app never saw the refused connection"
    );
    // mTLS traffic is still admitted.
    let got = client(&lab, dst, b"via hbone".to_vec(), false).unwrap();
    assert_eq!(got, b"via hbone");
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(
        log.contains("policy=\"istio-system/istio_converted_static_strict\""),
        "{log}"
    );
}

mod shared {
    //! Shared (in-pod) mode: each ztunnel runs in its own netns with no route to the pods,
    //! and reaches them only through the netns fds a fake node agent sends over ZDS.

    use super::*;
    use mesh_proto::istio::workload::zds::{
        AddWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, WorkloadResponse,
        workload_request::Payload, workload_response,
    };
    use nix::sys::socket::{
        AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, accept,
        bind, listen, recv, sendmsg, socket,
    };
    use prost::Message;
    use std::{io::IoSlice, os::fd::AsRawFd};

    fn read_ack(conn: i32) -> String {
        let mut buf = [0u8; 1024];
        let n = recv(conn, &mut buf, MsgFlags::empty()).unwrap();
        match WorkloadResponse::decode(&buf[..n]).unwrap().payload {
            Some(workload_response::Payload::Ack(a)) => a.error,
            None => panic!("response without ack"),
        }
    }

    /// Plays the CNI node agent for one ztunnel: hello, a malformed packet (must be nacked
    /// without losing the connection), the pod with its netns fd, then SnapshotSent.
    /// Returns the errors of the three acks.
    fn fake_agent(
        sock: PathBuf,
        uid: &'static str,
        pod_ns: String,
    ) -> std::thread::JoinHandle<Vec<String>> {
        let l = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(l.as_raw_fd(), &UnixAddr::new(&sock).unwrap()).unwrap();
        listen(&l, Backlog::new(5).unwrap()).unwrap();
        std::thread::spawn(move || {
            let conn = accept(l.as_raw_fd()).unwrap();
            let mut buf = [0u8; 1024];
            let n = recv(conn, &mut buf, MsgFlags::empty()).unwrap();
            assert_eq!(&buf[..n], &[0x08, 0x01], "ZdsHello{{V1}}");
            let mut acks = Vec::new();
            sendmsg::<()>(
                conn,
                &[IoSlice::new(&[0xff, 0xff])],
                &[],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
            acks.push(read_ack(conn));
            let add = WorkloadRequest {
                payload: Some(Payload::Add(AddWorkload {
                    uid: uid.into(),
                    workload_info: Some(WorkloadInfo {
                        name: uid.into(),
                        namespace: "default".into(),
                        service_account: "default".into(),
                    }),
                })),
            }
            .encode_to_vec();
            let netns = File::open(format!("/var/run/netns/{pod_ns}")).unwrap();
            let fds = [netns.as_raw_fd()];
            sendmsg::<()>(
                conn,
                &[IoSlice::new(&add)],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
            acks.push(read_ack(conn));
            let snap = WorkloadRequest {
                payload: Some(Payload::SnapshotSent(SnapshotSent {})),
            }
            .encode_to_vec();
            sendmsg::<()>(conn, &[IoSlice::new(&snap)], &[], MsgFlags::empty(), None).unwrap();
            acks.push(read_ack(conn));
            // Hold the session open until ztunnel goes away.
            let _ = recv(conn, &mut buf, MsgFlags::empty());
            acks
        })
    }

    #[test]
    fn inpod_mode_carries_pod_traffic_over_hbone_from_inside_the_pods() {
        if !runnable() {
            return;
        }
        let mut lab = Lab::new(233);
        let mut agents = Vec::new();
        let mut logs = Vec::new();
        for (node, pod_ns, uid) in [
            ("node-a", lab.a.clone(), "uid-a"),
            ("node-b", lab.b.clone(), "uid-b"),
        ] {
            // ztunnel's own netns: loopback only, no link to the pods.
            let zt_ns = format!("{pod_ns}-zt");
            sh(&["ip", "netns", "add", &zt_ns]);
            lab.extra_ns.push(zt_ns.clone());
            sh(&["ip", "-n", &zt_ns, "link", "set", "lo", "up"]);
            let sock = lab.dir.path().join(format!("{node}.sock"));
            agents.push(fake_agent(sock.clone(), uid, pod_ns));
            let config = lab
                .config("[]")
                .replace("uid: bar/sleep", "uid: uid-a")
                .replace("uid: foo/echo", "uid: uid-b")
                + ECHO_SERVICE;
            let cfg = lab.write_config(node, &config);
            let log = lab.dir.path().join(format!("{node}.log"));
            let child = Command::new("ip")
                .args(["netns", "exec", &zt_ns, env!("CARGO_BIN_EXE_ztunnel")])
                .args([
                    "--proxy-mode",
                    "shared",
                    "--node-name",
                    node,
                    "--preserve-source-ip",
                    "true",
                ])
                .arg("--inpod-uds")
                .arg(&sock)
                .arg("--local-xds-path")
                .arg(&cfg)
                .arg("--local-ca-dir")
                .arg(lab.dir.path().join("ca"))
                .env("RUST_LOG", "info")
                .stdout(File::create(&log).unwrap())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            lab.children.push(child);
            logs.push(log);
        }
        for log in &logs {
            lab.wait_for(log, "ZDS snapshot applied");
            lab.wait_for(log, "certificates ready");
        }
        let seen = start_echo(&lab, 8080);
        let dst = SocketAddr::new(lab.ip(2), 8080);
        let mut data = Vec::new();
        while data.len() < 256 * 1024 {
            data.extend_from_slice(MARKER.as_bytes());
            data.extend((0..100u8).map(|i| i.wrapping_mul(7)));
        }
        let got = client(&lab, dst, data.clone(), false).unwrap();
        assert!(
            got == data,
            "bytes corrupted or lost ({} of {})",
            got.len(),
            data.len()
        );
        assert_eq!(
            seen.lock().unwrap()[0].ip(),
            lab.ip(1),
            "the app sees the client pod's IP"
        );
        let input = lab.counters("INPUT");
        assert_eq!(input[0].0, 0, "app plaintext crossed between the pods");
        assert!(input[1].1 > data.len() as u64, "tunnel bytes on :15008");
        assert_eq!(input[3].0, 0, "only :15008 crosses between the pods");
        let log_b = std::fs::read_to_string(&logs[1]).unwrap();
        assert!(
            log_b.contains("src.identity=\"spiffe://cluster.local/ns/bar/sa/sleep\""),
            "{log_b}"
        );
        // The in-pod DNS proxy answers inside the pod, on localhost:15053, as the pod
        // (namespace bar: `echo.foo` expands to the foo service).
        let (answers, _) = dns_ask(&lab.a, "127.0.0.1:15053".parse().unwrap(), "echo.foo.");
        assert_eq!(answers, vec!["10.96.0.10".to_owned()]);

        // Stop the ztunnels; each agent saw: malformed → nack, Add → ack, Snapshot → ack.
        for c in &mut lab.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for a in agents {
            let acks = a.join().unwrap();
            assert!(acks[0].contains("not a WorkloadRequest"), "{acks:?}");
            assert_eq!(&acks[1..], &["", ""], "{acks:?}");
        }
    }
}
