//! HTTP/2 PING keepalive for HBONE connections, on both ends (as Istio's ztunnel does).
//!
//! A tunnel can sit idle for hours; a peer that vanished (node lost, NAT entry expired, a
//! middlebox dropping the flow) would otherwise keep a dead connection in the pool and
//! stall the next stream on it until TCP gives up. Every `interval` a PING is sent; no
//! PONG within `timeout` ends the connection, and the pool opens a fresh one.

use std::time::Duration;

use h2::{Ping, PingPong};
use tracing::{debug, warn};

/// Resolves when the peer failed to answer a PING in time (or the connection is gone).
/// Never resolves while the peer answers. With no `PingPong` (already taken) it never
/// resolves.
pub async fn watch(pp: Option<PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut pp) = pp else {
        return std::future::pending().await;
    };
    if interval.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pp.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "keepalive: connection ended");
                return;
            }
            Err(_) => {
                warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "HBONE peer did not answer a PING in time; closing the connection"
                );
                return;
            }
        }
    }
}
