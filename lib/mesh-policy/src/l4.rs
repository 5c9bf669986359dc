//! AuthorizationPolicy -> `mesh_core::policy::Authorization` (the form xDS carries to ztunnel),
//! exactly as istiod converts it (`pilot/pkg/serviceregistry/ambient/authorization.go`,
//! `convertAuthorizationPolicy` + `handleRule`), with its `ZtunnelAccepted` status.
//!
//! Quirks are copied by default and each one is explained in `notes`:
//! - ALLOW: a rule with any HTTP attribute is dropped (more restrictive);
//! - DENY: HTTP attributes are stripped; an element made only of them becomes an empty match,
//!   which ztunnel skips, so the rule can become a no-op (less restrictive);
//! - `trustDomains`/`notTrustDomains` are dropped without a flag;
//! - AUDIT/CUSTOM are not sent; dry-run is not sent unless the flag is on.
//!
//! With `strictPolicy: true` every rule Istio would silently weaken fails closed instead: a
//! DENY clause that lost an element matches everything (as Envoy's TCP filter does), an ALLOW
//! rule with `trustDomains` is dropped, and a CUSTOM policy denies everything.

use std::collections::BTreeSet;

use ipnet::IpNet;
use mesh_core::policy::{
    Action as L4Action, Authorization, Clause, Match, Rule as L4Rule, Scope, ServiceAccountMatch,
};

use crate::matcher::to_string_match;
use crate::mesh::{Condition, ConditionType, MeshConfig};
use crate::model::{Action, AuthorizationPolicy, L4_WHEN_KEYS, Operation, Rule, Source};

/// An Authorization plus, for each of its rules, the index of the user's rule it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4Policy {
    pub authorization: Authorization,
    pub rule_map: Vec<usize>,
}

impl L4Policy {
    /// Maps a rule index of the converted policy back to the user's rule index.
    pub fn source_rule(&self, converted: usize) -> usize {
        self.rule_map.get(converted).copied().unwrap_or(converted)
    }
}

/// The result of converting one policy for ztunnel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct L4Conversion {
    /// `None`: not sent to ztunnel (targetRefs, AUDIT/CUSTOM, unflagged dry-run).
    pub policy: Option<L4Policy>,
    /// `ZtunnelAccepted` (absent for targetRefs policies, which are not for ztunnel).
    pub status: Option<Condition>,
    /// One sentence per silent behaviour, naming the rule and what ztunnel does instead.
    pub notes: Vec<String>,
}

pub const HTTP_FMT_PREFIX: &str = "ztunnel does not support HTTP attributes (found: ";
pub const HTTP_DENY_BOILERPLATE: &str = "DENY policy with HTTP attributes is enforced without the HTTP rules. This will be more restrictive than requested.";
pub const HTTP_DENY_NOOP_BOILERPLATE: &str = "After omitting unsupported HTTP attributes, this DENY policy has no enforceable rules at ztunnel and will have no effect. Deploy a waypoint proxy and use a targetRef to enforce this policy.";
/// Ours: istiod writes no status for this (authz-semantics.md §7.4).
pub const TRUST_DOMAINS_DROPPED: &str = "ztunnel does not support trustDomains/notTrustDomains; they are ignored at ztunnel (as istiod does), so rules using them match regardless of the trust domain. Use a waypoint with targetRefs to enforce them, or set strictPolicy: true.";
pub const TRUST_DOMAINS_STRICT: &str = "ztunnel does not support trustDomains/notTrustDomains; strictPolicy: ALLOW rules using them are omitted and DENY elements using only them match everything.";
pub const HTTP_ALLOW_BOILERPLATE: &str = "Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be more restrictive than requested.";

fn ports(v: &[String]) -> Vec<u16> {
    v.iter().filter_map(|p| p.parse::<u16>().ok()).collect()
}

fn ips(v: &[String]) -> Vec<IpNet> {
    v.iter()
        .filter_map(|s| {
            if s.contains('/') {
                s.parse::<IpNet>().ok()
            } else {
                s.parse::<std::net::IpAddr>().ok().map(IpNet::from)
            }
        })
        .collect()
}

fn string_matches(v: &[String]) -> Vec<mesh_core::policy::StringMatch> {
    v.iter().map(|s| to_string_match(s)).collect()
}

fn service_accounts(v: &[String], ns: &str) -> Vec<ServiceAccountMatch> {
    v.iter()
        .map(|s| match s.split_once('/') {
            Some((n, sa)) => ServiceAccountMatch {
                namespace: n.to_string(),
                service_account: sa.to_string(),
            },
            None => ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: s.to_string(),
            },
        })
        .collect()
}

fn to_match(op: &Operation) -> Match {
    Match {
        destination_ports: ports(&op.ports),
        not_destination_ports: ports(&op.not_ports),
        ..Default::default()
    }
}

fn from_match(src: &Source, ns: &str) -> Match {
    Match {
        source_ips: ips(&src.ip_blocks),
        not_source_ips: ips(&src.not_ip_blocks),
        namespaces: string_matches(&src.namespaces),
        not_namespaces: string_matches(&src.not_namespaces),
        service_accounts: service_accounts(&src.service_accounts, ns),
        not_service_accounts: service_accounts(&src.not_service_accounts, ns),
        principals: string_matches(&src.principals),
        not_principals: string_matches(&src.not_principals),
        ..Default::default()
    }
}

fn when_match(key: &str, values: &[String], not_values: &[String]) -> Match {
    let mut m = Match::default();
    match key {
        "source.namespace" => {
            m.namespaces = string_matches(values);
            m.not_namespaces = string_matches(not_values);
        }
        "source.principal" => {
            m.principals = string_matches(values);
            m.not_principals = string_matches(not_values);
        }
        "source.ip" => {
            m.source_ips = ips(values);
            m.not_source_ips = ips(not_values);
        }
        "destination.port" => {
            m.destination_ports = ports(values);
            m.not_destination_ports = ports(not_values);
        }
        "destination.ip" => {
            m.destination_ips = ips(values);
            m.not_destination_ips = ips(not_values);
        }
        _ => {}
    }
    m
}

/// One clause plus, per match, whether the user's element lost attributes ztunnel cannot see.
struct ClauseBuild {
    name: &'static str,
    clause: Clause,
    lossy: Vec<bool>,
}

struct RuleBuild {
    clauses: Vec<ClauseBuild>,
    http: BTreeSet<String>,
    trust_domains: bool,
}

/// `handleRule` without the ALLOW drop (the caller decides).
fn handle_rule(rule: &Rule, ns: &str) -> RuleBuild {
    let mut http = BTreeSet::new();
    let mut trust_domains = false;
    let mut clauses = Vec::new();
    if let Some(to) = &rule.to {
        let mut c = ClauseBuild {
            name: "to",
            clause: Vec::new(),
            lossy: Vec::new(),
        };
        for t in to {
            let op = t.operation.clone().unwrap_or_default();
            let problems = op.http_fields();
            http.extend(problems.iter().map(|s| s.to_string()));
            c.clause.push(to_match(&op));
            c.lossy.push(!problems.is_empty());
        }
        if !c.clause.is_empty() {
            clauses.push(c);
        }
    }
    if let Some(from) = &rule.from {
        let mut c = ClauseBuild {
            name: "from",
            clause: Vec::new(),
            lossy: Vec::new(),
        };
        for f in from {
            let src = f.source.clone().unwrap_or_default();
            let problems = src.http_fields();
            http.extend(problems.iter().map(|s| s.to_string()));
            trust_domains |= src.has_trust_domains();
            c.clause.push(from_match(&src, ns));
            c.lossy
                .push(!problems.is_empty() || src.has_trust_domains());
        }
        if !c.clause.is_empty() {
            clauses.push(c);
        }
    }
    for w in rule.when.iter().flatten() {
        let l4 = L4_WHEN_KEYS.contains(&w.key.as_str());
        if !l4 {
            http.insert(w.key.clone());
        }
        clauses.push(ClauseBuild {
            name: "when",
            clause: vec![when_match(&w.key, &w.values, &w.not_values)],
            lossy: vec![!l4],
        });
    }
    RuleBuild {
        clauses,
        http,
        trust_domains,
    }
}

fn is_empty_match(m: &Match) -> bool {
    *m == Match::default()
}

/// Converts one AuthorizationPolicy for ztunnel.
pub fn convert(p: &AuthorizationPolicy, mesh: &MeshConfig) -> L4Conversion {
    let key = p.key();
    let ns = p.namespace();
    let mut out = L4Conversion::default();
    if !p.spec.all_target_refs().is_empty() {
        return out;
    }
    let zt = |ok: bool, reason: &str, msg: String| {
        Some(Condition::new(
            &key,
            ConditionType::ZtunnelAccepted,
            ok,
            reason,
            msg,
        ))
    };
    let scope = match (&p.spec.selector, ns == mesh.root_namespace) {
        (Some(_), _) => Scope::WorkloadSelector,
        (None, true) => Scope::Global,
        (None, false) => Scope::Namespace,
    };
    let action = match p.spec.action {
        Action::Allow => L4Action::Allow,
        Action::Deny => L4Action::Deny,
        other => {
            out.status = zt(
                false,
                "UnsupportedValue",
                format!("ztunnel does not support the {other} action"),
            );
            if other == Action::Custom && mesh.strict_policy {
                out.policy = Some(L4Policy {
                    authorization: Authorization {
                        name: p.meta.name.clone(),
                        namespace: ns.to_string(),
                        scope,
                        action: L4Action::Deny,
                        rules: vec![L4Rule::default()],
                        dry_run: false,
                    },
                    rule_map: vec![0],
                });
                out.notes.push(format!(
                    "{key}: strictPolicy: CUSTOM cannot be enforced by ztunnel, so it fails closed and denies every connection to the workloads it selects (Istio would not enforce it at all)"
                ));
            } else if other == Action::Custom {
                out.notes.push(format!(
                    "{key}: ztunnel does not enforce CUSTOM policies; this policy has no effect on the workloads it selects (attach it to a waypoint with targetRefs, or set strictPolicy: true to fail closed)"
                ));
            } else {
                out.notes.push(format!(
                    "{key}: ztunnel does not enforce AUDIT policies (they never change a decision)"
                ));
            }
            return out;
        }
    };
    let dry_run = p.dry_run();
    if dry_run && !mesh.feature_flags.ambient_dry_run {
        out.status = zt(
            false,
            "UnsupportedValue",
            "dry-run policies are not sent to ztunnel unless istiod runs with AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY=true".into(),
        );
        out.notes.push(format!(
            "{key}: dry-run policy is not sent to ztunnel (AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY is off), so it is neither enforced nor logged"
        ));
        return out;
    }

    let mut auth = Authorization {
        name: p.meta.name.clone(),
        namespace: ns.to_string(),
        scope,
        action,
        rules: Vec::new(),
        dry_run,
    };
    let mut rule_map = Vec::new();
    let mut found_http: BTreeSet<String> = BTreeSet::new();
    let mut effective_rules = 0usize;
    for (i, rule) in p.spec.rules().iter().enumerate() {
        let b = handle_rule(rule, ns);
        found_http.extend(b.http.iter().cloned());
        let attrs = b.http.iter().cloned().collect::<Vec<_>>().join(", ");
        let flagged = !b.http.is_empty();
        if action == L4Action::Allow {
            if flagged {
                out.notes.push(format!(
                    "{key} rule {i}: omitted at ztunnel because it uses HTTP attributes ({attrs}); it allows nothing there"
                ));
                continue;
            }
            if b.trust_domains {
                if mesh.strict_policy {
                    out.notes.push(format!(
                        "{key} rule {i}: strictPolicy: trustDomains cannot be enforced by ztunnel, so the rule is omitted (fails closed) instead of being silently broadened"
                    ));
                    continue;
                }
                out.notes.push(format!(
                    "{key} rule {i}: trustDomains/notTrustDomains are silently dropped by istiod's ztunnel conversion, so this ALLOW rule ignores the trust domain (broader than written; an element with only trustDomains matches nothing)"
                ));
            }
        }
        let mut clauses: Vec<Clause> = Vec::new();
        let mut noop_clause: Option<&'static str> = None;
        for c in b.clauses {
            let all_empty = c.clause.iter().all(is_empty_match);
            let lost = c
                .clause
                .iter()
                .zip(&c.lossy)
                .any(|(m, l)| *l && is_empty_match(m));
            if action == L4Action::Deny && lost && mesh.strict_policy {
                out.notes.push(format!(
                    "{key} rule {i}: strictPolicy: the `{}` part uses only attributes ztunnel cannot see, so it is treated as matching (fails closed, as Envoy's TCP filter does)",
                    c.name
                ));
                continue;
            }
            if action == L4Action::Deny && all_empty {
                noop_clause.get_or_insert(c.name);
            } else if action == L4Action::Deny && lost {
                out.notes.push(format!(
                    "{key} rule {i}: the `{}` alternatives made only of attributes ztunnel cannot see are dropped; only the remaining ones are denied at ztunnel",
                    c.name
                ));
            } else if action == L4Action::Deny && c.lossy.iter().any(|l| *l) {
                out.notes.push(format!(
                    "{key} rule {i}: the attributes ztunnel cannot see are stripped from `{}`, so the rule denies more than written",
                    c.name
                ));
            }
            clauses.push(c.clause);
        }
        if let Some(part) = noop_clause {
            let why = if b.http.is_empty() {
                "trustDomains (dropped by istiod's conversion)".to_string()
            } else {
                attrs.clone()
            };
            out.notes.push(format!(
                "{key} rule {i}: DENY rule is a no-op at ztunnel: its `{part}` uses only attributes ztunnel cannot see ({why}), which become an empty match that never matches (Envoy would deny all TCP traffic instead); set strictPolicy: true to fail closed"
            ));
        } else {
            effective_rules += 1;
        }
        if action == L4Action::Deny
            && b.trust_domains
            && !mesh.strict_policy
            && noop_clause.is_none()
        {
            out.notes.push(format!(
                "{key} rule {i}: trustDomains/notTrustDomains are silently dropped by istiod's ztunnel conversion; this DENY rule ignores the trust domain"
            ));
        }
        auth.rules.push(L4Rule { clauses });
        rule_map.push(i);
    }
    if action == L4Action::Allow && auth.rules.is_empty() && !p.spec.rules().is_empty() {
        out.notes.push(format!(
            "{key}: no rule is left at ztunnel, so this ALLOW policy allows nothing and every connection to the workloads it selects is denied"
        ));
    }
    let td_used = p.spec.rules().iter().any(|r| {
        r.from
            .iter()
            .flatten()
            .any(|f| f.source.as_ref().is_some_and(|s| s.has_trust_domains()))
    });
    let td_msg = if mesh.strict_policy {
        TRUST_DOMAINS_STRICT
    } else {
        TRUST_DOMAINS_DROPPED
    };
    out.status = if found_http.is_empty() && td_used {
        zt(false, "UnsupportedValue", td_msg.into())
    } else if found_http.is_empty() {
        zt(true, "Accepted", "attached to ztunnel".into())
    } else {
        let boilerplate = match action {
            L4Action::Allow => HTTP_ALLOW_BOILERPLATE,
            L4Action::Deny if effective_rules == 0 => HTTP_DENY_NOOP_BOILERPLATE,
            L4Action::Deny => HTTP_DENY_BOILERPLATE,
        };
        let found = found_http.into_iter().collect::<Vec<_>>().join(", ");
        let td = if td_used {
            format!(" {td_msg}")
        } else {
            String::new()
        };
        zt(
            false,
            "UnsupportedValue",
            format!(
                "{HTTP_FMT_PREFIX}{found}). In ambient mode you must use a waypoint proxy to enforce HTTP rules. {boilerplate}{td}"
            ),
        )
    };
    out.policy = Some(L4Policy {
        authorization: auth,
        rule_map,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_objects;
    use mesh_core::policy::StringMatch;

    fn conv(spec: &str, mesh: &MeshConfig) -> L4Conversion {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n{spec}"
        );
        let set = parse_objects("t.yaml", &text).unwrap();
        convert(&set.authorization_policies[0], mesh)
    }

    fn auth(spec: &str) -> Authorization {
        conv(spec, &MeshConfig::default())
            .policy
            .unwrap()
            .authorization
    }

    // istio/istio pilot/pkg/serviceregistry/ambient/authorization_test.go (TestConvertAuthorizationPolicy)
    #[test]
    fn scope_and_wire_shape() {
        let a = auth(
            "  selector: {matchLabels: {app: a}}\n  rules:\n  - from: [{source: {principals: [\"cluster.local/ns/bar/*\"], serviceAccounts: []}}, {source: {namespaces: [\"*\"]}}]\n    to: [{operation: {ports: [\"8080\"], notPorts: [\"9090\"]}}]\n    when: [{key: source.ip, values: [10.0.0.1], notValues: [10.0.0.0/8]}]\n",
        );
        assert_eq!(a.scope, Scope::WorkloadSelector);
        assert_eq!(a.action, L4Action::Allow);
        let r = &a.rules[0];
        assert_eq!(r.clauses.len(), 3);
        assert_eq!(r.clauses[0][0].destination_ports, vec![8080]);
        assert_eq!(r.clauses[0][0].not_destination_ports, vec![9090]);
        assert_eq!(
            r.clauses[1][0].principals,
            vec![StringMatch::Prefix("cluster.local/ns/bar/".into())]
        );
        assert_eq!(r.clauses[1][1].namespaces, vec![StringMatch::Presence]);
        assert_eq!(
            r.clauses[2][0].source_ips,
            vec!["10.0.0.1/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            r.clauses[2][0].not_source_ips,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        let g = conv("  rules: [{}]\n", &MeshConfig::default());
        assert_eq!(g.policy.unwrap().authorization.scope, Scope::Namespace);
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: g, namespace: istio-system}\nspec: {}\n";
        let set = parse_objects("t.yaml", text).unwrap();
        let c = convert(&set.authorization_policies[0], &MeshConfig::default());
        let a = c.policy.unwrap().authorization;
        assert_eq!(a.scope, Scope::Global);
        assert!(a.rules.is_empty(), "allow-nothing has no rules");
    }

    // authorization.go stringToServiceAccountMatch: a bare name takes the policy's namespace.
    #[test]
    fn service_accounts_default_to_policy_namespace() {
        let a = auth("  rules: [{from: [{source: {serviceAccounts: [sleep, bar/curl]}}]}]\n");
        assert_eq!(
            a.rules[0].clauses[0][0].service_accounts,
            vec![
                ServiceAccountMatch {
                    namespace: "foo".into(),
                    service_account: "sleep".into()
                },
                ServiceAccountMatch {
                    namespace: "bar".into(),
                    service_account: "curl".into()
                }
            ]
        );
    }

    // authz-semantics.md §7 table; istio/istio authorization_test.go "L7 rules" cases.
    #[test]
    fn allow_drops_http_rules_and_reports_status() {
        let c = conv(
            "  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {principals: [a]}}]\n",
            &MeshConfig::default(),
        );
        let p = c.policy.unwrap();
        assert_eq!(p.authorization.rules.len(), 1);
        assert_eq!(p.rule_map, vec![1]);
        let st = c.status.unwrap();
        assert_eq!(st.reason, "UnsupportedValue");
        assert_eq!(
            st.message,
            format!(
                "ztunnel does not support HTTP attributes (found: methods). In ambient mode you must use a waypoint proxy to enforce HTTP rules. {HTTP_ALLOW_BOILERPLATE}"
            )
        );
    }

    #[test]
    fn deny_http_only_is_noop_and_status_says_so() {
        let c = conv(
            "  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n",
            &MeshConfig::default(),
        );
        let a = c.policy.unwrap().authorization;
        assert_eq!(a.rules[0].clauses, vec![vec![Match::default()]]);
        assert!(
            c.status
                .unwrap()
                .message
                .ends_with(HTTP_DENY_NOOP_BOILERPLATE)
        );
        assert!(c.notes.iter().any(|n| n.contains("no-op")));
        // Mixed HTTP + L4 in one element: broader.
        let c = conv(
            "  action: DENY\n  rules: [{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]\n",
            &MeshConfig::default(),
        );
        assert_eq!(
            c.policy.unwrap().authorization.rules[0].clauses[0][0].destination_ports,
            vec![8080]
        );
        assert!(c.status.unwrap().message.ends_with(HTTP_DENY_BOILERPLATE));
    }

    #[test]
    fn when_keys_outside_the_l4_list_are_http() {
        let c = conv(
            "  action: DENY\n  rules: [{when: [{key: connection.sni, values: [a]}, {key: source.serviceAccount, values: [a/b]}, {key: source.trustDomain, values: [td]}]}]\n",
            &MeshConfig::default(),
        );
        let msg = c.status.unwrap().message;
        assert!(
            msg.contains("(found: connection.sni, source.serviceAccount, source.trustDomain)"),
            "{msg}"
        );
    }

    #[test]
    fn strict_policy_fails_closed() {
        let strict = MeshConfig {
            strict_policy: true,
            ..Default::default()
        };
        let c = conv(
            "  action: DENY\n  rules: [{from: [{source: {principals: [x]}}], to: [{operation: {methods: [POST]}}]}]\n",
            &strict,
        );
        let a = c.policy.unwrap().authorization;
        assert_eq!(a.rules[0].clauses.len(), 1, "the HTTP-only `to` is dropped");
        let c = conv(
            "  action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]\n",
            &strict,
        );
        let a = c.policy.unwrap().authorization;
        assert_eq!(a.action, L4Action::Deny);
        assert_eq!(a.rules, vec![L4Rule::default()]);
        let c = conv(
            "  rules: [{from: [{source: {namespaces: [a], trustDomains: [td]}}]}]\n",
            &strict,
        );
        assert!(c.policy.unwrap().authorization.rules.is_empty());
    }

    #[test]
    fn audit_custom_dry_run_and_target_refs() {
        let c = conv("  action: AUDIT\n  rules: [{}]\n", &MeshConfig::default());
        assert!(c.policy.is_none());
        assert_eq!(
            c.status.unwrap().message,
            "ztunnel does not support the AUDIT action"
        );
        let c = conv(
            "  targetRefs: [{kind: Service, name: s}]\n  rules: [{}]\n",
            &MeshConfig::default(),
        );
        assert!(c.policy.is_none() && c.status.is_none());
        let text = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: d, namespace: foo, annotations: {istio.io/dry-run: \"true\"}}\nspec: {action: DENY, rules: [{}]}\n";
        let set = parse_objects("t.yaml", text).unwrap();
        assert!(
            convert(&set.authorization_policies[0], &MeshConfig::default())
                .policy
                .is_none()
        );
        let mut flagged = MeshConfig::default();
        flagged.feature_flags.ambient_dry_run = true;
        let c = convert(&set.authorization_policies[0], &flagged);
        assert!(c.policy.unwrap().authorization.dry_run);
    }
}
