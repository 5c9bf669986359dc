//! Inbound HBONE (:15008): terminate mTLS as the destination workload, then for every CONNECT
//! stream check the destination, authorize, and connect to the app.
//!
//! The certificate presented is the one of the workload owning the address the connection
//! arrived on, and a stream may only target that same workload: a client that verified
//! identity A can never be relayed to workload B.
//!
//! Status codes: 400 destination is not the authenticated local workload, 401 denied by
//! policy, 503 the app refused or is unreachable.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::StatusCode;
use mesh_hbone::Incoming;
use mesh_rt::drain::DrainWatcher;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    Error, ProxyInputs, SocketFactory,
    metrics::{ConnInfo, ConnectionResult, Direction, Outcome},
};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the HBONE listener until the drain starts.
pub async fn serve(
    pi: Arc<ProxyInputs>,
    listener: TcpListener,
    drain: DrainWatcher,
    sf: Arc<dyn SocketFactory>,
) {
    info!(address = ?listener.local_addr().ok(), component = "inbound", "listener established");
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { debug!(error = %e, "accept failed"); continue; }
            },
            () = drain.signaled() => break,
        };
        let pi = pi.clone();
        let drain = drain.clone();
        let sf = sf.clone();
        tokio::spawn(
            async move {
                if let Err(e) = connection(pi, tcp, peer, drain, sf).await {
                    warn!(error = %e, "inbound connection failed");
                }
            }
            .instrument(info_span!("inbound", peer = %peer)),
        );
    }
}

async fn connection(
    pi: Arc<ProxyInputs>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    drain: DrainWatcher,
    sf: Arc<dyn SocketFactory>,
) -> Result<(), Error> {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr()?;
    let local = SocketAddr::new(super::canonical_ip(local.ip()), local.port());
    // In dedicated mode one listener serves several workloads: the address the client
    // dialled says whose certificate to present.
    let dst_w = pi
        .local_workload(local.ip())
        .ok_or(Error::UnknownDestination(local))?;
    let dst_id = dst_w.identity().map_err(|e| {
        Error::Route(super::route::RouteError::BadIdentity {
            uid: dst_w.uid.clone(),
            reason: e.to_string(),
        })
    })?;
    let cfg = pi.secrets.server_config(&dst_id).await?;
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsAcceptor::from(cfg).accept(mesh_hbone::buffered(tcp)),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(source)) => return Err(Error::Handshake { peer, source }),
        Err(_) => {
            return Err(Error::Handshake {
                peer,
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
    };
    let src_id =
        mesh_tls::verify::peer_identity(tls.get_ref().1.peer_certificates(), pi.secrets.trust());
    debug!(client = ?src_id, workload = %dst_w.uid, "hbone connection established");
    let handler_pi = pi.clone();
    let handler_drain = drain.clone();
    let h2 = pi.h2;
    mesh_hbone::serve_connection(
        tls,
        &h2,
        move |inc: Incoming| {
            // Set up in a box of its own, so that what every idle stream keeps for its whole
            // life is only the relay: checks, authorization and the app connect are far
            // bigger, and an unboxed future would keep their size.
            let setup = Box::pin(open_stream(
                handler_pi.clone(),
                inc,
                peer,
                dst_w.clone(),
                src_id.clone(),
                sf.clone(),
            ));
            let hold = handler_drain.clone();
            async move {
                let _hold = hold;
                if let Some(mut open) = setup.await {
                    open.relay().await;
                }
            }
        },
        drain.signaled(),
    )
    .await?;
    Ok(())
}

/// An accepted stream and its app connection: all an idle proxied stream holds. Handed over
/// boxed: a value returned from an `.await` is stored in the caller's future more than once.
struct OpenStream {
    result: ConnectionResult,
    app: tokio::net::TcpStream,
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
}

impl OpenStream {
    /// Moves bytes until both sides are done, then records the connection. By reference:
    /// moving `self` into this future would store the stream twice.
    async fn relay(&mut self) {
        let (stats, res) = mesh_hbone::relay(&self.app, &mut self.send, &mut self.recv).await;
        // From the client's view: received = what it sent us (tunnel → app).
        let outcome = match res {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Error(e.to_string()),
        };
        self.result
            .finish(stats.tunnel_to_tcp, stats.tcp_to_tunnel, outcome);
    }
}

/// Checks the destination, authorizes and connects to the app; on failure answers the
/// CONNECT and records the outcome itself.
async fn open_stream(
    pi: Arc<ProxyInputs>,
    inc: Incoming,
    peer: SocketAddr,
    dst_w: Arc<mesh_core::workload::Workload>,
    src_id: Option<mesh_core::Identity>,
    sf: Arc<dyn SocketFactory>,
) -> Option<Box<OpenStream>> {
    let dst_w = &dst_w;
    let dst = inc.dst;
    let src_w = pi
        .state
        .read(|s| s.workload_by_ip("", super::canonical_ip(peer.ip())));
    let result = ConnectionResult::new(
        pi.metrics.clone(),
        Direction::Inbound,
        ConnInfo {
            src_addr: Some(peer),
            src_workload: src_w,
            src_identity: src_id.clone(),
            dst_addr: Some(dst),
            dst_workload: Some(dst_w.clone()),
            dst_identity: dst_w.identity().ok(),
            mtls: true,
            ..Default::default()
        },
    );
    if !dst_w.workload_ips.contains(&super::canonical_ip(dst.ip())) {
        inc.reject(StatusCode::BAD_REQUEST);
        result.finish(
            0,
            0,
            Outcome::Error(format!(
                "CONNECT to {dst}, which is not workload {} this connection was authenticated for",
                dst_w.uid
            )),
        );
        return None;
    }
    if let Some(svc) = pi.state.read(|s| s.services_of(dst_w)).into_iter().next() {
        result.update(|i| i.dst_service = Some(svc));
    }
    let decision = pi.authorize(dst_w, peer, dst, src_id);
    if !decision.allowed {
        inc.reject(StatusCode::UNAUTHORIZED);
        result.finish(
            0,
            0,
            Outcome::Denied {
                policy: decision.policy,
                reason: decision.reason.to_owned(),
            },
        );
        return None;
    }
    let source = if pi.cfg.preserve_source_ip {
        super::Source::Transparent(peer.ip())
    } else {
        super::Source::Any
    };
    let app = match tokio::time::timeout(
        pi.cfg.connect_timeout,
        super::connect(sf.as_ref(), dst, pi.cfg.packet_mark, source),
    )
    .await
    {
        Ok(Ok(a)) => a,
        Ok(Err(source)) => {
            inc.reject(StatusCode::SERVICE_UNAVAILABLE);
            result.finish(
                0,
                0,
                Outcome::Error(Error::Connect { addr: dst, source }.to_string()),
            );
            return None;
        }
        Err(_) => {
            inc.reject(StatusCode::SERVICE_UNAVAILABLE);
            result.finish(
                0,
                0,
                Outcome::Error(format!("connecting to {dst}: timed out")),
            );
            return None;
        }
    };
    let (send, recv) = match inc.accept() {
        Ok(s) => s,
        Err(e) => {
            result.finish(0, 0, Outcome::Error(e.to_string()));
            return None;
        }
    };
    result.opened();
    Some(Box::new(OpenStream {
        result,
        app,
        send,
        recv,
    }))
}
