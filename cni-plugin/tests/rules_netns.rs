//! Network-namespace tier for the rule backend: Istio's in-pod rules applied with real
//! `iptables-restore` inside namespaces this test creates, checked with `iptables-save`
//! and with real sockets (capture to 15001/15006/15053, mark 0x539 bypass), idempotency,
//! removal, and the host probe SNAT rule and ipset.
//!
//! Needs root; skips with a notice otherwise, unless MESH_REQUIRE_NETNS=1 (CI). Traffic
//! stays inside the namespaces made here; they are deleted by name on drop.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use cni_plugin::{
    iptables::{IptablesRestore, RuleBackend},
    netns::Netns,
    redirect::{Family, PodOptions},
};
use common::{TestNs, link, runnable};

fn backend() -> IptablesRestore {
    IptablesRestore {
        families: vec![Family::V4, Family::V6],
    }
}

/// Did `l` get a connection within `d`?
fn accepted(l: &TcpListener, d: Duration) -> bool {
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        match l.accept() {
            Ok(_) => return true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    false
}

/// Connects from inside `ns` (optionally with SO_MARK 0x539 set before connect()).
fn connect_from(ns: &TestNs, dst: SocketAddr, mark: bool) -> std::io::Result<TcpStream> {
    ns.run(move || {
        let domain = if dst.is_ipv4() {
            socket2::Domain::IPV4
        } else {
            socket2::Domain::IPV6
        };
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        if mark {
            s.set_mark(0x539)?;
        }
        s.connect_timeout(&dst.into(), Duration::from_secs(3))?;
        Ok(s.into())
    })
}

#[test]
fn pod_rules_are_istios_idempotent_and_removed_cleanly() {
    if !runnable() {
        return;
    }
    let pod = TestNs::new("rules");
    let netns = Netns::open(&pod.path()).unwrap();
    let b = backend();
    b.apply_pod(&netns, PodOptions::default()).unwrap();

    let v4 = pod.owned_rules(false);
    for want in [
        "mangle -A PREROUTING -j ISTIO_PRERT",
        "mangle -A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
        "mangle -A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
        "nat -A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "nat -A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
        "nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
        // DNS capture.
        "nat -A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "nat -A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053",
        "raw -A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1",
    ] {
        assert!(v4.iter().any(|l| l == want), "missing {want:?} in {v4:#?}");
    }
    let v6 = pod.owned_rules(true);
    assert!(
        v6.iter().any(|l| l == "nat -A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"),
        "{v6:#?}"
    );
    let rules4 = pod.exec(&["ip", "-4", "rule", "show", "pref", "32764"]);
    assert!(rules4.contains("fwmark 0x111/0xfff lookup 100"), "{rules4}");
    assert!(
        pod.exec(&["ip", "-4", "route", "show", "table", "100"])
            .contains("local default dev lo")
    );
    assert!(
        pod.exec(&["ip", "-6", "route", "show", "table", "100"])
            .contains("local default dev lo")
    );

    // Apply again: the same rules, not twice as many; one ip rule.
    b.apply_pod(&netns, PodOptions::default()).unwrap();
    assert_eq!(pod.owned_rules(false), v4);
    assert_eq!(pod.owned_rules(true), v6);
    assert_eq!(
        pod.exec(&["ip", "-4", "rule", "show", "pref", "32764"]),
        rules4
    );

    // DNS off on re-apply: the 15053 rules and our raw chains go, the rest stays.
    b.apply_pod(
        &netns,
        PodOptions {
            dns_capture: false,
            ..PodOptions::default()
        },
    )
    .unwrap();
    let nodns = pod.owned_rules(false);
    assert!(
        !nodns
            .iter()
            .any(|l| l.contains("15053") || l.starts_with("raw")),
        "{nodns:#?}"
    );
    assert!(
        nodns.iter().any(|l| l.contains("--to-ports 15001")),
        "{nodns:#?}"
    );

    b.remove_pod(&netns).unwrap();
    assert_eq!(pod.owned_rules(false), Vec::<String>::new());
    assert_eq!(pod.owned_rules(true), Vec::<String>::new());
    assert_eq!(pod.exec(&["ip", "-4", "rule", "show", "pref", "32764"]), "");
    assert_eq!(pod.exec(&["ip", "-4", "route", "show", "table", "100"]), "");
    // Removing again is a no-op success.
    b.remove_pod(&netns).unwrap();
}

#[test]
fn captured_traffic_reaches_ztunnel_ports_and_marked_sockets_bypass() {
    if !runnable() {
        return;
    }
    let pod = TestNs::new("pod");
    let peer = TestNs::new("peer");
    link(&pod, &peer, 211);
    let (pod_ip, peer_ip): (IpAddr, IpAddr) =
        ("10.211.0.1".parse().unwrap(), "10.211.0.2".parse().unwrap());
    let peer_ip6: IpAddr = "fd00:211::2".parse().unwrap();
    let netns = Netns::open(&pod.path()).unwrap();
    backend().apply_pod(&netns, PodOptions::default()).unwrap();

    // "ztunnel" listeners in the pod, an app server on the peer.
    let outbound = pod.run(|| TcpListener::bind("[::]:15001").unwrap());
    let inbound = pod.run(|| TcpListener::bind("[::]:15006").unwrap());
    let dns = pod.run(|| UdpSocket::bind("127.0.0.1:15053").unwrap());
    let app =
        peer.run(move || TcpListener::bind(SocketAddr::new(IpAddr::from([0u8; 4]), 8080)).unwrap());
    let app6 = peer.run(move || TcpListener::bind(SocketAddr::new(peer_ip6, 8080)).unwrap());

    // Outbound TCP (v4 and v6) is redirected to 15001; the app never sees it.
    let _c = connect_from(&pod, SocketAddr::new(peer_ip, 8080), false).unwrap();
    assert!(
        accepted(&outbound, Duration::from_secs(2)),
        "v4 outbound not captured on 15001"
    );
    assert!(
        !accepted(&app, Duration::from_millis(300)),
        "plaintext left the pod"
    );
    let _c6 = connect_from(&pod, SocketAddr::new(peer_ip6, 8080), false).unwrap();
    assert!(
        accepted(&outbound, Duration::from_secs(2)),
        "v6 outbound not captured on 15001"
    );
    assert!(
        !accepted(&app6, Duration::from_millis(300)),
        "v6 plaintext left the pod"
    );

    // A socket marked 0x539 (ztunnel's own) is not redirected.
    let _m = connect_from(&pod, SocketAddr::new(peer_ip, 8080), true).unwrap();
    assert!(
        accepted(&app, Duration::from_secs(2)),
        "marked socket was captured"
    );
    assert!(!accepted(&outbound, Duration::from_millis(300)));

    // Inbound plaintext to any pod port goes to 15006.
    let _i = connect_from(&peer, SocketAddr::new(pod_ip, 9090), false).unwrap();
    assert!(
        accepted(&inbound, Duration::from_secs(2)),
        "inbound not captured on 15006"
    );

    // DNS over UDP goes to 127.0.0.1:15053.
    pod.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(b"dns?", SocketAddr::new(peer_ip, 53)).unwrap();
    });
    dns.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = dns
        .recv_from(&mut buf)
        .expect("DNS query not captured on 15053");
    assert_eq!(&buf[..n], b"dns?");

    // Unenrolled: traffic goes straight to the app again.
    backend().remove_pod(&netns).unwrap();
    let _d = connect_from(&pod, SocketAddr::new(peer_ip, 8080), false).unwrap();
    assert!(
        accepted(&app, Duration::from_secs(2)),
        "still captured after removal"
    );
}

#[test]
fn host_probe_snat_rule_and_ipset() {
    if !runnable() {
        return;
    }
    let host = TestNs::new("host");
    let netns = Netns::open(&host.path()).unwrap();
    let b = backend();
    b.apply_host(&netns).unwrap();
    b.apply_host(&netns).unwrap();
    let nat = host.owned_rules(false);
    assert_eq!(
        nat,
        vec![
            "nat :ISTIO_POSTRT".to_string(),
            "nat -A POSTROUTING -j ISTIO_POSTRT".into(),
            "nat -A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127".into(),
        ]
    );
    assert!(
        host.owned_rules(true)
            .iter()
            .any(|l| l.contains("istio-inpod-probes-v6")
                && l.contains("fd16:9254:7127:1337:ffff:ffff:ffff:ffff"))
    );

    let ip: IpAddr = "10.244.1.2".parse().unwrap();
    b.probe_add(&netns, ip, "uid-a").unwrap();
    b.probe_add(&netns, "fd00::2".parse().unwrap(), "uid-a")
        .unwrap();
    let listed = host.exec(&["ipset", "save", "istio-inpod-probes-v4"]);
    assert!(
        listed.contains("add istio-inpod-probes-v4 10.244.1.2 comment \"uid-a\""),
        "{listed}"
    );
    // Another pod now owns the IP: the old pod's removal must not delete it.
    b.probe_add(&netns, ip, "uid-b").unwrap();
    b.probe_remove(&netns, ip, "uid-a").unwrap();
    assert!(
        host.exec(&["ipset", "save", "istio-inpod-probes-v4"])
            .contains("comment \"uid-b\"")
    );
    b.probe_remove(&netns, ip, "uid-b").unwrap();
    assert!(
        !host
            .exec(&["ipset", "save", "istio-inpod-probes-v4"])
            .contains("10.244.1.2")
    );
    assert!(
        host.exec(&["ipset", "save", "istio-inpod-probes-v6"])
            .contains("fd00::2")
    );
}
