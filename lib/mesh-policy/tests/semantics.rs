//! Table tests pinning the rules of `shared/reference/authz-semantics.md` (§1, §3-§9) and
//! `waypoint-semantics.md` (§3-§4) end to end through `explain`. Each case name says the rule;
//! the comment above each group cites its source (an istio.io page, or a test/file in Istio or
//! ztunnel).
//!
//! A case's outcome is summarised as `hop:decision(policy#rule)` per hop, e.g.
//! `waypoint:allow(-) ztunnel:deny(foo/p#0)`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use mesh_policy::{
    Explanation, MeshConfig,
    explain::{
        Client, Destination, HttpRequest, JwtInput, Protocol, Request, Service, Waypoint, Workload,
    },
    parse_objects,
    path::PathNormalization,
    scope::{AddressedTo, WaypointFor},
};
use test_case::test_case;

fn base() -> Request {
    Request {
        source: Client {
            identity: Some("spiffe://cluster.local/ns/bar/sa/sleep".parse().unwrap()),
            ip: "10.244.1.5".parse().unwrap(),
        },
        destination: Destination {
            namespace: "foo".into(),
            workload: Workload {
                labels: BTreeMap::from([("app".into(), "httpbin".into())]),
                service_account: "httpbin".into(),
                ip: "10.244.2.7".parse().unwrap(),
                port: 8080,
            },
            service: Some(Service {
                name: "httpbin".into(),
                vip: "10.96.10.20".parse().unwrap(),
                port: 8000,
            }),
            addressed_to: AddressedTo::Service,
        },
        protocol: Protocol::Tcp,
        http: None,
        waypoint: None,
    }
}

/// Request modifiers, applied left to right from a `+`-separated spec such as
/// `wp+http:GET:/ip`.
fn request(spec: &str) -> Request {
    let mut r = base();
    for part in spec.split('+').filter(|p| !p.is_empty()) {
        let mut it = part.splitn(2, ':');
        let (k, v) = (it.next().unwrap(), it.next().unwrap_or(""));
        match k {
            "plain" => r.source.identity = None,
            "id" => r.source.identity = Some(v.parse().unwrap()),
            "srcip" => r.source.ip = v.parse().unwrap(),
            "pod" => r.destination.addressed_to = AddressedTo::Workload,
            "wp" | "wpw" | "wpa" => {
                r.waypoint = Some(Waypoint {
                    name: "waypoint".into(),
                    namespace: "default".into(),
                    service_account: "waypoint".into(),
                    ip: "10.244.3.9".parse().unwrap(),
                    for_: match k {
                        "wp" => WaypointFor::Service,
                        "wpw" => WaypointFor::Workload,
                        _ => WaypointFor::All,
                    },
                })
            }
            "http" => {
                let (m, p) = v.split_once(':').unwrap();
                r.protocol = Protocol::Http;
                r.http = Some(HttpRequest {
                    method: m.into(),
                    path: p.into(),
                    host: "httpbin.foo".into(),
                    ..Default::default()
                });
            }
            "host" => r.http.as_mut().unwrap().host = v.into(),
            "hdr" => {
                let (n, val) = v.split_once('=').unwrap();
                r.http
                    .as_mut()
                    .unwrap()
                    .headers
                    .insert(n.into(), val.into());
            }
            "jwt" | "badjwt" => {
                let mut claims = serde_json::Map::new();
                claims.insert("groups".into(), serde_json::json!(["dev"]));
                claims.insert("aud".into(), serde_json::json!("app"));
                r.http.as_mut().unwrap().jwt = Some(JwtInput {
                    valid: k == "jwt",
                    iss: if v.is_empty() {
                        "https://issuer.example.com".into()
                    } else {
                        v.into()
                    },
                    sub: "sub-1".into(),
                    claims,
                });
            }
            other => panic!("unknown modifier {other}"),
        }
    }
    r
}

fn mesh(spec: &str) -> MeshConfig {
    let mut m = MeshConfig::default();
    for part in spec.split('+').filter(|p| !p.is_empty()) {
        match part {
            "strict" => m.strict_policy = true,
            "autoallow" => m.feature_flags.auto_allow_waypoint_policy = true,
            "dryrunflag" => m.feature_flags.ambient_dry_run = true,
            "layered" => m.feature_flags.layered_waypoint_policies = true,
            "merge" => m.path_normalization = PathNormalization::MergeSlashes,
            "td" => {
                m.trust_domain = "example.org".into();
            }
            "alias" => {
                m.trust_domain = "example.org".into();
                m.trust_domain_aliases = vec!["old.example.org".into()];
            }
            other => panic!("unknown mesh modifier {other}"),
        }
    }
    m
}

/// Expands `NS/NAME KIND? SPEC` shorthand lines into manifests: each `---`-separated chunk is
/// `ns/name` on the first line and the spec (YAML) below.
fn policies(text: &str) -> String {
    text.split("\n---\n")
        .filter(|c| !c.trim().is_empty())
        .map(|chunk| {
            let chunk = chunk.trim_start_matches('\n');
            let (head, spec) = chunk.split_once('\n').unwrap_or((chunk, ""));
            let mut h = head.split_whitespace();
            let id = h.next().unwrap();
            let kind = h.next().unwrap_or("AuthorizationPolicy");
            let (ns, name) = id.split_once('/').unwrap();
            let (name, ann) = match name.strip_suffix("!dry") {
                Some(n) => (n, ", annotations: {istio.io/dry-run: \"true\"}"),
                None => (name, ""),
            };
            let spec = if spec.trim().is_empty() { "spec: {}".to_string() } else { format!("spec:\n{spec}") };
            format!(
                "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}{ann}}}\n{spec}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn summary(e: &Explanation) -> String {
    e.hops
        .iter()
        .map(|h| {
            let at = serde_json::to_value(h.at).unwrap();
            let d = serde_json::to_value(h.decision).unwrap();
            let pol = match (&h.policy, h.rule) {
                (Some(p), Some(r)) => format!("{p}#{r}"),
                (Some(p), None) => p.clone(),
                _ => "-".into(),
            };
            format!("{}:{}({pol})", at.as_str().unwrap(), d.as_str().unwrap())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(pols: &str, req: &str, m: &str) -> Explanation {
    let set = parse_objects("case.yaml", &policies(pols)).unwrap();
    mesh_policy::explain(&set, &mesh(m), &request(req)).unwrap()
}

fn check(pols: &str, req: &str, m: &str) -> String {
    summary(&run(pols, req, m))
}

fn warnings(e: &Explanation) -> String {
    e.hops
        .iter()
        .flat_map(|h| h.warnings.iter().cloned())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// §1 item 1, §3: CUSTOM -> DENY -> no ALLOW? allow -> ALLOW match? allow -> deny; AUDIT and
// dry-run never decide. Sources: istio/api security/v1beta1/authorization_policy.proto
// (evaluation order), istio/ztunnel src/state.rs `assert_rbac`, istio.io
// docs/reference/config/security/authorization-policy.
const ALLOW_ALL: &str = "foo/allow\n  rules: [{}]\n";
const DENY_ALL: &str = "foo/deny\n  action: DENY\n  rules: [{}]\n";

#[test_case("", "" => "ztunnel:allow(-)" ; "s3 no policy allows")]
#[test_case(ALLOW_ALL, "" => "ztunnel:allow(foo/allow#0)" ; "s3 allow all")]
#[test_case(&format!("{ALLOW_ALL}---\n{DENY_ALL}"), "" => "ztunnel:deny(foo/deny#0)" ; "s3 deny before allow")]
#[test_case("foo/nothing\n", "" => "ztunnel:deny(-)" ; "s4 allow nothing denies")]
#[test_case("foo/nothing\n", "plain" => "ztunnel:deny(-)" ; "s4 allow nothing denies plaintext too")]
#[test_case(ALLOW_ALL, "plain" => "ztunnel:allow(foo/allow#0)" ; "s4 empty rule matches plaintext")]
#[test_case(DENY_ALL, "plain" => "ztunnel:deny(foo/deny#0)" ; "s4 deny empty rule denies plaintext")]
#[test_case("foo/audit\n  action: AUDIT\n  rules: [{}]\n", "" => "ztunnel:allow(-)" ; "s3 audit never decides and is not sent")]
#[test_case("foo/audit\n  action: AUDIT\n  rules: [{}]\n---\nfoo/nothing\n", "" => "ztunnel:deny(-)" ; "s3 audit does not count as allow")]
#[test_case("foo/d!dry\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:allow(-)" ; "s3 dry run not sent without flag")]
#[test_case("foo/a!dry\n  rules: [{}]\n---\nfoo/nothing\n", "" => "ztunnel:deny(-)" ; "s3 dry run allow never allows")]
#[test_case("foo/a!dry\n  rules: [{from: [{source: {principals: [nobody]}}]}]\n", "" => "ztunnel:allow(-)" ; "s3 dry run allow does not make allow non empty")]
#[test_case("foo/ext\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n", "" => "ztunnel:allow(-)" ; "s1i10 custom selector policy not enforced by ztunnel")]
fn order(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

#[test]
fn s3_dry_run_flag_sends_and_logs() {
    // authz-semantics.md §3 "Dry-run in ambient" (AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY).
    let e = run(
        "foo/d!dry\n  action: DENY\n  rules: [{}]\n",
        "",
        "dryrunflag",
    );
    assert_eq!(summary(&e), "ztunnel:allow(-)");
    assert!(warnings(&e).contains("dry-run Deny policy foo/d rule 0 matched"));
    let e = run("foo/d!dry\n  action: DENY\n  rules: [{}]\n", "", "");
    assert!(warnings(&e).contains("not sent to ztunnel"));
}

#[test]
fn s1i10_quirks_surface_warnings_and_strict_fails_closed() {
    // authz-semantics.md §1 item 10; istio/istio authorization.go (UnsupportedValue status).
    let custom = "foo/ext\n  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n";
    let e = run(custom, "", "");
    assert!(warnings(&e).contains("does not enforce CUSTOM"));
    assert_eq!(
        e.conditions[0].message,
        "ztunnel does not support the CUSTOM action"
    );
    assert_eq!(check(custom, "", "strict"), "ztunnel:deny(foo/ext#0)");
}

// ---------------------------------------------------------------------------------------
// §5 attachment. Sources: istio.io docs/ambient/usage/l4-policy, docs/ambient/usage/
// authorization-policy; istio/istio pilot/pkg/model/policyattachment.go; istio/istio#51556.
#[test_case("istio-system/global\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:deny(istio-system/global#0)" ; "s5 root namespace policy is global")]
#[test_case("istio-system/rootsel\n  selector: {matchLabels: {app: httpbin}}\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:deny(istio-system/rootsel#0)" ; "s5 root selector applies in every namespace")]
#[test_case("bar/other\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:allow(-)" ; "s5 other namespace does not apply")]
#[test_case("foo/sel\n  selector: {matchLabels: {app: other}}\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:allow(-)" ; "s5 selector must be label subset")]
#[test_case("foo/sel\n  selector: {matchLabels: {app: httpbin}}\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:deny(foo/sel#0)" ; "s5 selector matches")]
#[test_case("foo/svc\n  targetRefs: [{kind: Service, group: \"\", name: httpbin}]\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:allow(-)" ; "s1i3 targetRefs policies are never sent to ztunnel")]
#[test_case("foo/empty\n  selector: {}\n  action: DENY\n  rules: [{}]\n", "" => "ztunnel:allow(-)" ; "s5 empty selector attaches to nothing in ambient")]
fn attachment(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

#[test]
fn s5_empty_selector_strict_and_warning() {
    let p = "foo/empty\n  selector: {}\n  action: DENY\n  rules: [{}]\n";
    assert!(warnings(&run(p, "", "")).contains("attaches to no workload in ambient"));
    assert_eq!(check(p, "", "strict"), "ztunnel:deny(foo/empty#0)");
}

#[test]
fn s5_target_ref_without_waypoint_is_reported() {
    let p = "foo/svc\n  targetRefs: [{kind: Service, group: \"\", name: httpbin}]\n  action: DENY\n  rules: [{}]\n";
    let e = run(p, "", "");
    assert!(warnings(&e).contains("enforced nowhere"));
    assert!(e.conditions.iter().any(|c| c.reason == "AncestorNotBound"
        && c.message == "Service foo/httpbin is not bound to a waypoint"));
}

// ---------------------------------------------------------------------------------------
// §1 item 4, §5.2, §10, waypoint-semantics §3.1/§4.3: behind a waypoint the destination
// ztunnel sees the waypoint's identity and IP. Sources: istio.io docs/ambient/usage/l4-policy
// ("Enforcement table"), docs/ambient/getting-started/enforce-auth-policies; istio/istio
// tests/integration/ambient/baseline_test.go TestAuthorizationL4 / TestWaypointDefaultDeny.
const ALLOW_SLEEP: &str = "foo/allow-sleep\n  selector: {matchLabels: {app: httpbin}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]}]\n";
const DENY_SLEEP: &str = "foo/deny-sleep\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]}]\n";
const ALLOW_WP: &str = "foo/allow-wp\n  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/waypoint]}}]}]\n";

#[test_case(ALLOW_SLEEP, "" => "ztunnel:allow(foo/allow-sleep#0)" ; "s5_2 allow client principal without waypoint")]
#[test_case(ALLOW_SLEEP, "wp" => "waypoint:allow(-) ztunnel:deny(-)" ; "s1i4 allow by client principal becomes deny behind waypoint")]
#[test_case(DENY_SLEEP, "" => "ztunnel:deny(foo/deny-sleep#0)" ; "s5_2 deny client principal without waypoint")]
#[test_case(DENY_SLEEP, "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s1i4 deny by client principal is bypassed behind waypoint")]
#[test_case(ALLOW_WP, "wp" => "waypoint:allow(-) ztunnel:allow(foo/allow-wp#0)" ; "s5_2 allow the waypoint identity at ztunnel")]
#[test_case("foo/ip\n  action: DENY\n  rules: [{from: [{source: {ipBlocks: [10.244.3.9]}}]}]\n", "wp" => "waypoint:allow(-) ztunnel:deny(foo/ip#0)" ; "s5_2 ztunnel ipBlocks see the waypoint pod ip")]
#[test_case("foo/ns-deny\n  action: DENY\n  rules: [{from: [{source: {namespaces: [bar]}}]}]\n", "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s5_1 waypoints ignore namespace wide policies")]
fn behind_waypoint(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

#[test]
fn s5_2_warning_names_the_waypoint_identity() {
    let w = warnings(&run(ALLOW_SLEEP, "wp", ""));
    assert!(
        w.contains("sees the waypoint's identity (cluster.local/ns/default/sa/waypoint)"),
        "{w}"
    );
}

// §8.4 and waypoint-semantics §3.4: PILOT_AUTO_ALLOW_WAYPOINT_POLICY. Source: istio/istio
// pilot/pkg/serviceregistry/ambient/policies.go (istio_allow_waypoint_*), istio.io PR 17520.
#[test_case("wp" => "waypoint:allow(-) ztunnel:allow(default/istio_allow_waypoint_default_waypoint#0)" ; "s8_4 auto allow admits the waypoint")]
#[test_case("wp+pod" => "ztunnel:deny(-)" ; "s8_4 auto allow denies clients that bypass the waypoint")]
fn auto_allow(req: &str) -> String {
    check("", req, "autoallow")
}

// ---------------------------------------------------------------------------------------
// waypoint-semantics §3.2-§3.3 traversal. Sources: istio.io docs/ambient/usage/waypoint
// ("waypoint traffic types"), istio/istio pilot/pkg/serviceregistry/ambient/waypoints.go.
const WP_DENY_ALL: &str = "default/gw\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{}]\n";
const SVC_DENY_ALL: &str = "foo/svc\n  targetRefs: [{kind: Service, group: \"\", name: httpbin}]\n  action: DENY\n  rules: [{}]\n";

#[test_case(WP_DENY_ALL, "wp" => "waypoint:deny(default/gw#0)" ; "w3_1 service addressed traffic goes through a service waypoint")]
#[test_case(WP_DENY_ALL, "wp+pod" => "ztunnel:allow(-)" ; "w3_2 dialling the pod ip bypasses a service waypoint")]
#[test_case(WP_DENY_ALL, "wpw" => "ztunnel:allow(-)" ; "w3_2 service addressed traffic never uses a workload waypoint")]
#[test_case(WP_DENY_ALL, "wpw+pod" => "waypoint:deny(default/gw#0)" ; "w3_2 workload waypoint gets pod ip traffic")]
#[test_case(WP_DENY_ALL, "wpa+pod" => "waypoint:deny(default/gw#0)" ; "w1 waypoint for all gets pod ip traffic")]
#[test_case(WP_DENY_ALL, "wp+plain" => "ztunnel:allow(-)" ; "w3_3 uncaptured plaintext client skips the waypoint")]
#[test_case(SVC_DENY_ALL, "wp" => "waypoint:deny(foo/svc#0)" ; "w4_1 service targetRef applies to service addressed traffic")]
#[test_case(SVC_DENY_ALL, "wpa+pod" => "waypoint:allow(-) ztunnel:allow(-)" ; "w4_1 workload addressed traffic gets only gateway policies")]
#[test_case("istio-system/class\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n  action: DENY\n  rules: [{}]\n", "wp" => "waypoint:deny(istio-system/class#0)" ; "w4_1 gatewayclass policy in root namespace applies to every waypoint")]
#[test_case("foo/class\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n  action: DENY\n  rules: [{}]\n", "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "w4_1 gatewayclass policy outside root namespace is ignored")]
#[test_case("default/other-gw\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]\n  action: DENY\n  rules: [{}]\n", "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "w4_1 policy for another gateway does not apply")]
#[test_case("foo/gw-wrong-ns\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{}]\n", "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "w4_1 gateway policy must be in the waypoint namespace")]
#[test_case("default/legacy\n  selector: {matchLabels: {istio.io/gateway-name: waypoint}}\n  action: DENY\n  rules: [{}]\n", "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s11 legacy selector policies on waypoint pods do nothing")]
fn traversal(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

#[test]
fn w3_bypass_and_layered_flag() {
    let w = warnings(&run(WP_DENY_ALL, "wp+pod", ""));
    assert!(
        w.contains("a service waypoint is bypassed by dialling the pod IP"),
        "{w}"
    );
    let legacy = "default/legacy\n  selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n  action: DENY\n  rules: [{from: [{source: {namespaces: [bar]}}]}]\n";
    assert!(warnings(&run(legacy, "wp", "")).contains("waypoints ignore selector policies"));
    // authz-semantics §5.1: ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES (listener_waypoint.go).
    assert_eq!(
        check(legacy, "wp", "layered"),
        "waypoint:deny(default/legacy#0)"
    );
}

// ---------------------------------------------------------------------------------------
// §6 matching. Sources: istio.io docs/reference/config/security/authorization-policy and
// docs/reference/config/security/conditions; istio/ztunnel src/rbac.rs tests; istio/istio
// pilot/pkg/security/authz/matcher/*_test.go; istio/ztunnel#1901, #1260.
#[test_case("foo/p\n  rules: [{from: [{source: {principals: [\"cluster.local/ns/bar/*\"]}}]}]\n", "" => "ztunnel:allow(foo/p#0)" ; "s6_2 principal prefix")]
#[test_case("foo/p\n  rules: [{from: [{source: {principals: [\"*/sa/sleep\"]}}]}]\n", "" => "ztunnel:allow(foo/p#0)" ; "s6_2 principal suffix")]
#[test_case("foo/p\n  rules: [{from: [{source: {principals: [spiffe://cluster.local/ns/bar/sa/sleep]}}]}]\n", "" => "ztunnel:deny(-)" ; "s1i7 principal with spiffe scheme never matches")]
#[test_case("foo/p\n  rules: [{from: [{source: {principals: [\"*\"]}}]}]\n", "plain" => "ztunnel:deny(-)" ; "s1i8 principals star never matches plaintext")]
#[test_case("foo/p\n  rules: [{from: [{source: {namespaces: [\"*\"]}}]}]\n", "plain" => "ztunnel:deny(-)" ; "s1i8 namespaces star never matches plaintext")]
#[test_case("foo/p\n  rules: [{from: [{source: {notNamespaces: [foo]}}]}]\n", "plain" => "ztunnel:allow(foo/p#0)" ; "s1i8 not namespaces matches plaintext")]
#[test_case("foo/p\n  rules: [{from: [{source: {notPrincipals: [x]}}]}]\n", "plain" => "ztunnel:allow(foo/p#0)" ; "s1i8 not principals matches plaintext")]
#[test_case("foo/p\n  rules: [{from: [{source: {notServiceAccounts: [bar/x]}}]}]\n", "plain" => "ztunnel:allow(foo/p#0)" ; "s1i8 not service accounts matches plaintext")]
#[test_case("foo/p\n  rules: [{from: [{source: {principals: [\"cluster.local/ns/bar/*\"], notPrincipals: [cluster.local/ns/bar/sa/sleep]}}]}]\n", "" => "ztunnel:deny(-)" ; "s6_1 values and not values are anded")]
#[test_case("foo/p\n  rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]\n", "" => "ztunnel:deny(-)" ; "s7_3 bare service account takes the policy namespace")]
#[test_case("foo/p\n  rules: [{from: [{source: {serviceAccounts: [bar/sleep]}}]}]\n", "" => "ztunnel:allow(foo/p#0)" ; "s6_2 service account ns slash sa")]
#[test_case("foo/p\n  rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]\n", "plain" => "ztunnel:allow(foo/p#0)" ; "s6_2 ip blocks work for plaintext")]
#[test_case("foo/p\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]\n", "" => "ztunnel:deny(foo/p#0)" ; "s1i6 ztunnel ports are workload ports")]
#[test_case("foo/p\n  action: DENY\n  rules: [{to: [{operation: {ports: [\"8000\"]}}]}]\n", "" => "ztunnel:allow(-)" ; "s1i6 ztunnel never sees the service port")]
#[test_case("foo/p\n  action: DENY\n  rules: [{when: [{key: destination.ip, values: [10.96.10.20]}]}]\n", "" => "ztunnel:allow(-)" ; "s6_2 ztunnel destination ip is the pod ip")]
#[test_case("foo/p\n  rules: [{from: [{source: {namespaces: [bar]}}], when: [{key: destination.port, values: [\"9090\"]}]}]\n", "" => "ztunnel:deny(-)" ; "s6_1 when is anded with from")]
#[test_case("foo/p\n  rules: [{from: [{source: {namespaces: [nope]}}, {source: {namespaces: [bar]}}]}]\n", "" => "ztunnel:allow(foo/p#0)" ; "s6_1 from entries are ored")]
#[test_case("foo/p\n  rules: [{from: [{source: {namespaces: [nope]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]\n", "" => "ztunnel:allow(foo/p#1)" ; "s6_1 rules are ored and the deciding rule is named")]
#[test_case("foo/p\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]}]\n", "id:spiffe://example.org/ns/bar/sa/sleep" => "ztunnel:deny(-)" ; "s6_4 ztunnel does not alias cluster local")]
fn matching(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

#[test]
fn s6_4_custom_trust_domain_warning() {
    let p = "foo/p\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]}]\n";
    let e = run(p, "id:spiffe://example.org/ns/bar/sa/sleep", "td");
    assert_eq!(summary(&e), "ztunnel:deny(-)");
    assert!(warnings(&e).contains("istio/ztunnel#1260"));
}

// Waypoint (Envoy) matching on HTTP. Sources: istio.io docs/reference/config/security/
// authorization-policy (hosts, methods, paths, templates), docs/reference/config/security/
// normalization, docs/reference/config/security/conditions; istio/istio
// tests/integration/security/authz_test.go + testdata/authz/*.tmpl;
// pilot/pkg/security/trustdomain/bundle.go.
fn svc(spec: &str) -> String {
    format!("foo/w\n  targetRefs: [{{kind: Service, group: \"\", name: httpbin}}]\n{spec}")
}

#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {ports: [\"8000\"]}}]}]\n"), "wp" => "waypoint:deny(foo/w#0)" ; "s1i6 waypoint port is the service port")]
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {ports: [\"8080\"]}}]}]\n"), "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s1i6 waypoint does not see the target port")]
#[test_case(&svc("  action: DENY\n  rules: [{when: [{key: destination.ip, values: [10.96.10.20]}]}]\n"), "wp" => "waypoint:deny(foo/w#0)" ; "s10 waypoint destination ip is the vip")]
#[test_case(&svc("  rules: [{to: [{operation: {methods: [GET]}}]}]\n"), "wp+http:GET:/ip" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 method exact")]
#[test_case(&svc("  rules: [{to: [{operation: {methods: [get]}}]}]\n"), "wp+http:GET:/ip" => "waypoint:deny(-)" ; "s6_2 methods are case sensitive")]
#[test_case(&svc("  rules: [{to: [{operation: {hosts: [HTTPBIN.foo]}}]}]\n"), "wp+http:GET:/ip" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 hosts ignore case")]
#[test_case(&svc("  rules: [{to: [{operation: {hosts: [httpbin.foo]}}]}]\n"), "wp+http:GET:/ip+host:httpbin.foo:8000" => "waypoint:deny(-)" ; "s6_2 exact host does not match host with port")]
#[test_case(&svc("  rules: [{to: [{operation: {hosts: [\"httpbin.foo:*\"]}}]}]\n"), "wp+http:GET:/ip+host:httpbin.foo:8000" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 host port wildcard")]
#[test_case(&svc("  rules: [{to: [{operation: {paths: [/ip]}}]}]\n"), "wp+http:GET:/ip?x=1" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 paths ignore the query")]
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n"), "wp+http:GET:/a/../admin/x" => "waypoint:deny(foo/w#0)" ; "s6_2 dot segments are removed")]
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n"), "wp+http:GET:/%61dmin" => "waypoint:deny(foo/w#0)" ; "s6_2 unreserved escapes are decoded")]
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n"), "wp+http:GET://admin" => "waypoint:allow(-) ztunnel:allow(-)" ; "s6_2 double slash bypasses deny under base")]
#[test_case(&svc("  rules: [{to: [{operation: {paths: [\"/allow/admin/{**}\"]}}]}]\n"), "wp+http:GET:/allow/admin" => "waypoint:deny(-)" ; "s6_2 glob template needs the trailing slash")]
#[test_case(&svc("  rules: [{to: [{operation: {paths: [\"/store/{*}/cart\"]}}]}]\n"), "wp+http:GET:/store/a/cart" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 one segment template")]
#[test_case(&svc("  rules: [{when: [{key: \"request.headers[X-Foo]\", values: [bar]}]}]\n"), "wp+http:GET:/+hdr:x-foo=bar" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 header names ignore case")]
#[test_case(&svc("  rules: [{when: [{key: \"request.headers[x-foo]\", values: [BAR]}]}]\n"), "wp+http:GET:/+hdr:x-foo=bar" => "waypoint:deny(-)" ; "s6_2 header values are case sensitive")]
#[test_case(&svc("  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]}]\n"), "wp+http:GET:/" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "w4_3 waypoint sees the client identity")]
#[test_case(&svc("  rules: [{from: [{source: {namespaces: [\"ba*\"]}}]}]\n"), "wp" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 envoy namespace regex prefix")]
#[test_case(&svc("  rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]\n"), "wp" => "waypoint:deny(-)" ; "s6_2 waypoint service account uses the policy namespace")]
#[test_case(&svc("  rules: [{when: [{key: source.serviceAccount, values: [bar/sleep]}]}]\n"), "wp" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_3 service account condition works at the waypoint")]
fn waypoint_matching(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

#[test]
fn s6_2_merge_slashes_closes_the_double_slash_bypass() {
    let p = svc("  action: DENY\n  rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]\n");
    assert_eq!(
        check(&p, "wp+http:GET://admin", "merge"),
        "waypoint:deny(foo/w#0)"
    );
}

#[test]
fn s6_4_waypoint_aliases_trust_domains() {
    // pilot/pkg/security/trustdomain/bundle.go: cluster.local and aliases expand to the bundle.
    let p = svc("  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]}]\n");
    let r = "wp+id:spiffe://old.example.org/ns/bar/sa/sleep";
    assert_eq!(
        check(&p, r, "alias"),
        "waypoint:allow(foo/w#0) ztunnel:allow(-)"
    );
    let p = svc("  rules: [{from: [{source: {principals: [other.td/ns/bar/sa/sleep]}}]}]\n");
    assert_eq!(check(&p, r, "alias"), "waypoint:deny(-)");
}

// JWT at the waypoint. Sources: istio.io docs/tasks/security/authentication/authn-policy
// ("request with an invalid token is rejected"), docs/reference/config/security/conditions
// (request.auth.*), authz-semantics §6.2 requestPrincipals; a token whose issuer no jwtRule
// names gets 401 "Jwt issuer is not configured" (istio/istio#39427, #40718).
const RA: &str = "---\nfoo/jwt RequestAuthentication\n  targetRefs: [{kind: Service, group: \"\", name: httpbin}]\n  jwtRules: [{issuer: https://issuer.example.com}]\n";

#[test_case(&format!("{}{RA}", svc("  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n")), "wp+http:GET:/" => "waypoint:deny(-)" ; "s6_2 require jwt denies a request without token")]
#[test_case(&format!("{}{RA}", svc("  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n")), "wp+http:GET:/+jwt" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 valid jwt gives a request principal")]
#[test_case(&format!("{}{RA}", svc("  rules: [{from: [{source: {requestPrincipals: [https://issuer.example.com/sub-1]}}]}]\n")), "wp+http:GET:/+jwt" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 request principal is iss slash sub")]
#[test_case(&format!("{}{RA}", svc("  rules: [{}]\n")), "wp+http:GET:/+badjwt" => "waypoint:deny(foo/jwt)" ; "s3 invalid jwt is 401 before authorization")]
#[test_case(&format!("{}{RA}", svc("  rules: [{}]\n")), "wp+http:GET:/+jwt:https://other" => "waypoint:deny(foo/jwt)" ; "s3 jwt of an unknown issuer is rejected")]
#[test_case(&svc("  rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]\n"), "wp+http:GET:/+jwt" => "waypoint:deny(-)" ; "s6_2 without request authentication there is no request principal")]
#[test_case(&format!("{}{RA}", svc("  rules: [{when: [{key: \"request.auth.claims[groups]\", values: [dev]}]}]\n")), "wp+http:GET:/+jwt" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 list claim matches any element")]
#[test_case(&format!("{}{RA}", svc("  rules: [{when: [{key: request.auth.audiences, values: [app]}]}]\n")), "wp+http:GET:/+jwt" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 audiences")]
#[test_case(&format!("{}{RA}", svc("  action: DENY\n  rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]\n")), "wp+http:GET:/" => "waypoint:deny(foo/w#0)" ; "s6_2 deny not request principals rejects requests without jwt")]
fn jwt(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

// ---------------------------------------------------------------------------------------
// §1 item 5, §7: HTTP attributes at ztunnel (exact algorithm table). Sources: istio/istio
// pilot/pkg/serviceregistry/ambient/authorization.go `handleRule` and authorization_test.go;
// istio/ztunnel src/rbac.rs (empty Match is skipped); istio/istio#61126.
#[test_case("foo/p\n  rules: [{to: [{operation: {methods: [GET]}}]}]\n", "" => "ztunnel:deny(-)" ; "s7 allow rule with http attribute is dropped and policy allows nothing")]
#[test_case("foo/p\n  rules: [{}, {to: [{operation: {methods: [GET]}}]}]\n", "" => "ztunnel:allow(foo/p#0)" ; "s7 allow empty rule survives next to an http rule")]
#[test_case("foo/p\n  rules: [{to: [{operation: {methods: [GET], ports: [\"8080\"]}}]}]\n", "" => "ztunnel:deny(-)" ; "s7 allow mixed http and port rule is dropped not stripped")]
#[test_case("foo/p\n  rules: [{from: [{source: {namespaces: [bar]}}], when: [{key: \"request.headers[x]\", values: [y]}]}]\n", "" => "ztunnel:deny(-)" ; "s7 allow l4 source with http condition is dropped")]
#[test_case("foo/p\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}, {source: {requestPrincipals: [\"*\"]}}]}]\n", "" => "ztunnel:deny(-)" ; "s7 allow http only from entry drops the whole rule")]
#[test_case("foo/p\n  rules: [{to: [{operation: {methods: [GET]}}]}, {to: [{operation: {ports: [\"8080\"]}}]}]\n", "" => "ztunnel:allow(foo/p#1)" ; "s7 allow rule index survives dropped rules")]
#[test_case("foo/p\n  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n", "" => "ztunnel:allow(-)" ; "s7 deny http only to is a no-op")]
#[test_case("foo/p\n  action: DENY\n  rules: [{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]\n", "" => "ztunnel:deny(foo/p#0)" ; "s7 deny mixed http and port denies all to the port")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}], to: [{operation: {methods: [GET]}}]}]\n", "" => "ztunnel:allow(-)" ; "s7 deny principal plus http to is a no-op")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}], when: [{key: \"request.headers[x]\", values: [y]}]}]\n", "" => "ztunnel:allow(-)" ; "s7 deny principal plus header condition is a no-op")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep], notRequestPrincipals: [\"*\"]}}]}]\n", "" => "ztunnel:deny(foo/p#0)" ; "s7 deny mixed source is broader")]
#[test_case("foo/p\n  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}, {from: [{source: {namespaces: [bar]}}]}]\n", "" => "ztunnel:deny(foo/p#1)" ; "s7 deny l4 rule next to http rule is enforced")]
#[test_case("foo/p\n  action: DENY\n  rules: [{}, {to: [{operation: {methods: [POST]}}]}]\n", "" => "ztunnel:deny(foo/p#0)" ; "s7 deny empty rule next to http rule denies all")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}], to: [{operation: {ports: [\"8080\"]}}]}]\n", "" => "ztunnel:allow(-)" ; "s7 deny require jwt is a no-op at ztunnel")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}, {source: {requestPrincipals: [\"*\"]}}]}]\n", "" => "ztunnel:deny(foo/p#0)" ; "s7 deny keeps the l4 from alternative")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/x/sa/y]}}, {source: {requestPrincipals: [\"*\"]}}]}]\n", "" => "ztunnel:allow(-)" ; "s7 deny drops the http from alternative")]
#[test_case("foo/p\n  action: DENY\n  rules: [{when: [{key: source.ip, values: [10.244.1.5]}, {key: \"request.headers[x]\", values: [y]}]}]\n", "" => "ztunnel:allow(-)" ; "s7 deny source ip plus header condition is a no-op")]
#[test_case("foo/p\n  action: DENY\n  rules: [{when: [{key: connection.sni, values: [x]}]}]\n", "" => "ztunnel:allow(-)" ; "s1i10 connection sni counts as http at ztunnel")]
#[test_case("foo/p\n  rules: [{when: [{key: source.serviceAccount, values: [bar/sleep]}]}]\n", "" => "ztunnel:deny(-)" ; "s1i10 source service account counts as http at ztunnel")]
fn http_at_ztunnel(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

#[test]
fn s7_status_messages() {
    let e = run(
        "foo/p\n  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n",
        "",
        "",
    );
    let c = &e.conditions[0];
    assert_eq!(
        (c.policy.as_str(), c.status, c.reason.as_str()),
        ("foo/p", "False", "UnsupportedValue")
    );
    assert_eq!(
        c.message,
        "ztunnel does not support HTTP attributes (found: methods). In ambient mode you must use a waypoint proxy to enforce HTTP rules. After omitting unsupported HTTP attributes, this DENY policy has no enforceable rules at ztunnel and will have no effect. Deploy a waypoint proxy and use a targetRef to enforce this policy."
    );
    assert!(warnings(&e).contains("DENY rule is a no-op at ztunnel"));
    // The webhook's warning travels with the policy.
    assert!(warnings(&e).contains("will deny all traffic to TCP ports"));
    let e = run(
        "foo/p\n  rules: [{to: [{operation: {paths: [/x], methods: [GET]}}]}]\n",
        "",
        "",
    );
    assert_eq!(
        e.conditions[0].message,
        "ztunnel does not support HTTP attributes (found: methods, paths). In ambient mode you must use a waypoint proxy to enforce HTTP rules. Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be more restrictive than requested."
    );
}

// strictPolicy: each silently weakened rule fails closed (ours; authz-semantics §12 item 4).
#[test_case("foo/p\n  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n" => "ztunnel:deny(foo/p#0)" ; "strict deny http only fails closed")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/x/sa/y]}}, {source: {requestPrincipals: [\"*\"]}}]}]\n" => "ztunnel:deny(foo/p#0)" ; "strict deny lost alternative fails closed")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {trustDomains: [other.td]}}]}]\n" => "ztunnel:deny(foo/p#0)" ; "strict deny trust domains only fails closed")]
#[test_case("foo/p\n  rules: [{from: [{source: {namespaces: [bar], trustDomains: [other.td]}}]}]\n" => "ztunnel:deny(-)" ; "strict allow trust domains is dropped")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/x/sa/y]}}]}]\n" => "ztunnel:allow(-)" ; "strict leaves sound rules alone")]
fn strict_policy(pols: &str) -> String {
    check(pols, "", "strict")
}

// §7.4 trustDomains silently dropped (observed on istio/istio master authorization.go).
#[test_case("foo/p\n  rules: [{from: [{source: {namespaces: [bar], trustDomains: [other.td]}}]}]\n" => "ztunnel:allow(foo/p#0)" ; "s7_4 allow namespaces plus trust domains is broadened")]
#[test_case("foo/p\n  rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]\n" => "ztunnel:deny(-)" ; "s7_4 allow trust domains only matches nothing")]
#[test_case("foo/p\n  action: DENY\n  rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]\n" => "ztunnel:allow(-)" ; "s7_4 deny trust domains only is a no-op")]
fn trust_domains_at_ztunnel(pols: &str) -> String {
    check(pols, "", "")
}

// §7.1 Envoy on TCP at the waypoint: ALLOW skips HTTP rules, DENY ignores HTTP attributes.
// Source: istio/istio pilot/pkg/security/authz/model/model.go `checkError`;
// authorization_policy.proto DENY example ("all TCP traffic would be denied").
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n"), "wp" => "waypoint:deny(foo/w#0)" ; "s7_1 deny http only denies all tcp at the waypoint")]
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n"), "wp+http:GET:/" => "waypoint:allow(-) ztunnel:allow(-)" ; "s7_1 deny post lets get through on http")]
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n"), "wp+http:POST:/" => "waypoint:deny(foo/w#0)" ; "s7_1 deny post on http")]
#[test_case(&svc("  rules: [{to: [{operation: {methods: [GET]}}]}]\n"), "wp" => "waypoint:deny(-)" ; "s7_1 allow http rule is skipped on tcp")]
#[test_case(&svc("  rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [bar]}}]}]\n"), "wp" => "waypoint:allow(foo/w#1) ztunnel:allow(-)" ; "s7_1 allow l4 rule still matches on tcp")]
#[test_case(&svc("  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}, {operation: {ports: [\"1\"]}}]}]\n"), "wp" => "waypoint:deny(foo/w#0)" ; "s7_1 stripped operation is match all inside the or")]
fn tcp_at_waypoint(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

// ---------------------------------------------------------------------------------------
// §9 PeerAuthentication in ambient. Sources: istio/istio tests/integration/ambient/
// baseline_test.go TestPeerAuthentication; authorization.go convertedSelectorPeerAuthentications
// / convertPeerAuthentication; istio/api security/v1beta1/peer_authentication.proto.
fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!("{ns}/{name} PeerAuthentication\n{spec}")
}

#[test_case(&pa("istio-system", "mesh", "  mtls: {mode: STRICT}\n"), "plain" => "ztunnel:deny(istio-system/istio_converted_static_strict#0)" ; "s9_1 strict denies plaintext")]
#[test_case(&pa("istio-system", "mesh", "  mtls: {mode: STRICT}\n"), "" => "ztunnel:allow(-)" ; "s9_1 strict admits mtls")]
#[test_case(&format!("{}---\n{ALLOW_ALL}", pa("foo", "ns", "  mtls: {mode: STRICT}\n")), "plain" => "ztunnel:deny(istio-system/istio_converted_static_strict#0)" ; "s9_1 strict wins over allow all")]
#[test_case(&pa("foo", "ns", "  mtls: {mode: PERMISSIVE}\n"), "plain" => "ztunnel:allow(-)" ; "s9_1 permissive accepts plaintext")]
#[test_case(&pa("foo", "ns", "  mtls: {mode: DISABLE}\n"), "plain" => "ztunnel:allow(-)" ; "s9_1 disable acts like permissive")]
#[test_case(&pa("foo", "w", "  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: STRICT}\n  portLevelMtls: {8080: {mode: PERMISSIVE}}\n"), "plain" => "ztunnel:allow(-)" ; "s9_3 strict with permissive port exception")]
#[test_case(&pa("foo", "w", "  selector: {matchLabels: {app: httpbin}}\n  mtls: {mode: PERMISSIVE}\n  portLevelMtls: {8080: {mode: STRICT}}\n"), "plain" => "ztunnel:deny(foo/converted_peer_authentication_w#0)" ; "s9_3 permissive with strict port")]
#[test_case(&format!("{}---\n{}", pa("foo", "ns", "  mtls: {mode: STRICT}\n"), pa("foo", "w", "  selector: {matchLabels: {app: httpbin}}\n  portLevelMtls: {8080: {mode: DISABLE}}\n")), "plain" => "ztunnel:deny(istio-system/istio_converted_static_strict#0)" ; "s9_3 quirk unset disable port under inherited strict stays strict")]
#[test_case(&pa("istio-system", "mesh", "  mtls: {mode: STRICT}\n"), "plain+wp" => "ztunnel:deny(istio-system/istio_converted_static_strict#0)" ; "s9_4 plaintext skips the waypoint and meets strict")]
#[test_case(&pa("istio-system", "mesh", "  mtls: {mode: STRICT}\n"), "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s9_4 waypoint traffic is mtls")]
fn peer_authentication(pols: &str, req: &str) -> String {
    check(pols, req, "")
}

// ---------------------------------------------------------------------------------------
// waypoint-semantics §4.3 layered enforcement: the getting-started example (istio.io
// docs/ambient/getting-started/enforce-auth-policies), productpage -> here httpbin.
const LAYERED: &str = "foo/httpbin-ztunnel
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/waypoint]}}]}]
---
foo/httpbin-waypoint
  targetRefs: [{kind: Service, group: \"\", name: httpbin}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/bar/sa/curl]}}]
    to: [{operation: {methods: [GET]}}]
";

#[test_case("wp+id:spiffe://cluster.local/ns/bar/sa/curl+http:GET:/productpage" => "waypoint:allow(foo/httpbin-waypoint#0) ztunnel:allow(foo/httpbin-ztunnel#0)" ; "w4_3 curl get passes both layers")]
#[test_case("wp+id:spiffe://cluster.local/ns/bar/sa/curl+http:POST:/productpage" => "waypoint:deny(-)" ; "w4_3 curl post is denied at the waypoint")]
#[test_case("wp+http:GET:/productpage" => "waypoint:deny(-)" ; "w4_3 sleep is denied at the waypoint")]
#[test_case("wp+pod+id:spiffe://cluster.local/ns/bar/sa/curl+http:GET:/productpage" => "ztunnel:deny(-)" ; "w3_4 bypassing the waypoint is denied by the ztunnel layer")]
fn layered(req: &str) -> String {
    check(LAYERED, req, "")
}

#[test]
fn invalid_input_is_rejected_with_the_webhook_message() {
    let set = parse_objects("case.yaml", &policies("foo/bad\n  action: DENY\n")).unwrap();
    let err = mesh_policy::explain(&set, &MeshConfig::default(), &base()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("case.yaml (document 1)"), "{msg}");
    assert!(msg.contains("AuthorizationPolicy foo/bad"), "{msg}");
    assert!(
        msg.contains("DENY action without `rules` is meaningless"),
        "{msg}"
    );
}

#[test]
fn http_bad_method_and_nul_path_are_400() {
    let e = run(&svc("  rules: [{}]\n"), "wp+http:get:/", "");
    assert!(e.hops[0].reason.contains("HTTP 400"));
    let e = run(&svc("  rules: [{}]\n"), "wp+http:GET:/a%00", "");
    assert!(e.hops[0].reason.contains("HTTP 400"));
}

// More waypoint cases. Sources: istio.io docs/ambient/usage/authorization-policy
// ("mesh-wide waypoint allow-nothing" via GatewayClass), docs/tasks/security/authorization/
// authz-custom (CUSTOM + ext_authz), docs/tasks/security/authorization/authz-dry-run;
// istio/istio pilot/pkg/security/authz/builder/builder.go (AUDIT filter, shadow rules).
#[test_case("istio-system/class-nothing\n  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\n", "wp" => "waypoint:deny(-)" ; "w4_1 gatewayclass allow nothing denies at every waypoint")]
#[test_case(&svc("  rules: [{to: [{operation: {notMethods: [DELETE]}}]}]\n"), "wp+http:DELETE:/" => "waypoint:deny(-)" ; "s6_1 not methods")]
#[test_case(&svc("  rules: [{to: [{operation: {notPaths: [\"/admin*\"]}}]}]\n"), "wp+http:GET:/admin/x" => "waypoint:deny(-)" ; "s6_1 not paths")]
#[test_case(&svc("  rules: [{to: [{operation: {notHosts: [\"*.internal\"]}}]}]\n"), "wp+http:GET:/+host:a.INTERNAL" => "waypoint:deny(-)" ; "s6_1 not hosts ignore case")]
#[test_case(&svc("  rules: [{from: [{source: {remoteIpBlocks: [10.244.1.0/24]}}]}]\n"), "wp+http:GET:/" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_2 remote ip without xff is the peer")]
#[test_case(&svc("  rules: [{when: [{key: source.principal, values: [cluster.local/ns/bar/sa/sleep]}]}]\n"), "wp+id:spiffe://example.org/ns/bar/sa/sleep" => "waypoint:allow(foo/w#0) ztunnel:allow(-)" ; "s6_4 source principal condition is aliased too")]
#[test_case(&svc("  action: AUDIT\n  rules: [{}]\n"), "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s3 audit at the waypoint never decides")]
#[test_case("foo/w!dry\n  targetRefs: [{kind: Service, group: \"\", name: httpbin}]\n  action: DENY\n  rules: [{}]\n", "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s3 dry run at the waypoint is shadow only")]
#[test_case(&svc("  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]\n"), "wp" => "waypoint:allow(-) ztunnel:allow(-)" ; "s3 custom at the waypoint defers to the provider")]
fn waypoint_more(pols: &str, req: &str) -> String {
    check(
        pols,
        req,
        if req.contains("example.org") {
            "td"
        } else {
            ""
        },
    )
}

#[test]
fn waypoint_warnings_for_custom_audit_dry_run_and_metadata() {
    let w = warnings(&run(
        &svc("  action: CUSTOM\n  provider: {name: ext-authz}\n  rules: [{}]\n"),
        "wp",
        "",
    ));
    assert!(
        w.contains("ext_authz provider \"ext-authz\" decides"),
        "{w}"
    );
    let w = warnings(&run(&svc("  action: AUDIT\n  rules: [{}]\n"), "wp", ""));
    assert!(w.contains("AUDIT policy foo/w rule 0 matched"), "{w}");
    let dry = "foo/w!dry\n  targetRefs: [{kind: Service, group: \"\", name: httpbin}]\n  action: DENY\n  rules: [{}]\n";
    assert!(warnings(&run(dry, "wp", "")).contains("dry-run DENY policy foo/w rule 0 matched"));
    let meta = svc(
        "  rules: [{when: [{key: \"experimental.envoy.filters.network.foo[bar]\", values: [x]}]}]\n",
    );
    let e = run(&meta, "wp", "");
    assert_eq!(summary(&e), "waypoint:deny(-)");
    assert!(warnings(&e).contains("cannot be evaluated offline"));
    let tcp = run(
        &svc("  rules: [{to: [{operation: {methods: [GET]}}]}]\n"),
        "wp",
        "",
    );
    assert!(
        warnings(&tcp)
            .contains("ALLOW rule is skipped because it uses the HTTP-only attribute methods")
    );
}

#[test]
fn ztunnel_warns_about_request_authentication_by_selector() {
    let p = "foo/jwt RequestAuthentication\n  selector: {matchLabels: {app: httpbin}}\n  jwtRules: [{issuer: x}]\n";
    assert!(warnings(&run(p, "", "")).contains("ztunnel never validates JWTs"));
}

#[test]
fn layered_flag_enforces_waypoint_selector_allow_with_l4_semantics() {
    // authz-semantics §5.1 (ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES): an ALLOW selecting
    // the waypoint pods, evaluated with the client identity at the waypoint's HBONE termination.
    let p = "default/wp-l4\n  selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: waypoint}}\n  rules: [{from: [{source: {namespaces: [other]}}]}]\n";
    assert_eq!(check(p, "wp", "layered"), "waypoint:deny(-)");
    assert_eq!(check(p, "wp", ""), "waypoint:allow(-) ztunnel:allow(-)");
    assert_eq!(
        check(p, "wp+id:spiffe://cluster.local/ns/other/sa/x", "layered"),
        "waypoint:allow(-) ztunnel:allow(-)"
    );
}

#[test]
fn s1i10_every_quirk_has_a_status_condition() {
    // authz-semantics §1 item 10: trustDomains dropped, empty selector, PeerAuthentication
    // UNSET + DISABLE port; each gets ZtunnelAccepted=False UnsupportedValue.
    let cond = |pols: &str| {
        run(pols, "plain", "")
            .conditions
            .into_iter()
            .map(|c| {
                format!(
                    "{} {} {:?}={} {}",
                    c.kind, c.policy, c.type_, c.status, c.reason
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cond("foo/td\n  rules: [{from: [{source: {trustDomains: [a.b]}}]}]\n"),
        vec!["AuthorizationPolicy foo/td ZtunnelAccepted=False UnsupportedValue"]
    );
    assert_eq!(
        cond("foo/empty\n  selector: {}\n  rules: [{}]\n"),
        vec!["AuthorizationPolicy foo/empty ZtunnelAccepted=False UnsupportedValue"]
    );
    let quirk = format!(
        "{}---\n{}",
        pa("foo", "ns", "  mtls: {mode: STRICT}\n"),
        pa(
            "foo",
            "w",
            "  selector: {matchLabels: {app: httpbin}}\n  portLevelMtls: {8080: {mode: DISABLE}}\n"
        )
    );
    assert_eq!(
        cond(&quirk),
        vec!["PeerAuthentication foo/w ZtunnelAccepted=False UnsupportedValue"]
    );
}
