//! Load generators and the echo server, on a current-thread runtime each (the harness pins
//! them to one core; a second thread would only add cross-core wake-ups to the numbers).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(1 << 20), hard);
    }
}

pub async fn server(listen: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("mesh-bench server on {listen}");
    loop {
        let (mut s, _) = l.accept().await?;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
    }
}

async fn one_round_trip(to: SocketAddr) -> std::io::Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(to).await?;
    s.set_nodelay(true)?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    let took = t.elapsed();
    drop(s);
    Ok(took)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn connrate(
    to: SocketAddr,
    seconds: f64,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                match one_round_trip(to).await {
                    Ok(d) => lat.push(d.as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    lat.sort_unstable();
    Ok(json!({
        "connections": lat.len(),
        "errors": errors,
        "per_second": lat.len() as f64 / seconds,
        "p50_us": pct(&lat, 0.5),
        "p99_us": pct(&lat, 0.99),
    }))
}

pub async fn hold(
    to: SocketAddr,
    count: usize,
    ready_file: &Path,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let mut conns = Vec::with_capacity(count);
    let mut failed = 0usize;
    let started = Instant::now();
    for batch in (0..count).collect::<Vec<_>>().chunks(100) {
        let mut set = tokio::task::JoinSet::new();
        for _ in batch {
            set.spawn(async move {
                let mut s = TcpStream::connect(to).await?;
                s.write_all(b"h").await?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await?;
                Ok::<_, std::io::Error>(s)
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(s)) => conns.push(s),
                _ => failed += 1,
            }
        }
    }
    let open_ms = started.elapsed().as_millis() as u64;
    std::fs::write(ready_file, format!("{}\n", conns.len()))?;
    eprintln!("holding {} connections ({failed} failed)", conns.len());
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until && ready_file.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held = conns.len();
    drop(conns);
    Ok(json!({"opened": held, "failed": failed, "open_ms": open_ms}))
}
