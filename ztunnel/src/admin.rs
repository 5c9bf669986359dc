//! The admin (:15000, localhost), metrics (:15020) and readiness (:15021) endpoints.
//!
//! - `GET /config_dump`: the effective config, workloads, services, policies, certificates;
//! - `GET /logging` shows the log filter, `POST /logging?level=FILTER` changes it;
//! - `POST /quitquitquit`: start a graceful shutdown;
//! - `GET /debug/memory`: the allocator's own counters next to the process RSS, to tell live
//!   objects from memory the allocator holds but no longer uses; `GET /debug/memory/stats`:
//!   jemalloc's full report (per size class, per arena), to see what the live objects are;
//! - `GET /metrics` (stats port): Prometheus text format;
//! - `GET /healthz/ready` (readiness port): 200, or 503 naming what is still pending.

use std::sync::Arc;

use http::{Method, StatusCode};
use mesh_rt::{
    http::{AdminRequest, AdminResponse, Handler},
    logging::LogHandle,
    readiness::Ready,
};
use prometheus_client::registry::Registry;
use serde_json::json;

use crate::{config::Config, state::StateStore};

/// What the admin endpoints read.
pub struct AdminState {
    pub cfg: Arc<Config>,
    pub state: StateStore,
    pub log: Option<LogHandle>,
    pub shutdown: tokio::sync::mpsc::Sender<()>,
    pub secrets: Arc<crate::identity::SecretManager>,
}

fn query_param<'a>(q: Option<&'a str>, key: &str) -> Option<&'a str> {
    q?.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

pub fn admin_handler(a: Arc<AdminState>) -> Handler {
    Arc::new(move |req: AdminRequest| {
        let a = a.clone();
        Box::pin(async move {
            match (req.method.clone(), req.path.as_str()) {
                (Method::GET, "/config_dump") => {
                    let dump = a.state.read(|s| {
                        serde_json::to_vec_pretty(&json!({
                            "config": &*a.cfg,
                            "state": s.dump(),
                            "certificates": a.secrets.dump(),
                        }))
                    });
                    match dump {
                        Ok(b) => AdminResponse::json(b),
                        Err(e) => {
                            AdminResponse::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
                        }
                    }
                }
                (Method::GET, "/logging") => match &a.log {
                    Some(l) => AdminResponse::text(
                        StatusCode::OK,
                        format!("current log level: {}\n", l.current()),
                    ),
                    None => AdminResponse::text(
                        StatusCode::OK,
                        "logging is managed by the embedding process\n",
                    ),
                },
                (Method::POST, "/logging") => {
                    let Some(level) = query_param(req.query.as_deref(), "level") else {
                        return AdminResponse::text(
                            StatusCode::BAD_REQUEST,
                            "missing ?level=FILTER (e.g. info,ztunnel::proxy=debug)\n",
                        );
                    };
                    match &a.log {
                        Some(l) => match l.set(level) {
                            Ok(()) => AdminResponse::text(
                                StatusCode::OK,
                                format!("log level set to {level}\n"),
                            ),
                            Err(e) => {
                                AdminResponse::text(StatusCode::BAD_REQUEST, format!("{e}\n"))
                            }
                        },
                        None => AdminResponse::text(
                            StatusCode::CONFLICT,
                            "logging is managed by the embedding process\n",
                        ),
                    }
                }
                (Method::GET, "/debug/memory") => match memory_stats() {
                    Ok(v) => AdminResponse::json(v.to_string()),
                    Err(e) => AdminResponse::text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("jemalloc statistics unavailable: {e}\n"),
                    ),
                },
                (Method::GET, "/debug/memory/stats") => {
                    let mut out = Vec::new();
                    let mut opts = tikv_jemalloc_ctl::stats_print::Options::default();
                    opts.skip_per_arena = true;
                    opts.skip_mutex_statistics = true;
                    match tikv_jemalloc_ctl::stats_print::stats_print(&mut out, opts) {
                        Ok(()) => AdminResponse {
                            status: StatusCode::OK,
                            content_type: "text/plain; charset=utf-8",
                            body: out.into(),
                        },
                        Err(e) => AdminResponse::text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("jemalloc statistics unavailable: {e}\n"),
                        ),
                    }
                }
                (Method::POST, "/quitquitquit") => {
                    let _ = a.shutdown.try_send(());
                    AdminResponse::text(StatusCode::OK, "shutting down\n")
                }
                _ => AdminResponse::not_found(),
            }
        })
    })
}

/// jemalloc's counters (bytes), refreshed by advancing its epoch. `allocated` is what live
/// objects use; `resident - allocated` is held by the allocator (dirty pages waiting for the
/// decay, metadata, fragmentation). Only meaningful when jemalloc is the global allocator, as in
/// the ztunnel binary.
fn memory_stats() -> Result<serde_json::Value, tikv_jemalloc_ctl::Error> {
    use tikv_jemalloc_ctl::{epoch, stats};
    epoch::advance()?;
    Ok(json!({
        "allocator": "jemalloc",
        "allocated": stats::allocated::read()?,
        "active": stats::active::read()?,
        "resident": stats::resident::read()?,
        "mapped": stats::mapped::read()?,
        "metadata": stats::metadata::read()?,
        "retained": stats::retained::read()?,
        "process_rss": process_rss(),
    }))
}

/// The process's resident set (bytes) from `/proc/self/status`, or null where there is none.
fn process_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn stats_handler(registry: Arc<Registry>) -> Handler {
    Arc::new(move |req: AdminRequest| {
        let registry = registry.clone();
        Box::pin(async move {
            if req.path != "/metrics" && req.path != "/stats/prometheus" {
                return AdminResponse::not_found();
            }
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &registry) {
                Ok(()) => AdminResponse {
                    status: StatusCode::OK,
                    content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body: out.into(),
                },
                Err(e) => AdminResponse::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        })
    })
}

pub fn readiness_handler(ready: Ready) -> Handler {
    Arc::new(move |req: AdminRequest| {
        let ready = ready.clone();
        Box::pin(async move {
            if req.path != "/healthz/ready" {
                return AdminResponse::not_found();
            }
            let pending = ready.pending();
            if pending.is_empty() {
                AdminResponse::text(StatusCode::OK, "ready\n")
            } else {
                AdminResponse::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready, waiting for: {}\n", pending.join(", ")),
                )
            }
        })
    })
}
