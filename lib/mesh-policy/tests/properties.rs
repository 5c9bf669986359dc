//! Property tests of the matchers through both evaluators (ztunnel via the L4 conversion and
//! mesh-core, waypoint via Envoy RBAC semantics): wildcard values and the `not*` fields.
//!
//! Sources: authz-semantics.md §1 item 8 and §6.1-§6.2 (istio.io docs/reference/config/
//! security/authorization-policy; istio/ztunnel src/rbac.rs `matches_internal`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};

use mesh_core::policy::{Connection, evaluate};
use mesh_policy::{MeshConfig, l4, parse_objects, rbac};
use proptest::prelude::*;

fn policy(field: &str, values: &[String]) -> mesh_policy::model::AuthorizationPolicy {
    let list = values
        .iter()
        .map(|v| format!("\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  rules: [{{from: [{{source: {{{field}: [{list}]}}}}]}}]\n"
    );
    parse_objects("p.yaml", &text)
        .unwrap()
        .authorization_policies
        .remove(0)
}

fn ztunnel_allows(p: &mesh_policy::model::AuthorizationPolicy, id: Option<&str>) -> bool {
    let c = l4::convert(p, &MeshConfig::default());
    let a = c.policy.unwrap().authorization;
    let conn = Connection {
        src: "10.0.0.1:1000".parse().unwrap(),
        dst: "10.0.0.2:8080".parse().unwrap(),
        src_identity: id.map(|i| i.parse().unwrap()),
    };
    evaluate([&a], &conn).allowed
}

fn waypoint_allows(p: &mesh_policy::model::AuthorizationPolicy, id: Option<&str>) -> bool {
    let view = rbac::View {
        peer: id.map(|i| i.parse().unwrap()),
        src_ip: "10.0.0.1".parse::<IpAddr>().unwrap(),
        dst_ip: "10.0.0.2".parse().unwrap(),
        dst_port: 8080,
        http: None,
    };
    let ctx = rbac::Ctx {
        trust_domains: vec!["cluster.local".into()],
    };
    rbac::evaluate(&[p], &view, &ctx).allowed
}

fn id(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

const NAMES: &str = "[a-c]{1,3}";

proptest! {
    // notNamespaces: allowed iff the peer's namespace is none of the values; plaintext always.
    #[test]
    fn not_namespaces(values in prop::collection::vec(NAMES, 1..4), ns in NAMES) {
        let p = policy("notNamespaces", &values);
        let want = !values.contains(&ns);
        let i = id(&ns, "x");
        prop_assert_eq!(ztunnel_allows(&p, Some(&i)), want);
        prop_assert_eq!(waypoint_allows(&p, Some(&i)), want);
        prop_assert!(ztunnel_allows(&p, None));
        prop_assert!(waypoint_allows(&p, None));
    }

    // namespaces is the positive twin: never plaintext.
    #[test]
    fn namespaces(values in prop::collection::vec(NAMES, 1..4), ns in NAMES) {
        let p = policy("namespaces", &values);
        let i = id(&ns, "x");
        prop_assert_eq!(ztunnel_allows(&p, Some(&i)), values.contains(&ns));
        prop_assert_eq!(waypoint_allows(&p, Some(&i)), values.contains(&ns));
        prop_assert!(!ztunnel_allows(&p, None));
        prop_assert!(!waypoint_allows(&p, None));
    }

    // notPrincipals with prefix wildcards: allowed iff no value's prefix matches.
    #[test]
    fn not_principals_prefix(prefixes in prop::collection::vec(NAMES, 1..3), ns in NAMES, sa in NAMES) {
        let values: Vec<String> = prefixes.iter().map(|p| format!("cluster.local/ns/{p}*")).collect();
        let p = policy("notPrincipals", &values);
        let principal = format!("cluster.local/ns/{ns}/sa/{sa}");
        let want = !prefixes.iter().any(|pre| principal.starts_with(&format!("cluster.local/ns/{pre}")));
        let i = id(&ns, &sa);
        prop_assert_eq!(ztunnel_allows(&p, Some(&i)), want);
        prop_assert_eq!(waypoint_allows(&p, Some(&i)), want);
        prop_assert!(ztunnel_allows(&p, None));
    }

    // principals with suffix wildcards `*/sa/<x>`.
    #[test]
    fn principals_suffix(sas in prop::collection::vec(NAMES, 1..3), ns in NAMES, sa in NAMES) {
        let values: Vec<String> = sas.iter().map(|s| format!("*/sa/{s}")).collect();
        let p = policy("principals", &values);
        let i = id(&ns, &sa);
        prop_assert_eq!(ztunnel_allows(&p, Some(&i)), sas.contains(&sa));
        prop_assert_eq!(waypoint_allows(&p, Some(&i)), sas.contains(&sa));
    }

    // notServiceAccounts (ns/sa form): allowed iff the pair is none of the values.
    #[test]
    fn not_service_accounts(pairs in prop::collection::vec((NAMES, NAMES), 1..3), ns in NAMES, sa in NAMES) {
        let values: Vec<String> = pairs.iter().map(|(n, s)| format!("{n}/{s}")).collect();
        let p = policy("notServiceAccounts", &values);
        let want = !pairs.contains(&(ns.clone(), sa.clone()));
        let i = id(&ns, &sa);
        prop_assert_eq!(ztunnel_allows(&p, Some(&i)), want);
        prop_assert_eq!(waypoint_allows(&p, Some(&i)), want);
        prop_assert!(ztunnel_allows(&p, None));
        prop_assert!(waypoint_allows(&p, None));
    }

    // notIpBlocks: allowed iff the source IP is in none of the /32s (identity irrelevant).
    #[test]
    fn not_ip_blocks(octets in prop::collection::vec(0u8..4, 1..3), src in 0u8..4) {
        let values: Vec<String> = octets.iter().map(|o| format!("10.0.0.{o}")).collect();
        let p = policy("notIpBlocks", &values);
        let c = l4::convert(&p, &MeshConfig::default()).policy.unwrap().authorization;
        let conn = Connection {
            src: SocketAddr::new(IpAddr::from([10, 0, 0, src]), 1000),
            dst: "10.0.0.9:8080".parse().unwrap(),
            src_identity: None,
        };
        prop_assert_eq!(evaluate([&c], &conn).allowed, !octets.contains(&src));
    }
}

// Robustness: any string in any field of a policy is either rejected with a message or
// explained; nothing panics (issue 5 §4 "Never a panic").
const FIELDS: [&str; 14] = [
    "principals",
    "notPrincipals",
    "namespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "requestPrincipals",
    "trustDomains",
    "notTrustDomains",
    "namespaces",
    "notNamespaces",
    "notRequestPrincipals",
];
const OPS: [&str; 8] = [
    "ports",
    "notPorts",
    "paths",
    "notPaths",
    "methods",
    "notMethods",
    "hosts",
    "notHosts",
];
const KEYS: [&str; 8] = [
    "source.ip",
    "destination.port",
    "request.headers[x]",
    "request.auth.claims[a][b]",
    "connection.sni",
    "experimental.envoy.filters.a[b]",
    "source.trustDomain",
    "weird",
];

proptest! {
    #[test]
    fn arbitrary_values_never_panic(
        f in 0..FIELDS.len(),
        o in 0..OPS.len(),
        k in 0..KEYS.len(),
        deny in any::<bool>(),
        v in "\\PC{0,12}",
        w in "[*/{}a-z0-9.:%é]{0,12}",
    ) {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let (v, w) = (esc(&v), esc(&w));
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  targetRefs: [{{kind: Service, name: httpbin}}]\n  action: {}\n  rules:\n  - from: [{{source: {{{}: [\"{v}\", \"{w}\"]}}}}]\n    to: [{{operation: {{{}: [\"{w}\"]}}}}]\n    when: [{{key: \"{}\", values: [\"{v}\"], notValues: [\"{w}\"]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: q, namespace: foo}}\nspec:\n  action: {}\n  rules:\n  - from: [{{source: {{{}: [\"{w}\"]}}}}]\n    to: [{{operation: {{{}: [\"{v}\"]}}}}]\n",
            if deny { "DENY" } else { "ALLOW" },
            FIELDS[f], OPS[o], KEYS[k],
            if deny { "ALLOW" } else { "DENY" },
            FIELDS[f], OPS[o],
        );
        let Ok(set) = parse_objects("p.yaml", &text) else { return Ok(()) };
        let mut req = base_request();
        let _ = mesh_policy::explain(&set, &MeshConfig::default(), &req);
        req.protocol = mesh_policy::explain::Protocol::Http;
        req.http = Some(mesh_policy::explain::HttpRequest {
            method: "GET".into(),
            path: format!("/{}", w.replace('?', "")),
            host: v.clone(),
            ..Default::default()
        });
        let _ = mesh_policy::explain(&set, &MeshConfig { strict_policy: true, ..Default::default() }, &req);
    }
}

fn base_request() -> mesh_policy::Request {
    use mesh_policy::explain::*;
    Request {
        source: Client {
            identity: Some("spiffe://cluster.local/ns/bar/sa/sleep".parse().unwrap()),
            ip: "10.244.1.5".parse().unwrap(),
        },
        destination: Destination {
            namespace: "foo".into(),
            workload: Workload {
                labels: Default::default(),
                service_account: "httpbin".into(),
                ip: "10.244.2.7".parse().unwrap(),
                port: 8080,
            },
            service: Some(Service {
                name: "httpbin".into(),
                vip: "10.96.10.20".parse().unwrap(),
                port: 8000,
            }),
            addressed_to: mesh_policy::scope::AddressedTo::Service,
        },
        protocol: Protocol::Tcp,
        http: None,
        waypoint: Some(Waypoint {
            name: "waypoint".into(),
            namespace: "default".into(),
            service_account: "waypoint".into(),
            ip: "10.244.3.9".parse().unwrap(),
            for_: mesh_policy::scope::WaypointFor::All,
        }),
    }
}
