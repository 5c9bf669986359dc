//! Where objects come from, behind one seam: the workspace-wide [`Source`] trait
//! (`mesh_rt::source`, which the CNI node agent implements too) with a complete [`Index`] as
//! its snapshot, published first once everything has been read (only then does `start`
//! return), then after every change. Two sources implement it:
//!
//! - [`ManifestDir`]: a directory of Kubernetes manifests, read as `kubectl apply -f DIR`
//!   would read it (every `*.yaml`/`*.yml`, multi-document). Polled: only files whose
//!   modification time, size or inode changed are parsed again, and only the objects they
//!   held or hold are applied again ([`DirState`]), giving exactly the index a full read
//!   would; the new index is published without copying the old one;
//! - [`crate::k8s::Kubernetes`]: kube-rs watches on a real API server.
//!
//! Bad input never stops the rest: a document that is not YAML, not a Kubernetes object, or
//! an object that does not parse as its kind is reported (file, document, kind, name and the
//! field) in [`Index::rejected`] and skipped; kinds the control plane does not use are
//! ignored silently. HTTPRoute, GRPCRoute, RequestAuthentication, DestinationRule and
//! AuthorizationPolicy are also kept verbatim for waypoints ([`crate::index::KubeObject`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use std::sync::Arc;

use mesh_rt::drain::DrainWatcher;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use crate::index::{Index, Object};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading manifests in {dir}: {source} (MANIFESTS_DIR must be a readable directory)")]
    Manifests { dir: String, source: std::io::Error },
    #[error(transparent)]
    Kubernetes(#[from] crate::k8s::K8sError),
    #[error("shut down before the initial listing completed")]
    Stopped,
}

pub use mesh_rt::source::Source;

/// A directory of manifests, polled for changes.
#[derive(Debug, Clone)]
pub struct ManifestDir {
    pub dir: PathBuf,
    pub poll: Duration,
}

impl Source for ManifestDir {
    type State = Index;
    type Error = SourceError;

    async fn start(
        self,
        out: watch::Sender<Arc<Index>>,
        drain: DrainWatcher,
    ) -> Result<(), SourceError> {
        let mut state = DirState::default();
        state
            .refresh(&self.dir)
            .map_err(|source| SourceError::Manifests {
                dir: self.dir.display().to_string(),
                source,
            })?;
        for r in &state.index.rejected {
            warn!(rejected = %r, "manifest skipped");
        }
        out.send_replace(Arc::new(state.index.clone()));
        tokio::spawn(
            watch_dir(self.dir, self.poll, state, out, drain).instrument(info_span!("manifests")),
        );
        Ok(())
    }
}

/// Reads every manifest in `dir` into a fresh index.
pub fn load_dir(dir: &Path) -> Result<Index, std::io::Error> {
    let mut d = DirState::default();
    d.refresh(dir)?;
    Ok(d.index)
}

/// What identifies a file's content without reading it: modification time, size, inode (a
/// rename replaces the inode).
type Stamp = (Option<SystemTime>, u64, u64);

fn file_stamp(m: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (m.modified().ok(), m.len(), m.ino())
}

/// One manifest file as last read: the kinds and keys of its objects, and its rejections.
/// The objects themselves live in the index only (they are read again in the rare case
/// that another file's change needs them).
#[derive(Debug)]
struct Parsed {
    stamp: Stamp,
    keys: Vec<(&'static str, String)>,
    rejected: Vec<String>,
}

/// What a read found changed: the kinds and keys to apply again, and the objects of every
/// file that holds one of them, by path (so in the order files are applied).
#[derive(Debug)]
struct Pending {
    affected: Affected,
    objects: BTreeMap<PathBuf, Vec<Object>>,
}

/// The directory as last read, file by file, and the index built from it. A refresh parses
/// only the files whose stamp changed and re-applies only the objects whose kind and key one
/// of them held (before or after), so the index is what reading everything again gives
/// (files in name order, a later object of the same kind and key wins) at the cost of what
/// changed.
#[derive(Debug, Default)]
pub struct DirState {
    files: BTreeMap<PathBuf, Parsed>,
    pub index: Index,
}

fn read_file(p: &Path) -> Result<(Vec<Object>, Vec<String>), std::io::Error> {
    let text = std::fs::read_to_string(p)?;
    Ok(parse_manifests(&p.display().to_string(), &text))
}

impl DirState {
    /// Re-reads what changed in `dir`; returns whether anything did. On an I/O error nothing
    /// is changed.
    pub fn refresh(&mut self, dir: &Path) -> Result<bool, std::io::Error> {
        let Some(pending) = self.read(dir)? else {
            return Ok(false);
        };
        let mut index = std::mem::take(&mut self.index);
        self.reapply(&mut index, &pending);
        self.index = index;
        Ok(true)
    }

    /// Re-reads the files that changed (and the unchanged ones that hold one of their kinds
    /// and keys); None if nothing changed. On an I/O error nothing is changed.
    fn read(&mut self, dir: &Path) -> Result<Option<Pending>, std::io::Error> {
        let mut listed: Vec<(PathBuf, Stamp)> = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let p = e?.path();
            if !p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                continue;
            }
            let m = std::fs::metadata(&p)?;
            listed.push((p, file_stamp(&m)));
        }
        let mut fresh: Vec<(PathBuf, Stamp, Vec<Object>, Vec<String>)> = Vec::new();
        for (p, st) in &listed {
            if self.files.get(p).map(|f| f.stamp) == Some(*st) {
                continue;
            }
            let (objects, rejected) = read_file(p)?;
            fresh.push((p.clone(), *st, objects, rejected));
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !listed.iter().any(|(l, _)| l == *p))
            .cloned()
            .collect();
        if fresh.is_empty() && gone.is_empty() {
            return Ok(None);
        }
        let mut affected = Affected::new();
        let changed: HashSet<&PathBuf> = fresh.iter().map(|f| &f.0).chain(&gone).collect();
        for p in &changed {
            for (k, key) in self.files.get(*p).iter().flat_map(|f| &f.keys) {
                affected.entry(k).or_default().insert(key.clone());
            }
        }
        for o in fresh.iter().flat_map(|f| &f.2) {
            affected.entry(o.kind()).or_default().insert(o.key());
        }
        // The same object in an unchanged file too: read it again, to apply in file order.
        let mut objects = BTreeMap::new();
        for (p, f) in &self.files {
            let holds =
                |(k, key): &(&str, String)| affected.get(k).is_some_and(|s| s.contains(key));
            if !changed.contains(p) && f.keys.iter().any(holds) {
                objects.insert(p.clone(), read_file(p)?.0);
            }
        }
        for p in &gone {
            self.files.remove(p);
        }
        for (p, stamp, objs, rejected) in fresh {
            let keys = objs.iter().map(|o| (o.kind(), o.key())).collect();
            self.files.insert(
                p.clone(),
                Parsed {
                    stamp,
                    keys,
                    rejected,
                },
            );
            objects.insert(p, objs);
        }
        Ok(Some(Pending { affected, objects }))
    }

    /// Brings `index` (as of before the last read) up to date with the files.
    fn reapply(&self, index: &mut Index, pending: &Pending) {
        let affected = &pending.affected;
        for (kind, keys) in affected {
            for key in keys {
                index.delete(kind, key);
            }
        }
        for o in pending.objects.values().flatten() {
            if affected.get(o.kind()).is_some_and(|k| k.contains(&o.key())) {
                index.apply(o.clone());
            }
        }
        index.rejected = self
            .files
            .values()
            .flat_map(|f| f.rejected.iter().cloned())
            .collect();
    }

    /// Re-reads what changed and publishes the new index on `out` without copying it: the
    /// index published before comes back from the channel and, once nobody else holds it, is
    /// brought up to date as the next working copy (otherwise it is copied). Returns whether
    /// anything changed.
    pub fn refresh_and_publish(
        &mut self,
        dir: &Path,
        out: &watch::Sender<Arc<Index>>,
    ) -> Result<bool, std::io::Error> {
        let Some(pending) = self.read(dir)? else {
            return Ok(false);
        };
        let mut index = std::mem::take(&mut self.index);
        self.reapply(&mut index, &pending);
        let published = Arc::new(index);
        let previous = out.send_replace(published.clone());
        self.index = match Arc::try_unwrap(previous) {
            Ok(mut old) => {
                self.reapply(&mut old, &pending);
                old
            }
            Err(_) => (*published).clone(),
        };
        Ok(true)
    }
}

/// Kind → keys whose objects must be applied again.
type Affected = HashMap<&'static str, HashSet<String>>;

/// Parses multi-document YAML into objects and one rejection line per bad document.
pub fn parse_manifests(file: &str, text: &str) -> (Vec<Object>, Vec<String>) {
    let mut objects = Vec::new();
    let mut rejected = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = format!("{file} (document {})", i + 1);
        let value = match serde::Deserialize::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                rejected.push(format!("{at}: not valid YAML: {e}"));
                // A syntax error ends the stream; nothing after it can be trusted.
                break;
            }
        };
        match parse_object(&at, value) {
            Ok(o) => objects.extend(o),
            Err(e) => rejected.push(e),
        }
    }
    (objects, rejected)
}

fn api_group_is(value: &serde_yaml::Value, group: &str) -> bool {
    value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .is_some_and(|v| v.strip_prefix(group).is_some_and(|r| r.starts_with('/')))
}

fn verbatim(what: &str, value: &serde_yaml::Value) -> Result<Object, String> {
    let json = serde_json::to_value(value).map_err(|e| format!("{what}: {e}"))?;
    crate::index::KubeObject::from_value(what, json).map(Object::Kube)
}

fn parse_object(at: &str, value: serde_yaml::Value) -> Result<Vec<Object>, String> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| format!("{at}: not a Kubernetes object (no kind)"))?
        .to_owned();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("")
        .to_owned();
    let what = format!("{at}: {kind} {name:?}");
    let typed = |e: serde_yaml::Error| format!("{what}: {e}");
    Ok(match kind.as_str() {
        "Namespace" => vec![Object::Namespace(
            serde_yaml::from_value(value).map_err(typed)?,
        )],
        "Pod" => vec![Object::Pod(serde_yaml::from_value(value).map_err(typed)?)],
        "Service" => {
            let raw = verbatim(&what, &value)?;
            vec![
                Object::Service(serde_yaml::from_value(value).map_err(typed)?),
                raw,
            ]
        }
        "AuthorizationPolicy" | "PeerAuthentication" => {
            let text = serde_yaml::to_string(&value).map_err(typed)?;
            let set = mesh_policy::parse_objects(at, &text).map_err(|e| e.to_string())?;
            if let Some(p) = set.authorization_policies.into_iter().next() {
                vec![Object::AuthorizationPolicy(p), verbatim(&what, &value)?]
            } else if let Some(p) = set.peer_authentications.into_iter().next() {
                vec![Object::PeerAuthentication(p)]
            } else {
                return Err(format!("{what}: not a security.istio.io object"));
            }
        }
        "Gateway" if api_group_is(&value, crate::k8s::GATEWAY_GROUP) => {
            vec![Object::Gateway(
                serde_yaml::from_value(value).map_err(typed)?,
            )]
        }
        "HTTPRoute" | "GRPCRoute" if api_group_is(&value, crate::k8s::GATEWAY_GROUP) => {
            vec![verbatim(&what, &value)?]
        }
        "RequestAuthentication" if api_group_is(&value, crate::k8s::SECURITY_GROUP) => {
            vec![verbatim(&what, &value)?]
        }
        "DestinationRule" if api_group_is(&value, crate::k8s::NETWORKING_GROUP) => {
            vec![verbatim(&what, &value)?]
        }
        _ => vec![],
    })
}

/// Watches `dir`, publishing a fresh index after every change. A directory that cannot be
/// read keeps the last good index.
pub async fn watch_dir(
    dir: PathBuf,
    every: Duration,
    mut state: DirState,
    out: watch::Sender<Arc<Index>>,
    drain: mesh_rt::drain::DrainWatcher,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = drain.signaled() => return,
        }
        match state.refresh_and_publish(&dir, &out) {
            Ok(false) => {}
            Ok(true) => {
                let idx = out.borrow().clone();
                for r in &idx.rejected {
                    warn!(rejected = %r, "manifest skipped");
                }
                info!(dir = %dir.display(), pods = idx.pods.len(), services = idx.services.len(),
                    policies = idx.authorization_policies.len(), "manifests reloaded");
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read manifests; keeping the last ones")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_documents_are_named_and_the_rest_kept() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: foo}
spec: {containers: "not a list"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: foo}
spec: {action: DENY, rules: [{from: [{source: {principal: [x]}}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: foo}
spec: {selector: {app: echo}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: foo}
spec: {parentRefs: [{kind: Service, group: "", name: echo}]}
status: {parents: []}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec: {host: echo}
---
apiVersion: example.com/v1
kind: HTTPRoute
metadata: {name: not-gateway-api}
"#;
        let (objs, rejected) = parse_manifests("m.yaml", text);
        let kinds: Vec<_> = objs.iter().map(Object::kind).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "Service",
                "Service",
                "HTTPRoute",
                "DestinationRule"
            ],
            "a Service is also kept verbatim"
        );
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(
            rejected[0].contains("m.yaml (document 2): Pod \"broken\""),
            "{}",
            rejected[0]
        );
        assert!(rejected[1].contains("principal"), "{}", rejected[1]);
        let Object::Kube(svc) = &objs[2] else {
            panic!()
        };
        assert_eq!(svc.resource_name(), "Service/foo/echo");
        let Object::Kube(route) = &objs[3] else {
            panic!()
        };
        assert_eq!(route.resource_name(), "HTTPRoute/foo/echo");
        assert!(!route.json.contains("status"), "{}", route.json);
        let Object::Kube(dr) = &objs[4] else { panic!() };
        assert_eq!(dr.resource_name(), "DestinationRule/default/echo");
    }

    /// Random rewrites, additions and removals of files, with the same objects in several
    /// files: after each refresh the index is exactly what reading everything again gives.
    #[test]
    fn a_refresh_equals_a_full_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut state = DirState::default();
        let (out, _rx) = watch::channel(Arc::new(Index::default()));
        for step in 0..150 {
            let file = dir.path().join(format!("f{}.yaml", next(5)));
            if next(4) == 0 {
                let _ = std::fs::remove_file(&file);
            } else {
                let mut text = String::new();
                for _ in 0..next(4) {
                    let (n, ip, app) = (next(6), next(3), next(2));
                    text.push_str(&match next(4) {
                        0 => format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{n}, labels: {{v: \"{ip}\"}}}}\n"),
                        1 => format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{n}, namespace: a}}\nspec: {{clusterIP: 10.96.0.{ip}, selector: {{app: a{app}}}}}\n"),
                        2 => "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: a}\nspec: {containers: 1}\n".to_owned(),
                        _ => format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: p{n}, namespace: a, labels: {{app: a{app}}}}}\nstatus: {{podIP: 10.0.0.{ip}}}\n"),
                    });
                    text.push_str("---\n");
                }
                // Replaced as editors and kubectl-style tools do: a new file renamed over it.
                let tmp = dir.path().join("tmp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, &file).unwrap();
            }
            // Sometimes someone still holds the published index: it is copied instead.
            let held = (step % 7 == 0).then(|| out.borrow().clone());
            state.refresh_and_publish(dir.path(), &out).unwrap();
            drop(held);
            let full = format!("{:?}", load_dir(dir.path()).unwrap());
            assert_eq!(format!("{:?}", state.index), full, "step {step}");
            assert_eq!(format!("{:?}", **out.borrow()), full, "step {step}");
        }
    }
}
