//! The Kubernetes source: kube-rs watches feeding the same [`Index`] as the manifest
//! directory.
//!
//! ```text
//!  Namespace ─┐ (cluster-wide watches, list+watch, reconnect with backoff)
//!  Pod ───────┤
//!  Service ───┼─► State (index, per-kind relist buffers, rejections) ─► publisher ─► watch<Arc<Index>>
//!  AuthorizationPolicy (security.istio.io v1, else v1beta1) ──┤     (coalesces bursts)
//!  PeerAuthentication  (security.istio.io v1, else v1beta1) ──┤
//!  Gateway (gateway.networking.k8s.io v1, else v1beta1) ──────┤  (waypoints)
//!  HTTPRoute, GRPCRoute (gateway.networking.k8s.io) ──────────┤  (verbatim, for waypoints)
//!  RequestAuthentication (security.istio.io) ─────────────────┤
//!  DestinationRule (networking.istio.io) ─────────────────────┘
//! ```
//!
//! - Every watcher applies `Apply`/`Delete` events to the index; a (re)list (`Init`,
//!   `InitApply`…, `InitDone`) is buffered and replaces that kind at `InitDone`, so objects
//!   deleted while a watch was down disappear.
//! - Istio policies are watched as `DynamicObject`s and converted by
//!   [`mesh_policy::parse_objects`] on their JSON text, so validation is the directory
//!   source's. An object that fails is logged with its namespace/name and the reason, listed
//!   in [`Index::rejected`], and skipped (a previous version of it is dropped, as when a
//!   manifest file turns invalid); the others are unaffected.
//! - Gateways are read into [`crate::waypoint::Gateway`] (only the fields waypoints need).
//! - HTTPRoute, GRPCRoute, RequestAuthentication, DestinationRule and (besides its parsed
//!   form) AuthorizationPolicy are kept verbatim as [`index::KubeObject`]s for waypoints.
//! - For these CRD kinds the version watched is the first of `v1`, `v1beta1` that the server
//!   serves for the resource (objects written in either version are read through it). If the
//!   CRD is not installed, the kind counts as listed-and-empty and discovery is retried every
//!   10 s.
//! - Readiness: nothing is published until every kind has completed its first listing;
//!   [`Kubernetes::start`] returns only then, and the control plane binds its ports after it.
//!   Later relists (after a watch error) never withdraw the published index.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, TypeMeta},
    runtime::{WatchStreamExt, watcher},
};
use mesh_rt::drain::DrainWatcher;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    index::{self, Index, Object},
    source::{Source, SourceError},
};

/// The API group of Istio's security CRDs.
pub const SECURITY_GROUP: &str = "security.istio.io";
/// The API group of Gateway API.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The API group of Istio's networking CRDs.
pub const NETWORKING_GROUP: &str = "networking.istio.io";
/// Versions watched for a CRD kind, in order of preference.
pub const CRD_VERSIONS: [&str; 2] = ["v1", "v1beta1"];

const KINDS: [&str; 10] = [
    "Namespace",
    "Pod",
    "Service",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "Gateway",
    "HTTPRoute",
    "GRPCRoute",
    "RequestAuthentication",
    "DestinationRule",
];

/// What a converted object becomes in the index (one or more entries), or why it was refused.
type Converted = Result<Vec<Object>, String>;

/// A kind served by a CRD, found through discovery.
#[derive(Debug, Clone, Copy)]
struct CrdKind {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    /// What to install when the CRD is missing.
    install: &'static str,
    convert: fn(&ApiResource, DynamicObject) -> Converted,
}

const GATEWAY_API_CRDS: &str = "manifests/crds/gateway.networking.k8s.io.yaml";

const CRD_KINDS: [CrdKind; 7] = [
    CrdKind {
        group: SECURITY_GROUP,
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        install: "manifests/crds/security.istio.io.yaml",
        convert: policy_object,
    },
    CrdKind {
        group: SECURITY_GROUP,
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        install: "manifests/crds/security.istio.io.yaml",
        convert: policy_object,
    },
    CrdKind {
        group: GATEWAY_GROUP,
        kind: "Gateway",
        plural: "gateways",
        install: GATEWAY_API_CRDS,
        convert: gateway_object,
    },
    CrdKind {
        group: GATEWAY_GROUP,
        kind: "HTTPRoute",
        plural: "httproutes",
        install: GATEWAY_API_CRDS,
        convert: kube_object,
    },
    CrdKind {
        group: GATEWAY_GROUP,
        kind: "GRPCRoute",
        plural: "grpcroutes",
        install: GATEWAY_API_CRDS,
        convert: kube_object,
    },
    CrdKind {
        group: SECURITY_GROUP,
        kind: "RequestAuthentication",
        plural: "requestauthentications",
        install: "manifests/crds/security.istio.io.yaml",
        convert: kube_object,
    },
    CrdKind {
        group: NETWORKING_GROUP,
        kind: "DestinationRule",
        plural: "destinationrules",
        install: "manifests/crds/networking.istio.io.yaml",
        convert: kube_object,
    },
];

/// Bursts of events (a relist, a rollout) within this window make one publish.
const COALESCE: Duration = Duration::from_millis(50);
/// How often discovery is retried while a security CRD is not installed.
const DISCOVERY_RETRY: Duration = Duration::from_secs(10);
/// How often the wait for the first listing says what it still waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "reading the kubeconfig {path}: {reason} (ISTIOD_KUBECONFIG must name a kubeconfig file)"
    )]
    Kubeconfig { path: String, reason: String },
    #[error(
        "in-cluster Kubernetes configuration: {0} (ISTIOD_IN_CLUSTER needs KUBERNETES_SERVICE_HOST/PORT and the pod's service-account token; outside a cluster use ISTIOD_KUBECONFIG)"
    )]
    InCluster(String),
    #[error("building the Kubernetes client: {0}")]
    Client(String),
}

/// A client for the kubeconfig at `path` (its current context), or the in-cluster one.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |reason: String| K8sError::Kubeconfig {
                path: path.display().to_string(),
                reason,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| K8sError::InCluster(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| K8sError::Client(e.to_string()))
}

/// A relist in progress for one kind.
#[derive(Default)]
struct Relist {
    objects: Vec<Object>,
    rejected: BTreeMap<String, String>,
}

#[derive(Default)]
struct State {
    index: Index,
    /// Kinds whose first listing has not completed.
    pending: BTreeSet<&'static str>,
    relisting: BTreeMap<&'static str, Relist>,
    /// `Kind key` → why the object was refused.
    rejected: BTreeMap<String, String>,
}

/// The watchers' common state; a publisher task turns it into indexes.
struct Shared {
    state: Mutex<State>,
    dirty: Notify,
}

fn rejected_key(kind: &str, key: &str) -> String {
    format!("{kind} {key}")
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Recover from poisoning: each update is a handful of map operations on owned data,
        // so a holder that panicked leaves a usable state, and serving it beats stopping.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn init(&self, kind: &'static str) {
        self.lock().relisting.insert(kind, Relist::default());
    }

    fn init_apply(&self, kind: &'static str, key: String, obj: Converted) {
        let mut st = self.lock();
        let relist = st.relisting.entry(kind).or_default();
        match obj {
            Ok(o) => relist.objects.extend(o),
            Err(reason) => {
                warn!(kind, object = %key, %reason, "object refused; the others are applied");
                relist.rejected.insert(rejected_key(kind, &key), reason);
            }
        }
    }

    fn init_done(&self, kind: &'static str) {
        let mut st = self.lock();
        let relist = st.relisting.remove(kind).unwrap_or_default();
        let n = relist.objects.len();
        st.index.reset_kind(kind, relist.objects);
        let prefix = format!("{kind} ");
        st.rejected.retain(|k, _| !k.starts_with(&prefix));
        st.rejected.extend(relist.rejected);
        if st.pending.remove(kind) {
            info!(kind, objects = n, "initial list complete");
        } else {
            debug!(kind, objects = n, "relisted");
        }
        drop(st);
        self.dirty.notify_one();
    }

    fn apply(&self, kind: &'static str, key: String, obj: Converted) {
        let mut st = self.lock();
        match obj {
            Ok(objects) => {
                st.rejected.remove(&rejected_key(kind, &key));
                st.index.delete(kind, &key);
                for o in objects {
                    st.index.apply(o);
                }
            }
            Err(reason) => {
                warn!(kind, object = %key, %reason, "object refused; the others are applied");
                st.index.delete(kind, &key);
                st.rejected.insert(rejected_key(kind, &key), reason);
            }
        }
        drop(st);
        self.dirty.notify_one();
    }

    fn delete(&self, kind: &'static str, key: &str) {
        let mut st = self.lock();
        st.rejected.remove(&rejected_key(kind, key));
        st.index.delete(kind, key);
        drop(st);
        self.dirty.notify_one();
    }

    /// The index to publish, once every kind has listed.
    fn snapshot(&self) -> Option<Index> {
        let st = self.lock();
        if !st.pending.is_empty() {
            return None;
        }
        let mut idx = st.index.clone();
        idx.rejected = st
            .rejected
            .iter()
            .map(|(k, r)| format!("{k}: {r}"))
            .collect();
        Some(idx)
    }

    fn pending(&self) -> Vec<&'static str> {
        self.lock().pending.iter().copied().collect()
    }
}

/// The key of an object in the index, from its metadata.
fn key_of<K: Resource>(kind: &str, o: &K) -> String {
    let m = o.meta();
    if kind == "Namespace" {
        m.name.clone().unwrap_or_default()
    } else {
        index::key(m.namespace.as_deref(), m.name.as_deref())
    }
}

/// Runs one watcher until `drain` fires.
async fn run_watch<K, F>(
    shared: Arc<Shared>,
    kind: &'static str,
    api: Api<K>,
    convert: F,
    drain: DrainWatcher,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(K) -> Converted + Send,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            () = drain.signaled() => return,
        };
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                warn!(kind, error = %e, "watch failed; retrying with backoff (check that the API server is reachable and that istiod-lite may list and watch this kind cluster-wide)");
                continue;
            }
            None => {
                warn!(kind, "watch stream ended");
                return;
            }
        };
        match ev {
            watcher::Event::Init => shared.init(kind),
            watcher::Event::InitApply(o) => {
                let key = key_of(kind, &o);
                shared.init_apply(kind, key, convert(o));
            }
            watcher::Event::InitDone => shared.init_done(kind),
            watcher::Event::Apply(o) => {
                let key = key_of(kind, &o);
                shared.apply(kind, key, convert(o));
            }
            watcher::Event::Delete(o) => shared.delete(kind, &key_of(kind, &o)),
        }
    }
}

/// The first of [`CRD_VERSIONS`] in which the server serves `group`/`plural`, if any.
pub(crate) async fn served_version(
    client: &Client,
    group: &str,
    plural: &str,
) -> Result<Option<&'static str>, String> {
    let groups = client.list_api_groups().await.map_err(|e| e.to_string())?;
    let Some(g) = groups.groups.iter().find(|g| g.name == group) else {
        return Ok(None);
    };
    for v in CRD_VERSIONS {
        if !g.versions.iter().any(|gv| gv.version == v) {
            continue;
        }
        let resources = client
            .list_api_group_resources(&format!("{group}/{v}"))
            .await
            .map_err(|e| e.to_string())?;
        if resources.resources.iter().any(|r| r.name == plural) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// An Istio security object as the index holds it, validated by `mesh-policy` exactly as a
/// manifest file would be.
pub fn policy_object(ar: &ApiResource, mut o: DynamicObject) -> Converted {
    // List items may omit apiVersion/kind; the parser needs them.
    o.types = Some(TypeMeta {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
    });
    o.metadata.managed_fields = None;
    let at = format!(
        "{} {}",
        ar.kind,
        index::key(o.metadata.namespace.as_deref(), o.metadata.name.as_deref())
    );
    let value = serde_json::to_value(&o).map_err(|e| e.to_string())?;
    let text = value.to_string();
    let set = mesh_policy::parse_objects(&at, &text).map_err(|e| e.to_string())?;
    if let Some(p) = set.authorization_policies.into_iter().next() {
        let raw = index::KubeObject::from_value(&at, value)?;
        Ok(vec![Object::AuthorizationPolicy(p), Object::Kube(raw)])
    } else if let Some(p) = set.peer_authentications.into_iter().next() {
        Ok(vec![Object::PeerAuthentication(p)])
    } else {
        Err(format!(
            "{at}: not a {SECURITY_GROUP} AuthorizationPolicy or PeerAuthentication"
        ))
    }
}

/// A Gateway API `Gateway`, the fields waypoints need.
pub fn gateway_object(ar: &ApiResource, mut o: DynamicObject) -> Converted {
    o.metadata.managed_fields = None;
    let at = format!(
        "{} {}",
        ar.kind,
        index::key(o.metadata.namespace.as_deref(), o.metadata.name.as_deref())
    );
    let v = serde_json::to_value(&o).map_err(|e| format!("{at}: {e}"))?;
    serde_json::from_value(v)
        .map(|g| vec![Object::Gateway(g)])
        .map_err(|e| format!("{at}: {e}"))
}

/// A Service: typed for the translation, verbatim for waypoints (a Service that cannot be
/// serialized is still used by the translation).
fn service_objects(s: Service) -> Vec<Object> {
    let at = format!(
        "Service {}",
        index::key(s.metadata.namespace.as_deref(), s.metadata.name.as_deref())
    );
    let raw = serde_json::to_value(&s)
        .map_err(|e| e.to_string())
        .and_then(|v| index::KubeObject::from_value(&at, v));
    let mut out = vec![Object::Service(s)];
    match raw {
        Ok(r) => out.push(Object::Kube(r)),
        Err(reason) => warn!(object = %at, %reason, "not sent to waypoints"),
    }
    out
}

/// An object kept verbatim for waypoints (no validation here: the waypoint validates).
pub fn kube_object(ar: &ApiResource, mut o: DynamicObject) -> Converted {
    o.types = Some(TypeMeta {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
    });
    let at = format!(
        "{} {}",
        ar.kind,
        index::key(o.metadata.namespace.as_deref(), o.metadata.name.as_deref())
    );
    let v = serde_json::to_value(&o).map_err(|e| format!("{at}: {e}"))?;
    Ok(vec![Object::Kube(index::KubeObject::from_value(&at, v)?)])
}

/// Discovers the served version of a CRD kind, then watches it. While the CRD is not
/// installed the kind counts as listed and empty.
async fn run_crd(shared: Arc<Shared>, client: Client, crd: CrdKind, drain: DrainWatcher) {
    let CrdKind {
        group,
        kind,
        plural,
        install,
        convert,
    } = crd;
    let mut marked_empty = false;
    loop {
        match served_version(&client, group, plural).await {
            Ok(Some(version)) => {
                let ar = ApiResource {
                    group: group.to_owned(),
                    version: version.to_owned(),
                    api_version: format!("{group}/{version}"),
                    kind: kind.to_owned(),
                    plural: plural.to_owned(),
                };
                info!(kind, api_version = %ar.api_version, "watching");
                let api: Api<DynamicObject> = Api::all_with(client, &ar);
                run_watch(shared, kind, api, move |o| convert(&ar, o), drain).await;
                return;
            }
            Ok(None) => {
                if !marked_empty {
                    warn!(
                        kind,
                        group,
                        "CRD not installed: no {kind} is used until it is (install {install}); checking again every {}s",
                        DISCOVERY_RETRY.as_secs()
                    );
                    shared.init(kind);
                    shared.init_done(kind);
                    marked_empty = true;
                }
            }
            Err(e) => {
                warn!(kind, error = %e, "API discovery failed; retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(DISCOVERY_RETRY) => {}
            () = drain.signaled() => return,
        }
    }
}

/// Publishes the index after changes, coalescing bursts.
async fn publish(
    shared: Arc<Shared>,
    out: watch::Sender<Arc<Index>>,
    synced: watch::Sender<bool>,
    drain: DrainWatcher,
) {
    loop {
        tokio::select! {
            () = shared.dirty.notified() => {}
            () = drain.signaled() => return,
        }
        tokio::time::sleep(COALESCE).await;
        if let Some(idx) = shared.snapshot() {
            debug!(
                namespaces = idx.namespaces.len(),
                pods = idx.pods.len(),
                services = idx.services.len(),
                policies = idx.authorization_policies.len(),
                "index updated"
            );
            out.send_replace(Arc::new(idx));
            synced.send_replace(true);
        }
    }
}

fn strip<K: Resource>(mut o: K) -> K {
    o.meta_mut().managed_fields = None;
    o
}

/// The Kubernetes source.
#[derive(Clone)]
pub struct Kubernetes {
    pub client: Client,
}

impl Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes").finish_non_exhaustive()
    }
}

impl Source for Kubernetes {
    type State = Index;
    type Error = SourceError;

    async fn start(
        self,
        out: watch::Sender<Arc<Index>>,
        drain: DrainWatcher,
    ) -> Result<(), SourceError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: KINDS.into_iter().collect(),
                ..Default::default()
            }),
            dirty: Notify::new(),
        });
        let (synced_tx, mut synced) = watch::channel(false);
        tokio::spawn(
            publish(shared.clone(), out, synced_tx, drain.clone()).instrument(info_span!("k8s")),
        );
        let c = &self.client;
        let span = |kind: &'static str| info_span!("k8s", kind);
        tokio::spawn(
            run_watch(
                shared.clone(),
                "Namespace",
                Api::<Namespace>::all(c.clone()),
                |o| Ok(vec![Object::Namespace(strip(o))]),
                drain.clone(),
            )
            .instrument(span("Namespace")),
        );
        tokio::spawn(
            run_watch(
                shared.clone(),
                "Pod",
                Api::<Pod>::all(c.clone()),
                |o| Ok(vec![Object::Pod(strip(o))]),
                drain.clone(),
            )
            .instrument(span("Pod")),
        );
        tokio::spawn(
            run_watch(
                shared.clone(),
                "Service",
                Api::<Service>::all(c.clone()),
                |o| Ok(service_objects(strip(o))),
                drain.clone(),
            )
            .instrument(span("Service")),
        );
        for crd in CRD_KINDS {
            tokio::spawn(
                run_crd(shared.clone(), c.clone(), crd, drain.clone()).instrument(span(crd.kind)),
            );
        }
        loop {
            tokio::select! {
                r = synced.wait_for(|s| *s) => {
                    return r.map(|_| ()).map_err(|_| SourceError::Stopped);
                }
                () = tokio::time::sleep(PROGRESS_EVERY) => {
                    info!(pending = ?shared.pending(), "waiting for the initial list from the Kubernetes API server");
                }
                () = drain.signaled() => return Err(SourceError::Stopped),
            }
        }
    }
}

/// Where a kubeconfig is, for logs.
pub fn describe(kubeconfig: Option<&PathBuf>) -> String {
    kubeconfig.map_or_else(
        || "in-cluster".to_owned(),
        |p| format!("kubeconfig {}", p.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ap_resource() -> ApiResource {
        ApiResource {
            group: SECURITY_GROUP.into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        }
    }

    fn dynamic(json: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn policies_convert_like_manifests_and_failures_name_the_object() {
        // As a list item arrives: no apiVersion/kind, server-set metadata, a status.
        let ok = dynamic(serde_json::json!({
            "metadata": {"name": "deny-bar", "namespace": "foo", "resourceVersion": "7",
                         "uid": "u", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["bar"]}}]}]},
            "status": {"observedGeneration": 1}
        }));
        let objs = policy_object(&ap_resource(), ok).unwrap();
        match &objs[..] {
            [Object::AuthorizationPolicy(p), Object::Kube(raw)] => {
                assert_eq!(p.key(), "foo/deny-bar");
                assert_eq!(raw.resource_name(), "AuthorizationPolicy/foo/deny-bar");
                let v: serde_json::Value = serde_json::from_str(&raw.json).unwrap();
                assert!(v.get("status").is_none(), "{v}");
                assert!(v["metadata"].get("managedFields").is_none(), "{v}");
                assert_eq!(v["apiVersion"], "security.istio.io/v1");
                assert_eq!(v["spec"]["action"], "DENY");
            }
            o => panic!("{o:?}"),
        }
        let bad = dynamic(serde_json::json!({
            "metadata": {"name": "typo", "namespace": "foo"},
            "spec": {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}
        }));
        let e = policy_object(&ap_resource(), bad).unwrap_err();
        assert!(e.contains("AuthorizationPolicy foo/typo"), "{e}");
        assert!(e.contains("principal"), "{e}");
    }

    #[test]
    fn gateways_keep_the_fields_waypoints_read() {
        let ar = ApiResource {
            group: GATEWAY_GROUP.into(),
            version: "v1".into(),
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "Gateway".into(),
            plural: "gateways".into(),
        };
        let o = dynamic(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "foo", "labels": {"istio.io/waypoint-for": "all"}},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            "status": {"addresses": [{"type": "IPAddress", "value": "10.96.0.9"}]}
        }));
        match gateway_object(&ar, o).unwrap().remove(0) {
            Object::Gateway(g) => {
                assert_eq!((g.namespace(), g.name()), ("foo", "waypoint"));
                assert_eq!(g.spec.gateway_class_name, "istio-waypoint");
                assert_eq!(g.waypoint_for(), "all");
            }
            o => panic!("{}", o.kind()),
        }
        let bad = dynamic(serde_json::json!({
            "metadata": {"name": "w", "namespace": "foo"}, "spec": {"listeners": "nope"}
        }));
        let e = gateway_object(&ar, bad).unwrap_err();
        assert!(e.starts_with("Gateway foo/w: "), "{e}");
    }

    #[test]
    fn a_relist_replaces_the_kind_and_rejections_follow_the_object() {
        let shared = Shared {
            state: Mutex::new(State {
                pending: ["Namespace"].into_iter().collect(),
                ..Default::default()
            }),
            dirty: Notify::new(),
        };
        let ns = |name: &str| {
            Object::Namespace(Namespace {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                ..Default::default()
            })
        };
        shared.init("Namespace");
        shared.init_apply("Namespace", "a".into(), Ok(vec![ns("a")]));
        shared.init_apply("Namespace", "bad".into(), Err("broken".into()));
        assert!(
            shared.snapshot().is_none(),
            "nothing before the first InitDone"
        );
        shared.init_done("Namespace");
        let idx = shared.snapshot().unwrap();
        assert_eq!(idx.namespaces.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(idx.rejected, ["Namespace bad: broken"]);
        // A relist after a watch gap: `a` vanished meanwhile, `bad` was fixed.
        shared.init("Namespace");
        shared.init_apply("Namespace", "bad".into(), Ok(vec![ns("bad")]));
        assert_eq!(
            shared.snapshot().unwrap().namespaces.len(),
            1,
            "the published view holds until InitDone"
        );
        shared.init_done("Namespace");
        let idx = shared.snapshot().unwrap();
        assert_eq!(idx.namespaces.keys().collect::<Vec<_>>(), ["bad"]);
        assert!(idx.rejected.is_empty(), "{:?}", idx.rejected);
        shared.apply("Namespace", "bad".into(), Err("broken again".into()));
        let idx = shared.snapshot().unwrap();
        assert!(
            idx.namespaces.is_empty(),
            "an invalid new version drops the old one"
        );
        assert_eq!(idx.rejected, ["Namespace bad: broken again"]);
        shared.delete("Namespace", "bad");
        assert!(shared.snapshot().unwrap().rejected.is_empty());
    }
}
