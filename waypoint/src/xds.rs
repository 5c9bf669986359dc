//! The waypoint's configuration from the control plane: delta ADS (the client shared with
//! ztunnel, `mesh_xds`) subscribed as a wildcard to `istio.workload.Address` and
//! `mesh.config.v1.KubeObject`.
//!
//! - Address resources are converted exactly as ztunnel converts them
//!   (`mesh_proto::convert`), so both proxies see the same workloads and services;
//! - every KubeObject body (the object's JSON) goes through [`crate::objects::parse_object`],
//!   the same function the local file uses; routes are also compiled here, so a route the
//!   waypoint could not serve is refused now rather than silently dropped later;
//! - a refused resource is NACKed by name (`<kind>/<ns>/<name>: field: reason`), listed
//!   under `rejected` in `/config_dump`, and its previous version (if any) stays in force;
//! - after every response the [`Snapshot`] is rebuilt from everything held and swapped in
//!   whole, so the proxy never sees half a push.
//!
//! The node id follows Istio's waypoint (`pilot-agent proxy waypoint`: node type `waypoint`,
//! not the `router` of Istio's other gateways):
//! `waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`; the node's cluster is `<gateway>.<ns>`,
//! as Istio's `--serviceCluster`.

use std::collections::BTreeMap;

use mesh_core::workload::{Service, Workload};
use mesh_proto::{
    convert::{self, AddressResource},
    envoy::service::discovery::v3::Node,
    istio::workload as pbw,
    mesh::config::v1 as pbm,
    type_url,
};
use mesh_xds::{Handler, Rejected};
use prost::Message;
use tracing::{debug, warn};

use crate::{
    objects::{KubeObject, parse_object},
    route,
    state::{Snapshot, Store, WaypointId},
};

/// The types the waypoint subscribes to, in the order they are requested.
pub const TYPES: [&str; 2] = [type_url::ADDRESS, type_url::KUBE_OBJECT];

/// Who this waypoint is, for the control plane.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// What every mesh proxy reports (pod, namespace, IP, node, cluster id).
    #[serde(flatten)]
    pub proxy: mesh_xds::NodeInfo,
    pub service_account: String,
    /// The Gateway this waypoint serves.
    pub gateway_name: String,
}

impl NodeInfo {
    /// Istio's node id for a waypoint, and metadata like ztunnel's plus the Gateway.
    pub fn to_node(&self) -> Node {
        let extra = [
            ("SERVICE_ACCOUNT", self.service_account.as_str()),
            ("GATEWAY_NAME", self.gateway_name.as_str()),
        ];
        Node {
            cluster: format!("{}.{}", self.gateway_name, self.proxy.pod_namespace),
            ..self.proxy.to_node("waypoint", &extra)
        }
    }
}

/// Everything received, by resource name, and the snapshot built from it.
#[derive(Debug)]
pub struct WaypointHandler {
    waypoint: WaypointId,
    store: Store,
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    objects: BTreeMap<String, KubeObject>,
    /// Resource name → why its latest version was refused.
    rejected: BTreeMap<String, String>,
}

impl WaypointHandler {
    pub fn new(waypoint: WaypointId, store: Store) -> Self {
        WaypointHandler {
            waypoint,
            store,
            workloads: BTreeMap::new(),
            services: BTreeMap::new(),
            objects: BTreeMap::new(),
            rejected: BTreeMap::new(),
        }
    }

    /// The snapshot for what is held now.
    pub fn snapshot(&self) -> Snapshot {
        let mesh = ztunnel::state::State::from_parts(
            self.workloads.values().cloned().collect(),
            self.services.values().cloned().collect(),
            Vec::new(),
        );
        let errors = self
            .rejected
            .iter()
            .map(|(n, e)| format!("{n}: {e}"))
            .collect();
        Snapshot::build(
            self.waypoint.clone(),
            mesh,
            self.objects.values().cloned().collect(),
            errors,
        )
    }

    fn address(&mut self, name: &str, body: &[u8]) -> Result<(), String> {
        let a = pbw::Address::decode(body)
            .map_err(|e| format!("not a valid istio.workload.Address: {e}"))?;
        match convert::address_from_proto(a).map_err(|e| e.to_string())? {
            AddressResource::Workload(w) => {
                self.services.remove(name);
                self.workloads.insert(name.to_owned(), w);
            }
            AddressResource::Service(s) => {
                self.workloads.remove(name);
                self.services.insert(name.to_owned(), s);
            }
        }
        Ok(())
    }

    fn object(&mut self, name: &str, body: &[u8]) -> Result<(), String> {
        let o = pbm::KubeObject::decode(body)
            .map_err(|e| format!("not a valid mesh.config.v1.KubeObject: {e}"))?;
        let json: serde_json::Value =
            serde_json::from_slice(&o.json).map_err(|e| format!("json: not a JSON object: {e}"))?;
        let value = serde_yaml::to_value(&json).map_err(|e| format!("json: {e}"))?;
        let parsed = parse_object(&value).map_err(|e| e.to_string())?;
        let Some(obj) = parsed else {
            // A kind the waypoint does not act on: held (so the server's view matches), unused.
            self.objects.remove(name);
            return Ok(());
        };
        match &obj {
            KubeObject::HttpRoute(r) => route::validate_http(r)
                .map_err(|(f, e)| format!("HTTPRoute {}: {f}: {e}", r.key()))?,
            KubeObject::GrpcRoute(r) => route::validate_grpc(r)
                .map_err(|(f, e)| format!("GRPCRoute {}: {f}: {e}", r.key()))?,
            _ => {}
        }
        self.objects.insert(name.to_owned(), obj);
        Ok(())
    }
}

impl Handler for WaypointHandler {
    fn apply(
        &mut self,
        kind: &str,
        resources: Vec<(String, Vec<u8>)>,
        removed: &[String],
    ) -> Vec<Rejected> {
        let mut out = Vec::new();
        for (name, body) in resources {
            let r = if kind == type_url::ADDRESS {
                self.address(&name, &body)
            } else {
                self.object(&name, &body)
            };
            match r {
                Ok(()) => {
                    self.rejected.remove(&name);
                }
                Err(reason) => {
                    warn!(resource = %name, error = %reason, "resource refused; its previous version (if any) stays");
                    self.rejected.insert(name.clone(), reason.clone());
                    out.push(Rejected { name, reason });
                }
            }
        }
        for name in removed {
            self.rejected.remove(name);
            if kind == type_url::ADDRESS {
                self.workloads.remove(name);
                self.services.remove(name);
            } else {
                self.objects.remove(name);
            }
        }
        let snap = self.snapshot();
        debug!(
            type_url = kind,
            workloads = self.workloads.len(),
            services = self.services.len(),
            objects = self.objects.len(),
            rejected = snap.errors.len(),
            "configuration rebuilt"
        );
        self.store.replace(snap);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource};
    use mesh_xds::Known;

    fn object(kind: &str, api: &str, name: &str, json: serde_json::Value) -> Resource {
        let o = pbm::KubeObject {
            api_version: api.into(),
            kind: kind.into(),
            namespace: "foo".into(),
            name: name.into(),
            json: json.to_string().into_bytes(),
        };
        Resource {
            name: format!("{kind}/foo/{name}"),
            resource: Some(prost_types::Any {
                type_url: type_url::KUBE_OBJECT.into(),
                value: o.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn route(name: &str, method: &str) -> Resource {
        object(
            "HTTPRoute",
            "gateway.networking.k8s.io/v1",
            name,
            serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": name, "namespace": "foo"},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                         "rules": [{"matches": [{"method": method}]}]},
            }),
        )
    }

    fn handler() -> (WaypointHandler, Store) {
        let store = Store::default();
        let id = WaypointId {
            name: "waypoint".into(),
            namespace: "foo".into(),
            identity: "spiffe://cluster.local/ns/foo/sa/waypoint".parse().unwrap(),
        };
        (WaypointHandler::new(id, store.clone()), store)
    }

    fn push(
        h: &mut WaypointHandler,
        known: &mut Known,
        resources: Vec<Resource>,
        removed: &[&str],
    ) -> Option<String> {
        let (ack, _) = mesh_xds::client::handle_response(
            h,
            &TYPES,
            "waypoint",
            known,
            DeltaDiscoveryResponse {
                type_url: type_url::KUBE_OBJECT.into(),
                nonce: "n".into(),
                resources,
                removed_resources: removed.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        );
        ack.error_detail.map(|e| e.message)
    }

    #[test]
    fn a_bad_object_is_nacked_by_name_keeps_its_old_version_and_the_rest_applies() {
        let (mut h, store) = handler();
        let mut known = Known::default();
        assert_eq!(push(&mut h, &mut known, vec![route("r", "GET")], &[]), None);
        assert_eq!(store.get().routes.len(), 1);
        let policy = object(
            "AuthorizationPolicy",
            "security.istio.io/v1",
            "p",
            serde_json::json!({
                "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "p", "namespace": "foo"},
                "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]},
            }),
        );
        let nack = push(
            &mut h,
            &mut known,
            vec![route("r", "NOT A METHOD"), policy],
            &[],
        )
        .expect("a NACK");
        assert!(nack.starts_with("HTTPRoute/foo/r: "), "{nack}");
        assert!(nack.contains("spec.rules[0].matches[0].method"), "{nack}");
        let s = store.get();
        assert_eq!(s.routes.len(), 1, "the previous version stays");
        assert_eq!(s.policies.authorization_policies.len(), 1);
        assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
        // Deleting the route removes it and its rejection.
        assert_eq!(push(&mut h, &mut known, vec![], &["HTTPRoute/foo/r"]), None);
        let s = store.get();
        assert!(s.routes.is_empty());
        assert!(s.errors.is_empty());
        assert_eq!(known.names(type_url::KUBE_OBJECT).count(), 1);
    }

    #[test]
    fn node_id_is_istios_waypoint_shape() {
        let n = NodeInfo {
            proxy: mesh_xds::NodeInfo {
                instance_ip: "10.0.0.9".into(),
                pod_name: "waypoint-abc".into(),
                pod_namespace: "foo".into(),
                node_name: "n".into(),
                cluster_id: "Kubernetes".into(),
            },
            service_account: "waypoint".into(),
            gateway_name: "waypoint".into(),
        }
        .to_node();
        assert_eq!(
            n.id,
            "waypoint~10.0.0.9~waypoint-abc.foo~foo.svc.cluster.local"
        );
    }
}
