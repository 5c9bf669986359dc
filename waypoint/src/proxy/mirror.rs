//! Request mirroring (HTTPRoute `RequestMirror`): a copy of a buffered request goes to the
//! mirror backend, in the protocol of the mirror's own Service port, and its response is
//! dropped.

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use mesh_core::Identity;
use tracing::debug;

use super::{Proxy, full, protocol};
use crate::{route::BackendService, state::Snapshot, upstream::Lb};

impl Proxy {
    /// Sends a copy of the request to the mirror backend and forgets the response
    /// (Envoy's shadowing: `Host` gets a `-shadow` suffix).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mirror(
        &self,
        snap: &Snapshot,
        me: Identity,
        target: &BackendService,
        port: u16,
        parts: &http::request::Parts,
        pq: &str,
        host: &str,
        body: Bytes,
    ) {
        let Some(svc) = snap.service(&target.namespace, &target.name).cloned() else {
            debug!(mirror = %target.name, "mirror backend not found");
            return;
        };
        let port = target.port.unwrap_or(port);
        let Ok(ep) = self.upstream.pick(snap, &svc, port, Lb::RoundRobin, &[]) else {
            return;
        };
        let h2 = protocol::upstream_h2(snap, &svc, port, false);
        let mut parts = parts.clone();
        let shadow = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!("{h}-shadow:{p}"),
            _ => format!("{host}-shadow"),
        };
        let Ok(uri) = protocol::set_target(&mut parts, h2, &shadow, pq) else {
            debug!(mirror = %target.name, "mirror request target cannot be built");
            return;
        };
        let up = self.upstream.clone();
        tokio::spawn(async move {
            let mut r = Request::from_parts(parts, full(body));
            *r.uri_mut() = uri;
            if let Ok(resp) = up.send(&ep, &me, r, h2, false).await {
                let _ = resp.into_body().collect().await;
            }
        });
    }
}
