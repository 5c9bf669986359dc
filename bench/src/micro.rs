//! Deterministic micro-benchmarks for callgrind instruction counts (`bench/callgrind.sh`):
//! the same work every run, on one thread, so the count moves only when the code does.
//!
//! - `hbone`: bytes through a real HBONE tunnel (mTLS 1.3 + HTTP/2 CONNECT, the pool on
//!   one side, the server and relay on the other) over loopback TCP;
//! - `policy`: L4 authorization decisions against a realistic policy set.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Subcommand;
use mesh_core::{
    Identity,
    policy::{self, Action, Authorization, Connection, Rule, Scope, StringMatch},
};
use mesh_hbone::{H2Settings, Pool, PoolKey, client::PoolSettings, header, relay};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

#[derive(Debug, Clone, Subcommand)]
pub enum Micro {
    /// Send `mib` MiB through one tunnel and read them back.
    Hbone {
        #[arg(long, default_value_t = 16)]
        mib: usize,
    },
    /// Evaluate `iterations` connections.
    Policy {
        #[arg(long, default_value_t = 100_000)]
        iterations: usize,
    },
}

pub fn run(m: Micro) -> anyhow::Result<serde_json::Value> {
    match m {
        Micro::Hbone { mib } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(hbone(mib)),
        Micro::Policy { iterations } => Ok(policy_eval(iterations)),
    }
}

const CLIENT: &str = "spiffe://cluster.local/ns/bar/sa/sleep";
const SERVER: &str = "spiffe://cluster.local/ns/foo/sa/echo";

async fn hbone(mib: usize) -> anyhow::Result<serde_json::Value> {
    let ca = mesh_tls::ca::LocalCa::generate("cluster.local")?;
    let ttl = Duration::from_secs(3600);
    let client_cert = ca.issue(&CLIENT.parse()?, ttl)?;
    let server_cert = ca.issue(&SERVER.parse()?, ttl)?;

    // The app: discards what it reads, then reports the count.
    let app = TcpListener::bind("127.0.0.1:0").await?;
    let app_addr = app.local_addr()?;
    tokio::spawn(async move {
        if let Ok((mut s, _)) = app.accept().await {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            while let Ok(k) = s.read(&mut buf).await {
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            let _ = s.write_u64(n).await;
        }
    });

    let hb = TcpListener::bind("127.0.0.1:0").await?;
    let hb_addr = hb.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(mesh_tls::server_config(
        &server_cert,
        mesh_tls::TrustPolicy::new("cluster.local"),
    )?));
    tokio::spawn(async move {
        if let Ok((tcp, _)) = hb.accept().await
            && let Ok(tls) = acceptor.accept(mesh_hbone::buffered(tcp)).await
        {
            let _ = mesh_hbone::serve_connection(
                tls,
                &H2Settings::default(),
                |inc: mesh_hbone::Incoming| async move {
                    let Ok(app) = TcpStream::connect(inc.dst).await else {
                        return;
                    };
                    if let Ok((mut send, mut recv)) = inc.accept() {
                        let _ = relay(&app, &mut send, &mut recv).await;
                    }
                },
                std::future::pending(),
            )
            .await;
        }
    });

    let pool = Pool::new(PoolSettings::default());
    let expected: Identity = SERVER.parse()?;
    let key = PoolKey {
        src: CLIENT.parse()?,
        dst_identity: expected.clone(),
        dst: hb_addr,
        scope: 0,
    };
    let cert = client_cert.clone();
    let tunnel = pool
        .connect(
            key,
            move || mesh_tls::client_config(&cert, vec![expected]),
            mesh_hbone::client::default_connector().as_ref(),
            header::connect_request(app_addr, &header::ConnectHeaders::default())?,
        )
        .await?;

    // Our side of the tunnel is a local TCP pair so the real relay runs on both ends.
    let local = TcpListener::bind("127.0.0.1:0").await?;
    let local_addr: SocketAddr = local.local_addr()?;
    let writer = tokio::spawn(async move {
        let mut c = TcpStream::connect(local_addr).await?;
        let chunk = vec![0xa5u8; 64 * 1024];
        for _ in 0..mib * 16 {
            c.write_all(&chunk).await?;
        }
        c.shutdown().await?;
        let n = c.read_u64().await?;
        Ok::<_, std::io::Error>(n)
    });
    let (s, _) = local.accept().await?;
    let (mut send, mut recv, _keep) = tunnel.into_parts();
    let (stats, res) = relay(&s, &mut send, &mut recv).await;
    res.context("relay")?;
    let delivered = writer.await??;
    anyhow::ensure!(
        delivered == (mib * 1024 * 1024) as u64,
        "delivered {delivered} bytes, sent {}",
        mib * 1024 * 1024
    );
    Ok(json!({"mib": mib, "delivered": delivered, "tcp_to_tunnel": stats.tcp_to_tunnel}))
}

fn policy_set() -> Vec<Authorization> {
    let m = |f: fn(&mut policy::Match)| {
        let mut x = policy::Match::default();
        f(&mut x);
        x
    };
    let mut out = Vec::new();
    for i in 0..10 {
        out.push(Authorization {
            name: format!("deny-{i}"),
            namespace: "foo".into(),
            scope: Scope::Namespace,
            action: Action::Deny,
            rules: vec![Rule {
                clauses: vec![vec![m(|x| {
                    x.source_ips = vec![ipnet::IpNet::V4(
                        ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(10, 99, 0, 0), 16)
                            .unwrap_or_default(),
                    )];
                    x.destination_ports = vec![9000, 9001];
                })]],
            }],
            dry_run: false,
        });
        out.push(Authorization {
            name: format!("allow-{i}"),
            namespace: "foo".into(),
            scope: Scope::WorkloadSelector,
            action: Action::Allow,
            rules: vec![Rule {
                clauses: vec![
                    vec![m(|x| {
                        x.principals = vec![StringMatch::Prefix("cluster.local/ns/other".into())];
                    })],
                    vec![m(|x| x.not_destination_ports = vec![22])],
                ],
            }],
            dry_run: false,
        });
    }
    out.push(Authorization {
        name: "allow-sleep".into(),
        namespace: "foo".into(),
        scope: Scope::WorkloadSelector,
        action: Action::Allow,
        rules: vec![Rule {
            clauses: vec![vec![m(|x| {
                x.principals = vec![StringMatch::Exact("cluster.local/ns/bar/sa/sleep".into())];
            })]],
        }],
        dry_run: false,
    });
    out
}

fn policy_eval(iterations: usize) -> serde_json::Value {
    let set = policy_set();
    let id: Identity = match CLIENT.parse() {
        Ok(i) => i,
        Err(_) => return json!({"error": "identity"}),
    };
    let mut allowed = 0usize;
    for i in 0..iterations {
        let conn = Connection {
            src: SocketAddr::from(([10, 244, 1, (i % 250) as u8], 40000)),
            dst: SocketAddr::from(([10, 244, 2, 7], 8080 + (i % 3) as u16)),
            src_identity: Some(id.clone()),
        };
        if policy::evaluate(&set, &conn).allowed {
            allowed += 1;
        }
    }
    json!({"iterations": iterations, "allowed": allowed})
}
