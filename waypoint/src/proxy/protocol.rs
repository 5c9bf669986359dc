//! Upstream protocol selection, as Istio's waypoint (Envoy) does it: the destination Service
//! port decides, never the client.
//!
//! - HTTP/2 (prior knowledge) when the port is HTTP/2-capable: `appProtocol`, else the port
//!   name (`<proto>` / `<proto>-<suffix>`), of `http2`, `grpc`, `grpc-web`, `h2c`, or
//!   `appProtocol: kubernetes.io/h2c` ([`PortProtocol::Http2`]). An HTTP/1.1 client is
//!   upgraded, as Envoy does for an HTTP/2 cluster.
//! - HTTP/1.1 for everything else (`http`, unknown ports): an HTTP/2 client is downgraded.
//!   Istio's `USE_DOWNSTREAM_PROTOCOL` is for sidecars that sniff; a waypoint never uses it.
//! - Upgrade requests (WebSocket) always go out as HTTP/1.1.
//!
//! Trailers across a downgrade: towards an HTTP/1.1 client, response trailers are sent (in
//! chunked encoding) only if the client asked with `te: trailers`; otherwise they are dropped,
//! as Envoy does. Request trailers towards an HTTP/1.1 upstream are dropped (Envoy's HTTP/1
//! codec default).

use http::{HeaderMap, HeaderValue, Uri, Version, header};
use mesh_core::workload::Service;

use crate::state::{PortProtocol, Snapshot};

/// The trailers a gRPC response ends with, declared to an HTTP/1.1 client that accepts
/// trailers when the upstream did not declare its own.
const GRPC_TRAILERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// Whether a request to port `port` of `svc` goes upstream as HTTP/2.
pub(crate) fn upstream_h2(snap: &Snapshot, svc: &Service, port: u16, upgrade: bool) -> bool {
    !upgrade && snap.protocol(svc, port) == PortProtocol::Http2
}

/// The request version to send upstream.
fn version(h2: bool) -> Version {
    if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    }
}

/// `http2` / `http` for the access log.
pub(crate) fn name(h2: bool) -> &'static str {
    if h2 { "http2" } else { "http" }
}

/// Sets the request head for the upstream version and returns its target: HTTP/2 gets an
/// absolute URI (hyper turns it into `:scheme` and `:authority`) and no `Host`; HTTP/1.1 an
/// origin-form target and `Host: host` (an HTTP/2 client's `:authority`).
pub(crate) fn set_target(
    parts: &mut http::request::Parts,
    h2: bool,
    host: &str,
    pq: &str,
) -> Result<Uri, http::uri::InvalidUri> {
    parts.version = version(h2);
    if h2 {
        parts.headers.remove(header::HOST);
        return format!("http://{host}{pq}").parse();
    }
    if let Ok(h) = HeaderValue::try_from(host) {
        parts.headers.insert(header::HOST, h);
    }
    pq.parse()
}

/// What the response phase needs to know about the downstream request's trailer handling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DownTrailers {
    /// The client speaks HTTP/1.x.
    pub h1: bool,
    /// The client sent `te: trailers`.
    pub te_trailers: bool,
}

impl DownTrailers {
    pub(crate) fn of(version: Version, headers: &HeaderMap) -> Self {
        DownTrailers {
            h1: version != Version::HTTP_2,
            te_trailers: headers
                .get_all(header::TE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim().eq_ignore_ascii_case("trailers")),
        }
    }

    /// The `Trailer` header the response to this client should carry once hop-by-hop headers
    /// are gone: `upstream`'s declaration, or the gRPC trailers for a gRPC response, when the
    /// client is HTTP/1.1 and accepts trailers. hyper's HTTP/1.1 server sends only declared
    /// trailers, so without it trailers are dropped.
    pub(crate) fn declare(&self, upstream: Option<HeaderValue>, headers: &mut HeaderMap) {
        if !self.h1 || !self.te_trailers {
            return;
        }
        let value = upstream.or_else(|| {
            crate::grpc::is_grpc(headers).then(|| HeaderValue::from_static(GRPC_TRAILERS))
        });
        if let Some(v) = value {
            headers.insert(header::TRAILER, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_are_declared_only_to_an_h1_client_that_accepts_them() {
        let mut req = HeaderMap::new();
        req.insert(header::TE, HeaderValue::from_static("deflate, Trailers"));
        let grpc = || {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h
        };
        let mut h = grpc();
        DownTrailers::of(Version::HTTP_11, &req).declare(None, &mut h);
        assert_eq!(h[header::TRAILER], GRPC_TRAILERS);
        let mut h = grpc();
        DownTrailers::of(Version::HTTP_11, &req)
            .declare(Some(HeaderValue::from_static("x-sum")), &mut h);
        assert_eq!(h[header::TRAILER], "x-sum");
        let mut h = grpc();
        DownTrailers::of(Version::HTTP_11, &HeaderMap::new()).declare(None, &mut h);
        assert!(
            !h.contains_key(header::TRAILER),
            "no te: trailers, trailers dropped"
        );
        let mut h = grpc();
        DownTrailers::of(Version::HTTP_2, &req).declare(None, &mut h);
        assert!(!h.contains_key(header::TRAILER), "h2 needs no declaration");
        let mut h = HeaderMap::new();
        DownTrailers::of(Version::HTTP_11, &req).declare(None, &mut h);
        assert!(
            !h.contains_key(header::TRAILER),
            "not gRPC, nothing declared"
        );
    }
}
