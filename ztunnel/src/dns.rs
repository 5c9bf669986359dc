//! The DNS proxy's answers: which mesh names ztunnel resolves itself, and to what.
//!
//! Pods whose DNS is captured (UDP/TCP 53 → `127.0.0.1:15053`, see `docs/cni.md`) ask
//! ztunnel first. A name is answered here when it names a service the mesh knows — from the
//! asking pod's point of view, as Istio's ztunnel does it:
//!
//! - the name as asked, then its Kubernetes expansions: `a` → `a.<client-ns>.svc.<domain>`,
//!   `a.b` → `a.b.svc.<domain>`, `a.b.svc` → `a.b.svc.<domain>`;
//! - the name with one of the client's search domains stripped (a resolver that appended
//!   `default.svc.cluster.local` to `example.com`): answered as a CNAME to the stripped name
//!   plus its addresses;
//! - each alias is tried as is, then as wildcards (`*.example.com`, `*.com`), for
//!   ServiceEntry hosts;
//! - among services of one hostname in several namespaces, the client's namespace wins;
//! - a service without VIPs is skipped (so the name is forwarded), unless it is a Kubernetes
//!   headless service, which answers with its endpoints' addresses.
//!
//! A and AAAA only; everything else, unknown clients and unknown names are forwarded
//! upstream ([`server`]). A known name without an address of the asked family is answered
//! with no records (NODATA), so the client does not go on to search domains.
//!
//! Not here yet: pod hostnames of headless services (`<pod>.<subdomain>.<ns>.svc`).

pub mod resolvconf;
pub mod server;

use std::{net::IpAddr, sync::Arc};

use mesh_core::workload::Service;

use crate::state::State;

/// Istio's answer TTL for mesh names.
pub const TTL_SECS: u32 = 30;

/// Address family asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn has(self, ip: &IpAddr) -> bool {
        matches!(
            (self, ip),
            (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_))
        )
    }
}

/// What the proxy does with one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Answer locally. `cname` is `Some(target)` when the asked name had a search domain
    /// stripped: the answer is `asked CNAME target` and the addresses under `target`.
    Local {
        cname: Option<String>,
        addrs: Vec<IpAddr>,
    },
    /// Not a mesh name (or not ours to answer): ask the upstream resolvers.
    Forward,
}

/// Resolves names against the mesh state for one cluster domain.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// e.g. `cluster.local` (lower case, no dots at either end).
    domain: String,
    /// Search domains from ztunnel's resolv.conf besides the per-client Kubernetes ones.
    extra_search: Vec<String>,
    /// `.svc.<domain>`: the hostname suffix of Kubernetes services.
    svc_suffix: String,
}

struct Alias {
    name: String,
    /// Set when this alias came from stripping a search domain off the asked name.
    stripped: bool,
}

impl Resolver {
    pub fn new(domain: &str, extra_search: Vec<String>) -> Self {
        let domain = normalize(domain);
        Resolver {
            svc_suffix: format!(".svc.{domain}"),
            domain,
            extra_search: extra_search.iter().map(|d| normalize(d)).collect(),
        }
    }

    /// The search domains a client in namespace `ns` has: `<ns>.svc.<domain>`,
    /// `svc.<domain>`, `<domain>`, then resolv.conf's others.
    pub fn search_domains(&self, ns: &str) -> Vec<String> {
        let mut v = vec![
            format!("{ns}.svc.{}", self.domain),
            format!("svc.{}", self.domain),
            self.domain.clone(),
        ];
        for d in &self.extra_search {
            if !v.contains(d) {
                v.push(d.clone());
            }
        }
        v
    }

    /// Answers `name` (any case, trailing dot allowed) for a client in namespace
    /// `client_ns` (`None`: not a mesh workload), or says to forward.
    pub fn resolve(
        &self,
        state: &State,
        client_ns: Option<&str>,
        name: &str,
        family: Family,
    ) -> Answer {
        let Some(ns) = client_ns else {
            return Answer::Forward;
        };
        let name = normalize(name);
        if name.is_empty() {
            return Answer::Forward;
        }
        for alias in self.aliases(ns, &name) {
            for candidate in wildcards(&alias.name) {
                let Some(svc) = self.best_service(state, ns, &candidate) else {
                    continue;
                };
                let addrs = self.addresses(state, &svc, family);
                let cname = (alias.stripped && alias.name != name).then(|| alias.name.clone());
                return Answer::Local { cname, addrs };
            }
        }
        Answer::Forward
    }

    fn aliases(&self, ns: &str, name: &str) -> Vec<Alias> {
        let mut out: Vec<Alias> = Vec::new();
        let push = |out: &mut Vec<Alias>, name: String, stripped: bool| {
            if !out.iter().any(|a| a.name == name) {
                out.push(Alias { name, stripped });
            }
        };
        push(&mut out, name.to_owned(), false);
        for fqdn in self.kube_fqdns(ns, name) {
            push(&mut out, fqdn, false);
        }
        for search in self.search_domains(ns) {
            if let Some(stripped) = name
                .strip_suffix(search.as_str())
                .and_then(|s| s.strip_suffix('.'))
                .filter(|s| !s.is_empty())
            {
                push(&mut out, stripped.to_owned(), true);
                for fqdn in self.kube_fqdns(ns, stripped) {
                    push(&mut out, fqdn, true);
                }
            }
        }
        out
    }

    /// The Kubernetes service FQDNs a partial name can stand for.
    fn kube_fqdns(&self, ns: &str, name: &str) -> Vec<String> {
        let labels: Vec<&str> = name.split('.').collect();
        match labels.len() {
            1 => vec![format!("{name}.{ns}.svc.{}", self.domain)],
            2 => vec![format!("{name}.svc.{}", self.domain)],
            3 if labels[2] == "svc" => vec![format!("{name}.{}", self.domain)],
            _ => Vec::new(),
        }
    }

    fn is_kube_headless(&self, svc: &Service) -> bool {
        let (host, suffix) = (svc.hostname.as_bytes(), self.svc_suffix.as_bytes());
        svc.vips.is_empty()
            && host.len() > suffix.len()
            && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    }

    fn best_service(&self, state: &State, client_ns: &str, host: &str) -> Option<Arc<Service>> {
        let mut candidates = state
            .services_by_hostname(host)
            .iter()
            .filter(|s| !s.vips.is_empty() || self.is_kube_headless(s));
        let first = candidates.next()?;
        if first.namespace == client_ns {
            return Some(first.clone());
        }
        Some(
            candidates
                .find(|s| s.namespace == client_ns)
                .unwrap_or(first)
                .clone(),
        )
    }

    fn addresses(&self, state: &State, svc: &Service, family: Family) -> Vec<IpAddr> {
        let mut addrs: Vec<IpAddr> = if svc.vips.is_empty() {
            state
                .endpoints(&svc.key())
                .iter()
                .flat_map(|e| e.workload.workload_ips.iter().copied())
                .filter(|ip| family.has(ip))
                .collect()
        } else {
            svc.vips
                .iter()
                .map(|v| v.address)
                .filter(|ip| family.has(ip))
                .collect()
        };
        addrs.sort();
        addrs.dedup();
        addrs
    }
}

/// Lower case, without leading or trailing dots.
fn normalize(name: &str) -> String {
    name.trim_matches('.').to_ascii_lowercase()
}

/// `www.example.com` → `www.example.com`, `*.example.com`, `*.com`.
fn wildcards(name: &str) -> Vec<String> {
    let mut out = vec![name.to_owned()];
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        out.push(format!("*.{parent}"));
        rest = parent;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::Ipv4Addr};

    use mesh_core::workload::{NetworkAddress, Service, Workload};

    use super::*;

    fn svc(ns: &str, host: &str, vips: &[&str]) -> Service {
        Service {
            name: host.split('.').next().unwrap_or_default().to_owned(),
            namespace: ns.to_owned(),
            hostname: host.to_owned(),
            vips: vips
                .iter()
                .map(|v| NetworkAddress {
                    network: String::new(),
                    address: v.parse().unwrap(),
                })
                .collect(),
            ports: BTreeMap::from([(80, 8080)]),
            waypoint: None,
        }
    }

    fn pod(uid: &str, ns: &str, ip: &str, backs: &[&str]) -> Workload {
        Workload {
            uid: uid.to_owned(),
            name: uid.to_owned(),
            namespace: ns.to_owned(),
            workload_ips: vec![ip.parse().unwrap()],
            services: backs
                .iter()
                .map(|s| ((*s).to_owned(), Default::default()))
                .collect(),
            ..Default::default()
        }
    }

    fn state() -> State {
        State::from_parts(
            vec![
                pod("client", "default", "10.0.0.9", &[]),
                pod(
                    "db-0",
                    "data",
                    "10.0.1.1",
                    &["data/db.data.svc.cluster.local"],
                ),
                pod(
                    "db-1",
                    "data",
                    "fd00::11",
                    &["data/db.data.svc.cluster.local"],
                ),
            ],
            vec![
                svc(
                    "default",
                    "reviews.default.svc.cluster.local",
                    &["10.96.0.10", "fd00::10"],
                ),
                svc("other", "reviews.other.svc.cluster.local", &["10.96.0.20"]),
                svc("data", "db.data.svc.cluster.local", &[]),
                svc("default", "*.example.com", &["240.240.0.1"]),
                svc("default", "novip.example.org", &[]),
                svc("a", "shared.example.net", &["240.240.0.2"]),
                svc("default", "shared.example.net", &["240.240.0.3"]),
            ],
            vec![],
        )
    }

    fn ask(name: &str, family: Family) -> Answer {
        let st = state();
        let client = st.workload_by_uid("client").map(|w| w.namespace.clone());
        Resolver::new("cluster.local", vec![]).resolve(&st, client.as_deref(), name, family)
    }

    fn local(addrs: &[&str]) -> Answer {
        Answer::Local {
            cname: None,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn short_and_partial_names_expand_from_the_clients_namespace() {
        for name in [
            "reviews",
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster.local",
            "Reviews.Default.SVC.cluster.local.",
        ] {
            assert_eq!(ask(name, Family::V4), local(&["10.96.0.10"]), "{name}");
        }
        assert_eq!(ask("reviews.other", Family::V4), local(&["10.96.0.20"]));
        assert_eq!(ask("reviews", Family::V6), local(&["fd00::10"]));
    }

    #[test]
    fn search_domain_appended_by_the_client_is_stripped_into_a_cname() {
        let got = ask("www.example.com.default.svc.cluster.local", Family::V4);
        assert_eq!(
            got,
            Answer::Local {
                cname: Some("www.example.com".into()),
                addrs: vec![IpAddr::V4(Ipv4Addr::new(240, 240, 0, 1))],
            }
        );
    }

    #[test]
    fn wildcard_hosts_match_subdomains_only() {
        assert_eq!(ask("a.b.example.com", Family::V4), local(&["240.240.0.1"]));
        assert_eq!(ask("example.com", Family::V4), Answer::Forward);
    }

    #[test]
    fn headless_kubernetes_service_answers_with_endpoints_other_vipless_hosts_forward() {
        assert_eq!(ask("db.data", Family::V4), local(&["10.0.1.1"]));
        assert_eq!(ask("db.data", Family::V6), local(&["fd00::11"]));
        assert_eq!(ask("novip.example.org", Family::V4), Answer::Forward);
    }

    #[test]
    fn known_name_without_that_family_is_nodata_not_forwarded() {
        assert_eq!(ask("reviews.other", Family::V6), local(&[]));
    }

    #[test]
    fn clients_namespace_wins_among_equal_hostnames() {
        assert_eq!(
            ask("shared.example.net", Family::V4),
            local(&["240.240.0.3"])
        );
    }

    #[test]
    fn unknown_names_and_unknown_clients_are_forwarded() {
        assert_eq!(ask("www.google.com", Family::V4), Answer::Forward);
        assert_eq!(ask("nosuch", Family::V4), Answer::Forward);
        assert_eq!(ask("", Family::V4), Answer::Forward);
        let st = state();
        assert_eq!(
            Resolver::new("cluster.local", vec![]).resolve(&st, None, "reviews", Family::V4),
            Answer::Forward
        );
    }

    #[test]
    fn search_domains_put_the_kubernetes_ones_first() {
        let r = Resolver::new(
            "cluster.local.",
            vec!["corp.example".into(), "svc.cluster.local".into()],
        );
        assert_eq!(
            r.search_domains("ns1"),
            vec![
                "ns1.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ]
        );
    }
}
