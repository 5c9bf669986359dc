//! Where objects come from, behind one seam: the workspace-wide [`Source`] trait
//! (`mesh_rt::source`, which the CNI node agent implements too) with a complete [`Index`] as
//! its snapshot, published first once everything has been read (only then does `start`
//! return), then after every change. Two sources implement it:
//!
//! - [`ManifestDir`]: a directory of Kubernetes manifests, read as `kubectl apply -f DIR`
//!   would read it (every `*.yaml`/`*.yml`, multi-document), re-read whenever a file in it
//!   changes;
//! - [`crate::k8s::Kubernetes`]: kube-rs watches on a real API server.
//!
//! Bad input never stops the rest: a document that is not YAML, not a Kubernetes object, or
//! an object that does not parse as its kind is reported (file, document, kind, name and the
//! field) in [`Index::rejected`] and skipped; kinds the control plane does not use are
//! ignored silently. HTTPRoute, GRPCRoute, RequestAuthentication, DestinationRule and
//! AuthorizationPolicy are also kept verbatim for waypoints ([`crate::index::KubeObject`]).

use std::{
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
        let first = load_dir(&self.dir).map_err(|source| SourceError::Manifests {
            dir: self.dir.display().to_string(),
            source,
        })?;
        for r in &first.rejected {
            warn!(rejected = %r, "manifest skipped");
        }
        out.send_replace(Arc::new(first));
        tokio::spawn(
            watch_dir(self.dir, self.poll, out, drain).instrument(info_span!("manifests")),
        );
        Ok(())
    }
}

/// Reads every manifest in `dir` into a fresh index.
pub fn load_dir(dir: &Path) -> Result<Index, std::io::Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut objects = Vec::new();
    let mut rejected = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        let (o, r) = parse_manifests(&f.display().to_string(), &text);
        objects.extend(o);
        rejected.extend(r);
    }
    Ok(Index::reset(objects, rejected))
}

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

/// Newest modification time of the directory and its manifests (a cheap change check).
fn stamp(dir: &Path) -> Option<SystemTime> {
    let mut newest = std::fs::metadata(dir).and_then(|m| m.modified()).ok();
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
            newest = newest.max(Some(t));
        }
    }
    newest
}

/// Watches `dir`, publishing a fresh index after every change. A directory that cannot be
/// read keeps the last good index.
pub async fn watch_dir(
    dir: PathBuf,
    every: Duration,
    out: watch::Sender<Arc<Index>>,
    drain: mesh_rt::drain::DrainWatcher,
) {
    let mut last = stamp(&dir);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = drain.signaled() => return,
        }
        let now = stamp(&dir);
        if now == last {
            continue;
        }
        last = now;
        match load_dir(&dir) {
            Ok(idx) => {
                for r in &idx.rejected {
                    warn!(rejected = %r, "manifest skipped");
                }
                info!(dir = %dir.display(), pods = idx.pods.len(), services = idx.services.len(),
                    policies = idx.authorization_policies.len(), "manifests reloaded");
                out.send_replace(Arc::new(idx));
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
}
