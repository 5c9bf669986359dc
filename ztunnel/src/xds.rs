//! The delta ADS client: workloads, services and L4 policies from istiod or istiod-lite.
//!
//! Protocol (Envoy's incremental xDS, as Istio's ztunnel speaks it): one
//! `DeltaAggregatedResources` stream carrying two types, `istio.workload.Address` and
//! `istio.security.Authorization`, each subscribed as a wildcard. Every response is answered
//! by exactly one request with its nonce: an ACK, or a NACK whose `error_detail` names each
//! rejected resource and the field that is wrong. Rejected resources are not applied (the
//! previous version, if any, stays); the rest of the response is.
//!
//! Invariants:
//! - the data plane never loses configuration because the control plane went away: on any
//!   stream error the state is kept, the client reconnects with capped, jittered backoff and
//!   sends `initial_resource_versions` for everything it holds, so the server can send only
//!   what changed and remove what disappeared meanwhile;
//! - readiness (`config`) is released once the first response of every type is applied.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use mesh_proto::{
    convert::{self, AddressResource},
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    istio::{security as pbs, workload as pbw},
    type_url,
};
use mesh_rt::drain::DrainWatcher;
use prost::Message;
use prost_types::{Struct, Value, value::Kind};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    config::ControlPlane,
    controlplane::{self, ControlPlaneError, Credentials},
    state::{Change, StateStore},
};

/// The types this client subscribes to, in the order they are requested.
pub const TYPES: [&str; 2] = [type_url::ADDRESS, type_url::AUTHORIZATION];

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// gRPC INVALID_ARGUMENT, the code a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error(
        "control plane refused the stream: {0} (check XDS_ADDRESS, that the control plane is up, and the service-account token)"
    )]
    Status(#[from] tonic::Status),
    #[error("control plane closed the stream")]
    Closed,
}

/// Who this ztunnel is, for the control plane.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub instance_ip: String,
    pub pod_name: String,
    pub pod_namespace: String,
    pub node_name: String,
    pub cluster_id: String,
}

impl NodeInfo {
    /// Istio's node id and metadata for a ztunnel.
    pub fn to_node(&self) -> Node {
        let s = |v: &str| Value {
            kind: Some(Kind::StringValue(v.to_owned())),
        };
        let fields = BTreeMap::from([
            ("NAME".to_owned(), s(&self.pod_name)),
            ("NAMESPACE".to_owned(), s(&self.pod_namespace)),
            ("INSTANCE_IPS".to_owned(), s(&self.instance_ip)),
            ("NODE_NAME".to_owned(), s(&self.node_name)),
            ("CLUSTER_ID".to_owned(), s(&self.cluster_id)),
        ]);
        Node {
            id: format!(
                "ztunnel~{}~{}.{}~{}.svc.cluster.local",
                self.instance_ip, self.pod_name, self.pod_namespace, self.pod_namespace
            ),
            metadata: Some(Struct { fields }),
            user_agent_name: "mesh-ztunnel".to_owned(),
            ..Default::default()
        }
    }
}

/// What one response did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub updated: usize,
    pub removed: usize,
    /// `name: field: reason` for each resource not applied.
    pub rejected: Vec<String>,
}

/// The resource names held per type: what a reconnect announces.
#[derive(Debug, Default)]
pub struct Known(BTreeMap<String, BTreeSet<String>>);

impl Known {
    fn names(&self, type_url: &str) -> impl Iterator<Item = &String> {
        self.0.get(type_url).into_iter().flatten()
    }
}

/// Decodes, validates and applies one response; returns the ACK/NACK to send.
pub fn handle_response(
    state: &StateStore,
    known: &mut Known,
    resp: DeltaDiscoveryResponse,
) -> (DeltaDiscoveryRequest, Applied) {
    let mut applied = Applied::default();
    let mut changes = Vec::with_capacity(resp.resources.len() + resp.removed_resources.len());
    let mut accepted = Vec::new();
    let kind = resp.type_url.as_str();
    if !TYPES.contains(&kind) {
        applied.rejected.push(format!(
            "type {kind:?} is not one this ztunnel subscribed to"
        ));
    } else {
        for r in resp.resources {
            let name = r.name.clone();
            match decode(kind, r.resource) {
                Ok(change) => {
                    changes.push(change);
                    accepted.push(name);
                }
                Err(e) => applied.rejected.push(format!("{name}: {e}")),
            }
        }
        for name in &resp.removed_resources {
            changes.push(if kind == type_url::ADDRESS {
                Change::RemoveAddress(name.clone())
            } else {
                Change::RemovePolicy(name.clone())
            });
        }
        applied.updated = accepted.len();
        applied.removed = resp.removed_resources.len();
        if !changes.is_empty() {
            state.apply(changes);
        }
        let set = known.0.entry(kind.to_owned()).or_default();
        for n in &resp.removed_resources {
            set.remove(n);
        }
        set.extend(accepted);
    }
    let error_detail = (!applied.rejected.is_empty()).then(|| Status {
        code: INVALID_ARGUMENT,
        message: applied.rejected.join("; "),
        details: vec![],
    });
    let ack = DeltaDiscoveryRequest {
        type_url: resp.type_url,
        response_nonce: resp.nonce,
        error_detail,
        ..Default::default()
    };
    (ack, applied)
}

fn decode(kind: &str, any: Option<prost_types::Any>) -> Result<Change, String> {
    let any = any.ok_or("resource has no body")?;
    if !any.type_url.is_empty() && any.type_url != kind {
        return Err(format!(
            "resource of type {:?} in a {kind:?} response",
            any.type_url
        ));
    }
    if kind == type_url::ADDRESS {
        let a = pbw::Address::decode(any.value.as_slice())
            .map_err(|e| format!("not a valid istio.workload.Address: {e}"))?;
        match convert::address_from_proto(a).map_err(|e| e.to_string())? {
            AddressResource::Workload(w) => Ok(Change::Workload(w)),
            AddressResource::Service(s) => Ok(Change::Service(s)),
        }
    } else {
        let a = pbs::Authorization::decode(any.value.as_slice())
            .map_err(|e| format!("not a valid istio.security.Authorization: {e}"))?;
        Ok(Change::Policy(
            convert::authorization_from_proto(a).map_err(|e| e.to_string())?,
        ))
    }
}

/// The first request of a type on a stream: a wildcard subscription plus what we hold.
pub fn initial_request(node: &Node, kind: &str, known: &Known) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: kind.to_owned(),
        initial_resource_versions: known
            .names(kind)
            .map(|n| (n.clone(), String::new()))
            .collect(),
        ..Default::default()
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
        let mut known = Known::default();
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let started = tokio::time::Instant::now();
            match self.session(&mut known, &drain).await {
                Ok(()) => return,
                Err(e) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff = INITIAL_BACKOFF;
                    }
                    let jitter = Duration::from_millis(rand::random::<u64>() % 100);
                    warn!(error = %e, retry_in_ms = (backoff + jitter).as_millis() as u64, address = %self.endpoint.address,
                        "xDS stream ended; keeping the last configuration and reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(backoff + jitter) => {}
                        () = drain.signaled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    async fn session(&self, known: &mut Known, drain: &DrainWatcher) -> Result<(), XdsError> {
        let channel = controlplane::channel(&self.endpoint)?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let node = self.node.to_node();
        let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(TYPES.len() + 2);
        for kind in TYPES {
            // Cannot fail: the receiver is alive and the buffer holds every initial request.
            let _ = tx.try_send(initial_request(&node, kind, known));
        }
        let outbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut stream = client
            .delta_aggregated_resources(self.credentials.request(outbound))
            .await?
            .into_inner();
        info!(address = %self.endpoint.address, resources = known.0.values().map(BTreeSet::len).sum::<usize>(), "xDS stream established");
        let mut seen: BTreeSet<String> = BTreeSet::new();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                () = drain.signaled() => return Ok(()),
            };
            let Some(resp) = msg else {
                return Err(XdsError::Closed);
            };
            let kind = resp.type_url.clone();
            let (ack, applied) = handle_response(&self.state, known, resp);
            if applied.rejected.is_empty() {
                debug!(type_url = %kind, updated = applied.updated, removed = applied.removed, "xDS update applied");
            } else {
                warn!(type_url = %kind, updated = applied.updated, removed = applied.removed,
                    rejected = %applied.rejected.join("; "), "xDS update partly rejected (NACK sent)");
            }
            if tx.send(ack).await.is_err() {
                return Err(XdsError::Closed);
            }
            seen.insert(kind);
            if !*self.synced.borrow() && TYPES.iter().all(|t| seen.contains(*t)) {
                info!("initial xDS configuration applied");
                self.synced.send_replace(true);
            }
        }
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
        .to_node();
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
