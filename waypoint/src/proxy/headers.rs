//! Request-head rules shared by the phases: hop-by-hop removal, W3C `traceparent`
//! propagation, the effective authority, and [`head_facts`], the pure request-head path the
//! fuzz target drives.

use http::{HeaderMap, HeaderValue, Request, header};

use crate::route::{self, Entry};

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

/// Removes hop-by-hop headers (RFC 9110 §7.6.1), keeping `te: trailers` for gRPC and the
/// upgrade pair when the request is an upgrade.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    let te_trailers = h
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("trailers"));
    for n in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(listed) {
        if keep_upgrade && (n == "upgrade" || n == "connection") {
            continue;
        }
        h.remove(n.as_str());
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A W3C `traceparent` for the upstream hop: the caller's trace id and flags with a new span
/// id, or a new unsampled trace when the caller sent none (or an invalid one).
pub fn child_traceparent(incoming: Option<&HeaderValue>) -> HeaderValue {
    crate::trace::TraceContext::continue_or_start(incoming, 0).traceparent()
}

/// The request's effective authority: `:authority` (HTTP/2) or `Host` (HTTP/1.1).
pub(crate) fn authority<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// What the request-head path decides from a head alone (pure; the fuzz target's entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadFacts {
    pub authority: String,
    /// The normalized path policy sees, or why the request is a 400.
    pub policy_path: Result<String, String>,
    /// `(route, rule)` of the matching entry of `table`.
    pub route: Option<(String, usize)>,
    /// The upstream request target after the matched rule's URLRewrite.
    pub upstream_path: String,
    pub traceparent: String,
    /// Headers left after hop-by-hop removal and the rule's header edits.
    pub upstream_headers: usize,
}

/// Runs the head-only steps of authorize/route/upstream on `req` against a route table.
pub fn head_facts<B>(
    req: &Request<B>,
    table: &[Entry],
    mode: mesh_policy::path::PathNormalization,
) -> HeadFacts {
    let head = route::RequestHead {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let entry = route::select(table, &head);
    let mut headers = req.headers().clone();
    let upgrade = headers.contains_key(header::UPGRADE);
    strip_hop_by_hop(&mut headers, upgrade);
    let mut upstream_path = req.uri().path().to_string();
    if let Some(e) = entry {
        e.rule().request_headers.apply(&mut headers);
        if let Some(p) = e.rule().rewrite.as_ref().and_then(|r| r.path.as_ref()) {
            upstream_path = route::rewrite_path(&upstream_path, p, e.matched());
        }
    }
    let tp = child_traceparent(req.headers().get("traceparent"));
    HeadFacts {
        authority: authority(req),
        policy_path: mesh_policy::path::normalize(req.uri().path(), mode)
            .map_err(|e| e.to_string()),
        route: entry.map(|e| (e.route.key(), e.rule)),
        upstream_path,
        traceparent: tp.to_str().unwrap_or_default().to_string(),
        upstream_headers: headers.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn traceparent_keeps_trace_id_and_flags() {
        let inc =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let out = child_traceparent(Some(&inc));
        let s = out.to_str().unwrap();
        assert!(s.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{s}");
        assert!(s.ends_with("-01"));
        assert!(!s.contains("00f067aa0ba902b7"));
        let fresh = child_traceparent(Some(&HeaderValue::from_static("garbage")));
        assert_eq!(fresh.to_str().unwrap().len(), 55);
    }

    #[test]
    fn head_facts_rewrite_and_route() {
        let y = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]\n";
        let Some(crate::objects::KubeObject::HttpRoute(r)) =
            crate::objects::parse_object(&serde_yaml::from_str(y).unwrap()).unwrap()
        else {
            panic!()
        };
        let table = route::order(&[Arc::new(route::compile_http(&r).unwrap())]);
        let req = Request::builder()
            .uri("/api/x/../y?q=1")
            .header("host", "echo:80")
            .header("connection", "close")
            .body(())
            .unwrap();
        let f = head_facts(&req, &table, mesh_policy::path::PathNormalization::Base);
        assert_eq!(f.authority, "echo:80");
        assert_eq!(f.route, Some(("default/r".into(), 0)));
        assert_eq!(f.upstream_path, "/v2/x/../y");
        assert_eq!(f.policy_path.as_deref(), Ok("/api/y"));
        assert_eq!(f.upstream_headers, 1);
    }

    #[test]
    fn hop_by_hop_headers_go_but_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("x-keep").is_some());
    }
}
