//! In-memory TLS handshakes between our client and server configs: who is accepted, who is not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use mesh_core::Identity;
use mesh_tls::{TrustPolicy, WorkloadCert, ca::LocalCa, client_config, server_config, verify};
use rustls::{ClientConnection, ServerConnection, pki_types::ServerName};

fn id(s: &str) -> Identity {
    s.parse().unwrap()
}

const CLIENT: &str = "spiffe://cluster.local/ns/bar/sa/sleep";
const SERVER: &str = "spiffe://cluster.local/ns/foo/sa/httpbin";

/// Runs a handshake to completion; returns the server's view of the client identity, or the
/// first error either side raised.
fn handshake(
    client: &WorkloadCert,
    server: &WorkloadCert,
    expected: &str,
    policy: TrustPolicy,
) -> Result<Option<Identity>, String> {
    let cc = client_config(client, vec![id(expected)]).unwrap();
    let sc = server_config(server, policy.clone()).unwrap();
    let mut c = ClientConnection::new(Arc::new(cc), ServerName::try_from("10.0.0.1").unwrap())
        .map_err(|e| e.to_string())?;
    let mut s = ServerConnection::new(Arc::new(sc)).map_err(|e| e.to_string())?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets()
            .map_err(|e| format!("server: {e}"))?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut buf.as_slice()).unwrap();
        c.process_new_packets()
            .map_err(|e| format!("client: {e}"))?;
        if !c.is_handshaking() && !s.is_handshaking() {
            // Flush the client's final flight so the server sees the client certificate.
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
            assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            return Ok(verify::peer_identity(s.peer_certificates(), &policy));
        }
    }
    Err("handshake did not finish".into())
}

fn pair(ca: &LocalCa) -> (WorkloadCert, WorkloadCert) {
    let ttl = Duration::from_secs(3600);
    (
        ca.issue(&id(CLIENT), ttl).unwrap(),
        ca.issue(&id(SERVER), ttl).unwrap(),
    )
}

#[test]
fn mutual_tls_with_expected_identity_succeeds() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let (c, s) = pair(&ca);
    let seen = handshake(&c, &s, SERVER, TrustPolicy::new("cluster.local")).unwrap();
    assert_eq!(seen, Some(id(CLIENT)));
}

#[test]
fn client_refuses_server_with_wrong_identity() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let (c, s) = pair(&ca);
    let err = handshake(
        &c,
        &s,
        "spiffe://cluster.local/ns/foo/sa/other",
        TrustPolicy::new("cluster.local"),
    )
    .unwrap_err();
    assert!(
        err.contains("not the destination's expected identity"),
        "{err}"
    );
}

#[test]
fn server_refuses_client_of_foreign_trust_domain() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let foreign = ca
        .issue(
            &id("spiffe://evil.org/ns/bar/sa/sleep"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let (_, s) = pair(&ca);
    let err = handshake(&foreign, &s, SERVER, TrustPolicy::new("cluster.local")).unwrap_err();
    assert!(err.contains("outside the accepted trust domains"), "{err}");

    // ...unless the trust domain is configured as an alias.
    let policy = TrustPolicy {
        trust_domains: vec!["cluster.local".into(), "evil.org".into()],
    };
    let seen = handshake(&foreign, &s, SERVER, policy).unwrap();
    assert_eq!(seen, Some(id("spiffe://evil.org/ns/bar/sa/sleep")));
}

/// Same-named roots surface as a bad signature, differently named ones as an unknown issuer.
fn untrusted(err: &str) -> bool {
    err.contains("UnknownIssuer") || err.contains("BadSignature")
}

#[test]
fn certificates_from_another_ca_are_refused_both_ways() {
    let ours = LocalCa::generate("cluster.local").unwrap();
    let theirs = LocalCa::generate("cluster.local").unwrap();
    let (c, s) = pair(&ours);
    let (c2, s2) = pair(&theirs);
    let err = handshake(&c, &s2, SERVER, TrustPolicy::new("cluster.local")).unwrap_err();
    assert!(err.starts_with("client") && untrusted(&err), "{err}");
    // A client that trusts our root but holds a foreign certificate is refused by the server.
    let c2 = WorkloadCert {
        roots: ours.roots().to_vec(),
        ..c2
    };
    let err = handshake(&c2, &s, SERVER, TrustPolicy::new("cluster.local")).unwrap_err();
    assert!(err.starts_with("server") && untrusted(&err), "{err}");
}

#[test]
fn expired_certificates_are_refused() {
    let ca = LocalCa::generate("cluster.local").unwrap();
    let (c, _) = pair(&ca);
    let old = SystemTime::now() - Duration::from_secs(7200);
    let expired = ca
        .issue_at(&id(SERVER), old, Duration::from_secs(60))
        .unwrap();
    assert!(expired.is_expired_at(SystemTime::now()));
    let err = handshake(&c, &expired, SERVER, TrustPolicy::new("cluster.local")).unwrap_err();
    assert!(err.contains("client") && err.contains("Expired"), "{err}");
}

#[test]
fn rotated_bundle_trusts_old_and_new_roots() {
    let old = LocalCa::generate("cluster.local").unwrap();
    let mut new = LocalCa::generate("cluster.local").unwrap();
    new.add_root(old.roots()[0].clone());
    let (old_client, _) = pair(&old);
    let (_, new_server) = pair(&new);
    // The server was issued by the new root but trusts both: an old-root client gets in.
    let seen = handshake(
        &WorkloadCert {
            roots: new.roots().to_vec(),
            ..old_client
        },
        &new_server,
        SERVER,
        TrustPolicy::new("cluster.local"),
    )
    .unwrap();
    assert_eq!(seen, Some(id(CLIENT)));
}
