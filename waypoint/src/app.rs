//! Wiring: bind every port → load the configuration → start servers → ready; then drain.
//!
//! `build` returns [`Bound`] with every real address (tests bind port 0). Readiness blockers:
//! `config` (the file loaded, or the first complete xDS sync: every subscribed type answered
//! once) and `certificates` (the waypoint's own certificate issued, by the local CA or the
//! Istio CA). After the drain, the trace exporter (when on) sends the spans it still holds.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use mesh_rt::{
    drain::{self, DrainOutcome, DrainTrigger},
    logging::LogHandle,
    readiness::Ready,
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{Instrument, error, info, warn};
use ztunnel::identity::{CertProvider, LocalCaProvider, SecretManager, caclient::IstioCaProvider};

use crate::{
    admin::{self, AdminState},
    config::{CertSource, Config, ConfigSource},
    metrics::Metrics,
    proxy::Proxy,
    ratelimit::Limiter,
    state::{self, Store},
    upstream::Upstream,
};

/// The addresses actually bound.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub hbone: SocketAddr,
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
}

/// A running waypoint.
pub struct Bound {
    pub addresses: Addresses,
    pub ready: Ready,
    pub proxy: Arc<Proxy>,
    /// The OTLP span exporter, when TRACING_OTLP_ENDPOINT is set; flushed after the drain.
    pub tracer: Option<Arc<crate::trace::export::Exporter>>,
    drain: DrainTrigger,
    deadline: Duration,
    shutdown_rx: mpsc::Receiver<()>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await.with_context(|| {
        format!("binding the {what} port {addr} (in use, or not an address of this host?)")
    })?;
    let a = l.local_addr()?;
    Ok((l, a))
}

/// Binds, loads, starts. Servers run on the current runtime.
pub async fn build(cfg: Config, log: Option<LogHandle>) -> anyhow::Result<Bound> {
    let cfg = Arc::new(cfg);
    let (hbone_l, hbone) = bind(cfg.hbone_addr, "HBONE").await?;
    let (admin_l, admin_a) = bind(cfg.admin_addr, "admin").await?;
    let (stats_l, stats) = bind(cfg.stats_addr, "stats").await?;
    let (ready_l, readiness) = bind(cfg.readiness_addr, "readiness").await?;

    let ready = Ready::new();
    let config_block = ready.register("config");
    let cert_block = ready.register("certificates");
    let (trigger, watcher) = drain::new();

    let credentials = mesh_xds::Credentials {
        token_path: cfg.auth_token_path.clone(),
        cluster_id: cfg.cluster_id.clone(),
    };
    let (store, own_id) = match &cfg.source {
        ConfigSource::File(path) => {
            let snapshot = state::load(path).context("loading the waypoint configuration")?;
            let id = snapshot.waypoint.as_ref().map(|w| w.identity.clone());
            drop(config_block);
            (Store::new(snapshot), id)
        }
        ConfigSource::Xds(x) => {
            let store = Store::new(state::Snapshot::build(
                x.waypoint.clone(),
                ztunnel::state::State::default(),
                Vec::new(),
                Vec::new(),
            ));
            let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
            let client = mesh_xds::Client {
                endpoint: x.endpoint.clone(),
                credentials: credentials.clone(),
                node: x.node.to_node(),
                types: crate::xds::TYPES.to_vec(),
                who: "waypoint",
                handler: crate::xds::WaypointHandler::new(x.waypoint.clone(), store.clone()),
                synced: synced_tx,
            };
            tokio::spawn(
                client
                    .run(watcher.clone())
                    .instrument(tracing::info_span!("xds")),
            );
            tokio::spawn(async move {
                if synced.wait_for(|s| *s).await.is_ok() {
                    drop(config_block);
                }
            });
            (store, Some(x.waypoint.identity.clone()))
        }
    };

    let mut trust = mesh_tls::TrustPolicy::new(&cfg.trust_domain);
    trust
        .trust_domains
        .extend(cfg.trust_domain_aliases.iter().cloned());
    let provider: Arc<dyn CertProvider> = match &cfg.cert_source {
        CertSource::LocalCa { dir, ttl } => {
            Arc::new(LocalCaProvider::load(dir, *ttl).context("loading the local CA")?)
        }
        CertSource::IstioCa { endpoint, ttl } => Arc::new(
            IstioCaProvider::new(
                &ztunnel::config::ControlPlane {
                    address: endpoint.address.clone(),
                    authority: endpoint.authority.clone(),
                    server_name: endpoint.server_name.clone(),
                    root_ca: endpoint.root_ca.clone(),
                },
                credentials,
                *ttl,
            )
            .context("setting up the Istio CA client")?,
        ),
    };
    let secrets = Arc::new(SecretManager::new(provider, trust));
    secrets.spawn_renewer(Duration::from_secs(10));

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let tracer = {
        let snap = store.get();
        let (gateway, namespace) = snap
            .waypoint
            .as_ref()
            .map(|w| (w.name.clone(), w.namespace.clone()))
            .unwrap_or_default();
        let id = crate::trace::Identity {
            service_name: format!("{gateway}.{namespace}"),
            node_id: cfg
                .tracing
                .as_ref()
                .map(|t| t.node_id.clone())
                .unwrap_or_default(),
            gateway,
            namespace,
            mesh_id: cfg.trust_domain.clone(),
            cluster_id: cfg.cluster_id.clone(),
        };
        crate::trace::export::start(cfg.tracing.as_ref(), id, &mut registry)
            .context("starting the OTLP trace exporter")?
    };
    let pool = mesh_hbone::Pool::new(mesh_hbone::client::PoolSettings {
        connect_timeout: cfg.connect_timeout,
        ..Default::default()
    });
    // Every 5 s: a burst's surplus tunnels close 5-10 s after their last stream.
    pool.spawn_reaper(Duration::from_secs(5));
    let upstream = Arc::new(Upstream::new(
        pool,
        secrets.clone(),
        mesh_hbone::client::default_connector(),
    ));
    let proxy = Arc::new(Proxy {
        cfg: cfg.clone(),
        store: store.clone(),
        upstream,
        metrics,
        limiter: Limiter::default(),
        jwks: mesh_jwt::JwksStore::default(),
        tracing: tracer
            .as_ref()
            .zip(cfg.tracing.as_ref())
            .map(|(e, t)| crate::trace::Tracing {
                sample_ppm: t.sample_ppm(),
                sink: e.sink(),
            }),
    });

    let (shutdown_tx, shutdown_rx) = mpsc::channel(1);
    let admin_state = Arc::new(AdminState {
        cfg: cfg.clone(),
        store: store.clone(),
        log,
        shutdown: shutdown_tx,
    });
    tokio::spawn(mesh_rt::http::serve(
        admin_l,
        admin::admin_handler(admin_state),
        watcher.clone(),
    ));
    tokio::spawn(mesh_rt::http::serve(
        stats_l,
        admin::stats_handler(Arc::new(registry)),
        watcher.clone(),
    ));
    tokio::spawn(mesh_rt::http::serve(
        ready_l,
        admin::readiness_handler(ready.clone()),
        watcher.clone(),
    ));
    tokio::spawn(crate::listener::serve(
        hbone_l,
        proxy.clone(),
        secrets.clone(),
        watcher.clone(),
    ));
    if let ConfigSource::File(path) = &cfg.source {
        tokio::spawn(watch_config(store.clone(), path.clone(), watcher.clone()));
    }
    {
        let secrets = secrets.clone();
        let id = own_id;
        tokio::spawn(async move {
            let Some(id) = id else { return };
            let mut backoff = Duration::from_millis(100);
            loop {
                match secrets.get(&id).await {
                    Ok(_) => {
                        info!(identity = %id, "waypoint certificate ready");
                        drop(cert_block);
                        return;
                    }
                    Err(e) => {
                        warn!(identity = %id, error = %e, "certificate fetch failed; retrying")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        });
    }
    drop(watcher);
    info!(%hbone, admin = %admin_a, %stats, %readiness, "waypoint listening");
    Ok(Bound {
        addresses: Addresses {
            hbone,
            admin: admin_a,
            stats,
            readiness,
        },
        ready,
        proxy,
        tracer,
        drain: trigger,
        deadline: cfg.drain_deadline,
        shutdown_rx,
    })
}

/// Reloads the file when it changes; a file that cannot be read keeps the old snapshot.
async fn watch_config(store: Store, path: std::path::PathBuf, drain: mesh_rt::drain::DrainWatcher) {
    mesh_rt::watch::file_changes(path, drain, |path| match state::load(path) {
        Ok(s) => {
            let rejected = s.errors.len();
            store.replace(s);
            info!(path = %path.display(), rejected, "configuration reloaded");
        }
        Err(e) => error!(error = %e, "configuration rejected; keeping the previous one"),
    })
    .await
}

impl Bound {
    /// Waits for `signal` or POST /quitquitquit, then drains up to the deadline.
    pub async fn wait_termination(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> DrainOutcome {
        tokio::select! {
            () = signal => {}
            _ = self.shutdown_rx.recv() => info!("shutdown requested via admin endpoint"),
        }
        info!(deadline = ?self.deadline, "draining");
        let outcome = self.drain.drain(self.deadline).await;
        if outcome == DrainOutcome::DeadlineExceeded {
            warn!("drain deadline passed; closing remaining streams");
        }
        if let Some(t) = &self.tracer {
            t.shutdown(Duration::from_secs(2)).await;
        }
        outcome
    }
}
