//! Waypoints: the Gateway API objects that declare them, and which Services and Pods bind
//! to which waypoint (`istio.io/use-waypoint`), as istiod resolves it
//! (`pilot/pkg/serviceregistry/ambient/waypoints.go`; shared/reference/waypoint-semantics.md §1–§2).
//!
//! Resolution for a Service or a Pod:
//! 1. its own `istio.io/use-waypoint` label wins; `none` opts it out even when the namespace
//!    is labelled; otherwise the namespace's label applies;
//! 2. the waypoint is `<ns>/<name>`, `ns` being `istio.io/use-waypoint-namespace` on the same
//!    object that carried the name, else that object's namespace;
//! 3. the Gateway must exist with class `istio-waypoint`, be ready (have `status.addresses`)
//!    and allow attachment from the object's namespace (HBONE listener `allowedRoutes`:
//!    `Same` by default, `All`, or a `Selector` on namespace labels);
//! 4. its traffic type (`istio.io/waypoint-for`, default `service`) must cover the object:
//!    `service`/`all` for Services, `workload`/`all` for Pods. A mismatch on an explicitly
//!    labelled object is reported; one inherited from the namespace is silently "none";
//! 5. waypoints themselves never get a waypoint.
//!
//! Every refusal is returned as a [`Binding::Refused`] reason (for status and logs).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use mesh_core::workload::{GatewayAddress, GatewayDestination, HBONE_PORT, NamespacedHostname};
use serde::Deserialize;

use crate::index::Index;

pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// Pod label istiod puts on a waypoint's own pods.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

/// A Gateway API `Gateway`, the fields the mesh reads.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[serde(default)]
    pub status: Option<GatewayStatus>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Labels and annotations copied onto the objects deployed for the Gateway.
    #[serde(default)]
    pub infrastructure: Option<Infrastructure>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Infrastructure {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    #[serde(default)]
    pub namespaces: Option<RouteNamespaces>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default)]
    pub addresses: Vec<GatewayStatusAddress>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A `metav1.Condition` as read back from the status.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub last_transition_time: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatusAddress {
    /// `Hostname` or `IPAddress` (default).
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    pub value: String,
}

impl Gateway {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn label(&self, k: &str) -> Option<&str> {
        self.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(String::as_str)
    }

    /// `service` unless the Gateway says otherwise.
    pub fn waypoint_for(&self) -> &str {
        self.label(WAYPOINT_FOR).unwrap_or("service")
    }

    /// May an object in namespace `ns` (with `ns_labels`) use this waypoint?
    fn admits(&self, ns: &str, ns_labels: Option<&BTreeMap<String, String>>) -> bool {
        let hbone = self
            .spec
            .listeners
            .iter()
            .find(|l| l.protocol == "HBONE")
            .or_else(|| self.spec.listeners.first());
        let from = hbone
            .and_then(|l| l.allowed_routes.as_ref())
            .and_then(|a| a.namespaces.as_ref());
        match from.and_then(|f| f.from.as_deref()).unwrap_or("Same") {
            "All" => true,
            "Selector" => {
                let empty = BTreeMap::new();
                let have = ns_labels.unwrap_or(&empty);
                from.and_then(|f| f.selector.as_ref())
                    .is_some_and(|s| s.match_labels.iter().all(|(k, v)| have.get(k) == Some(v)))
            }
            _ => ns == self.namespace(),
        }
    }

    /// Where ztunnel sends HBONE for this waypoint: the status hostname (the waypoint's
    /// Service), else a status IP.
    fn address(&self, domain_suffix: &str) -> Option<GatewayAddress> {
        let addrs = &self.status.as_ref()?.addresses;
        let pick = addrs
            .iter()
            .find(|a| a.type_.as_deref() == Some("Hostname"))
            .or_else(|| addrs.first())?;
        let destination = match pick.value.parse() {
            Ok(ip) => GatewayDestination::Address(mesh_core::workload::NetworkAddress {
                network: String::new(),
                address: ip,
            }),
            Err(_) => GatewayDestination::Hostname(NamespacedHostname {
                namespace: self.namespace().to_owned(),
                hostname: if pick.value.contains('.') {
                    pick.value.clone()
                } else {
                    format!("{}.{}.svc.{domain_suffix}", pick.value, self.namespace())
                },
            }),
        };
        Some(GatewayAddress {
            destination,
            hbone_mtls_port: HBONE_PORT,
        })
    }
}

/// What is being bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Service,
    Workload,
}

/// The outcome for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    None,
    Bound {
        waypoint: String,
        address: GatewayAddress,
    },
    /// Labelled, but not bound; the reason says why (`istio.io/WaypointBound` False).
    Refused(String),
}

/// Resolves the waypoint of an object in `ns` carrying `labels`.
pub fn resolve(
    idx: &Index,
    ns: &str,
    labels: Option<&BTreeMap<String, String>>,
    target: Target,
    domain_suffix: &str,
) -> Binding {
    let own = labels.and_then(|l| l.get(USE_WAYPOINT));
    let ns_labels = idx.namespace_labels(ns);
    let (name, wp_ns, explicit) = match own.map(String::as_str) {
        Some("none") => return Binding::None,
        Some(n) => (
            n.to_owned(),
            labels
                .and_then(|l| l.get(USE_WAYPOINT_NAMESPACE))
                .cloned()
                .unwrap_or_else(|| ns.to_owned()),
            true,
        ),
        None => match ns_labels.and_then(|l| l.get(USE_WAYPOINT)) {
            None => return Binding::None,
            Some(n) if n == "none" => return Binding::None,
            Some(n) => (
                n.clone(),
                ns_labels
                    .and_then(|l| l.get(USE_WAYPOINT_NAMESPACE))
                    .cloned()
                    .unwrap_or_else(|| ns.to_owned()),
                false,
            ),
        },
    };
    let key = format!("{wp_ns}/{name}");
    let Some(gw) = idx.gateways.get(&key) else {
        return Binding::Refused(format!("waypoint {key} does not exist"));
    };
    if gw.spec.gateway_class_name != WAYPOINT_CLASS {
        return Binding::Refused(format!(
            "{key} is a Gateway of class {:?}, not {WAYPOINT_CLASS}",
            gw.spec.gateway_class_name
        ));
    }
    let Some(address) = gw.address(domain_suffix) else {
        return Binding::Refused(format!("waypoint {key} is not ready (no status.addresses)"));
    };
    if !gw.admits(ns, ns_labels) {
        return Binding::Refused(format!(
            "waypoint {key} does not allow attachment from namespace {ns} (listener allowedRoutes)"
        ));
    }
    let covers = matches!(
        (target, gw.waypoint_for()),
        (_, "all") | (Target::Service, "service") | (Target::Workload, "workload")
    );
    if !covers {
        return if explicit {
            Binding::Refused(format!(
                "waypoint {key} is for {:?} traffic, not {}",
                gw.waypoint_for(),
                match target {
                    Target::Service => "service",
                    Target::Workload => "workload",
                }
            ))
        } else {
            Binding::None
        };
    }
    Binding::Bound {
        waypoint: key,
        address,
    }
}

/// `WaypointAccepted` for every `targetRefs` AuthorizationPolicy, as istiod reports it
/// (waypoint-semantics.md §4.2): each Gateway, GatewayClass or Service reference must resolve
/// to a waypoint; all do → `Accepted` ("bound to ns/waypoint"); some do → `PartiallyInvalid`;
/// none → the first failure's reason (`TargetNotFound`, `AncestorNotBound`, `Invalid`). Pure.
pub fn policy_conditions(
    idx: &Index,
    root_namespace: &str,
    domain_suffix: &str,
) -> Vec<mesh_policy::mesh::Condition> {
    use mesh_policy::mesh::{Condition, ConditionType::WaypointAccepted};
    let mut out = Vec::new();
    for p in idx.authorization_policies.values() {
        let refs = p.spec.all_target_refs();
        if refs.is_empty() {
            continue;
        }
        let ns = p.namespace();
        let mut bound = Vec::new();
        let mut failures: Vec<(&str, String)> = Vec::new();
        for r in refs {
            if r.is_gateway_class() {
                if ns != root_namespace {
                    failures.push(("Invalid", format!("AuthorizationPolicy must be in the root namespace `{root_namespace}` when referencing a GatewayClass")));
                } else if r.name != WAYPOINT_CLASS {
                    failures.push(("Invalid", "GatewayClass must use controller name `istio.io/mesh-controller` for waypoints".to_owned()));
                } else {
                    bound.push(format!("GatewayClass {WAYPOINT_CLASS}"));
                }
            } else if r.is_gateway() {
                let key = format!("{ns}/{}", r.name);
                match idx.gateways.get(&key) {
                    Some(g) if g.spec.gateway_class_name == WAYPOINT_CLASS => bound.push(key),
                    Some(_) => failures.push((
                        "Invalid",
                        format!("Gateway {key} is not a waypoint (class {WAYPOINT_CLASS})"),
                    )),
                    None => {
                        failures.push(("TargetNotFound", format!("Gateway {key} was not found")))
                    }
                }
            } else if r.is_service() {
                let key = format!("{ns}/{}", r.name);
                let Some(svc) = idx.services.get(&key) else {
                    failures.push(("TargetNotFound", format!("Service {key} was not found")));
                    continue;
                };
                match resolve(
                    idx,
                    ns,
                    svc.metadata.labels.as_ref(),
                    Target::Service,
                    domain_suffix,
                ) {
                    Binding::Bound { waypoint, .. } => bound.push(waypoint),
                    _ => failures.push((
                        "AncestorNotBound",
                        format!("Service {key} is not bound to a waypoint"),
                    )),
                }
            } else {
                failures.push((
                    "Invalid",
                    format!(
                        "unsupported targetRef kind {:?} (Gateway, GatewayClass or Service)",
                        r.kind
                    ),
                ));
            }
        }
        bound.dedup();
        let c = match (bound.is_empty(), failures.first()) {
            (false, None) => Condition::new(
                &p.key(),
                WaypointAccepted,
                true,
                "Accepted",
                format!("bound to {}", bound.join(", ")),
            ),
            (false, Some(_)) => Condition::new(
                &p.key(),
                WaypointAccepted,
                true,
                "PartiallyInvalid",
                format!(
                    "bound to {}; {}",
                    bound.join(", "),
                    failures
                        .iter()
                        .map(|(_, m)| m.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ),
            (true, Some((reason, msg))) => {
                Condition::new(&p.key(), WaypointAccepted, false, reason, msg.clone())
            }
            (true, None) => continue,
        };
        out.push(c);
    }
    out
}

/// True for the waypoint's own pods and Services (they are never redirected to a waypoint).
pub fn is_waypoint_object(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels.is_some_and(|l| l.contains_key(GATEWAY_NAME_LABEL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::parse_manifests;

    fn index(yaml: &str) -> Index {
        let (objs, rejected) = parse_manifests("t.yaml", yaml);
        assert!(rejected.is_empty(), "{rejected:?}");
        Index::reset(objs, vec![])
    }

    const GW: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: foo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
status:
  addresses: [{type: Hostname, value: waypoint.foo.svc.cluster.local}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shared, namespace: infra, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]
status:
  addresses: [{value: 10.96.0.50}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: pending, namespace: foo}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ns(name: &str, kv: &[(&str, &str)]) -> String {
        let l: Vec<String> = kv.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{}}}}}\n",
            l.join(", ")
        )
    }

    fn bound_to(b: &Binding) -> Option<&str> {
        match b {
            Binding::Bound { waypoint, .. } => Some(waypoint),
            _ => None,
        }
    }

    // waypoint-semantics.md §2.2 (istio/istio waypoints.go fetchWaypointForTarget).
    #[test]
    fn own_label_wins_namespace_is_the_default_and_none_opts_out() {
        let idx = index(&format!("{GW}{}", ns("foo", &[(USE_WAYPOINT, "waypoint")])));
        let r = |l: &[(&str, &str)], t| resolve(&idx, "foo", Some(&labels(l)), t, "cluster.local");
        assert_eq!(bound_to(&r(&[], Target::Service)), Some("foo/waypoint"));
        assert_eq!(r(&[(USE_WAYPOINT, "none")], Target::Service), Binding::None);
        // Inherited service waypoint does not cover workloads: silently none.
        assert_eq!(r(&[], Target::Workload), Binding::None);
        // Explicitly asked: reported.
        assert!(
            matches!(r(&[(USE_WAYPOINT, "waypoint")], Target::Workload), Binding::Refused(m) if m.contains("\"service\" traffic"))
        );
        let b = r(&[], Target::Service);
        let Binding::Bound { address, .. } = b else {
            panic!()
        };
        assert_eq!(
            address.destination,
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: "foo".into(),
                hostname: "waypoint.foo.svc.cluster.local".into()
            })
        );
    }

    // waypoint-semantics.md §4.2 (reasons of istiod's WaypointAccepted).
    #[test]
    fn targetref_policies_get_waypoint_accepted() {
        let idx = index(&format!(
            "{GW}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: bound, namespace: foo, labels: {{istio.io/use-waypoint: waypoint}}}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: plain, namespace: foo}}\n{}",
            ns("foo", &[]),
            [
                ("gw", "[{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]"),
                ("svc", "[{kind: Service, group: \"\", name: bound}]"),
                ("unbound", "[{kind: Service, group: \"\", name: plain}]"),
                ("missing", "[{kind: Gateway, group: gateway.networking.k8s.io, name: nope}]"),
                ("partly", "[{kind: Service, group: \"\", name: bound}, {kind: Service, group: \"\", name: plain}]"),
                ("class", "[{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]"),
            ]
            .iter()
            .map(|(n, refs)| format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {n}, namespace: foo}}\nspec: {{targetRefs: {refs}, rules: [{{}}]}}\n"))
            .collect::<String>()
        ));
        let got: BTreeMap<String, (String, String, String)> =
            policy_conditions(&idx, "istio-system", "cluster.local")
                .into_iter()
                .map(|c| (c.policy, (c.status.to_owned(), c.reason, c.message)))
                .collect();
        let r = |k: &str| got[&format!("foo/{k}")].clone();
        assert_eq!(
            r("gw"),
            (
                "True".into(),
                "Accepted".into(),
                "bound to foo/waypoint".into()
            )
        );
        assert_eq!(r("svc").1, "Accepted");
        assert_eq!(
            r("unbound"),
            (
                "False".into(),
                "AncestorNotBound".into(),
                "Service foo/plain is not bound to a waypoint".into()
            )
        );
        assert_eq!(r("missing").1, "TargetNotFound");
        assert_eq!(r("partly").1, "PartiallyInvalid");
        assert_eq!(r("class").1, "Invalid", "{:?}", r("class"));
        assert!(r("class").2.contains("root namespace"));
    }

    #[test]
    fn readiness_existence_and_cross_namespace_attachment() {
        let idx = index(&format!("{GW}{}", ns("bar", &[])));
        let r = |l: &[(&str, &str)], n: &str| {
            resolve(&idx, n, Some(&labels(l)), Target::Service, "cluster.local")
        };
        assert!(
            matches!(r(&[(USE_WAYPOINT, "pending")], "foo"), Binding::Refused(m) if m.contains("not ready"))
        );
        assert!(
            matches!(r(&[(USE_WAYPOINT, "nope")], "foo"), Binding::Refused(m) if m.contains("does not exist"))
        );
        // Same-namespace default refuses bar → foo/waypoint.
        assert!(matches!(
            r(&[(USE_WAYPOINT, "waypoint"), (USE_WAYPOINT_NAMESPACE, "foo")], "bar"),
            Binding::Refused(m) if m.contains("does not allow attachment")
        ));
        // from: All admits it, and an IP status address is used as is.
        let b = r(
            &[(USE_WAYPOINT, "shared"), (USE_WAYPOINT_NAMESPACE, "infra")],
            "bar",
        );
        assert_eq!(bound_to(&b), Some("infra/shared"));
    }
}
