//! The delta ADS server for `istio.workload.Address` and `istio.security.Authorization`
//! (ztunnels), and `mesh.config.v1.KubeObject` (waypoints: Service, HTTPRoute, GRPCRoute,
//! AuthorizationPolicy, RequestAuthentication and DestinationRule as written, named
//! `<kind>/<namespace>/<name>`; every subscriber gets all of them, there is no per-waypoint
//! filtering yet).
//!
//! Every translation is published as an immutable [`Snapshot`] (type → name → encoded
//! resource and its version, a hash of the bytes) with its [`Lineage`]: a generation and the
//! names changed and removed since the snapshot before, computed once ([`Snapshot::successor`]).
//! [`Encoder`] re-encodes only what the translation changed. Each stream keeps what its
//! client holds ([`Held`]: the snapshot it is in sync with, or what it announced) and,
//! whenever a snapshot or a subscription arrives, sends per type only what differs: changed
//! resources, and the names of removed ones. A client in sync with the previous snapshot
//! gets the change set as it is, so one change costs each stream O(changes), not O(cluster);
//! one that skipped snapshots is compared snapshot to snapshot. A reconnecting client's
//! `initial_resource_versions` seed its view, so anything deleted while it was away is
//! removed. The first request of a type is always answered, even with nothing, so the
//! client knows it is in sync. NACKs are logged with the client's node id and kept in
//! [`Stats`]; the resource stays as sent (istiod does the same).
//!
//! Callers must present a token the [`Authenticator`] accepts.

use mesh_core::{
    policy::Authorization,
    workload::{Service, Workload},
};
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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

use crate::{authn::Authenticator, index::KubeObject};

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
pub type Resources = BTreeMap<String, BTreeMap<String, Encoded>>;

/// The resources of one push (`.0`) and how they differ from the snapshot published before
/// (`.1`), so that a client holding that one is brought up to date from the change set
/// alone, however large the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot(pub Resources, pub Lineage);

/// A snapshot's identity and its changes against its predecessor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// Unique in the process (0: not published through [`Snapshot::successor`]).
    pub generation: u64,
    /// The generation the changes are relative to (None: no usable predecessor).
    pub base: Option<u64>,
    /// type_url → what differs from the predecessor.
    pub changes: BTreeMap<String, TypeChanges>,
}

/// Names changed (added or a new version) and names removed, in one type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeChanges {
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

fn encoded(msg: &impl Message) -> Encoded {
    let bytes = msg.encode_to_vec();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Encoded {
        version: format!("{:016x}", h.finish()),
        bytes: Arc::new(bytes),
    }
}

/// What differs between `old` and `new` (one type; either may be absent): one walk over
/// both in name order.
fn compare(
    old: Option<&BTreeMap<String, Encoded>>,
    new: Option<&BTreeMap<String, Encoded>>,
) -> TypeChanges {
    let empty = BTreeMap::new();
    let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    let mut out = TypeChanges::default();
    let (mut o, mut n) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (o.peek(), n.peek()) {
            (None, None) => return out,
            (Some((on, _)), None) => {
                out.removed.push((*on).clone());
                o.next();
            }
            (None, Some((nn, _))) => {
                out.changed.push((*nn).clone());
                n.next();
            }
            (Some((on, oe)), Some((nn, ne))) => match on.cmp(nn) {
                std::cmp::Ordering::Less => {
                    out.removed.push((*on).clone());
                    o.next();
                }
                std::cmp::Ordering::Greater => {
                    out.changed.push((*nn).clone());
                    n.next();
                }
                std::cmp::Ordering::Equal => {
                    if !(Arc::ptr_eq(&oe.bytes, &ne.bytes) || oe.version == ne.version) {
                        out.changed.push((*nn).clone());
                    }
                    o.next();
                    n.next();
                }
            },
        }
    }
}

impl Snapshot {
    /// The snapshot to publish after `self` with `next`'s resources: a new generation and
    /// the change set against `self`, computed once for every client. None when nothing
    /// differs.
    pub fn successor(&self, next: Resources) -> Option<Snapshot> {
        let types: BTreeSet<&String> = self.0.keys().chain(next.keys()).collect();
        let changes: BTreeMap<String, TypeChanges> = types
            .into_iter()
            .map(|t| (t.clone(), compare(self.0.get(t), next.get(t))))
            .filter(|(_, c)| !(c.changed.is_empty() && c.removed.is_empty()))
            .collect();
        if changes.is_empty() && self.1.generation != 0 {
            return None;
        }
        Some(Snapshot(
            next,
            Lineage {
                generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
                base: Some(self.1.generation),
                changes,
            },
        ))
    }

    pub fn generation(&self) -> u64 {
        self.1.generation
    }
}

/// Encodes translation after translation, reusing the bytes of a workload the translator
/// kept (the same `Arc`) and of a Service, policy or object that is equal to the last one
/// encoded under its name.
#[derive(Debug, Default)]
pub struct Encoder {
    workloads: HashMap<String, (Arc<Workload>, Encoded)>,
    services: HashMap<String, (Service, Encoded)>,
    authorizations: HashMap<String, (Authorization, Encoded)>,
    objects: HashMap<String, (KubeObject, Encoded)>,
}

/// Looks `name` up in `cache`; encodes and remembers it when absent or different.
fn cached<T: Clone>(
    cache: &mut HashMap<String, (T, Encoded)>,
    next: &mut HashMap<String, (T, Encoded)>,
    name: String,
    value: &T,
    same: impl Fn(&T, &T) -> bool,
    encode: impl FnOnce() -> Encoded,
) -> (String, Encoded) {
    let e = match cache.remove(&name) {
        Some((old, e)) if same(&old, value) => (old, e),
        _ => (value.clone(), encode()),
    };
    let out = e.1.clone();
    next.insert(name.clone(), e);
    (name, out)
}

impl Encoder {
    /// The resources for `r` and `objects`; names follow Istio (workload uid,
    /// `ns/hostname`, `ns/name`) and objects are `<kind>/<namespace>/<name>`.
    pub fn encode<'a>(
        &mut self,
        r: &crate::translate::Resources,
        objects: impl IntoIterator<Item = &'a KubeObject>,
    ) -> Resources {
        let mut addrs = BTreeMap::new();
        let mut next = HashMap::with_capacity(r.workloads.len());
        for w in &r.workloads {
            let (n, e) = cached(
                &mut self.workloads,
                &mut next,
                w.uid.clone(),
                w,
                |a, b| Arc::ptr_eq(a, b) || a == b,
                || {
                    encoded(&convert::address_to_proto(
                        &convert::AddressResource::Workload((**w).clone()),
                    ))
                },
            );
            addrs.insert(n, e);
        }
        self.workloads = next;
        let mut next = HashMap::with_capacity(r.services.len());
        for s in &r.services {
            let (n, e) = cached(
                &mut self.services,
                &mut next,
                s.key().to_string(),
                s,
                |a, b| a == b,
                || {
                    encoded(&convert::address_to_proto(
                        &convert::AddressResource::Service(s.clone()),
                    ))
                },
            );
            addrs.insert(n, e);
        }
        self.services = next;
        let mut authz = BTreeMap::new();
        let mut next = HashMap::new();
        for p in &r.authorizations {
            let (n, e) = cached(
                &mut self.authorizations,
                &mut next,
                p.key(),
                p,
                |a, b| a == b,
                || encoded(&convert::authorization_to_proto(p)),
            );
            authz.insert(n, e);
        }
        self.authorizations = next;
        let mut kube = BTreeMap::new();
        let mut next = HashMap::new();
        for o in objects {
            let (n, e) = cached(
                &mut self.objects,
                &mut next,
                o.resource_name(),
                o,
                |a, b| a == b,
                || encoded(&kube_object(o)),
            );
            kube.insert(n, e);
        }
        self.objects = next;
        BTreeMap::from([
            (type_url::ADDRESS.to_owned(), addrs),
            (type_url::AUTHORIZATION.to_owned(), authz),
            (type_url::KUBE_OBJECT.to_owned(), kube),
        ])
    }
}

fn kube_object(o: &KubeObject) -> mesh_proto::mesh::config::v1::KubeObject {
    mesh_proto::mesh::config::v1::KubeObject {
        api_version: o.api_version.clone(),
        kind: o.kind.to_owned(),
        namespace: o.namespace.clone(),
        name: o.name.clone(),
        json: o.json.as_bytes().to_vec(),
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

/// What a client holds of one type.
#[derive(Debug, Clone)]
pub enum Held {
    /// As it announced on (re)connecting: name → version (None: unknown).
    Announced(BTreeMap<String, Option<String>>),
    /// Exactly this snapshot's resources of the type (the last one sent, or in sync with).
    Synced(Arc<Snapshot>),
}

/// Per stream: type_url → what the client holds.
pub type HeldTypes = BTreeMap<String, Held>;

/// The names to send and to remove for a client holding `held` of type `t`. A client synced
/// to `snap`'s predecessor gets the change set (O(changes)); anyone else a full comparison.
fn delta(t: &str, snap: &Snapshot, held: &Held) -> TypeChanges {
    let want = snap.0.get(t);
    match held {
        Held::Synced(old) if old.1.generation == snap.1.generation && old.1.generation != 0 => {
            TypeChanges::default()
        }
        Held::Synced(old) if old.1.generation != 0 && snap.1.base == Some(old.1.generation) => {
            snap.1.changes.get(t).cloned().unwrap_or_default()
        }
        Held::Synced(old) => compare(old.0.get(t), want),
        Held::Announced(have) => {
            let empty = BTreeMap::new();
            let want = want.unwrap_or(&empty);
            TypeChanges {
                changed: want
                    .iter()
                    .filter(|(n, e)| have.get(*n).and_then(|v| v.as_ref()) != Some(&e.version))
                    .map(|(n, _)| n.clone())
                    .collect(),
                removed: have
                    .keys()
                    .filter(|n| !want.contains_key(*n))
                    .cloned()
                    .collect(),
            }
        }
    }
}

/// The responses that bring a client holding `held` up to `snap`, for the types in
/// `pending_first` (always answered) and every subscribed type that differs.
pub fn diff(
    snap: &Arc<Snapshot>,
    held: &mut HeldTypes,
    pending_first: &mut BTreeSet<String>,
    nonce: &mut u64,
) -> Vec<DeltaDiscoveryResponse> {
    let mut out = Vec::new();
    let empty = BTreeMap::new();
    for (t, have) in held.iter_mut() {
        let want = snap.0.get(t).unwrap_or(&empty);
        let d = delta(t, snap, have);
        let first = pending_first.remove(t);
        *have = Held::Synced(snap.clone());
        if d.changed.is_empty() && d.removed.is_empty() && !first {
            continue;
        }
        let resources = d
            .changed
            .into_iter()
            .filter_map(|n| {
                let e = want.get(&n)?;
                Some(Resource {
                    version: e.version.clone(),
                    resource: Some(prost_types::Any {
                        type_url: t.clone(),
                        value: e.bytes.to_vec(),
                    }),
                    name: n,
                    ..Default::default()
                })
            })
            .collect();
        *nonce += 1;
        out.push(DeltaDiscoveryResponse {
            type_url: t.clone(),
            nonce: format!("{nonce}"),
            system_version_info: String::new(),
            resources,
            removed_resources: d.removed,
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
            let mut held = HeldTypes::new();
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
                        held.insert(r.type_url.clone(), Held::Announced(r.initial_resource_versions.into_iter().map(|(n, v)| (n, (!v.is_empty()).then_some(v))).collect()));
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

    fn resources(items: &[(&str, &str)]) -> Resources {
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
        BTreeMap::from([(type_url::ADDRESS.to_owned(), m)])
    }

    /// Publishes `items` after `prev`, as the translator does (an unchanged one is kept).
    fn publish(prev: &Arc<Snapshot>, items: &[(&str, &str)]) -> Arc<Snapshot> {
        prev.successor(resources(items))
            .map_or_else(|| prev.clone(), Arc::new)
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|x| x.name.as_str()).collect()
    }

    #[test]
    fn deltas_send_only_changes_and_removals() {
        let mut held = HeldTypes::from([(
            type_url::ADDRESS.to_owned(),
            Held::Announced(BTreeMap::new()),
        )]);
        let mut first = BTreeSet::from([type_url::ADDRESS.to_owned()]);
        let mut nonce = 0;
        let s1 = publish(&Arc::default(), &[("a", "1"), ("b", "1")]);
        let r = diff(&s1, &mut held, &mut first, &mut nonce);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].resources.len(), 2);
        // Nothing changed: no new snapshot, and nothing sent for the same one.
        assert!(s1.successor(resources(&[("a", "1"), ("b", "1")])).is_none());
        assert!(diff(&s1, &mut held, &mut first, &mut nonce).is_empty());
        // One change, one removal, from the change set.
        let s2 = publish(&s1, &[("a", "2")]);
        assert_eq!(s2.1.base, Some(s1.generation()));
        let r = diff(&s2, &mut held, &mut first, &mut nonce);
        assert_eq!(names(&r[0]), ["a"]);
        assert_eq!(r[0].removed_resources, ["b"]);
        assert_ne!(r[0].nonce, "1");
        // A client that skipped a snapshot gets the full difference.
        let s3 = publish(&s2, &[("a", "2"), ("c", "1")]);
        let s4 = publish(&s3, &[("c", "2")]);
        let r = diff(&s4, &mut held, &mut first, &mut nonce);
        assert_eq!(names(&r[0]), ["c"]);
        assert_eq!(r[0].removed_resources, ["a"]);
    }

    #[test]
    fn a_reconnect_removes_what_vanished_and_an_empty_first_answer_is_sent() {
        // The client says it holds a and gone; only a exists now, at a version it may lack.
        let mut held = HeldTypes::from([(
            type_url::ADDRESS.to_owned(),
            Held::Announced(BTreeMap::from([
                ("a".to_owned(), None),
                ("gone".to_owned(), None),
            ])),
        )]);
        let mut first = BTreeSet::from([type_url::ADDRESS.to_owned()]);
        let mut nonce = 0;
        let s1 = publish(&Arc::default(), &[("a", "1")]);
        let r = diff(&s1, &mut held, &mut first, &mut nonce);
        assert_eq!(r[0].removed_resources, ["gone"]);
        assert_eq!(r[0].resources.len(), 1);
        let mut held = HeldTypes::from([(
            type_url::AUTHORIZATION.to_owned(),
            Held::Announced(BTreeMap::new()),
        )]);
        let mut first = BTreeSet::from([type_url::AUTHORIZATION.to_owned()]);
        let r = diff(&s1, &mut held, &mut first, &mut nonce);
        assert_eq!(r.len(), 1, "first answer even when empty");
        assert!(r[0].resources.is_empty());
        // A re-subscription of a type already in sync is answered again.
        first.insert(type_url::AUTHORIZATION.to_owned());
        assert_eq!(diff(&s1, &mut held, &mut first, &mut nonce).len(), 1);
    }

    /// xorshift64*: the same edits on every run.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
        }
    }

    /// What a client ends up holding: name → version, from the responses it was sent.
    fn apply(client: &mut BTreeMap<String, String>, rs: &[DeltaDiscoveryResponse]) {
        for r in rs {
            for n in &r.removed_resources {
                assert!(client.remove(n).is_some(), "removal of {n}, never sent");
            }
            for x in &r.resources {
                client.insert(x.name.clone(), x.version.clone());
            }
        }
    }

    /// Random edits (changes, additions, removals, no-ops, several types), with clients that
    /// follow every snapshot, skip some, or reconnect announcing what they hold: each ends up
    /// holding exactly the newest snapshot, and is sent exactly what a full diff against
    /// what it holds would send.
    #[test]
    fn incremental_deltas_equal_full_diffs_over_random_edits() {
        let types = [type_url::ADDRESS, type_url::AUTHORIZATION];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut state: Resources = BTreeMap::new();
        let mut snap = Arc::new(Snapshot::default());
        // (held by the server, what the client holds, first pending, nonce)
        let mut clients: Vec<_> = (0..4)
            .map(|_| {
                let held: HeldTypes = types
                    .iter()
                    .map(|t| (t.to_string(), Held::Announced(BTreeMap::new())))
                    .collect();
                let first: BTreeSet<String> = types.iter().map(|t| t.to_string()).collect();
                let client: BTreeMap<String, BTreeMap<String, String>> = types
                    .iter()
                    .map(|t| (t.to_string(), BTreeMap::new()))
                    .collect();
                (held, client, first, 0u64)
            })
            .collect();
        for step in 0..400 {
            for _ in 0..rng.below(4) {
                let t = types[rng.below(2) as usize].to_owned();
                let name = format!("r{}", rng.below(12));
                let m = state.entry(t).or_default();
                if rng.below(3) == 0 {
                    m.remove(&name);
                } else {
                    let v = format!("v{}", rng.below(3));
                    m.insert(
                        name,
                        Encoded {
                            bytes: Arc::new(v.as_bytes().to_vec()),
                            version: v,
                        },
                    );
                }
            }
            if let Some(next) = snap.successor(state.clone()) {
                snap = Arc::new(next);
            }
            for (i, (held, client, first, nonce)) in clients.iter_mut().enumerate() {
                // Client 0 follows every snapshot; the others skip some.
                if i > 0 && rng.below(i as u64 + 1) != 0 {
                    continue;
                }
                // Client 3 sometimes reconnects, announcing what it holds.
                if i == 3 && rng.below(5) == 0 {
                    for t in types {
                        let have = client[t]
                            .iter()
                            .map(|(n, v)| (n.clone(), (rng.below(2) == 0).then(|| v.clone())))
                            .collect();
                        held.insert(t.to_owned(), Held::Announced(have));
                        first.insert(t.to_owned());
                    }
                }
                let expect: BTreeMap<&str, (Vec<String>, Vec<String>)> = types
                    .iter()
                    .map(|t| {
                        let have = match &held[*t] {
                            Held::Announced(h) => h.clone(),
                            Held::Synced(_) => client[*t]
                                .iter()
                                .map(|(n, v)| (n.clone(), Some(v.clone())))
                                .collect(),
                        };
                        let d = delta(t, &snap, &Held::Announced(have));
                        (*t, (d.changed, d.removed))
                    })
                    .collect();
                let was_first = first.clone();
                let rs = diff(&snap, held, first, nonce);
                for t in types {
                    let r = rs.iter().find(|r| r.type_url == t);
                    let (changed, removed) = &expect[t];
                    match r {
                        Some(r) => {
                            let got: Vec<String> =
                                r.resources.iter().map(|x| x.name.clone()).collect();
                            assert_eq!(&got, changed, "step {step} client {i} {t}");
                            assert_eq!(&r.removed_resources, removed, "step {step} client {i}");
                        }
                        None => assert!(
                            changed.is_empty() && removed.is_empty() && !was_first.contains(t),
                            "step {step} client {i} {t}: nothing sent for {changed:?} {removed:?}"
                        ),
                    }
                    apply(
                        client.get_mut(t).unwrap(),
                        &rs.iter()
                            .filter(|r| r.type_url == t)
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                    let want: BTreeMap<String, String> = snap
                        .0
                        .get(t)
                        .into_iter()
                        .flatten()
                        .map(|(n, e)| (n.clone(), e.version.clone()))
                        .collect();
                    assert_eq!(client[t], want, "step {step} client {i} {t}");
                }
            }
        }
    }

    #[test]
    fn the_encoder_reuses_unchanged_bytes_and_the_change_set_names_only_the_change() {
        let w = |ip: &str| {
            Arc::new(Workload {
                uid: "c//Pod/ns/p".into(),
                name: "p".into(),
                workload_ips: vec![ip.parse().unwrap()],
                ..Default::default()
            })
        };
        let other = Arc::new(Workload {
            uid: "c//Pod/ns/q".into(),
            ..Default::default()
        });
        let r = |w: Arc<Workload>| crate::translate::Resources {
            workloads: vec![w, other.clone()],
            ..Default::default()
        };
        let mut enc = Encoder::default();
        let s1 = Arc::new(
            Snapshot::default()
                .successor(enc.encode(&r(w("10.0.0.1")), []))
                .unwrap(),
        );
        // Equal (not the same Arc): the same bytes, nothing to publish.
        assert!(s1.successor(enc.encode(&r(w("10.0.0.1")), [])).is_none());
        let s2 = s1.successor(enc.encode(&r(w("10.0.0.2")), [])).unwrap();
        let a = |s: &Snapshot, n: &str| s.0[type_url::ADDRESS][n].bytes.clone();
        assert!(Arc::ptr_eq(&a(&s1, "c//Pod/ns/q"), &a(&s2, "c//Pod/ns/q")));
        assert_eq!(
            s2.1.changes[type_url::ADDRESS],
            TypeChanges {
                changed: vec!["c//Pod/ns/p".into()],
                removed: vec![]
            }
        );
        assert_eq!(s2.1.changes.len(), 1, "{:?}", s2.1.changes);
    }
}
