//! Admin endpoints: `/config_dump` (the snapshot in force, with skipped objects and why),
//! `/quitquitquit` (POST: drain and exit), `/logging?level=` (change the log filter).
//! Metrics and readiness reuse ztunnel's handlers (the same text formats).

use std::sync::Arc;

use http::StatusCode;
use mesh_rt::{
    http::{AdminRequest, AdminResponse, Handler},
    logging::LogHandle,
};
use serde_json::json;
use tokio::sync::mpsc;

use crate::{config::Config, state::Store};

pub use ztunnel::admin::{readiness_handler, stats_handler};

/// What the admin port reads.
#[derive(Debug)]
pub struct AdminState {
    pub cfg: Arc<Config>,
    pub store: Store,
    pub log: Option<LogHandle>,
    pub shutdown: mpsc::Sender<()>,
}

/// The config dump as JSON.
pub fn config_dump(a: &AdminState) -> serde_json::Value {
    let s = a.store.get();
    let dump = s.mesh.dump();
    json!({
        "config": &*a.cfg,
        "waypoint": s.waypoint,
        "workloads": dump.workloads,
        "services": dump.services,
        "routes": s.routes.iter().map(|r| json!({
            "name": r.key(),
            "kind": format!("{:?}", r.kind),
            "rules": r.rules.len(),
            "parents": r.parents,
        })).collect::<Vec<_>>(),
        "authorizationPolicies": s.policies.authorization_policies.iter().map(|p| p.key()).collect::<Vec<_>>(),
        "requestAuthentications": s.policies.request_authentications.iter().map(|p| p.key()).collect::<Vec<_>>(),
        "destinationRules": s.destination_rules.iter().map(|(ns, d)| json!({"namespace": ns, "spec": d})).collect::<Vec<_>>(),
        "rejected": s.errors,
    })
}

pub fn admin_handler(a: Arc<AdminState>) -> Handler {
    Arc::new(move |req: AdminRequest| {
        let a = a.clone();
        Box::pin(async move {
            match (req.method.as_str(), req.path.as_str()) {
                (_, "/config_dump") => AdminResponse::json(
                    serde_json::to_vec_pretty(&config_dump(&a)).unwrap_or_default(),
                ),
                ("POST", "/quitquitquit") => {
                    let _ = a.shutdown.try_send(());
                    AdminResponse::text(StatusCode::OK, "draining\n")
                }
                (_, "/logging") => {
                    let Some(log) = &a.log else {
                        return AdminResponse::text(
                            StatusCode::NOT_IMPLEMENTED,
                            "logging not owned by this process\n",
                        );
                    };
                    let level = req
                        .query
                        .as_deref()
                        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
                    match level {
                        None => AdminResponse::text(StatusCode::OK, format!("{}\n", log.current())),
                        Some(l) => match log.set(l) {
                            Ok(()) => AdminResponse::text(StatusCode::OK, format!("{l}\n")),
                            Err(e) => {
                                AdminResponse::text(StatusCode::BAD_REQUEST, format!("{e}\n"))
                            }
                        },
                    }
                }
                _ => AdminResponse::not_found(),
            }
        })
    })
}
