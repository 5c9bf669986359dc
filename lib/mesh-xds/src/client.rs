//! The delta ADS session: one `DeltaAggregatedResources` stream carrying every type a program
//! subscribes to, each as a wildcard.
//!
//! Protocol (Envoy's incremental xDS, as Istio's ztunnel speaks it): every response is
//! answered by exactly one request with its nonce: an ACK, or a NACK whose `error_detail`
//! names each rejected resource and the field that is wrong. Which resources are rejected is
//! the [`Handler`]'s call; a resource without a body or of another type than its response is
//! rejected here. Rejected resources are not applied (the previous version, if any, stays);
//! the rest of the response is.
//!
//! Invariants:
//! - the program never loses configuration because the control plane went away: on any
//!   stream error the handler's state is kept, the client reconnects with capped, jittered
//!   backoff and sends `initial_resource_versions` for everything it holds, so the server can
//!   send only what changed and remove what disappeared meanwhile;
//! - `synced` turns true once the first response of every type has been handled.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use mesh_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use mesh_rt::drain::DrainWatcher;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::controlplane::{self, ControlPlane, ControlPlaneError, Credentials};

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// A stream that lived this long resets the backoff.
const HEALTHY_STREAM: Duration = Duration::from_secs(30);
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

/// A resource the handler did not apply, and why (`field: reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// Turns the resources of one program's types into its state.
pub trait Handler: Send {
    /// Applies one response of `type_url` (always a subscribed type): `resources` are
    /// `(name, encoded body)`, `removed` the names the server deleted. Returns the resources
    /// not applied; everything else must be in force when this returns.
    fn apply(
        &mut self,
        type_url: &str,
        resources: Vec<(String, Vec<u8>)>,
        removed: &[String],
    ) -> Vec<Rejected>;
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
    /// The names held of `type_url`.
    pub fn names(&self, type_url: &str) -> impl Iterator<Item = &String> {
        self.0.get(type_url).into_iter().flatten()
    }

    /// How many resources are held, all types together.
    pub fn total(&self) -> usize {
        self.0.values().map(BTreeSet::len).sum()
    }
}

/// Checks, applies (through `handler`) and records one response; returns the ACK/NACK to
/// send. `types` are the subscribed types; `who` names the program in the refusal of others.
pub fn handle_response<H: Handler + ?Sized>(
    handler: &mut H,
    types: &[&str],
    who: &str,
    known: &mut Known,
    resp: DeltaDiscoveryResponse,
) -> (DeltaDiscoveryRequest, Applied) {
    let mut applied = Applied::default();
    let kind = resp.type_url.as_str();
    if !types.contains(&kind) {
        applied
            .rejected
            .push(format!("type {kind:?} is not one this {who} subscribed to"));
    } else {
        let mut bodies = Vec::with_capacity(resp.resources.len());
        let mut rejected = Vec::new();
        for r in resp.resources {
            match r.resource {
                None => rejected.push(Rejected {
                    name: r.name,
                    reason: "resource has no body".into(),
                }),
                Some(any) if !any.type_url.is_empty() && any.type_url != kind => {
                    rejected.push(Rejected {
                        name: r.name,
                        reason: format!(
                            "resource of type {:?} in a {kind:?} response",
                            any.type_url
                        ),
                    })
                }
                Some(any) => bodies.push((r.name, any.value)),
            }
        }
        let names: Vec<String> = bodies.iter().map(|(n, _)| n.clone()).collect();
        rejected.extend(handler.apply(kind, bodies, &resp.removed_resources));
        let refused: BTreeSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        let accepted: Vec<String> = names
            .into_iter()
            .filter(|n| !refused.contains(n.as_str()))
            .collect();
        applied.updated = accepted.len();
        applied.removed = resp.removed_resources.len();
        applied.rejected = rejected.iter().map(ToString::to_string).collect();
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

/// One program's xDS client task.
pub struct Client<H> {
    pub endpoint: ControlPlane,
    pub credentials: Credentials,
    /// Sent on the first request of every type of every stream.
    pub node: Node,
    /// The types subscribed to, in the order they are requested.
    pub types: Vec<&'static str>,
    /// The program, as named in logs and refusals (`ztunnel`, `waypoint`).
    pub who: &'static str,
    pub handler: H,
    /// Set to true once every type has been applied at least once.
    pub synced: watch::Sender<bool>,
}

impl<H: Handler> Client<H> {
    /// Runs until drained, reconnecting as needed.
    pub async fn run(mut self, drain: DrainWatcher) {
        let mut known = Known::default();
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let started = tokio::time::Instant::now();
            match self.session(&mut known, &drain).await {
                Ok(()) => return,
                Err(e) => {
                    if started.elapsed() > HEALTHY_STREAM {
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

    async fn session(&mut self, known: &mut Known, drain: &DrainWatcher) -> Result<(), XdsError> {
        let channel = controlplane::channel(&self.endpoint)?;
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let (tx, mut rx) = mpsc::channel::<DeltaDiscoveryRequest>(self.types.len() + 2);
        for kind in &self.types {
            // Cannot fail: the receiver is alive and the buffer holds every initial request.
            let _ = tx.try_send(initial_request(&self.node, kind, known));
        }
        let outbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut stream = client
            .delta_aggregated_resources(self.credentials.request(outbound))
            .await?
            .into_inner();
        info!(address = %self.endpoint.address, resources = known.total(), "xDS stream established");
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
            let (ack, applied) =
                handle_response(&mut self.handler, &self.types, self.who, known, resp);
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
            if !*self.synced.borrow() && self.types.iter().all(|t| seen.contains(*t)) {
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

    /// Accepts every resource whose body is not "bad".
    #[derive(Default)]
    struct Store(BTreeMap<String, Vec<u8>>);

    impl Handler for Store {
        fn apply(
            &mut self,
            _: &str,
            resources: Vec<(String, Vec<u8>)>,
            removed: &[String],
        ) -> Vec<Rejected> {
            let mut out = Vec::new();
            for (n, b) in resources {
                if b == b"bad" {
                    out.push(Rejected {
                        name: n,
                        reason: "spec: bad".into(),
                    });
                } else {
                    self.0.insert(n, b);
                }
            }
            for n in removed {
                self.0.remove(n);
            }
            out
        }
    }

    const T: &str = "type.googleapis.com/test.T";

    fn res(name: &str, body: &[u8]) -> Resource {
        Resource {
            name: name.into(),
            resource: Some(prost_types::Any {
                type_url: T.into(),
                value: body.to_vec(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rejections_are_named_and_only_accepted_names_are_announced() {
        let mut h = Store::default();
        let mut known = Known::default();
        let mut other = res("other", b"x");
        if let Some(a) = other.resource.as_mut() {
            a.type_url = "type.googleapis.com/test.U".into();
        }
        let (ack, applied) = handle_response(
            &mut h,
            &[T],
            "tester",
            &mut known,
            DeltaDiscoveryResponse {
                type_url: T.into(),
                nonce: "1".into(),
                resources: vec![res("a", b"1"), res("b", b"bad"), other],
                ..Default::default()
            },
        );
        let msg = ack.error_detail.unwrap().message;
        assert!(msg.contains("b: spec: bad"), "{msg}");
        assert!(msg.contains("other: resource of type"), "{msg}");
        assert_eq!(applied.updated, 1);
        assert_eq!(known.names(T).collect::<Vec<_>>(), ["a"]);
        let (ack, _) = handle_response(
            &mut h,
            &[T],
            "tester",
            &mut known,
            DeltaDiscoveryResponse {
                type_url: "type.googleapis.com/x".into(),
                nonce: "2".into(),
                ..Default::default()
            },
        );
        assert!(
            ack.error_detail
                .unwrap()
                .message
                .contains("not one this tester subscribed to")
        );
        let req = initial_request(&Node::default(), T, &known);
        assert_eq!(req.initial_resource_versions.len(), 1);
    }
}
