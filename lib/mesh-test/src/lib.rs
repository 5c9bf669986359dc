//! Test helpers shared by the integration tests of every component (dev-dependency only):
//! apps that echo or verify bytes, a SOCKS5 client for ztunnel's explicit entry, a bounded
//! round trip, and tiny readers for HTTP/1 admin endpoints and Prometheus text.
//!
//! Everything binds to addresses the caller passes (loopback in tests), never elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

/// Raises the open-file limit to the hard limit (tests open thousands of sockets).
pub fn raise_fd_limit() {
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
