//! Test harness: ztunnels, echo apps and clients on loopback, each test in its own
//! 127.N.0.0/24 block so tests run in parallel without port clashes on :15008.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod controlplane;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};
use ztunnel::{app::Bound, config::Args};

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub net: u8,
}

impl Mesh {
    /// A temp dir with a shared CA. `net` must be unique per test (2..=250).
    pub fn new(net: u8) -> Self {
        raise_fd_limit();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        let pem = mesh_tls::ca::LocalCa::generate_pem("cluster.local").unwrap();
        for (name, body) in pem.files() {
            std::fs::write(ca.join(name), body).unwrap();
        }
        Mesh { dir, net }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.net, 0, host))
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    pub fn write(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    /// Starts a ztunnel for `node` from a local config file and the shared local CA.
    pub async fn ztunnel(
        &self,
        config: &std::path::Path,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> Bound {
        let source = [
            "--local-xds-path".to_owned(),
            config.display().to_string(),
            "--local-ca-dir".to_owned(),
            self.ca_dir().display().to_string(),
        ];
        let b = self.ztunnel_with(&source, node, ip, extra).await;
        wait_ready(&b).await;
        b
    }

    /// Starts a ztunnel for `node` with the given config/cert source flags, with its HBONE
    /// listener on `ip:15008`; does not wait for readiness.
    pub async fn ztunnel_with(
        &self,
        source: &[String],
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> Bound {
        let mut args: Vec<String> = vec!["ztunnel".into()];
        args.extend(source.iter().cloned());
        args.extend([
            "--node-name".into(),
            node.into(),
            "--inbound-addr".into(),
            format!("{ip}:15008"),
            "--outbound-addr".into(),
            format!("{ip}:0"),
            "--inbound-plaintext-addr".into(),
            format!("{ip}:0"),
            "--socks5-addr".into(),
            format!("{ip}:0"),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--stats-addr".into(),
            "127.0.0.1:0".into(),
            "--readiness-addr".into(),
            "127.0.0.1:0".into(),
            "--packet-mark".into(),
            "0".into(),
            "--drain-deadline".into(),
            "3s".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let cfg = Args::try_parse_from(args).unwrap().validate().unwrap();
        ztunnel::app::build(cfg, None, tokio::runtime::Handle::current())
            .await
            .unwrap()
    }
}

/// Waits up to 5 s for readiness.
pub async fn wait_ready(bound: &Bound) {
    for _ in 0..500 {
        if bound.ready.is_ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("ztunnel not ready: {:?}", bound.ready.pending());
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard);
    }
}

/// An echo server on `ip`, port chosen by the kernel.
pub async fn echo(ip: IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server that counts and checks the bytes it receives (pattern `i % 251`), then replies
/// with the count (8 bytes, big endian) or u64::MAX if a byte was wrong.
pub async fn sink(ip: IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n: u64 = 0;
                let mut ok = true;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            for (j, b) in buf[..k].iter().enumerate() {
                                ok &= *b == ((n + j as u64) % 251) as u8;
                            }
                            n += k as u64;
                        }
                    }
                }
                let _ = s.write_u64(if ok { n } else { u64::MAX }).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Connects from `src` through the ztunnel's SOCKS5 listener to `dst`.
pub async fn socks_connect(
    socks: SocketAddr,
    src: IpAddr,
    dst: SocketAddr,
) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    let mut s = sock.connect(socks).await?;
    s.write_all(&[5, 1, 0]).await?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await?;
    assert_eq!(r, [5, 0]);
    let IpAddr::V4(v4) = dst.ip() else {
        panic!("v4 only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    if rep[1] != 0 {
        return Err(std::io::Error::other(format!("socks reply {}", rep[1])));
    }
    Ok(s)
}

/// Writes `data`, half-closes, and returns everything read back.
pub async fn round_trip(mut s: TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let mut out = Vec::new();
    let read = r.read_to_end(&mut out);
    let (a, b) = tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(write, read) })
        .await
        .map_err(|_| std::io::Error::other("round trip timed out"))?;
    // A refused connection may fail the write; what matters is what came back.
    let _ = a;
    b?;
    Ok(out)
}

/// GETs a path from a local HTTP endpoint; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_req(addr, "GET", path).await
}

pub async fn http_req(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Sums the values of a metric family's samples whose label set contains all `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l.as_bytes().get(name.len()) == Some(&b'{')))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
