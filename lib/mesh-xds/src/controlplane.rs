//! The gRPC channel to the control plane (istiod or istiod-lite on `:15012`), shared by the
//! xDS client and the CA client of every program in the mesh.
//!
//! TLS is ours (rustls, TLS 1.3, ALPN h2, server name checked against the configured roots),
//! dialled through a custom connector so tonic never picks a TLS stack of its own. Every
//! request carries the service-account token as `authorization: Bearer …` and the cluster id
//! as `ClusterID`, as Istio's ztunnel sends them. The token file is re-read per request, so
//! kubelet's token rotation needs no restart; a missing token file is sent as no header and
//! the control plane decides (it refuses, and its error names the reason).

use std::{path::PathBuf, sync::Arc};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tonic::{
    Request,
    metadata::{AsciiMetadataValue, MetadataMap},
    transport::{Channel, Endpoint, Uri},
};
use tracing::debug;

/// A control-plane endpoint: where to dial and how to trust it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlane {
    /// `http(s)://host:port`, as given.
    pub address: String,
    /// `host:port` to dial.
    pub authority: String,
    /// The DNS name the server's certificate must carry.
    pub server_name: String,
    pub root_ca: PathBuf,
}

impl ControlPlane {
    /// Parses `https://host:port` (the value of the variable `var`, named in the error);
    /// `alt_hostname` replaces the host as the name checked in the server's certificate.
    pub fn parse(
        var: &str,
        address: &str,
        alt_hostname: Option<&str>,
        root_ca: &std::path::Path,
    ) -> Result<ControlPlane, String> {
        let rest = address
            .strip_prefix("https://")
            .or_else(|| address.strip_prefix("http://"))
            .unwrap_or(address)
            .trim_end_matches('/');
        let bad = || format!("{var} {address:?} is not of the form https://host:port");
        if rest.is_empty() || rest.contains('/') {
            return Err(bad());
        }
        let host = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => h,
            _ => return Err(bad()),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(ControlPlane {
            address: address.to_owned(),
            authority: rest.to_owned(),
            server_name: alt_hostname.unwrap_or(host).to_owned(),
            root_ca: root_ca.to_owned(),
        })
    }
}

/// Why the control plane cannot be used at all (as opposed to a failed call).
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(
        "reading the control plane's root certificates {path}: {reason} (set XDS_ROOT_CA / CA_ROOT_CA to the mesh root, e.g. istiod's root-cert.pem)"
    )]
    Roots { path: String, reason: String },
    #[error("building TLS for the control plane: {0}")]
    Tls(String),
    #[error("control plane address {0:?} is not usable: {1}")]
    Address(String, String),
}

/// Reads the PEM roots at `path`.
pub fn load_roots(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ControlPlaneError> {
    let err = |reason: String| ControlPlaneError::Roots {
        path: path.display().to_string(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    mesh_tls::cert::parse_pem_certs(&pem).map_err(|e| err(e.to_string()))
}

/// Credentials attached to every control-plane request.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub token_path: PathBuf,
    pub cluster_id: String,
}

impl Credentials {
    /// Adds the bearer token (if the file is readable) and `ClusterID` to `md`.
    pub fn apply(&self, md: &mut MetadataMap) {
        match std::fs::read_to_string(&self.token_path) {
            Ok(t) if !t.trim().is_empty() => {
                if let Ok(v) = AsciiMetadataValue::try_from(format!("Bearer {}", t.trim())) {
                    md.insert("authorization", v);
                }
            }
            Ok(_) | Err(_) => {
                debug!(path = %self.token_path.display(), "no service-account token; sending the request without one");
            }
        }
        if let Ok(v) = AsciiMetadataValue::try_from(self.cluster_id.as_str()) {
            md.insert("clusterid", v);
        }
    }

    /// Wraps `msg` in a request carrying the credentials.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        self.apply(req.metadata_mut());
        req
    }
}

/// A lazily connecting channel to `cp`: the first call dials, and a broken connection is
/// re-dialled on the next call.
pub fn channel(cp: &ControlPlane) -> Result<Channel, ControlPlaneError> {
    let roots = load_roots(&cp.root_ca)?;
    let tls = mesh_tls::control_plane_client_config(&roots)
        .map_err(|e| ControlPlaneError::Tls(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let server_name = ServerName::try_from(cp.server_name.clone())
        .map_err(|e| ControlPlaneError::Address(cp.server_name.clone(), e.to_string()))?;
    let authority = cp.authority.clone();
    // The scheme is http because TLS happens in the connector below.
    let endpoint = Endpoint::from_shared(format!("http://{}", cp.authority))
        .map_err(|e| ControlPlaneError::Address(cp.address.clone(), e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let svc = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let server_name = server_name.clone();
        let authority = authority.clone();
        async move {
            let tcp = TcpStream::connect(&authority).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(svc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_name_the_variable() {
        let root = std::path::Path::new("/r.pem");
        let cp = ControlPlane::parse("XDS_ADDRESS", "https://istiod:15012", None, root).unwrap();
        assert_eq!(cp.authority, "istiod:15012");
        assert_eq!(cp.server_name, "istiod");
        let cp = ControlPlane::parse("X", "https://[::1]:15012", Some("istiod.svc"), root).unwrap();
        assert_eq!(cp.server_name, "istiod.svc");
        let e = ControlPlane::parse("CA_ADDRESS", "https://istiod", None, root).unwrap_err();
        assert!(e.contains("CA_ADDRESS"), "{e}");
    }
}
