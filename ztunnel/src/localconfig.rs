//! The local configuration file: Istio ztunnel's `LOCAL_XDS_PATH` format, so one file drives
//! either ztunnel.
//!
//! ```yaml
//! workloads:
//! - uid: cluster1//v1/Pod/foo/echo-0
//!   name: echo-0
//!   namespace: foo
//!   serviceAccount: echo
//!   workloadIps: [10.244.1.5]
//!   protocol: HBONE            # or TCP (not in the mesh)
//!   node: node-a
//!   services:                  # "namespace/hostname": {servicePort: targetPort}
//!     foo/echo.foo.svc.cluster.local: {80: 8080}
//! services:
//! - name: echo
//!   namespace: foo
//!   hostname: echo.foo.svc.cluster.local
//!   vips: [/10.96.0.10]        # network/ip
//!   ports: {80: 8080}
//! policies:
//! - name: allow-sleep
//!   namespace: foo
//!   scope: Namespace           # Global | Namespace | WorkloadSelector
//!   action: Allow              # Allow | Deny
//!   rules: [[[{principals: [{Exact: cluster.local/ns/bar/sa/sleep}]}]]]
//! ```
//!
//! Unknown fields are errors (as in Istio), and every error names the field path.
//! Fields that Istio's format has but this ztunnel does not use yet (network gateways,
//! locality, load-balancing modes, application tunnels) are accepted and ignored.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use ipnet::IpNet;
use mesh_core::{
    policy::{self, Authorization, Rule},
    workload::{
        GatewayAddress, GatewayDestination, HealthStatus, NamespacedHostname, NetworkAddress,
        Service, TunnelProtocol, Workload,
    },
};
use serde::Deserialize;

use crate::state::State;

/// Why the file was rejected. The previous configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalConfig {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    policies: Vec<LocalPolicy>,
    #[serde(default)]
    services: Vec<LocalService>,
}

#[derive(Debug, Deserialize)]
enum Protocol {
    #[serde(rename = "TCP", alias = "NONE")]
    Tcp,
    #[serde(rename = "HBONE")]
    Hbone,
}

#[derive(Debug, Deserialize)]
enum Status {
    Healthy,
    Unhealthy,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalWorkload {
    uid: String,
    #[serde(default)]
    name: String,
    namespace: String,
    #[serde(default)]
    workload_ips: Vec<IpAddr>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    protocol: Option<Protocol>,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    network_gateway: Option<LocalGateway>,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    status: Option<Status>,
    #[serde(default)]
    services: BTreeMap<String, BTreeMap<u16, u16>>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    network_mode: Option<serde_yaml::Value>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    locality: Option<serde_yaml::Value>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    application_tunnel: Option<serde_yaml::Value>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    capacity: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalGateway {
    /// `{Address: network/ip}` / `!Address network/ip`, or the same with `Hostname`.
    destination: serde_yaml::Value,
    #[serde(default = "default_hbone_port")]
    hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    mesh_core::workload::HBONE_PORT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalHostname {
    namespace: String,
    hostname: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    endpoints: Option<serde_yaml::Value>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    subject_alt_names: Vec<String>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    load_balancer: Option<serde_yaml::Value>,
    // Accepted for compatibility with Istio's format; not used yet.
    #[allow(dead_code)]
    #[serde(default)]
    ip_families: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
enum Scope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Debug, Deserialize)]
enum Action {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalPolicy {
    name: String,
    namespace: String,
    scope: Scope,
    action: Action,
    #[serde(default)]
    rules: Vec<Vec<Vec<LocalMatch>>>,
    #[serde(default)]
    dry_run: bool,
}

/// A string matcher, `{Exact: x}` or `!Exact x` (likewise Prefix, Suffix, Presence).
type StringMatch = serde_yaml::Value;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ServiceAccountMatch {
    namespace: String,
    service_account: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalMatch {
    #[serde(default)]
    namespaces: Vec<StringMatch>,
    #[serde(default)]
    not_namespaces: Vec<StringMatch>,
    #[serde(default)]
    service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default)]
    not_service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default)]
    principals: Vec<StringMatch>,
    #[serde(default)]
    not_principals: Vec<StringMatch>,
    #[serde(default)]
    source_ips: Vec<IpNet>,
    #[serde(default)]
    not_source_ips: Vec<IpNet>,
    #[serde(default)]
    destination_ips: Vec<IpNet>,
    #[serde(default)]
    not_destination_ips: Vec<IpNet>,
    #[serde(default)]
    destination_ports: Vec<u16>,
    #[serde(default)]
    not_destination_ports: Vec<u16>,
}

/// Reads an externally tagged enum value in either YAML spelling: a one-entry map
/// `{Variant: value}` or a tagged value `!Variant value`.
fn variant(v: serde_yaml::Value) -> Result<(String, serde_yaml::Value), String> {
    match v {
        serde_yaml::Value::Tagged(t) => Ok((
            t.tag.to_string().trim_start_matches('!').to_owned(),
            t.value,
        )),
        serde_yaml::Value::Mapping(m) if m.len() == 1 => {
            let Some((k, v)) = m.into_iter().next() else {
                return Err("empty map".into());
            };
            match k {
                serde_yaml::Value::String(k) => Ok((k, v)),
                other => Err(format!("variant name must be a string, got {other:?}")),
            }
        }
        other => Err(format!(
            "expected {{Variant: value}} or !Variant value, got {other:?}"
        )),
    }
}

fn string_value(v: serde_yaml::Value) -> Result<String, String> {
    match v {
        serde_yaml::Value::String(s) => Ok(s),
        other => Err(format!("expected a string, got {other:?}")),
    }
}

fn string_match(v: StringMatch) -> Result<policy::StringMatch, String> {
    let (name, value) = variant(v)?;
    Ok(match name.as_str() {
        "Exact" => policy::StringMatch::Exact(string_value(value)?),
        "Prefix" => policy::StringMatch::Prefix(string_value(value)?),
        "Suffix" => policy::StringMatch::Suffix(string_value(value)?),
        "Presence" => policy::StringMatch::Presence,
        other => {
            return Err(format!(
                "unknown matcher {other:?} (Exact, Prefix, Suffix, Presence)"
            ));
        }
    })
}

fn sm(v: Vec<StringMatch>, field: &str) -> Result<Vec<policy::StringMatch>, (String, String)> {
    v.into_iter()
        .enumerate()
        .map(|(i, m)| string_match(m).map_err(|e| (format!("{field}[{i}]"), e)))
        .collect()
}

fn sa(v: Vec<ServiceAccountMatch>) -> Vec<policy::ServiceAccountMatch> {
    v.into_iter()
        .map(|m| policy::ServiceAccountMatch {
            namespace: m.namespace,
            service_account: m.service_account,
        })
        .collect()
}

impl TryFrom<LocalMatch> for policy::Match {
    /// (field, reason)
    type Error = (String, String);

    fn try_from(m: LocalMatch) -> Result<Self, Self::Error> {
        Ok(policy::Match {
            namespaces: sm(m.namespaces, "namespaces")?,
            not_namespaces: sm(m.not_namespaces, "notNamespaces")?,
            service_accounts: sa(m.service_accounts),
            not_service_accounts: sa(m.not_service_accounts),
            principals: sm(m.principals, "principals")?,
            not_principals: sm(m.not_principals, "notPrincipals")?,
            source_ips: m.source_ips,
            not_source_ips: m.not_source_ips,
            destination_ips: m.destination_ips,
            not_destination_ips: m.not_destination_ips,
            destination_ports: m.destination_ports,
            not_destination_ports: m.not_destination_ports,
        })
    }
}

struct Ctx<'a> {
    path: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: String, reason: impl ToString) -> LocalConfigError {
        LocalConfigError::Invalid {
            path: self.path.to_owned(),
            field,
            reason: reason.to_string(),
        }
    }

    fn gateway(&self, field: String, g: LocalGateway) -> Result<GatewayAddress, LocalConfigError> {
        let dfield = format!("{field}.destination");
        let (name, value) = variant(g.destination).map_err(|e| self.err(dfield.clone(), e))?;
        let destination = match name.as_str() {
            "Address" => GatewayDestination::Address(
                string_value(value)
                    .and_then(|a| a.parse::<NetworkAddress>().map_err(|e| e.to_string()))
                    .map_err(|e| self.err(format!("{dfield}.Address"), e))?,
            ),
            "Hostname" => {
                let h: LocalHostname = serde_yaml::from_value(value)
                    .map_err(|e| self.err(format!("{dfield}.Hostname"), e))?;
                GatewayDestination::Hostname(NamespacedHostname {
                    namespace: h.namespace,
                    hostname: h.hostname,
                })
            }
            other => {
                return Err(self.err(
                    dfield,
                    format!("unknown destination {other:?} (Address or Hostname)"),
                ));
            }
        };
        Ok(GatewayAddress {
            destination,
            hbone_mtls_port: g.hbone_mtls_port,
        })
    }
}

/// Parses file contents; `path` is only used in error messages.
pub fn parse(path: &str, text: &str) -> Result<State, LocalConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: LocalConfig = match serde_path_to_error::deserialize(de) {
        Ok(c) => c,
        Err(e) => {
            let field = e.path().to_string();
            return Err(LocalConfigError::Invalid {
                path: path.to_owned(),
                field,
                reason: e.into_inner().to_string(),
            });
        }
    };
    let cx = Ctx { path };
    let mut workloads = Vec::with_capacity(raw.workloads.len());
    let mut seen = std::collections::HashSet::new();
    for (i, w) in raw.workloads.into_iter().enumerate() {
        let f = |name: &str| format!("workloads[{i}].{name}");
        if w.uid.is_empty() {
            return Err(cx.err(f("uid"), "must not be empty"));
        }
        if !seen.insert(w.uid.clone()) {
            return Err(cx.err(f("uid"), format!("duplicate uid {:?}", w.uid)));
        }
        for k in w.services.keys() {
            k.parse::<NamespacedHostname>().map_err(|_| {
                cx.err(
                    f("services"),
                    format!("key {k:?} is not namespace/hostname"),
                )
            })?;
        }
        let waypoint = w
            .waypoint
            .map(|g| cx.gateway(f("waypoint"), g))
            .transpose()?;
        let wl = Workload {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            workload_ips: w.workload_ips,
            network: w.network,
            protocol: match w.protocol {
                Some(Protocol::Hbone) => TunnelProtocol::Hbone,
                _ => TunnelProtocol::None,
            },
            trust_domain: w.trust_domain,
            service_account: w.service_account,
            node: w.node,
            hostname: w.hostname,
            waypoint,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_name: w.workload_name,
            workload_type: w.workload_type,
            cluster_id: w.cluster_id,
            authorization_policies: w.authorization_policies,
            status: match w.status {
                Some(Status::Unhealthy) => HealthStatus::Unhealthy,
                _ => HealthStatus::Healthy,
            },
            services: w.services,
        };
        wl.identity().map_err(|e| cx.err(f("serviceAccount"), e))?;
        workloads.push(wl);
    }
    let mut services = Vec::with_capacity(raw.services.len());
    for (i, s) in raw.services.into_iter().enumerate() {
        let f = |name: &str| format!("services[{i}].{name}");
        let vips = s
            .vips
            .iter()
            .enumerate()
            .map(|(j, v)| v.parse().map_err(|e| cx.err(f(&format!("vips[{j}]")), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let waypoint = s
            .waypoint
            .map(|g| cx.gateway(f("waypoint"), g))
            .transpose()?;
        services.push(Service {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports: s.ports,
            waypoint,
        });
    }
    let mut policies = Vec::with_capacity(raw.policies.len());
    for (i, p) in raw.policies.into_iter().enumerate() {
        let mut rules = Vec::with_capacity(p.rules.len());
        for (r, clauses) in p.rules.into_iter().enumerate() {
            let mut out = Vec::with_capacity(clauses.len());
            for (c, matches) in clauses.into_iter().enumerate() {
                let mut clause = Vec::with_capacity(matches.len());
                for (m, lm) in matches.into_iter().enumerate() {
                    let pm = policy::Match::try_from(lm).map_err(|(field, reason)| {
                        cx.err(
                            format!("policies[{i}].rules[{r}][{c}][{m}].{field}"),
                            reason,
                        )
                    })?;
                    clause.push(pm);
                }
                out.push(clause);
            }
            rules.push(Rule { clauses: out });
        }
        policies.push(Authorization {
            name: p.name,
            namespace: p.namespace,
            scope: match p.scope {
                Scope::Global => policy::Scope::Global,
                Scope::Namespace => policy::Scope::Namespace,
                Scope::WorkloadSelector => policy::Scope::WorkloadSelector,
            },
            action: match p.action {
                Action::Allow => policy::Action::Allow,
                Action::Deny => policy::Action::Deny,
            },
            rules,
            dry_run: p.dry_run,
        });
    }
    Ok(State::from_parts(workloads, services, policies))
}

/// Reads and parses the file at `path`.
pub fn load(path: &Path) -> Result<State, LocalConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocalConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/foo/echo-0
  name: echo-0
  namespace: foo
  serviceAccount: echo
  workloadIps: [10.244.1.5]
  protocol: HBONE
  node: node-a
  services:
    foo/echo.foo.svc.cluster.local: {80: 8080}
  waypoint: {destination: !Address /10.244.1.9, hboneMtlsPort: 15008}
- uid: legacy
  namespace: bar
  workloadIps: [10.244.2.5]
  protocol: TCP
services:
- name: echo
  namespace: foo
  hostname: echo.foo.svc.cluster.local
  vips: [/10.96.0.10]
  ports: {80: 8080}
policies:
- name: allow-sleep
  namespace: foo
  scope: Namespace
  action: Allow
  rules: [[[{principals: [{Exact: cluster.local/ns/bar/sa/sleep}], sourceIps: [10.0.0.0/8]}]]]
- name: strict
  namespace: istio-system
  scope: Global
  action: Deny
  rules: [[[{notPrincipals: [{Presence: []}]}]]]
"#;

    #[test]
    fn parses_istio_format() {
        let s = parse("t.yaml", EXAMPLE).unwrap();
        let w = s.workload_by_ip("", "10.244.1.5".parse().unwrap()).unwrap();
        assert_eq!(w.protocol, TunnelProtocol::Hbone);
        assert_eq!(
            w.identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/foo/sa/echo"
        );
        assert!(w.waypoint.is_some());
        let legacy = s.workload_by_uid("legacy").unwrap();
        assert_eq!(legacy.protocol, TunnelProtocol::None);
        let svc = s.service_by_vip("", "10.96.0.10".parse().unwrap()).unwrap();
        assert_eq!(s.endpoints(&svc.key()).len(), 1);
        let pols = s.policies_for(&w);
        assert_eq!(pols.len(), 2);
        // Both YAML spellings of a variant are read.
        let map_form =
            "workloads: [{uid: a, namespace: n, waypoint: {destination: {Address: /10.0.0.9}}}]";
        let s = parse("t.yaml", map_form).unwrap();
        assert!(s.workload_by_uid("a").unwrap().waypoint.is_some());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "workloads: [{uid: a, namespace: n, workloadIps: [not-an-ip]}]",
                "workloads[0].workloadIps[0]",
            ),
            (
                "workloads: [{uid: a, namespace: n, bogus: 1}]",
                "workloads[0]",
            ),
            (
                "services: [{name: s, namespace: n, hostname: h, vips: [/x]}]",
                "services[0].vips[0]",
            ),
            (
                "policies: [{name: p, namespace: n, scope: Everywhere, action: Allow}]",
                "policies[0].scope",
            ),
            (
                "workloads: [{uid: a, namespace: 'b c'}]",
                "workloads[0].serviceAccount",
            ),
            (
                "workloads: [{uid: a, namespace: n}, {uid: a, namespace: n}]",
                "workloads[1].uid",
            ),
            (
                "workloads: [{uid: a, namespace: n, services: {nohost: {80: 80}}}]",
                "workloads[0].services",
            ),
            (
                "workloads: [{uid: a, namespace: n, waypoint: {destination: {Elsewhere: x}}}]",
                "workloads[0].waypoint.destination",
            ),
            (
                "policies: [{name: p, namespace: n, scope: Global, action: Deny, rules: [[[{principals: [{Regex: x}]}]]]}]",
                "policies[0].rules[0][0][0].principals[0]",
            ),
        ];
        for (text, field) in cases {
            let err = parse("t.yaml", text).unwrap_err().to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
