//! Where pod and namespace knowledge comes from. The state is a [`ClusterState`] snapshot
//! published by a `mesh_rt::source::Source` — the same trait istiod-lite's object sources
//! implement — and writes back to pods go through [`PodAnnotator`]. Two implementations:
//! [`crate::kube_source`] (kube-rs watches) and [`FilesSource`] here (`<dir>/cluster.yaml`,
//! annotations in `<dir>/annotations/`), which the netns lab and the tests use in place of
//! the Kubernetes API.
//!
//! Invariants: every snapshot is the whole current state (the agent reconciles against it,
//! so a missed change is repaired by the next one); the files source reads a file that is
//! replaced atomically (rename), never half-written, and keeps its last good snapshot when
//! the file turns unreadable.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_rt::{
    drain::DrainWatcher,
    source::{Source, publish_if_changed},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{Instrument, info_span, warn};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}: {source}; the pod source directory must hold cluster.yaml")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid cluster file: {reason}")]
    Parse { path: String, reason: String },
    #[error("annotating pod {pod}: {reason}")]
    Api { pod: String, reason: String },
    #[error("writing annotation for pod {pod} to {path}: {source}")]
    Annotate {
        pod: String,
        path: String,
        source: std::io::Error,
    },
}

/// What the mesh needs to know about a pod (a projection of the Kubernetes Pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `status.podIPs`: empty until the CNI has run.
    #[serde(default, rename = "podIPs")]
    pub ips: Vec<IpAddr>,
    #[serde(default = "default_sa", rename = "serviceAccountName")]
    pub service_account: String,
    #[serde(default)]
    pub host_network: bool,
    /// `status.phase`; `Succeeded`/`Failed` pods are terminated.
    #[serde(default)]
    pub phase: String,
}

fn default_sa() -> String {
    "default".into()
}

impl Pod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn terminated(&self) -> bool {
        matches!(self.phase.as_str(), "Succeeded" | "Failed")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Everything a source knows right now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub pods: Vec<Pod>,
}

impl ClusterState {
    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces
            .iter()
            .find(|n| n.name == ns)
            .map(|n| &n.labels)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    pub fn pod_by_uid(&self, uid: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.uid == uid)
    }
}

/// Writes back to pods: the agent's only mutation of cluster state.
pub trait PodAnnotator: Send + Sync + 'static {
    /// Sets (`Some`) or removes (`None`) an annotation on a pod.
    fn annotate(&self, pod: &Pod, key: &str, value: Option<&str>) -> Result<(), SourceError>;
}

/// `<dir>/cluster.yaml` (a [`ClusterState`] in YAML), plus one annotations file per pod at
/// `<dir>/annotations/<namespace>.<name>.yaml`, merged into the pod on load. As a
/// [`Source`] it re-reads both every `poll` and publishes when the state changed.
#[derive(Debug, Clone)]
pub struct FilesSource {
    dir: PathBuf,
    poll: Duration,
}

/// How often [`FilesSource`] re-reads its directory.
pub const FILES_POLL: Duration = Duration::from_millis(250);

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> FilesSource {
        FilesSource {
            dir: dir.into(),
            poll: FILES_POLL,
        }
    }

    pub fn with_poll(mut self, poll: Duration) -> FilesSource {
        self.poll = poll;
        self
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    fn annotations_file(&self, pod: &Pod) -> PathBuf {
        self.dir
            .join("annotations")
            .join(format!("{}.{}.yaml", pod.namespace, pod.name))
    }

    fn read_annotations(&self, pod: &Pod) -> BTreeMap<String, String> {
        std::fs::read_to_string(self.annotations_file(pod))
            .ok()
            .and_then(|s| serde_yaml::from_str(&s).ok())
            .unwrap_or_default()
    }
}

/// Replaces `path` atomically with `body` (temp file in the same dir, then rename).
pub fn write_atomic(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

impl FilesSource {
    /// Reads the state once, synchronously (the plugin's path: no runtime, no watch).
    pub fn load(&self) -> Result<ClusterState, SourceError> {
        let path = self.cluster_file();
        let text = std::fs::read_to_string(&path).map_err(|source| SourceError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut state: ClusterState =
            serde_yaml::from_str(&text).map_err(|e| SourceError::Parse {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        for pod in &mut state.pods {
            let extra = self.read_annotations(pod);
            pod.annotations.extend(extra);
        }
        Ok(state)
    }
}

impl Source for FilesSource {
    type State = ClusterState;
    type Error = SourceError;

    async fn start(
        self,
        out: watch::Sender<Arc<ClusterState>>,
        drain: DrainWatcher,
    ) -> Result<(), SourceError> {
        out.send_replace(Arc::new(self.load()?));
        let span = info_span!("pod_source", dir = %self.dir.display());
        tokio::spawn(
            async move {
                let mut last_error = None;
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(self.poll) => {}
                        () = drain.signaled() => return,
                    }
                    match self.load() {
                        Ok(state) => {
                            last_error = None;
                            publish_if_changed(&out, state);
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            if last_error.as_ref() != Some(&msg) {
                                warn!(error = %msg, "pod source unreadable; keeping the last good state");
                            }
                            last_error = Some(msg);
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }
}

impl PodAnnotator for FilesSource {
    fn annotate(&self, pod: &Pod, key: &str, value: Option<&str>) -> Result<(), SourceError> {
        let path = self.annotations_file(pod);
        let mut all = self.read_annotations(pod);
        match value {
            Some(v) => all.insert(key.to_string(), v.to_string()),
            None => all.remove(key),
        };
        let body = serde_yaml::to_string(&all).unwrap_or_default();
        write_atomic(&path, body.as_bytes()).map_err(|source| SourceError::Annotate {
            pod: pod.key(),
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_source_loads_and_annotates() {
        let dir = tempfile::tempdir().unwrap();
        let src = FilesSource::new(dir.path());
        std::fs::write(
            src.cluster_file(),
            "namespaces:
- name: foo
  labels: {istio.io/dataplane-mode: ambient}
pods:
- uid: u1
  name: echo
  namespace: foo
  nodeName: node1
  podIPs: [10.244.1.2, 'fd00::2']
  serviceAccountName: echo
",
        )
        .unwrap();
        let s = src.load().unwrap();
        assert_eq!(
            s.namespace_labels("foo").unwrap()["istio.io/dataplane-mode"],
            "ambient"
        );
        let pod = s.pod("foo", "echo").unwrap().clone();
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.service_account, "echo");
        src.annotate(&pod, "ambient.istio.io/redirection", Some("enabled"))
            .unwrap();
        let s = src.load().unwrap();
        assert_eq!(
            s.pod_by_uid("u1").unwrap().annotations["ambient.istio.io/redirection"],
            "enabled"
        );
        src.annotate(&pod, "ambient.istio.io/redirection", None)
            .unwrap();
        assert!(src.load().unwrap().pods[0].annotations.is_empty());
    }

    #[tokio::test]
    async fn as_a_source_it_publishes_changes_and_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        std::fs::write(&file, "namespaces: [{name: foo}]\n").unwrap();
        let (_trigger, drain) = mesh_rt::drain::new();
        let src = FilesSource::new(dir.path()).with_poll(Duration::from_millis(20));
        let mut rx = mesh_rt::source::subscribe(src.clone(), drain)
            .await
            .unwrap();
        assert_eq!(rx.borrow_and_update().namespaces[0].name, "foo");
        let wait = async |rx: &mut watch::Receiver<Arc<ClusterState>>| {
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .expect("no new snapshot")
                .unwrap();
        };
        write_atomic(
            &file,
            b"namespaces: [{name: bar, labels: {istio.io/dataplane-mode: ambient}}]\n",
        )
        .unwrap();
        wait(&mut rx).await;
        assert_eq!(rx.borrow_and_update().namespaces[0].name, "bar");
        // An annotation written back is part of the next snapshot.
        write_atomic(
            &file,
            b"namespaces: [{name: bar}]\npods: [{uid: u1, name: p, namespace: bar}]\n",
        )
        .unwrap();
        wait(&mut rx).await;
        let pod = rx.borrow_and_update().pods[0].clone();
        src.annotate(&pod, "k", Some("v")).unwrap();
        wait(&mut rx).await;
        assert_eq!(rx.borrow_and_update().pods[0].annotations["k"], "v");
        // A broken file is not a new state: the last good one stays.
        std::fs::write(&file, "pods: {not: a list}").unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().pods[0].uid, "u1");
    }

    #[test]
    fn broken_cluster_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let src = FilesSource::new(dir.path());
        let e = src.load().unwrap_err().to_string();
        assert!(e.contains("cluster.yaml"), "{e}");
        std::fs::write(src.cluster_file(), "pods: {not: a list}").unwrap();
        let e = src.load().unwrap_err().to_string();
        assert!(e.contains("not a valid cluster file"), "{e}");
    }
}
