//! `mesh-cni-agent`: the node agent (one per node, a DaemonSet). Reads its `Config`, logs
//! it, starts everything (`cni_plugin::app::start`) and runs until SIGTERM/SIGINT.

use std::{process::ExitCode, sync::Arc};

use clap::Parser;
use cni_plugin::{
    app,
    config::{Args, SourceKind},
    iptables::IptablesRestore,
    kube_source::{self, KubeSource},
    source::{FilesSource, PodSource},
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
        let source: Arc<dyn PodSource> = match cfg.pod_source {
            SourceKind::Files => Arc::new(FilesSource::new(&cfg.pod_source_dir)),
            SourceKind::Kubernetes => {
                let started = async {
                    let client = kube_source::client(cfg.kubeconfig.as_deref()).await?;
                    KubeSource::start(client, &cfg.node_name, Some(cfg.pod_source_dir.clone()))
                        .await
                };
                match started.await {
                    Ok(s) => Arc::new(s),
                    Err(e) => {
                        tracing::error!(error = %e, "the Kubernetes pod source failed to start");
                        return ExitCode::FAILURE;
                    }
                }
            }
        };
        let _running = match app::start(&cfg, backend, source).await {
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
