//! Index → Istio's workload API, as istiod's ambient index builds it. Pure: no I/O, no
//! xDS, no kube client; the same index always yields the same resources.
//!
//! - every Pod with an IP becomes a `Workload` (uid `<cluster>//Pod/<ns>/<name>`): HBONE
//!   when it is ambient (namespace or pod label `istio.io/dataplane-mode=ambient`, pod label
//!   `none` opts out, host-network pods never), plain TCP otherwise so clients still see it;
//!   healthy only when Running and Ready;
//! - every Service with a ClusterIP becomes a `Service`; a pod backs each Service of its
//!   namespace whose selector matches it, with the target port resolved per pod (named
//!   ports through the pod's container ports);
//! - AuthorizationPolicies are converted by `mesh-policy` (the exact istiod L4 conversion);
//!   a workload lists the selector policies and the PeerAuthentication-derived policies that
//!   attach to it;
//! - Services and Pods bound to a waypoint (`istio.io/use-waypoint`, see [`waypoint`]) carry
//!   its address; refused bindings become notes naming the reason.
//!
//! [`Translator`] gives the same result index after index, translating again only the pods
//! that changed as long as namespaces, Services, policies and Gateways did not.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::core::v1::{Pod, Service as K8sService},
    apimachinery::pkg::util::intstr::IntOrString,
};
use mesh_core::{
    policy::Authorization,
    workload::{HealthStatus, PortMap, Service, TunnelProtocol, Workload},
};
use mesh_policy::{MeshConfig, PolicySet};

use crate::{
    index::Index,
    waypoint::{self, Binding, Target},
};

/// Applies a waypoint binding: the address when bound, a note when refused.
fn bind(
    what: &str,
    b: Binding,
    notes: &mut Vec<String>,
) -> Option<mesh_core::workload::GatewayAddress> {
    match b {
        Binding::None => None,
        Binding::Bound { address, .. } => Some(address),
        Binding::Refused(reason) => {
            notes.push(format!("{what}: not bound to a waypoint: {reason}"));
            None
        }
    }
}

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Settings the translation needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_id: String,
    pub domain_suffix: String,
    pub mesh: MeshConfig,
}

/// The resources for one index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Service>,
    pub authorizations: Vec<Authorization>,
    /// Why something was left out or changed, one line each (for logs and status).
    pub notes: Vec<String>,
    /// Policies' status conditions (`ZtunnelAccepted`, `WaypointAccepted`), as Istio reports
    /// them.
    pub conditions: Vec<mesh_policy::mesh::Condition>,
}

/// Is this pod captured by the mesh?
pub fn is_ambient(idx: &Index, pod: &Pod) -> bool {
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return false;
    }
    let labels = pod.metadata.labels.as_ref();
    match labels
        .and_then(|l| l.get(DATAPLANE_MODE))
        .map(String::as_str)
    {
        Some("none") => false,
        Some("ambient") => true,
        _ => {
            let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
            idx.namespace_labels(ns)
                .and_then(|l| l.get(DATAPLANE_MODE))
                .is_some_and(|m| m == "ambient")
        }
    }
}

fn pod_ready(pod: &Pod) -> bool {
    let Some(st) = pod.status.as_ref() else {
        return false;
    };
    st.phase.as_deref() == Some("Running")
        && st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn pod_ips(pod: &Pod) -> Vec<std::net::IpAddr> {
    let Some(st) = pod.status.as_ref() else {
        return vec![];
    };
    let mut ips: Vec<std::net::IpAddr> = st
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = st.pod_ip.as_deref().and_then(|s| s.parse().ok())
    {
        ips.push(ip);
    }
    ips
}

fn label<'a>(labels: &'a BTreeMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| labels.get(*k)).map(String::as_str)
}

/// Deployment/Job name from owner references, as istiod's workload-name heuristic does.
fn workload_name_and_type(pod: &Pod) -> (String, &'static str) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    for o in pod.metadata.owner_references.iter().flatten() {
        match o.kind.as_str() {
            "ReplicaSet" => {
                let n = o.name.rsplit_once('-').map_or(o.name.as_str(), |(d, _)| d);
                return (n.to_owned(), "deployment");
            }
            "Job" => return (o.name.clone(), "job"),
            "StatefulSet" | "DaemonSet" => return (o.name.clone(), "deployment"),
            _ => {}
        }
    }
    (name, "pod")
}

fn service_hostname(svc: &K8sService, suffix: &str) -> String {
    format!(
        "{}.{}.svc.{suffix}",
        svc.metadata.name.as_deref().unwrap_or_default(),
        svc.metadata.namespace.as_deref().unwrap_or("default")
    )
}

fn selects(svc: &K8sService, pod: &Pod) -> bool {
    let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    if sel.is_empty() || svc.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Service port → the pod's port for it (a named target port resolved in the containers).
fn pod_ports(svc: &K8sService, pod: &Pod) -> PortMap {
    let mut m = PortMap::new();
    for p in svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
    {
        if p.protocol.as_deref().is_some_and(|pr| pr != "TCP") {
            continue;
        }
        let Ok(sp) = u16::try_from(p.port) else {
            continue;
        };
        let target = match &p.target_port {
            None => Some(p.port),
            Some(IntOrString::Int(n)) => Some(*n),
            Some(IntOrString::String(name)) => pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .map(|cp| cp.container_port),
        };
        if let Some(t) = target.and_then(|t| u16::try_from(t).ok()) {
            m.insert(sp, t);
        }
    }
    m
}

fn service_of(svc: &K8sService, suffix: &str) -> Option<Service> {
    let spec = svc.spec.as_ref()?;
    let ips: Vec<&String> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .collect();
    let mut vips = Vec::new();
    for ip in ips {
        if let Ok(a) = ip.parse()
            && !vips
                .iter()
                .any(|v: &mesh_core::workload::NetworkAddress| v.address == a)
        {
            vips.push(mesh_core::workload::NetworkAddress {
                network: String::new(),
                address: a,
            });
        }
    }
    let mut ports = BTreeMap::new();
    for p in spec.ports.iter().flatten() {
        let Ok(sp) = u16::try_from(p.port) else {
            continue;
        };
        // A named target port differs per pod: 0 tells ztunnel to use the endpoint's map.
        let tp = match &p.target_port {
            None => sp,
            Some(IntOrString::Int(n)) => u16::try_from(*n).unwrap_or(0),
            Some(IntOrString::String(_)) => 0,
        };
        ports.insert(sp, tp);
    }
    Some(Service {
        name: svc.metadata.name.clone()?,
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        hostname: service_hostname(svc, suffix),
        vips,
        ports,
        waypoint: None,
    })
}

/// What every workload's translation shares: the policies (as written and converted), and
/// the outputs that do not depend on pods.
#[derive(Debug, Clone)]
struct Base {
    set: PolicySet,
    converted: mesh_policy::istiod::Resources,
    services: Vec<Service>,
    notes: Vec<String>,
    conditions: Vec<mesh_policy::mesh::Condition>,
}

fn base(idx: &Index, s: &Settings) -> Base {
    let set = PolicySet {
        authorization_policies: idx.authorization_policies.values().cloned().collect(),
        peer_authentications: idx.peer_authentications.values().cloned().collect(),
        request_authentications: vec![],
    };
    // The Authorization resources and each policy's ZtunnelAccepted condition, converted
    // once per translation (mesh-policy's copy of istiod's ambient index).
    let converted = mesh_policy::istiod::resources(&set, &s.mesh);
    let mut conditions = converted.conditions.clone();
    conditions.extend(waypoint::policy_conditions(
        idx,
        &s.mesh.root_namespace,
        &s.domain_suffix,
    ));
    let mut notes = Vec::new();
    for c in &converted.conditions {
        if !(c.reason == "Accepted" && c.message == "attached to ztunnel") {
            notes.push(format!("{}: {}: {}", c.policy, c.reason, c.message));
        }
    }
    let mut services = Vec::new();
    for svc in idx.services.values() {
        if let Some(mut v) = service_of(svc, &s.domain_suffix) {
            let labels = svc.metadata.labels.as_ref();
            if !waypoint::is_waypoint_object(labels) {
                let b =
                    waypoint::resolve(idx, &v.namespace, labels, Target::Service, &s.domain_suffix);
                v.waypoint = bind(
                    &format!("Service {}/{}", v.namespace, v.name),
                    b,
                    &mut notes,
                );
            }
            services.push(v);
        }
    }
    Base {
        set,
        converted,
        services,
        notes,
        conditions,
    }
}

/// What one pod became: its workload (None: it has no IP yet) and notes about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct PodOut {
    workload: Option<Arc<Workload>>,
    notes: Vec<String>,
}

fn pod_workload(idx: &Index, s: &Settings, b: &Base, pod: &Pod) -> PodOut {
    let (set, converted) = (&b.set, &b.converted);
    let mut out = PodOut::default();
    let ips = pod_ips(pod);
    if ips.is_empty() {
        return out;
    }
    let ns = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let ambient = is_ambient(idx, pod);
    let policies = if ambient {
        mesh_policy::istiod::workload_policy_keys(set, &s.mesh, converted, &ns, labels, None)
    } else {
        Vec::new()
    };
    let waypoint = if ambient && !waypoint::is_waypoint_object(Some(labels)) {
        let b = waypoint::resolve(idx, &ns, Some(labels), Target::Workload, &s.domain_suffix);
        bind(&format!("Pod {ns}/{name}"), b, &mut out.notes)
    } else {
        None
    };
    let (workload_name, workload_type) = workload_name_and_type(pod);
    // Only a Service of the pod's namespace can select it: its keys share the prefix.
    let prefix = format!("{ns}/");
    let services = idx
        .services
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .map(|(_, svc)| svc)
        .filter(|svc| selects(svc, pod))
        .map(|svc| {
            (
                format!("{ns}/{}", service_hostname(svc, &s.domain_suffix)),
                pod_ports(svc, pod),
            )
        })
        .collect();
    let spec = pod.spec.as_ref();
    out.workload = Some(Arc::new(Workload {
        uid: format!("{}//Pod/{ns}/{name}", s.cluster_id),
        name: name.clone(),
        namespace: ns,
        workload_ips: ips,
        network: String::new(),
        protocol: if ambient {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        trust_domain: s.mesh.trust_domain.clone(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        hostname: String::new(),
        waypoint,
        canonical_name: label(
            labels,
            &[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ],
        )
        .unwrap_or(&workload_name)
        .to_owned(),
        canonical_revision: label(
            labels,
            &[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ],
        )
        .unwrap_or("latest")
        .to_owned(),
        workload_name,
        workload_type: workload_type.to_owned(),
        cluster_id: s.cluster_id.clone(),
        authorization_policies: policies,
        status: if pod_ready(pod) {
            HealthStatus::Healthy
        } else {
            HealthStatus::Unhealthy
        },
        services,
    }));
    out
}

/// Translates the whole index.
pub fn translate(idx: &Index, s: &Settings) -> Resources {
    let b = base(idx, s);
    let pods: Vec<PodOut> = idx
        .pods
        .values()
        .map(|p| pod_workload(idx, s, &b, p))
        .collect();
    assemble(&b, pods.iter())
}

fn assemble<'a>(b: &Base, pods: impl Iterator<Item = &'a PodOut> + Clone) -> Resources {
    let mut notes = b.notes.clone();
    notes.extend(pods.clone().flat_map(|p| p.notes.iter().cloned()));
    Resources {
        workloads: pods.filter_map(|p| p.workload.clone()).collect(),
        services: b.services.clone(),
        authorizations: b.converted.authorizations.clone(),
        notes,
        conditions: b.conditions.clone(),
    }
}

/// Translates index after index with the result of [`translate`], redoing only the pods
/// that changed when nothing else did. A workload depends on its pod and on the namespaces,
/// Services, policies and Gateways; a change to any of those translates everything again.
/// Unchanged workloads keep their `Arc`, so the encoder can tell them apart cheaply. It
/// keeps copies of what it compares (not the index: the source may reuse that one).
#[derive(Debug, Default)]
pub struct Translator {
    last: Option<(Context, Base)>,
    /// Pod key → the pod as translated, and what it became.
    pods: BTreeMap<String, (Arc<Pod>, PodOut)>,
}

/// The inputs of a workload other than its pod.
#[derive(Debug, PartialEq)]
struct Context {
    namespaces: BTreeMap<String, k8s_openapi::api::core::v1::Namespace>,
    services: BTreeMap<String, K8sService>,
    authorization_policies: BTreeMap<String, mesh_policy::model::AuthorizationPolicy>,
    peer_authentications: BTreeMap<String, mesh_policy::model::PeerAuthentication>,
    gateways: BTreeMap<String, crate::waypoint::Gateway>,
}

impl Context {
    fn same(&self, idx: &Index) -> bool {
        self.namespaces == idx.namespaces
            && self.services == idx.services
            && self.authorization_policies == idx.authorization_policies
            && self.peer_authentications == idx.peer_authentications
            && self.gateways == idx.gateways
    }

    fn of(idx: &Index) -> Context {
        Context {
            namespaces: idx.namespaces.clone(),
            services: idx.services.clone(),
            authorization_policies: idx.authorization_policies.clone(),
            peer_authentications: idx.peer_authentications.clone(),
            gateways: idx.gateways.clone(),
        }
    }
}

impl Translator {
    pub fn translate(&mut self, idx: &Index, s: &Settings) -> Resources {
        if !self.last.as_ref().is_some_and(|(ctx, _)| ctx.same(idx)) {
            self.pods.clear();
            self.last = None;
        }
        let (_, b) = self
            .last
            .get_or_insert_with(|| (Context::of(idx), base(idx, s)));
        for (k, pod) in &idx.pods {
            if self
                .pods
                .get(k)
                .is_some_and(|(p, _)| Arc::ptr_eq(p, pod) || p == pod)
            {
                continue;
            }
            self.pods
                .insert(k.clone(), (pod.clone(), pod_workload(idx, s, b, pod)));
        }
        // Every pod of `idx` is in: the same length means no other is.
        if self.pods.len() != idx.pods.len() {
            self.pods.retain(|k, _| idx.pods.contains_key(k));
        }
        assemble(b, self.pods.values().map(|(_, o)| o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::parse_manifests;

    fn settings() -> Settings {
        Settings {
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            mesh: MeshConfig::default(),
        }
    }

    fn index(yaml: &str) -> Index {
        let (objs, rejected) = parse_manifests("t.yaml", yaml);
        assert!(rejected.is_empty(), "{rejected:?}");
        Index::reset(objs, vec![])
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata:
  name: echo-7d9f8-abcde
  namespace: foo
  labels: {app: echo, version: v2}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: echo-7d9f8, uid: u1}]
spec:
  serviceAccountName: echo
  nodeName: node-b
  containers: [{name: echo, image: x, ports: [{name: http, containerPort: 8080}]}]
status:
  phase: Running
  podIP: 10.244.2.7
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: foo, labels: {app: echo, istio.io/dataplane-mode: none}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.2.8}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: plain, labels: {app: legacy}}
spec: {containers: [{name: c, image: x}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: foo}
spec:
  clusterIP: 10.96.10.20
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}, {name: tcp, port: 9000, targetPort: 9001}]
"#;

    #[test]
    fn pods_and_services_become_workloads_and_services() {
        let r = translate(&index(BASE), &settings());
        assert_eq!(r.workloads.len(), 2, "the pod without an IP is left out");
        let echo = r
            .workloads
            .iter()
            .find(|w| w.name == "echo-7d9f8-abcde")
            .unwrap();
        assert_eq!(echo.uid, "Kubernetes//Pod/foo/echo-7d9f8-abcde");
        assert_eq!(echo.protocol, TunnelProtocol::Hbone);
        assert_eq!(echo.status, HealthStatus::Healthy);
        assert_eq!(echo.workload_name, "echo");
        assert_eq!(echo.workload_type, "deployment");
        assert_eq!(echo.canonical_name, "echo");
        assert_eq!(echo.canonical_revision, "v2");
        assert_eq!(echo.service_account, "echo");
        assert_eq!(echo.node, "node-b");
        assert_eq!(
            echo.services["foo/echo.foo.svc.cluster.local"],
            PortMap::from([(80, 8080), (9000, 9001)]),
            "named target port resolved through the container port"
        );
        let out = r.workloads.iter().find(|w| w.name == "opted-out").unwrap();
        assert_eq!(
            out.protocol,
            TunnelProtocol::None,
            "dataplane-mode=none opts out"
        );
        assert_eq!(out.status, HealthStatus::Unhealthy, "not Ready");
        let svc = &r.services[0];
        assert_eq!(svc.hostname, "echo.foo.svc.cluster.local");
        assert_eq!(svc.ports, BTreeMap::from([(80, 0), (9000, 9001)]));
        assert_eq!(svc.vips[0].address.to_string(), "10.96.10.20");
    }

    // waypoint-semantics.md §2.2/§2.4: the binding is data on the Service / Workload.
    #[test]
    fn bound_services_and_pods_carry_the_waypoint_address() {
        let yaml = BASE.replace(
            "metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}",
            "metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
        ) + r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: foo, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
status: {addresses: [{type: Hostname, value: waypoint.foo.svc.cluster.local}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-abc
  namespace: foo
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {serviceAccountName: waypoint, nodeName: node-a, containers: [{name: c, image: x}]}
status: {phase: Running, podIP: 10.244.1.9, conditions: [{type: Ready, status: "True"}]}
"#;
        let r = translate(&index(&yaml), &settings());
        let svc = &r.services[0];
        assert!(svc.waypoint.is_some(), "{:?}", r.notes);
        let echo = r
            .workloads
            .iter()
            .find(|w| w.name == "echo-7d9f8-abcde")
            .unwrap();
        assert!(
            echo.waypoint.is_some(),
            "waypoint-for: all covers workloads"
        );
        let wp = r
            .workloads
            .iter()
            .find(|w| w.name == "waypoint-abc")
            .unwrap();
        assert!(wp.waypoint.is_none(), "a waypoint never gets a waypoint");
        // Without status.addresses the binding is refused with a note, never silently made.
        let pending = yaml.replace(
            "status: {addresses: [{type: Hostname, value: waypoint.foo.svc.cluster.local}]}",
            "",
        );
        let r = translate(&index(&pending), &settings());
        assert!(r.services[0].waypoint.is_none());
        assert!(
            r.notes.iter().any(|n| n.contains("not ready")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn selector_and_peer_authentication_policies_attach_to_workloads() {
        let yaml = format!(
            "{BASE}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-sleep, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/bar/sa/sleep]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ns-wide, namespace: foo}}
spec: {{action: DENY, rules: [{{to: [{{operation: {{ports: [\"9000\"]}}}}]}}]}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"
        );
        let r = translate(&index(&yaml), &settings());
        let keys: Vec<String> = r.authorizations.iter().map(|a| a.key()).collect();
        assert!(keys.contains(&"foo/only-sleep".to_owned()), "{keys:?}");
        assert!(keys.contains(&"foo/ns-wide".to_owned()), "{keys:?}");
        assert!(
            keys.contains(&"istio-system/istio_converted_static_strict".to_owned()),
            "{keys:?}"
        );
        let echo = r
            .workloads
            .iter()
            .find(|w| w.name == "echo-7d9f8-abcde")
            .unwrap();
        assert_eq!(
            echo.authorization_policies,
            [
                "foo/only-sleep",
                "istio-system/istio_converted_static_strict"
            ],
            "namespace-wide policies are sent out of band, not listed"
        );
        let legacy = r.workloads.iter().find(|w| w.name == "opted-out").unwrap();
        assert!(legacy.authorization_policies.is_empty());
    }

    /// Pod edits one at a time (new IP, new labels, gone, back), then a Service and a
    /// namespace change: the incremental translator always gives what a full one gives, and
    /// keeps the `Arc` of every workload whose pod did not change.
    #[test]
    fn the_incremental_translator_equals_a_full_translation() {
        let pod = |n: usize, ip: usize, app: &str| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{n}, namespace: foo, labels: {{app: {app}}}}}\n\
                 spec: {{containers: [{{name: c, image: x}}]}}\n\
                 status: {{phase: Running, podIP: 10.0.{n}.{ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
            )
        };
        let mut pods: Vec<Option<(usize, &str)>> = vec![Some((1, "echo")); 6];
        let mut t = Translator::default();
        let mut extra = String::new();
        for step in 0..40 {
            let i = (step * 7) % pods.len();
            pods[i] = match step % 4 {
                0 => Some((step, "echo")),
                1 => Some((1, "other")),
                2 => None,
                _ => Some((2, "echo")),
            };
            if step == 30 {
                extra =
                    "---\napiVersion: v1\nkind: Service\nmetadata: {name: other, namespace: foo}\n\
                         spec: {clusterIP: 10.96.0.9, selector: {app: other}, ports: [{port: 1}]}\n"
                        .to_owned();
            }
            let yaml = pods
                .iter()
                .enumerate()
                .filter_map(|(n, p)| p.map(|(ip, app)| pod(n, ip, app)))
                .fold(BASE.to_owned() + &extra, |a, b| a + &b);
            let idx = index(&yaml);
            let before: BTreeMap<String, Arc<Workload>> = t
                .pods
                .values()
                .filter_map(|(_, o)| o.workload.clone())
                .map(|w| (w.uid.clone(), w))
                .collect();
            let r = t.translate(&idx, &settings());
            assert_eq!(r, translate(&idx, &settings()), "step {step}");
            if step != 0 && step != 30 {
                let kept = r
                    .workloads
                    .iter()
                    .filter(|w| before.get(&w.uid).is_some_and(|b| Arc::ptr_eq(b, w)))
                    .count();
                assert!(
                    kept + 1 >= r.workloads.len(),
                    "step {step}: only {kept} kept"
                );
            }
        }
    }
}
