//! The delta ADS client: workloads, services and L4 policies from istiod or istiod-lite.
//!
//! Protocol (Envoy's incremental xDS, as Istio's ztunnel speaks it): one
//! `DeltaAggregatedResources` stream carrying two types, `istio.workload.Address` and
//! `istio.security.Authorization`, each subscribed as a wildcard. Every response is answered
//! by exactly one request with its nonce: an ACK, or a NACK whose `error_detail` names each
//! rejected resource and the field that is wrong. Rejected resources are not applied (the
//! previous version, if any, stays); the rest of the response is.
//!
//! The session loop (ACK/NACK, reconnect, resync) is `mesh_xds::client`, shared with the
//! waypoint; this module is ztunnel's [`Handler`]: Address and Authorization resources →
//! [`StateStore`] changes, through `mesh_proto::convert`.
//!
//! Invariants:
//! - the data plane never loses configuration because the control plane went away: on any
//!   stream error the state is kept, the client reconnects with capped, jittered backoff and
//!   sends `initial_resource_versions` for everything it holds, so the server can send only
//!   what changed and remove what disappeared meanwhile;
//! - readiness (`config`) is released once the first response of every type is applied.

use mesh_proto::{
    convert::{self, AddressResource},
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse},
    istio::{security as pbs, workload as pbw},
    type_url,
};
use mesh_rt::drain::DrainWatcher;
use prost::Message;
use tokio::sync::watch;

pub use mesh_xds::client::{Applied, Handler, Known, Rejected, XdsError, initial_request};

use crate::{
    config::ControlPlane,
    controlplane::Credentials,
    state::{Change, StateStore},
};

/// The types this client subscribes to, in the order they are requested.
pub const TYPES: [&str; 2] = [type_url::ADDRESS, type_url::AUTHORIZATION];

/// Who this ztunnel is, for the control plane (node type `ztunnel`).
pub use mesh_xds::node::NodeInfo;

/// ztunnel's handler: decodes and validates resources, applies them to the state in one batch.
#[derive(Debug, Clone)]
pub struct StateHandler {
    pub state: StateStore,
}

impl Handler for StateHandler {
    fn apply(
        &mut self,
        kind: &str,
        resources: Vec<(String, Vec<u8>)>,
        removed: &[String],
    ) -> Vec<Rejected> {
        let mut changes = Vec::with_capacity(resources.len() + removed.len());
        let mut rejected = Vec::new();
        for (name, body) in resources {
            match decode(kind, &body) {
                Ok(change) => changes.push(change),
                Err(reason) => rejected.push(Rejected { name, reason }),
            }
        }
        for name in removed {
            changes.push(if kind == type_url::ADDRESS {
                Change::RemoveAddress(name.clone())
            } else {
                Change::RemovePolicy(name.clone())
            });
        }
        if !changes.is_empty() {
            self.state.apply(changes);
        }
        rejected
    }
}

/// Decodes, validates and applies one response; returns the ACK/NACK to send.
pub fn handle_response(
    state: &StateStore,
    known: &mut Known,
    resp: DeltaDiscoveryResponse,
) -> (DeltaDiscoveryRequest, Applied) {
    let mut h = StateHandler {
        state: state.clone(),
    };
    mesh_xds::client::handle_response(&mut h, &TYPES, "ztunnel", known, resp)
}

fn decode(kind: &str, body: &[u8]) -> Result<Change, String> {
    if kind == type_url::ADDRESS {
        let a = pbw::Address::decode(body)
            .map_err(|e| format!("not a valid istio.workload.Address: {e}"))?;
        match convert::address_from_proto(a).map_err(|e| e.to_string())? {
            AddressResource::Workload(w) => Ok(Change::Workload(w)),
            AddressResource::Service(s) => Ok(Change::Service(s)),
        }
    } else {
        let a = pbs::Authorization::decode(body)
            .map_err(|e| format!("not a valid istio.security.Authorization: {e}"))?;
        Ok(Change::Policy(
            convert::authorization_from_proto(a).map_err(|e| e.to_string())?,
        ))
    }
}

/// The xDS client task.
pub struct XdsClient {
    pub endpoint: ControlPlane,
    pub credentials: Credentials,
    pub node: NodeInfo,
    pub state: StateStore,
    /// Set to true once every type has been applied at least once.
    pub synced: watch::Sender<bool>,
}

impl XdsClient {
    /// Runs until drained, reconnecting as needed.
    pub async fn run(self, drain: DrainWatcher) {
        mesh_xds::Client {
            endpoint: self.endpoint,
            credentials: self.credentials,
            node: self.node.to_node("ztunnel", &[]),
            types: TYPES.to_vec(),
            who: "ztunnel",
            handler: StateHandler { state: self.state },
            synced: self.synced,
        }
        .run(drain)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::envoy::service::discovery::v3::Resource;

    fn any(kind: &str, bytes: Vec<u8>) -> Option<prost_types::Any> {
        Some(prost_types::Any {
            type_url: kind.to_owned(),
            value: bytes,
        })
    }

    fn workload(uid: &str, ip: [u8; 4]) -> Resource {
        let w = pbw::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "foo".into(),
            addresses: vec![ip.to_vec()],
            tunnel_protocol: pbw::TunnelProtocol::Hbone as i32,
            service_account: "sa".into(),
            ..Default::default()
        };
        let a = pbw::Address {
            r#type: Some(pbw::address::Type::Workload(w)),
        };
        Resource {
            name: uid.into(),
            resource: any(type_url::ADDRESS, a.encode_to_vec()),
            ..Default::default()
        }
    }

    #[test]
    fn bad_resources_are_nacked_by_name_and_the_rest_applied() {
        let state = StateStore::default();
        let mut known = Known::default();
        let mut bad = workload("bad", [10, 0, 0, 2]);
        if let Some(a) = bad.resource.as_mut() {
            let mut w = pbw::Address::decode(a.value.as_slice()).unwrap();
            if let Some(pbw::address::Type::Workload(w)) = w.r#type.as_mut() {
                w.addresses = vec![vec![1, 2, 3]];
            }
            a.value = w.encode_to_vec();
        }
        let garbage = Resource {
            name: "garbage".into(),
            resource: any(type_url::ADDRESS, vec![0xff, 0xff, 0xff]),
            ..Default::default()
        };
        let (ack, applied) = handle_response(
            &state,
            &mut known,
            DeltaDiscoveryResponse {
                type_url: type_url::ADDRESS.into(),
                nonce: "n1".into(),
                resources: vec![workload("good", [10, 0, 0, 1]), bad, garbage],
                ..Default::default()
            },
        );
        assert_eq!(ack.response_nonce, "n1");
        let detail = ack.error_detail.expect("a NACK");
        assert!(
            detail.message.contains("bad: workload.addresses[0]"),
            "{}",
            detail.message
        );
        assert!(
            detail.message.contains("garbage: not a valid"),
            "{}",
            detail.message
        );
        assert_eq!(applied.updated, 1);
        assert!(state.read(|s| s.workload_by_uid("good").is_some()));
        assert!(state.read(|s| s.workload_by_uid("bad").is_none()));
        assert_eq!(known.names(type_url::ADDRESS).count(), 1);

        // A removal is applied and forgotten; the next response is a clean ACK.
        let (ack, applied) = handle_response(
            &state,
            &mut known,
            DeltaDiscoveryResponse {
                type_url: type_url::ADDRESS.into(),
                nonce: "n2".into(),
                removed_resources: vec!["good".into()],
                ..Default::default()
            },
        );
        assert!(ack.error_detail.is_none());
        assert_eq!(applied.removed, 1);
        assert!(state.read(|s| s.workload_by_uid("good").is_none()));
        assert_eq!(known.names(type_url::ADDRESS).count(), 0);
    }

    #[test]
    fn unknown_types_and_mismatched_bodies_are_refused() {
        let state = StateStore::default();
        let mut known = Known::default();
        let (ack, _) = handle_response(
            &state,
            &mut known,
            DeltaDiscoveryResponse {
                type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
                nonce: "x".into(),
                ..Default::default()
            },
        );
        assert!(
            ack.error_detail
                .unwrap()
                .message
                .contains("not one this ztunnel")
        );
        let mut r = workload("w", [10, 0, 0, 1]);
        r.resource.as_mut().unwrap().type_url = type_url::AUTHORIZATION.into();
        let (ack, applied) = handle_response(
            &state,
            &mut known,
            DeltaDiscoveryResponse {
                type_url: type_url::ADDRESS.into(),
                nonce: "y".into(),
                resources: vec![r],
                ..Default::default()
            },
        );
        assert!(
            ack.error_detail
                .unwrap()
                .message
                .contains("w: resource of type")
        );
        assert_eq!(applied.updated, 0);
    }

    #[test]
    fn reconnect_announces_what_is_held() {
        let state = StateStore::default();
        let mut known = Known::default();
        handle_response(
            &state,
            &mut known,
            DeltaDiscoveryResponse {
                type_url: type_url::ADDRESS.into(),
                resources: vec![workload("a", [10, 0, 0, 1]), workload("b", [10, 0, 0, 2])],
                ..Default::default()
            },
        );
        let node = NodeInfo {
            instance_ip: "10.0.0.5".into(),
            pod_name: "ztunnel-x".into(),
            pod_namespace: "istio-system".into(),
            node_name: "node-a".into(),
            cluster_id: "Kubernetes".into(),
        }
        .to_node("ztunnel", &[]);
        assert_eq!(
            node.id,
            "ztunnel~10.0.0.5~ztunnel-x.istio-system~istio-system.svc.cluster.local"
        );
        let req = initial_request(&node, type_url::ADDRESS, &known);
        assert!(req.resource_names_subscribe.is_empty(), "wildcard");
        let mut names: Vec<_> = req.initial_resource_versions.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert!(
            initial_request(&node, type_url::AUTHORIZATION, &known)
                .initial_resource_versions
                .is_empty()
        );
    }
}
