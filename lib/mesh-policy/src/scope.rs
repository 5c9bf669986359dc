//! Attachment: which policies a hop enforces for a destination (authz-semantics.md §5,
//! waypoint-semantics.md §3-§4), and whether a connection traverses the waypoint at all.
//!
//! - destination ztunnel: policies without `targetRefs` — root-namespace ones (GLOBAL),
//!   namespace-wide ones of the destination workload's namespace, and `selector` ones (in that
//!   namespace or the root namespace) whose labels are a subset of the workload's. An explicit
//!   `selector: {}` attaches to nothing in ambient.
//! - waypoint: only `targetRefs` policies — to this Gateway (its namespace), to the
//!   `istio-waypoint` GatewayClass (root namespace only), or to the Service the request was
//!   addressed to (the Service's namespace). Waypoints ignore `selector` and namespace-wide
//!   policies.

use std::collections::BTreeMap;

use crate::mesh::{Condition, ConditionType, MeshConfig};
use crate::model::{AuthorizationPolicy, PolicySet, RequestAuthentication, TargetRef};

/// The waypoint class istiod owns.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";

/// Labels istiod puts on a waypoint's pods (`waypoint.yaml` template), for layered policies
/// and for spotting legacy selector policies aimed at waypoints.
pub fn waypoint_pod_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("gateway.networking.k8s.io/gateway-name".into(), name.into()),
        (
            "gateway.networking.k8s.io/gateway-class-name".into(),
            WAYPOINT_CLASS.into(),
        ),
        (
            "gateway.istio.io/managed".into(),
            "istio.io-mesh-controller".into(),
        ),
        ("istio.io/dataplane-mode".into(), "none".into()),
    ])
}

/// A policy ztunnel applies to a workload, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZtunnelAttachment {
    Global,
    Namespace,
    Selector,
    /// `selector: {}` attached only because `strictPolicy` is on (Istio attaches nothing).
    EmptySelectorStrict,
}

/// Policies ztunnel enforces for the workload `namespace`/`labels`, in input order, plus
/// notes (and `ZtunnelAccepted` conditions) about policies that look aimed at it but are not
/// attached.
pub fn ztunnel_policies<'a>(
    set: &'a PolicySet,
    mesh: &MeshConfig,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> (
    Vec<(&'a AuthorizationPolicy, ZtunnelAttachment)>,
    Vec<String>,
    Vec<Condition>,
) {
    let root = mesh.root_namespace.as_str();
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let mut conds = Vec::new();
    for p in &set.authorization_policies {
        if !p.spec.all_target_refs().is_empty() {
            continue;
        }
        let ns = p.namespace();
        let in_scope = ns == namespace || ns == root;
        if !in_scope {
            continue;
        }
        match &p.spec.selector {
            None if ns == root => out.push((p, ZtunnelAttachment::Global)),
            None => out.push((p, ZtunnelAttachment::Namespace)),
            Some(sel) if sel.match_labels.is_empty() => {
                if mesh.strict_policy {
                    out.push((p, ZtunnelAttachment::EmptySelectorStrict));
                    notes.push(format!(
                        "{}: strictPolicy: `selector: {{}}` is applied to every workload in scope (Istio's ambient index attaches it to nothing)",
                        p.key()
                    ));
                } else {
                    conds.push(Condition::new(
                        &p.key(),
                        ConditionType::ZtunnelAccepted,
                        false,
                        "UnsupportedValue",
                        "an empty selector attaches to no workload in ambient mode; remove `selector` for a namespace-wide policy",
                    ));
                    notes.push(format!(
                        "{}: `selector: {{}}` attaches to no workload in ambient (sidecars would apply it to the whole namespace); this policy is not enforced here. Remove the selector for a namespace-wide policy, or set strictPolicy: true",
                        p.key()
                    ));
                }
            }
            Some(sel) if sel.matches(labels) => out.push((p, ZtunnelAttachment::Selector)),
            Some(_) => {}
        }
    }
    (out, notes, conds)
}

/// What a waypoint hop knows about where the request is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointTarget<'a> {
    pub waypoint_name: &'a str,
    pub waypoint_namespace: &'a str,
    /// `(namespace, name)` of the Service, when the request was addressed to it.
    pub service: Option<(&'a str, &'a str)>,
}

fn ref_applies(r: &TargetRef, policy_ns: &str, t: &WaypointTarget<'_>, root: &str) -> bool {
    if r.is_gateway() {
        return r.name == t.waypoint_name && policy_ns == t.waypoint_namespace;
    }
    if r.is_gateway_class() {
        return r.name == WAYPOINT_CLASS && policy_ns == root;
    }
    // The request's destination is a Kubernetes Service; ServiceEntry targets never match it.
    if r.is_service() {
        return t
            .service
            .is_some_and(|(ns, name)| r.name == name && policy_ns == ns);
    }
    false
}

/// `targetRefs` policies the waypoint enforces for this request, with their
/// `WaypointAccepted` conditions.
pub fn waypoint_policies<'a>(
    set: &'a PolicySet,
    mesh: &MeshConfig,
    t: &WaypointTarget<'_>,
) -> (Vec<&'a AuthorizationPolicy>, Vec<Condition>) {
    let root = mesh.root_namespace.as_str();
    let mut out = Vec::new();
    let mut conds = Vec::new();
    for p in &set.authorization_policies {
        let refs = p.spec.all_target_refs();
        if refs.is_empty() {
            continue;
        }
        let ns = p.namespace();
        for r in &refs {
            if r.is_gateway_class() && ns != root {
                conds.push(Condition::new(
                    &p.key(),
                    ConditionType::WaypointAccepted,
                    false,
                    "Invalid",
                    format!(
                        "AuthorizationPolicy must be in the root namespace `{root}` when referencing a GatewayClass"
                    ),
                ));
            } else if r.is_gateway_class() && r.name != WAYPOINT_CLASS {
                conds.push(Condition::new(
                    &p.key(),
                    ConditionType::WaypointAccepted,
                    false,
                    "Invalid",
                    "GatewayClass must use controller name `istio.io/mesh-controller` for waypoints",
                ));
            }
        }
        if refs.iter().any(|r| ref_applies(r, ns, t, root)) {
            conds.push(Condition::new(
                &p.key(),
                ConditionType::WaypointAccepted,
                true,
                "Accepted",
                format!("bound to {}/{}", t.waypoint_namespace, t.waypoint_name),
            ));
            out.push(p);
        }
    }
    (out, conds)
}

/// `targetRefs` policies that name this request's Service or destination but are enforced
/// nowhere on its path (no waypoint, or the waypoint is bypassed).
pub fn unenforced_target_ref_policies<'a>(
    set: &'a PolicySet,
    service: Option<(&str, &str)>,
) -> Vec<&'a AuthorizationPolicy> {
    set.authorization_policies
        .iter()
        .filter(|p| {
            p.spec.all_target_refs().iter().any(|r| {
                r.is_service()
                    && service.is_some_and(|(ns, name)| r.name == name && p.namespace() == ns)
            })
        })
        .collect()
}

/// RequestAuthentications the waypoint applies (same attachment as AuthorizationPolicy).
pub fn waypoint_request_authentications<'a>(
    set: &'a PolicySet,
    mesh: &MeshConfig,
    t: &WaypointTarget<'_>,
) -> Vec<&'a RequestAuthentication> {
    let root = mesh.root_namespace.as_str();
    set.request_authentications
        .iter()
        .filter(|ra| {
            ra.spec
                .all_target_refs()
                .iter()
                .any(|r| ref_applies(r, ra.meta.namespace(), t, root))
        })
        .collect()
}

/// Selector RequestAuthentications for a workload (ztunnel never validates JWTs).
pub fn selector_request_authentications<'a>(
    set: &'a PolicySet,
    mesh: &MeshConfig,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a RequestAuthentication> {
    set.request_authentications
        .iter()
        .filter(|ra| {
            let ns = ra.meta.namespace();
            ra.spec.all_target_refs().is_empty()
                && (ns == namespace || ns == mesh.root_namespace)
                && ra.spec.selector.as_ref().is_none_or(|s| s.matches(labels))
        })
        .collect()
}

/// `istio.io/waypoint-for` of the waypoint a destination is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

/// What the client dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressedTo {
    Service,
    Workload,
}

/// Whether the connection goes through the waypoint, or why it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Traversal {
    ViaWaypoint,
    Direct,
    /// A waypoint exists but this connection skips it (the reason says why).
    Bypassed(String),
}

/// waypoint-semantics.md §3.1-§3.4: service-addressed traffic uses a `service`/`all`
/// waypoint, workload-addressed traffic a `workload`/`all` one; plaintext (uncaptured) clients
/// never do.
pub fn traversal(
    waypoint: Option<(&str, WaypointFor)>,
    addressed_to: AddressedTo,
    plaintext: bool,
) -> Traversal {
    let Some((name, wf)) = waypoint else {
        return Traversal::Direct;
    };
    if plaintext {
        return Traversal::Bypassed(format!(
            "the client has no mesh identity (not captured by ztunnel), so it reaches the destination ztunnel directly as plaintext and skips waypoint {name}"
        ));
    }
    match (addressed_to, wf) {
        (AddressedTo::Service, WaypointFor::Service | WaypointFor::All)
        | (AddressedTo::Workload, WaypointFor::Workload | WaypointFor::All) => {
            Traversal::ViaWaypoint
        }
        (AddressedTo::Workload, WaypointFor::Service) => Traversal::Bypassed(format!(
            "the client dialled the pod IP and waypoint {name} is for services only (istio.io/waypoint-for: service): a service waypoint is bypassed by dialling the pod IP"
        )),
        (AddressedTo::Service, WaypointFor::Workload) => Traversal::Bypassed(format!(
            "the client dialled the Service and waypoint {name} is for workloads only (istio.io/waypoint-for: workload): service-addressed traffic never uses a workload waypoint"
        )),
        (_, WaypointFor::None) => Traversal::Bypassed(format!(
            "waypoint {name} is istio.io/waypoint-for: none and carries no traffic"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_objects;
    use test_case::test_case;

    // waypoint-semantics.md §1 (istio.io/waypoint-for table) and §3.2-§3.3.
    #[test_case(AddressedTo::Service, WaypointFor::Service, false => true ; "service to service waypoint")]
    #[test_case(AddressedTo::Service, WaypointFor::All, false => true ; "service to all waypoint")]
    #[test_case(AddressedTo::Service, WaypointFor::Workload, false => false ; "service skips workload waypoint")]
    #[test_case(AddressedTo::Workload, WaypointFor::Service, false => false ; "pod ip bypasses service waypoint")]
    #[test_case(AddressedTo::Workload, WaypointFor::Workload, false => true ; "pod ip to workload waypoint")]
    #[test_case(AddressedTo::Workload, WaypointFor::All, false => true ; "pod ip to all waypoint")]
    #[test_case(AddressedTo::Service, WaypointFor::None, false => false ; "none carries nothing")]
    #[test_case(AddressedTo::Service, WaypointFor::Service, true => false ; "plaintext client is uncaptured")]
    fn traverses(a: AddressedTo, w: WaypointFor, plaintext: bool) -> bool {
        traversal(Some(("default/waypoint", w)), a, plaintext) == Traversal::ViaWaypoint
    }

    const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: global, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: foo}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sel, namespace: foo}
spec: {selector: {matchLabels: {app: httpbin}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: root-sel, namespace: istio-system}
spec: {selector: {matchLabels: {app: httpbin}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-sel, namespace: foo}
spec: {selector: {matchLabels: {app: other}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-ns, namespace: bar}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: empty-sel, namespace: foo}
spec: {selector: {}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc, namespace: foo}
spec: {targetRefs: [{kind: Service, group: \"\", name: httpbin}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: default}
spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: class, namespace: istio-system}
spec: {targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: class-wrong-ns, namespace: foo}
spec: {targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]}
";

    // authz-semantics.md §5.1 scope table; istio.io docs/ambient/usage/l4-policy and
    // authorization-policy; pilot/pkg/model/policyattachment.go.
    #[test]
    fn ztunnel_attachment() {
        let set = parse_objects("t.yaml", POLICIES).unwrap();
        let labels = BTreeMap::from([("app".to_string(), "httpbin".to_string())]);
        let (ps, notes, _) = ztunnel_policies(&set, &MeshConfig::default(), "foo", &labels);
        let keys: Vec<String> = ps.iter().map(|(p, _)| p.key()).collect();
        assert_eq!(
            keys,
            vec![
                "istio-system/global",
                "foo/ns-wide",
                "foo/sel",
                "istio-system/root-sel"
            ]
        );
        assert!(notes[0].contains("foo/empty-sel"));
        let strict = MeshConfig {
            strict_policy: true,
            ..Default::default()
        };
        let (ps, _, _) = ztunnel_policies(&set, &strict, "foo", &labels);
        assert!(ps.iter().any(
            |(p, a)| p.key() == "foo/empty-sel" && *a == ZtunnelAttachment::EmptySelectorStrict
        ));
    }

    #[test]
    fn waypoint_attachment() {
        let set = parse_objects("t.yaml", POLICIES).unwrap();
        let t = WaypointTarget {
            waypoint_name: "waypoint",
            waypoint_namespace: "default",
            service: Some(("foo", "httpbin")),
        };
        let (ps, conds) = waypoint_policies(&set, &MeshConfig::default(), &t);
        let keys: Vec<String> = ps.iter().map(|p| p.key()).collect();
        assert_eq!(keys, vec!["foo/svc", "default/gw", "istio-system/class"]);
        assert!(conds.iter().any(|c| c.policy == "foo/class-wrong-ns"
            && c.reason == "Invalid"
            && c.message.contains("root namespace `istio-system`")));
        // Workload-addressed: only Gateway/GatewayClass policies (istio/istio#56505).
        let t = WaypointTarget { service: None, ..t };
        let (ps, _) = waypoint_policies(&set, &MeshConfig::default(), &t);
        let keys: Vec<String> = ps.iter().map(|p| p.key()).collect();
        assert_eq!(keys, vec!["default/gw", "istio-system/class"]);
    }
}
