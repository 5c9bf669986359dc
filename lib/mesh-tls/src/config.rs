//! rustls client and server configurations for HBONE.
//!
//! Session resumption is off on both sides: a resumed session skips certificate verification,
//! and the identity a destination must present can change between connections.

use std::sync::Arc;

use mesh_core::Identity;
use rustls::{ClientConfig, ServerConfig, client::Resumption, version::TLS13};

use crate::{
    ALPN_H2, TlsError, WorkloadCert,
    verify::{ClientIdentityVerifier, ServerIdentityVerifier, TrustPolicy},
};

/// A client config presenting `cert` and accepting only a server that is one of `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    expected: Vec<Identity>,
) -> Result<ClientConfig, TlsError> {
    let verifier = ServerIdentityVerifier::new(&cert.roots, expected)?;
    let mut cfg = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.private_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = Resumption::disabled();
    Ok(cfg)
}

/// A server config presenting `cert` and requiring a client certificate of `policy`.
pub fn server_config(cert: &WorkloadCert, policy: TrustPolicy) -> Result<ServerConfig, TlsError> {
    let verifier = ClientIdentityVerifier::new(&cert.roots, policy)?;
    let mut cfg = ServerConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.private_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}
