//! AuthorizationPolicy status, written with server-side apply on the `status` subresource
//! (field manager [`crate::deploy::FIELD_MANAGER`]):
//! - `ZtunnelAccepted`, from `mesh-policy`'s L4 conversion of each policy ztunnel enforces
//!   (Istio's reasons and messages: `Accepted` "attached to ztunnel", `UnsupportedValue`
//!   naming what ztunnel ignores, ...);
//! - `WaypointAccepted` for `targetRefs` policies ([`crate::waypoint::policy_conditions`]).
//!
//! - The translation publishes the conditions; this task writes a policy's status only when
//!   its condition differs from the one it last wrote (once per policy after a start). A
//!   failed write is logged with the policy's name and retried with backoff (1 s doubling to
//!   60 s); other policies are unaffected.
//! - `lastTransitionTime` is the time of the write that changed the condition's status.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use mesh_policy::mesh::{Condition, ConditionType};
use mesh_rt::drain::DrainWatcher;
use serde_json::json;
use tokio::{sync::watch, time::Instant};
use tracing::{Instrument, debug, info_span, warn};

use crate::{deploy::FIELD_MANAGER, k8s::SECURITY_GROUP};

const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// One condition as written, and when its status last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    type_: ConditionType,
    status: &'static str,
    reason: String,
    message: String,
    since: String,
}

fn same(w: &[Written], cs: &[&Condition]) -> bool {
    w.len() == cs.len()
        && w.iter().zip(cs).all(|(w, c)| {
            w.type_ == c.type_
                && w.status == c.status
                && w.reason == c.reason
                && w.message == c.message
        })
}

/// When a failed status write is tried again: 1 s doubling to [`BACKOFF_MAX`].
#[derive(Debug, Default)]
pub(crate) struct Retry {
    failures: u32,
    pub(crate) at: Option<Instant>,
}

impl Retry {
    /// Records a failure; returns how long until the next try.
    pub(crate) fn failed(&mut self) -> Duration {
        self.failures += 1;
        let wait =
            Duration::from_secs(1u64 << self.failures.saturating_sub(1).min(6)).min(BACKOFF_MAX);
        self.at = Some(Instant::now() + wait);
        wait
    }

    pub(crate) fn due(&self, t: Instant) -> bool {
        self.at.is_none_or(|at| at <= t)
    }
}

/// Resolves when the earliest pending retry is due (never, when none is pending).
pub(crate) async fn next_retry(retries: &BTreeMap<String, Retry>) {
    match retries.values().filter_map(|r| r.at).min() {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn condition_type(t: ConditionType) -> &'static str {
    match t {
        ConditionType::ZtunnelAccepted => "ZtunnelAccepted",
        ConditionType::WaypointAccepted => "WaypointAccepted",
    }
}

pub(crate) fn now() -> String {
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The status body applied for one policy: its conditions, each with its transition time.
pub fn status_body(
    api_version: &str,
    key: &str,
    conds: &[(&Condition, String)],
) -> serde_json::Value {
    let (ns, name) = key.split_once('/').unwrap_or(("default", key));
    let conditions: Vec<serde_json::Value> = conds
        .iter()
        .map(|(c, since)| {
            json!({"type": condition_type(c.type_), "status": c.status, "reason": c.reason,
                   "message": c.message, "lastTransitionTime": since})
        })
        .collect();
    json!({
        "apiVersion": api_version, "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "status": {"conditions": conditions},
    })
}

/// Starts the status writer; returns at once.
pub fn spawn(
    client: Client,
    conditions: watch::Receiver<Arc<Vec<Condition>>>,
    drain: DrainWatcher,
) {
    tokio::spawn(run(client, conditions, drain).instrument(info_span!("policy_status")));
}

async fn run(
    client: Client,
    mut conditions: watch::Receiver<Arc<Vec<Condition>>>,
    drain: DrainWatcher,
) {
    // The CRD may be installed after start (k8s.rs waits for it the same way).
    let version = loop {
        match crate::k8s::served_version(&client, SECURITY_GROUP, "authorizationpolicies").await {
            Ok(Some(v)) => break v,
            Ok(None) => debug!("policy status waits for the security.istio.io CRDs"),
            Err(e) => debug!(error = %e, "API discovery failed; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(10)) => {}
            () = drain.signaled() => return,
        }
    };
    let ar = ApiResource {
        group: SECURITY_GROUP.into(),
        version: version.into(),
        api_version: format!("{SECURITY_GROUP}/{version}"),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    };
    let mut written: BTreeMap<String, Vec<Written>> = BTreeMap::new();
    let mut retries: BTreeMap<String, Retry> = BTreeMap::new();
    loop {
        let conds = conditions.borrow_and_update().clone();
        let mut wanted: BTreeMap<&str, Vec<&Condition>> = BTreeMap::new();
        for c in conds.iter().filter(|c| c.kind == "AuthorizationPolicy") {
            wanted.entry(c.policy.as_str()).or_default().push(c);
        }
        written.retain(|k, _| wanted.contains_key(k.as_str()));
        retries.retain(|k, _| wanted.contains_key(k.as_str()));
        let t = Instant::now();
        for (key, cs) in &wanted {
            let prev = written.get(*key);
            let due = retries.get(*key).is_none_or(|r| r.due(t));
            if prev.is_some_and(|w| same(w, cs)) || !due {
                continue;
            }
            let with_since: Vec<(&Condition, String)> = cs
                .iter()
                .map(|c| {
                    let since = prev
                        .and_then(|w| {
                            w.iter()
                                .find(|w| w.type_ == c.type_ && w.status == c.status)
                        })
                        .map_or_else(now, |w| w.since.clone());
                    (*c, since)
                })
                .collect();
            let (ns, name) = key.split_once('/').unwrap_or(("default", key));
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            let r = api
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&status_body(&ar.api_version, key, &with_since)),
                )
                .await;
            match r {
                Ok(_) => {
                    let w = with_since
                        .into_iter()
                        .map(|(c, since)| Written {
                            type_: c.type_,
                            status: c.status,
                            reason: c.reason.clone(),
                            message: c.message.clone(),
                            since,
                        })
                        .collect();
                    written.insert((*key).to_owned(), w);
                    retries.remove(*key);
                }
                // Deleted meanwhile: the next translation drops it.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    let wait = retries.entry((*key).to_owned()).or_default().failed();
                    warn!(policy = %key, error = %e, retry_in_s = wait.as_secs(), "writing AuthorizationPolicy status failed (check that istiod-lite's ClusterRole allows patch on authorizationpolicies/status); retrying");
                }
            }
        }
        tokio::select! {
            c = conditions.changed() => if c.is_err() { return },
            () = next_retry(&retries) => {}
            () = drain.signaled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_an_apply_of_the_status_only() {
        let c = Condition::new(
            "foo/deny",
            ConditionType::ZtunnelAccepted,
            true,
            "Accepted",
            "attached to ztunnel",
        );
        let w = Condition::new(
            "foo/deny",
            ConditionType::WaypointAccepted,
            false,
            "TargetNotFound",
            "x",
        );
        let b = status_body(
            "security.istio.io/v1",
            "foo/deny",
            &[(&c, "T".into()), (&w, "U".into())],
        );
        assert_eq!(b["metadata"], json!({"name": "deny", "namespace": "foo"}));
        assert_eq!(b["kind"], "AuthorizationPolicy");
        assert_eq!(
            b["status"]["conditions"][0],
            json!({"type": "ZtunnelAccepted", "status": "True", "reason": "Accepted",
                   "message": "attached to ztunnel", "lastTransitionTime": "T"})
        );
        assert_eq!(b["status"]["conditions"][1]["type"], "WaypointAccepted");
        assert_eq!(b["status"]["conditions"][1]["lastTransitionTime"], "U");
    }
}
