//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: authenticate, authorize, sign.
//!
//! Rules (Istio's, `security/pkg/server/ca`):
//! - the caller is authenticated by its bearer token ([`Authenticator`]);
//! - without `ImpersonatedIdentity` a caller gets a certificate for its own identity;
//! - with it, the caller must be a trusted node agent (`istio-system/ztunnel` by default)
//!   and the identity must belong to a pod scheduled on the caller's own node — a ztunnel
//!   can never obtain another node's workload identities;
//! - the CSR's own SANs are ignored: the CA writes the identity it authorized;
//! - lifetimes are capped at the configured maximum.
//!
//! Every refusal says why, so an operator reading ztunnel's log knows what to fix.

use std::{sync::Arc, time::Duration};

use mesh_core::Identity;
use mesh_proto::istio::v1::auth::{
    IstioCertificateRequest, IstioCertificateResponse,
    istio_certificate_service_server::IstioCertificateService,
};
use mesh_tls::ca::LocalCa;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::{authn::Authenticator, index::Index};

pub struct CaServer {
    pub ca: Arc<LocalCa>,
    pub authn: Arc<dyn Authenticator>,
    pub index: watch::Receiver<Arc<Index>>,
    pub trust_domain: String,
    pub max_ttl: Duration,
    /// `namespace/name` of the service accounts allowed to impersonate (node agents).
    pub node_agents: Vec<String>,
}

fn impersonated(req: &IstioCertificateRequest) -> Result<Option<String>, Status> {
    let Some(v) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get("ImpersonatedIdentity"))
    else {
        return Ok(None);
    };
    match &v.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(Status::invalid_argument(
            "metadata.ImpersonatedIdentity must be a string (spiffe://<td>/ns/<ns>/sa/<sa>)",
        )),
    }
}

impl CaServer {
    /// Decides which identity the caller may have, or why not.
    fn authorize(
        &self,
        caller: &crate::authn::Caller,
        asked: Option<String>,
    ) -> Result<Identity, Status> {
        let own = Identity::new(
            &self.trust_domain,
            &caller.namespace,
            &caller.service_account,
        )
        .map_err(|e| Status::permission_denied(format!("caller identity: {e}")))?;
        let Some(asked) = asked else {
            return Ok(own);
        };
        let id: Identity = asked.parse().map_err(|e| {
            Status::invalid_argument(format!("metadata.ImpersonatedIdentity {asked:?}: {e}"))
        })?;
        if id == own {
            return Ok(id);
        }
        let who = format!("{}/{}", caller.namespace, caller.service_account);
        if !self.node_agents.contains(&who) {
            return Err(Status::permission_denied(format!(
                "{who} may not impersonate {id}: only node agents ({}) may",
                self.node_agents.join(", ")
            )));
        }
        let Some(node) = caller.node.as_deref() else {
            return Err(Status::permission_denied(format!(
                "{who} may not impersonate {id}: the caller's node is unknown"
            )));
        };
        if id.trust_domain() != self.trust_domain {
            return Err(Status::permission_denied(format!(
                "{id} is not in this CA's trust domain {}",
                self.trust_domain
            )));
        }
        let idx = self.index.borrow().clone();
        let on_node = idx.pods.values().any(|p| {
            let spec = p.spec.as_ref();
            spec.and_then(|s| s.node_name.as_deref()) == Some(node)
                && p.metadata.namespace.as_deref().unwrap_or("default") == id.namespace()
                && spec
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default")
                    == id.service_account()
        });
        if !on_node {
            return Err(Status::permission_denied(format!(
                "{who} on node {node} may not impersonate {id}: no pod with that identity runs on {node}"
            )));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaServer {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let caller = self
            .authn
            .authenticate(token.as_deref())
            .await
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let r = req.into_inner();
        let id = match self.authorize(&caller, impersonated(&r)?) {
            Ok(id) => id,
            Err(s) => {
                warn!(caller = %caller, reason = %s.message(), "certificate refused");
                return Err(s);
            }
        };
        let asked = u64::try_from(r.validity_duration).unwrap_or(0);
        let ttl = if asked == 0 {
            self.max_ttl
        } else {
            Duration::from_secs(asked).min(self.max_ttl)
        };
        let chain = self
            .ca
            .sign_csr(&r.csr, &id, ttl)
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        info!(caller = %caller, identity = %id, ttl_s = ttl.as_secs(), "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
