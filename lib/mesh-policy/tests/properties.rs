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
