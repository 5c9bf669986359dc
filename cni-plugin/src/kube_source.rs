//! Pod and namespace knowledge from the Kubernetes API (kube-rs): a reflector on this node's
//! pods (field selector `spec.nodeName=<node>`) and one on all namespaces. `load()` reads
//! the stores; `annotate()` merge-patches `pods/<name>/status`, as Istio's agent does (it
//! needs less privilege than patching the pod).
//!
//! Invariants: `start` returns only after both initial lists are complete, so the agent
//! never reconciles against a partial view (which would unenroll pods); each `load()` is
//! also mirrored to `<dir>/cluster.yaml` (only when it changed) so the synchronous plugin
//! reads the same labels without an API client of its own.

use std::{path::PathBuf, sync::Mutex, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace as K8sNamespace, Pod as K8sPod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::{WatchStreamExt, reflector, watcher},
};
use tracing::{Instrument, info, info_span, warn};

use crate::source::{ClusterState, Namespace, Pod, PodSource, SourceError, write_atomic};

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

pub struct KubeSource {
    client: Client,
    pods: reflector::Store<K8sPod>,
    namespaces: reflector::Store<K8sNamespace>,
    handle: tokio::runtime::Handle,
    /// Directory whose `cluster.yaml` mirrors every load (for the plugin).
    mirror: Option<PathBuf>,
    last_mirrored: Mutex<Option<ClusterState>>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource").finish_non_exhaustive()
    }
}

impl KubeSource {
    /// Starts both watches and waits for their initial lists.
    pub async fn start(
        client: Client,
        node: &str,
        mirror: Option<PathBuf>,
    ) -> Result<KubeSource, KubeSourceError> {
        let (pods, pod_writer) = reflector::store::<K8sPod>();
        let (namespaces, ns_writer) = reflector::store::<K8sNamespace>();
        let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let pod_stream = watcher(Api::<K8sPod>::all(client.clone()), pod_cfg)
            .default_backoff()
            .reflect(pod_writer);
        tokio::spawn(
            pod_stream
                .for_each(|ev| async move {
                    if let Err(e) = ev {
                        warn!(error = %e, "pod watch error; retrying with backoff");
                    }
                })
                .instrument(info_span!("k8s", kind = "Pod")),
        );
        let ns_stream = watcher(
            Api::<K8sNamespace>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .reflect(ns_writer);
        tokio::spawn(
            ns_stream
                .for_each(|ev| async move {
                    if let Err(e) = ev {
                        warn!(error = %e, "namespace watch error; retrying with backoff");
                    }
                })
                .instrument(info_span!("k8s", kind = "Namespace")),
        );
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
        info!(%node, "Kubernetes pod source synced");
        Ok(KubeSource {
            client,
            pods,
            namespaces,
            handle: tokio::runtime::Handle::current(),
            mirror,
            last_mirrored: Mutex::new(None),
        })
    }

    fn mirror(&self, state: &ClusterState) {
        let Some(dir) = &self.mirror else { return };
        let mut last = self.last_mirrored.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(state) {
            return;
        }
        let body = serde_yaml::to_string(state).unwrap_or_default();
        match write_atomic(&dir.join("cluster.yaml"), body.as_bytes()) {
            Ok(()) => *last = Some(state.clone()),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "mirroring pods for the plugin failed")
            }
        }
    }
}

impl PodSource for KubeSource {
    fn load(&self) -> Result<ClusterState, SourceError> {
        let mut pods: Vec<Pod> = self
            .pods
            .state()
            .iter()
            .filter_map(|p| pod_from_k8s(p))
            .collect();
        pods.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut namespaces: Vec<Namespace> = self
            .namespaces
            .state()
            .iter()
            .filter_map(|n| namespace_from_k8s(n))
            .collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        let state = ClusterState { namespaces, pods };
        self.mirror(&state);
        Ok(state)
    }

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
