//! Wiring and lifecycle: load the CA, read the source, translate, bind `:15012` (xDS + CA over
//! TLS) and the monitor port, and return a [`Bound`] control plane; [`Bound::run`] waits for
//! SIGTERM and drains.
//!
//! Data flow: source → `watch<Arc<Index>>` → translator task (incremental [`Translator`] and
//! [`Encoder`]; a snapshot with its change set, only when something changed) →
//! `watch<Arc<Snapshot>>` → one task per xDS stream. The CA reads the index directly (the node rule needs pods).
//!
//! Readiness: [`build`] starts the source and waits until it has published a complete index
//! (the manifests read; with Kubernetes, every watcher's initial list) before binding any
//! port, so no xDS client or CA caller ever sees a partial view.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_policy::mesh::Condition;
use mesh_proto::{
    envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer,
    istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer,
};
use mesh_rt::{
    drain::{self, DrainTrigger, DrainWatcher},
    http::{AdminRequest, AdminResponse},
};
use mesh_tls::ca::{CaPem, LocalCa};
use tokio::{net::TcpListener, sync::watch};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    authn::{Authenticator, StaticTokens, TokenReviewAuthenticator},
    ca::CaServer,
    config::{Config, SourceConfig},
    deploy::{self, Deployer},
    index::Index,
    k8s, leader, route_status,
    source::{ManifestDir, Source},
    status,
    translate::{Settings, Translator},
    xds::{Encoder, Snapshot, Stats, XdsServer},
};

/// A running control plane.
pub struct Bound {
    pub grpc_addr: SocketAddr,
    pub monitor_addr: SocketAddr,
    pub stats: Arc<Stats>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// PEM roots ztunnels must trust (the CA's bundle; it also signs :15012).
    pub root_pem: String,
    drain: DrainTrigger,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("grpc_addr", &self.grpc_addr)
            .finish_non_exhaustive()
    }
}

/// Loads Istio's `cacerts` layout from `dir`, or generates a root there if it holds none.
pub fn load_or_create_ca(dir: &Path, trust_domain: &str) -> anyhow::Result<LocalCa> {
    let read = |n: &str| std::fs::read_to_string(dir.join(n));
    if let (Ok(key), Ok(cert), Ok(chain), Ok(root)) = (
        read("ca-key.pem"),
        read("ca-cert.pem"),
        read("cert-chain.pem"),
        read("root-cert.pem"),
    ) {
        info!(dir = %dir.display(), "using the CA from the cacerts files");
        return LocalCa::from_pem(&key, &cert, &chain, &root)
            .with_context(|| format!("loading the CA in {}", dir.display()));
    }
    let present: Vec<&str> = [
        "ca-key.pem",
        "ca-cert.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]
    .into_iter()
    .filter(|n| dir.join(n).exists())
    .collect();
    anyhow::ensure!(
        present.is_empty(),
        "CA_DIR {} has only {present:?} of the four cacerts files; add the rest or empty it to generate a new CA",
        dir.display()
    );
    let pem: CaPem = LocalCa::generate_pem(trust_domain)?;
    std::fs::create_dir_all(dir)?;
    for (name, body) in pem.files() {
        std::fs::write(dir.join(name), body)?;
    }
    info!(dir = %dir.display(), "generated a self-signed root CA");
    Ok(LocalCa::from_ca_pem(&pem)?)
}

/// Translates and encodes `idx` (both incrementally), and publishes it if anything changed.
fn publish(
    idx: &Arc<Index>,
    settings: &Settings,
    (translator, encoder): &mut (Translator, Encoder),
    out: &watch::Sender<Arc<Snapshot>>,
    conditions: &watch::Sender<Arc<Vec<Condition>>>,
) {
    let r = translator.translate(idx, settings);
    conditions.send_if_modified(|c| {
        let changed = **c != r.conditions;
        if changed {
            *c = Arc::new(r.conditions.clone());
        }
        changed
    });
    for n in &r.notes {
        info!(note = %n, "policy translation");
    }
    let resources = encoder.encode(&r, idx.kube_objects.values());
    let next = out.borrow().successor(resources);
    if let Some(next) = next {
        info!(
            workloads = r.workloads.len(),
            services = r.services.len(),
            authorizations = r.authorizations.len(),
            kube_objects = idx.kube_objects.len(),
            "pushing a new configuration"
        );
        out.send_replace(Arc::new(next));
    }
}

/// Builds and starts everything; returns once every port is bound.
pub async fn build(cfg: Config) -> anyhow::Result<Bound> {
    let ca = Arc::new(load_or_create_ca(&cfg.ca_dir, &cfg.trust_domain)?);
    let root_pem = mesh_tls::cert::to_pem(ca.roots());
    let (trigger, watcher) = drain::new();
    let (index_tx, index_rx) = watch::channel(Arc::new(Index::default()));
    let (cond_tx, cond_rx) = watch::channel(Arc::new(Vec::<Condition>::new()));
    let authn: Arc<dyn Authenticator> = match &cfg.source {
        SourceConfig::Manifests { dir, poll } => {
            let Some(tokens) = &cfg.static_tokens else {
                anyhow::bail!("the manifest source needs STATIC_TOKENS");
            };
            let authn = StaticTokens::load(tokens)?;
            ManifestDir {
                dir: dir.clone(),
                poll: *poll,
            }
            .start(index_tx, watcher.clone())
            .await?;
            Arc::new(authn)
        }
        SourceConfig::Kubernetes {
            kubeconfig,
            token_review_cache,
        } => {
            let client = k8s::client(kubeconfig.as_deref()).await?;
            info!(api = %k8s::describe(kubeconfig.as_ref()), "starting the Kubernetes watches; serving once every kind is listed");
            k8s::Kubernetes {
                client: client.clone(),
            }
            .start(index_tx, watcher.clone())
            .await?;
            if cfg.waypoints.deploy {
                // Writers to the cluster run on the leader only (xDS and the CA on every replica).
                let leading = cfg
                    .leader
                    .clone()
                    .map(|l| leader::spawn(client.clone(), l, watcher.clone()));
                let deployer = Deployer {
                    client: client.clone(),
                    settings: deploy::Settings {
                        waypoint: cfg.waypoints.clone(),
                        trust_domain: cfg.trust_domain.clone(),
                        cluster_id: cfg.cluster_id.clone(),
                        domain_suffix: cfg.domain_suffix.clone(),
                        root_pem: root_pem.clone(),
                        root_namespace: cfg.root_namespace.clone(),
                    },
                };
                let (client, index) = (client.clone(), index_rx.clone());
                leader::spawn_gated(leading, watcher.clone(), move |term| {
                    deployer.clone().spawn(index.clone(), term.clone());
                    route_status::spawn(client.clone(), index.clone(), term.clone());
                    status::spawn(client.clone(), cond_rx.clone(), term);
                });
            }
            Arc::new(TokenReviewAuthenticator::new(
                client,
                index_rx.clone(),
                *token_review_cache,
            ))
        }
    };
    let settings = Settings {
        cluster_id: cfg.cluster_id.clone(),
        domain_suffix: cfg.domain_suffix.clone(),
        mesh: mesh_policy::MeshConfig {
            trust_domain: cfg.trust_domain.clone(),
            root_namespace: cfg.root_namespace.clone(),
            ..Default::default()
        },
    };
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut caches = (Translator::default(), Encoder::default());
    let first = index_rx.borrow().clone();
    publish(&first, &settings, &mut caches, &snap_tx, &cond_tx);
    drop(first);

    let mut idx_changes = index_rx.clone();
    tokio::spawn(
        async move {
            while idx_changes.changed().await.is_ok() {
                let idx = idx_changes.borrow_and_update().clone();
                publish(&idx, &settings, &mut caches, &snap_tx, &cond_tx);
            }
        }
        .instrument(info_span!("translate")),
    );

    let stats = Arc::new(Stats::default());
    let xds = XdsServer {
        snapshots: snap_rx.clone(),
        authn: authn.clone(),
        stats: stats.clone(),
    };
    let ca_server = CaServer {
        ca: ca.clone(),
        authn,
        index: index_rx,
        trust_domain: cfg.trust_domain.clone(),
        max_ttl: cfg.max_cert_ttl,
        node_agents: cfg.ca_trusted_node_accounts.clone(),
    };
    let serving = ca.issue_server(&cfg.dns_names, Duration::from_secs(365 * 24 * 3600))?;
    let tls = mesh_tls::control_plane_server_config(serving.chain, &serving.key)?;
    let grpc = TcpListener::bind(cfg.grpc_addr)
        .await
        .with_context(|| format!("binding the gRPC port {}", cfg.grpc_addr))?;
    let grpc_addr = grpc.local_addr()?;
    let routes = tonic::service::Routes::new(AggregatedDiscoveryServiceServer::new(xds))
        .add_service(IstioCertificateServiceServer::new(ca_server));
    tokio::spawn(
        serve_grpc(
            grpc,
            tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            routes,
            watcher.clone(),
        )
        .instrument(info_span!("grpc")),
    );

    let monitor = TcpListener::bind(cfg.monitor_addr)
        .await
        .with_context(|| format!("binding the monitor port {}", cfg.monitor_addr))?;
    let monitor_addr = monitor.local_addr()?;
    let snaps = snap_rx.clone();
    let st = stats.clone();
    let handler: mesh_rt::http::Handler = Arc::new(move |req: AdminRequest| {
        let snaps = snaps.clone();
        let st = st.clone();
        Box::pin(async move { monitor_handler(req, &snaps, &st) })
    });
    tokio::spawn(mesh_rt::http::serve(monitor, handler, watcher));
    info!(%grpc_addr, %monitor_addr, "istiod-lite serving");
    Ok(Bound {
        grpc_addr,
        monitor_addr,
        stats,
        snapshots: snap_rx,
        root_pem,
        drain: trigger,
    })
}

fn monitor_handler(
    req: AdminRequest,
    snaps: &watch::Receiver<Arc<Snapshot>>,
    stats: &Stats,
) -> AdminResponse {
    match req.path.as_str() {
        "/ready" => AdminResponse::text(http::StatusCode::OK, "ready\n"),
        "/debug/snapshot" => {
            let snap = snaps.borrow().clone();
            let body: serde_json::Map<String, serde_json::Value> = snap
                .0
                .iter()
                .map(|(t, m)| {
                    (
                        t.clone(),
                        m.iter()
                            .map(|(n, e)| (n.clone(), serde_json::Value::from(e.version.clone())))
                            .collect::<serde_json::Map<_, _>>()
                            .into(),
                    )
                })
                .collect();
            let v = serde_json::json!({
                "resources": body,
                "streams": stats.streams.load(std::sync::atomic::Ordering::Relaxed),
                "pushes": stats.pushes.load(std::sync::atomic::Ordering::Relaxed),
            });
            AdminResponse::json(v.to_string())
        }
        _ => AdminResponse::not_found(),
    }
}

async fn serve_grpc(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    routes: tonic::service::Routes,
    drain: DrainWatcher,
) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!(error = %e, "accept failed"); continue }
            },
            () = drain.signaled() => break,
        };
        let acceptor = acceptor.clone();
        let routes = routes.clone();
        conns.spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    warn!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let svc = hyper_util::service::TowerToHyperService::new(routes);
            if let Err(e) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "gRPC connection ended");
            }
        });
    }
    // Streams end when the process exits; clients reconnect to the next instance.
    conns.abort_all();
}

impl Bound {
    /// Waits for `signal`, then stops serving.
    pub async fn run(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        info!("shutting down");
        self.drain.drain(Duration::from_secs(1)).await;
    }
}
