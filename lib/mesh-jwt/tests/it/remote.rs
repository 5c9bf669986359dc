//! `jwksUri` and OpenID discovery against a loopback server: one fetch per interval, refresh,
//! last good keys kept on failure, fail closed when never fetched, shared store, timeouts.

use std::time::Duration;

use http::HeaderMap;
use mesh_jwt::{Authenticator, JwksStore, Options};
use mesh_policy::model::JwtRule;

use crate::{keys::*, server::Server};

const PATH: &str = "/jwks.json";

fn opts(store: &JwksStore) -> Options {
    Options {
        refresh_interval: Duration::from_millis(300),
        retry_interval: Duration::from_millis(250),
        jwks: store.clone(),
        ..Default::default()
    }
}

fn remote_rule(s: &Server) -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        jwks_uri: s.url(PATH),
        timeout: Some("2s".into()),
        ..Default::default()
    }
}

async fn auth(a: &Authenticator, token: &str) -> Result<bool, &'static str> {
    let mut h = HeaderMap::new();
    h.insert("authorization", format!("Bearer {token}").parse().unwrap());
    a.authenticate(&mut h, &"/".parse().unwrap())
        .await
        .map(|j| j.is_some())
        .map_err(|e| e.body())
}

#[tokio::test]
async fn fetched_once_then_cached() {
    let s = Server::start().await;
    let k = Key::p256();
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    let store = JwksStore::default();
    let a = Authenticator::with_options(
        &[ra("r", vec![remote_rule(&s)])],
        Options {
            jwks: store.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.hits(PATH), 0, "nothing fetched before a token needs it");
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    for _ in 0..5 {
        assert_eq!(auth(&a, &t).await, Ok(true));
    }
    assert_eq!(s.hits(PATH), 1);
    let st = store.status();
    assert_eq!((st.len(), st[0].keys, st[0].fetch_attempts), (1, 1, 1));
    // A request without a token never fetches.
    let fresh = Server::start().await;
    let b = Authenticator::new(&[ra("r", vec![remote_rule(&fresh)])]).unwrap();
    let mut h = HeaderMap::new();
    assert_eq!(
        b.authenticate(&mut h, &"/".parse().unwrap()).await,
        Ok(None)
    );
    assert_eq!(fresh.total(), 0);
}

#[tokio::test]
async fn refreshed_after_the_interval_picks_up_rotated_keys() {
    let s = Server::start().await;
    let (old, new) = (Key::p256(), Key::p256());
    s.serve(PATH, jwks(&[old.jwk("old", None)]));
    let store = JwksStore::default();
    let a = Authenticator::with_options(&[ra("r", vec![remote_rule(&s)])], opts(&store)).unwrap();
    let t_new = new.sign("ES256", Some("new"), &claims(ISS));
    assert_eq!(
        auth(&a, &t_new).await,
        Err("Jwks doesn't have key to match kid or alg from Jwt")
    );
    s.serve(PATH, jwks(&[old.jwk("old", None), new.jwk("new", None)]));
    // Still cached: the new key is not known yet.
    assert!(auth(&a, &t_new).await.is_err());
    assert_eq!(s.hits(PATH), 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(auth(&a, &t_new).await, Ok(true));
    assert_eq!(s.hits(PATH), 2);
}

#[tokio::test]
async fn failed_refresh_keeps_the_last_good_keys() {
    let s = Server::start().await;
    let k = Key::p256();
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    let store = JwksStore::default();
    let a = Authenticator::with_options(&[ra("r", vec![remote_rule(&s)])], opts(&store)).unwrap();
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    assert_eq!(auth(&a, &t).await, Ok(true));
    s.fail_with(503);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(auth(&a, &t).await, Ok(true), "stale keys still used");
    assert_eq!(s.hits(PATH), 2, "a refresh was attempted");
    // Retries are spaced by retry_interval, not one per request.
    for _ in 0..5 {
        assert_eq!(auth(&a, &t).await, Ok(true));
    }
    assert_eq!(s.hits(PATH), 2);
    // A document that is not a JWKS is a failure too.
    s.fail_with(0);
    s.serve(PATH, "<html>");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(auth(&a, &t).await, Ok(true));
    assert_eq!(s.hits(PATH), 3);
}

#[tokio::test]
async fn never_fetched_fails_closed_until_the_server_answers() {
    let s = Server::start().await;
    let k = Key::p256();
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    s.fail_with(500);
    let store = JwksStore::default();
    let a = Authenticator::with_options(&[ra("r", vec![remote_rule(&s)])], opts(&store)).unwrap();
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    assert_eq!(auth(&a, &t).await, Err("Jwks remote fetch is failed"));
    assert_eq!(auth(&a, &t).await, Err("Jwks remote fetch is failed"));
    assert_eq!(
        s.hits(PATH),
        1,
        "second request within retry_interval did not refetch"
    );
    s.fail_with(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(auth(&a, &t).await, Ok(true));
    assert_eq!(s.hits(PATH), 2);
}

#[tokio::test]
async fn unreachable_and_slow_servers_fail_closed() {
    // A port nothing listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unused.local_addr().unwrap().port();
    drop(unused);
    let k = Key::p256();
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    let r = JwtRule {
        jwks_uri: format!("http://127.0.0.1:{port}/jwks"),
        ..remote_rule(&Server::start().await)
    };
    let a = Authenticator::new(&[ra("r", vec![r])]).unwrap();
    assert_eq!(auth(&a, &t).await, Err("Jwks remote fetch is failed"));

    let s = Server::start().await;
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    s.delay(Duration::from_millis(2000));
    let slow = JwtRule {
        timeout: Some("100ms".into()),
        ..remote_rule(&s)
    };
    let a = Authenticator::new(&[ra("r", vec![slow])]).unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(auth(&a, &t).await, Err("Jwks remote fetch is failed"));
    assert!(started.elapsed() < Duration::from_millis(1500));
}

#[tokio::test]
async fn concurrent_requests_share_one_fetch() {
    let s = Server::start().await;
    let k = Key::p256();
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    s.delay(Duration::from_millis(100));
    let a = std::sync::Arc::new(Authenticator::new(&[ra("r", vec![remote_rule(&s)])]).unwrap());
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (a, t) = (a.clone(), t.clone());
        set.spawn(async move { auth(&a, &t).await });
    }
    let results = set.join_all().await;
    assert!(results.iter().all(|r| *r == Ok(true)), "{results:?}");
    assert_eq!(s.hits(PATH), 1);
}

#[tokio::test]
async fn a_shared_store_survives_a_rebuild() {
    let s = Server::start().await;
    let k = Key::p256();
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    let store = JwksStore::default();
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    for name in ["first", "second"] {
        let a = Authenticator::with_options(
            &[ra(name, vec![remote_rule(&s)])],
            Options {
                jwks: store.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(auth(&a, &t).await, Ok(true));
    }
    assert_eq!(s.hits(PATH), 1);
}

#[tokio::test]
async fn openid_discovery_when_only_the_issuer_is_given() {
    let s = Server::start().await;
    let k = Key::ed25519();
    let issuer = s.url("/realm");
    s.serve(
        "/realm/.well-known/openid-configuration",
        serde_json::json!({"issuer": issuer, "jwks_uri": s.url("/realm/certs")}).to_string(),
    );
    s.serve("/realm/certs", jwks(&[k.jwk("k1", None)]));
    let r = JwtRule {
        issuer: issuer.clone(),
        ..Default::default()
    };
    let a = Authenticator::new(&[ra("r", vec![r])]).unwrap();
    a.prefetch().await;
    assert_eq!(s.hits("/realm/certs"), 1);
    let t = k.sign("EdDSA", Some("k1"), &claims(&issuer));
    assert_eq!(auth(&a, &t).await, Ok(true));
    assert_eq!(s.total(), 2);
}

/// A self-signed certificate for 127.0.0.1: the server's config and a client trusting it.
fn tls_pair() -> (
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<rustls::ClientConfig>,
) {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    (
        std::sync::Arc::new(server),
        mesh_jwt::client_config(roots).unwrap(),
    )
}

#[tokio::test]
async fn https_jwks_uri_with_rustls() {
    let (server_cfg, client_cfg) = tls_pair();
    let s = Server::start_tls(server_cfg).await;
    let k = Key::p384();
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    let r = JwtRule {
        jwks_uri: s.https_url(PATH),
        ..remote_rule(&s)
    };
    let t = k.sign("ES384", Some("k1"), &claims(ISS));
    let a = Authenticator::with_options(
        &[ra("r", vec![r.clone()])],
        Options {
            tls: Some(client_cfg),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(auth(&a, &t).await, Ok(true));
    assert_eq!(s.hits(PATH), 1);
    // The system roots do not know this certificate: the fetch fails, closed.
    let untrusted = Authenticator::new(&[ra("r", vec![r])]).unwrap();
    assert_eq!(
        auth(&untrusted, &t).await,
        Err("Jwks remote fetch is failed")
    );
    assert_eq!(s.hits(PATH), 1);
}

#[tokio::test]
async fn a_slow_refresh_does_not_hold_up_requests_with_stale_keys() {
    let s = Server::start().await;
    let k = Key::p256();
    s.serve(PATH, jwks(&[k.jwk("k1", None)]));
    let store = JwksStore::default();
    let a = std::sync::Arc::new(
        Authenticator::with_options(&[ra("r", vec![remote_rule(&s)])], opts(&store)).unwrap(),
    );
    let t = k.sign("ES256", Some("k1"), &claims(ISS));
    assert_eq!(auth(&a, &t).await, Ok(true));
    tokio::time::sleep(Duration::from_millis(350)).await;
    s.delay(Duration::from_millis(1500));
    let refresher = {
        let (a, t) = (a.clone(), t.clone());
        tokio::spawn(async move { auth(&a, &t).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = tokio::time::Instant::now();
    assert_eq!(auth(&a, &t).await, Ok(true));
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(refresher.await.unwrap(), Ok(true));
    assert_eq!(s.hits(PATH), 2);
}
