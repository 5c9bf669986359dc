//! A certificate authority for workload certificates, and the CSRs workloads send to one.
//!
//! [`LocalCa`] backs ztunnel's self-signed development mode and the tests today, and the same
//! signing path serves istiod-lite's `CreateCertificate`: the CA always writes the identity it
//! authorized into the certificate, whatever the CSR asked for.
//!
//! Certificate shape follows Istio's CA: ECDSA P-256 keys, an empty subject, one URI SAN with
//! the SPIFFE identity, key usage digitalSignature + keyEncipherment, EKU serverAuth +
//! clientAuth, short validity.

use std::time::{Duration, SystemTime};

use mesh_core::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::cert::{CertError, WorkloadCert, parse_pem_certs};

/// Clock skew tolerated between a CA and its clients.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

fn gen_err(e: impl std::fmt::Display) -> CertError {
    CertError::Generate(e.to_string())
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// An issuing CA: a key and certificate plus the trust bundle handed to workloads.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    /// Every root workloads should trust (the issuing root first; more during rotation).
    bundle: Vec<CertificateDer<'static>>,
    /// Intermediates between the issuing cert and the root (empty for a self-signed root).
    intermediates: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("roots", &self.bundle.len())
            .finish_non_exhaustive()
    }
}

/// A CA in Istio's `cacerts` Secret layout, as PEM strings.
#[derive(Debug, Clone)]
pub struct CaPem {
    /// `ca-key.pem`: the issuing key (PKCS#8).
    pub ca_key: String,
    /// `ca-cert.pem`: the issuing certificate.
    pub ca_cert: String,
    /// `cert-chain.pem`: the issuing certificate up to the root.
    pub cert_chain: String,
    /// `root-cert.pem`: the trust bundle.
    pub root_cert: String,
}

impl CaPem {
    /// The four files by their Istio names.
    pub fn files(&self) -> [(&'static str, &str); 4] {
        [
            ("ca-key.pem", &self.ca_key),
            ("ca-cert.pem", &self.ca_cert),
            ("cert-chain.pem", &self.cert_chain),
            ("root-cert.pem", &self.root_cert),
        ]
    }
}

impl LocalCa {
    /// Generates a self-signed root for `trust_domain` (valid ten years) in `cacerts` layout.
    pub fn generate_pem(trust_domain: &str) -> Result<CaPem, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let params = Self::root_params(trust_domain);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(CaPem {
            ca_key: key.serialize_pem(),
            ca_cert: cert.pem(),
            cert_chain: cert.pem(),
            root_cert: cert.pem(),
        })
    }

    /// Loads a CA from its `cacerts` PEM files.
    pub fn from_ca_pem(p: &CaPem) -> Result<Self, CertError> {
        Self::from_pem(&p.ca_key, &p.ca_cert, &p.cert_chain, &p.root_cert)
    }

    fn root_params(trust_domain: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + Duration::from_secs(10 * 365 * 24 * 3600));
        params
    }

    /// Generates a self-signed root for `trust_domain`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let params = Self::root_params(trust_domain);
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let der = cert.der().clone();
        Ok(LocalCa {
            issuer: Issuer::new(params, key),
            cert: der.clone(),
            bundle: vec![der],
            intermediates: Vec::new(),
        })
    }

    /// Loads a CA from Istio's `cacerts` layout: `ca-key.pem`, `ca-cert.pem`,
    /// `cert-chain.pem` (issuing cert up to the root) and `root-cert.pem` (the trust bundle).
    pub fn from_pem(
        ca_key_pem: &str,
        ca_cert_pem: &str,
        cert_chain_pem: &str,
        root_cert_pem: &str,
    ) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(ca_key_pem)
            .map_err(|e| CertError::Pem(format!("ca-key.pem: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, key)
            .map_err(|e| CertError::Pem(format!("ca-cert.pem: {e}")))?;
        let cert = parse_pem_certs(ca_cert_pem)?
            .into_iter()
            .next()
            .ok_or(CertError::EmptyPem("ca-cert.pem certificate"))?;
        let bundle = parse_pem_certs(root_cert_pem)?;
        // The chain file repeats the issuing cert and ends at the root; keep what lies between.
        let intermediates = parse_pem_certs(cert_chain_pem)?
            .into_iter()
            .filter(|c| *c != cert && !bundle.contains(c))
            .collect();
        Ok(LocalCa {
            issuer,
            cert,
            bundle,
            intermediates,
        })
    }

    /// The trust bundle workloads should use.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// Adds another root to the bundle (root rotation: trust old and new together).
    pub fn add_root(&mut self, root: CertificateDer<'static>) {
        if !self.bundle.contains(&root) {
            self.bundle.push(root);
        }
    }

    /// The chain a leaf is served with: leaf, then the issuing cert unless it is itself a root.
    fn chain_for(&self, leaf: CertificateDer<'static>) -> Vec<CertificateDer<'static>> {
        let mut chain = vec![leaf];
        if !self.bundle.contains(&self.cert) {
            chain.push(self.cert.clone());
        }
        chain.extend(self.intermediates.iter().cloned());
        chain
    }

    fn leaf_params(
        identity: &Identity,
        not_before: SystemTime,
        ttl: Duration,
    ) -> Result<CertificateParams, CertError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity.to_string().try_into().map_err(gen_err)?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_before + BACKDATE + ttl);
        Ok(params)
    }

    /// Issues a fresh key and certificate for `identity`, valid for `ttl` from now.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CertError> {
        self.issue_at(identity, SystemTime::now() - BACKDATE, ttl)
    }

    /// Like [`issue`](Self::issue) with an explicit start time (tests make expired certs).
    pub fn issue_at(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        ttl: Duration,
    ) -> Result<WorkloadCert, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let params = Self::leaf_params(identity, not_before, ttl)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        WorkloadCert::from_der(key, self.chain_for(cert.der().clone()), self.bundle.clone())
    }

    /// Signs a PEM CSR for the `authorized` identity (the CSR's own SANs are ignored) and
    /// returns the chain as PEM strings, leaf first and root last, as Istio's CA does.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        authorized: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>, CertError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::Pem(format!("CSR: {e}")))?;
        let params = Self::leaf_params(authorized, SystemTime::now() - BACKDATE, ttl)?;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(gen_err)?;
        let mut chain = self.chain_for(signed.der().clone());
        chain.extend(self.bundle.iter().take(1).cloned());
        Ok(chain
            .iter()
            .map(|c| crate::cert::to_pem(std::slice::from_ref(c)))
            .collect())
    }
}

/// A TLS server certificate for a control-plane endpoint (istiod's `:15012`), with its key.
pub struct ServerCert {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// Issues a server certificate with DNS SANs (e.g. `istiod.istio-system.svc`), as istiod
    /// serves its gRPC port with a certificate from its own CA.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<ServerCert, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
        let mut params = CertificateParams::new(dns_names.to_vec()).map_err(gen_err)?;
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + ttl);
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(ServerCert {
            chain: self.chain_for(cert.der().clone()),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        })
    }
}

/// A key and CSR for `identity`, as a workload sends to the CA.
pub struct CsrRequest {
    /// PEM `CERTIFICATE REQUEST`.
    pub csr_pem: String,
    /// PEM PKCS#8 private key, kept by the requester.
    pub key_pem: String,
}

/// Builds a P-256 key and a CSR carrying `identity` as its URI SAN.
pub fn build_csr(identity: &Identity) -> Result<CsrRequest, CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen_err)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity.to_string().try_into().map_err(gen_err)?,
    )];
    let csr = params.serialize_request(&key).map_err(gen_err)?;
    Ok(CsrRequest {
        csr_pem: csr.pem().map_err(gen_err)?,
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Identity {
        s.parse().unwrap()
    }

    #[test]
    fn issued_cert_carries_identity_and_validity() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let who = id("spiffe://cluster.local/ns/a/sa/b");
        let c = ca.issue(&who, Duration::from_secs(3600)).unwrap();
        assert_eq!(c.identity, who);
        assert_eq!(c.chain.len(), 1);
        assert_eq!(c.roots.len(), 1);
        let now = SystemTime::now();
        assert!(!c.is_expired_at(now));
        assert!(c.refresh_at() > now && c.refresh_at() < c.not_after);
    }

    #[test]
    fn csr_signing_enforces_authorized_identity() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let asked = id("spiffe://cluster.local/ns/evil/sa/admin");
        let allowed = id("spiffe://cluster.local/ns/a/sa/b");
        let req = build_csr(&asked).unwrap();
        let chain = ca
            .sign_csr(&req.csr_pem, &allowed, Duration::from_secs(600))
            .unwrap();
        assert_eq!(chain.len(), 2, "leaf + root");
        let cert = WorkloadCert::from_pem(&req.key_pem, &chain.join(""), &chain[1]).unwrap();
        assert_eq!(cert.identity, allowed);
    }

    #[test]
    fn cacerts_layout_round_trips() {
        let pem = LocalCa::generate_pem("cluster.local").unwrap();
        let ca = LocalCa::from_ca_pem(&pem).unwrap();
        assert_eq!(ca.roots().len(), 1);
        let c = ca
            .issue(
                &id("spiffe://cluster.local/ns/a/sa/b"),
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(c.chain.len(), 1, "a root-issued leaf is served alone");
        assert_eq!(pem.files().len(), 4);
    }

    #[test]
    fn server_certs_carry_dns_names() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let c = ca
            .issue_server(&["istiod.istio-system.svc".into()], Duration::from_secs(60))
            .unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&c.chain[0]).unwrap();
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert!(format!("{:?}", san.value).contains("istiod.istio-system.svc"));
    }

    #[test]
    fn malformed_csr_is_a_named_error() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let err = ca
            .sign_csr(
                "garbage",
                &id("spiffe://cluster.local/ns/a/sa/b"),
                Duration::from_secs(1),
            )
            .unwrap_err();
        assert!(err.to_string().contains("CSR"), "{err}");
    }
}
