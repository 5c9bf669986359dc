//! Wiring: bind every listener, start every task, and hand back a [`Bound`] app.
//!
//! Lifecycle: [`build`] binds all ports (so tests can use port 0 and read the real
//! addresses), starts the servers and the configuration source (a local file, or the xDS
//! client on the admin runtime) and returns; readiness turns green once the first complete
//! configuration is applied and every local workload has its certificate.
//! [`Bound::wait_termination`] then waits for SIGTERM (or `/quitquitquit`) and drains.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use mesh_hbone::{H2Settings, Pool, client::PoolSettings};
use mesh_rt::{
    drain::{self, DrainOutcome, DrainTrigger, DrainWatcher},
    logging::LogHandle,
    readiness::Ready,
};
use mesh_tls::TrustPolicy;
use prometheus_client::registry::Registry;
use tokio::runtime::Handle;
use tracing::{Instrument, error, info, info_span, warn};

use crate::{
    admin,
    config::{CertSource, Config, ConfigSource, ProxyMode},
    controlplane::Credentials,
    dns::server::{Client, DnsServer, DnsShared, Handler},
    identity::{CertProvider, LocalCaProvider, SecretManager, caclient::IstioCaProvider},
    inpod::manager::WorkloadManager,
    localconfig,
    proxy::{self, DefaultSocketFactory, ProxyInputs, SocketFactory, metrics::Metrics},
    state::StateStore,
    xds::{NodeInfo, XdsClient},
};

/// The addresses actually bound.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// The capture listeners in ztunnel's own netns (dedicated mode only; in shared mode
    /// they live inside each pod).
    pub outbound: Option<SocketAddr>,
    pub inbound_plaintext: Option<SocketAddr>,
    pub inbound: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
    pub socks5: Option<SocketAddr>,
    /// The dedicated-mode DNS proxy (UDP and TCP), if `DNS_PROXY_ADDR` is set.
    pub dns: Option<SocketAddr>,
}

/// A running ztunnel.
pub struct Bound {
    pub addresses: Addresses,
    pub proxy: Arc<ProxyInputs>,
    pub ready: Ready,
    drain: DrainTrigger,
    shutdown_rx: tokio::sync::mpsc::Receiver<()>,
    deadline: Duration,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("addresses", &self.addresses)
            .finish_non_exhaustive()
    }
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    proxy::bind(addr).with_context(|| format!("binding the {what} listener on {addr}"))
}

fn local_addr(l: &tokio::net::TcpListener) -> anyhow::Result<SocketAddr> {
    Ok(l.local_addr()?)
}

/// Loads config, binds every port and starts serving. `admin_rt` runs the admin, metrics and
/// readiness servers (a separate runtime in production, the same one in tests).
pub async fn build(cfg: Config, log: Option<LogHandle>, admin_rt: Handle) -> anyhow::Result<Bound> {
    let cfg = Arc::new(cfg);
    let ready = Ready::new();
    let config_block = ready.register("config");
    let certs_block = ready.register("certificates");

    let credentials = Credentials {
        token_path: cfg.auth_token_path.clone(),
        cluster_id: cfg.cluster_id.clone(),
    };
    // `synced` turns true once a complete configuration is in the state.
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let state = match &cfg.config_source {
        ConfigSource::Local(path) => {
            let s = StateStore::new(
                localconfig::load(path).context("loading the initial configuration")?,
            );
            synced_tx.send_replace(true);
            s
        }
        ConfigSource::Xds(_) => StateStore::default(),
    };

    let provider: Arc<dyn CertProvider> = match &cfg.cert_source {
        CertSource::LocalCa { dir, ttl } => Arc::new(LocalCaProvider::load(dir, *ttl)?),
        CertSource::IstioCa { endpoint, ttl } => Arc::new(
            IstioCaProvider::new(endpoint, credentials.clone(), *ttl)
                .context("setting up the Istio CA client")?,
        ),
    };
    let trust = TrustPolicy {
        trust_domains: cfg.trust_domains.clone(),
    };
    let secrets = Arc::new(SecretManager::new(provider, trust));

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let dns_metrics = crate::dns::server::DnsMetrics::register(&mut registry);
    let registry = Arc::new(registry);
    let dns = ((cfg.dns_capture && cfg.proxy_mode == ProxyMode::Shared)
        || cfg.dns_proxy_addr.is_some())
    .then(|| Arc::new(DnsShared::new(&cfg, state.clone(), dns_metrics)));

    let h2 = H2Settings::default();
    let pool = Pool::new(PoolSettings {
        h2,
        connect_timeout: cfg.connect_timeout,
        max_streams_per_conn: cfg.pool_max_streams_per_connection,
        idle_timeout: cfg.pool_unused_release_timeout,
        ..PoolSettings::default()
    });

    let dedicated = cfg.proxy_mode == ProxyMode::Dedicated;
    let outbound = dedicated
        .then(|| bind(cfg.outbound_addr, "outbound"))
        .transpose()?;
    let inbound_plain = dedicated
        .then(|| bind(cfg.inbound_plaintext_addr, "inbound plaintext"))
        .transpose()?;
    let inbound = dedicated
        .then(|| bind(cfg.inbound_addr, "HBONE inbound"))
        .transpose()?;
    let admin_l = bind(cfg.admin_addr, "admin")?;
    let stats_l = bind(cfg.stats_addr, "metrics")?;
    let ready_l = bind(cfg.readiness_addr, "readiness")?;
    let socks5 = cfg.socks5_addr.map(|a| bind(a, "SOCKS5")).transpose()?;
    let dns_server = match (cfg.dns_proxy_addr, &dns) {
        (Some(a), Some(shared)) => Some(
            DnsServer::bind(
                &DefaultSocketFactory,
                a,
                false,
                Handler {
                    shared: shared.clone(),
                    client: Client::BySourceIp,
                },
            )
            .with_context(|| format!("binding the DNS proxy on {a} (DNS_PROXY_ADDR)"))?,
        ),
        _ => None,
    };
    let addresses = Addresses {
        outbound: outbound.as_ref().map(local_addr).transpose()?,
        inbound_plaintext: inbound_plain.as_ref().map(local_addr).transpose()?,
        inbound: inbound.as_ref().map(local_addr).transpose()?,
        admin: local_addr(&admin_l)?,
        stats: local_addr(&stats_l)?,
        readiness: local_addr(&ready_l)?,
        socks5: socks5.as_ref().map(local_addr).transpose()?,
        dns: dns_server.as_ref().map(DnsServer::local_addr).transpose()?,
    };
    info!(?addresses, "listeners bound");

    let pi = Arc::new(ProxyInputs {
        cfg: cfg.clone(),
        state: state.clone(),
        secrets: secrets.clone(),
        pool: pool.clone(),
        metrics,
        dns,
        h2,
        authz_calls: Default::default(),
    });
    let (trigger, watcher) = drain::new();
    let (shutdown_tx, shutdown_rx) = tokio::sync::mpsc::channel(1);

    let own: Arc<dyn SocketFactory> = Arc::new(DefaultSocketFactory);
    if let (Some(o), Some(i), Some(p)) = (outbound, inbound, inbound_plain) {
        tokio::spawn(proxy::outbound::serve(
            pi.clone(),
            o,
            watcher.clone(),
            own.clone(),
        ));
        tokio::spawn(proxy::inbound::serve(
            pi.clone(),
            i,
            watcher.clone(),
            own.clone(),
        ));
        tokio::spawn(proxy::inbound_plain::serve(
            pi.clone(),
            p,
            watcher.clone(),
            own,
        ));
    }
    if cfg.proxy_mode == ProxyMode::Shared {
        let manager = WorkloadManager::new(pi.clone(), cfg.inpod_uds.clone(), ready.clone())
            .context("starting in-pod mode")?;
        tokio::spawn(manager.run(watcher.clone()).instrument(info_span!("inpod")));
    }
    if let Some(d) = dns_server {
        tokio::spawn(d.run(watcher.clone()).instrument(info_span!("dns")));
    }
    if let Some(l) = socks5 {
        tokio::spawn(proxy::socks5::serve(pi.clone(), l, watcher.clone()));
    }
    // Every 5 s: a burst's surplus tunnels close 5-10 s after their last stream.
    pool.spawn_reaper(Duration::from_secs(5));
    secrets.spawn_renewer(Duration::from_secs(10));
    // Memory freed after a connection burst goes back to the OS, not kept at the peak.
    admin_rt.spawn(mesh_rt::memory::run_trimmer(Duration::from_secs(5)));

    let admin_state = Arc::new(admin::AdminState {
        cfg: cfg.clone(),
        state: state.clone(),
        log,
        shutdown: shutdown_tx,
        secrets: secrets.clone(),
    });
    // Admin endpoints end with the process, not with the drain: readiness must keep
    // answering (not ready) while connections finish.
    let (_admin_trigger, admin_watch) = drain::new();
    std::mem::forget(_admin_trigger);
    admin_rt.spawn(mesh_rt::http::serve(
        admin_l,
        admin::admin_handler(admin_state),
        admin_watch.clone(),
    ));
    admin_rt.spawn(mesh_rt::http::serve(
        stats_l,
        admin::stats_handler(registry),
        admin_watch.clone(),
    ));
    admin_rt.spawn(mesh_rt::http::serve(
        ready_l,
        admin::readiness_handler(ready.clone()),
        admin_watch,
    ));

    match &cfg.config_source {
        ConfigSource::Local(path) => {
            tokio::spawn(
                watch_config(pi.clone(), path.clone(), watcher.clone())
                    .instrument(info_span!("local_config")),
            );
        }
        ConfigSource::Xds(endpoint) => {
            let client = XdsClient {
                endpoint: endpoint.clone(),
                credentials,
                node: NodeInfo {
                    instance_ip: cfg.instance_ip.clone(),
                    pod_name: cfg.pod_name.clone(),
                    pod_namespace: cfg.pod_namespace.clone(),
                    node_name: cfg.node_name.clone().unwrap_or_default(),
                    cluster_id: cfg.cluster_id.clone(),
                },
                state: state.clone(),
                synced: synced_tx,
            };
            // xDS shares the admin runtime, away from the data plane (as Istio's ztunnel).
            admin_rt.spawn(client.run(watcher.clone()).instrument(info_span!("xds")));
        }
    }
    tokio::spawn(
        prefetch_certificates(pi.clone(), synced, config_block, certs_block)
            .instrument(info_span!("prefetch")),
    );

    Ok(Bound {
        addresses,
        proxy: pi,
        ready,
        drain: trigger,
        shutdown_rx,
        deadline: cfg.drain_deadline,
    })
}

/// Waits for the first complete configuration, then fetches the certificate of every local
/// workload, then unblocks readiness.
async fn prefetch_certificates(
    pi: Arc<ProxyInputs>,
    mut synced: tokio::sync::watch::Receiver<bool>,
    config_block: mesh_rt::readiness::BlockReady,
    block: mesh_rt::readiness::BlockReady,
) {
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    drop(config_block);
    let ids: Vec<_> = pi.state.read(|s| {
        s.workloads()
            .filter(|w| pi.is_local(w) && w.protocol == mesh_core::workload::TunnelProtocol::Hbone)
            .filter_map(|w| w.identity().ok())
            .collect()
    });
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut failed = 0;
        for id in &ids {
            if let Err(e) = pi.secrets.get(id).await {
                warn!(identity = %id, error = %e, "certificate fetch failed; retrying");
                failed += 1;
            }
        }
        if failed == 0 {
            info!(count = ids.len(), "certificates ready");
            drop(block);
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Reloads the local file when it changes; a bad file is logged and the old state kept.
async fn watch_config(pi: Arc<ProxyInputs>, path: std::path::PathBuf, drain: DrainWatcher) {
    mesh_rt::watch::file_changes(path, drain, |path| match localconfig::load(path) {
        Ok(s) => {
            pi.state.replace(s);
            info!(path = %path.display(), "configuration reloaded");
        }
        Err(e) => error!(error = %e, "configuration rejected; keeping the previous one"),
    })
    .await
}

impl Bound {
    /// A handle that triggers the same graceful shutdown as SIGTERM.
    pub async fn wait_termination(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> DrainOutcome {
        tokio::select! {
            () = signal => {}
            _ = self.shutdown_rx.recv() => info!("shutdown requested via admin endpoint"),
        }
        info!(deadline = ?self.deadline, "draining: no new connections, waiting for open ones");
        let outcome = self.drain.drain(self.deadline).await;
        match outcome {
            DrainOutcome::Complete => info!("drain complete"),
            DrainOutcome::DeadlineExceeded => {
                warn!("drain deadline passed; closing remaining connections")
            }
        }
        outcome
    }
}
