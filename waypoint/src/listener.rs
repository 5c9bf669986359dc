//! The HBONE listener (:15008) and what runs inside each CONNECT stream.
//!
//! Per TLS connection: the waypoint presents its own certificate and requires a client
//! certificate of the trust domain; the client's SPIFFE identity is the request's source
//! principal. Per CONNECT stream (already validated by `mesh_hbone::server`):
//! 1. the authority must be a known Service VIP or workload (else 503 on the CONNECT);
//! 2. the port's protocol decides: HTTP (hyper, HTTP/1.1 and HTTP/2 auto-detected, keep-alive,
//!    upgrades), opaque TCP (authorized on the TCP chain, then relayed byte for byte to an
//!    endpoint), or detection from the first bytes within `PROTOCOL_DETECTION_TIMEOUT`.
//!
//! A malformed request or oversized head (400/431 from hyper) ends that client's stream only.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use mesh_core::Identity;
use mesh_hbone::{H2Settings, Incoming};
use mesh_policy::rbac::{self, Ctx, View};
use mesh_rt::drain::DrainWatcher;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    io::{Detected, H2Io, Rewind, detect},
    metrics::{self, TcpLabels},
    proxy::{Downstream, Proxy},
    state::{PortProtocol, Target},
    upstream::Lb,
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts HBONE connections until the drain starts; in-flight streams keep their watcher.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    secrets: Arc<ztunnel::identity::SecretManager>,
    drain: DrainWatcher,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = drain.signaled() => break,
        };
        let (tcp, src) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d: policy (ipBlocks),
        // workload lookups and logs all need the IPv4 address.
        let src = SocketAddr::new(ztunnel::proxy::canonical_ip(src.ip()), src.port());
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        let secrets = secrets.clone();
        let drain = drain.clone();
        tokio::spawn(
            async move {
                let snap = proxy.store.get();
                let Some(wp) = snap.waypoint.as_ref() else {
                    return;
                };
                let cfg = match secrets.server_config(&wp.identity).await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "no server certificate; closing");
                        return;
                    }
                };
                let tls = match tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    TlsAcceptor::from(cfg).accept(mesh_hbone::buffered(tcp)),
                )
                .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!("TLS handshake timed out");
                        return;
                    }
                };
                let peer = mesh_tls::verify::peer_identity(
                    tls.get_ref().1.peer_certificates(),
                    secrets.trust(),
                );
                let peer = Arc::new(peer);
                let settings = H2Settings::default();
                let d2 = drain.clone();
                let res = mesh_hbone::serve_connection(
                    tls,
                    &settings,
                    move |inc: Incoming| {
                        let proxy = proxy.clone();
                        let peer = peer.clone();
                        let drain = d2.clone();
                        async move {
                            stream(proxy, (*peer).clone(), src, inc).await;
                            drop(drain);
                        }
                    },
                    drain.signaled(),
                )
                .await;
                if let Err(e) = res {
                    debug!(error = %e, "hbone connection ended");
                }
            }
            .instrument(info_span!("hbone", src = %src)),
        );
    }
    info!("hbone listener stopped accepting");
}

/// One CONNECT stream.
async fn stream(proxy: Arc<Proxy>, peer: Option<Identity>, src: SocketAddr, inc: Incoming) {
    let dst = inc.dst;
    let snap = proxy.store.get();
    let Some(target) = snap.target(dst) else {
        debug!(%dst, "CONNECT to an unknown destination");
        inc.reject(StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    let protocol = match &target {
        Target::Service { service, port } => snap.protocol(service, *port),
        Target::Workload { .. } => PortProtocol::Detect,
    };
    if protocol == PortProtocol::Tcp {
        // Known TCP port: refuse a denied stream on the CONNECT itself (401, as ztunnel does)
        // rather than accepting and closing it.
        let down = Downstream {
            peer: peer.clone(),
            src,
            dst,
            labels: Default::default(),
        };
        let d = authorize_tcp(&snap, &down, &target);
        if !d.allowed {
            let principal = peer
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "unknown".into());
            info!(target: "access", src_identity = %principal, dst_addr = %dst, protocol = "tcp", flags = "RBAC", policy = d.policy.as_deref().unwrap_or("-"), reason = %d.reason, "connection denied");
            inc.reject(StatusCode::UNAUTHORIZED);
            return;
        }
    }
    let (send, recv) = match inc.accept() {
        Ok(p) => p,
        Err(e) => {
            debug!(error = %e, "client went away before the stream was accepted");
            return;
        }
    };
    let mut io = H2Io::new(send, recv, Box::new(()));
    let mut head = BytesMut::new();
    let proto = match protocol {
        PortProtocol::Http | PortProtocol::Http2 => Detected::Http1,
        PortProtocol::Tcp => Detected::Opaque,
        PortProtocol::Detect => {
            let deadline = tokio::time::Instant::now() + proxy.cfg.protocol_detection_timeout;
            loop {
                match tokio::time::timeout_at(deadline, io.read_chunk()).await {
                    Err(_) => break Detected::Opaque,
                    Ok(Ok(Some(c))) => {
                        head.extend_from_slice(&c);
                        match detect(&head) {
                            Detected::NeedMore => continue,
                            d => break d,
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => break Detected::Opaque,
                }
            }
        }
    };
    let io = Rewind::new(head.freeze(), io);
    let down = Arc::new(Downstream {
        peer,
        src,
        dst,
        labels: Default::default(),
    });
    match proto {
        Detected::Opaque | Detected::NeedMore => tcp(proxy, down, target, io).await,
        Detected::Http1 | Detected::Http2 => http(proxy, down, io).await,
    }
}

async fn http(proxy: Arc<Proxy>, down: Arc<Downstream>, io: Rewind<H2Io>) {
    let max = proxy.cfg.max_request_headers_bytes;
    let svc = {
        let proxy = proxy.clone();
        service_fn(move |req| {
            let proxy = proxy.clone();
            let down = down.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(down, req).await) }
        })
    };
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .max_buf_size(max.max(8192))
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    b.http2()
        .max_header_list_size(max as u32)
        .initial_stream_window_size(1024 * 1024)
        .initial_connection_window_size(4 * 1024 * 1024)
        .max_concurrent_streams(1000);
    if let Err(e) = b
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
    {
        debug!(error = %e, "downstream HTTP connection ended with an error");
    }
}

/// The TCP-chain decision for a stream (HTTP-only ALLOW rules skipped, as Envoy does).
fn authorize_tcp(
    snap: &crate::state::Snapshot,
    down: &Downstream,
    target: &Target,
) -> rbac::RbacDecision {
    if snap.waypoint.is_none() {
        return rbac::RbacDecision {
            allowed: false,
            policy: None,
            rule: None,
            reason: "waypoint not configured".into(),
            warnings: Vec::new(),
        };
    }
    let (service, port) = match target {
        Target::Service { service, port } => (Some(service.clone()), *port),
        Target::Workload { addr, .. } => (None, addr.port()),
    };
    let policies = snap.authorization_policies(&snap.scoped(service.as_deref()));
    let view = View {
        peer: down.peer.clone(),
        src_ip: down.src.ip(),
        dst_ip: down.dst.ip(),
        dst_port: port,
        http: None,
    };
    let ctx = Ctx {
        trust_domains: snap.mesh_config.trust_domain_bundle(),
    };
    rbac::evaluate(&policies, &view, &ctx)
}

/// Opaque TCP: authorize on the TCP chain (HTTP-only ALLOW rules are skipped, as Envoy does),
/// then relay to an endpoint.
async fn tcp(proxy: Arc<Proxy>, down: Arc<Downstream>, target: Target, mut io: Rewind<H2Io>) {
    let snap = proxy.store.get();
    let Some(wp) = snap.waypoint.as_ref() else {
        return;
    };
    let service = match &target {
        Target::Service { service, .. } => Some(service.clone()),
        Target::Workload { .. } => None,
    };
    let decision = authorize_tcp(&snap, &down, &target);
    let principal = down
        .peer
        .as_ref()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    let mut labels = TcpLabels {
        reporter: "waypoint",
        source_principal: principal.clone(),
        source_workload: "unknown".into(),
        source_workload_namespace: "unknown".into(),
        destination_service: service
            .as_ref()
            .map(|s| s.hostname.clone())
            .unwrap_or_else(|| "unknown".into()),
        destination_workload: "unknown".into(),
        destination_principal: "unknown".into(),
        request_protocol: "tcp",
        response_flags: "-",
        connection_security_policy: "mutual_tls",
    };
    if let Some(w) = snap.mesh.workload_by_ip("", down.src.ip()) {
        labels.source_workload = w.workload_name().to_string();
        labels.source_workload_namespace = w.namespace.clone();
    }
    if !decision.allowed {
        info!(target: "access", src_identity = %principal, dst_addr = %down.dst, protocol = "tcp", policy = decision.policy.as_deref().unwrap_or("-"), reason = %decision.reason, "connection denied");
        labels.response_flags = "RBAC";
        metrics::tcp_opened(&proxy.metrics, &labels);
        metrics::tcp_closed(&proxy.metrics, &labels, 0, 0);
        return;
    }
    let ep = match &target {
        Target::Service { service, port } => {
            proxy
                .upstream
                .pick(&snap, service, *port, Lb::RoundRobin, &[])
        }
        Target::Workload { workload, addr } => Ok(crate::upstream::Endpoint {
            workload: workload.clone(),
            addr: *addr,
        }),
    };
    let ep = match ep {
        Ok(e) => e,
        Err(e) => {
            info!(target: "access", src_identity = %principal, dst_addr = %down.dst, protocol = "tcp", error = %e, "no endpoint");
            return;
        }
    };
    labels.destination_workload = ep.workload.workload_name().to_string();
    labels.destination_principal = ep
        .workload
        .identity()
        .map(|i| i.to_string())
        .unwrap_or_default();
    let started = tokio::time::Instant::now();
    let mut up = match proxy.upstream.open_stream(&ep, &wp.identity).await {
        Ok(u) => u,
        Err(e) => {
            info!(target: "access", src_identity = %principal, dst_addr = %down.dst, upstream = %ep.addr, protocol = "tcp", flags = e.flag(), error = %e, "upstream connect failed");
            return;
        }
    };
    metrics::tcp_opened(&proxy.metrics, &labels);
    let (received, sent) = match tokio::io::copy_bidirectional(&mut io, &mut up).await {
        Ok(n) => n,
        Err(e) => {
            debug!(error = %e, "tcp relay ended with an error");
            (0, 0)
        }
    };
    metrics::tcp_closed(&proxy.metrics, &labels, sent, received);
    info!(target: "access", src_identity = %principal, dst_addr = %down.dst, upstream = %ep.addr, dst_workload = %labels.destination_workload, protocol = "tcp", bytes_in = received, bytes_out = sent, duration_ms = started.elapsed().as_millis() as u64, "connection complete");
}

/// Kept for symmetry with the client side (tests build streams by hand).
pub fn io_from_parts(send: SendStream<Bytes>, recv: RecvStream) -> H2Io {
    H2Io::new(send, recv, Box::new(()))
}
