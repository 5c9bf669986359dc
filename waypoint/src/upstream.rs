//! The `upstream` phase: choose an endpoint of the destination Service and speak HTTP to it
//! over HBONE.
//!
//! - Endpoints are the Service's healthy workloads; round robin by default, least-request
//!   (two random choices) when a DestinationRule says `LEAST_REQUEST`, random for `RANDOM`.
//! - Tunnels go to the endpoint's IP:15008 with `:authority` = endpoint IP:target port,
//!   presenting the waypoint's certificate and accepting only the endpoint's identity
//!   (`mesh_hbone::Pool`). A `TCP` (out-of-mesh) endpoint is dialled in plaintext.
//! - HTTP/2 connections are shared (one per endpoint, multiplexed); HTTP/1.1 connections are
//!   kept idle per endpoint and reused when ready. Upgrade requests get a fresh HTTP/1.1
//!   connection that ends with the upgrade.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::{
    Identity,
    workload::{Service, TunnelProtocol, Workload},
};
use mesh_hbone::{Pool, PoolKey, client::ConnectFn, header};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;
use ztunnel::identity::SecretManager;

use crate::{io::H2Io, state::Snapshot};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies inside the waypoint.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Why an upstream attempt failed; `flag` is Envoy's response flag for logs and metrics.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("service {0} has no healthy endpoint")]
    NoEndpoint(String),
    #[error("endpoint {addr} has no usable identity: {reason}")]
    Identity { addr: SocketAddr, reason: String },
    #[error("waypoint certificate unavailable: {0} (is the local CA readable?)")]
    Certificate(String),
    #[error("HBONE to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: mesh_hbone::Error,
    },
    #[error("plaintext connect to {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP to {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("too many requests in flight to {0} (DestinationRule connectionPool)")]
    Overflow(String),
}

impl UpstreamError {
    pub fn flag(&self) -> &'static str {
        match self {
            UpstreamError::NoEndpoint(_) => "UH",
            UpstreamError::Overflow(_) => "UO",
            UpstreamError::Connect { .. }
            | UpstreamError::Tcp { .. }
            | UpstreamError::Identity { .. }
            | UpstreamError::Certificate(_) => "UF",
            UpstreamError::Http { .. } => "UC",
        }
    }

    /// Envoy's `connect-failure` / `refused-stream`: the request never reached the app.
    pub fn retriable(&self) -> bool {
        match self {
            UpstreamError::Connect { .. } | UpstreamError::Tcp { .. } => true,
            UpstreamError::Http { source, .. } => refused_stream(source) || source.is_canceled(),
            _ => false,
        }
    }
}

fn refused_stream(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = c.source();
    }
    false
}

/// One chosen endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// IP:target port, the tunnel's `:authority`.
    pub addr: SocketAddr,
}

/// Load-balancing policy (DestinationRule `trafficPolicy.loadBalancer.simple`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lb {
    RoundRobin,
    LeastRequest,
    Random,
}

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

type Key = (SocketAddr, String);

/// Upstream connections and load-balancing state. One per process.
pub struct Upstream {
    pool: Pool,
    secrets: Arc<SecretManager>,
    connector: Arc<ConnectFn>,
    h2: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
    h1: Mutex<HashMap<Key, Vec<http1::SendRequest<Body>>>>,
    rr: Mutex<HashMap<String, usize>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    outliers: Mutex<HashMap<String, Outlier>>,
    pub connections_opened: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// DestinationRule `outlierDetection`, as far as the waypoint enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    /// Consecutive 5xx responses (or connect failures) that eject an endpoint.
    pub consecutive_5xx: u32,
    /// Ejection time for the first ejection; the n-th lasts n times as long (Envoy).
    pub base_ejection: std::time::Duration,
}

#[derive(Debug, Default)]
struct Outlier {
    consecutive: u32,
    ejections: u32,
    until: Option<tokio::time::Instant>,
}

/// Counts a request in flight to an endpoint (least-request) until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Upstream {
    pub fn new(pool: Pool, secrets: Arc<SecretManager>, connector: Arc<ConnectFn>) -> Self {
        Upstream {
            pool,
            secrets,
            connector,
            h2: Mutex::new(HashMap::new()),
            h1: Mutex::new(HashMap::new()),
            rr: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            outliers: Mutex::new(HashMap::new()),
            connections_opened: AtomicU64::new(0),
        }
    }

    fn counter(&self, uid: &str) -> Arc<AtomicUsize> {
        lock(&self.in_flight)
            .entry(uid.to_string())
            .or_default()
            .clone()
    }

    /// Marks a request in flight to `ep`, refusing past `max` (DestinationRule
    /// `http2MaxRequests`) with an overflow.
    pub fn begin(&self, ep: &Endpoint, max: Option<u32>) -> Result<InFlight, UpstreamError> {
        let c = self.counter(&ep.workload.uid);
        let now = c.fetch_add(1, Ordering::AcqRel);
        let g = InFlight(c);
        if max.is_some_and(|m| now >= m as usize) {
            return Err(UpstreamError::Overflow(ep.addr.to_string()));
        }
        Ok(g)
    }

    /// Records an attempt's result for outlier detection: a 5xx (or connect failure)
    /// counts towards ejection, anything else resets the count.
    pub fn report(&self, ep: &Endpoint, failed: bool, policy: Option<OutlierPolicy>) {
        let Some(p) = policy.filter(|p| p.consecutive_5xx > 0) else {
            return;
        };
        let mut m = lock(&self.outliers);
        let o = m.entry(ep.workload.uid.clone()).or_default();
        if !failed {
            o.consecutive = 0;
            return;
        }
        o.consecutive += 1;
        if o.consecutive >= p.consecutive_5xx {
            o.consecutive = 0;
            o.ejections += 1;
            o.until = Some(tokio::time::Instant::now() + p.base_ejection * o.ejections.min(10));
            tracing::info!(endpoint = %ep.addr, workload = %ep.workload.uid, ejections = o.ejections, "endpoint ejected (outlier detection)");
        }
    }

    fn ejected(&self, uid: &str) -> bool {
        let now = tokio::time::Instant::now();
        lock(&self.outliers)
            .get(uid)
            .and_then(|o| o.until)
            .is_some_and(|u| u > now)
    }

    /// Picks an endpoint of `svc` for service port `port`, skipping `exclude` (previous
    /// attempts) when another endpoint exists.
    pub fn pick(
        &self,
        snap: &Snapshot,
        svc: &Service,
        port: u16,
        lb: Lb,
        exclude: &[String],
    ) -> Result<Endpoint, UpstreamError> {
        let all: Vec<Endpoint> = snap
            .mesh
            .endpoints(&svc.key())
            .iter()
            .filter(|e| e.workload.is_healthy())
            .filter_map(|e| {
                let ip = *e.workload.workload_ips.first()?;
                let tp = svc.target_port(&e.ports, port)?;
                Some(Endpoint {
                    workload: e.workload.clone(),
                    addr: SocketAddr::new(ip, tp),
                })
            })
            .collect();
        // Ejected endpoints are skipped unless every endpoint is ejected (panic threshold).
        let live: Vec<Endpoint> = all
            .iter()
            .filter(|e| !self.ejected(&e.workload.uid))
            .cloned()
            .collect();
        let all = if live.is_empty() { all } else { live };
        let fresh: Vec<&Endpoint> = all
            .iter()
            .filter(|e| !exclude.contains(&e.workload.uid))
            .collect();
        let cands: Vec<&Endpoint> = if fresh.is_empty() {
            all.iter().collect()
        } else {
            fresh
        };
        if cands.is_empty() {
            return Err(UpstreamError::NoEndpoint(svc.hostname.clone()));
        }
        let i = match lb {
            Lb::RoundRobin => {
                let mut rr = lock(&self.rr);
                let n = rr.entry(svc.hostname.clone()).or_default();
                *n = n.wrapping_add(1);
                *n % cands.len()
            }
            Lb::Random => rand::random_range(0..cands.len()),
            Lb::LeastRequest => {
                let a = rand::random_range(0..cands.len());
                let b = rand::random_range(0..cands.len());
                let load = |i: usize| self.counter(&cands[i].workload.uid).load(Ordering::Acquire);
                if load(b) < load(a) { b } else { a }
            }
        };
        Ok(cands[i].clone())
    }

    /// Opens a byte stream to `ep`: an HBONE CONNECT stream, or plaintext TCP for an
    /// out-of-mesh endpoint.
    pub async fn open_stream(
        &self,
        ep: &Endpoint,
        me: &Identity,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        if ep.workload.protocol == TunnelProtocol::None {
            let s = (self.connector)(ep.addr)
                .await
                .map_err(|source| UpstreamError::Tcp {
                    addr: ep.addr,
                    source,
                })?;
            return Ok(Box::new(s));
        }
        let dst_id = ep
            .workload
            .identity()
            .map_err(|e| UpstreamError::Identity {
                addr: ep.addr,
                reason: e.to_string(),
            })?;
        let cert = self
            .secrets
            .get(me)
            .await
            .map_err(|e| UpstreamError::Certificate(e.to_string()))?;
        let key = PoolKey {
            src: me.clone(),
            dst_identity: dst_id.clone(),
            dst: SocketAddr::new(ep.addr.ip(), mesh_core::workload::HBONE_PORT),
            scope: 0,
        };
        let extra = header::ConnectHeaders {
            traceparent: Some(header::new_traceparent()),
            ..Default::default()
        };
        let req =
            header::connect_request(ep.addr, &extra).map_err(|e| UpstreamError::Identity {
                addr: ep.addr,
                reason: e.to_string(),
            })?;
        let tunnel = self
            .pool
            .connect(
                key,
                || mesh_tls::client_config(&cert, vec![dst_id]),
                &*self.connector,
                req,
            )
            .await
            .map_err(|source| UpstreamError::Connect {
                addr: ep.addr,
                source,
            })?;
        let (send, recv, guard) = tunnel.into_parts();
        Ok(Box::new(H2Io::new(
            send,
            recv,
            Box::new(SyncGuard::new(guard)),
        )))
    }

    /// Sends one request to `ep` over HTTP/2 (`h2`) or HTTP/1.1.
    pub async fn send(
        &self,
        ep: &Endpoint,
        me: &Identity,
        req: Request<Body>,
        h2: bool,
        upgrade: bool,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key: Key = (ep.addr, ep.workload.uid.clone());
        let http = |source| UpstreamError::Http {
            addr: ep.addr,
            source,
        };
        if h2 {
            let cached = lock(&self.h2).get(&key).filter(|s| !s.is_closed()).cloned();
            let mut sender = match cached {
                Some(s) => s,
                None => {
                    let io = self.open_stream(ep, me).await?;
                    let (s, conn) = http2::Builder::new(TokioExecutor::new())
                        .initial_stream_window_size(1024 * 1024)
                        .initial_connection_window_size(4 * 1024 * 1024)
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(http)?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "upstream h2 connection ended");
                        }
                    });
                    lock(&self.h2).insert(key.clone(), s.clone());
                    s
                }
            };
            sender.ready().await.map_err(http)?;
            return sender.send_request(req).await.map_err(http);
        }
        let idle = if upgrade {
            None
        } else {
            let mut m = lock(&self.h1);
            let list = m.entry(key.clone()).or_default();
            list.retain(|s| !s.is_closed());
            list.iter()
                .position(|s| s.is_ready())
                .map(|i| list.swap_remove(i))
        };
        let mut sender = match idle {
            Some(s) => s,
            None => {
                let io = self.open_stream(ep, me).await?;
                let (s, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(http)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "upstream h1 connection ended");
                    }
                });
                s
            }
        };
        sender.ready().await.map_err(http)?;
        let fut = sender.send_request(req);
        if !upgrade {
            let mut m = lock(&self.h1);
            let list = m.entry(key).or_default();
            if list.len() < 64 {
                list.push(sender);
            }
        }
        fut.await.map_err(http)
    }
}

/// The pool's stream guard is `Send` only; `H2Io` wants `Send + Sync` holders.
/// Held only for its `Drop` (the pool's stream accounting).
struct SyncGuard(#[allow(dead_code)] Mutex<Box<dyn Send>>);

impl SyncGuard {
    fn new(g: impl Send + 'static) -> Self {
        SyncGuard(Mutex::new(Box::new(g)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn upstream() -> Upstream {
        let ca = mesh_tls::ca::LocalCa::generate("cluster.local").unwrap();
        let provider = ztunnel::identity::LocalCaProvider::from_ca(ca, Duration::from_secs(3600));
        let secrets = Arc::new(SecretManager::new(
            Arc::new(provider),
            mesh_tls::TrustPolicy::new("cluster.local"),
        ));
        Upstream::new(
            Pool::new(Default::default()),
            secrets,
            mesh_hbone::client::default_connector(),
        )
    }

    const TWO: &str = r#"
waypoint: {name: waypoint, namespace: foo}
workloads:
- {uid: a, name: a, namespace: foo, workloadIps: [10.0.0.1], protocol: HBONE, services: {foo/s.foo.svc.cluster.local: {80: 8080}}}
- {uid: b, name: b, namespace: foo, workloadIps: [10.0.0.2], protocol: HBONE, services: {foo/s.foo.svc.cluster.local: {80: 8080}}}
services:
- {name: s, namespace: foo, hostname: s.foo.svc.cluster.local, vips: [/10.96.0.1], ports: {80: 8080}}
"#;

    #[tokio::test(start_paused = true)]
    async fn round_robin_then_outlier_ejection_and_return() {
        let snap = crate::state::parse("t", TWO).unwrap();
        let svc = snap.service("foo", "s").unwrap().clone();
        let up = upstream();
        let picks: Vec<String> = (0..4)
            .map(|_| {
                up.pick(&snap, &svc, 80, Lb::RoundRobin, &[])
                    .unwrap()
                    .workload
                    .uid
                    .clone()
            })
            .collect();
        assert_eq!(picks, vec!["b", "a", "b", "a"]);
        let a = up
            .pick(&snap, &svc, 80, Lb::RoundRobin, &["b".into()])
            .unwrap();
        assert_eq!(a.workload.uid, "a");
        assert_eq!(a.addr, "10.0.0.1:8080".parse().unwrap());
        let p = OutlierPolicy {
            consecutive_5xx: 2,
            base_ejection: Duration::from_secs(30),
        };
        up.report(&a, true, Some(p));
        up.report(&a, false, Some(p));
        up.report(&a, true, Some(p));
        assert!(!up.ejected("a"), "a success resets the count");
        up.report(&a, true, Some(p));
        assert!(up.ejected("a"));
        for _ in 0..6 {
            assert_eq!(
                up.pick(&snap, &svc, 80, Lb::RoundRobin, &[])
                    .unwrap()
                    .workload
                    .uid,
                "b"
            );
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!up.ejected("a"), "ejection ends after baseEjectionTime");
        let back: Vec<String> = (0..4)
            .map(|_| {
                up.pick(&snap, &svc, 80, Lb::RoundRobin, &[])
                    .unwrap()
                    .workload
                    .uid
                    .clone()
            })
            .collect();
        assert!(back.contains(&"a".to_string()), "{back:?}");
    }

    #[test]
    fn overflow_past_max_requests() {
        let up = upstream();
        let ep = Endpoint {
            workload: Arc::new(Workload {
                uid: "x".into(),
                ..Default::default()
            }),
            addr: "10.0.0.1:80".parse().unwrap(),
        };
        let g1 = up.begin(&ep, Some(1)).unwrap();
        assert!(matches!(
            up.begin(&ep, Some(1)),
            Err(UpstreamError::Overflow(_))
        ));
        drop(g1);
        assert!(up.begin(&ep, Some(1)).is_ok());
    }
}
