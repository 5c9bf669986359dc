//! What the waypoint knows, as one immutable [`Snapshot`] swapped whole on every change.
//!
//! The local file has the waypoint's own identity and Gateway, the workloads and services in
//! ztunnel's local-config shape (parsed by `ztunnel::localconfig`, so one format serves both),
//! and `objects:`, Kubernetes objects read one by one by [`crate::objects::parse_object`]:
//!
//! ```yaml
//! waypoint: {name: waypoint, namespace: default}   # serviceAccount defaults to name
//! workloads: [...]                                  # ztunnel local-config format
//! services: [...]
//! objects:
//! - {apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, ...}
//! ```
//!
//! A bad object is reported in [`Snapshot::errors`] (kind, name, field) and skipped; the file
//! as a whole is rejected only if its shape or the workloads/services are invalid, and then
//! the previous snapshot stays in force.
//!
//! From the control plane ([`crate::xds`]) the same [`Snapshot::build`] is used: the Gateway
//! and identity come from the flags, the rest from the resources held.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, RwLock},
};

use mesh_core::{
    Identity,
    workload::{Service, Workload},
};
use mesh_policy::{
    MeshConfig, PolicySet,
    model::{AuthorizationPolicy, RequestAuthentication},
    scope::{self, WaypointTarget},
};
use serde::Serialize;

use crate::{
    objects::{DestinationRuleSpec, KubeObject, ServicePorts, parse_object},
    route::{self, CompiledRoute, Entry},
};

/// Why a config file was refused as a whole.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        path: String,
        field: String,
        reason: String,
    },
    #[error(transparent)]
    Mesh(#[from] ztunnel::localconfig::LocalConfigError),
}

/// The waypoint itself: its Gateway and the identity it presents upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaypointId {
    pub name: String,
    pub namespace: String,
    pub identity: Identity,
}

/// How a service port is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PortProtocol {
    /// HTTP, spoken to the app as HTTP/1.1 (`http`, `kubernetes.io/ws`).
    Http,
    /// HTTP, spoken to the app as HTTP/2 with prior knowledge (`http2`, `grpc`, `grpc-web`,
    /// `h2c`, `kubernetes.io/h2c`): Istio's `IsHTTP2()` ports.
    Http2,
    Tcp,
    /// No Service object or no hint: sniff the first bytes.
    Detect,
}

/// Istio's protocol selection: `appProtocol`, else the port name (`<protocol>` or
/// `<protocol>-<suffix>`). `kubernetes.io/h2c` is HTTP/2; other `kubernetes.io/` values HTTP.
pub fn port_protocol(name: Option<&str>, app_protocol: Option<&str>) -> PortProtocol {
    let classify = |p: &str| {
        let p = p.to_ascii_lowercase();
        let base = p.split(['-', '_']).next().unwrap_or_default().to_string();
        match base.as_str() {
            "http" => Some(PortProtocol::Http),
            // `grpc-web-x` splits to `grpc` too: HTTP/2 as well (Istio's GRPCWeb).
            "http2" | "grpc" | "h2c" => Some(PortProtocol::Http2),
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Some(PortProtocol::Tcp),
            _ => None,
        }
    };
    app_protocol
        .and_then(|a| match a {
            "kubernetes.io/h2c" => Some(PortProtocol::Http2),
            a if a.starts_with("kubernetes.io/") => Some(PortProtocol::Http),
            a => classify(a),
        })
        .or_else(|| name.and_then(classify))
        .unwrap_or(PortProtocol::Detect)
}

/// Where a CONNECT's authority points.
#[derive(Debug, Clone)]
pub enum Target {
    /// A Service VIP and service port.
    Service { service: Arc<Service>, port: u16 },
    /// A workload IP and port (workload-addressed traffic).
    Workload {
        workload: Arc<Workload>,
        addr: SocketAddr,
    },
}

/// The configuration in force.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub waypoint: Option<WaypointId>,
    pub mesh: ztunnel::state::State,
    pub mesh_config: MeshConfig,
    pub policies: PolicySet,
    pub routes: Vec<Arc<CompiledRoute>>,
    pub destination_rules: Vec<(String, DestinationRuleSpec)>,
    pub service_ports: Vec<ServicePorts>,
    /// Objects that were skipped, with why (`Kind ns/name: field: reason`).
    pub errors: Vec<String>,
    /// namespace → name → the Service and its ports' route tables. Nested so that a lookup
    /// by `&str` (one or two per request) allocates no key.
    by_name: HashMap<String, HashMap<String, Named>>,
    /// namespace → name → each port of the Kubernetes Service objects and its protocol, in
    /// `service_ports` order.
    port_protocols: HashMap<String, HashMap<String, Vec<(u16, PortProtocol)>>>,
    /// Which policies apply to each target (namespace → name; `""`/`""` for workload
    /// addresses), found on the first request to it instead of on every request.
    scoped: Mutex<HashMap<String, HashMap<String, Arc<Scoped>>>>,
}

/// A Service by name, with the ordered route table of each port some route attaches to.
#[derive(Debug)]
struct Named {
    service: Arc<Service>,
    tables: HashMap<u16, Arc<Vec<Entry>>>,
}

/// The policies that apply at this waypoint to one target, as indexes into the snapshot's
/// [`PolicySet`] (in its order, which is the order the scope functions return).
#[derive(Debug, Default)]
pub struct Scoped {
    authorization: Vec<usize>,
    request_authentication: Vec<usize>,
    /// The JWT authenticator for `request_authentication`, built on first use.
    authenticator: OnceLock<Result<Arc<mesh_jwt::Authenticator>, String>>,
}

/// The positions of `picked` (references into `all`) in `all`.
fn positions<T>(all: &[T], picked: &[&T]) -> Vec<usize> {
    let at: HashMap<*const T, usize> = all
        .iter()
        .enumerate()
        .map(|(i, p)| (p as *const T, i))
        .collect();
    picked
        .iter()
        .filter_map(|p| at.get(&(*p as *const T)).copied())
        .collect()
}

impl Snapshot {
    /// Builds a snapshot from its parts; computes every Service's route table once.
    pub fn build(
        waypoint: WaypointId,
        mesh: ztunnel::state::State,
        objects: Vec<KubeObject>,
        errors: Vec<String>,
    ) -> Self {
        let mut s = Snapshot {
            waypoint: Some(waypoint),
            mesh,
            errors,
            ..Default::default()
        };
        for o in objects {
            match o {
                KubeObject::HttpRoute(r) => match route::compile_http(&r) {
                    Ok(c) => s.routes.push(Arc::new(c)),
                    Err((f, e)) => s.errors.push(format!("HTTPRoute {}: {f}: {e}", r.key())),
                },
                KubeObject::GrpcRoute(r) => match route::compile_grpc(&r) {
                    Ok(c) => s.routes.push(Arc::new(c)),
                    Err((f, e)) => s.errors.push(format!("GRPCRoute {}: {f}: {e}", r.key())),
                },
                KubeObject::AuthorizationPolicy(p) => s.policies.authorization_policies.push(p),
                KubeObject::RequestAuthentication(r) => s.policies.request_authentications.push(r),
                KubeObject::DestinationRule(d) => s
                    .destination_rules
                    .push((d.meta.namespace().to_string(), d.spec)),
                KubeObject::Service(p) => s.service_ports.push(p),
            }
        }
        for p in &s.service_ports {
            let list = s
                .port_protocols
                .entry(p.meta.namespace().to_string())
                .or_default()
                .entry(p.meta.name.clone())
                .or_default();
            for port in &p.spec.ports {
                list.push((
                    port.port,
                    port_protocol(port.name.as_deref(), port.app_protocol.as_deref()),
                ));
            }
        }
        let services: Vec<Arc<Service>> = s
            .mesh
            .dump()
            .services
            .into_iter()
            .map(|svc| Arc::new(svc.clone()))
            .collect();
        let wns = s
            .waypoint
            .as_ref()
            .map(|w| w.namespace.clone())
            .unwrap_or_default();
        for svc in services {
            let mut tables = HashMap::new();
            for &port in svc.ports.keys() {
                let attached: Vec<Arc<CompiledRoute>> = s
                    .routes
                    .iter()
                    .filter(|r| r.attaches_to(&svc.namespace, &svc.name, port, &wns))
                    .cloned()
                    .collect();
                if !attached.is_empty() {
                    tables.insert(port, Arc::new(route::order(&attached)));
                }
            }
            s.by_name.entry(svc.namespace.clone()).or_default().insert(
                svc.name.clone(),
                Named {
                    service: svc,
                    tables,
                },
            );
        }
        s
    }

    fn named(&self, namespace: &str, name: &str) -> Option<&Named> {
        self.by_name.get(namespace)?.get(name)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.named(namespace, name).map(|n| &n.service)
    }

    /// The policies that apply at the waypoint to requests for `service` (`None`: a workload
    /// address), computed once per snapshot and target.
    pub fn scoped(&self, service: Option<&Service>) -> Arc<Scoped> {
        let (ns, name) = service.map_or(("", ""), |s| (s.namespace.as_str(), s.name.as_str()));
        let mut cache = self.scoped.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cache.get(ns).and_then(|m| m.get(name)) {
            return s.clone();
        }
        let found = match &self.waypoint {
            None => Scoped::default(),
            Some(wp) => {
                let wt = WaypointTarget {
                    waypoint_name: &wp.name,
                    waypoint_namespace: &wp.namespace,
                    service: service.map(|_| (ns, name)),
                };
                let (authz, _) = scope::waypoint_policies(&self.policies, &self.mesh_config, &wt);
                let ras =
                    scope::waypoint_request_authentications(&self.policies, &self.mesh_config, &wt);
                Scoped {
                    authorization: positions(&self.policies.authorization_policies, &authz),
                    request_authentication: positions(&self.policies.request_authentications, &ras),
                    authenticator: OnceLock::new(),
                }
            }
        };
        let found = Arc::new(found);
        cache
            .entry(ns.to_string())
            .or_default()
            .insert(name.to_string(), found.clone());
        found
    }

    /// The AuthorizationPolicies of a [`Scoped`] from this snapshot.
    pub fn authorization_policies(&self, s: &Scoped) -> Vec<&AuthorizationPolicy> {
        s.authorization
            .iter()
            .filter_map(|&i| self.policies.authorization_policies.get(i))
            .collect()
    }

    /// The JWT authenticator for a [`Scoped`]'s RequestAuthentications (keys from `jwks`),
    /// built once per snapshot and target.
    pub fn authenticator(
        &self,
        s: &Scoped,
        jwks: &mesh_jwt::JwksStore,
    ) -> Result<Arc<mesh_jwt::Authenticator>, String> {
        s.authenticator
            .get_or_init(|| {
                let opts = mesh_jwt::Options {
                    jwks: jwks.clone(),
                    ..Default::default()
                };
                mesh_jwt::Authenticator::with_options(self.request_authentications(s), opts)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
    }

    /// The RequestAuthentications of a [`Scoped`] from this snapshot.
    pub fn request_authentications(&self, s: &Scoped) -> Vec<&RequestAuthentication> {
        s.request_authentication
            .iter()
            .filter_map(|&i| self.policies.request_authentications.get(i))
            .collect()
    }

    /// The ordered route table of a Service port, if any route attaches to it.
    pub fn route_table(&self, svc: &Service, port: u16) -> Option<Arc<Vec<Entry>>> {
        self.named(&svc.namespace, &svc.name)?
            .tables
            .get(&port)
            .cloned()
    }

    /// What a CONNECT authority names.
    pub fn target(&self, dst: SocketAddr) -> Option<Target> {
        if let Some(service) = self.mesh.service_by_vip("", dst.ip()) {
            return Some(Target::Service {
                service,
                port: dst.port(),
            });
        }
        self.mesh
            .workload_by_ip("", dst.ip())
            .map(|workload| Target::Workload {
                workload,
                addr: dst,
            })
    }

    pub fn protocol(&self, svc: &Service, port: u16) -> PortProtocol {
        self.port_protocols
            .get(&svc.namespace)
            .and_then(|m| m.get(&svc.name))
            .and_then(|ports| ports.iter().find(|(p, _)| *p == port))
            .map_or(PortProtocol::Detect, |(_, proto)| *proto)
    }

    /// The protocol of a workload-addressed port: that of a Service port of the workload
    /// whose target port it is (the first one declaring a protocol), else `Detect`.
    pub fn workload_protocol(&self, workload: &Workload, port: u16) -> PortProtocol {
        workload
            .services
            .iter()
            .flat_map(|(key, ports)| {
                ports
                    .iter()
                    .filter(move |(_, t)| **t == port)
                    .map(move |(sp, _)| (key, *sp))
            })
            .filter_map(|(key, sp)| {
                let (ns, host) = key.split_once('/')?;
                let svc = &self
                    .by_name
                    .get(ns)?
                    .values()
                    .find(|n| n.service.hostname == host)?
                    .service;
                Some(self.protocol(svc, sp))
            })
            .find(|p| *p != PortProtocol::Detect)
            .unwrap_or(PortProtocol::Detect)
    }

    /// The DestinationRule for a Service (`host` as FQDN, `name.ns` or a short name in the
    /// rule's namespace); the first one listed wins.
    pub fn destination_rule(&self, svc: &Service) -> Option<&DestinationRuleSpec> {
        self.destination_rules
            .iter()
            .find(|(ns, d)| {
                d.host == svc.hostname
                    || d.host == format!("{}.{}", svc.name, svc.namespace)
                    || (d.host == svc.name && *ns == svc.namespace)
            })
            .map(|(_, d)| d)
    }
}

/// Parses the local config file. `path` names it in errors.
pub fn parse(path: &str, text: &str) -> Result<Snapshot, StateError> {
    let invalid = |field: &str, reason: String| StateError::Invalid {
        path: path.to_string(),
        field: field.to_string(),
        reason,
    };
    let root: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| invalid("", e.to_string()))?;
    let map = match root {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => return Err(invalid("", "the file must be a YAML mapping".into())),
    };
    let mut mesh_part = serde_yaml::Mapping::new();
    let mut waypoint = None;
    let mut objects = Vec::new();
    for (k, v) in map {
        match k.as_str().unwrap_or_default() {
            "waypoint" => waypoint = Some(v),
            "objects" => {
                objects = match v {
                    serde_yaml::Value::Sequence(s) => s,
                    serde_yaml::Value::Null => Vec::new(),
                    _ => return Err(invalid("objects", "must be a list".into())),
                }
            }
            "workloads" | "services" | "policies" => {
                mesh_part.insert(k, v);
            }
            other => {
                return Err(invalid(
                    other,
                    "unknown field (waypoint, workloads, services, policies, objects)".into(),
                ));
            }
        }
    }
    let w = waypoint.ok_or_else(|| invalid("waypoint", "required: {name, namespace}".into()))?;
    let field = |k: &str| {
        w.get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .unwrap_or_default()
    };
    let (name, namespace) = (field("name"), field("namespace"));
    if name.is_empty() {
        return Err(invalid("waypoint.name", "must be set".into()));
    }
    let namespace = if namespace.is_empty() {
        "default".to_string()
    } else {
        namespace
    };
    let sa = Some(field("serviceAccount"))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    let td = Some(field("trustDomain"))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "cluster.local".into());
    let identity = Identity::new(&td, &namespace, &sa)
        .map_err(|e| invalid("waypoint.serviceAccount", e.to_string()))?;
    let mesh_text = serde_yaml::to_string(&serde_yaml::Value::Mapping(mesh_part))
        .map_err(|e| invalid("", e.to_string()))?;
    let mesh = ztunnel::localconfig::parse(path, &mesh_text)?;
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        match parse_object(o) {
            Ok(Some(obj)) => parsed.push(obj),
            Ok(None) => {}
            Err(e) => errors.push(format!("objects[{i}]: {e}")),
        }
    }
    for e in &errors {
        tracing::warn!(path, error = %e, "object skipped");
    }
    Ok(Snapshot::build(
        WaypointId {
            name,
            namespace,
            identity,
        },
        mesh,
        parsed,
        errors,
    ))
}

pub fn load(path: &std::path::Path) -> Result<Snapshot, StateError> {
    let text = std::fs::read_to_string(path).map_err(|source| StateError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
}

/// The shared, swappable snapshot.
#[derive(Debug, Clone, Default)]
pub struct Store {
    inner: Arc<RwLock<Arc<Snapshot>>>,
}

impl Store {
    pub fn new(s: Snapshot) -> Self {
        Store {
            inner: Arc::new(RwLock::new(Arc::new(s))),
        }
    }
    pub fn get(&self) -> Arc<Snapshot> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn replace(&self, s: Snapshot) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    const FILE: &str = r#"
waypoint: {name: waypoint, namespace: default}
workloads:
- uid: default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: [10.0.0.3]
  protocol: HBONE
  services:
    default/echo.default.svc.cluster.local: {80: 8080}
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: [/10.96.0.1]
  ports: {80: 8080}
objects:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: good}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo}]
    rules: [{backendRefs: [{name: echo, port: 80}]}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: bad}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo}]
    rules: [{matches: [{method: "NOT A METHOD"}]}]
- apiVersion: v1
  kind: Service
  metadata: {name: echo}
  spec: {ports: [{name: http, port: 80}]}
"#;

    #[test]
    fn a_bad_object_is_reported_and_the_good_ones_apply() {
        let s = parse("test.yaml", FILE).unwrap();
        assert_eq!(s.routes.len(), 1);
        assert_eq!(s.errors.len(), 1);
        assert!(
            s.errors[0].contains("HTTPRoute default/bad"),
            "{:?}",
            s.errors
        );
        assert!(
            s.errors[0].contains("spec.rules[0].matches[0].method"),
            "{:?}",
            s.errors
        );
        let Some(Target::Service { service, port }) = s.target("10.96.0.1:80".parse().unwrap())
        else {
            panic!("no service")
        };
        assert!(s.route_table(&service, port).is_some());
        assert_eq!(s.protocol(&service, 80), PortProtocol::Http);
        assert_eq!(
            s.waypoint.unwrap().identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/waypoint"
        );
    }

    #[test]
    fn scoped_policies_are_those_the_scope_rules_pick_and_are_found_once() {
        let file = r#"
waypoint: {name: waypoint, namespace: default}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: [/10.96.0.1], ports: {80: 8080}}
- {name: other, namespace: default, hostname: other.default.svc.cluster.local, vips: [/10.96.0.2], ports: {80: 8080}}
objects:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: on-echo, namespace: default}
  spec:
    targetRefs: [{group: "", kind: Service, name: echo}]
    action: DENY
    rules: [{to: [{operation: {paths: ["/admin"]}}]}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: on-waypoint, namespace: default}
  spec:
    targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
    action: ALLOW
    rules: [{}]
- apiVersion: security.istio.io/v1
  kind: RequestAuthentication
  metadata: {name: jwt-echo, namespace: default}
  spec:
    targetRefs: [{group: "", kind: Service, name: echo}]
    jwtRules: [{issuer: "https://issuer.example"}]
"#;
        let s = parse("t.yaml", file).unwrap();
        assert!(s.errors.is_empty(), "{:?}", s.errors);
        let names = |v: Vec<&AuthorizationPolicy>| v.iter().map(|p| p.key()).collect::<Vec<_>>();
        let echo = s.service("default", "echo").unwrap().clone();
        let other = s.service("default", "other").unwrap().clone();
        let a = s.scoped(Some(&echo));
        assert_eq!(
            names(s.authorization_policies(&a)),
            ["default/on-echo", "default/on-waypoint"]
        );
        assert_eq!(s.request_authentications(&a).len(), 1);
        assert!(
            Arc::ptr_eq(&a, &s.scoped(Some(&echo))),
            "found again, not cached"
        );
        let b = s.scoped(Some(&other));
        assert_eq!(names(s.authorization_policies(&b)), ["default/on-waypoint"]);
        assert!(s.request_authentications(&b).is_empty());
        let w = s.scoped(None);
        assert_eq!(names(s.authorization_policies(&w)), ["default/on-waypoint"]);
    }

    #[test]
    fn unknown_top_level_field_rejects_the_file() {
        let e = parse("t.yaml", "waypoint: {name: w}\nroutes: []\n").unwrap_err();
        assert!(e.to_string().contains("routes"), "{e}");
    }

    #[test_case(Some("http"), None => PortProtocol::Http)]
    #[test_case(Some("http-web"), None => PortProtocol::Http)]
    #[test_case(Some("grpc"), None => PortProtocol::Http2)]
    #[test_case(Some("grpc-web"), None => PortProtocol::Http2)]
    #[test_case(Some("http2-api"), None => PortProtocol::Http2)]
    #[test_case(Some("HTTP2"), None => PortProtocol::Http2 ; "case insensitive")]
    #[test_case(Some("h2c"), None => PortProtocol::Http2)]
    #[test_case(Some("http"), Some("grpc") => PortProtocol::Http2 ; "appProtocol grpc wins")]
    #[test_case(Some("grpc"), Some("http") => PortProtocol::Http ; "appProtocol http wins")]
    #[test_case(None, Some("kubernetes.io/ws") => PortProtocol::Http)]
    #[test_case(Some("tcp-db"), None => PortProtocol::Tcp)]
    #[test_case(Some("web"), None => PortProtocol::Detect)]
    #[test_case(Some("tcp"), Some("http") => PortProtocol::Http ; "appProtocol wins")]
    #[test_case(None, Some("kubernetes.io/h2c") => PortProtocol::Http2)]
    fn protocol_selection(name: Option<&str>, app: Option<&str>) -> PortProtocol {
        port_protocol(name, app)
    }
}
