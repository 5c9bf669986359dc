//! Inbound plaintext capture (:15006): TCP that reached a local workload without HBONE.
//!
//! There is no peer identity, so authorization sees a plaintext source; PeerAuthentication
//! STRICT arrives from the control plane as a policy that denies exactly that.

use std::{net::SocketAddr, sync::Arc};

use mesh_rt::drain::DrainWatcher;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span};

use super::{
    Error, ProxyInputs, SocketFactory,
    metrics::{ConnInfo, ConnectionResult, Direction, Outcome},
};

/// Serves the plaintext capture listener until the drain starts.
pub async fn serve(
    pi: Arc<ProxyInputs>,
    listener: TcpListener,
    drain: DrainWatcher,
    sf: Arc<dyn SocketFactory>,
) {
    info!(address = ?listener.local_addr().ok(), component = "inbound_plaintext", "listener established");
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => { debug!(error = %e, "accept failed"); continue; }
            },
            () = drain.signaled() => break,
        };
        let pi = pi.clone();
        let hold = drain.clone();
        let sf = sf.clone();
        tokio::spawn(
            async move {
                let _hold = hold;
                proxy(&pi, tcp, peer, sf.as_ref()).await;
            }
            .instrument(info_span!("inbound_plaintext", peer = %peer)),
        );
    }
}

async fn proxy(pi: &ProxyInputs, mut tcp: TcpStream, peer: SocketAddr, sf: &dyn SocketFactory) {
    let result = ConnectionResult::new(
        pi.metrics.clone(),
        Direction::Inbound,
        ConnInfo {
            src_addr: Some(peer),
            src_workload: pi
                .state
                .read(|s| s.workload_by_ip("", super::canonical_ip(peer.ip()))),
            ..Default::default()
        },
    );
    let dst = match super::original_dst(&tcp) {
        Ok(d) => d,
        Err(e) => return result.finish(0, 0, Outcome::Error(Error::OriginalDst(e).to_string())),
    };
    result.update(|i| i.dst_addr = Some(dst));
    let Some(dst_w) = pi.local_workload(dst.ip()) else {
        return result.finish(
            0,
            0,
            Outcome::Error(Error::UnknownDestination(dst).to_string()),
        );
    };
    result.update(|i| {
        i.dst_workload = Some(dst_w.clone());
        i.dst_identity = dst_w.identity().ok();
    });
    let decision = pi.authorize(&dst_w, peer, dst, None);
    if !decision.allowed {
        return result.finish(
            0,
            0,
            Outcome::Denied {
                policy: decision.policy,
                reason: decision.reason.to_owned(),
            },
        );
    }
    let source = if pi.cfg.preserve_source_ip {
        super::Source::Transparent(peer.ip())
    } else {
        super::Source::Any
    };
    let mut app = match super::connect(sf, dst, pi.cfg.packet_mark, source).await {
        Ok(a) => a,
        Err(source) => {
            return result.finish(
                0,
                0,
                Outcome::Error(Error::Connect { addr: dst, source }.to_string()),
            );
        }
    };
    result.opened();
    match tokio::io::copy_bidirectional(&mut tcp, &mut app).await {
        Ok((rx, tx)) => result.finish(rx, tx, Outcome::Ok),
        Err(e) => result.finish(0, 0, Outcome::Error(e.to_string())),
    }
}
