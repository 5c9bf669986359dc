//! The waypoint's evaluator: AuthorizationPolicy with Envoy RBAC semantics as istiod builds
//! them (`pilot/pkg/security/authz/{builder,model,matcher}`).
//!
//! - a policy matches if any rule matches; a rule if any `from` source AND any `to` operation
//!   AND every `when` condition match; within one source/operation every set field must match;
//!   `values` are OR-ed and `notValues` must all miss;
//! - on a TCP filter chain (`forTCP`), HTTP-only attributes cannot be evaluated: in an ALLOW
//!   policy the whole rule is skipped (`checkError` returns the error), in DENY/AUDIT the
//!   attribute is ignored, i.e. treated as matching;
//! - principals are compared with `spiffe://` prepended, and principals of the mesh trust
//!   domain, an alias or the literal `cluster.local` are expanded to every trust domain of the
//!   bundle (`trustdomain.Bundle.ReplaceTrustDomainAliases`);
//! - `namespaces` is Envoy's regex `.*/ns/<ns>/.*` on the peer URI;
//! - `paths` compares the normalized path without its query; `hosts` ignores case.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use mesh_core::Identity;

use crate::matcher::{envoy_namespace_match, path_match, wildcard_match};
use crate::model::{Action, AuthorizationPolicy, Condition, Operation, Rule, Source};

/// A validated JWT as the waypoint's jwt_authn filter exposes it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Jwt {
    pub iss: String,
    pub sub: String,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl Jwt {
    /// `request.auth.principal`: `<iss>/<sub>`.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.iss, self.sub)
    }
}

/// The HTTP request as the waypoint's RBAC filter sees it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HttpView {
    pub method: String,
    /// Already normalized, without query.
    pub path: String,
    pub host: String,
    /// Lower-case names; duplicates merged with `,`.
    pub headers: BTreeMap<String, String>,
    /// A JWT accepted by a RequestAuthentication at this hop.
    pub jwt: Option<Jwt>,
}

/// The connection (and request, on an HTTP chain) at the waypoint.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub peer: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// `None`: a TCP filter chain.
    pub http: Option<HttpView>,
}

/// Context shared by every policy at the hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ctx {
    /// The mesh trust domain followed by its aliases.
    pub trust_domains: Vec<String>,
}

/// Why one rule of a policy matched, did not, or was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleOutcome {
    Matched,
    NoMatch,
    /// ALLOW rule skipped on a TCP chain because it needs these HTTP attributes.
    SkippedTcp(Vec<String>),
}

/// The result of evaluating a policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyMatch {
    pub rule: Option<usize>,
    /// Notes on TCP semantics (skipped rules, ignored attributes) and unevaluable keys.
    pub notes: Vec<String>,
}

struct Eval<'a> {
    view: &'a View,
    ctx: &'a Ctx,
    action: Action,
    policy_ns: &'a str,
    /// HTTP-only attributes ignored (DENY/AUDIT on TCP).
    ignored: Vec<String>,
    unevaluable: Vec<String>,
}

/// A field was skipped because its rule must be dropped (ALLOW, TCP, HTTP-only).
struct Skip(String);

impl Eval<'_> {
    fn uri(&self) -> Option<String> {
        self.view.peer.as_ref().map(|i| i.to_string())
    }

    /// `(values empty or any) && none of notValues`, with TCP handling for HTTP-only keys.
    fn field(
        &mut self,
        name: &str,
        http_only: bool,
        values: &[String],
        not_values: &[String],
        pred: &dyn Fn(&Self, &str) -> bool,
    ) -> Result<bool, Skip> {
        if values.is_empty() && not_values.is_empty() {
            return Ok(true);
        }
        if http_only && self.view.http.is_none() {
            if self.action == Action::Allow {
                return Err(Skip(name.to_string()));
            }
            self.ignored.push(name.to_string());
            return Ok(true);
        }
        let pos = values.is_empty() || values.iter().any(|v| pred(self, v));
        let neg = not_values.iter().any(|v| pred(self, v));
        Ok(pos && !neg)
    }

    fn principal(&self, v: &str) -> bool {
        let Some(uri) = self.uri() else { return false };
        let Some(id) = uri.strip_prefix("spiffe://") else {
            return false;
        };
        expand_trust_domains(v, &self.ctx.trust_domains)
            .iter()
            .any(|p| wildcard_match(p, id, false))
    }

    fn namespace(&self, v: &str) -> bool {
        self.uri().is_some_and(|u| envoy_namespace_match(v, &u))
    }

    fn service_account(&self, v: &str) -> bool {
        let (ns, sa) = v.split_once('/').unwrap_or((self.policy_ns, v));
        self.view
            .peer
            .as_ref()
            .is_some_and(|i| i.namespace() == ns && i.service_account() == sa)
    }

    fn trust_domain(&self, v: &str) -> bool {
        self.view
            .peer
            .as_ref()
            .is_some_and(|i| wildcard_match(v, i.trust_domain(), false))
    }

    fn ip(v: &str, ip: IpAddr) -> bool {
        let net = if v.contains('/') {
            v.parse::<IpNet>().ok()
        } else {
            v.parse::<IpAddr>().ok().map(IpNet::from)
        };
        net.is_some_and(|n| n.contains(&ip))
    }

    fn http(&self) -> Option<&HttpView> {
        self.view.http.as_ref()
    }

    fn jwt(&self) -> Option<&Jwt> {
        self.http().and_then(|h| h.jwt.as_ref())
    }

    fn source(&mut self, s: &Source) -> Result<bool, Skip> {
        let src_ip = self.view.src_ip;
        Ok(
            self.field("principals", false, &s.principals, &s.not_principals, &|e, v| e.principal(v))?
            && self.field("namespaces", false, &s.namespaces, &s.not_namespaces, &|e, v| e.namespace(v))?
            && self.field("serviceAccounts", false, &s.service_accounts, &s.not_service_accounts, &|e, v| e.service_account(v))?
            && self.field("trustDomains", false, &s.trust_domains, &s.not_trust_domains, &|e, v| e.trust_domain(v))?
            && self.field("ipBlocks", false, &s.ip_blocks, &s.not_ip_blocks, &|_, v| Self::ip(v, src_ip))?
            // No X-Forwarded-For offline: the remote address is the direct peer.
            && self.field("remoteIpBlocks", true, &s.remote_ip_blocks, &s.not_remote_ip_blocks, &|_, v| Self::ip(v, src_ip))?
            && self.field("requestPrincipals", true, &s.request_principals, &s.not_request_principals, &|e, v| {
                e.jwt().is_some_and(|j| wildcard_match(v, &j.principal(), false))
            })?,
        )
    }

    fn operation(&mut self, o: &Operation) -> Result<bool, Skip> {
        let port = self.view.dst_port.to_string();
        Ok(self.field("hosts", true, &o.hosts, &o.not_hosts, &|e, v| {
            e.http().is_some_and(|h| wildcard_match(v, &h.host, true))
        })? && self.field("ports", false, &o.ports, &o.not_ports, &|_, v| v == port)?
            && self.field("methods", true, &o.methods, &o.not_methods, &|e, v| {
                e.http()
                    .is_some_and(|h| wildcard_match(v, &h.method, false))
            })?
            && self.field("paths", true, &o.paths, &o.not_paths, &|e, v| {
                e.http().is_some_and(|h| path_match(v, &h.path))
            })?)
    }

    fn claim(&self, path: &[String], v: &str) -> bool {
        let Some(j) = self.jwt() else { return false };
        let mut cur: Option<&serde_json::Value> = None;
        for (i, seg) in path.iter().enumerate() {
            cur = if i == 0 {
                j.claims.get(seg)
            } else {
                cur.and_then(|c| c.get(seg))
            };
        }
        match cur {
            Some(serde_json::Value::String(s)) => wildcard_match(v, s, false),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .any(|e| e.as_str().is_some_and(|s| wildcard_match(v, s, false))),
            Some(serde_json::Value::Bool(b)) => wildcard_match(v, &b.to_string(), false),
            Some(serde_json::Value::Number(n)) => wildcard_match(v, &n.to_string(), false),
            _ => false,
        }
    }

    fn condition(&mut self, c: &Condition) -> Result<bool, Skip> {
        let key = c.key.as_str();
        let (src, dst, port) = (self.view.src_ip, self.view.dst_ip, self.view.dst_port);
        let http_only = crate::model::is_http_only_key(key);
        let vals = (&c.values, &c.not_values);
        let r = match key {
            "source.ip" => self.field(key, false, vals.0, vals.1, &|_, v| Self::ip(v, src))?,
            "remote.ip" => self.field(key, true, vals.0, vals.1, &|_, v| Self::ip(v, src))?,
            "source.namespace" => self.field(key, false, vals.0, vals.1, &|e, v| e.namespace(v))?,
            "source.principal" => self.field(key, false, vals.0, vals.1, &|e, v| e.principal(v))?,
            "source.serviceAccount" => {
                self.field(key, false, vals.0, vals.1, &|e, v| e.service_account(v))?
            }
            "source.trustDomain" => {
                self.field(key, false, vals.0, vals.1, &|e, v| e.trust_domain(v))?
            }
            "destination.ip" => self.field(key, false, vals.0, vals.1, &|_, v| Self::ip(v, dst))?,
            "destination.port" => {
                self.field(key, false, vals.0, vals.1, &|_, v| v == port.to_string())?
            }
            // The inner HBONE stream carries no TLS, so there is no SNI at the waypoint.
            "connection.sni" => self.field(key, false, vals.0, vals.1, &|_, _| false)?,
            "request.auth.principal" => self.field(key, true, vals.0, vals.1, &|e, v| {
                e.jwt()
                    .is_some_and(|j| wildcard_match(v, &j.principal(), false))
            })?,
            "request.auth.audiences" => self.field(key, true, vals.0, vals.1, &|e, v| {
                e.claim(&["aud".to_string()], v)
            })?,
            "request.auth.presenter" => self.field(key, true, vals.0, vals.1, &|e, v| {
                e.claim(&["azp".to_string()], v)
            })?,
            k if k.starts_with("request.auth.claims") => {
                let path = bracket_path(&k["request.auth.claims".len()..]);
                self.field(key, true, vals.0, vals.1, &|e, v| e.claim(&path, v))?
            }
            k if k.starts_with("request.headers") => {
                let name = bracket_path(&k["request.headers".len()..])
                    .first()
                    .map(|s| s.to_ascii_lowercase())
                    .unwrap_or_default();
                self.field(key, true, vals.0, vals.1, &|e, v| {
                    e.http()
                        .and_then(|h| h.headers.get(&name))
                        .is_some_and(|hv| wildcard_match(v, hv, false))
                })?
            }
            _ => {
                // experimental.envoy.filters.* reads Envoy dynamic metadata we do not have.
                self.unevaluable.push(key.to_string());
                let _ = http_only;
                c.values.is_empty()
            }
        };
        Ok(r)
    }

    fn rule(&mut self, r: &Rule) -> Result<bool, Skip> {
        let mut from_ok = r.from.is_none();
        for f in r.from.iter().flatten() {
            let src = f.source.clone().unwrap_or_default();
            if self.source(&src)? {
                from_ok = true;
            }
        }
        let mut to_ok = r.to.is_none();
        for t in r.to.iter().flatten() {
            let op = t.operation.clone().unwrap_or_default();
            if self.operation(&op)? {
                to_ok = true;
            }
        }
        let mut when_ok = true;
        for c in r.when.iter().flatten() {
            when_ok &= self.condition(c)?;
        }
        Ok(from_ok && to_ok && when_ok)
    }
}

/// `[a][b]` -> `["a", "b"]`.
fn bracket_path(s: &str) -> Vec<String> {
    s.split('[')
        .filter_map(|p| p.strip_suffix(']'))
        .map(|p| p.to_string())
        .collect()
}

/// `ReplaceTrustDomainAliases`: a principal whose trust domain is in the bundle, or is the
/// literal `cluster.local`, stands for that principal in every trust domain of the bundle.
pub fn expand_trust_domains(principal: &str, bundle: &[String]) -> Vec<String> {
    if principal.starts_with('*') {
        return vec![principal.to_string()];
    }
    let Some((td, rest)) = principal.split_once('/') else {
        return vec![principal.to_string()];
    };
    if !(bundle.iter().any(|b| b == td) || td == "cluster.local") {
        return vec![principal.to_string()];
    }
    let mut out: Vec<String> = bundle.iter().map(|b| format!("{b}/{rest}")).collect();
    if !out.iter().any(|p| p == principal) && bundle.iter().any(|b| b == td) {
        out.push(principal.to_string());
    }
    out
}

/// Evaluates one policy's rules at the waypoint (action decides TCP semantics).
pub fn match_policy(p: &AuthorizationPolicy, view: &View, ctx: &Ctx) -> PolicyMatch {
    let mut out = PolicyMatch::default();
    let key = p.key();
    for (i, rule) in p.spec.rules().iter().enumerate() {
        let mut e = Eval {
            view,
            ctx,
            action: p.spec.action,
            policy_ns: p.namespace(),
            ignored: Vec::new(),
            unevaluable: Vec::new(),
        };
        let res = e.rule(rule);
        if !e.unevaluable.is_empty() {
            out.notes.push(format!(
                "{key} rule {i}: {} cannot be evaluated offline (Envoy dynamic metadata); treated as not matching",
                e.unevaluable.join(", ")
            ));
        }
        match res {
            Err(Skip(attr)) => out.notes.push(format!(
                "{key} rule {i}: on this TCP port the ALLOW rule is skipped because it uses the HTTP-only attribute {attr} (Envoy RBAC generation fails for the rule)"
            )),
            Ok(matched) => {
                if !e.ignored.is_empty() {
                    e.ignored.dedup();
                    out.notes.push(format!(
                        "{key} rule {i}: on this TCP port the HTTP-only attribute(s) {} are ignored, so the {} rule matches more than written",
                        e.ignored.join(", "),
                        p.spec.action
                    ));
                }
                if matched && out.rule.is_none() {
                    out.rule = Some(i);
                    return out;
                }
            }
        }
    }
    out
}

/// The outcome of the waypoint's RBAC filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbacDecision {
    pub allowed: bool,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub reason: String,
    pub warnings: Vec<String>,
}

/// CUSTOM -> DENY -> (no ALLOW? allow) -> ALLOW match? allow -> deny. AUDIT and dry-run never
/// change the decision. A matching CUSTOM policy is reported; its provider cannot be asked
/// offline, so the evaluation continues as if the provider allowed.
pub fn evaluate(policies: &[&AuthorizationPolicy], view: &View, ctx: &Ctx) -> RbacDecision {
    let mut warnings = Vec::new();
    let denial = if view.http.is_some() {
        "HTTP 403 \"RBAC: access denied\""
    } else {
        "the connection is closed"
    };
    let by_action = |a: Action| policies.iter().filter(move |p| p.spec.action == a);
    for p in by_action(Action::Custom) {
        let m = match_policy(p, view, ctx);
        warnings.extend(m.notes);
        if let Some(rule) = m.rule {
            let provider = p
                .spec
                .provider
                .as_ref()
                .map(|p| p.name.as_str())
                .unwrap_or("");
            warnings.push(format!(
                "CUSTOM policy {} rule {rule} matched: the ext_authz provider {provider:?} decides; it cannot be asked offline, so this explanation assumes it allows",
                p.key()
            ));
        }
    }
    for p in by_action(Action::Deny) {
        let m = match_policy(p, view, ctx);
        warnings.extend(m.notes);
        if let Some(rule) = m.rule {
            if p.dry_run() {
                warnings.push(format!(
                    "dry-run DENY policy {} rule {rule} matched (logged only, not enforced)",
                    p.key()
                ));
                continue;
            }
            return RbacDecision {
                allowed: false,
                policy: Some(p.key()),
                rule: Some(rule),
                reason: format!("denied by DENY policy {} rule {rule}; {denial}", p.key()),
                warnings,
            };
        }
    }
    for p in by_action(Action::Audit) {
        let m = match_policy(p, view, ctx);
        if let Some(rule) = m.rule {
            warnings.push(format!(
                "AUDIT policy {} rule {rule} matched (audit only, no effect on the decision)",
                p.key()
            ));
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = by_action(Action::Allow).collect();
    for p in allows.iter().filter(|p| p.dry_run()) {
        if let Some(rule) = match_policy(p, view, ctx).rule {
            warnings.push(format!(
                "dry-run ALLOW policy {} rule {rule} matched (logged only, not enforced)",
                p.key()
            ));
        }
    }
    let enforced: Vec<&&AuthorizationPolicy> =
        allows.into_iter().filter(|p| !p.dry_run()).collect();
    if enforced.is_empty() {
        return RbacDecision {
            allowed: true,
            policy: None,
            rule: None,
            reason: "no ALLOW policy applies at the waypoint, and no DENY policy matched".into(),
            warnings,
        };
    }
    for p in &enforced {
        let m = match_policy(p, view, ctx);
        warnings.extend(m.notes);
        if let Some(rule) = m.rule {
            return RbacDecision {
                allowed: true,
                policy: Some(p.key()),
                rule: Some(rule),
                reason: format!("allowed by ALLOW policy {} rule {rule}", p.key()),
                warnings,
            };
        }
    }
    let names: Vec<String> = enforced.iter().map(|p| p.key()).collect();
    RbacDecision {
        allowed: false,
        policy: None,
        rule: None,
        reason: format!(
            "ALLOW policies apply ({}) but none matched; {denial}",
            names.join(", ")
        ),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domain_aliases() {
        // pilot/pkg/security/trustdomain/bundle_test.go (TestReplaceTrustDomainAliases).
        let bundle = vec!["td1".to_string(), "td2".to_string()];
        assert_eq!(
            expand_trust_domains("cluster.local/ns/a/sa/b", &bundle),
            vec!["td1/ns/a/sa/b", "td2/ns/a/sa/b"]
        );
        assert_eq!(
            expand_trust_domains("td2/ns/a/sa/b", &bundle),
            vec!["td1/ns/a/sa/b", "td2/ns/a/sa/b"]
        );
        assert_eq!(
            expand_trust_domains("other/ns/a/sa/b", &bundle),
            vec!["other/ns/a/sa/b"]
        );
        assert_eq!(expand_trust_domains("*/sa/b", &bundle), vec!["*/sa/b"]);
    }

    #[test]
    fn bracket_paths() {
        assert_eq!(bracket_path("[a][b]"), vec!["a", "b"]);
        assert_eq!(bracket_path("[groups]"), vec!["groups"]);
    }
}
