//! Where pod and namespace knowledge comes from: the [`PodSource`] trait, and the
//! files source (`<dir>/cluster.yaml`, annotations in `<dir>/annotations/`) that the netns
//! lab and the tests use in place of the Kubernetes API.
//!
//! Invariants: a source returns the whole current state on every `load()` (the agent
//! reconciles against it, so a missed change is repaired on the next load); the files
//! source reads a file that is replaced atomically (rename), never half-written.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

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

/// Pod and namespace knowledge for the node agent and the plugin. Implemented by the
/// files source here; a Kubernetes watch (pods limited to `spec.nodeName`) implements the
/// same two calls.
pub trait PodSource: Send + Sync + 'static {
    /// The current state: pods (of this node, or all) and every namespace.
    fn load(&self) -> Result<ClusterState, SourceError>;
    /// Sets (`Some`) or removes (`None`) an annotation on a pod.
    fn annotate(&self, pod: &Pod, key: &str, value: Option<&str>) -> Result<(), SourceError>;
}

/// `<dir>/cluster.yaml` (a [`ClusterState`] in YAML), plus one annotations file per pod at
/// `<dir>/annotations/<namespace>.<name>.yaml`, merged into the pod on load.
#[derive(Debug, Clone)]
pub struct FilesSource {
    dir: PathBuf,
}

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> FilesSource {
        FilesSource { dir: dir.into() }
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

impl PodSource for FilesSource {
    fn load(&self) -> Result<ClusterState, SourceError> {
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
