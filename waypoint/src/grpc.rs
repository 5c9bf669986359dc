//! gRPC at the waypoint: recognising gRPC requests, and answering them in gRPC when the
//! waypoint replies itself (RBAC denials, JWT failures, no upstream, faults), as Envoy does.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use crate::{proxy::full, upstream::Body};

/// Turns a local reply to a gRPC request into a gRPC trailers-only response, as Envoy does:
/// HTTP 200, `content-type: application/grpc`, `grpc-status` from the HTTP status (the gRPC
/// spec's HTTP-to-gRPC mapping: 403 → 7 PERMISSION_DENIED, 401 → 16 UNAUTHENTICATED,
/// 429/502/503/504 → 14 UNAVAILABLE, ...) and the reply text as `grpc-message`. Other
/// headers (e.g. `www-authenticate`) stay. Without this a gRPC client reads the text body
/// as a malformed message and reports INTERNAL.
pub fn local_reply(resp: &mut Response<Body>, message: &str) {
    let code = match resp.status().as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    };
    *resp.status_mut() = StatusCode::OK;
    *resp.body_mut() = full(Bytes::new());
    let h = resp.headers_mut();
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::try_from(percent_encode(message.trim())) {
        h.insert("grpc-message", v);
    }
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_replies_become_trailers_only_grpc_statuses() {
        for (http, grpc) in [
            (403, "7"),
            (401, "16"),
            (503, "14"),
            (504, "14"),
            (404, "12"),
            (500, "2"),
        ] {
            let mut r =
                crate::proxy::text(StatusCode::from_u16(http).unwrap(), "RBAC: access denied");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            local_reply(&mut r, "RBAC: access denied");
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["grpc-status"], grpc, "HTTP {http}");
            assert_eq!(r.headers()["grpc-message"], "RBAC: access denied");
            assert_eq!(r.headers()[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("no such destination"), "no such destination");
        assert_eq!(percent_encode("100% \u{e9}\n"), "100%25 %C3%A9%0A");
    }

    #[test]
    fn grpc_is_recognised_by_content_type() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        assert!(is_grpc(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_grpc(&h));
    }
}
