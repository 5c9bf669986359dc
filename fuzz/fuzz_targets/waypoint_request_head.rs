//! Request heads as the waypoint's phases see them (after hyper parsed them): any method,
//! request target and headers hyper would hand over. Protocol detection, route matching,
//! rewrites, path normalization, hop-by-hop removal and traceparent handling must never
//! panic, and their outputs must stay well-formed.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use waypoint::route::{self, Entry};

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: fuzz}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-v, type: RegularExpression, value: "^v[0-9]+$"}]}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
  - matches: [{path: {type: Exact, value: /exact}, method: POST}, {queryParams: [{name: a, value: b}]}]
    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-s, value: "1"}], remove: [x-r]}}]
  - matches: [{path: {type: RegularExpression, value: "/re/[a-z]+"}}]
"#;

fn table() -> &'static [Entry] {
    static T: OnceLock<Vec<Entry>> = OnceLock::new();
    T.get_or_init(|| {
        let v: serde_yaml::Value = serde_yaml::from_str(ROUTE).unwrap();
        let Some(waypoint::objects::KubeObject::HttpRoute(r)) =
            waypoint::objects::parse_object(&v).unwrap()
        else {
            panic!("seed route")
        };
        route::order(&[Arc::new(route::compile_http(&r).unwrap())])
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = waypoint::io::detect(data);
    // Lines: method, request target, then `name: value` headers.
    let mut lines = data.split(|b| *b == b'\n');
    let (Some(method), Some(target)) = (lines.next(), lines.next()) else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method) else {
        return;
    };
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let mut b = http::Request::builder().method(method).uri(uri);
    for l in lines {
        let Some(i) = l.iter().position(|c| *c == b':') else {
            continue;
        };
        let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(&l[..i]),
            http::HeaderValue::from_bytes(&l[i + 1..]),
        ) else {
            continue;
        };
        b = b.header(n, v);
    }
    let Ok(req) = b.body(()) else { return };
    let f = waypoint::proxy::head_facts(&req, table(), mesh_policy::path::PathNormalization::Base);
    assert_eq!(f.traceparent.len(), 55, "{}", f.traceparent);
    if f.route.is_some_and(|(_, rule)| rule == 0) {
        assert!(f.upstream_path.starts_with('/'), "{}", f.upstream_path);
    }
    if let Ok(p) = &f.policy_path {
        assert!(p.starts_with('/') || p.is_empty() || p == "*", "{p}");
    }
});
