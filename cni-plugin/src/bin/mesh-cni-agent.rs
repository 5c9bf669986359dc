//! `mesh-cni-agent`: the node agent (one per node, a DaemonSet). Reads its `Config`, logs
//! it, starts everything (`cni_plugin::app::start`) and runs until SIGTERM/SIGINT.

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use cni_plugin::{
    app,
    config::{Args, SourceKind},
    iptables::IptablesRestore,
    kube_source::{self, KubeAnnotator, KubeSource},
    source::{FilesSource, PodAnnotator},
};

fn main() -> ExitCode {
    let cfg = match Args::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cfg.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let backend = Arc::new(IptablesRestore {
            families: cfg.families.clone(),
        });
        // The agent runs until the process ends; nothing drains the source before that.
        let (_never, drain) = mesh_rt::drain::new();
        let started: Result<(_, Arc<dyn PodAnnotator>), String> = match cfg.pod_source {
            SourceKind::Files => {
                let files = FilesSource::new(&cfg.pod_source_dir);
                mesh_rt::source::subscribe(files.clone(), drain)
                    .await
                    .map(|rx| (rx, Arc::new(files) as Arc<dyn PodAnnotator>))
                    .map_err(|e| e.to_string())
            }
            SourceKind::Kubernetes => async {
                let client = kube_source::client(cfg.kubeconfig.as_deref()).await?;
                let source = KubeSource {
                    client: client.clone(),
                    node: cfg.node_name.clone(),
                    mirror: Some(cfg.pod_source_dir.clone()),
                };
                let rx = mesh_rt::source::subscribe(source, drain).await?;
                Ok::<_, kube_source::KubeSourceError>((
                    rx,
                    Arc::new(KubeAnnotator::new(client)) as Arc<dyn PodAnnotator>,
                ))
            }
            .await
            .map_err(|e| e.to_string()),
        };
        let (state, annotator) = match started {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "the pod source failed to start");
                return ExitCode::FAILURE;
            }
        };
        let _running = match app::start(&cfg, backend, state, annotator).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "node agent failed to start");
                return ExitCode::FAILURE;
            }
        };
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return ExitCode::FAILURE;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        // Rules, ipsets and the conflist entry stay: pods remain fail-closed and new
        // ambient pods wait for the next agent (an upgrade or restart).
        tracing::info!("shutting down; in-pod rules and the CNI chaining are left in place");
        ExitCode::SUCCESS
    })
}
