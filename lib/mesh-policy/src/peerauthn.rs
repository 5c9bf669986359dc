//! PeerAuthentication in ambient: which one is effective for a workload and the DENY policies
//! istiod sends ztunnel for it (`pilot/pkg/serviceregistry/ambient/authorization.go`,
//! `convertedSelectorPeerAuthentications` and `convertPeerAuthentication`).
//!
//! STRICT becomes `<root>/istio_converted_static_strict` (DENY when the peer has no identity);
//! port-level settings become `<ns>/converted_peer_authentication_<name>`. PERMISSIVE and
//! DISABLE both accept plaintext (mTLS between ambient workloads cannot be turned off).

use std::collections::BTreeMap;

use mesh_core::policy::{Action, Authorization, Match, Rule, Scope, StringMatch};

use crate::mesh::{Condition, ConditionType, MeshConfig};
use crate::model::{MtlsMode, PeerAuthentication, PolicySet};

pub const STATIC_STRICT_NAME: &str = "istio_converted_static_strict";

fn not_presence() -> Match {
    Match {
        not_principals: vec![StringMatch::Presence],
        ..Default::default()
    }
}

/// `<root>/istio_converted_static_strict`.
pub fn static_strict(root_namespace: &str) -> Authorization {
    Authorization {
        name: STATIC_STRICT_NAME.into(),
        namespace: root_namespace.into(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules: vec![Rule {
            clauses: vec![vec![not_presence()]],
        }],
        dry_run: false,
    }
}

/// What PeerAuthentication contributes to one workload at ztunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective {
    /// The synthetic DENY policies attached to the workload.
    pub policies: Vec<Authorization>,
    /// `namespace/name` of the mesh, namespace and workload PeerAuthentication in effect.
    pub chosen: Vec<String>,
    pub notes: Vec<String>,
    /// `ZtunnelAccepted` on PeerAuthentications whose settings ambient does not honour.
    pub conditions: Vec<Condition>,
}

fn oldest<'a>(it: impl Iterator<Item = &'a PeerAuthentication>) -> Option<&'a PeerAuthentication> {
    let mut best: Option<&PeerAuthentication> = None;
    for p in it {
        let ts = p.meta.creation_timestamp.as_deref().unwrap_or("");
        let older = best.is_none_or(|b| ts < b.meta.creation_timestamp.as_deref().unwrap_or(""));
        if older {
            best = Some(p);
        }
    }
    best
}

fn strict(p: Option<&PeerAuthentication>) -> bool {
    p.is_some_and(|p| p.spec.mode() == MtlsMode::Strict)
}
fn unset(p: Option<&PeerAuthentication>) -> bool {
    p.is_none_or(|p| p.spec.mode() == MtlsMode::Unset)
}

/// `convertPeerAuthentication`: the port-level DENY policy for a workload PeerAuthentication.
fn convert(
    cfg: &PeerAuthentication,
    ns_cfg: Option<&PeerAuthentication>,
    root_cfg: Option<&PeerAuthentication>,
    root_namespace: &str,
) -> Option<Authorization> {
    let ports = cfg.spec.port_level_mtls.as_ref()?;
    if cfg.meta.namespace() == root_namespace || cfg.spec.selector.is_none() || ports.is_empty() {
        return None;
    }
    let mode = cfg.spec.mode();
    let mut clauses: Vec<Vec<Match>> = Vec::new();
    let mut groups: Vec<Rule> = Vec::new();
    if mode == MtlsMode::Strict {
        clauses.push(vec![not_presence()]);
    }
    let mut found_non_strict = false;
    let this = Some(cfg);
    for (&port, m) in ports {
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        match m.mode {
            MtlsMode::Strict => {
                let parent_strict = strict(this)
                    || (unset(this) && ns_cfg.is_some() && strict(ns_cfg))
                    || (unset(this) && unset(ns_cfg) && strict(root_cfg));
                if parent_strict {
                    continue;
                }
                groups.push(Rule {
                    clauses: vec![vec![Match {
                        not_principals: vec![StringMatch::Presence],
                        destination_ports: vec![port],
                        ..Default::default()
                    }]],
                });
            }
            MtlsMode::Permissive | MtlsMode::Disable => {
                if matches!(mode, MtlsMode::Permissive | MtlsMode::Disable) {
                    continue;
                }
                if mode == MtlsMode::Unset
                    && ((ns_cfg.is_some() && !strict(ns_cfg))
                        || (ns_cfg.is_none() && root_cfg.is_some() && !strict(root_cfg))
                        || (ns_cfg.is_none() && root_cfg.is_none()))
                {
                    continue;
                }
                found_non_strict = true;
                clauses.push(vec![Match {
                    not_destination_ports: vec![port],
                    ..Default::default()
                }]);
            }
            MtlsMode::Unset => {}
        }
    }
    if mode == MtlsMode::Strict && !found_non_strict {
        return None;
    }
    if clauses.is_empty() && groups.is_empty() {
        return None;
    }
    let merge_strict = (strict(root_cfg) && (ns_cfg.is_none() || unset(ns_cfg) || strict(ns_cfg)))
        || strict(ns_cfg);
    if merge_strict && found_non_strict {
        clauses.push(vec![not_presence()]);
    }
    if !clauses.is_empty() {
        groups.push(Rule { clauses });
    }
    Some(Authorization {
        name: format!("converted_peer_authentication_{}", cfg.meta.name),
        namespace: cfg.meta.namespace().to_string(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        rules: groups,
        dry_run: false,
    })
}

/// The PeerAuthentication-derived policies ztunnel applies to a workload.
pub fn for_workload(
    set: &PolicySet,
    mesh: &MeshConfig,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> Effective {
    let root = mesh.root_namespace.as_str();
    let pas = &set.peer_authentications;
    let mesh_cfg = oldest(
        pas.iter()
            .filter(|p| p.meta.namespace() == root && !p.spec.has_selector_labels()),
    );
    let ns_cfg = oldest(pas.iter().filter(|p| {
        p.meta.namespace() == namespace && namespace != root && !p.spec.has_selector_labels()
    }));
    let wl_cfg = oldest(pas.iter().filter(|p| {
        p.meta.namespace() == namespace
            && namespace != root
            && p.spec.has_selector_labels()
            && p.spec.selector.as_ref().is_some_and(|s| s.matches(labels))
    }));
    let mut eff = Effective::default();
    for p in [mesh_cfg, ns_cfg, wl_cfg].into_iter().flatten() {
        eff.chosen.push(p.key());
        if p.spec.mode() == MtlsMode::Disable {
            eff.notes.push(format!(
                "PeerAuthentication {}: DISABLE acts like PERMISSIVE in ambient (plaintext is accepted; mTLS between ambient workloads cannot be turned off)",
                p.key()
            ));
        }
    }

    let mut is_strict = strict(mesh_cfg);
    if let Some(n) = ns_cfg.filter(|n| n.spec.mode() != MtlsMode::Unset) {
        is_strict = n.spec.mode() == MtlsMode::Strict;
    }
    let mut port_policy = false;
    if let Some(w) = wl_cfg {
        match w.spec.mode() {
            MtlsMode::Strict => is_strict = true,
            MtlsMode::Permissive | MtlsMode::Disable => is_strict = false,
            MtlsMode::Unset => {}
        }
        if let Some(ports) = &w.spec.port_level_mtls {
            let any = |f: &dyn Fn(MtlsMode) -> bool| ports.values().any(|m| f(m.mode));
            match w.spec.mode() {
                MtlsMode::Strict => {
                    if any(&|m| matches!(m, MtlsMode::Permissive | MtlsMode::Disable)) {
                        port_policy = true;
                        is_strict = false;
                    }
                }
                MtlsMode::Permissive | MtlsMode::Disable => {
                    port_policy = any(&|m| m == MtlsMode::Strict);
                }
                MtlsMode::Unset => {
                    if is_strict {
                        if any(&|m| m == MtlsMode::Permissive) {
                            port_policy = true;
                            is_strict = false;
                        } else if any(&|m| m == MtlsMode::Disable) {
                            let disabled: Vec<String> = ports
                                .iter()
                                .filter(|(_, m)| m.mode == MtlsMode::Disable)
                                .map(|(p, _)| p.to_string())
                                .collect();
                            eff.conditions.push(
                                Condition::new(
                                    &w.key(),
                                    ConditionType::ZtunnelAccepted,
                                    false,
                                    "UnsupportedValue",
                                    format!(
                                        "portLevelMtls DISABLE for port(s) {} is ignored in ambient under an inherited STRICT mode; use PERMISSIVE",
                                        disabled.join(", ")
                                    ),
                                )
                                .of_kind("PeerAuthentication"),
                            );
                            eff.notes.push(format!(
                                "PeerAuthentication {}: mode UNSET under an inherited STRICT honours only PERMISSIVE port exceptions in ambient, so the DISABLE exception for port(s) {} is ignored and plaintext there is still denied (Istio quirk, copied; use mode PERMISSIVE on the port)",
                                w.key(),
                                disabled.join(", ")
                            ));
                        }
                    } else {
                        port_policy = any(&|m| m == MtlsMode::Strict);
                    }
                }
            }
        }
    }
    if is_strict {
        eff.policies.push(static_strict(root));
    }
    if let Some(a) = wl_cfg
        .filter(|_| port_policy)
        .and_then(|w| convert(w, ns_cfg, mesh_cfg, root))
    {
        eff.policies.push(a);
    }
    eff
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_objects;
    use mesh_core::policy::{Connection, evaluate};

    fn pas(docs: &[(&str, &str, &str)]) -> PolicySet {
        let text = docs
            .iter()
            .enumerate()
            .map(|(i, (ns, name, spec))| {
                format!(
                    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"2026-01-0{}T00:00:00Z\"}}\nspec:\n{spec}\n",
                    i + 1
                )
            })
            .collect::<Vec<_>>()
            .join("---\n");
        parse_objects("t.yaml", &text).unwrap()
    }

    fn allowed(set: &PolicySet, port: u16, mtls: bool) -> bool {
        let labels = BTreeMap::from([("app".to_string(), "a".to_string())]);
        let eff = for_workload(set, &MeshConfig::default(), "foo", &labels);
        let conn = Connection {
            src: "10.0.0.1:4000".parse().unwrap(),
            dst: format!("10.0.0.2:{port}").parse().unwrap(),
            src_identity: mtls.then(|| "spiffe://cluster.local/ns/bar/sa/x".parse().unwrap()),
        };
        evaluate(&eff.policies, &conn).allowed
    }

    const SEL: &str = "  selector: {matchLabels: {app: a}}\n";

    // authz-semantics.md §9.1-9.3; istio/istio tests/integration/ambient/baseline_test.go
    // TestPeerAuthentication; authorization_test.go (TestConvertPeerAuthentication).
    #[test]
    fn modes_and_precedence() {
        let none = PolicySet::default();
        assert!(allowed(&none, 80, false), "default PERMISSIVE");
        let mesh_strict = pas(&[("istio-system", "m", "  mtls: {mode: STRICT}")]);
        assert!(!allowed(&mesh_strict, 80, false));
        assert!(allowed(&mesh_strict, 80, true), "STRICT still admits mTLS");
        let ns_overrides = pas(&[
            ("istio-system", "m", "  mtls: {mode: STRICT}"),
            ("foo", "n", "  mtls: {mode: PERMISSIVE}"),
        ]);
        assert!(allowed(&ns_overrides, 80, false));
        let ns_unset_inherits = pas(&[
            ("istio-system", "m", "  mtls: {mode: STRICT}"),
            ("foo", "n", "  mtls: {mode: UNSET}"),
        ]);
        assert!(!allowed(&ns_unset_inherits, 80, false));
        let disable = pas(&[("foo", "n", "  mtls: {mode: DISABLE}")]);
        assert!(allowed(&disable, 80, false) && allowed(&disable, 80, true));
        let wl = pas(&[
            ("foo", "n", "  mtls: {mode: STRICT}"),
            ("foo", "w", &format!("{SEL}  mtls: {{mode: PERMISSIVE}}")),
        ]);
        assert!(allowed(&wl, 80, false), "workload PERMISSIVE overrides");
        let root_selector_ignored = pas(&[(
            "istio-system",
            "r",
            &format!("{SEL}  mtls: {{mode: STRICT}}"),
        )]);
        assert!(allowed(&root_selector_ignored, 80, false));
    }

    #[test]
    fn oldest_wins_per_level() {
        let set = pas(&[
            ("foo", "old", "  mtls: {mode: STRICT}"),
            ("foo", "new", "  mtls: {mode: PERMISSIVE}"),
        ]);
        assert!(!allowed(&set, 80, false));
        let eff = for_workload(&set, &MeshConfig::default(), "foo", &BTreeMap::new());
        assert_eq!(eff.chosen, vec!["foo/old"]);
    }

    #[test]
    fn port_level() {
        let strict_with_exception = pas(&[(
            "foo",
            "w",
            &format!(
                "{SEL}  mtls: {{mode: STRICT}}\n  portLevelMtls: {{8080: {{mode: PERMISSIVE}}}}"
            ),
        )]);
        assert!(allowed(&strict_with_exception, 8080, false));
        assert!(!allowed(&strict_with_exception, 9090, false));
        let permissive_with_strict_port = pas(&[(
            "foo",
            "w",
            &format!(
                "{SEL}  mtls: {{mode: PERMISSIVE}}\n  portLevelMtls: {{8080: {{mode: STRICT}}}}"
            ),
        )]);
        assert!(!allowed(&permissive_with_strict_port, 8080, false));
        assert!(allowed(&permissive_with_strict_port, 9090, false));
        let inherited_permissive_port = pas(&[
            ("foo", "n", "  mtls: {mode: STRICT}"),
            (
                "foo",
                "w",
                &format!("{SEL}  portLevelMtls: {{8080: {{mode: PERMISSIVE}}}}"),
            ),
        ]);
        assert!(allowed(&inherited_permissive_port, 8080, false));
        assert!(!allowed(&inherited_permissive_port, 9090, false));
        let labels = BTreeMap::from([("app".to_string(), "a".to_string())]);
        let eff = for_workload(
            &inherited_permissive_port,
            &MeshConfig::default(),
            "foo",
            &labels,
        );
        assert_eq!(eff.policies.len(), 1, "static strict is elided when merged");
        assert_eq!(eff.policies[0].name, "converted_peer_authentication_w");
    }

    // The last example of peer_authentication.proto: UNSET + DISABLE port under inherited
    // STRICT. authz-semantics.md §9.3 quirk: the exception is ignored in ambient.
    #[test]
    fn unset_with_disable_port_under_strict_quirk() {
        let set = pas(&[
            ("foo", "n", "  mtls: {mode: STRICT}"),
            (
                "foo",
                "w",
                &format!("{SEL}  portLevelMtls: {{8080: {{mode: DISABLE}}}}"),
            ),
        ]);
        assert!(!allowed(&set, 8080, false));
        let labels = BTreeMap::from([("app".to_string(), "a".to_string())]);
        let eff = for_workload(&set, &MeshConfig::default(), "foo", &labels);
        assert!(eff.notes.iter().any(|n| n.contains("DISABLE exception")));
        assert_eq!(eff.policies, vec![static_strict("istio-system")]);
    }
}
