//! istiod-lite's entry point: parse config, start, serve until SIGTERM.

use clap::Parser;
use istiod_lite::{app, config::Args};

fn main() -> std::process::ExitCode {
    let cfg = match Args::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("istiod-lite: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    if let Err(e) = mesh_rt::logging::init(&cfg.log_level, false) {
        eprintln!("istiod-lite: {e}");
        return std::process::ExitCode::from(64);
    }
    if let Ok(json) = serde_json::to_string(&cfg) {
        tracing::info!(config = %json, "starting istiod-lite");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .thread_name("istiod-lite")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("istiod-lite: creating the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match app::build(cfg).await {
            Ok(bound) => {
                bound.run(mesh_rt::signal::shutdown()).await;
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("istiod-lite: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}
