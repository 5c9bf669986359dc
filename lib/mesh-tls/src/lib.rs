//! TLS for HBONE on rustls: TLS 1.3 only, ALPN `h2`, SPIFFE identities in URI SANs.
//!
//! This crate owns everything about certificates and handshakes so that ztunnel, the waypoint
//! and istiod-lite make the same trust decisions:
//! - [`WorkloadCert`] — a workload's key, chain and trust bundle (possibly several roots);
//! - [`verify`] — the client side checks the server's SAN against the identities expected for
//!   the destination; the server side accepts any identity of its trust domain(s);
//! - [`ca`] — a local CA (development, tests) and CSR building/signing shared with istiod-lite.
//!
//! Crypto: aws-lc-rs, chosen for speed (with AVX-512 its AES-GCM record layer is ≈2× ring's,
//! `shared/reference/performance.md` §2.1), except the AES-GCM record protection on CPUs
//! with VAES-AVX2 and no AVX-512, where ring's is ≈2× aws-lc's ([`aead`]). Suites are
//! AES-128-GCM then AES-256-GCM (both offered by Istio's ztunnel); key exchange X25519 then
//! P-256.

pub mod aead;
pub mod ca;
pub mod cert;
pub mod config;
pub mod verify;

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, aws_lc_rs};

pub use cert::{CertError, WorkloadCert};
pub use config::{
    client_config, control_plane_client_config, control_plane_server_config, server_config,
};
pub use verify::TrustPolicy;

/// The ALPN protocol HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// The mesh's crypto provider: aws-lc-rs with TLS 1.3 AES-GCM suites and classical key
/// exchange; the suites' record protection is ring's where that is faster (see [`aead`]).
pub fn provider() -> Arc<CryptoProvider> {
    provider_for(aead::ring_aes_gcm_is_faster())
}

/// [`provider`] with the AES-GCM record protection from ring (`true`) or aws-lc.
pub fn provider_for(ring_aead: bool) -> Arc<CryptoProvider> {
    use aws_lc_rs::{cipher_suite, kx_group};
    Arc::new(CryptoProvider {
        cipher_suites: if ring_aead {
            aead::ring_suites()
        } else {
            vec![
                cipher_suite::TLS13_AES_128_GCM_SHA256,
                cipher_suite::TLS13_AES_256_GCM_SHA384,
            ]
        },
        kx_groups: vec![kx_group::X25519, kx_group::SECP256R1],
        ..aws_lc_rs::default_provider()
    })
}

/// Errors building TLS configuration or verifying peers.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("rustls rejected the configuration: {0}")]
    Rustls(#[from] rustls::Error),
}
