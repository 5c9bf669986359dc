//! Wiring of the node agent: binds the ZDS and plugin sockets, installs the host rules,
//! starts the reconcile loop and the CNI installer, and returns handles (tests run the
//! whole agent in-process this way; `main` then just waits for a signal).

use std::{path::PathBuf, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    sync::watch,
};
use tracing::{Instrument, info, info_span, warn};

use crate::{
    agent::{Agent, Registry, Settings},
    config::Config,
    install,
    iptables::RuleBackend,
    netns::Netns,
    protocol::{self, Request, Response},
    source::{ClusterState, PodAnnotator},
    zds::ZdsServer,
};

/// The running agent.
#[derive(Debug)]
pub struct Running {
    pub agent: Arc<Agent>,
    pub zds: ZdsServer,
    pub cni_socket: PathBuf,
}

/// Starts everything; returns once the sockets are bound and the host rules installed.
/// `state` is a started pod source (`mesh_rt::source::subscribe`), already holding its
/// first complete snapshot.
pub async fn start(
    cfg: &Config,
    backend: Arc<dyn RuleBackend>,
    state: watch::Receiver<Arc<ClusterState>>,
    annotator: Arc<dyn PodAnnotator>,
) -> Result<Running, String> {
    let host = match &cfg.host_netns {
        Some(p) => Netns::open(p),
        None => Netns::current(),
    }
    .map_err(|e| format!("opening the host netns: {e}"))?;
    let registry = Arc::new(Registry::default());
    let zds = ZdsServer::new(&cfg.ztunnel_uds);
    let settings = Settings {
        node_name: cfg.node_name.clone(),
        policy: cfg.policy(),
        dns_capture: cfg.dns_capture,
        netns_prefix: cfg.netns_prefix.clone(),
        proc_root: cfg.proc_root.clone(),
    };
    let agent = Arc::new(
        Agent::new(
            settings,
            backend,
            state.clone(),
            annotator,
            zds.clone(),
            Arc::new(host),
            registry.clone(),
        )
        .await?,
    );
    // Pods that were already running (agent restart, labels added while it was down).
    // They are found before ztunnel may connect, so its first snapshot names all of them.
    agent.reconcile().await;
    zds.listen(registry).map_err(|e| e.to_string())?;
    let listener = bind_cni_socket(&cfg.cni_socket)?;
    let a = agent.clone();
    tokio::spawn(serve_plugin(listener, a).instrument(info_span!("cni_sock")));
    let a = agent.clone();
    let every = cfg.resync_interval;
    let mut changes = state;
    changes.mark_unchanged();
    tokio::spawn(
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut source_alive = true;
            loop {
                tokio::select! {
                    r = changes.changed(), if source_alive => if r.is_err() {
                        warn!("the pod source stopped; reconciling on the resync interval only");
                        source_alive = false;
                        continue;
                    },
                    _ = tick.tick() => {}
                }
                a.reconcile().await;
            }
        }
        .instrument(info_span!("reconcile")),
    );
    if let Some(inst) = &cfg.install {
        let entry = install::plugin_entry(cfg);
        install::install_binary(&inst.plugin_binary, &inst.bin_dir).map_err(|e| e.to_string())?;
        let dir = inst.conf_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("creating the CNI config dir {}: {e}", dir.display()))?;
        std::thread::Builder::new()
            .name("cni-install".into())
            .spawn(move || install::watch(&dir, &entry))
            .map_err(|e| format!("starting the CNI config watcher: {e}"))?;
    }
    info!(zds = %cfg.ztunnel_uds.display(), cni = %cfg.cni_socket.display(), "node agent ready");
    Ok(Running {
        agent,
        zds,
        cni_socket: cfg.cni_socket.clone(),
    })
}

fn bind_cni_socket(path: &std::path::Path) -> Result<UnixListener, String> {
    let err = |e: std::io::Error| format!("binding the plugin socket {}: {e}", path.display());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    UnixListener::bind(path).map_err(err)
}

async fn serve_plugin(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accepting a plugin connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let read = BufReader::new(r.take(protocol::MAX_LINE as u64))
                .read_line(&mut line)
                .await;
            let resp = match read {
                Err(e) => Response::failed(format!("reading the request: {e}"), true),
                Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                    Ok(req) => agent.handle(req).await,
                    Err(e) => {
                        warn!(error = %e, "unreadable plugin request");
                        Response::failed(format!("unreadable request: {e}"), false)
                    }
                },
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}
