//! ztunnel's entry point: parse config, start, wait for SIGTERM, drain, exit.

use clap::Parser;
use ztunnel::{app, config::Args};

/// jemalloc, as Istio's ztunnel uses: HTTP/2 hands out a fresh 1 MiB buffer per DATA frame,
/// and glibc's arenas returned those pages and faulted them back in (15% of the proxy's CPU
/// in a bulk transfer). jemalloc reuses them; freed pages go back to the kernel after two
/// seconds unused, from a background thread, so memory returns after a burst even if the
/// proxy is idle.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// The one way to configure jemalloc before its first allocation: a symbol it looks up.
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:2000,muzzy_decay_ms:0\0";

/// How often a data-plane worker gives back its jemalloc thread cache.
const TCACHE_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Run when a data-plane worker parks: at most every [`TCACHE_FLUSH_EVERY`], returns the
/// objects cached in this thread's jemalloc cache to the arena. jemalloc trims a thread's
/// cache only as that thread allocates, so an idle worker kept what a burst left in it
/// (about 1 MB after 10,000 connections closed) until traffic came back; the pages behind
/// them could not be purged. Parking is the moment the worker is idle, and the worker wakes
/// up regularly (keepalive pings, the pool reaper), so the cache goes within seconds.
#[allow(unsafe_code)]
fn flush_thread_cache_if_due() {
    use std::{cell::Cell, time::Instant};
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    let now = Instant::now();
    let due = LAST.with(|l| match l.get() {
        Some(t) if now.duration_since(t) < TCACHE_FLUSH_EVERY => false,
        _ => {
            l.set(Some(now));
            true
        }
    });
    if due {
        // SAFETY: "thread.tcache.flush" takes no input or output (all pointers null, length
        // 0) and only touches the calling thread's cache.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                c"thread.tcache.flush".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
    }
}

fn main() -> std::process::ExitCode {
    let cfg = match Args::parse().validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztunnel: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    let log = match mesh_rt::logging::init(
        &cfg.log_level,
        cfg.log_format == ztunnel::config::LogFormat::Json,
    ) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("ztunnel: {e}");
            return std::process::ExitCode::from(64);
        }
    };
    if let Ok(yaml) = serde_json::to_string(&cfg) {
        tracing::info!(config = %yaml, "starting ztunnel");
    }
    // Admin, metrics and readiness run on their own single thread so a busy data plane
    // never delays a readiness probe.
    let admin_rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel: creating the admin runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let admin_handle = admin_rt.handle().clone();
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_thread = std::thread::Builder::new()
        .name("ztunnel-admin".into())
        .spawn(move || {
            admin_rt.block_on(async {
                let _ = admin_stopped.await;
            })
        });
    let data_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .thread_name("ztunnel-proxy")
        .on_thread_park(flush_thread_cache_if_due)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztunnel: creating the data-plane runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = data_rt.block_on(async move {
        match app::build(cfg, log, admin_handle).await {
            Ok(bound) => {
                bound.wait_termination(mesh_rt::signal::shutdown()).await;
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "ztunnel failed to start");
                eprintln!("ztunnel: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    });
    let _ = admin_stop.send(());
    if let Ok(t) = admin_thread {
        let _ = t.join();
    }
    data_rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}
