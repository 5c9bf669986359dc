//! rustls client and server configurations for HBONE and for the control-plane port.
//!
//! HBONE: session resumption is off on both sides: a resumed session skips certificate
//! verification, and the identity a destination must present can change between connections.
//!
//! Control plane (`:15012`, xDS and CA): ordinary server authentication by DNS name against
//! the mesh's root bundle; the client proves who it is with a bearer token, not a certificate.

use std::sync::Arc;

use mesh_core::Identity;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::{Resumption, WebPkiServerVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    version::TLS13,
};

use crate::{
    ALPN_H2, TlsError, WorkloadCert,
    verify::{ClientIdentityVerifier, ServerIdentityVerifier, TrustPolicy},
};

/// A client config presenting `cert` and accepting only a server that is one of `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    expected: Vec<Identity>,
) -> Result<ClientConfig, TlsError> {
    client_config_with(cert, expected, crate::provider())
}

pub(crate) fn client_config_with(
    cert: &WorkloadCert,
    expected: Vec<Identity>,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<ClientConfig, TlsError> {
    let verifier = ServerIdentityVerifier::new(&cert.roots, expected)?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
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
    server_config_with(cert, policy, crate::provider())
}

pub(crate) fn server_config_with(
    cert: &WorkloadCert,
    policy: TrustPolicy,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<ServerConfig, TlsError> {
    let verifier = ClientIdentityVerifier::new(&cert.roots, policy)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain.clone(), cert.private_key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(cfg)
}

/// A client config for the control plane: verifies the server's DNS name against `roots`.
pub fn control_plane_client_config(
    roots: &[CertificateDer<'static>],
) -> Result<ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    if store.is_empty() {
        return Err(TlsError::Cert(crate::CertError::EmptyPem(
            "root certificate",
        )));
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), crate::provider())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
    let mut cfg = ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&TLS13])?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}

/// A server config for the control plane: presents `chain`, asks for no client certificate.
pub fn control_plane_server_config(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivatePkcs8KeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(key.clone_key()))?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(cfg)
}
