//! Certificates from Istio's CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! For each identity: a fresh P-256 key and a CSR carrying the SPIFFE URI SAN, sent with the
//! node's service-account token and `ImpersonatedIdentity` metadata (a node proxy asks on
//! behalf of the pods on its node; the CA checks that). The response is the chain leaf
//! first and root last. The leaf must carry exactly the identity asked for — a CA that signs
//! something else is refused, never trusted. The trust bundle is the chain's root plus the
//! roots configured for the CA endpoint (so a rotation that adds a root is honoured).

use std::{collections::BTreeMap, future::Future, pin::Pin, time::Duration};

use mesh_core::Identity;
use mesh_proto::istio::v1::auth::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use mesh_tls::WorkloadCert;
use prost_types::{Struct, Value, value::Kind};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, pem::PemObject};
use tonic::transport::Channel;

use super::{CertProvider, IdentityError};
use crate::{
    config::ControlPlane,
    controlplane::{self, Credentials},
};

/// Fetches workload certificates from an Istio-compatible CA.
pub struct IstioCaProvider {
    client: IstioCertificateServiceClient<Channel>,
    credentials: Credentials,
    ttl: Duration,
    roots: Vec<CertificateDer<'static>>,
}

impl IstioCaProvider {
    /// A provider for `endpoint`; the channel connects on first use.
    pub fn new(
        endpoint: &ControlPlane,
        credentials: Credentials,
        ttl: Duration,
    ) -> Result<Self, controlplane::ControlPlaneError> {
        let roots = controlplane::load_roots(&endpoint.root_ca)?;
        Ok(IstioCaProvider {
            client: IstioCertificateServiceClient::new(controlplane::channel(endpoint)?),
            credentials,
            ttl,
            roots,
        })
    }

    async fn fetch_one(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let issue = |reason: String| IdentityError::Issue {
            identity: id.clone(),
            reason,
        };
        let csr = mesh_tls::ca::build_csr(id).map_err(|e| issue(e.to_string()))?;
        let metadata = Struct {
            fields: BTreeMap::from([(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            )]),
        };
        let req = IstioCertificateRequest {
            csr: csr.csr_pem,
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        };
        let resp = self
            .client
            .clone()
            .create_certificate(self.credentials.request(req))
            .await
            .map_err(|s| {
                issue(format!(
                    "the CA refused: {} ({:?}); check CA_ADDRESS and the service-account token",
                    s.message(),
                    s.code()
                ))
            })?
            .into_inner();
        let key = PrivatePkcs8KeyDer::from_pem_slice(csr.key_pem.as_bytes())
            .map_err(|e| issue(format!("reading our own key: {e}")))?;
        let cert = assemble(key, &resp.cert_chain, &self.roots).map_err(issue)?;
        if cert.identity != *id {
            return Err(issue(format!(
                "the CA issued a certificate for {}, not for the identity requested",
                cert.identity
            )));
        }
        Ok(cert)
    }
}

/// Builds a [`WorkloadCert`] from a CA response (leaf first, root last) and extra roots.
pub fn assemble(
    key: PrivatePkcs8KeyDer<'static>,
    chain_pem: &[String],
    extra_roots: &[CertificateDer<'static>],
) -> Result<WorkloadCert, String> {
    let mut certs = Vec::new();
    for (i, pem) in chain_pem.iter().enumerate() {
        let parsed = mesh_tls::cert::parse_pem_certs(pem)
            .map_err(|e| format!("cert_chain[{i}] is not a PEM certificate: {e}"))?;
        certs.extend(parsed);
    }
    if certs.is_empty() {
        return Err("the CA returned an empty certificate chain".to_owned());
    }
    let mut roots = Vec::new();
    if certs.len() > 1 {
        roots.extend(certs.pop());
    }
    for r in extra_roots {
        if !roots.contains(r) {
            roots.push(r.clone());
        }
    }
    WorkloadCert::from_der(key, certs, roots).map_err(|e| e.to_string())
}

impl CertProvider for IstioCaProvider {
    fn fetch<'a>(
        &'a self,
        id: &'a Identity,
    ) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, IdentityError>> + Send + 'a>> {
        Box::pin(self.fetch_one(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_tls::ca::LocalCa;

    #[test]
    fn chain_is_split_into_leaf_and_roots() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let other_root = LocalCa::generate("cluster.local").unwrap().roots()[0].clone();
        let id: Identity = "spiffe://cluster.local/ns/a/sa/b".parse().unwrap();
        let csr = mesh_tls::ca::build_csr(&id).unwrap();
        let chain = ca
            .sign_csr(&csr.csr_pem, &id, Duration::from_secs(600))
            .unwrap();
        let key = PrivatePkcs8KeyDer::from_pem_slice(csr.key_pem.as_bytes()).unwrap();
        let c = assemble(key.clone_key(), &chain, std::slice::from_ref(&other_root)).unwrap();
        assert_eq!(c.identity, id);
        assert_eq!(c.chain.len(), 1, "the root is not served in the chain");
        assert_eq!(c.roots.len(), 2, "the chain's root plus the configured one");
        assert!(
            assemble(key.clone_key(), &[], &[])
                .unwrap_err()
                .contains("empty")
        );
        let e = assemble(key, &["junk".into()], &[]).unwrap_err();
        assert!(e.contains("cert_chain"), "{e}");
    }
}
