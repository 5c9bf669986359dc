//! The delta ADS server for `istio.workload.Address` and `istio.security.Authorization`
//! (ztunnels), and `mesh.config.v1.KubeObject` (waypoints: Service, HTTPRoute, GRPCRoute,
//! AuthorizationPolicy, RequestAuthentication and DestinationRule as written, named
//! `<kind>/<namespace>/<name>`; every subscriber gets all of them, there is no per-waypoint
//! filtering yet).
//!
//! Every translation is published as an immutable [`Snapshot`] (type → name → encoded
//! resource and its version, a hash of the bytes). Each stream keeps what its client holds
//! and, whenever a snapshot or a subscription arrives, sends per type only what differs:
//! changed resources, and the names of removed ones. A reconnecting client's
//! `initial_resource_versions` seed that view, so anything deleted while it was away is
//! removed. The first request of a type is always answered, even with nothing, so the
//! client knows it is in sync. NACKs are logged with the client's node id and kept in
//! [`Stats`]; the resource stays as sent (istiod does the same).
//!
//! Callers must present a token the [`Authenticator`] accepts.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use mesh_proto::{
    convert,
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        Resource, aggregated_discovery_service_server::AggregatedDiscoveryService,
    },
    type_url,
};
use prost::Message;
use tokio::sync::watch;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::{authn::Authenticator, index::KubeObject, translate::Resources};

/// The types this server serves.
pub const SERVED_TYPES: [&str; 3] = [
    type_url::ADDRESS,
    type_url::AUTHORIZATION,
    type_url::KUBE_OBJECT,
];

/// One encoded resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub version: String,
    pub bytes: Arc<Vec<u8>>,
}

/// type_url → name → resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(pub BTreeMap<String, BTreeMap<String, Encoded>>);

fn encoded(msg: &impl Message) -> Encoded {
    let bytes = msg.encode_to_vec();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Encoded {
        version: format!("{:016x}", h.finish()),
        bytes: Arc::new(bytes),
    }
}

impl Snapshot {
    /// Encodes translated resources; names follow Istio (workload uid, `ns/hostname`,
    /// `ns/name`).
    pub fn from_resources(r: &Resources) -> Snapshot {
        let mut addrs = BTreeMap::new();
        for w in &r.workloads {
            let a = convert::address_to_proto(&convert::AddressResource::Workload(w.clone()));
            addrs.insert(w.uid.clone(), encoded(&a));
        }
        for s in &r.services {
            let a = convert::address_to_proto(&convert::AddressResource::Service(s.clone()));
            addrs.insert(s.key().to_string(), encoded(&a));
        }
        let mut authz = BTreeMap::new();
        for p in &r.authorizations {
            authz.insert(p.key(), encoded(&convert::authorization_to_proto(p)));
        }
        Snapshot(BTreeMap::from([
            (type_url::ADDRESS.to_owned(), addrs),
            (type_url::AUTHORIZATION.to_owned(), authz),
        ]))
    }

    /// Adds the objects sent verbatim to waypoints.
    pub fn with_kube_objects<'a>(
        mut self,
        objects: impl IntoIterator<Item = &'a KubeObject>,
    ) -> Snapshot {
        let m = objects
            .into_iter()
            .map(|o| {
                let msg = mesh_proto::mesh::config::v1::KubeObject {
                    api_version: o.api_version.clone(),
                    kind: o.kind.to_owned(),
                    namespace: o.namespace.clone(),
                    name: o.name.clone(),
                    json: o.json.as_bytes().to_vec(),
                };
                (o.resource_name(), encoded(&msg))
            })
            .collect();
        self.0.insert(type_url::KUBE_OBJECT.to_owned(), m);
        self
    }
}

/// Counters for the monitor endpoint and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub streams: AtomicU64,
    pub pushes: AtomicU64,
    pub nacks: Mutex<Vec<(String, String)>>,
}

#[derive(Clone)]
pub struct XdsServer {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub authn: Arc<dyn Authenticator>,
    pub stats: Arc<Stats>,
}

/// Per stream, per type: what the client holds (None: announced on reconnect, unknown).
type Held = BTreeMap<String, BTreeMap<String, Option<String>>>;

/// The responses that bring a client holding `held` up to `snap`, for the types in
/// `pending_first` (always answered) and every subscribed type that differs.
pub fn diff(
    snap: &Snapshot,
    held: &mut Held,
    pending_first: &mut BTreeSet<String>,
    nonce: &mut u64,
) -> Vec<DeltaDiscoveryResponse> {
    let mut out = Vec::new();
    let empty = BTreeMap::new();
    for (t, have) in held.iter_mut() {
        let want = snap.0.get(t).unwrap_or(&empty);
        let resources: Vec<Resource> = want
            .iter()
            .filter(|(n, e)| have.get(*n).and_then(|v| v.as_ref()) != Some(&e.version))
            .map(|(n, e)| Resource {
                name: n.clone(),
                version: e.version.clone(),
                resource: Some(prost_types::Any {
                    type_url: t.clone(),
                    value: e.bytes.to_vec(),
                }),
                ..Default::default()
            })
            .collect();
        let removed: Vec<String> = have
            .keys()
            .filter(|n| !want.contains_key(*n))
            .cloned()
            .collect();
        let first = pending_first.remove(t);
        if resources.is_empty() && removed.is_empty() && !first {
            continue;
        }
        *have = want
            .iter()
            .map(|(n, e)| (n.clone(), Some(e.version.clone())))
            .collect();
        *nonce += 1;
        out.push(DeltaDiscoveryResponse {
            type_url: t.clone(),
            nonce: format!("{nonce}"),
            system_version_info: String::new(),
            resources,
            removed_resources: removed,
        });
    }
    out
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn bearer<T>(req: &Request<T>) -> Option<String> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "istiod-lite serves delta xDS only (DeltaAggregatedResources)",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = self
            .authn
            .authenticate(bearer(&req).as_deref())
            .await
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut snaps = self.snapshots.clone();
        let stats = self.stats.clone();
        stats.streams.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut held = Held::new();
            let mut pending_first = BTreeSet::new();
            let mut nonce = 0u64;
            let mut node = String::new();
            loop {
                tokio::select! {
                    m = incoming.message() => {
                        let r = match m {
                            Ok(Some(r)) => r,
                            Ok(None) => return,
                            Err(e) => { debug!(node = %node, error = %e, "xDS stream ended"); return }
                        };
                        if let Some(n) = &r.node { node = n.id.clone(); }
                        if !r.response_nonce.is_empty() {
                            if let Some(e) = r.error_detail {
                                warn!(node = %node, type_url = %r.type_url, nonce = %r.response_nonce, error = %e.message, "client rejected config (NACK)");
                                if let Ok(mut n) = stats.nacks.lock() { n.push((node.clone(), e.message)); }
                            }
                            continue;
                        }
                        if !SERVED_TYPES.contains(&r.type_url.as_str()) {
                            warn!(node = %node, type_url = %r.type_url, "subscription to a type istiod-lite does not serve");
                            continue;
                        }
                        if !r.resource_names_subscribe.is_empty() {
                            debug!(node = %node, "explicit subscriptions are served as wildcard");
                        }
                        info!(node = %node, caller = %caller, type_url = %r.type_url, held = r.initial_resource_versions.len(), "xDS subscription");
                        held.insert(r.type_url.clone(), r.initial_resource_versions.into_iter().map(|(n, v)| (n, (!v.is_empty()).then_some(v))).collect());
                        pending_first.insert(r.type_url);
                    }
                    c = snaps.changed() => { if c.is_err() { return } }
                }
                let snap = snaps.borrow_and_update().clone();
                for resp in diff(&snap, &mut held, &mut pending_first, &mut nonce) {
                    stats.pushes.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(items: &[(&str, &str)]) -> Snapshot {
        let mut m = BTreeMap::new();
        for (n, body) in items {
            m.insert(
                n.to_string(),
                Encoded {
                    version: body.to_string(),
                    bytes: Arc::new(body.as_bytes().to_vec()),
                },
            );
        }
        Snapshot(BTreeMap::from([(type_url::ADDRESS.to_owned(), m)]))
    }

    #[test]
    fn deltas_send_only_changes_and_removals() {
        let mut held = Held::from([(type_url::ADDRESS.to_owned(), BTreeMap::new())]);
        let mut first = BTreeSet::from([type_url::ADDRESS.to_owned()]);
        let mut nonce = 0;
        let r = diff(
            &snap(&[("a", "1"), ("b", "1")]),
            &mut held,
            &mut first,
            &mut nonce,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].resources.len(), 2);
        // Nothing changed: nothing sent.
        assert!(
            diff(
                &snap(&[("a", "1"), ("b", "1")]),
                &mut held,
                &mut first,
                &mut nonce
            )
            .is_empty()
        );
        // One change, one removal.
        let r = diff(&snap(&[("a", "2")]), &mut held, &mut first, &mut nonce);
        assert_eq!(
            r[0].resources
                .iter()
                .map(|x| x.name.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(r[0].removed_resources, ["b"]);
        assert_ne!(r[0].nonce, "1");
    }

    #[test]
    fn a_reconnect_removes_what_vanished_and_an_empty_first_answer_is_sent() {
        // The client says it holds a and gone; only a exists now, at a version it may lack.
        let mut held = Held::from([(
            type_url::ADDRESS.to_owned(),
            BTreeMap::from([("a".to_owned(), None), ("gone".to_owned(), None)]),
        )]);
        let mut first = BTreeSet::from([type_url::ADDRESS.to_owned()]);
        let mut nonce = 0;
        let r = diff(&snap(&[("a", "1")]), &mut held, &mut first, &mut nonce);
        assert_eq!(r[0].removed_resources, ["gone"]);
        assert_eq!(r[0].resources.len(), 1);
        let mut held = Held::from([(type_url::AUTHORIZATION.to_owned(), BTreeMap::new())]);
        let mut first = BTreeSet::from([type_url::AUTHORIZATION.to_owned()]);
        let r = diff(&Snapshot::default(), &mut held, &mut first, &mut nonce);
        assert_eq!(r.len(), 1, "first answer even when empty");
        assert!(r[0].resources.is_empty());
    }
}
