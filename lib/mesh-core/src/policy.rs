//! L4 authorization: Istio's `istio.security.Authorization` model and its evaluation at ztunnel.
//!
//! Semantics follow Istio ambient (see `shared/reference/authz-semantics.md`):
//! - a policy matches when ANY rule matches; a rule matches when ALL its clauses match; a
//!   clause matches when ANY of its matches matches; a match requires every field it sets
//!   (positive lists need one hit, negative lists need none);
//! - a policy with no rules never matches; a rule with no clauses always matches; a clause
//!   with no matches always matches (ztunnel `src/rbac.rs`: `if clause.is_empty() { clause_match
//!   = true }`); a match that sets no field never matches (it is skipped);
//! - DENY policies are evaluated first; then, if any ALLOW policy applies, one must match;
//!   with no ALLOW policy the connection is allowed; dry-run policies never enforce.
//!
//! Every decision names the deciding policy and rule so an operator can see *why*.

use std::{fmt, net::SocketAddr};

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::Identity;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Root-namespace policy without selector: every workload in the mesh.
    Global,
    /// Namespace policy without selector: every workload in `namespace`.
    Namespace,
    /// Applies to the workloads that list this policy in `authorization_policies`.
    WorkloadSelector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
}

/// Istio's string matcher. Principals are matched without their `spiffe://` prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn matches(&self, s: &str) -> bool {
        match self {
            StringMatch::Exact(v) => s == v,
            StringMatch::Prefix(v) => s.starts_with(v.as_str()),
            StringMatch::Suffix(v) => s.ends_with(v.as_str()),
            StringMatch::Presence => !s.is_empty(),
        }
    }
}

/// A namespace + service account pair (Istio's `ServiceAccountMatch`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// One conjunction of conditions on a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<IpNet>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

/// A clause is a disjunction of matches.
pub type Clause = Vec<Match>;

/// A rule is a conjunction of clauses (from, to, when).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// An L4 authorization policy as ztunnel receives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    pub rules: Vec<Rule>,
    pub dry_run: bool,
}

/// What ztunnel knows about a connection when it authorizes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// `None` for plaintext (no verified peer certificate).
    pub src_identity: Option<Identity>,
}

impl fmt::Display for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.src_identity {
            Some(id) => write!(f, "{}({id})->{}", self.src, self.dst),
            None => write!(f, "{}(plaintext)->{}", self.src, self.dst),
        }
    }
}

fn list_matches<T>(pos: &[T], neg: &[T], mut pred: impl FnMut(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&mut pred)) && !neg.iter().any(pred)
}

/// What matching needs from a connection, derived once per decision (not once per match):
/// the principal as policies write it (the identity without `spiffe://`).
struct Subject<'a> {
    conn: &'a Connection,
    principal: Option<String>,
}

impl<'a> Subject<'a> {
    fn new(conn: &'a Connection) -> Self {
        let principal = conn.src_identity.as_ref().map(|i| {
            format!(
                "{}/ns/{}/sa/{}",
                i.trust_domain(),
                i.namespace(),
                i.service_account()
            )
        });
        Subject { conn, principal }
    }
}

impl Match {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }

    fn matches(&self, s: &Subject<'_>) -> bool {
        if self.is_empty() {
            return false;
        }
        let conn = s.conn;
        let id = conn.src_identity.as_ref();
        // Principals are written without the scheme; a connection with no identity has none.
        let principal = s.principal.as_deref();
        let namespace = id.map(|i| i.namespace()).unwrap_or("");
        list_matches(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(&conn.dst.ip())
        }) && list_matches(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(&conn.src.ip())
        }) && list_matches(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == conn.dst.port()
        }) && list_matches(&self.service_accounts, &self.not_service_accounts, |m| {
            id.is_some_and(|i| {
                i.namespace() == m.namespace && i.service_account() == m.service_account
            })
        }) && list_matches(&self.principals, &self.not_principals, |m| {
            principal.is_some_and(|p| m.matches(p))
        }) && list_matches(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(namespace)
        })
    }
}

impl Rule {
    fn matches(&self, s: &Subject<'_>) -> bool {
        self.clauses
            .iter()
            .all(|clause| clause.is_empty() || clause.iter().any(|m| m.matches(s)))
    }
}

impl Authorization {
    /// `namespace/name`, the key workloads use to reference selector policies.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The index of the first matching rule, if any.
    pub fn matching_rule(&self, conn: &Connection) -> Option<usize> {
        self.matching_rule_for(&Subject::new(conn))
    }

    fn matching_rule_for(&self, s: &Subject<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(s))
    }
}

/// Outcome of authorizing one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy; `None` when no policy decided.
    pub policy: Option<String>,
    /// Index of the deciding rule within `policy`.
    pub rule: Option<usize>,
    pub reason: &'static str,
}

impl Decision {
    fn by(allowed: bool, p: &Authorization, rule: Option<usize>, reason: &'static str) -> Self {
        Decision {
            allowed,
            policy: Some(p.key()),
            rule,
            reason,
        }
    }
}

/// Evaluates the policies that apply to a destination (already selected by scope).
///
/// `policies` must be exactly the set that applies to the destination workload; selection by
/// scope lives with the state that knows the workload.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Authorization> + Clone,
    conn: &Connection,
) -> Decision {
    let subject = Subject::new(conn);
    let enforced = || policies.clone().into_iter().filter(|p| !p.dry_run);
    for p in enforced().filter(|p| p.action == Action::Deny) {
        if let Some(rule) = p.matching_rule_for(&subject) {
            return Decision::by(false, p, Some(rule), "matched a DENY policy");
        }
    }
    let mut allows = enforced().filter(|p| p.action == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Decision {
            allowed: true,
            policy: None,
            rule: None,
            reason: "no ALLOW policy applies",
        };
    }
    for p in allows {
        if let Some(rule) = p.matching_rule_for(&subject) {
            return Decision::by(true, p, Some(rule), "matched an ALLOW policy");
        }
    }
    Decision {
        allowed: false,
        policy: None,
        rule: None,
        reason: "ALLOW policies apply but none matched",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn conn(id: Option<&str>, src: &str, dst: &str) -> Connection {
        Connection {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_identity: id.map(|i| i.parse().unwrap()),
        }
    }

    fn policy(action: Action, rules: Vec<Rule>) -> Authorization {
        Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: Scope::Namespace,
            action,
            rules,
            dry_run: false,
        }
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/bar/sa/sleep";

    #[test_case(Match { principals: vec![StringMatch::Exact("cluster.local/ns/bar/sa/sleep".into())], ..Default::default() }, Some(SLEEP) => true ; "principal exact")]
    #[test_case(Match { principals: vec![StringMatch::Exact("spiffe://cluster.local/ns/bar/sa/sleep".into())], ..Default::default() }, Some(SLEEP) => false ; "principal with scheme never matches")]
    #[test_case(Match { principals: vec![StringMatch::Suffix("/sa/sleep".into())], ..Default::default() }, Some(SLEEP) => true ; "principal suffix")]
    #[test_case(Match { principals: vec![StringMatch::Presence], ..Default::default() }, None => false ; "presence needs identity")]
    #[test_case(Match { not_principals: vec![StringMatch::Presence], ..Default::default() }, None => true ; "not presence matches plaintext")]
    #[test_case(Match { namespaces: vec![StringMatch::Exact("bar".into())], ..Default::default() }, Some(SLEEP) => true ; "namespace")]
    #[test_case(Match { namespaces: vec![StringMatch::Exact("bar".into())], not_namespaces: vec![StringMatch::Prefix("b".into())], ..Default::default() }, Some(SLEEP) => false ; "negative wins")]
    #[test_case(Match { service_accounts: vec![ServiceAccountMatch { namespace: "bar".into(), service_account: "sleep".into() }], ..Default::default() }, Some(SLEEP) => true ; "service account")]
    #[test_case(Match { source_ips: vec!["10.0.0.0/8".parse().unwrap()], ..Default::default() }, None => true ; "source cidr")]
    #[test_case(Match { not_source_ips: vec!["10.0.0.5/32".parse().unwrap()], ..Default::default() }, None => false ; "not source ip")]
    #[test_case(Match { destination_ports: vec![80, 8080], ..Default::default() }, None => true ; "dest port")]
    #[test_case(Match { destination_ips: vec!["10.1.0.0/16".parse().unwrap()], destination_ports: vec![81], ..Default::default() }, None => false ; "fields are anded")]
    #[test_case(Match::default(), Some(SLEEP) => false ; "empty match never matches")]
    fn match_semantics(m: Match, id: Option<&str>) -> bool {
        m.matches(&Subject::new(&conn(id, "10.0.0.5:40000", "10.1.0.7:8080")))
    }

    #[test]
    fn empty_rules_never_match_empty_rule_always_does() {
        let c = conn(None, "10.0.0.5:1", "10.1.0.7:80");
        assert_eq!(policy(Action::Allow, vec![]).matching_rule(&c), None);
        assert_eq!(
            policy(Action::Allow, vec![Rule::default()]).matching_rule(&c),
            Some(0)
        );
    }

    #[test]
    fn clauses_are_anded_matches_ored() {
        let ns_bar = Match {
            namespaces: vec![StringMatch::Exact("bar".into())],
            ..Default::default()
        };
        let ns_other = Match {
            namespaces: vec![StringMatch::Exact("other".into())],
            ..Default::default()
        };
        let port_80 = Match {
            destination_ports: vec![80],
            ..Default::default()
        };
        let r = Rule {
            clauses: vec![vec![ns_other.clone(), ns_bar], vec![port_80.clone()]],
        };
        assert!(r.matches(&Subject::new(&conn(
            Some(SLEEP),
            "10.0.0.5:1",
            "10.1.0.7:80"
        ))));
        assert!(!r.matches(&Subject::new(&conn(
            Some(SLEEP),
            "10.0.0.5:1",
            "10.1.0.7:81"
        ))));
        let r2 = Rule {
            clauses: vec![vec![ns_other], vec![port_80]],
        };
        assert!(!r2.matches(&Subject::new(&conn(
            Some(SLEEP),
            "10.0.0.5:1",
            "10.1.0.7:80"
        ))));
    }

    /// ztunnel `src/rbac.rs` (`Authorization::matches`): a clause with no matches at all is a
    /// match, unlike a clause whose only match is empty (skipped, so the clause fails).
    #[test]
    fn empty_clause_matches_but_clause_of_empty_match_does_not() {
        let c = conn(Some(SLEEP), "10.0.0.5:1", "10.1.0.7:80");
        let empty_clause = Rule {
            clauses: vec![vec![]],
        };
        assert!(empty_clause.matches(&Subject::new(&c)));
        let empty_match = Rule {
            clauses: vec![vec![Match::default()]],
        };
        assert!(!empty_match.matches(&Subject::new(&c)));
    }

    #[test]
    fn deny_before_allow_and_default_allow() {
        let c = conn(Some(SLEEP), "10.0.0.5:1", "10.1.0.7:80");
        let allow_all = policy(Action::Allow, vec![Rule::default()]);
        let mut deny_all = policy(Action::Deny, vec![Rule::default()]);
        deny_all.name = "deny".into();

        let d = evaluate([&allow_all, &deny_all], &c);
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("ns/deny"));
        assert_eq!(d.rule, Some(0));

        assert!(evaluate([&allow_all], &c).allowed);
        let none: [&Authorization; 0] = [];
        let d = evaluate(none, &c);
        assert!(d.allowed && d.policy.is_none());

        let allow_nothing = policy(Action::Allow, vec![]);
        let d = evaluate([&allow_nothing], &c);
        assert!(!d.allowed);
        assert_eq!(d.reason, "ALLOW policies apply but none matched");
    }

    #[test]
    fn dry_run_never_enforces() {
        let c = conn(Some(SLEEP), "10.0.0.5:1", "10.1.0.7:80");
        let mut deny_all = policy(Action::Deny, vec![Rule::default()]);
        deny_all.dry_run = true;
        assert!(evaluate([&deny_all], &c).allowed);
    }
}
