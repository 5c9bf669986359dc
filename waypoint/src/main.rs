//! `waypoint` binary: parses the Config and runs the proxy until SIGTERM, then drains.

use clap::Parser;

/// jemalloc, as in ztunnel (see its `main.rs`): HTTP/2 allocates a buffer per DATA frame, and
/// glibc's arenas kept returning and re-faulting those pages. Unused pages go back to the
/// kernel after two seconds, from a background thread.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// The one way to configure jemalloc before its first allocation: a symbol it looks up.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:2000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    let cfg = match waypoint::config::Args::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(64);
        }
    };
    let log = match mesh_rt::logging::init(&cfg.log_level, cfg.log_json) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(64);
        }
    };
    match serde_json::to_string(&cfg) {
        Ok(s) => tracing::info!(config = %s, "starting"),
        Err(e) => tracing::warn!(error = %e, "config not printable"),
    }
    // One worker: a current-thread runtime. Every task then runs where it is woken, with
    // no work-stealing queues or cross-thread wake-ups (W1: see bench/README.md).
    let mut builder = if cfg.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(cfg.worker_threads);
        b
    };
    let rt = match builder.thread_name("waypoint-proxy").enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let bound = match waypoint::app::build(cfg, log).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "startup failed");
                return std::process::ExitCode::FAILURE;
            }
        };
        bound.wait_termination(mesh_rt::signal::shutdown()).await;
        std::process::ExitCode::SUCCESS
    })
}
