//! Client pool ↔ server over loopback TLS: streams, reuse, half-close, refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use mesh_core::Identity;
use mesh_hbone::{
    H2Settings, Pool, PoolKey,
    client::{PoolSettings, default_connector},
    header, relay, serve_connection,
};
use mesh_tls::{TrustPolicy, WorkloadCert, ca::LocalCa, client_config, server_config};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const CLIENT: &str = "spiffe://cluster.local/ns/bar/sa/sleep";
const SERVER: &str = "spiffe://cluster.local/ns/foo/sa/echo";

struct Fixture {
    client_cert: WorkloadCert,
    hbone: SocketAddr,
    echo: SocketAddr,
}

/// An echo app and an HBONE server that relays every accepted CONNECT to its authority.
async fn fixture() -> Fixture {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let ttl = Duration::from_secs(3600);
    let client_cert = ca.issue(&CLIENT.parse().unwrap(), ttl).unwrap();
    let server_cert = ca.issue(&SERVER.parse().unwrap(), ttl).unwrap();

    let echo_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = echo_l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = echo_l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hbone = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        server_config(&server_cert, TrustPolicy::new("cluster.local")).unwrap(),
    ));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = serve_connection(
                    tls,
                    &H2Settings::default(),
                    |inc: mesh_hbone::Incoming| async move {
                        if inc.dst.port() == 1 {
                            inc.reject(http::StatusCode::UNAUTHORIZED);
                            return;
                        }
                        let app = TcpStream::connect(inc.dst).await.unwrap();
                        let (mut send, mut recv) = inc.accept().unwrap();
                        let _ = relay(&app, &mut send, &mut recv).await;
                    },
                    std::future::pending(),
                )
                .await;
            });
        }
    });
    Fixture {
        client_cert,
        hbone,
        echo,
    }
}

async fn open(
    f: &Fixture,
    pool: &Pool,
    dst: SocketAddr,
) -> Result<mesh_hbone::Tunnel, mesh_hbone::Error> {
    open_via(f, pool, f.hbone, dst).await
}

/// Like [`open`], reaching the HBONE server at `hbone` (a proxy in front of it, say).
async fn open_via(
    f: &Fixture,
    pool: &Pool,
    hbone: SocketAddr,
    dst: SocketAddr,
) -> Result<mesh_hbone::Tunnel, mesh_hbone::Error> {
    let key = PoolKey {
        src: CLIENT.parse().unwrap(),
        dst_identity: SERVER.parse().unwrap(),
        dst: hbone,
        scope: 0,
    };
    let cert = f.client_cert.clone();
    let expected: Identity = SERVER.parse().unwrap();
    pool.connect(
        key,
        move || client_config(&cert, vec![expected]),
        default_connector().as_ref(),
        header::connect_request(dst, &header::ConnectHeaders::default()).unwrap(),
    )
    .await
}

/// Sends `data` through a tunnel, half-closes, and reads everything echoed back.
async fn echo_through(tunnel: mesh_hbone::Tunnel, data: Vec<u8>) -> Vec<u8> {
    let (l, local) = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    };
    let app = tokio::spawn(async move {
        let mut c = TcpStream::connect(local).await.unwrap();
        let (mut r, mut w) = c.split();
        let writer = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut out = Vec::new();
        let reader = r.read_to_end(&mut out);
        let (_, n) = tokio::join!(writer, reader);
        n.unwrap();
        out
    });
    let (s, _) = l.accept().await.unwrap();
    let (mut send, mut recv, _keep) = tunnel.into_parts();
    let (stats, res) = relay(&s, &mut send, &mut recv).await;
    res.unwrap();
    let out = app.await.unwrap();
    assert_eq!(stats.tcp_to_tunnel as usize, out.len());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_round_trip_with_half_close() {
    let f = fixture().await;
    let pool = Pool::new(PoolSettings::default());
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let t = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(echo_through(t, data.clone()).await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_share_one_connection() {
    let f = fixture().await;
    let pool = Pool::new(PoolSettings::default());
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let t = open(&f, &pool, f.echo).await.unwrap();
        tasks.push(tokio::spawn(echo_through(t, vec![i; 1000])));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), vec![i as u8; 1000]);
    }
    assert_eq!(pool.connections_opened(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_opens_another_connection() {
    let f = fixture().await;
    let pool = Pool::new(PoolSettings {
        max_streams_per_conn: 2,
        ..Default::default()
    });
    let a = open(&f, &pool, f.echo).await.unwrap();
    let b = open(&f, &pool, f.echo).await.unwrap();
    let c = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(pool.connections_opened(), 2);
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_status_is_reported_and_connection_survives() {
    let f = fixture().await;
    let pool = Pool::new(PoolSettings::default());
    let bad: SocketAddr = "127.0.0.1:1".parse().unwrap();
    match open(&f, &pool, bad).await {
        Err(mesh_hbone::Error::Refused { status, .. }) => {
            assert_eq!(status, http::StatusCode::UNAUTHORIZED)
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    let t = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(
        echo_through(t, b"still works".to_vec()).await,
        b"still works"
    );
    assert_eq!(pool.connections_opened(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_reaped() {
    let f = fixture().await;
    let pool = Pool::new(PoolSettings {
        idle_timeout: Duration::from_millis(50),
        ..Default::default()
    });
    let t = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(pool.reap_idle().await, 0, "busy connection stays");
    drop(t);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(pool.reap_idle().await, 1);
    let _t = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(pool.connections_opened(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_only_one_idle_connection_per_key_stays_warm() {
    let f = fixture().await;
    let pool = Pool::new(PoolSettings {
        max_streams_per_conn: 2,
        idle_timeout: Duration::from_secs(60),
        surplus_idle_timeout: Duration::from_millis(50),
        ..Default::default()
    });
    let mut burst = Vec::new();
    for _ in 0..6 {
        burst.push(open(&f, &pool, f.echo).await.unwrap());
    }
    assert_eq!(pool.connections_opened(), 3, "2 streams per connection");
    let last = burst.pop();
    drop(burst);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(
        pool.reap_idle().await,
        1,
        "of two idle connections, the one used last stays warm"
    );
    drop(last);
    assert_eq!(
        pool.reap_idle().await,
        1,
        "the newly idle connection is now the warm one; the other is past its surplus time"
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(pool.reap_idle().await, 0, "the warm connection stays");
    let t = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(echo_through(t, b"warm".to_vec()).await, b"warm");
    assert_eq!(
        pool.connections_opened(),
        3,
        "served by the warm connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_zero_release_timeout_an_unused_connection_is_never_reused() {
    let f = fixture().await;
    let unpooled = Pool::new(PoolSettings {
        idle_timeout: Duration::ZERO,
        ..Default::default()
    });
    let pooled = Pool::new(PoolSettings::default());
    for pool in [&unpooled, &pooled] {
        let t = open(&f, pool, f.echo).await.unwrap();
        assert_eq!(echo_through(t, b"one".to_vec()).await, b"one");
        let t = open(&f, pool, f.echo).await.unwrap();
        assert_eq!(echo_through(t, b"two".to_vec()).await, b"two");
    }
    assert_eq!(
        unpooled.connections_opened(),
        2,
        "a new handshake per idle checkout"
    );
    assert_eq!(pooled.connections_opened(), 1);
    // Busy connections are still shared: two tunnels open at once need one handshake.
    let a = open(&f, &unpooled, f.echo).await.unwrap();
    let b = open(&f, &unpooled, f.echo).await.unwrap();
    assert_eq!(unpooled.connections_opened(), 3);
    drop((a, b));
}

/// A TCP proxy to `to` that silently drops every byte while `blackhole` is set (a peer that
/// vanished without a FIN or RST).
async fn blackhole_proxy(to: SocketAddr, blackhole: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            let b = TcpStream::connect(to).await.unwrap();
            let (ar, aw) = a.into_split();
            let (br, bw) = b.into_split();
            for (mut r, mut w) in [(ar, bw), (br, aw)].map(|(r, w)| (r, w)) {
                let hole = blackhole.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match r.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if !hole.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_drops_a_silent_peer_and_the_pool_recovers() {
    let f = fixture().await;
    let hole = Arc::new(AtomicBool::new(false));
    let via = blackhole_proxy(f.hbone, hole.clone()).await;
    let pool = Pool::new(PoolSettings {
        h2: H2Settings {
            keepalive_interval: Duration::from_millis(100),
            keepalive_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    });
    let t = open_via(&f, &pool, via, f.echo).await.unwrap();
    assert_eq!(echo_through(t, b"one".to_vec()).await, b"one");
    // The path goes silent: the pooled connection must be declared dead by its PINGs.
    hole.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    hole.store(false, Ordering::SeqCst);
    let t = tokio::time::timeout(Duration::from_secs(5), open_via(&f, &pool, via, f.echo))
        .await
        .expect("a dead pooled connection was reused")
        .unwrap();
    assert_eq!(echo_through(t, b"two".to_vec()).await, b"two");
    assert_eq!(pool.connections_opened(), 2);
}

/// A raw HTTP/2 server: echoes every stream, except that once `refuse` is set, streams on
/// its first connection are reset with REFUSED_STREAM (a peer shutting that connection down).
async fn refusing_server(refuse: Arc<AtomicBool>) -> (SocketAddr, WorkloadCert) {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let ttl = Duration::from_secs(3600);
    let client_cert = ca.issue(&CLIENT.parse().unwrap(), ttl).unwrap();
    let server_cert = ca.issue(&SERVER.parse().unwrap(), ttl).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        server_config(&server_cert, TrustPolicy::new("cluster.local")).unwrap(),
    ));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((tcp, _)) = l.accept().await {
            let first = n == 0;
            n += 1;
            let acceptor = acceptor.clone();
            let refuse = refuse.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut conn = h2::server::handshake(tls).await.unwrap();
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if first && refuse.load(Ordering::SeqCst) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let mut send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    let mut body = req.into_body();
                    tokio::spawn(async move {
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                            if send.send_data(d, false).is_err() {
                                return;
                            }
                        }
                        let _ = send.send_data(bytes::Bytes::new(), true);
                    });
                }
            });
        }
    });
    (addr, client_cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_by_a_pooled_connection_is_retried_on_a_new_one() {
    let refuse = Arc::new(AtomicBool::new(false));
    let (addr, client_cert) = refusing_server(refuse.clone()).await;
    let f = Fixture {
        client_cert,
        hbone: addr,
        echo: "127.0.0.1:9".parse().unwrap(),
    };
    let pool = Pool::new(PoolSettings::default());
    let t = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(echo_through(t, b"first".to_vec()).await, b"first");
    refuse.store(true, Ordering::SeqCst);
    let t = open(&f, &pool, f.echo).await.unwrap();
    assert_eq!(echo_through(t, b"second".to_vec()).await, b"second");
    assert_eq!(pool.connections_opened(), 2);
}
