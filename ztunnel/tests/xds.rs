//! ztunnel configured by a control plane: delta xDS for workloads and policies, the Istio CA
//! for certificates, on one TLS port, as istiod serves them. Two in-process ztunnels on
//! loopback carry real HBONE traffic between them while the control plane pushes changes,
//! rejects, crashes and comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use common::{controlplane::*, *};
use mesh_core::{
    policy::{self, Action, Authorization, Scope},
    workload::{PortMap, Service, TunnelProtocol, Workload},
};
use mesh_proto::{convert, istio::workload as pbw, type_url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/bar/sa/sleep";
const SERVER_ID: &str = "spiffe://cluster.local/ns/foo/sa/echo";

fn workload(m: &Mesh, uid: &str, ns: &str, sa: &str, host: u8, node: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: uid.rsplit('/').next().unwrap().into(),
        namespace: ns.into(),
        workload_ips: vec![m.ip(host)],
        protocol: TunnelProtocol::Hbone,
        service_account: sa.into(),
        node: node.into(),
        ..Default::default()
    }
}

fn address(w: &Workload) -> pbw::Address {
    convert::address_to_proto(&convert::AddressResource::Workload(w.clone()))
}

fn deny_all_from_bar() -> Authorization {
    Authorization {
        name: "deny-bar".into(),
        namespace: "foo".into(),
        scope: Scope::Namespace,
        action: Action::Deny,
        rules: vec![policy::Rule {
            clauses: vec![vec![policy::Match {
                namespaces: vec![policy::StringMatch::Exact("bar".into())],
                ..Default::default()
            }]],
        }],
        dry_run: false,
    }
}

struct Lab {
    m: Mesh,
    cp: ControlPlane,
    cp_addr: SocketAddr,
    cp_task: tokio::task::JoinHandle<()>,
    a: ztunnel::app::Bound,
    /// The destination's ztunnel; kept alive for the test's duration.
    _b: ztunnel::app::Bound,
}

impl Lab {
    async fn new(net: u8) -> Lab {
        let m = Mesh::new(net);
        let ca = mesh_tls::ca::LocalCa::from_pem(
            &std::fs::read_to_string(m.ca_dir().join("ca-key.pem")).unwrap(),
            &std::fs::read_to_string(m.ca_dir().join("ca-cert.pem")).unwrap(),
            &std::fs::read_to_string(m.ca_dir().join("cert-chain.pem")).unwrap(),
            &std::fs::read_to_string(m.ca_dir().join("root-cert.pem")).unwrap(),
        )
        .unwrap();
        let cp = ControlPlane::new(ca);
        let app = echo(m.ip(3)).await;
        let mut echo_w = workload(&m, "Kubernetes//Pod/foo/echo", "foo", "echo", 3, "node-b");
        echo_w.services = BTreeMap::from([(
            "foo/echo.foo.svc.cluster.local".to_owned(),
            PortMap::from([(80, app.port())]),
        )]);
        cp.set_message(type_url::ADDRESS, &echo_w.uid, &address(&echo_w));
        let sleep_w = workload(&m, "Kubernetes//Pod/bar/sleep", "bar", "sleep", 2, "node-a");
        cp.set_message(type_url::ADDRESS, &sleep_w.uid, &address(&sleep_w));
        let svc = Service {
            name: "echo".into(),
            namespace: "foo".into(),
            hostname: "echo.foo.svc.cluster.local".into(),
            vips: vec![format!("/{}", m.ip(100)).parse().unwrap()],
            ports: BTreeMap::from([(80, app.port())]),
            waypoint: None,
        };
        cp.set_message(
            type_url::ADDRESS,
            "foo/echo.foo.svc.cluster.local",
            &convert::address_to_proto(&convert::AddressResource::Service(svc)),
        );
        let (cp_addr, cp_task) = cp.serve(SocketAddr::new(m.ip(1), 0)).await;
        let (root, token) = cp.write_files(m.dir.path());
        let src = |_: &str| {
            vec![
                "--xds-address".to_owned(),
                format!("https://{cp_addr}"),
                "--alt-xds-hostname".to_owned(),
                SERVER_NAME.to_owned(),
                "--xds-root-ca".to_owned(),
                root.display().to_string(),
                "--auth-token-path".to_owned(),
                token.display().to_string(),
                "--secret-ttl".to_owned(),
                "1h".to_owned(),
            ]
        };
        let a = m.ztunnel_with(&src("a"), "node-a", m.ip(2), &[]).await;
        let b = m.ztunnel_with(&src("b"), "node-b", m.ip(3), &[]).await;
        wait_ready(&a).await;
        wait_ready(&b).await;
        Lab {
            m,
            cp,
            cp_addr,
            cp_task,
            a,
            _b: b,
        }
    }

    async fn send(&self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let s = socks_connect(
            self.a.addresses.socks5.unwrap(),
            self.m.ip(2),
            SocketAddr::new(self.m.ip(100), 80),
        )
        .await?;
        round_trip(s, data).await
    }

    /// Retries `send` until its outcome is `want` (a push takes a moment to arrive).
    async fn eventually(&self, want: bool) {
        for _ in 0..100 {
            if self.send(b"ping").await.is_ok() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "traffic never became {}",
            if want { "allowed" } else { "denied" }
        );
    }
}

async fn eventually<F: Fn() -> bool>(what: &str, f: F) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_configures_both_nodes_and_its_ca_signs_their_certificates() {
    let lab = Lab::new(60).await;
    assert_eq!(
        lab.send(b"hello over xds").await.unwrap(),
        b"hello over xds"
    );

    lab.cp.seen(|s| {
        // Each ztunnel asked for its own workloads' identities, with the token.
        assert!(s.issued.contains(&CLIENT_ID.to_owned()), "{:?}", s.issued);
        assert!(s.issued.contains(&SERVER_ID.to_owned()), "{:?}", s.issued);
        assert_eq!(s.unauthenticated, 0);
        // Both types subscribed on both streams, every response ACKed cleanly.
        assert_eq!(s.initial.len(), 4, "{:?}", s.initial);
        assert!(
            s.acks.iter().all(|(_, _, nack)| nack.is_none()),
            "{:?}",
            s.acks
        );
        assert!(
            s.nodes.iter().all(|n| n.starts_with("ztunnel~")),
            "{:?}",
            s.nodes
        );
    });

    // A policy pushed later is enforced by the destination's ztunnel...
    lab.cp.set_message(
        type_url::AUTHORIZATION,
        "foo/deny-bar",
        &convert::authorization_to_proto(&deny_all_from_bar()),
    );
    lab.eventually(false).await;
    // ...and its removal, a delta, restores traffic.
    lab.cp.set(type_url::AUTHORIZATION, "foo/deny-bar", None);
    lab.eventually(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_resource_is_nacked_by_field_and_the_rest_keeps_working() {
    let lab = Lab::new(61).await;
    let mut bad = address(&workload(
        &lab.m,
        "Kubernetes//Pod/foo/bad",
        "foo",
        "x",
        9,
        "node-b",
    ));
    if let Some(pbw::address::Type::Workload(w)) = bad.r#type.as_mut() {
        w.addresses = vec![vec![10, 0, 0]];
    }
    lab.cp
        .set_message(type_url::ADDRESS, "Kubernetes//Pod/foo/bad", &bad);
    eventually("a NACK", || {
        lab.cp.seen(|s| {
            s.acks.iter().any(|(_, _, n)| {
                n.as_deref().is_some_and(|m| {
                    m.contains("Kubernetes//Pod/foo/bad") && m.contains("workload.addresses[0]")
                })
            })
        })
    })
    .await;
    assert_eq!(lab.send(b"still fine").await.unwrap(), b"still fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_outage_keeps_config_and_connections_then_resyncs() {
    let mut lab = Lab::new(62).await;
    // A long-lived connection opened before the outage.
    let mut held = socks_connect(
        lab.a.addresses.socks5.unwrap(),
        lab.m.ip(2),
        SocketAddr::new(lab.m.ip(100), 80),
    )
    .await
    .unwrap();
    held.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).await.unwrap();

    // The control plane dies (its streams with it).
    lab.cp_task.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Established and new connections both keep working on the last configuration.
    held.write_all(b"during").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    assert_eq!(lab.send(b"new conn").await.unwrap(), b"new conn");

    // While it is down, a policy is added: it must arrive after the reconnect.
    lab.cp.set_message(
        type_url::AUTHORIZATION,
        "foo/deny-bar",
        &convert::authorization_to_proto(&deny_all_from_bar()),
    );
    let before = lab.cp.seen(|s| s.initial.len());
    let (_, task) = lab.cp.serve(lab.cp_addr).await;
    lab.cp_task = task;
    lab.eventually(false).await;
    lab.cp.seen(|s| {
        // The reconnect announced what each ztunnel already held.
        let again = &s.initial[before..];
        assert!(
            again.iter().any(|(t, names)| t == type_url::ADDRESS
                && names.contains("Kubernetes//Pod/foo/echo")
                && names.contains("foo/echo.foo.svc.cluster.local")),
            "{again:?}"
        );
    });
    // The connection opened before the outage was never dropped.
    held.write_all(b"after!").await.unwrap();
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"after!");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_signs_the_wrong_identity_is_not_trusted() {
    let m = Mesh::new(63);
    let ca = mesh_tls::ca::LocalCa::generate("cluster.local").unwrap();
    let cp = ControlPlane::new(ca);
    let w = workload(&m, "Kubernetes//Pod/bar/sleep", "bar", "sleep", 2, "node-a");
    cp.set_message(type_url::ADDRESS, &w.uid, &address(&w));
    cp.sign_wrong_identity(Some(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .parse()
            .unwrap(),
    ));
    let (addr, _task) = cp.serve(std::net::SocketAddr::new(m.ip(1), 0)).await;
    let (root, token) = cp.write_files(m.dir.path());
    let src = vec![
        "--xds-address".to_owned(),
        format!("https://{addr}"),
        "--alt-xds-hostname".to_owned(),
        SERVER_NAME.to_owned(),
        "--xds-root-ca".to_owned(),
        root.display().to_string(),
        "--auth-token-path".to_owned(),
        token.display().to_string(),
    ];
    let a = m.ztunnel_with(&src, "node-a", m.ip(2), &[]).await;
    // The configuration arrives, but readiness stays blocked on certificates.
    eventually("config applied", || {
        !a.ready.pending().contains(&"config".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.ready.pending(), vec!["certificates".to_owned()]);
    assert!(cp.seen(|s| !s.issued.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_nothing_is_served() {
    let m = Mesh::new(64);
    let cp = ControlPlane::new(mesh_tls::ca::LocalCa::generate("cluster.local").unwrap());
    let (addr, _task) = cp.serve(std::net::SocketAddr::new(m.ip(1), 0)).await;
    let (root, _) = cp.write_files(m.dir.path());
    let bad_token = m.write("wrong-token", "not-the-token");
    let src = vec![
        "--xds-address".to_owned(),
        format!("https://{addr}"),
        "--alt-xds-hostname".to_owned(),
        SERVER_NAME.to_owned(),
        "--xds-root-ca".to_owned(),
        root.display().to_string(),
        "--auth-token-path".to_owned(),
        bad_token.display().to_string(),
    ];
    let a = m.ztunnel_with(&src, "node-a", m.ip(2), &[]).await;
    eventually("refusals", || cp.seen(|s| s.unauthenticated >= 2)).await;
    assert!(a.ready.pending().contains(&"config".to_owned()));
    // Fixing the token (kubelet rotating it) is picked up without a restart.
    std::fs::write(&bad_token, TOKEN).unwrap();
    eventually("ready after the token is fixed", || a.ready.is_ready()).await;
}
