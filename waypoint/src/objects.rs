//! The Kubernetes objects a waypoint consumes, exactly as users write them, and the one
//! function that reads them: [`parse_object`].
//!
//! The local config file calls [`parse_object`] for each entry of `objects:`; the xDS path
//! ([`crate::xds`]) calls it for each `mesh.config.v1.KubeObject`. Every error names the object
//! (`Kind namespace/name`) and the field path, and a bad object never affects the others.
//!
//! Kinds: `gateway.networking.k8s.io` HTTPRoute and GRPCRoute (v1, v1beta1, v1alpha2),
//! `security.istio.io` AuthorizationPolicy and RequestAuthentication (parsed and validated by
//! `mesh-policy`), `networking.istio.io` DestinationRule (load balancer, connection pool and
//! outlier fields; others ignored), and core `v1` Service (port names and `appProtocol`,
//! used for protocol selection). Any other kind is reported as unsupported.

use std::collections::BTreeMap;

use mesh_policy::model::{AuthorizationPolicy, RequestAuthentication};
use serde::{Deserialize, Serialize};

/// Why an object was not accepted. It is skipped; every other object still applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {namespace}/{name}: {field}: {reason}")]
pub struct ObjectError {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The field path inside the object (`spec.rules[0].matches[1].path.value`).
    pub field: String,
    pub reason: String,
}

/// One accepted object.
#[derive(Debug, Clone)]
pub enum KubeObject {
    HttpRoute(Route<HttpRouteSpec>),
    GrpcRoute(Route<GrpcRouteSpec>),
    AuthorizationPolicy(AuthorizationPolicy),
    RequestAuthentication(RequestAuthentication),
    DestinationRule(DestinationRule),
    Service(ServicePorts),
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

impl Meta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// An HTTPRoute or GRPCRoute.
#[derive(Debug, Clone, Serialize)]
pub struct Route<S> {
    pub meta: Meta,
    pub spec: S,
}

impl<S> Route<S> {
    pub fn key(&self) -> String {
        format!("{}/{}", self.meta.namespace(), self.meta.name)
    }
}

// ---------------------------------------------------------------- Gateway API routes

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// A core Service parent (GAMMA), as opposed to a Gateway.
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && matches!(self.group.as_deref(), Some("") | Some("core"))
    }
    pub fn is_gateway(&self) -> bool {
        matches!(self.kind.as_deref(), None | Some("Gateway"))
            && matches!(
                self.group.as_deref(),
                None | Some("gateway.networking.k8s.io")
            )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default = "default_rules")]
    pub rules: Vec<HttpRouteRule>,
}

fn default_rules() -> Vec<HttpRouteRule> {
    vec![HttpRouteRule::default()]
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    #[serde(default)]
    pub retry: Option<Retry>,
    #[serde(default)]
    pub session_persistence: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    #[serde(default)]
    pub query_params: Vec<ValueMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default = "path_prefix", rename = "type")]
    pub kind: String,
    #[serde(default = "slash")]
    pub value: String,
}

fn path_prefix() -> String {
    "PathPrefix".into()
}
fn slash() -> String {
    "/".into()
}
fn exact() -> String {
    "Exact".into()
}

/// A header or query parameter match.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(default = "exact", rename = "type")]
    pub kind: String,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default)]
    pub request_redirect: Option<Redirect>,
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default)]
    pub request_mirror: Option<Mirror>,
    #[serde(default)]
    pub extension_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    pub cors: Option<serde_yaml::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default)]
    pub set: Vec<HeaderValue>,
    #[serde(default)]
    pub add: Vec<HeaderValue>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mirror {
    pub backend_ref: BackendRef,
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<Fraction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub filters: Vec<Filter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// GEP-1731 `retry`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    #[serde(default)]
    pub codes: Vec<u16>,
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GrpcMatch>,
    #[serde(default)]
    pub filters: Vec<Filter>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatch {
    #[serde(default)]
    pub method: Option<GrpcMethod>,
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMethod {
    #[serde(default = "exact", rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

// ---------------------------------------------------------------- DestinationRule

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPool>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default)]
    pub simple: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    #[serde(default)]
    pub http: Option<HttpPool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpPool {
    /// Concurrent requests to the destination (Envoy `max_requests`); over it → 503.
    #[serde(default)]
    pub http2_max_requests: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default)]
    pub consecutive5xx_errors: Option<u32>,
    #[serde(default)]
    pub base_ejection_time: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationRule {
    pub meta: Meta,
    pub spec: DestinationRuleSpec,
}

// ---------------------------------------------------------------- Service ports

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

/// The parts of a core Service the waypoint uses: port protocols.
#[derive(Debug, Clone, Serialize)]
pub struct ServicePorts {
    pub meta: Meta,
    pub spec: ServiceSpec,
}

// ---------------------------------------------------------------- parsing

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<S> {
    #[serde(default)]
    metadata: Meta,
    spec: S,
}

const ROUTE_VERSIONS: [&str; 3] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
    "gateway.networking.k8s.io/v1alpha2",
];

/// Reads one Kubernetes object. `Ok(None)`: a kind the waypoint does not act on but that is
/// harmless (a Gateway, PeerAuthentication: other components' business).
pub fn parse_object(value: &serde_yaml::Value) -> Result<Option<KubeObject>, ObjectError> {
    let s = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let api_version = s("apiVersion");
    let kind = s("kind");
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let err = |field: &str, reason: String| ObjectError {
        kind: if kind.is_empty() { "object" } else { kind }.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        field: field.to_string(),
        reason,
    };
    if api_version.is_empty() || kind.is_empty() {
        return Err(err(
            "apiVersion",
            "an object needs apiVersion and kind".into(),
        ));
    }
    if name.is_empty() {
        return Err(err("metadata.name", "must be set".into()));
    }
    fn typed<S: serde::de::DeserializeOwned>(
        value: &serde_yaml::Value,
        err: &dyn Fn(&str, String) -> ObjectError,
    ) -> Result<Envelope<S>, ObjectError> {
        serde_path_to_error::deserialize::<_, Envelope<S>>(value.clone()).map_err(|e| {
            let path = e.path().to_string();
            err(&path, e.into_inner().to_string())
        })
    }
    match (api_version, kind) {
        (v, "HTTPRoute") if ROUTE_VERSIONS.contains(&v) => {
            let e: Envelope<HttpRouteSpec> = typed(value, &err)?;
            let r = Route {
                meta: e.metadata,
                spec: e.spec,
            };
            crate::route::validate_http(&r).map_err(|(f, reason)| err(&f, reason))?;
            Ok(Some(KubeObject::HttpRoute(r)))
        }
        (v, "GRPCRoute") if ROUTE_VERSIONS.contains(&v) => {
            let e: Envelope<GrpcRouteSpec> = typed(value, &err)?;
            let r = Route {
                meta: e.metadata,
                spec: e.spec,
            };
            crate::route::validate_grpc(&r).map_err(|(f, reason)| err(&f, reason))?;
            Ok(Some(KubeObject::GrpcRoute(r)))
        }
        (v, "AuthorizationPolicy" | "RequestAuthentication")
            if v.starts_with("security.istio.io/") =>
        {
            let text = serde_yaml::to_string(value).map_err(|e| err("", e.to_string()))?;
            let origin = format!("{kind} {namespace}/{name}");
            let set = mesh_policy::parse_objects(&origin, &text)
                .map_err(|e| err("spec", e.to_string()))?;
            if let Some(p) = set.authorization_policies.into_iter().next() {
                let v = mesh_policy::validate::validate_authorization_policy(&p);
                if let Some(first) = v.errors.first() {
                    return Err(err("spec", first.clone()));
                }
                return Ok(Some(KubeObject::AuthorizationPolicy(p)));
            }
            if let Some(ra) = set.request_authentications.into_iter().next() {
                let v = mesh_policy::validate::validate_request_authentication(&ra);
                if let Some(first) = v.errors.first() {
                    return Err(err("spec", first.clone()));
                }
                return Ok(Some(KubeObject::RequestAuthentication(ra)));
            }
            Err(err("kind", "not parsed by the policy crate".into()))
        }
        (v, "DestinationRule") if v.starts_with("networking.istio.io/") => {
            let e: Envelope<DestinationRuleSpec> = typed(value, &err)?;
            if e.spec.host.is_empty() {
                return Err(err("spec.host", "must be set".into()));
            }
            if let Some(lb) = e
                .spec
                .traffic_policy
                .as_ref()
                .and_then(|t| t.load_balancer.as_ref())
                .and_then(|l| l.simple.as_deref())
                && !matches!(
                    lb,
                    "ROUND_ROBIN" | "LEAST_REQUEST" | "LEAST_CONN" | "RANDOM" | "UNSPECIFIED"
                )
            {
                return Err(err(
                    "spec.trafficPolicy.loadBalancer.simple",
                    format!("{lb:?} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM)"),
                ));
            }
            Ok(Some(KubeObject::DestinationRule(DestinationRule {
                meta: e.metadata,
                spec: e.spec,
            })))
        }
        ("v1", "Service") => {
            let e: Envelope<ServiceSpec> = typed(value, &err)?;
            Ok(Some(KubeObject::Service(ServicePorts {
                meta: e.metadata,
                spec: e.spec,
            })))
        }
        (_, "Gateway" | "PeerAuthentication" | "Namespace" | "Pod") => Ok(None),
        (v, k) => Err(err(
            "kind",
            format!(
                "{v} {k} is not supported by the waypoint (HTTPRoute, GRPCRoute, AuthorizationPolicy, RequestAuthentication, DestinationRule, Service)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<Option<KubeObject>, ObjectError> {
        parse_object(&serde_yaml::from_str(y).unwrap())
    }

    #[test]
    fn http_route_parses_with_defaults() {
        let o = parse(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - {name: reviews-v2, port: 9080, weight: 10}
"#,
        )
        .unwrap();
        let Some(KubeObject::HttpRoute(r)) = o else {
            panic!("not a route")
        };
        assert_eq!(r.spec.rules[0].backend_refs.len(), 2);
        assert!(r.spec.parent_refs[0].is_service());
    }

    #[test]
    fn errors_name_object_and_field() {
        let e = parse(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bad, namespace: ns1}
spec:
  rules:
  - matches: [{path: {type: Exact, valu: /x}}]
"#,
        )
        .unwrap_err();
        assert_eq!(e.kind, "HTTPRoute");
        assert_eq!(e.name, "bad");
        assert_eq!(e.namespace, "ns1");
        assert!(e.field.starts_with("spec.rules[0].matches[0].path"), "{e}");
        let e = parse(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: re}
spec:
  rules:
  - matches: [{path: {type: RegularExpression, value: "(unclosed"}}]
"#,
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.rules[0].matches[0].path.value", "{e}");
    }

    #[test]
    fn authorization_policy_goes_through_mesh_policy_validation() {
        let e = parse(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-nothing, namespace: default}
spec:
  action: DENY
"#,
        )
        .unwrap_err();
        assert!(e.reason.contains("rules"), "{e}");
        let ok = parse(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#,
        )
        .unwrap();
        assert!(matches!(ok, Some(KubeObject::AuthorizationPolicy(_))));
    }

    #[test]
    fn unknown_kind_is_reported_and_gateway_ignored() {
        let e = parse("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n").unwrap_err();
        assert_eq!(e.field, "kind");
        let g = parse(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint}\n",
        )
        .unwrap();
        assert!(g.is_none());
    }
}
