//! A workload's certificate material and the SPIFFE identities inside certificates.

use std::time::{Duration, SystemTime};

use mesh_core::Identity;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// Problems with certificates or keys, phrased for the operator who must fix them.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate is not valid DER/X.509: {0}")]
    Parse(String),
    #[error("PEM input contains no {0}")]
    EmptyPem(&'static str),
    #[error("PEM input is malformed: {0}")]
    Pem(String),
    #[error("certificate has no SPIFFE URI SAN (spiffe://<td>/ns/<ns>/sa/<sa>)")]
    NoIdentity,
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

/// A leaf certificate with its private key, intermediates and trust bundle.
///
/// `chain[0]` is the leaf; `roots` may hold several roots while a root is rotated.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        WorkloadCert {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl WorkloadCert {
    /// Assembles a certificate from PEM (as returned by Istio's CA: leaf first, root last).
    ///
    /// `chain_pem` may contain intermediates; `roots_pem` is the trust bundle.
    pub fn from_pem(key_pem: &str, chain_pem: &str, roots_pem: &str) -> Result<Self, CertError> {
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| CertError::Pem(format!("private key (PKCS#8 expected): {e}")))?;
        let chain = parse_pem_certs(chain_pem)?;
        let roots = parse_pem_certs(roots_pem)?;
        Self::from_der(key, chain, roots)
    }

    /// Assembles a certificate from DER parts, reading the identity and validity from the leaf.
    pub fn from_der(
        key: PrivatePkcs8KeyDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::EmptyPem("certificate"))?;
        let info = CertInfo::parse(leaf)?;
        let identity = info
            .identities
            .into_iter()
            .next()
            .ok_or(CertError::NoIdentity)?;
        if roots.is_empty() {
            return Err(CertError::EmptyPem("root certificate"));
        }
        Ok(WorkloadCert {
            identity,
            chain,
            key,
            roots,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// When a well-behaved client should renew: half-way through the validity period
    /// (Istio's default grace ratio), so a CA outage has half a lifetime to heal.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }

    /// True when `now` is outside the leaf's validity window.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        now >= self.not_after || now < self.not_before
    }
}

/// Reads every `CERTIFICATE` block of a PEM string.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::EmptyPem("certificate"));
    }
    Ok(certs)
}

/// Encodes certificates as PEM.
pub fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref().to_vec()))
        .collect();
    pem::encode_many(&blocks)
}

/// What the mesh reads out of a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// SPIFFE identities from URI SANs, in certificate order (non-SPIFFE URIs are ignored).
    pub identities: Vec<Identity>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, CertError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der.as_ref())
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let mut identities = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(uri) = name
                    && let Ok(id) = uri.parse::<Identity>()
                {
                    identities.push(id);
                }
            }
        }
        let ts = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(CertInfo {
            identities,
            not_before: ts(cert.validity().not_before),
            not_after: ts(cert.validity().not_after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_errors_name_the_problem() {
        assert!(matches!(
            parse_pem_certs("nothing here"),
            Err(CertError::EmptyPem("certificate"))
        ));
        let err = WorkloadCert::from_pem("bad", "bad", "bad").unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
    }
}
