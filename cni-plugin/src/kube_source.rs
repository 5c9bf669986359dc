//! Pod and namespace knowledge from the Kubernetes API (kube-rs): [`KubeSource`], a
//! `mesh_rt::source::Source` built from a reflector on this node's pods (field selector
//! `spec.nodeName=<node>`) and one on all namespaces, and [`KubeAnnotator`], which
//! merge-patches `pods/<name>/status` as Istio's agent does (less privilege than patching
//! the pod).
//!
//! Invariants: `start` returns only after both initial lists are complete, so the agent
//! never reconciles against a partial view (which would unenroll pods); every snapshot is
//! also mirrored to `<dir>/cluster.yaml` (only when it changed) so the synchronous plugin
//! reads the same labels without an API client of its own.

use std::{path::PathBuf, sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use mesh_rt::{
    drain::DrainWatcher,
    source::{Source, publish_if_changed},
};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::source::{ClusterState, Namespace, Pod, PodAnnotator, SourceError, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("Kubernetes client: {0}; set KUBECONFIG or run in-cluster with a ServiceAccount")]
    Client(String),
    #[error("the {0} watch ended before its initial list completed")]
    Stopped(&'static str),
}

/// A client for `kubeconfig` (its current context), or the in-cluster one.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeSourceError::Client(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeSourceError::Client(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| KubeSourceError::Client(e.to_string()))?,
    };
    Client::try_from(config).map_err(|e| KubeSourceError::Client(e.to_string()))
}

/// Converts a Kubernetes Pod; `None` if it lacks a name, namespace or UID.
pub fn pod_from_k8s(p: &K8sPod) -> Option<Pod> {
    let meta = &p.metadata;
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
        .or_else(|| {
            status
                .and_then(|s| s.pod_ip.as_ref())
                .and_then(|ip| ip.parse().ok())
                .map(|ip| vec![ip])
        })
        .unwrap_or_default();
    Some(Pod {
        uid: meta.uid.clone()?,
        name: meta.name.clone()?,
        namespace: meta.namespace.clone()?,
        node_name: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        ips,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        phase: status.and_then(|s| s.phase.clone()).unwrap_or_default(),
    })
}

pub fn namespace_from_k8s(n: &K8sNamespace) -> Option<Namespace> {
    Some(Namespace {
        name: n.metadata.name.clone()?,
        labels: n.metadata.labels.clone().unwrap_or_default(),
    })
}

/// The merge patch that sets (or, with `None`, removes) one annotation.
pub fn annotation_patch(key: &str, value: Option<&str>) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        key.to_string(),
        value.map_or(serde_json::Value::Null, |v| {
            serde_json::Value::String(v.into())
        }),
    );
    serde_json::json!({ "metadata": { "annotations": annotations } })
}

/// This node's pods (field selector `spec.nodeName=<node>`) and every namespace, as a
/// [`Source`] of [`ClusterState`]. Each snapshot is also written to `<mirror>/cluster.yaml`
/// when it changed, for the plugin.
pub struct KubeSource {
    pub client: Client,
    pub node: String,
    pub mirror: Option<PathBuf>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// Changes arriving within this window become one snapshot (a namespace relabel touches
/// many pods' verdicts at once; one reconcile is enough).
const DEBOUNCE: Duration = Duration::from_millis(20);

impl Source for KubeSource {
    type State = ClusterState;
    type Error = KubeSourceError;

    async fn start(
        self,
        out: watch::Sender<Arc<ClusterState>>,
        drain: DrainWatcher,
    ) -> Result<(), KubeSourceError> {
        let (pods, pod_writer) = reflector::store::<K8sPod>();
        let (namespaces, ns_writer) = reflector::store::<K8sNamespace>();
        let changed = Arc::new(Notify::new());
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.node));
        let pod_stream = watcher(Api::<K8sPod>::all(self.client.clone()), pod_cfg)
            .default_backoff()
            .reflect(pod_writer);
        spawn_watch("Pod", pod_stream, changed.clone(), drain.clone());
        let ns_stream = watcher(
            Api::<K8sNamespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(ns_writer);
        spawn_watch("Namespace", ns_stream, changed.clone(), drain.clone());
        for (kind, ready) in [
            (
                "Pod",
                Box::pin(pods.wait_until_ready())
                    as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
            ),
            ("Namespace", Box::pin(namespaces.wait_until_ready())),
        ] {
            let mut ready = ready;
            loop {
                tokio::select! {
                    r = &mut ready => {
                        r.map_err(|_| KubeSourceError::Stopped(kind))?;
                        break;
                    }
                    () = tokio::time::sleep(Duration::from_secs(10)) => {
                        info!(kind, "waiting for the initial list from the Kubernetes API server");
                    }
                }
            }
        }
        let mut mirror = Mirror {
            dir: self.mirror,
            last: None,
        };
        let first = snapshot(&pods, &namespaces);
        mirror.write(&first);
        out.send_replace(Arc::new(first));
        info!(node = %self.node, "Kubernetes pod source synced");
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        () = changed.notified() => {}
                        () = drain.signaled() => return,
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    let state = snapshot(&pods, &namespaces);
                    mirror.write(&state);
                    publish_if_changed(&out, state);
                }
            }
            .instrument(info_span!("k8s_pod_source")),
        );
        Ok(())
    }
}

/// Drives one reflector stream until the drain, waking the publisher after every event.
fn spawn_watch<S, K>(kind: &'static str, stream: S, changed: Arc<Notify>, drain: DrainWatcher)
where
    S: futures_util::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    tokio::spawn(
        async move {
            let run = stream.for_each(|ev| {
                match ev {
                    Ok(_) => changed.notify_one(),
                    Err(e) => warn!(error = %e, "watch error; retrying with backoff"),
                }
                std::future::ready(())
            });
            tokio::select! {
                () = run => {}
                () = drain.signaled() => {}
            }
        }
        .instrument(info_span!("k8s", kind)),
    );
}

/// The stores as one sorted snapshot.
fn snapshot(
    pods: &reflector::Store<K8sPod>,
    namespaces: &reflector::Store<K8sNamespace>,
) -> ClusterState {
    let mut pods: Vec<Pod> = pods
        .state()
        .iter()
        .filter_map(|p| pod_from_k8s(p))
        .collect();
    pods.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut namespaces: Vec<Namespace> = namespaces
        .state()
        .iter()
        .filter_map(|n| namespace_from_k8s(n))
        .collect();
    namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    ClusterState { namespaces, pods }
}

/// `<dir>/cluster.yaml`, rewritten (atomically) only when the state changed.
struct Mirror {
    dir: Option<PathBuf>,
    last: Option<ClusterState>,
}

impl Mirror {
    fn write(&mut self, state: &ClusterState) {
        let Some(dir) = &self.dir else { return };
        if self.last.as_ref() == Some(state) {
            return;
        }
        let body = serde_yaml::to_string(state).unwrap_or_default();
        match write_atomic(&dir.join("cluster.yaml"), body.as_bytes()) {
            Ok(()) => self.last = Some(state.clone()),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "mirroring pods for the plugin failed")
            }
        }
    }
}

/// Annotations through the API: a merge patch of `pods/<name>/status`.
pub struct KubeAnnotator {
    client: Client,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeAnnotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAnnotator").finish_non_exhaustive()
    }
}

impl KubeAnnotator {
    /// Must be called inside the agent's (multi-thread) runtime.
    pub fn new(client: Client) -> KubeAnnotator {
        KubeAnnotator {
            client,
            handle: tokio::runtime::Handle::current(),
        }
    }
}

impl PodAnnotator for KubeAnnotator {
    /// Needs a multi-thread tokio runtime (the agent's): the patch runs in `block_in_place`.
    fn annotate(&self, pod: &Pod, key: &str, value: Option<&str>) -> Result<(), SourceError> {
        let api: Api<K8sPod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let patch = annotation_patch(key, value);
        let r = tokio::task::block_in_place(|| {
            self.handle.block_on(api.patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ))
        });
        r.map(|_| ()).map_err(|e| SourceError::Api {
            pod: pod.key(),
            reason: format!(
                "patching pods/status: {e}; the agent's ServiceAccount needs patch on pods/status"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{PodIP, PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    #[test]
    fn k8s_pod_converts_with_all_fields_the_agent_uses() {
        let p = K8sPod {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                name: Some("echo".into()),
                namespace: Some("foo".into()),
                labels: Some(BTreeMap::from([(
                    "istio.io/dataplane-mode".into(),
                    "ambient".into(),
                )])),
                annotations: Some(BTreeMap::from([(
                    "ambient.istio.io/redirection".into(),
                    "enabled".into(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node1".into()),
                service_account_name: Some("echo-sa".into()),
                host_network: Some(false),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("10.244.1.2".into()),
                pod_ips: Some(vec![
                    PodIP {
                        ip: "10.244.1.2".into(),
                    },
                    PodIP {
                        ip: "fd00::2".into(),
                    },
                ]),
                ..PodStatus::default()
            }),
        };
        let got = pod_from_k8s(&p).unwrap();
        assert_eq!(got.key(), "foo/echo");
        assert_eq!(got.node_name, "node1");
        assert_eq!(got.service_account, "echo-sa");
        assert_eq!(got.ips.len(), 2);
        assert_eq!(got.labels["istio.io/dataplane-mode"], "ambient");
        assert_eq!(got.annotations["ambient.istio.io/redirection"], "enabled");
        assert_eq!(got.phase, "Running");
        // A pod that has not been scheduled or started yet: no IPs, default SA.
        let bare = K8sPod {
            metadata: ObjectMeta {
                uid: Some("u2".into()),
                name: Some("new".into()),
                namespace: Some("foo".into()),
                ..ObjectMeta::default()
            },
            ..K8sPod::default()
        };
        let got = pod_from_k8s(&bare).unwrap();
        assert!(got.ips.is_empty());
        assert_eq!(got.service_account, "default");
        assert!(pod_from_k8s(&K8sPod::default()).is_none());
    }

    #[test]
    fn annotation_patch_sets_and_removes() {
        assert_eq!(
            annotation_patch("ambient.istio.io/redirection", Some("enabled")),
            serde_json::json!({"metadata": {"annotations": {"ambient.istio.io/redirection": "enabled"}}})
        );
        assert_eq!(
            annotation_patch("ambient.istio.io/redirection", None),
            serde_json::json!({"metadata": {"annotations": {"ambient.istio.io/redirection": null}}})
        );
    }

    #[test]
    fn mirrored_state_reads_back_through_the_files_source() {
        let dir = tempfile::tempdir().unwrap();
        let state = ClusterState {
            namespaces: vec![Namespace {
                name: "foo".into(),
                labels: BTreeMap::from([("istio.io/dataplane-mode".into(), "ambient".into())]),
            }],
            pods: vec![Pod {
                uid: "u1".into(),
                name: "echo".into(),
                namespace: "foo".into(),
                node_name: "node1".into(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                ips: vec!["10.244.1.2".parse().unwrap()],
                service_account: "echo".into(),
                host_network: false,
                phase: "Running".into(),
            }],
        };
        let body = serde_yaml::to_string(&state).unwrap();
        write_atomic(&dir.path().join("cluster.yaml"), body.as_bytes()).unwrap();
        let back = crate::source::FilesSource::new(dir.path()).load().unwrap();
        assert_eq!(back, state);
    }
}
