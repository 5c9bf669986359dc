//! The in-memory model of what users applied, by kind: apply, delete and reset.
//!
//! Sources (the manifest directory, Kubernetes watches) feed it objects; the translation
//! reads it. Nothing here knows about xDS. Objects are keyed `namespace/name`
//! (namespaces by name). An object a source could not read never reaches the index; the
//! source reports it in [`Index::rejected`] with the file and field, and everything else
//! is still applied.
//!
//! Objects the waypoint evaluates itself (routes, Istio policies, DestinationRules) are also
//! kept verbatim as [`KubeObject`]s, keyed `<kind>/<namespace>/<name>`, to be sent as they are.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use mesh_policy::model::{AuthorizationPolicy, PeerAuthentication};

use crate::waypoint::Gateway;

/// The kinds sent verbatim to waypoints (`mesh.config.v1.KubeObject`). Services too: their
/// port names and `appProtocol` tell the waypoint HTTP from TCP (docs/waypoint.md).
pub const KUBE_KINDS: [&str; 6] = [
    "Service",
    "HTTPRoute",
    "GRPCRoute",
    "AuthorizationPolicy",
    "RequestAuthentication",
    "DestinationRule",
];

/// A Kubernetes object as the user wrote it: its JSON without `status`, without
/// `metadata.managedFields` and without `metadata.resourceVersion` (which changes on every
/// status write: dropping it means a status-only change pushes nothing to waypoints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeObject {
    pub api_version: String,
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub json: String,
}

impl KubeObject {
    /// From an object's JSON; `at` names it in errors. The kind must be one of [`KUBE_KINDS`].
    pub fn from_value(at: &str, mut v: serde_json::Value) -> Result<KubeObject, String> {
        let text =
            |v: &serde_json::Value, f: &str| v.get(f).and_then(|x| x.as_str()).map(str::to_owned);
        let kind = text(&v, "kind").ok_or_else(|| format!("{at}: no kind"))?;
        let kind = KUBE_KINDS
            .into_iter()
            .find(|k| *k == kind)
            .ok_or_else(|| format!("{at}: {kind} is not sent to waypoints"))?;
        let api_version = text(&v, "apiVersion").ok_or_else(|| format!("{at}: no apiVersion"))?;
        let Some(obj) = v.as_object_mut() else {
            return Err(format!("{at}: not an object"));
        };
        obj.remove("status");
        let meta = obj
            .get_mut("metadata")
            .and_then(|m| m.as_object_mut())
            .ok_or_else(|| format!("{at}: no metadata"))?;
        meta.remove("managedFields");
        meta.remove("resourceVersion");
        let name = meta
            .get("name")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("{at}: metadata.name: missing"))?
            .to_owned();
        let namespace = match meta.get("namespace").and_then(|n| n.as_str()) {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => {
                meta.insert("namespace".into(), "default".into());
                "default".to_owned()
            }
        };
        let json = serde_json::to_string(&v).map_err(|e| format!("{at}: {e}"))?;
        Ok(KubeObject {
            api_version,
            kind,
            namespace,
            name,
            json,
        })
    }

    /// `<kind>/<namespace>/<name>`, the xDS resource name.
    pub fn resource_name(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

/// One object of a kind the control plane understands.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(Service),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    Gateway(Gateway),
    /// Kept verbatim for waypoints (an AuthorizationPolicy is both this and parsed).
    Kube(KubeObject),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::PeerAuthentication(_) => "PeerAuthentication",
            Object::Gateway(_) => "Gateway",
            Object::Kube(o) => o.kind,
        }
    }

    /// The object's key in its map (a namespace's is its name).
    pub fn key(&self) -> String {
        match self {
            Object::Namespace(n) => n.metadata.name.clone().unwrap_or_default(),
            Object::Pod(p) => key(p.metadata.namespace.as_deref(), p.metadata.name.as_deref()),
            Object::Service(s) => key(s.metadata.namespace.as_deref(), s.metadata.name.as_deref()),
            Object::AuthorizationPolicy(p) => p.key(),
            Object::PeerAuthentication(p) => p.key(),
            Object::Gateway(g) => key(Some(g.namespace()), Some(g.name())),
            Object::Kube(o) => key(Some(&o.namespace), Some(&o.name)),
        }
    }
}

/// `namespace/name`.
pub fn key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or_default()
    )
}

#[derive(Debug, Clone, Default)]
pub struct Index {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Persistent (structurally shared): cloning the index to publish it, and the
    /// translator's cache of what each pod became, share the pods instead of copying them.
    pub pods: imbl::OrdMap<String, Arc<Pod>>,
    pub services: BTreeMap<String, Service>,
    pub authorization_policies: BTreeMap<String, AuthorizationPolicy>,
    pub peer_authentications: BTreeMap<String, PeerAuthentication>,
    pub gateways: BTreeMap<String, Gateway>,
    /// `<kind>/<namespace>/<name>` → the object as written, for waypoints.
    pub kube_objects: BTreeMap<String, KubeObject>,
    /// Objects a source refused, one line each (`file: kind ns/name: what is wrong`).
    pub rejected: Vec<String>,
}

impl Index {
    pub fn apply(&mut self, obj: Object) {
        match obj {
            Object::Namespace(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                self.namespaces.insert(name, n);
            }
            Object::Pod(p) => {
                let k = key(p.metadata.namespace.as_deref(), p.metadata.name.as_deref());
                self.pods.insert(k, Arc::new(p));
            }
            Object::Service(s) => {
                let k = key(s.metadata.namespace.as_deref(), s.metadata.name.as_deref());
                self.services.insert(k, s);
            }
            Object::AuthorizationPolicy(p) => {
                self.authorization_policies.insert(p.key(), p);
            }
            Object::PeerAuthentication(p) => {
                self.peer_authentications.insert(p.key(), p);
            }
            Object::Gateway(g) => {
                self.gateways
                    .insert(key(Some(g.namespace()), Some(g.name())), g);
            }
            Object::Kube(o) => {
                self.kube_objects.insert(o.resource_name(), o);
            }
        }
    }

    /// Removes the object of `kind` at `key` (a namespace's key is its name).
    pub fn delete(&mut self, kind: &str, key: &str) {
        self.kube_objects.remove(&format!("{kind}/{key}"));
        match kind {
            "Namespace" => {
                self.namespaces.remove(key);
            }
            "Pod" => {
                self.pods.remove(key);
            }
            "Service" => {
                self.services.remove(key);
            }
            "AuthorizationPolicy" => {
                self.authorization_policies.remove(key);
            }
            "PeerAuthentication" => {
                self.peer_authentications.remove(key);
            }
            "Gateway" => {
                self.gateways.remove(key);
            }
            _ => {}
        }
    }

    /// Replaces every object of `kind` with `objects` (a complete listing of that kind).
    pub fn reset_kind(&mut self, kind: &str, objects: Vec<Object>) {
        self.kube_objects.retain(|_, o| o.kind != kind);
        match kind {
            "Namespace" => self.namespaces.clear(),
            "Pod" => self.pods.clear(),
            "Service" => self.services.clear(),
            "AuthorizationPolicy" => self.authorization_policies.clear(),
            "PeerAuthentication" => self.peer_authentications.clear(),
            "Gateway" => self.gateways.clear(),
            _ => {}
        }
        for o in objects.into_iter().filter(|o| o.kind() == kind) {
            self.apply(o);
        }
    }

    /// Replaces everything with a complete listing.
    pub fn reset(objects: Vec<Object>, rejected: Vec<String>) -> Index {
        let mut idx = Index {
            rejected,
            ..Default::default()
        };
        for o in objects {
            idx.apply(o);
        }
        idx
    }

    pub fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces
            .get(ns)
            .and_then(|n| n.metadata.labels.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn apply_replace_delete() {
        let pod = |ip: &str| {
            let mut p = Pod {
                metadata: ObjectMeta {
                    name: Some("p".into()),
                    namespace: Some("foo".into()),
                    ..Default::default()
                },
                ..Default::default()
            };
            p.status = Some(k8s_openapi::api::core::v1::PodStatus {
                pod_ip: Some(ip.into()),
                ..Default::default()
            });
            p
        };
        let mut idx = Index::default();
        idx.apply(Object::Pod(pod("10.0.0.1")));
        idx.apply(Object::Pod(pod("10.0.0.2")));
        assert_eq!(idx.pods.len(), 1);
        assert_eq!(
            idx.pods["foo/p"].status.as_ref().unwrap().pod_ip.as_deref(),
            Some("10.0.0.2")
        );
        idx.delete("Pod", "foo/p");
        assert!(idx.pods.is_empty());
    }

    #[test]
    fn reset_kind_replaces_only_that_kind() {
        let (objs, rejected) = crate::source::parse_manifests(
            "t.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\n",
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let mut idx = Index::reset(objs.clone(), vec![]);
        assert_eq!(objs[1].key(), "a/s");
        idx.reset_kind("Namespace", vec![]);
        assert!(idx.namespaces.is_empty());
        assert_eq!(idx.services.len(), 1, "other kinds untouched");
        idx.services.clear();
        idx.reset_kind("Namespace", objs);
        assert_eq!(idx.namespaces.len(), 1);
        assert!(
            idx.services.is_empty(),
            "objects of other kinds are not applied"
        );
    }
}
