//! HTTPRoute and GRPCRoute, compiled and matched (pure; the `route` phase).
//!
//! A route attaches to a Service through `parentRefs` (GAMMA); every rule's match of every
//! route attached to the request's Service goes into one list, ordered by Gateway API
//! precedence, and the first match wins:
//! 1. path kind: `Exact`, then `RegularExpression`, then `PathPrefix`;
//! 2. longer path value first;
//! 3. a method match before none;
//! 4. more header matches, then more query-parameter matches;
//! 5. the older route (`creationTimestamp`), then `namespace/name` alphabetically, then rule and
//!    match order within the route.
//!
//! GRPCRoute matches become HTTP matches on `POST /<service>/<method>` (Exact, or a
//! `/<service>/` prefix when only the service is given, or a regex for `RegularExpression`).
//! Route-local extensions read from annotations: local rate limits and fault injection
//! (`docs/waypoint.md`).

use std::{cmp::Ordering, time::Duration};

use http::{HeaderMap, HeaderName, Method, StatusCode};
use regex::Regex;

use crate::objects::ParentRef;

/// Annotation keys for the route-local extensions.
pub const ANN_RATE_REQUESTS: &str = "waypoint.mesh.io/rate-limit-requests";
pub const ANN_RATE_INTERVAL: &str = "waypoint.mesh.io/rate-limit-interval";
pub const ANN_RATE_PER_SOURCE: &str = "waypoint.mesh.io/rate-limit-per-source";
pub const ANN_FAULT_ABORT: &str = "waypoint.mesh.io/fault-abort-status";
pub const ANN_FAULT_ABORT_PCT: &str = "waypoint.mesh.io/fault-abort-percent";
pub const ANN_FAULT_DELAY: &str = "waypoint.mesh.io/fault-delay";
pub const ANN_FAULT_DELAY_PCT: &str = "waypoint.mesh.io/fault-delay-percent";

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(v) => (2, v.len()),
            PathMatch::Regex(r) => (1, r.as_str().len()),
            PathMatch::Prefix(v) => (0, v.len()),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(v) => path == v,
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                path.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(e) => e == v,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

/// What the route phase looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Match {
    pub fn matches(&self, r: &RequestHead<'_>) -> bool {
        if !self.path.matches(r.path) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != r.method) {
            return false;
        }
        for (name, m) in &self.headers {
            let joined: Vec<&str> = r
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if joined.is_empty() || !m.matches(&joined.join(",")) {
                return false;
            }
        }
        for (name, m) in &self.query {
            let found = r
                .query
                .unwrap_or_default()
                .split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .find(|(k, _)| k == name);
            if !found.is_some_and(|(_, v)| m.matches(v)) {
                return false;
            }
        }
        true
    }

    fn precedence(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = self.path.rank();
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

/// Header edits (RequestHeaderModifier / ResponseHeaderModifier).
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, http::HeaderValue)>,
    pub add: Vec<(HeaderName, http::HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderEdits {
    pub fn apply(&self, h: &mut HeaderMap) {
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            h.remove(n);
        }
    }
    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct RedirectSpec {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    pub status: StatusCode,
}

#[derive(Debug, Clone)]
pub struct RewriteSpec {
    pub hostname: Option<String>,
    pub path: Option<PathRewrite>,
}

/// A Service named by a backendRef or a mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendService {
    pub namespace: String,
    pub name: String,
    /// Service port; `None` = the port the request came in on.
    pub port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub service: BackendService,
    pub weight: u32,
    pub request_headers: HeaderEdits,
}

#[derive(Debug, Clone)]
pub struct MirrorSpec {
    pub service: BackendService,
    /// Out of 1,000,000.
    pub fraction_ppm: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySpec {
    /// Retries after the first try.
    pub retries: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
    /// Also retry gRPC `unavailable` (14) and `cancelled` (1) responses.
    pub grpc_statuses: bool,
}

impl RetrySpec {
    /// Istio's default (`meshConfig.defaultHttpRetryPolicy` unset): 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and retriable status 503,
    /// Envoy's 25 ms base backoff.
    pub fn istio_default() -> Self {
        RetrySpec {
            retries: 2,
            codes: vec![503],
            backoff: Duration::from_millis(25),
            grpc_statuses: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSpec {
    pub tokens: u32,
    pub interval: Duration,
    pub per_source: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FaultSpec {
    pub abort: Option<(StatusCode, u32)>,
    pub delay: Option<(Duration, u32)>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub index: usize,
    pub matches: Vec<Match>,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub redirect: Option<RedirectSpec>,
    pub rewrite: Option<RewriteSpec>,
    pub mirrors: Vec<MirrorSpec>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: RetrySpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    Grpc,
}

#[derive(Debug, Clone)]
pub struct CompiledRoute {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub created: Option<String>,
    pub parents: Vec<ParentRef>,
    pub rules: Vec<Rule>,
    pub rate_limit: Option<RateLimitSpec>,
    pub fault: FaultSpec,
}

impl CompiledRoute {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this route is attached to Service `ns/name` on `port`, as seen by a waypoint
    /// in `waypoint_ns` (routes count only in the Service's or the waypoint's namespace).
    pub fn attaches_to(&self, ns: &str, name: &str, port: u16, waypoint_ns: &str) -> bool {
        if self.namespace != ns && self.namespace != waypoint_ns {
            return false;
        }
        self.parents.iter().any(|p| {
            p.is_service()
                && p.name == name
                && p.namespace.as_deref().unwrap_or(&self.namespace) == ns
                && p.port.is_none_or(|pp| pp == port)
        })
    }
}

mod compile;

pub use compile::{FieldError, compile_grpc, compile_http, validate_grpc, validate_http};

/// One (route, rule, match) entry of a Service's ordered table.
#[derive(Debug, Clone)]
pub struct Entry {
    pub route: std::sync::Arc<CompiledRoute>,
    pub rule: usize,
    pub matcher: usize,
}

impl Entry {
    fn m(&self) -> &Match {
        &self.route.rules[self.rule].matches[self.matcher]
    }
    pub fn rule(&self) -> &Rule {
        &self.route.rules[self.rule]
    }
}

/// Orders the entries of every route attached to one Service by Gateway API precedence.
pub fn order(routes: &[std::sync::Arc<CompiledRoute>]) -> Vec<Entry> {
    let mut out = Vec::new();
    for r in routes {
        for (ri, rule) in r.rules.iter().enumerate() {
            for mi in 0..rule.matches.len() {
                out.push(Entry {
                    route: r.clone(),
                    rule: ri,
                    matcher: mi,
                });
            }
        }
    }
    out.sort_by(|a, b| {
        b.m()
            .precedence()
            .cmp(&a.m().precedence())
            .then_with(|| cmp_age(&a.route, &b.route))
            .then_with(|| a.route.key().cmp(&b.route.key()))
            .then_with(|| a.rule.cmp(&b.rule))
            .then_with(|| a.matcher.cmp(&b.matcher))
    });
    out
}

fn cmp_age(a: &CompiledRoute, b: &CompiledRoute) -> Ordering {
    match (&a.created, &b.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The first entry that matches, in precedence order.
pub fn select<'a>(table: &'a [Entry], req: &RequestHead<'_>) -> Option<&'a Entry> {
    table.iter().find(|e| e.m().matches(req))
}

/// Picks a backend by weight; `roll` is uniform in `0..total`. `None`: no backend has weight.
pub fn pick_backend(backends: &[Backend], roll: u64) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut r = roll % total;
    for b in backends {
        let w = u64::from(b.weight);
        if r < w {
            return Some(b);
        }
        r -= w;
    }
    None
}

/// The path after a rewrite. `matched_prefix` is the PathPrefix that matched, if any.
pub fn rewrite_path(path: &str, rw: &PathRewrite, matched: &PathMatch) -> String {
    match rw {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(repl) => {
            let PathMatch::Prefix(prefix) = matched else {
                return path.to_string();
            };
            let prefix = prefix.trim_end_matches('/');
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let repl = repl.trim_end_matches('/');
            let out = format!("{repl}{rest}");
            if out.is_empty() {
                "/".into()
            } else if !out.starts_with('/') {
                format!("/{out}")
            } else {
                out
            }
        }
    }
}

impl Entry {
    pub fn matched(&self) -> &PathMatch {
        &self.m().path
    }
}

/// True when a rule has nothing to do to the request headers.
pub fn no_header_edits(r: &Rule) -> bool {
    r.request_headers.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{KubeObject, parse_object};
    use std::sync::Arc;
    use test_case::test_case;

    fn route(y: &str) -> Arc<CompiledRoute> {
        match parse_object(&serde_yaml::from_str(y).unwrap()).unwrap() {
            Some(KubeObject::HttpRoute(r)) => Arc::new(compile_http(&r).unwrap()),
            Some(KubeObject::GrpcRoute(r)) => Arc::new(compile_grpc(&r).unwrap()),
            other => panic!("{other:?}"),
        }
    }

    fn head<'a>(m: &'a Method, path: &'a str, h: &'a HeaderMap) -> RequestHead<'a> {
        let (p, q) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        RequestHead {
            method: m,
            path: p,
            query: q,
            headers: h,
        }
    }

    #[test_case("/foo", "/foo" => true)]
    #[test_case("/foo", "/foo/bar" => true)]
    #[test_case("/foo/", "/foo" => true)]
    #[test_case("/foo", "/foobar" => false)]
    #[test_case("/", "/anything" => true)]
    fn prefix_is_element_wise(prefix: &str, path: &str) -> bool {
        PathMatch::Prefix(prefix.into()).matches(path)
    }

    const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: catchall, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: api, port: 80}]
  - matches: [{path: {type: Exact, value: /api/v1}}]
    backendRefs: [{name: exact, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: post, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: canary, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: v, type: RegularExpression, value: "^2"}]}]
    backendRefs: [{name: query, port: 80}]
"#;

    #[test_case("GET", "/", &[] => "catchall")]
    #[test_case("GET", "/api/x", &[] => "api")]
    #[test_case("GET", "/api/v1", &[] => "exact")]
    #[test_case("POST", "/api/v1", &[] => "exact" ; "exact beats method")]
    #[test_case("POST", "/api/x", &[] => "post")]
    #[test_case("GET", "/api/x", &[("x-canary", "yes")] => "canary")]
    #[test_case("POST", "/api/x", &[("x-canary", "yes")] => "post" ; "method beats headers")]
    #[test_case("GET", "/q?v=21", &[] => "query")]
    #[test_case("GET", "/q?v=12", &[] => "catchall")]
    fn gateway_api_precedence(method: &str, path: &str, hs: &[(&str, &str)]) -> String {
        let r = route(ROUTES);
        let table = order(&[r]);
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in hs {
            h.insert(HeaderName::try_from(*k).unwrap(), v.parse().unwrap());
        }
        let e = select(&table, &head(&m, path, &h)).unwrap();
        e.rule().backends[0].service.name.clone()
    }

    #[test]
    fn older_route_wins_a_tie() {
        let mk = |name: &str, ts: &str| {
            route(&format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, creationTimestamp: \"{ts}\"}}\nspec:\n  parentRefs: [{{kind: Service, group: \"\", name: echo}}]\n  rules: [{{backendRefs: [{{name: {name}}}]}}]\n"
            ))
        };
        let table = order(&[
            mk("a-new", "2026-02-01T00:00:00Z"),
            mk("z-old", "2026-01-01T00:00:00Z"),
        ]);
        let h = HeaderMap::new();
        let e = select(&table, &head(&Method::GET, "/", &h)).unwrap();
        assert_eq!(e.route.name, "z-old");
    }

    #[test]
    fn weights_pick_by_roll() {
        let r = route(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: w}\nspec:\n  rules: [{backendRefs: [{name: v1, weight: 90}, {name: v2, weight: 10}, {name: v3, weight: 0}]}]\n",
        );
        let b = &r.rules[0].backends;
        assert_eq!(pick_backend(b, 0).unwrap().service.name, "v1");
        assert_eq!(pick_backend(b, 89).unwrap().service.name, "v1");
        assert_eq!(pick_backend(b, 90).unwrap().service.name, "v2");
        assert_eq!(pick_backend(b, 99).unwrap().service.name, "v2");
        assert!(pick_backend(&[], 3).is_none());
    }

    #[test]
    fn prefix_rewrite() {
        let m = PathMatch::Prefix("/api/".into());
        assert_eq!(
            rewrite_path("/api/x", &PathRewrite::Prefix("/v2".into()), &m),
            "/v2/x"
        );
        assert_eq!(
            rewrite_path("/api", &PathRewrite::Prefix("/".into()), &m),
            "/"
        );
        assert_eq!(
            rewrite_path("/api/x", &PathRewrite::Full("/z".into()), &m),
            "/z"
        );
    }

    #[test]
    fn grpc_methods_become_paths() {
        let r = route(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec:\n  rules:\n  - matches: [{method: {service: echo.Echo, method: Say}}]\n    backendRefs: [{name: say}]\n  - matches: [{method: {service: echo.Echo}}]\n    backendRefs: [{name: any}]\n",
        );
        let table = order(&[r]);
        let h = HeaderMap::new();
        let pick = |p: &str| {
            select(&table, &head(&Method::POST, p, &h))
                .map(|e| e.rule().backends[0].service.name.clone())
        };
        assert_eq!(pick("/echo.Echo/Say").as_deref(), Some("say"));
        assert_eq!(pick("/echo.Echo/Other").as_deref(), Some("any"));
        assert_eq!(pick("/other.Svc/Say"), None);
    }

    #[test]
    fn retry_defaults_are_istios() {
        let r = route(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: d}\nspec: {}\n",
        );
        assert_eq!(r.rules[0].retry, RetrySpec::istio_default());
        assert_eq!(r.rules[0].retry.retries, 2);
        assert_eq!(r.rules[0].retry.codes, vec![503]);
    }
}
