//! Peer verification: chain to one of the trust bundle's roots, then check the SPIFFE SAN.
//!
//! - Client side ([`ServerIdentityVerifier`]): the server must present one of the identities
//!   the control plane says the destination runs as. The TLS server name is ignored.
//! - Server side ([`ClientIdentityVerifier`]): any identity of an accepted trust domain
//!   (ours plus aliases); authorization decides what that identity may do.
//!
//! Time, signature and key-usage checks are webpki's. Both sides fail closed: no SPIFFE SAN,
//! an unknown issuer, or an expired certificate ends the handshake with a named reason.

use std::{fmt, sync::Arc};

use mesh_core::Identity;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use webpki::{EndEntityCert, KeyUsage};

use crate::cert::CertInfo;

/// Which trust domains a server accepts client identities from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustPolicy {
    /// The mesh's trust domain first, then any aliases.
    pub trust_domains: Vec<String>,
}

impl TrustPolicy {
    pub fn new(trust_domain: &str) -> Self {
        TrustPolicy {
            trust_domains: vec![trust_domain.to_owned()],
        }
    }

    pub fn accepts(&self, id: &Identity) -> bool {
        self.trust_domains.iter().any(|td| td == id.trust_domain())
    }
}

/// A verification failure with the detail an operator needs.
#[derive(Debug)]
pub struct PeerIdentityError(pub String);

impl fmt::Display for PeerIdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerIdentityError {}

fn other(msg: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        PeerIdentityError(msg),
    ))))
}

fn map_webpki(e: webpki::Error) -> Error {
    use webpki::Error as W;
    let ce = match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::CertRevoked => CertificateError::Revoked,
        other_err => {
            return other(format!("certificate chain rejected: {other_err}"));
        }
    };
    Error::InvalidCertificate(ce)
}

/// Trust anchors and algorithms shared by both verifiers.
#[derive(Debug, Clone)]
struct Chain {
    anchors: Arc<Vec<TrustAnchor<'static>>>,
    algs: WebPkiSupportedAlgorithms,
}

impl Chain {
    fn new(roots: &[CertificateDer<'_>]) -> Result<Self, Error> {
        let anchors = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| other(format!("trust bundle root unusable: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Chain {
            anchors: Arc::new(anchors),
            algs: crate::provider().signature_verification_algorithms,
        })
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<Vec<Identity>, Error> {
        let ee = EndEntityCert::try_from(end_entity).map_err(map_webpki)?;
        ee.verify_for_usage(
            self.algs.all,
            &self.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(map_webpki)?;
        let info = CertInfo::parse(end_entity).map_err(|e| other(e.to_string()))?;
        if info.identities.is_empty() {
            return Err(other(
                "peer certificate has no SPIFFE URI SAN (spiffe://<td>/ns/<ns>/sa/<sa>)".into(),
            ));
        }
        Ok(info.identities)
    }
}

/// Client-side verifier: the server must be one of `expected`.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    chain: Chain,
    expected: Vec<Identity>,
}

impl ServerIdentityVerifier {
    pub fn new(roots: &[CertificateDer<'_>], expected: Vec<Identity>) -> Result<Self, Error> {
        Ok(ServerIdentityVerifier {
            chain: Chain::new(roots)?,
            expected,
        })
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ids = self
            .chain
            .verify(end_entity, intermediates, now, KeyUsage::server_auth())?;
        if ids.iter().any(|id| self.expected.contains(id)) {
            return Ok(ServerCertVerified::assertion());
        }
        let got: Vec<String> = ids.iter().map(ToString::to_string).collect();
        let want: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
        Err(other(format!(
            "server identity [{}] is not the destination's expected identity [{}]",
            got.join(", "),
            want.join(", ")
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.chain.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.chain.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.algs.supported_schemes()
    }
}

/// Server-side verifier: a client certificate is mandatory and must carry an identity of an
/// accepted trust domain.
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    chain: Chain,
    policy: TrustPolicy,
}

impl ClientIdentityVerifier {
    pub fn new(roots: &[CertificateDer<'_>], policy: TrustPolicy) -> Result<Self, Error> {
        Ok(ClientIdentityVerifier {
            chain: Chain::new(roots)?,
            policy,
        })
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let ids = self
            .chain
            .verify(end_entity, intermediates, now, KeyUsage::client_auth())?;
        if ids.iter().any(|id| self.policy.accepts(id)) {
            return Ok(ClientCertVerified::assertion());
        }
        Err(other(format!(
            "client identity {} is outside the accepted trust domains [{}]",
            ids[0],
            self.policy.trust_domains.join(", ")
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.chain.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.chain.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.algs.supported_schemes()
    }
}

/// The verified peer identity of an established connection, if it has one we accept.
pub fn peer_identity(
    peer_certs: Option<&[CertificateDer<'_>]>,
    policy: &TrustPolicy,
) -> Option<Identity> {
    let leaf = peer_certs?.first()?;
    CertInfo::parse(leaf)
        .ok()?
        .identities
        .into_iter()
        .find(|id| policy.accepts(id))
}
