//! A small Istio-shaped control plane for ztunnel's client tests: delta ADS and the CA on one
//! TLS port, speaking exactly the wire contracts in `proto/`.
//!
//! It is a test double for *request shapes and protocol behaviour* (wildcard subscriptions,
//! nonces, ACK/NACK, `initial_resource_versions` on reconnect, bearer tokens,
//! `ImpersonatedIdentity`), not a replacement for istiod-lite, whose own tests run the real
//! server against a real kube-apiserver. Everything it sees is recorded for assertions.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::Identity;
use mesh_proto::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource,
        aggregated_discovery_service_server::{
            AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
        },
    },
    istio::v1::auth::{
        IstioCertificateRequest, IstioCertificateResponse,
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
    },
};
use mesh_tls::ca::LocalCa;
use prost::Message;
use tokio::{net::TcpListener, sync::watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

pub const SERVER_NAME: &str = "istiod.istio-system.svc";
pub const TOKEN: &str = "token-of-ztunnel";

/// What the control plane serves: type → name → encoded resource.
pub type Snapshot = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

#[derive(Debug, Default)]
pub struct Seen {
    /// (type, nonce, NACK message) for every request answering a response.
    pub acks: Vec<(String, String, Option<String>)>,
    /// initial_resource_versions keys of each stream's first request per type.
    pub initial: Vec<(String, BTreeSet<String>)>,
    /// Node ids of the streams opened.
    pub nodes: Vec<String>,
    /// Identities certificates were issued for.
    pub issued: Vec<String>,
    /// Requests refused for a missing or wrong token.
    pub unauthenticated: usize,
}

struct Inner {
    ca: LocalCa,
    snapshot: watch::Sender<Snapshot>,
    seen: Mutex<Seen>,
    /// Sign certificates for this identity instead of the one asked for (a broken CA).
    wrong_identity: Mutex<Option<Identity>>,
}

#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
    pub root_pem: String,
}

fn authorized<T>(req: &Request<T>) -> bool {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"))
}

impl ControlPlane {
    pub fn new(ca: LocalCa) -> Self {
        let root_pem = mesh_tls::cert::to_pem(ca.roots());
        ControlPlane {
            inner: Arc::new(Inner {
                ca,
                snapshot: watch::channel(Snapshot::new()).0,
                seen: Mutex::new(Seen::default()),
                wrong_identity: Mutex::new(None),
            }),
            root_pem,
        }
    }

    /// Writes the root bundle and the token where ztunnel reads them.
    pub fn write_files(&self, dir: &std::path::Path) -> (PathBuf, PathBuf) {
        let root = dir.join("cp-root.pem");
        let token = dir.join("istio-token");
        std::fs::write(&root, &self.root_pem).unwrap();
        std::fs::write(&token, TOKEN).unwrap();
        (root, token)
    }

    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.inner.seen.lock().unwrap())
    }

    pub fn sign_wrong_identity(&self, id: Option<Identity>) {
        *self.inner.wrong_identity.lock().unwrap() = id;
    }

    /// Sets (or with `None` removes) one resource and pushes the change.
    pub fn set(&self, type_url: &str, name: &str, msg: Option<Vec<u8>>) {
        self.inner.snapshot.send_modify(|s| {
            let t = s.entry(type_url.to_owned()).or_default();
            match msg {
                Some(m) => {
                    t.insert(name.to_owned(), m);
                }
                None => {
                    t.remove(name);
                }
            }
        });
    }

    pub fn set_message(&self, type_url: &str, name: &str, msg: &impl Message) {
        self.set(type_url, name, Some(msg.encode_to_vec()));
    }

    /// Serves on `addr` (port 0 for any) until the returned handle is aborted.
    pub async fn serve(&self, addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let server = self
            .inner
            .ca
            .issue_server(&[SERVER_NAME.to_owned()], Duration::from_secs(3600))
            .unwrap();
        let tls = mesh_tls::control_plane_server_config(server.chain, &server.key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(addr).await.unwrap();
        let bound = listener.local_addr().unwrap();
        let routes =
            tonic::service::Routes::new(AggregatedDiscoveryServiceServer::new(self.clone()))
                .add_service(IstioCertificateServiceServer::new(self.clone()));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let routes = routes.clone();
                // Connections die with this task (JoinSet aborts them on drop): a "crashed"
                // control plane really drops its streams.
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(routes);
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        (bound, task)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for ControlPlane {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("only delta xDS is served"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        if !authorized(&req) {
            self.inner.seen.lock().unwrap().unauthenticated += 1;
            return Err(Status::unauthenticated("no valid token"));
        }
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            // What this client holds, per type: name → bytes sent (None = announced on
            // reconnect, content unknown).
            let mut held: BTreeMap<String, BTreeMap<String, Option<Vec<u8>>>> = BTreeMap::new();
            // Types answered at least once on this stream (the first answer is sent even
            // when empty, so the client knows it is in sync).
            let mut answered: BTreeSet<String> = BTreeSet::new();
            let mut snap_rx = me.inner.snapshot.subscribe();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    m = incoming.message() => {
                        let Ok(Some(r)) = m else { return };
                        let mut seen = me.inner.seen.lock().unwrap();
                        if r.response_nonce.is_empty() {
                            if let Some(n) = &r.node { seen.nodes.push(n.id.clone()); }
                            let names: BTreeSet<String> = r.initial_resource_versions.keys().cloned().collect();
                            seen.initial.push((r.type_url.clone(), names.clone()));
                            held.insert(r.type_url.clone(), names.into_iter().map(|n| (n, None)).collect());
                        } else {
                            seen.acks.push((r.type_url.clone(), r.response_nonce.clone(), r.error_detail.map(|e| e.message)));
                            continue;
                        }
                    }
                    c = snap_rx.changed() => { if c.is_err() { return } }
                }
                // Push, per subscribed type, whatever differs from what the client holds.
                let snap = snap_rx.borrow_and_update().clone();
                for (type_url, have) in held.iter_mut() {
                    let want = snap.get(type_url).cloned().unwrap_or_default();
                    let resources: Vec<Resource> = want
                        .iter()
                        .filter(|(n, b)| have.get(*n).and_then(|h| h.as_ref()) != Some(*b))
                        .map(|(n, b)| Resource {
                            name: n.clone(),
                            version: format!("{}", b.len()),
                            resource: Some(prost_types::Any {
                                type_url: type_url.clone(),
                                value: b.clone(),
                            }),
                            ..Default::default()
                        })
                        .collect();
                    let removed: Vec<String> = have
                        .keys()
                        .filter(|n| !want.contains_key(*n))
                        .cloned()
                        .collect();
                    let first = answered.insert(type_url.clone());
                    if resources.is_empty() && removed.is_empty() && !first {
                        continue;
                    }
                    *have = want.into_iter().map(|(n, b)| (n, Some(b))).collect();
                    nonce += 1;
                    let resp = DeltaDiscoveryResponse {
                        type_url: type_url.clone(),
                        nonce: format!("n{nonce}"),
                        resources,
                        removed_resources: removed,
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl IstioCertificateService for ControlPlane {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        if !authorized(&req) {
            self.inner.seen.lock().unwrap().unauthenticated += 1;
            return Err(Status::unauthenticated("no valid token"));
        }
        let r = req.into_inner();
        let asked = r
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::invalid_argument("no ImpersonatedIdentity"))?;
        let id: Identity = asked
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let signed_for = self
            .inner
            .wrong_identity
            .lock()
            .unwrap()
            .clone()
            .unwrap_or(id);
        let chain = self
            .inner
            .ca
            .sign_csr(
                &r.csr,
                &signed_for,
                Duration::from_secs(r.validity_duration.max(60) as u64),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.inner.seen.lock().unwrap().issued.push(asked);
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
