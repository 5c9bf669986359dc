//! Outbound: a local workload's connection, captured on :15001 (or given by SOCKS5), sent
//! to its destination through HBONE, or passed through in plaintext outside the mesh.

use std::{net::SocketAddr, sync::Arc};

use mesh_core::workload::Workload;
use mesh_hbone::{PoolKey, header};
use mesh_rt::drain::DrainWatcher;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span};

use super::{
    Error, ProxyInputs, SocketFactory,
    metrics::{ConnInfo, ConnectionResult, Direction, Outcome},
    route::{self, Route},
};

/// Serves the outbound capture listener until the drain starts.
pub async fn serve(
    pi: Arc<ProxyInputs>,
    listener: TcpListener,
    drain: DrainWatcher,
    sf: Arc<dyn SocketFactory>,
) {
    let own = listener.local_addr().ok();
    info!(address = ?own, component = "outbound", "listener established");
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { debug!(error = %e, "accept failed"); continue; }
            },
            () = drain.signaled() => break,
        };
        // Set up in a box of its own, so that what every idle connection keeps for its
        // whole life is only the relay (see `proxy`). Only the setup carries the span: the
        // relay logs nothing itself (its end is the connection record, which names src),
        // and a span held for the connection's life moved the task to the next size class.
        let setup = Box::pin(
            accepted(pi.clone(), tcp, peer, own, sf.clone())
                .instrument(info_span!("outbound", src = %peer)),
        );
        let hold = drain.clone();
        tokio::spawn(async move {
            let _hold = hold;
            if let Some(mut open) = setup.await {
                open.relay().await;
            }
        });
    }
}

/// A captured connection: finds where it was going, refuses loops, opens the upstream.
async fn accepted(
    pi: Arc<ProxyInputs>,
    tcp: TcpStream,
    peer: SocketAddr,
    own: Option<SocketAddr>,
    sf: Arc<dyn SocketFactory>,
) -> Option<Box<Open>> {
    let _ = tcp.set_nodelay(true);
    let dst = match super::original_dst(&tcp) {
        Ok(d) => d,
        Err(e) => {
            let info = ConnInfo {
                src_addr: Some(peer),
                ..Default::default()
            };
            record_failure(&pi, info, Error::OriginalDst(e));
            return None;
        }
    };
    if own
        .is_some_and(|o| o.port() == dst.port() && (o.ip().is_unspecified() || o.ip() == dst.ip()))
        && pi.local_workload(dst.ip()).is_none()
    {
        let info = ConnInfo {
            src_addr: Some(peer),
            dst_addr: Some(dst),
            ..Default::default()
        };
        record_failure(&pi, info, Error::Loop(dst));
        return None;
    }
    open(&pi, tcp, peer, dst, Entry::Capture, sf).await
}

/// Records a connection that ended before it had a route.
fn record_failure(pi: &ProxyInputs, info: ConnInfo, e: Error) {
    ConnectionResult::new(pi.metrics.clone(), Direction::Outbound, info).finish(
        0,
        0,
        Outcome::Error(e.to_string()),
    );
}

/// How the connection reached ztunnel, which decides how "connected" is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Redirected by iptables: the client already believes it is connected.
    Capture,
    /// A SOCKS5 CONNECT awaiting its reply: success only once the upstream is open.
    Socks5,
}

/// Proxies one outbound connection from `src` (a local workload) to `dst`.
pub async fn proxy(
    pi: &ProxyInputs,
    tcp: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
    entry: Entry,
    sf: Arc<dyn SocketFactory>,
) {
    // Boxed: connection setup (routing, certificates, a TLS handshake when the pool has no
    // connection) is far bigger than the relay, and an unboxed future would keep that size
    // for the whole life of every idle connection.
    if let Some(mut open) = Box::pin(open(pi, tcp, src, dst, entry, sf)).await {
        open.relay().await;
    }
}

/// A connection whose upstream is open: all an idle proxied connection holds. Handed over
/// boxed: a value returned from an `.await` is stored in the caller's future more than once.
struct Open {
    result: ConnectionResult,
    tcp: TcpStream,
    up: Upstream,
}

impl Open {
    /// Moves bytes until both sides are done, then records the connection. By reference:
    /// moving `self` into this future would store the connection twice.
    async fn relay(&mut self) {
        let (rx, tx, outcome) = match &mut self.up {
            // Boxed: passthrough is the rare case, and its copy state is larger than the
            // tunnel relay's; unboxed it would size every connection's task.
            Upstream::Plain(up) => {
                match Box::pin(tokio::io::copy_bidirectional(&mut self.tcp, up)).await {
                    Ok((rx, tx)) => (rx, tx, Outcome::Ok),
                    Err(e) => (0, 0, Outcome::Error(Error::from(e).to_string())),
                }
            }
            Upstream::Tunnel(t) => {
                let (stats, res) = mesh_hbone::relay(&self.tcp, &mut t.send, &mut t.recv).await;
                let outcome = match res {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Error(Error::from(e).to_string()),
                };
                (stats.tcp_to_tunnel, stats.tunnel_to_tcp, outcome)
            }
        };
        self.result.finish(rx, tx, outcome);
    }
}

/// Everything before the relay: routing, the upstream, the SOCKS5 reply. `None` when the
/// connection already ended (and was recorded).
async fn open(
    pi: &ProxyInputs,
    mut tcp: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
    entry: Entry,
    sf: Arc<dyn SocketFactory>,
) -> Option<Box<Open>> {
    let result = ConnectionResult::new(
        pi.metrics.clone(),
        Direction::Outbound,
        ConnInfo {
            src_addr: Some(src),
            dst_addr: Some(dst),
            ..Default::default()
        },
    );
    let opened = run_to_open(pi, src, dst, &result, sf).await;
    if entry == Entry::Socks5 {
        let code = match &opened {
            Ok(_) => super::socks5::REP_OK,
            Err(Error::Hbone(mesh_hbone::Error::Refused { status, .. }))
                if *status == http::StatusCode::UNAUTHORIZED =>
            {
                super::socks5::REP_NOT_ALLOWED
            }
            Err(_) => super::socks5::REP_REFUSED,
        };
        if let Err(e) = super::socks5::reply(&mut tcp, code).await {
            result.finish(0, 0, Outcome::Error(Error::from(e).to_string()));
            return None;
        }
    }
    match opened {
        Ok(up) => Some(Box::new(Open { result, tcp, up })),
        Err(e) => {
            result.finish(0, 0, Outcome::Error(e.to_string()));
            None
        }
    }
}

enum Upstream {
    Plain(TcpStream),
    Tunnel(mesh_hbone::Tunnel),
}

/// Decides the route and opens the upstream side (a socket or a tunnel stream).
async fn run_to_open(
    pi: &ProxyInputs,
    src: SocketAddr,
    dst: SocketAddr,
    result: &ConnectionResult,
    sf: Arc<dyn SocketFactory>,
) -> Result<Upstream, Error> {
    let src_w = pi
        .local_workload(src.ip())
        .ok_or(Error::UnknownSource(src.ip()))?;
    let src_id = src_w.identity().map_err(|e| {
        Error::Route(route::RouteError::BadIdentity {
            uid: src_w.uid.clone(),
            reason: e.to_string(),
        })
    })?;
    result.update(|i| {
        i.src_workload = Some(src_w.clone());
        i.src_identity = Some(src_id.clone());
    });
    let decided = pi
        .state
        .read(|s| route::route(s, &src_w, dst, &mut |n| rand::random_range(0..n.max(1))));
    match decided? {
        Route::Passthrough {
            dst,
            workload,
            service,
        } => {
            result.update(|i| {
                i.dst_workload = workload;
                i.dst_service = service;
            });
            let up = super::connect(sf.as_ref(), dst, pi.cfg.packet_mark, super::Source::Any)
                .await
                .map_err(|source| Error::Connect { addr: dst, source })?;
            result.opened();
            Ok(Upstream::Plain(up))
        }
        Route::Hbone {
            tunnel,
            authority,
            identity,
            workload,
            service,
            via_waypoint,
        } => {
            result.update(|i| {
                i.dst_hbone_addr = Some(tunnel);
                i.dst_workload = Some(workload.clone());
                i.dst_service = service;
                i.dst_identity = Some(identity.clone());
                i.mtls = true;
            });
            let cert = pi.secrets.get(&src_id).await?;
            let headers = header::ConnectHeaders {
                traceparent: Some(header::new_traceparent()),
                baggage: baggage(&src_w),
                forwarded_for: via_waypoint.then_some(super::canonical_ip(src.ip())),
            };
            let req = header::connect_request(authority, &headers)
                .map_err(|e| Error::Io(std::io::Error::other(e)))?;
            // Tunnels leave from the source workload's own address where it is local, so
            // the peer sees (and source-IP policy matches) the real client.
            let src_ip = super::canonical_ip(src.ip());
            let key = PoolKey {
                src: src_id,
                dst_identity: identity.clone(),
                dst: tunnel,
                scope: scope_of(sf.scope(), src_ip),
            };
            let mark = pi.cfg.packet_mark;
            let connector: Arc<mesh_hbone::client::ConnectFn> = Arc::new(move |addr| {
                let sf = sf.clone();
                Box::pin(async move {
                    super::connect(sf.as_ref(), addr, mark, super::Source::PreferLocal(src_ip))
                        .await
                })
            });
            let t = pi
                .pool
                .connect(
                    key,
                    || mesh_tls::client_config(&cert, vec![identity]),
                    connector.as_ref(),
                    req,
                )
                .await?;
            result.opened();
            Ok(Upstream::Tunnel(t))
        }
    }
}

/// Pool scope for connections leaving from `ip`.
fn scope_of(netns: u64, ip: std::net::IpAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (netns, ip).hash(&mut h);
    h.finish()
}

/// W3C baggage describing the source workload, as Istio's ztunnel sends it.
fn baggage(w: &Workload) -> Option<http::HeaderValue> {
    let kind = if w.workload_type.is_empty() {
        "deployment"
    } else {
        &w.workload_type
    };
    let mut parts = Vec::new();
    if !w.cluster_id.is_empty() {
        parts.push(format!("k8s.cluster.name={}", w.cluster_id));
    }
    parts.push(format!("k8s.namespace.name={}", w.namespace));
    parts.push(format!(
        "k8s.{}.name={}",
        kind.to_lowercase(),
        w.workload_name()
    ));
    parts.push(format!("service.name={}", w.canonical_service()));
    parts.push(format!("service.version={}", w.canonical_revision()));
    http::HeaderValue::try_from(parts.join(",")).ok()
}
