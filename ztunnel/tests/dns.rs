//! The DNS proxy on loopback: a real ztunnel with `--dns-proxy-addr`, queried over UDP and
//! TCP; names the mesh knows are answered from its config, others are forwarded to an
//! upstream resolver (a small hickory-proto responder on loopback) and relayed unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

use common::Mesh;

fn config(client_ip: IpAddr) -> String {
    format!(
        "workloads:
- uid: bar/sleep
  name: sleep
  namespace: bar
  serviceAccount: sleep
  workloadIps: [{client_ip}]
  protocol: HBONE
  node: node-a
- uid: foo/echo-0
  name: echo-0
  namespace: foo
  serviceAccount: echo
  workloadIps: [10.244.2.7]
  protocol: HBONE
  node: node-b
  services:
    foo/echo.foo.svc.cluster.local: {{80: 8080}}
    foo/db.foo.svc.cluster.local: {{5432: 5432}}
services:
- name: echo
  namespace: foo
  hostname: echo.foo.svc.cluster.local
  vips: [/10.96.0.10]
  ports: {{80: 8080}}
- name: db
  namespace: foo
  hostname: db.foo.svc.cluster.local
  vips: []
  ports: {{5432: 5432}}
- name: api
  namespace: bar
  hostname: api.bar.svc.cluster.local
  vips: [/10.96.0.20, /fd00::20]
  ports: {{80: 80}}
"
    )
}

/// An upstream resolver on loopback that answers every A query with 192.0.2.1 and counts.
async fn upstream(at: IpAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind((at, 0)).await.unwrap();
    let addr = sock.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, src)) = sock.recv_from(&mut buf).await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let req = Message::from_vec(&buf[..n]).unwrap();
            let mut resp = Message::response(req.metadata.id, OpCode::Query);
            resp.metadata.recursion_available = true;
            let q = req.queries[0].clone();
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                300,
                RData::A(A::new(192, 0, 2, 1)),
            ));
            resp.add_query(q);
            sock.send_to(&resp.to_vec().unwrap(), src).await.unwrap();
        }
    });
    (addr, count)
}

fn query(name: &str, t: RecordType) -> Message {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m
}

async fn ask_udp(from: IpAddr, server: SocketAddr, msg: &Message) -> Message {
    let s = UdpSocket::bind((from, 0)).await.unwrap();
    s.send_to(&msg.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.recv(&mut buf))
        .await
        .expect("no DNS answer")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

async fn ask_tcp(from: IpAddr, server: SocketAddr, msgs: &[Message]) -> Vec<Message> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((from, 0).into()).unwrap();
    let mut s: TcpStream = sock.connect(server).await.unwrap();
    // Both queries pipelined on one connection.
    for m in msgs {
        let b = m.to_vec().unwrap();
        s.write_all(&(b.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&b).await.unwrap();
    }
    let mut out = Vec::new();
    for _ in msgs {
        let n = s.read_u16().await.unwrap() as usize;
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).await.unwrap();
        out.push(Message::from_vec(&b).unwrap());
    }
    out
}

fn addrs(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            RData::CNAME(c) => format!("CNAME {}", c.0),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn mesh_names_are_answered_locally_and_others_forwarded() {
    let mesh = Mesh::new(70);
    let client = mesh.ip(9);
    let (up, up_count) = upstream(mesh.ip(53)).await;
    // resolv.conf names the upstream's IP; the test points the proxy at its port.
    let cfg = mesh.write("zt.yaml", &config(client));
    let rc = mesh.write(
        "resolv.conf",
        &format!(
            "search bar.svc.cluster.local svc.cluster.local cluster.local\nnameserver {}\n",
            up.ip()
        ),
    );
    let zt = mesh
        .ztunnel(
            &cfg,
            "node-a",
            mesh.ip(1),
            &[
                "--dns-proxy-addr",
                &format!("{}:0", mesh.ip(1)),
                "--dns-resolv-conf",
                rc.to_str().unwrap(),
            ],
        )
        .await;
    let dns = zt.addresses.dns.expect("DNS proxy bound");
    // The upstream listens on an ephemeral port, not 53: point the proxy at it.
    let dns_shared = zt.proxy.dns.clone().unwrap();
    assert_eq!(dns_shared.upstreams, vec![SocketAddr::new(up.ip(), 53)]);
    drop(dns_shared);
    let proxy = ztunnel::dns::server::DnsServer::bind(
        &ztunnel::proxy::DefaultSocketFactory,
        SocketAddr::new(mesh.ip(2), 0),
        false,
        ztunnel::dns::server::Handler {
            shared: Arc::new(ztunnel::dns::server::DnsShared {
                resolver: ztunnel::dns::Resolver::new(
                    "cluster.local",
                    vec!["bar.svc.cluster.local".into()],
                ),
                state: zt.proxy.state.clone(),
                upstreams: vec![up],
                metrics: Default::default(),
                mark: None,
            }),
            client: ztunnel::dns::server::Client::BySourceIp,
        },
    )
    .unwrap();
    let fwd = proxy.local_addr().unwrap();
    let (_t, w) = mesh_rt::drain::new();
    tokio::spawn(proxy.run(w));

    // Short, partial and full names of a service with a VIP, from namespace bar.
    for name in [
        "echo.foo.",
        "echo.foo.svc.",
        "echo.foo.svc.cluster.local.",
        "ECHO.Foo.",
    ] {
        let r = ask_udp(client, dns, &query(name, RecordType::A)).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(r.metadata.id, 0x4242);
        assert!(r.metadata.authoritative && r.metadata.recursion_desired);
        assert_eq!(addrs(&r), vec!["10.96.0.10"], "{name}");
        assert_eq!(r.answers[0].ttl, 30);
    }
    // The client's own namespace for one label; AAAA from the v6 VIP.
    let r = ask_udp(client, dns, &query("api.", RecordType::AAAA)).await;
    assert_eq!(addrs(&r), vec!["fd00::20"]);
    // A known name with no address of that family: NODATA, not forwarded.
    let r = ask_udp(client, dns, &query("echo.foo.", RecordType::AAAA)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // Headless service: the endpoints' addresses.
    let r = ask_udp(client, dns, &query("db.foo.", RecordType::A)).await;
    assert_eq!(addrs(&r), vec!["10.244.2.7"]);
    assert_eq!(up_count.load(Ordering::SeqCst), 0, "nothing forwarded yet");

    // Non-mesh names go upstream and come back unchanged (TTL 300 from the upstream).
    let r = ask_udp(client, fwd, &query("www.example.org.", RecordType::A)).await;
    assert_eq!(addrs(&r), vec!["192.0.2.1"]);
    assert_eq!(r.answers[0].ttl, 300);
    assert_eq!(up_count.load(Ordering::SeqCst), 1);
    // Other record types are forwarded even for mesh names.
    let r = ask_udp(client, fwd, &query("echo.foo.", RecordType::TXT)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(up_count.load(Ordering::SeqCst), 2);
    // A client the mesh does not know is forwarded too.
    let r = ask_udp(mesh.ip(99), fwd, &query("echo.foo.", RecordType::A)).await;
    assert_eq!(addrs(&r), vec!["192.0.2.1"]);

    // TCP, two pipelined queries on one connection.
    let rs = ask_tcp(
        client,
        dns,
        &[
            query("echo.foo.", RecordType::A),
            query("api.bar.", RecordType::A),
        ],
    )
    .await;
    assert_eq!(addrs(&rs[0]), vec!["10.96.0.10"]);
    assert_eq!(addrs(&rs[1]), vec!["10.96.0.20"]);

    // Garbage gets FORMERR for that query only; the server keeps answering.
    let s = UdpSocket::bind((client, 0)).await.unwrap();
    s.send_to(&[0x12, 0x34, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0xff], dns)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 0x1234);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    let r = ask_udp(client, dns, &query("echo.foo.", RecordType::A)).await;
    assert_eq!(addrs(&r), vec!["10.96.0.10"]);

    // The proxy's upstream (port 53 of the resolv.conf address) does not answer: SERVFAIL.
    let r = ask_udp(client, dns, &query("www.example.org.", RecordType::A)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);

    // Metrics name what happened.
    let m = zt.proxy.dns.as_ref().unwrap().metrics.clone();
    let mut text = String::new();
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register("dns_requests", "", m.requests.clone());
    prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
    assert!(text.contains("request_query_type=\"AAAA\""), "{text}");
    assert!(text.contains("source_workload_namespace=\"bar\""), "{text}");
    drop(zt);
}

#[tokio::test]
async fn service_changes_are_seen_by_the_next_query() {
    let mesh = Mesh::new(71);
    let client = mesh.ip(9);
    let cfg = mesh.write("zt.yaml", &config(client));
    let rc = mesh.write("resolv.conf", "nameserver 127.0.0.1\n");
    let zt = mesh
        .ztunnel(
            &cfg,
            "node-a",
            mesh.ip(1),
            &[
                "--dns-proxy-addr",
                &format!("{}:0", mesh.ip(1)),
                "--dns-resolv-conf",
                rc.to_str().unwrap(),
            ],
        )
        .await;
    let dns = zt.addresses.dns.unwrap();
    let r = ask_udp(client, dns, &query("echo.foo.", RecordType::A)).await;
    assert_eq!(addrs(&r), vec!["10.96.0.10"]);
    // The config file changes the VIP; the watcher reloads it.
    let next = config(client).replace("/10.96.0.10", "/10.96.0.11");
    let tmp = mesh.write("zt.yaml.tmp", &next);
    std::fs::rename(tmp, &cfg).unwrap();
    for _ in 0..100 {
        let r = ask_udp(client, dns, &query("echo.foo.", RecordType::A)).await;
        if addrs(&r) == vec!["10.96.0.11"] {
            drop(zt);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the DNS proxy never saw the new VIP");
}
