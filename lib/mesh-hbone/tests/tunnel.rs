//! Client pool ↔ server over loopback TLS: streams, reuse, half-close, refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

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
                        let (send, recv) = inc.accept().unwrap();
                        let _ = relay(&app, send, recv).await;
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
    let key = PoolKey {
        src: CLIENT.parse().unwrap(),
        dst_identity: SERVER.parse().unwrap(),
        dst: f.hbone,
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
    let (send, recv, _keep) = tunnel.into_parts();
    let (stats, res) = relay(&s, send, recv).await;
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
