//! What the control plane sends ztunnel for security policy, as istiod's ambient index does
//! (`pilot/pkg/serviceregistry/ambient/authorization.go`, `policies.go`, `workloads.go`):
//! the `istio.security.Authorization` resources (named `namespace/name`) and, per workload,
//! the keys of the selector-scoped ones it references (`Workload.authorization_policies`).
//!
//! GLOBAL and NAMESPACE policies are not listed per workload; ztunnel finds them by scope.

use std::collections::BTreeMap;

use mesh_core::policy::{Authorization, Scope};

use crate::{
    l4,
    mesh::{Condition, MeshConfig},
    model::PolicySet,
    peerauthn, scope,
};

/// Every Authorization resource of the set, plus the status of each converted policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// Sorted by `namespace/name`.
    pub authorizations: Vec<Authorization>,
    pub conditions: Vec<Condition>,
}

/// The resources istiod would push. The static STRICT policy is sent whenever any
/// PeerAuthentication exists; a converted port-level policy for every workload
/// PeerAuthentication whose port settings change the result.
pub fn resources(set: &PolicySet, mesh: &MeshConfig) -> Resources {
    let mut out = Resources::default();
    for p in &set.authorization_policies {
        let c = l4::convert(p, mesh);
        out.conditions.extend(c.status);
        if let Some(lp) = c.policy {
            out.authorizations.push(lp.authorization);
        }
    }
    if !set.peer_authentications.is_empty() {
        out.authorizations
            .push(peerauthn::static_strict(&mesh.root_namespace));
    }
    for pa in set
        .peer_authentications
        .iter()
        .filter(|p| p.spec.has_selector_labels() && p.spec.port_level_mtls.is_some())
    {
        // The workload's own view decides; any workload it selects has its labels.
        let labels = pa
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .unwrap_or_default();
        let eff = peerauthn::for_workload(set, mesh, pa.meta.namespace(), &labels);
        for a in eff.policies {
            if a.name != peerauthn::STATIC_STRICT_NAME && !out.authorizations.contains(&a) {
                out.authorizations.push(a);
            }
        }
    }
    out.authorizations.sort_by_key(|a| a.key());
    out.authorizations.dedup_by_key(|a| a.key());
    out
}

/// `Workload.authorization_policies` for a workload: selector-matched policies, the
/// PeerAuthentication-derived ones, and (with `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`) the
/// waypoint allow policy `istio_allow_waypoint_<ns>_<name>` when `waypoint` is
/// `(namespace, name)` of the waypoint the workload (or its Service) is bound to.
///
/// `converted` is [`resources`] of the same set: policies are converted once per set, not
/// once per workload.
pub fn workload_policy_keys(
    set: &PolicySet,
    mesh: &MeshConfig,
    converted: &Resources,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    waypoint: Option<(&str, &str)>,
) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let (ps, _, _) = scope::ztunnel_policies(set, mesh, namespace, labels);
    for (p, _) in ps {
        let key = p.key();
        let selector_scoped = converted
            .authorizations
            .binary_search_by(|a| a.key().cmp(&key))
            .is_ok_and(|i| converted.authorizations[i].scope == Scope::WorkloadSelector);
        if selector_scoped {
            keys.push(key);
        }
    }
    for a in peerauthn::for_workload(set, mesh, namespace, labels).policies {
        keys.push(a.key());
    }
    if let Some((ns, name)) = waypoint.filter(|_| mesh.feature_flags.auto_allow_waypoint_policy) {
        keys.push(format!("{ns}/istio_allow_waypoint_{ns}_{name}"));
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Whether ztunnel refuses plaintext on every port of the workload (effective STRICT with no
/// port exception).
pub fn denies_all_plaintext(
    set: &PolicySet,
    mesh: &MeshConfig,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    peerauthn::for_workload(set, mesh, namespace, labels)
        .policies
        .iter()
        .any(|a| a.name == peerauthn::STATIC_STRICT_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_objects;

    const SET: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: sel, namespace: foo}
spec: {selector: {matchLabels: {app: a}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ns-wide, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [x]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: wp, namespace: foo}
spec: {targetRefs: [{kind: Service, name: s}], rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: foo}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: w, namespace: foo}
spec:
  selector: {matchLabels: {app: a}}
  mtls: {mode: STRICT}
  portLevelMtls: {8080: {mode: PERMISSIVE}}
";

    // istio/istio pilot/pkg/serviceregistry/ambient/ambientindex_test.go (policies pushed and
    // referenced by workloads).
    #[test]
    fn resources_and_workload_keys() {
        let set = parse_objects("t.yaml", SET).unwrap();
        let mesh = MeshConfig::default();
        let r = resources(&set, &mesh);
        let keys: Vec<String> = r.authorizations.iter().map(|a| a.key()).collect();
        assert_eq!(
            keys,
            vec![
                "foo/converted_peer_authentication_w",
                "foo/ns-wide",
                "foo/sel",
                "istio-system/istio_converted_static_strict"
            ]
        );
        assert!(r.conditions.iter().any(|c| c.policy == "foo/audit"));
        let labels = BTreeMap::from([("app".to_string(), "a".to_string())]);
        assert_eq!(
            workload_policy_keys(&set, &mesh, &r, "foo", &labels, Some(("foo", "waypoint"))),
            vec!["foo/converted_peer_authentication_w", "foo/sel"]
        );
        let mut flagged = mesh.clone();
        flagged.feature_flags.auto_allow_waypoint_policy = true;
        assert!(
            workload_policy_keys(
                &set,
                &flagged,
                &resources(&set, &flagged),
                "foo",
                &labels,
                Some(("foo", "waypoint"))
            )
            .contains(&"foo/istio_allow_waypoint_foo_waypoint".to_string())
        );
        assert!(!denies_all_plaintext(&set, &mesh, "foo", &labels));
        assert!(!denies_all_plaintext(&set, &mesh, "foo", &BTreeMap::new()));
    }
}
