//! `mesh-bench http-rate`: an open-loop HTTP/1.1 load at a fixed request rate over a fixed
//! number of keep-alive connections, plain or TLS, for the waypoint's W3 scenario.
//!
//! Each connection owns an evenly spaced slice of the schedule (connection `i` sends at
//! `start + (i + k·C) / R`). A request's latency is measured from the time it was *due*, not
//! from when it was sent, so a proxy that stalls is charged for the requests that queued
//! behind the stall (no coordinated omission); a request whose connection was free is timed
//! from when it was actually sent, so the timer's granularity is not charged to the proxy.
//! All connections are dialled before the schedule starts; a response slower than 5 s is an
//! error and its connection is replaced. A response counts as good only if its status
//! is 2xx and its body has exactly `expect_bytes` bytes.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// What one run is asked to do (the `http-rate` command's flags).
#[derive(Debug, clap::Args)]
pub struct Plan {
    #[arg(long)]
    pub to: SocketAddr,
    /// The Host header (the Service's name, as a client in the mesh would send), and the
    /// TLS server name with --tls-root.
    #[arg(long)]
    pub host: String,
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Requests per second, over all connections.
    #[arg(long)]
    pub rate: f64,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// PEM root to verify a TLS server with; plaintext HTTP when unset.
    #[arg(long)]
    pub tls_root: Option<std::path::PathBuf>,
    /// The body length every good response must have.
    #[arg(long)]
    pub expect_bytes: Option<usize>,
}

type Sender = http1::SendRequest<Empty<Bytes>>;

#[derive(Default)]
struct Tally {
    lat_us: Vec<u64>,
    /// How late the timer woke for requests whose connection was free.
    lag_us: Vec<u64>,
    errors: u64,
    bad: u64,
    bytes: u64,
}

fn tls_connector(root: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root)
        .with_context(|| format!("reading the TLS root {}", root.display()))?
    {
        roots.add(cert.with_context(|| format!("parsing {}", root.display()))?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn handshake<S>(io: S) -> anyhow::Result<Sender>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn dial(plan: &Plan, tls: &Option<tokio_rustls::TlsConnector>) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(plan.to)
        .await
        .with_context(|| format!("connecting to {}", plan.to))?;
    tcp.set_nodelay(true)?;
    match tls {
        None => handshake(tcp).await,
        Some(c) => {
            let name = ServerName::try_from(plan.host.clone())
                .with_context(|| format!("{} is not a TLS server name", plan.host))?;
            handshake(c.connect(name, tcp).await?).await
        }
    }
}

async fn one(send: &mut Sender, plan: &Plan) -> anyhow::Result<(bool, usize)> {
    send.ready().await?;
    let req = http::Request::get(plan.path.as_str())
        .header(http::header::HOST, plan.host.as_str())
        .body(Empty::new())?;
    let resp = send.send_request(req).await?;
    let ok = resp.status().is_success();
    let body = resp.into_body().collect().await?.to_bytes();
    let good = ok && plan.expect_bytes.is_none_or(|n| n == body.len());
    Ok((good, body.len()))
}

/// A response slower than this counts as an error and its connection is replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection's share of the schedule. `send` was dialled before the start, so no
/// handshake lands in the measured latencies; a connection that breaks is dialled again and
/// that wait is charged to the requests due meanwhile.
async fn connection(
    plan: Arc<Plan>,
    tls: Option<tokio_rustls::TlsConnector>,
    mut send: Option<Sender>,
    index: usize,
    start: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let interval = Duration::from_secs_f64(plan.connections as f64 / plan.rate);
    let mut due = start + Duration::from_secs_f64(index as f64 / plan.rate);
    let end = start + Duration::from_secs_f64(plan.seconds);
    let mut free_at = start;
    while due < end {
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        // The clock starts when the request was due if it had to wait for the previous
        // response (the proxy's fault); otherwise when it is sent, so that the timer's
        // millisecond granularity (the load tool's fault) is not counted. That lateness is
        // reported on its own (`send_lag_*`).
        let began = if free_at > due {
            due
        } else {
            tally
                .lag_us
                .push(now.duration_since(due).as_micros() as u64);
            now
        };
        let mut s = match send.take() {
            Some(s) => s,
            None => match dial(&plan, &tls).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("http-rate: {e:#}");
                    tally.errors += 1;
                    due += interval;
                    free_at = Instant::now();
                    continue;
                }
            },
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, one(&mut s, &plan)).await {
            Ok(Ok((good, n))) => {
                tally.lat_us.push(began.elapsed().as_micros() as u64);
                tally.bytes += n as u64;
                if !good {
                    tally.bad += 1;
                }
                send = Some(s);
            }
            Ok(Err(e)) => {
                eprintln!("http-rate: {e:#}");
                tally.errors += 1;
            }
            Err(_) => {
                eprintln!("http-rate: no response within {REQUEST_TIMEOUT:?}; reconnecting");
                tally.errors += 1;
            }
        }
        free_at = Instant::now();
        due += interval;
    }
    tally
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub async fn run(plan: Plan) -> anyhow::Result<serde_json::Value> {
    if !(plan.rate > 0.0 && plan.seconds > 0.0) || plan.connections == 0 {
        bail!("--rate, --seconds and --connections must be positive");
    }
    let tls = match &plan.tls_root {
        Some(root) => Some(tls_connector(root)?),
        None => None,
    };
    // Every connection is open (and its TLS handshake done) before the schedule starts.
    let mut senders = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        senders.push(Some(dial(&plan, &tls).await?));
    }
    let plan = Arc::new(plan);
    let start = Instant::now() + Duration::from_millis(20);
    let mut set = tokio::task::JoinSet::new();
    for (i, send) in senders.into_iter().enumerate() {
        set.spawn(connection(plan.clone(), tls.clone(), send, i, start));
    }
    let mut all = Tally::default();
    while let Some(t) = set.join_next().await {
        let t = t?;
        all.lat_us.extend(t.lat_us);
        all.lag_us.extend(t.lag_us);
        all.errors += t.errors;
        all.bad += t.bad;
        all.bytes += t.bytes;
    }
    let wall = start.elapsed().as_secs_f64().max(plan.seconds);
    all.lat_us.sort_unstable();
    all.lag_us.sort_unstable();
    let lat = &all.lat_us;
    Ok(json!({
        "target_rps": plan.rate,
        "requests": lat.len(),
        "achieved_rps": lat.len() as f64 / wall,
        "errors": all.errors,
        "bad_responses": all.bad,
        "body_bytes": all.bytes,
        "p50_us": pct(lat, 0.5),
        "p90_us": pct(lat, 0.9),
        "p99_us": pct(lat, 0.99),
        "p999_us": pct(lat, 0.999),
        "max_us": lat.last().copied().unwrap_or(0),
        "send_lag_p99_us": pct(&all.lag_us, 0.99),
        "send_lag_max_us": all.lag_us.last().copied().unwrap_or(0),
    }))
}
