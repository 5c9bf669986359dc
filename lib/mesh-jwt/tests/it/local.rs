//! Inline JWKS: algorithms, the failure table with Envoy's texts, locations, outputs, several
//! rules and tokens, configuration errors.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use mesh_jwt::{Authenticator, AuthnError, Jwt};
use mesh_policy::model::JwtRule;
use serde_json::json;
use test_case::test_case;

use crate::keys::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::try_from(*k).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

async fn check(
    a: &Authenticator,
    pairs: &[(&str, &str)],
    uri: &str,
) -> (Result<Option<Jwt>, AuthnError>, HeaderMap) {
    let mut h = headers(pairs);
    let r = a.authenticate(&mut h, &uri.parse().unwrap()).await;
    (r, h)
}

fn authn(rules: Vec<JwtRule>) -> Authenticator {
    Authenticator::new(&[ra("r", rules)]).unwrap()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[test_case("RS256", Key::rsa ; "rs256")]
#[test_case("RS384", Key::rsa ; "rs384")]
#[test_case("RS512", Key::rsa ; "rs512")]
#[test_case("PS256", Key::rsa ; "ps256")]
#[test_case("PS384", Key::rsa ; "ps384")]
#[test_case("PS512", Key::rsa ; "ps512")]
#[test_case("ES256", Key::p256 ; "es256")]
#[test_case("ES384", Key::p384 ; "es384")]
#[test_case("ES512", Key::p521 ; "es512")]
#[test_case("EdDSA", Key::ed25519 ; "eddsa")]
#[test_case("HS256", Key::hmac ; "hs256")]
#[test_case("HS384", Key::hmac ; "hs384")]
#[test_case("HS512", Key::hmac ; "hs512")]
#[tokio::test]
async fn accepts_each_algorithm(alg: &str, key: fn() -> Key) {
    let k = key();
    let a = authn(vec![rule(&jwks(&[k.jwk("k1", Some(alg))]))]);
    let t = k.sign(alg, Some("k1"), &claims(ISS));
    let (r, h) = check(&a, &[("authorization", &bearer(&t))], "/").await;
    let jwt = r.unwrap().expect("a principal");
    assert_eq!(jwt.principal(), format!("{ISS}/alice"));
    assert_eq!(jwt.claims["sub"], "alice");
    assert!(
        !h.contains_key("authorization"),
        "token header removed by default"
    );
}

/// Expected: `Ok(())` for an accepted token, else (status, Envoy's body).
type Want = Result<(), (u16, &'static str)>;

fn scenario(name: &str) -> (Vec<JwtRule>, String) {
    let k = Key::p256();
    let set = jwks(&[k.jwk("k1", None)]);
    let sign = |c: serde_json::Value| k.sign("ES256", Some("k1"), &c);
    let n = now();
    match name {
        "valid" => (vec![rule(&set)], sign(claims(ISS))),
        "expired" => (
            vec![rule(&set)],
            sign(json!({"iss": ISS, "sub": "a", "exp": n - 120})),
        ),
        "expired within skew" => (
            vec![rule(&set)],
            sign(json!({"iss": ISS, "sub": "a", "exp": n - 30})),
        ),
        "nbf in the future" => (
            vec![rule(&set)],
            sign(json!({"iss": ISS, "sub": "a", "nbf": n + 120})),
        ),
        "nbf within skew" => (
            vec![rule(&set)],
            sign(json!({"iss": ISS, "sub": "a", "nbf": n + 30})),
        ),
        "no exp never expires" => (vec![rule(&set)], sign(json!({"iss": ISS, "sub": "a"}))),
        "wrong issuer" => (vec![rule(&set)], sign(claims("https://other.example"))),
        "audience not allowed" => (
            vec![JwtRule {
                audiences: vec!["svc-a".into()],
                ..rule(&set)
            }],
            sign(json!({"iss": ISS, "sub": "a", "aud": "svc-b"})),
        ),
        "audience absent" => (
            vec![JwtRule {
                audiences: vec!["svc-a".into()],
                ..rule(&set)
            }],
            sign(json!({"iss": ISS, "sub": "a"})),
        ),
        "audience allowed after sanitizing" => (
            vec![JwtRule {
                audiences: vec!["https://svc-a/".into()],
                ..rule(&set)
            }],
            sign(json!({"iss": ISS, "sub": "a", "aud": ["x", "http://svc-a"]})),
        ),
        "unknown kid" => (vec![rule(&set)], k.sign("ES256", Some("k2"), &claims(ISS))),
        "key alg differs" => (
            vec![rule(&jwks(&[k.jwk("k1", Some("ES384"))]))],
            sign(claims(ISS)),
        ),
        "bad signature" => (
            vec![rule(&set)],
            Key::p256().sign("ES256", Some("k1"), &claims(ISS)),
        ),
        "key of another type" => (
            vec![rule(&jwks(&[Key::ed25519().jwk("k1", None)]))],
            sign(claims(ISS)),
        ),
        "no kid tries every key" => (
            vec![rule(&jwks(&[
                Key::p256().jwk("k0", None),
                k.jwk("k1", None),
            ]))],
            k.sign("ES256", None, &claims(ISS)),
        ),
        "not three parts" => (vec![rule(&set)], "abc.def".into()),
        "alg none" => (
            vec![rule(&set)],
            format!(
                "{}.{}.c2ln",
                b64(r#"{"alg":"none"}"#),
                b64(claims(ISS).to_string())
            ),
        ),
        "empty signature" => {
            let t = sign(claims(ISS));
            (vec![rule(&set)], t[..=t.rfind('.').unwrap()].to_string())
        }
        "doubled dot is skipped" => {
            let t = sign(claims(ISS));
            (vec![rule(&set)], t.replacen('.', "..", 1))
        }
        "ed25519 signature of the wrong length" => {
            let ed = Key::ed25519();
            let t = ed.sign("EdDSA", Some("e"), &claims(ISS));
            (vec![rule(&jwks(&[ed.jwk("e", None)]))], format!("{t}AAAA"))
        }
        "inline jwks without usable keys" => (vec![rule(r#"{"keys":[]}"#)], sign(claims(ISS))),
        "rule without issuer accepts any" => (
            vec![JwtRule {
                issuer: String::new(),
                jwks_uri: "https://unused.example/jwks".into(),
                ..rule(&set)
            }],
            sign(claims("https://anyone.example")),
        ),
        other => panic!("no scenario {other}"),
    }
}

#[test_case("valid", Ok(()))]
#[test_case("expired", Err((401, "Jwt is expired")))]
#[test_case("expired within skew", Ok(()))]
#[test_case("nbf in the future", Err((401, "Jwt not yet valid")))]
#[test_case("nbf within skew", Ok(()))]
#[test_case("no exp never expires", Ok(()))]
#[test_case("wrong issuer", Err((401, "Jwt issuer is not configured")))]
#[test_case("audience not allowed", Err((403, "Audiences in Jwt are not allowed")))]
#[test_case("audience absent", Err((403, "Audiences in Jwt are not allowed")))]
#[test_case("audience allowed after sanitizing", Ok(()))]
#[test_case("unknown kid", Err((401, "Jwks doesn't have key to match kid or alg from Jwt")))]
#[test_case("key alg differs", Err((401, "Jwks doesn't have key to match kid or alg from Jwt")))]
#[test_case("bad signature", Err((401, "Jwt verification fails")))]
#[test_case("key of another type", Err((401, "Jwt verification fails")))]
#[test_case("no kid tries every key", Ok(()))]
#[test_case("not three parts", Err((401, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")))]
#[test_case("alg none", Err((401, "Jwt header [alg] is not supported")))]
#[test_case("empty signature", Err((401, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")))]
#[test_case("doubled dot is skipped", Ok(()))]
#[test_case("ed25519 signature of the wrong length", Err((401, "Jwt ED25519 signature is wrong length")))]
#[test_case("inline jwks without usable keys", Err((401, "Jwks doesn't have any valid public key")))]
#[test_case("rule without issuer accepts any", Ok(()))]
#[tokio::test]
async fn failure_table(name: &str, want: Want) {
    let (rules, token) = scenario(name);
    let a = authn(rules);
    let (r, _) = check(&a, &[("authorization", &bearer(&token))], "/").await;
    let got = match r {
        Ok(Some(_)) => Ok(()),
        Ok(None) => panic!("{name}: token was not seen"),
        Err(e) => Err((e.status().as_u16(), e.body())),
    };
    assert_eq!(got, want, "{name}");
}

#[tokio::test]
async fn error_response_is_envoys_local_reply() {
    let (rules, token) = scenario("expired");
    let a = authn(rules);
    let mut h = headers(&[("authorization", &bearer(&token)), ("host", "svc.foo")]);
    let e = a
        .authenticate(&mut h, &"/p?q=1".parse().unwrap())
        .await
        .unwrap_err();
    let resp = e.response();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.body(), "Jwt is expired");
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(
        resp.headers()["www-authenticate"],
        "Bearer realm=\"http://svc.foo/p?q=1\", error=\"invalid_token\""
    );
}

#[tokio::test]
async fn a_request_without_token_passes_without_principal() {
    let (rules, _) = scenario("valid");
    let a = authn(rules);
    assert_eq!(check(&a, &[], "/").await.0, Ok(None));
    // Not a bearer token: not extracted, so nothing to check.
    let (r, h) = check(&a, &[("authorization", "Basic dXNlcjpwdw==")], "/").await;
    assert_eq!(r, Ok(None));
    assert!(h.contains_key("authorization"));
    // No RequestAuthentication at all.
    let none = Authenticator::new(&[]).unwrap();
    assert!(none.is_empty());
    assert_eq!(
        check(&none, &[("authorization", "Bearer junk")], "/")
            .await
            .0,
        Ok(None)
    );
}

#[tokio::test]
async fn access_token_query_parameter_is_a_default_location() {
    let (rules, token) = scenario("valid");
    let a = authn(rules);
    let (r, _) = check(&a, &[], &format!("/p?access_token={token}")).await;
    assert!(r.unwrap().is_some());
    let (rules, token) = scenario("expired");
    let a = authn(rules);
    let (r, _) = check(&a, &[], &format!("/p?access_token={token}")).await;
    assert_eq!(r.unwrap_err().body(), "Jwt is expired");
}

#[tokio::test]
async fn forward_original_token_keeps_the_header() {
    let k = Key::p256();
    let a = authn(vec![JwtRule {
        forward_original_token: true,
        ..rule(&jwks(&[k.jwk("k1", None)]))
    }]);
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    let (r, h) = check(&a, &[("authorization", &bearer(&t))], "/").await;
    assert!(r.unwrap().is_some());
    assert_eq!(h["authorization"], bearer(&t));
}

#[tokio::test]
async fn outputs_payload_and_claims_to_headers() {
    let k = Key::p256();
    let a = authn(vec![JwtRule {
        output_payload_to_header: "x-jwt-payload".into(),
        output_claim_to_headers: vec![
            claim_header("x-sub", "sub"),
            claim_header("x-group", "org.group"),
            claim_header("x-missing", "nope"),
        ],
        ..rule(&jwks(&[k.jwk("k1", None)]))
    }]);
    let c = json!({"iss": ISS, "sub": "alice", "org": {"group": "eng"}, "scope": "read write"});
    let t = k.sign("ES256", Some("k1"), &c);
    let forged = [
        ("x-jwt-payload", "forged"),
        ("x-sub", "mallory"),
        ("x-missing", "forged"),
    ];
    let mut pairs = vec![("authorization", bearer(&t))];
    pairs.extend(forged.iter().map(|(k, v)| (*k, v.to_string())));
    let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (r, h) = check(&a, &pairs, "/").await;
    let jwt = r.unwrap().unwrap();
    assert_eq!(h["x-jwt-payload"], t.split('.').nth(1).unwrap());
    assert_eq!(h.get_all("x-sub").iter().collect::<Vec<_>>(), ["alice"]);
    assert_eq!(h["x-group"], "eng");
    assert!(!h.contains_key("x-missing"));
    // Space-delimited scope is a list for policy.
    assert_eq!(jwt.claims["scope"], json!(["read", "write"]));

    // Without a token, client-supplied output headers are still removed.
    let (r, h) = check(&a, &forged, "/").await;
    assert_eq!(r, Ok(None));
    assert!(h.is_empty(), "{h:?}");
}

#[tokio::test]
async fn custom_locations_replace_the_defaults() {
    let k = Key::p256();
    let set = jwks(&[k.jwk("k1", None)]);
    let good = k.sign("ES256", Some("k1"), &claims(ISS));
    let a = authn(vec![JwtRule {
        from_headers: vec![header("x-token", "Istio ")],
        from_params: vec!["tok".into()],
        from_cookies: vec!["session".into()],
        ..rule(&set)
    }]);
    // The defaults are no longer looked at, even with a bad token there.
    let (r, h) = check(
        &a,
        &[("authorization", "Bearer bad.bad.bad")],
        "/?access_token=bad",
    )
    .await;
    assert_eq!(r, Ok(None));
    assert!(h.contains_key("authorization"));

    let (r, h) = check(&a, &[("x-token", &format!("Istio {good}"))], "/").await;
    assert!(r.unwrap().is_some());
    assert!(!h.contains_key("x-token"), "header location removed");

    let (r, _) = check(&a, &[], &format!("/?tok={good}")).await;
    assert!(r.unwrap().is_some());

    let cookie = format!("a=b; session={good}");
    let (r, h) = check(&a, &[("cookie", &cookie)], "/").await;
    assert!(r.unwrap().is_some());
    assert!(
        h.contains_key("cookie"),
        "cookies are not rewritten (Envoy neither)"
    );

    let (r, _) = check(&a, &[("x-token", "Istio junk")], "/").await;
    assert_eq!(
        r.unwrap_err().body(),
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    );
}

#[tokio::test]
async fn every_token_found_must_be_valid() {
    let k = Key::p256();
    let a = authn(vec![rule(&jwks(&[k.jwk("k1", None)]))]);
    let good = k.sign("ES256", Some("k1"), &claims(ISS));
    let expired = k.sign(
        "ES256",
        Some("k1"),
        &json!({"iss": ISS, "sub": "a", "exp": now() - 600}),
    );
    let (r, _) = check(
        &a,
        &[("authorization", &bearer(&good))],
        &format!("/?access_token={expired}"),
    )
    .await;
    assert_eq!(r.unwrap_err().body(), "Jwt is expired");
    let (r, _) = check(
        &a,
        &[("authorization", &bearer(&good))],
        &format!("/?access_token={good}"),
    )
    .await;
    assert!(r.unwrap().is_some());
}

const ISS2: &str = "https://second.example";

fn two_issuers() -> (Authenticator, Key, Key) {
    let (k1, k2) = (Key::p256(), Key::ed25519());
    let r1 = rule(&jwks(&[k1.jwk("k1", None)]));
    let r2 = JwtRule {
        issuer: ISS2.into(),
        jwks: jwks(&[k2.jwk("k2", None)]),
        ..Default::default()
    };
    // Two objects, one rule each: rules of every applicable object are merged. A list of
    // references is what `mesh_policy::scope::waypoint_request_authentications` returns.
    let (one, two) = (ra("one", vec![r1]), ra("two", vec![r2]));
    let a = Authenticator::new(vec![&one, &two]).unwrap();
    (a, k1, k2)
}

#[tokio::test]
async fn several_rules_accept_a_token_of_any_of_them() {
    let (a, k1, k2) = two_issuers();
    for (t, iss) in [
        (k1.sign("ES256", Some("k1"), &claims(ISS)), ISS),
        (k2.sign("EdDSA", Some("k2"), &claims(ISS2)), ISS2),
    ] {
        let (r, _) = check(&a, &[("authorization", &bearer(&t))], "/").await;
        assert_eq!(r.unwrap().unwrap().iss, iss);
    }
    assert_eq!(check(&a, &[], "/").await.0, Ok(None));
}

#[tokio::test]
async fn several_rules_report_the_real_failure() {
    let (a, k1, _) = two_issuers();
    let stranger = Key::p256().sign("ES256", Some("k1"), &claims("https://third.example"));
    let (r, _) = check(&a, &[("authorization", &bearer(&stranger))], "/").await;
    assert_eq!(r.unwrap_err().body(), "Jwt issuer is not configured");
    // Rule two says "wrong issuer", rule one "expired": the real error wins.
    let expired = k1.sign(
        "ES256",
        Some("k1"),
        &json!({"iss": ISS, "sub": "a", "exp": now() - 600}),
    );
    let (r, _) = check(&a, &[("authorization", &bearer(&expired))], "/").await;
    assert_eq!(r.unwrap_err().body(), "Jwt is expired");
}

#[tokio::test]
async fn cors_preflight_is_not_authenticated() {
    let (rules, token) = scenario("expired");
    let a = authn(rules);
    let mut req = http::Request::builder()
        .method("OPTIONS")
        .uri("/x")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header("authorization", bearer(&token))
        .body(())
        .unwrap();
    assert_eq!(a.authenticate_request(&mut req).await, Ok(None));
    *req.method_mut() = http::Method::GET;
    assert_eq!(
        a.authenticate_request(&mut req).await.unwrap_err().body(),
        "Jwt is expired"
    );
}

#[test_case(JwtRule { from_headers: vec![header("", "")], ..rule("{}") }, "spec.jwtRules[0].fromHeaders[0].name", "location header name must be non-empty string" ; "empty header name")]
#[test_case(JwtRule { from_headers: vec![header("bad header", "")], ..rule("{}") }, "spec.jwtRules[0].fromHeaders[0].name", "not a valid HTTP header name" ; "invalid header name")]
#[test_case(JwtRule { jwks: String::new(), jwks_uri: "ftp://x/jwks".into(), ..rule("") }, "spec.jwtRules[0].jwksUri", "must be an absolute http:// or https:// URI" ; "jwks uri scheme")]
#[test_case(JwtRule { issuer: String::new(), ..rule("{}") }, "spec.jwtRules[0].issuer", "issuer or jwksUri must be non-empty string" ; "no issuer nor uri")]
#[test_case(JwtRule { audiences: vec![String::new()], ..rule("{}") }, "spec.jwtRules[0].audiences[0]", "audience must be non-empty string" ; "empty audience")]
#[test_case(JwtRule { timeout: Some("5".into()), ..rule("{}") }, "spec.jwtRules[0].timeout", "not a positive duration" ; "timeout without unit")]
#[test_case(JwtRule { output_payload_to_header: "a b".into(), ..rule("{}") }, "spec.jwtRules[0].outputPayloadToHeader", "not a valid HTTP header name" ; "payload header")]
#[test_case(JwtRule { output_claim_to_headers: vec![claim_header("x", "")], ..rule("{}") }, "spec.jwtRules[0].outputClaimToHeaders[0]", "must be non-empty string" ; "claim header")]
#[test_case(rule("not json"), "spec.jwtRules[0].jwks", "jwks parse error: Jwks is an invalid JSON" ; "inline jwks not json")]
#[test_case(rule(r#"{"kid":"x"}"#), "spec.jwtRules[0].jwks", "jwks parse error: Jwks does not have [keys] field" ; "inline jwks without keys")]
#[test_case(JwtRule { jwks: String::new(), issuer: "not-a-url".into(), ..rule("") }, "spec.jwtRules[0].issuer", "OpenID discovery" ; "issuer not a url without jwks")]
fn config_errors_name_object_and_field(r: JwtRule, field: &str, message: &str) {
    let e = Authenticator::new(&[ra("bad", vec![r])]).unwrap_err();
    assert_eq!(e.object, "foo/bad");
    assert_eq!(e.field, field);
    assert!(e.message.contains(message), "{e}");
    assert!(e.to_string().starts_with("RequestAuthentication foo/bad: "));
}

#[test]
fn webhook_rejections_beyond_rules_are_errors() {
    let mut r = ra("sel", vec![rule(r#"{"keys":[]}"#)]);
    r.spec.selector = Some(Default::default());
    r.spec.target_refs = vec![mesh_policy::model::TargetRef {
        kind: "Service".into(),
        name: "s".into(),
        ..Default::default()
    }];
    let e = Authenticator::new(&[r]).unwrap_err();
    assert_eq!((e.object.as_str(), e.field.as_str()), ("foo/sel", "spec"));
}

#[test]
fn unusable_inline_jwks_keys_are_a_warning() {
    let a = Authenticator::new(&[ra("w", vec![rule(r#"{"keys":[{"kty":"XYZ"}]}"#)])]).unwrap();
    assert_eq!(a.warnings().len(), 1);
    assert_eq!(a.warnings()[0].field, "spec.jwtRules[0].jwks");
    assert!(
        a.warnings()[0]
            .message
            .contains("Jwks doesn't have any valid public key")
    );
}

#[tokio::test]
async fn only_the_accepting_rule_writes_its_outputs() {
    let (k1, k2) = (Key::p256(), Key::p384());
    let r1 = JwtRule {
        from_headers: vec![header("x-a", "")],
        output_payload_to_header: "x-p1".into(),
        ..rule(&jwks(&[k1.jwk("k1", None)]))
    };
    let r2 = JwtRule {
        issuer: ISS2.into(),
        jwks: jwks(&[k2.jwk("k2", None)]),
        output_payload_to_header: "x-p2".into(),
        ..Default::default()
    };
    let a = authn(vec![r1, r2]);
    let t2 = k2.sign("ES384", Some("k2"), &claims(ISS2));
    let (r, h) = check(&a, &[("authorization", &bearer(&t2))], "/").await;
    assert_eq!(r.unwrap().unwrap().iss, ISS2);
    assert!(h.contains_key("x-p2") && !h.contains_key("x-p1"));
    assert!(!h.contains_key("authorization"));

    let t1 = k1.sign("ES256", Some("k1"), &claims(ISS));
    let (r, h) = check(&a, &[("x-a", &t1)], "/").await;
    assert_eq!(r.unwrap().unwrap().iss, ISS);
    assert!(h.contains_key("x-p1") && !h.contains_key("x-p2"));
    assert!(!h.contains_key("x-a"));

    // The rule-one token in rule two's location: rule two says "wrong issuer".
    let (r, _) = check(&a, &[("authorization", &bearer(&t1))], "/").await;
    assert_eq!(r.unwrap_err().body(), "Jwt issuer is not configured");
}

#[tokio::test]
async fn with_several_accepted_tokens_the_first_found_is_the_principal() {
    let k = Key::p256();
    let a = authn(vec![rule(&jwks(&[k.jwk("k1", None)]))]);
    let mut c = claims(ISS);
    c["sub"] = json!("from-header");
    let in_header = k.sign("ES256", Some("k1"), &c);
    c["sub"] = json!("from-param");
    let in_param = k.sign("ES256", Some("k1"), &c);
    let (r, _) = check(
        &a,
        &[("authorization", &bearer(&in_header))],
        &format!("/?access_token={in_param}"),
    )
    .await;
    assert_eq!(r.unwrap().unwrap().sub, "from-header");
}
