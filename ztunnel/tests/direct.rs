//! Whole ztunnels in-process on loopback: a client workload on node A, a server workload on
//! node B, traffic through A's SOCKS5 entry → HBONE (mTLS, HTTP/2 CONNECT) → B → the app.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use common::*;
use tokio::{io::AsyncReadExt, net::TcpStream};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/bar/sa/sleep";

/// Workloads as one ztunnel sees them. `server_sa` lets a test give two ztunnels
/// different views of the server's identity.
fn config(m: &Mesh, app_port: u16, server_sa: &str, policies: &str) -> String {
    let (c, s) = (m.ip(2), m.ip(3));
    let vip = m.ip(100);
    format!(
        r#"
workloads:
- uid: bar/sleep
  name: sleep
  namespace: bar
  serviceAccount: sleep
  workloadIps: [{c}]
  protocol: HBONE
  node: node-a
- uid: foo/echo
  name: echo
  namespace: foo
  serviceAccount: {server_sa}
  workloadIps: [{s}]
  protocol: HBONE
  node: node-b
  services:
    foo/echo.foo.svc.cluster.local: {{80: {app_port}}}
services:
- name: echo
  namespace: foo
  hostname: echo.foo.svc.cluster.local
  vips: [/{vip}]
  ports: {{80: {app_port}}}
policies: {policies}
"#
    )
}

struct Two {
    m: Mesh,
    a: ztunnel::app::Bound,
    b: ztunnel::app::Bound,
    app: SocketAddr,
}

impl Two {
    fn socks(&self) -> SocketAddr {
        self.a.addresses.socks5.unwrap()
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.m.ip(100), 80)
    }

    async fn send(&self, dst: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let s = socks_connect(self.socks(), self.m.ip(2), dst).await?;
        round_trip(s, data).await
    }
}

async fn two(net: u8, sink_app: bool, policies_b: &str) -> Two {
    let m = Mesh::new(net);
    let app = if sink_app {
        sink(m.ip(3)).await
    } else {
        echo(m.ip(3)).await
    };
    let ca = m.write("a.yaml", &config(&m, app.port(), "echo", "[]"));
    let cb = m.write("b.yaml", &config(&m, app.port(), "echo", policies_b));
    let a = m.ztunnel(&ca, "node-a", m.ip(2), &[]).await;
    let b = m.ztunnel(&cb, "node-b", m.ip(3), &[]).await;
    Two { m, a, b, app }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_both_ways_and_server_sees_client_identity() {
    let t = two(10, false, "[]").await;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    // Through the service VIP (endpoint picked, port mapped) and to the pod IP directly.
    assert_eq!(t.send(t.vip(), &data).await.unwrap(), data);
    assert_eq!(t.send(t.app, b"hello").await.unwrap(), b"hello");

    let (_, metrics) = http_get(t.b.addresses.stats, "/metrics").await;
    let inbound = [("reporter", "destination"), ("source_principal", CLIENT_ID)];
    assert_eq!(
        metric_sum(&metrics, "istio_tcp_connections_opened_total", &inbound),
        2,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "istio_tcp_received_bytes_total", &inbound),
        data.len() as u64 + 5
    );
    assert!(metrics.contains("destination_principal=\"spiffe://cluster.local/ns/foo/sa/echo\""));
    assert!(metrics.contains("connection_security_policy=\"mutual_tls\""));
    let (_, metrics_a) = http_get(t.a.addresses.stats, "/metrics").await;
    let outbound = [
        ("reporter", "source"),
        ("destination_service", "echo.foo.svc.cluster.local"),
    ];
    assert_eq!(
        metric_sum(&metrics_a, "istio_tcp_connections_closed_total", &outbound),
        1
    );
    // Both connections shared one HBONE connection.
    assert_eq!(t.a.proxy.pool.connections_opened(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_inbound_connection_goes_through_authorization() {
    let t = two(11, false, "[]").await;
    for i in 0..5u8 {
        assert_eq!(t.send(t.vip(), &[i; 10]).await.unwrap(), vec![i; 10]);
    }
    assert_eq!(t.b.proxy.authz_calls.load(Ordering::Relaxed), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_policy_refuses_the_connection() {
    let deny = r#"
- name: deny-sleep
  namespace: foo
  scope: Namespace
  action: Deny
  rules: [[[{principals: [{Exact: cluster.local/ns/bar/sa/sleep}]}]]]
"#;
    let t = two(12, false, deny).await;
    let err = t.send(t.vip(), b"secret").await.unwrap_err();
    assert!(
        err.to_string().contains("socks reply 2"),
        "denied is 'not allowed by ruleset': {err}"
    );
    assert_eq!(t.b.proxy.authz_calls.load(Ordering::Relaxed), 1);
    let (_, metrics) = http_get(t.b.addresses.stats, "/metrics").await;
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_tcp_received_bytes_total",
            &[("reporter", "destination")]
        ),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policy_admits_only_the_named_principal() {
    let allow_other = r#"
- name: allow-other
  namespace: foo
  scope: Namespace
  action: Allow
  rules: [[[{principals: [{Exact: cluster.local/ns/bar/sa/other}]}]]]
"#;
    let t = two(13, false, allow_other).await;
    assert!(t.send(t.vip(), b"x").await.unwrap_or_default().is_empty());

    let allow_sleep = allow_other.replace("sa/other", "sa/sleep");
    let t = two(14, false, &allow_sleep).await;
    assert_eq!(t.send(t.vip(), b"x").await.unwrap(), b"x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_unexpected_identity_is_refused_by_the_client() {
    let m = Mesh::new(15);
    let app = echo(m.ip(3)).await;
    // A expects the server to be `echo`; B serves it as `impostor` and presents that.
    let ca = m.write("a.yaml", &config(&m, app.port(), "echo", "[]"));
    let cb = m.write("b.yaml", &config(&m, app.port(), "impostor", "[]"));
    let a = m.ztunnel(&ca, "node-a", m.ip(2), &[]).await;
    let b = m.ztunnel(&cb, "node-b", m.ip(3), &[]).await;
    let err = socks_connect(a.addresses.socks5.unwrap(), m.ip(2), app)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("socks reply 5"), "{err}");
    assert_eq!(
        b.proxy.authz_calls.load(Ordering::Relaxed),
        0,
        "refused during the handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_foreign_trust_domain_is_refused() {
    let m = Mesh::new(16);
    let app = echo(m.ip(3)).await;
    // A runs in trust domain evil.org (same CA!), B accepts only cluster.local.
    let evil = config(&m, app.port(), "echo", "[]").replacen(
        "  serviceAccount: sleep\n",
        "  serviceAccount: sleep\n  trustDomain: evil.org\n",
        1,
    );
    let ca = m.write("a.yaml", &evil);
    let cb = m.write("b.yaml", &config(&m, app.port(), "echo", "[]"));
    let a = m
        .ztunnel(
            &ca,
            "node-a",
            m.ip(2),
            &[
                "--trust-domain",
                "evil.org",
                "--trust-domain-aliases",
                "cluster.local",
            ],
        )
        .await;
    let b = m.ztunnel(&cb, "node-b", m.ip(3), &[]).await;
    assert!(
        socks_connect(a.addresses.socks5.unwrap(), m.ip(2), app)
            .await
            .is_err()
    );
    assert_eq!(b.proxy.authz_calls.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_client_on_hbone_port_is_refused() {
    let t = two(17, false, "[]").await;
    let mut s = TcpStream::connect(SocketAddr::new(t.m.ip(3), 15008))
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(b"CONNECT 127.17.0.3:80 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&buf).contains("200"),
        "no tunnel for plaintext"
    );
    assert_eq!(t.b.proxy.authz_calls.load(Ordering::Relaxed), 0);
    // The ztunnel is unaffected.
    assert_eq!(t.send(t.vip(), b"ok").await.unwrap(), b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_stream_arrives_intact() {
    let t = two(18, true, "[]").await;
    let s = socks_connect(t.socks(), t.m.ip(2), t.app).await.unwrap();
    let (mut r, mut w) = s.into_split();
    use tokio::io::AsyncWriteExt;
    const TOTAL: u64 = 1 << 30;
    let writer = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..251u32 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sent = 0u64;
        while sent < TOTAL {
            let n = (TOTAL - sent).min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..n]).await.unwrap();
            sent += n as u64;
        }
        w.shutdown().await.unwrap();
    });
    let count = tokio::time::timeout(Duration::from_secs(300), r.read_u64())
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(
        count, TOTAL,
        "sink saw wrong count or corrupted bytes (u64::MAX)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_complete() {
    let t = std::sync::Arc::new(two(19, false, "[]").await);
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let data = i.to_be_bytes().repeat(256);
            let s = socks_connect(t.socks(), t.m.ip(2), t.vip()).await?;
            let got = round_trip(s, &data).await?;
            Ok::<bool, std::io::Error>(got == data)
        }));
    }
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap().unwrap() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1000);
    assert!(
        t.a.proxy.pool.connections_opened() <= 20,
        "streams must share pooled connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_dump_config_and_report_readiness() {
    let t = two(20, false, "[]").await;
    let (status, body) = http_get(t.a.addresses.readiness, "/healthz/ready").await;
    assert_eq!(status, 200, "{body}");
    // Use a certificate first so it shows in the dump.
    t.send(t.vip(), b"x").await.unwrap();
    let (status, body) = http_get(t.a.addresses.admin, "/config_dump").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["state"]["workloads"].as_array().unwrap().len(), 2);
    assert_eq!(v["certificates"][0]["identity"], CLIENT_ID);
    // The allocator's counters next to the process RSS (jemalloc is the binary's global
    // allocator, not this test's, so only the shape is checked here).
    let (status, body) = http_get(t.a.addresses.admin, "/debug/memory").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["allocator"], "jemalloc");
    for key in [
        "allocated",
        "active",
        "resident",
        "mapped",
        "metadata",
        "retained",
    ] {
        assert!(v[key].is_u64(), "{key} in {body}");
    }
    assert!(v["process_rss"].as_u64().unwrap() > 0, "{body}");
    let (status, body) = http_get(t.a.addresses.admin, "/debug/memory/stats").await;
    assert_eq!(status, 200);
    assert!(body.contains("jemalloc statistics"), "{body}");
    let (status, _) = http_get(t.a.addresses.admin, "/nope").await;
    assert_eq!(status, 404);
}

/// Found by the netns lab: a selector policy attached after an HBONE connection was
/// accepted must apply to the next stream on that same pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_attached_later_applies_to_streams_on_an_open_connection() {
    let t = two(24, false, "[]").await;
    assert_eq!(t.send(t.vip(), b"before").await.unwrap(), b"before");
    let opened = t.a.proxy.pool.connections_opened();
    let deny = r#"
- name: deny-sel
  namespace: foo
  scope: WorkloadSelector
  action: Deny
  rules: [[[{principals: [{Exact: cluster.local/ns/bar/sa/sleep}]}]]]
"#;
    let body = config(&t.m, t.app.port(), "echo", deny).replace(
        "  node: node-b\n",
        "  node: node-b\n  authorizationPolicies: [foo/deny-sel]\n",
    );
    assert!(body.contains("authorizationPolicies"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(t.m.dir.path().join("b.yaml"), body).unwrap();
    let mut denied = false;
    for _ in 0..50 {
        if t.send(t.vip(), b"after").await.is_err() {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(denied, "the selector policy was never enforced");
    assert_eq!(
        t.a.proxy.pool.connections_opened(),
        opened,
        "the stream rode the connection opened before the policy existed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_reload_keeps_serving_previous_state() {
    let t = two(21, false, "[]").await;
    let path = t.m.dir.path().join("b.yaml");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&path, "workloads: [{uid: x, workloadIps: [nope]}]").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(t.send(t.vip(), b"still").await.unwrap(), b"still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_open_connections_finish_and_refuses_new_ones() {
    let t = two(22, false, "[]").await;
    let s = socks_connect(t.socks(), t.m.ip(2), t.vip()).await.unwrap();
    let Two { m, a, b, .. } = t;
    let socks = a.addresses.socks5.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let drained = tokio::spawn(a.wait_termination(async move {
        let _ = rx.await;
    }));
    tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The open connection still works...
    assert_eq!(round_trip(s, b"in flight").await.unwrap(), b"in flight");
    // ...and the drain completes once it closed, well before the deadline.
    let outcome = tokio::time::timeout(Duration::from_secs(3), drained)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, mesh_rt::drain::DrainOutcome::Complete);
    // New connections are refused.
    assert!(
        socks_connect(socks, m.ip(2), SocketAddr::new(m.ip(100), 80))
            .await
            .is_err()
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connect_requests_get_clear_statuses_and_leave_others_unaffected() {
    let t = two(23, false, "[]").await;
    let dir = t.m.ca_dir();
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
    let ca = mesh_tls::ca::LocalCa::from_pem(
        &read("ca-key.pem"),
        &read("ca-cert.pem"),
        &read("cert-chain.pem"),
        &read("root-cert.pem"),
    )
    .unwrap();
    let me: mesh_core::Identity = CLIENT_ID.parse().unwrap();
    let server: mesh_core::Identity = "spiffe://cluster.local/ns/foo/sa/echo".parse().unwrap();
    let cert = ca.issue(&me, Duration::from_secs(600)).unwrap();
    let pool = mesh_hbone::Pool::new(Default::default());
    let hbone = SocketAddr::new(t.m.ip(3), 15008);
    let open = |uri: String| {
        let pool = pool.clone();
        let cert = cert.clone();
        let (me, server) = (me.clone(), server.clone());
        async move {
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(uri)
                .body(())
                .unwrap();
            let key = mesh_hbone::PoolKey {
                src: me,
                dst_identity: server.clone(),
                dst: hbone,
                scope: 0,
            };
            pool.connect(
                key,
                move || mesh_tls::client_config(&cert, vec![server]),
                mesh_hbone::client::default_connector().as_ref(),
                req,
            )
            .await
        }
    };
    let status = |r: Result<mesh_hbone::Tunnel, mesh_hbone::Error>| match r {
        Err(mesh_hbone::Error::Refused { status, .. }) => status.as_u16(),
        Ok(_) => 200,
        Err(e) => panic!("unexpected {e}"),
    };
    // A hostname is not an IP:port.
    assert_eq!(
        status(open("echo.foo.svc.cluster.local:80".into()).await),
        400
    );
    // The client's own workload is not the workload this connection authenticated.
    assert_eq!(status(open(format!("{}:80", t.m.ip(2))).await), 400);
    // Nothing listens on that port of the right workload.
    assert_eq!(status(open(format!("{}:1", t.m.ip(3))).await), 503);
    // The same HBONE connection still carries good streams.
    assert_eq!(status(open(t.app.to_string()).await), 200);
    assert_eq!(pool.connections_opened(), 1);
    assert_eq!(t.send(t.vip(), b"fine").await.unwrap(), b"fine");
}
