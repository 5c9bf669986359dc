//! HTTPRoute and GRPCRoute status for the parents the mesh owns, as Istio writes it for GAMMA
//! routes: one `status.parents[]` entry per Service parent (and per parent that is a waypoint
//! Gateway), `controllerName: istio.io/gateway-controller`, the user's `parentRef` echoed
//! back, and two conditions:
//! - `Accepted`: True/`Accepted` "Route was valid"; False/`UnsupportedValue` naming the field
//!   the waypoint refuses (validated with the waypoint's own parser, so status and data
//!   plane agree), or False/`NoMatchingParent` when the parent Service or Gateway is missing;
//! - `ResolvedRefs`: True/`ResolvedRefs` "All references resolved"; False/`BackendNotFound`
//!   naming the missing backend Services, or False/`InvalidKind` for backends that are not
//!   Services.
//!
//! [`desired`] is pure (index in, statuses out; parse results cached by the object's text).
//! [`spawn`] writes them with server-side apply on the `status` subresource (field manager
//! [`crate::deploy::FIELD_MANAGER`]) when they change, retrying failures with backoff; one
//! route's failure never holds up another's. It runs on the leader only.

use std::collections::BTreeMap;

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use mesh_rt::drain::DrainWatcher;
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};
use tracing::{Instrument, info_span, warn};

use crate::{
    deploy::FIELD_MANAGER,
    index::Index,
    k8s::GATEWAY_GROUP,
    status::{Retry, next_retry, now},
    waypoint::WAYPOINT_CLASS,
};

/// Istio's controller name on route parents it manages.
pub const CONTROLLER_NAME: &str = "istio.io/gateway-controller";

/// One condition, without its transition time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The status of a route towards one parent.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentStatus {
    pub parent_ref: Value,
    pub conditions: Vec<Cond>,
}

/// What one route's status should be.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteStatus {
    pub api_version: String,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

/// A route as parsed and validated, kept while its text is unchanged.
#[derive(Debug)]
struct Parsed {
    json: String,
    value: Value,
    valid: Result<(), String>,
}

/// Parsed routes by object key: an index change that leaves a route's text alone (most are
/// pod changes) neither parses nor validates it again.
#[derive(Debug, Default)]
pub struct Cache {
    parsed: BTreeMap<String, Parsed>,
}

fn validate(value: &Value) -> Result<(), String> {
    let value = serde_yaml::to_value(value).map_err(|e| e.to_string())?;
    match waypoint::objects::parse_object(&value) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{}: {}", e.field, e.reason)),
    }
}

fn text<'a>(v: &'a Value, f: &str) -> Option<&'a str> {
    v.get(f).and_then(Value::as_str)
}

/// The parent a `parentRef` names, if it is one the mesh owns: `Some(found)`.
fn owned_parent(idx: &Index, route_ns: &str, p: &Value) -> Option<bool> {
    let group = text(p, "group").unwrap_or(GATEWAY_GROUP);
    let kind = text(p, "kind").unwrap_or("Gateway");
    let name = text(p, "name")?;
    let ns = text(p, "namespace").unwrap_or(route_ns);
    let key = format!("{ns}/{name}");
    match (group, kind) {
        ("" | "core", "Service") => Some(idx.services.contains_key(&key)),
        (GATEWAY_GROUP, "Gateway") => match idx.gateways.get(&key) {
            Some(gw) if gw.spec.gateway_class_name == WAYPOINT_CLASS => Some(true),
            // Another controller's Gateway (or none we know of): not ours to report.
            _ => None,
        },
        _ => None,
    }
}

/// `ResolvedRefs` for a route's backends (read from its text, so it is known even when the
/// route is refused).
fn resolved_refs(idx: &Index, route_ns: &str, spec: &Value) -> Cond {
    let mut missing = Vec::new();
    let mut invalid = Vec::new();
    let rules = spec.get("rules").and_then(Value::as_array);
    for b in rules.into_iter().flatten().flat_map(|r| {
        r.get("backendRefs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
    }) {
        let group = text(b, "group").unwrap_or("");
        let kind = text(b, "kind").unwrap_or("Service");
        let name = text(b, "name").unwrap_or_default();
        let ns = text(b, "namespace").unwrap_or(route_ns);
        if !matches!(group, "" | "core") || kind != "Service" {
            invalid.push(format!("{group}/{kind} {ns}/{name}"));
        } else if !idx.services.contains_key(&format!("{ns}/{name}")) {
            missing.push(format!("{ns}/{name}"));
        }
    }
    missing.dedup();
    if !invalid.is_empty() {
        Cond {
            type_: "ResolvedRefs",
            status: false,
            reason: "InvalidKind",
            message: format!(
                "backendRefs must be Services: unsupported {}",
                invalid.join(", ")
            ),
        }
    } else if !missing.is_empty() {
        Cond {
            type_: "ResolvedRefs",
            status: false,
            reason: "BackendNotFound",
            message: format!("backend(s) not found: {}", missing.join(", ")),
        }
    } else {
        Cond {
            type_: "ResolvedRefs",
            status: true,
            reason: "ResolvedRefs",
            message: "All references resolved".into(),
        }
    }
}

/// The status every HTTPRoute and GRPCRoute in `idx` should have, by `Kind/ns/name`. Routes
/// with no parent the mesh owns are left out (their status belongs to another controller).
pub fn desired(idx: &Index, cache: &mut Cache) -> BTreeMap<String, RouteStatus> {
    let mut out = BTreeMap::new();
    cache.parsed.retain(|k, _| idx.kube_objects.contains_key(k));
    for (key, o) in &idx.kube_objects {
        if !matches!(o.kind, "HTTPRoute" | "GRPCRoute") {
            continue;
        }
        if cache.parsed.get(key).is_none_or(|p| p.json != o.json) {
            let Ok(value) = serde_json::from_str::<Value>(&o.json) else {
                cache.parsed.remove(key);
                continue;
            };
            let valid = validate(&value);
            cache.parsed.insert(
                key.clone(),
                Parsed {
                    json: o.json.clone(),
                    value,
                    valid,
                },
            );
        }
        let Some(Parsed {
            value: v, valid, ..
        }) = cache.parsed.get(key)
        else {
            continue;
        };
        let spec = v.get("spec").unwrap_or(&Value::Null);
        let parents: Vec<(Value, bool)> = spec
            .get("parentRefs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| owned_parent(idx, &o.namespace, p).map(|found| (p.clone(), found)))
            .collect();
        if parents.is_empty() {
            continue;
        }
        let resolved = resolved_refs(idx, &o.namespace, spec);
        let parents = parents
            .into_iter()
            .map(|(parent_ref, found)| {
                let accepted = match (valid, found) {
                    (_, false) => Cond {
                        type_: "Accepted",
                        status: false,
                        reason: "NoMatchingParent",
                        message: format!(
                            "parent {} {}/{} not found",
                            text(&parent_ref, "kind").unwrap_or("Gateway"),
                            text(&parent_ref, "namespace").unwrap_or(&o.namespace),
                            text(&parent_ref, "name").unwrap_or_default()
                        ),
                    },
                    (Err(why), true) => Cond {
                        type_: "Accepted",
                        status: false,
                        reason: "UnsupportedValue",
                        message: format!("the waypoint refuses this route: {why}"),
                    },
                    (Ok(()), true) => Cond {
                        type_: "Accepted",
                        status: true,
                        reason: "Accepted",
                        message: "Route was valid".into(),
                    },
                };
                ParentStatus {
                    parent_ref,
                    conditions: vec![accepted, resolved.clone()],
                }
            })
            .collect();
        out.insert(
            key.clone(),
            RouteStatus {
                api_version: o.api_version.clone(),
                kind: o.kind,
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                generation: v
                    .get("metadata")
                    .and_then(|m| m.get("generation"))
                    .and_then(Value::as_i64),
                parents,
            },
        );
    }
    out
}

/// The apply body: the route's `status.parents`, each condition with its transition time.
pub fn status_body(r: &RouteStatus, since: &[Vec<String>]) -> Value {
    let parents: Vec<Value> = r
        .parents
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let conditions: Vec<Value> = p
                .conditions
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    let mut c = json!({
                        "type": c.type_,
                        "status": if c.status { "True" } else { "False" },
                        "reason": c.reason,
                        "message": c.message,
                        "lastTransitionTime": since.get(i).and_then(|s| s.get(j)).cloned().unwrap_or_else(now),
                    });
                    if let Some(g) = r.generation {
                        c["observedGeneration"] = g.into();
                    }
                    c
                })
                .collect();
            json!({"parentRef": p.parent_ref, "controllerName": CONTROLLER_NAME, "conditions": conditions})
        })
        .collect();
    json!({
        "apiVersion": r.api_version, "kind": r.kind,
        "metadata": {"name": r.name, "namespace": r.namespace},
        "status": {"parents": parents},
    })
}

/// Starts the writer; returns at once.
pub fn spawn(client: Client, index: watch::Receiver<std::sync::Arc<Index>>, drain: DrainWatcher) {
    tokio::spawn(run(client, index, drain).instrument(info_span!("route_status")));
}

/// Transition times of what was written: `[parent][condition]`, reused while a condition's
/// status holds.
fn transition_times(
    prev: Option<&(RouteStatus, Vec<Vec<String>>)>,
    r: &RouteStatus,
) -> Vec<Vec<String>> {
    r.parents
        .iter()
        .map(|p| {
            p.conditions
                .iter()
                .map(|c| {
                    prev.and_then(|(w, times)| {
                        let i = w
                            .parents
                            .iter()
                            .position(|q| q.parent_ref == p.parent_ref)?;
                        let j = w.parents[i]
                            .conditions
                            .iter()
                            .position(|d| d.type_ == c.type_ && d.status == c.status)?;
                        times.get(i)?.get(j).cloned()
                    })
                    .unwrap_or_else(now)
                })
                .collect()
        })
        .collect()
}

async fn run(
    client: Client,
    mut index: watch::Receiver<std::sync::Arc<Index>>,
    drain: DrainWatcher,
) {
    let mut cache = Cache::default();
    let mut written: BTreeMap<String, (RouteStatus, Vec<Vec<String>>)> = BTreeMap::new();
    let mut retries: BTreeMap<String, Retry> = BTreeMap::new();
    loop {
        let idx = index.borrow_and_update().clone();
        let want = desired(&idx, &mut cache);
        drop(idx);
        written.retain(|k, _| want.contains_key(k));
        retries.retain(|k, _| want.contains_key(k));
        let t = Instant::now();
        for (key, r) in &want {
            let prev = written.get(key);
            if prev.is_some_and(|(w, _)| w == r) || !retries.get(key).is_none_or(|x| x.due(t)) {
                continue;
            }
            let times = transition_times(prev, r);
            let version = r.api_version.split_once('/').map_or("v1", |(_, v)| v);
            let ar = ApiResource {
                group: GATEWAY_GROUP.into(),
                version: version.into(),
                api_version: r.api_version.clone(),
                kind: r.kind.into(),
                plural: if r.kind == "GRPCRoute" {
                    "grpcroutes"
                } else {
                    "httproutes"
                }
                .into(),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &r.namespace, &ar);
            let res = api
                .patch_status(
                    &r.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&status_body(r, &times)),
                )
                .await;
            match res {
                Ok(_) => {
                    written.insert(key.clone(), (r.clone(), times));
                    retries.remove(key);
                }
                // Deleted meanwhile: the next index drops it.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    let wait = retries.entry(key.clone()).or_default().failed();
                    warn!(route = %key, error = %e, retry_in_s = wait.as_secs(), "writing route status failed (check that istiod-lite's ClusterRole allows patch on httproutes/status and grpcroutes/status); retrying");
                }
            }
        }
        tokio::select! {
            c = index.changed() => if c.is_err() { return },
            () = next_retry(&retries) => {}
            () = drain.signaled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::KubeObject;

    fn index(yaml: &str) -> Index {
        let mut idx = Index::default();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            match v["kind"].as_str() {
                Some("Service") => idx.apply(crate::index::Object::Service(
                    serde_json::from_value(v).unwrap(),
                )),
                _ => {
                    let o = KubeObject::from_value("test", v).unwrap();
                    idx.kube_objects.insert(o.resource_name(), o);
                }
            }
        }
        idx
    }

    const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: shop}
spec: {ports: [{port: 9080}]}
";

    fn route(name: &str, rules: &str) -> String {
        format!(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: shop, generation: 3}}
spec:
  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 9080}}]
  rules: {rules}
"
        )
    }

    fn conds(s: &RouteStatus) -> Vec<(&'static str, bool, &'static str, String)> {
        s.parents[0]
            .conditions
            .iter()
            .map(|c| (c.type_, c.status, c.reason, c.message.clone()))
            .collect()
    }

    #[test]
    fn a_valid_route_is_accepted_and_resolved_as_istio_says_it() {
        let yaml =
            SERVICES.to_owned() + &route("ok", "[{backendRefs: [{name: reviews-v1, port: 9080}]}]");
        let st = desired(&index(&yaml), &mut Cache::default());
        let s = &st["HTTPRoute/shop/ok"];
        assert_eq!(s.generation, Some(3));
        assert_eq!(
            conds(s),
            [
                ("Accepted", true, "Accepted", "Route was valid".into()),
                (
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "All references resolved".into()
                ),
            ]
        );
        let body = status_body(s, &[vec!["T0".into(), "T1".into()]]);
        let p = &body["status"]["parents"][0];
        assert_eq!(p["controllerName"], "istio.io/gateway-controller");
        assert_eq!(
            p["parentRef"],
            json!({"group": "", "kind": "Service", "name": "reviews", "port": 9080})
        );
        assert_eq!(p["conditions"][0]["observedGeneration"], 3);
        assert_eq!(p["conditions"][1]["lastTransitionTime"], "T1");
    }

    #[test]
    fn an_invalid_route_names_the_field_and_a_missing_backend_is_named() {
        let yaml = SERVICES.to_owned()
            + &route(
                "bad",
                "[{matches: [{path: {type: RegularExpression, value: '(['}}], backendRefs: [{name: gone, port: 1}]}]",
            )
            + &route("typo", "[{backendRef: [{name: reviews-v1}]}]");
        let st = desired(&index(&yaml), &mut Cache::default());
        let bad = conds(&st["HTTPRoute/shop/bad"]);
        assert_eq!((bad[0].1, bad[0].2), (false, "UnsupportedValue"), "{bad:?}");
        assert!(
            bad[0].3.contains("spec.rules[0].matches[0].path"),
            "{bad:?}"
        );
        assert_eq!(
            bad[1],
            (
                "ResolvedRefs",
                false,
                "BackendNotFound",
                "backend(s) not found: shop/gone".into()
            )
        );
        let typo = conds(&st["HTTPRoute/shop/typo"]);
        assert_eq!(typo[0].2, "UnsupportedValue", "{typo:?}");
        assert!(typo[0].3.contains("backendRef"), "{typo:?}");
    }

    #[test]
    fn parents_not_owned_by_the_mesh_are_left_alone_and_missing_ones_reported() {
        let yaml = SERVICES.to_owned()
            + "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ingress, namespace: shop}
spec:
  parentRefs: [{name: public-gateway}]
  rules: [{backendRefs: [{name: reviews}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: orphan, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: ratings}]
  rules: [{backendRefs: [{name: reviews, kind: ServiceImport, group: multicluster.x-k8s.io}]}]
";
        let st = desired(&index(&yaml), &mut Cache::default());
        assert!(!st.contains_key("HTTPRoute/shop/ingress"), "{st:?}");
        let o = conds(&st["HTTPRoute/shop/orphan"]);
        assert_eq!(
            o[0],
            (
                "Accepted",
                false,
                "NoMatchingParent",
                "parent Service shop/ratings not found".into()
            )
        );
        assert_eq!((o[1].1, o[1].2), (false, "InvalidKind"), "{o:?}");
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let yaml = SERVICES.to_owned() + &route("r", "[{backendRefs: [{name: reviews-v1}]}]");
        let mut cache = Cache::default();
        let first = desired(&index(&yaml), &mut cache)["HTTPRoute/shop/r"].clone();
        let prev = (first.clone(), vec![vec!["T0".to_owned(), "T1".to_owned()]]);
        // The backend disappears: Accepted keeps T0, ResolvedRefs changes and gets a new time.
        let gone = yaml.replace("name: reviews-v1, namespace", "name: other, namespace");
        let second = desired(&index(&gone), &mut cache)["HTTPRoute/shop/r"].clone();
        let times = transition_times(Some(&prev), &second);
        assert_eq!(times[0][0], "T0");
        assert_ne!(times[0][1], "T1");
    }
}
