//! Per-connection accounting: Istio-named TCP metrics and one access-log line per connection.
//!
//! [`ConnectionResult`] is created when a connection is accepted and always records exactly
//! once: explicitly through [`ConnectionResult::finish`], or from `Drop` (reported as
//! closed by drain) if the task was cancelled — so no connection escapes the log.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use mesh_core::{
    Identity,
    workload::{Service, Workload},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tracing::{info, warn};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    unknown,
}

/// Istio's standard TCP metric labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: SecurityPolicy,
}

/// The registered metric families.
#[derive(Debug, Default)]
pub struct Metrics {
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    sent: Family<ConnLabels, Counter>,
    received: Family<ConnLabels, Counter>,
    /// One shared copy of each label set a connection holds from open to close (22 strings,
    /// ~1 KiB: per idle connection it was the largest single cost). It grows exactly as the
    /// families do, which keep every series anyway.
    interned: Mutex<HashSet<Arc<ConnLabels>>>,
}

impl Metrics {
    fn intern(&self, labels: ConnLabels) -> Arc<ConnLabels> {
        let mut set = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = set.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        set.insert(shared.clone());
        shared
    }
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("istio");
        r.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            m.opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            m.closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            m.sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            m.received.clone(),
        );
        Arc::new(m)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        })
    }
}

/// What is known about a connection, filled in as the proxy learns it.
#[derive(Debug, Clone, Default)]
pub struct ConnInfo {
    pub src_addr: Option<SocketAddr>,
    pub src_workload: Option<Arc<Workload>>,
    pub src_identity: Option<Identity>,
    pub dst_addr: Option<SocketAddr>,
    pub dst_hbone_addr: Option<SocketAddr>,
    pub dst_service: Option<Arc<Service>>,
    pub dst_workload: Option<Arc<Workload>>,
    pub dst_identity: Option<Identity>,
    pub mtls: bool,
}

fn or_unknown(s: Option<&str>) -> String {
    match s {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => "unknown".to_owned(),
    }
}

impl ConnInfo {
    fn labels(&self, reporter: Reporter) -> ConnLabels {
        let sw = self.src_workload.as_deref();
        let dw = self.dst_workload.as_deref();
        let ds = self.dst_service.as_deref();
        ConnLabels {
            reporter,
            source_workload: or_unknown(sw.map(|w| w.workload_name())),
            source_canonical_service: or_unknown(sw.map(|w| w.canonical_service())),
            source_canonical_revision: or_unknown(sw.map(|w| w.canonical_revision())),
            source_workload_namespace: or_unknown(sw.map(|w| w.namespace.as_str())),
            source_principal: or_unknown(
                self.src_identity.as_ref().map(|i| i.to_string()).as_deref(),
            ),
            source_app: or_unknown(sw.map(|w| w.canonical_service())),
            source_version: or_unknown(sw.map(|w| w.canonical_revision())),
            source_cluster: or_unknown(sw.map(|w| w.cluster_id.as_str())),
            destination_service: or_unknown(ds.map(|s| s.hostname.as_str())),
            destination_service_namespace: or_unknown(ds.map(|s| s.namespace.as_str())),
            destination_service_name: or_unknown(ds.map(|s| s.name.as_str())),
            destination_workload: or_unknown(dw.map(|w| w.workload_name())),
            destination_canonical_service: or_unknown(dw.map(|w| w.canonical_service())),
            destination_canonical_revision: or_unknown(dw.map(|w| w.canonical_revision())),
            destination_workload_namespace: or_unknown(dw.map(|w| w.namespace.as_str())),
            destination_principal: or_unknown(
                self.dst_identity.as_ref().map(|i| i.to_string()).as_deref(),
            ),
            destination_app: or_unknown(dw.map(|w| w.canonical_service())),
            destination_version: or_unknown(dw.map(|w| w.canonical_revision())),
            destination_cluster: or_unknown(dw.map(|w| w.cluster_id.as_str())),
            request_protocol: "tcp".to_owned(),
            response_flags: "-".to_owned(),
            connection_security_policy: if self.mtls {
                SecurityPolicy::mutual_tls
            } else {
                SecurityPolicy::unknown
            },
        }
    }
}

/// How a connection ended, for the log line.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ok,
    /// Refused by authorization; names the deciding policy when one decided.
    Denied {
        policy: Option<String>,
        reason: String,
    },
    Error(String),
}

struct Pending {
    info: ConnInfo,
    opened_labels: Option<Arc<ConnLabels>>,
}

/// Records one connection exactly once.
pub struct ConnectionResult {
    metrics: Arc<Metrics>,
    direction: Direction,
    reporter: Reporter,
    start: Instant,
    state: Mutex<Option<Pending>>,
}

impl ConnectionResult {
    /// Starts accounting. The "opened" counter is incremented once the destination is known
    /// ([`opened`](Self::opened)), so its labels match the "closed" ones.
    pub fn new(metrics: Arc<Metrics>, direction: Direction, info: ConnInfo) -> Self {
        ConnectionResult {
            metrics,
            direction,
            reporter: match direction {
                Direction::Outbound => Reporter::source,
                Direction::Inbound => Reporter::destination,
            },
            start: Instant::now(),
            state: Mutex::new(Some(Pending {
                info,
                opened_labels: None,
            })),
        }
    }

    /// Updates what is known about the connection.
    pub fn update(&self, f: impl FnOnce(&mut ConnInfo)) {
        if let Some(p) = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            f(&mut p.info);
        }
    }

    /// Marks the connection as established (counts it as opened).
    pub fn opened(&self) {
        if let Some(p) = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            && p.opened_labels.is_none()
        {
            let l = self.metrics.intern(p.info.labels(self.reporter));
            self.metrics.opened.get_or_create(&l).inc();
            // The shared labels spell both identities from now on; an idle connection need
            // not keep its own copies.
            p.info.src_identity = None;
            p.info.dst_identity = None;
            p.opened_labels = Some(l);
        }
    }

    /// Records the end of the connection: bytes each way (from the client's point of view:
    /// `sent` = towards the client, `received` = from the client) and the outcome.
    pub fn finish(&self, received: u64, sent: u64, outcome: Outcome) {
        let Some(p) = self.state.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let labels = p.opened_labels.unwrap_or_else(|| {
            let l = self.metrics.intern(p.info.labels(self.reporter));
            self.metrics.opened.get_or_create(&l).inc();
            l
        });
        self.metrics.closed.get_or_create(&labels).inc();
        self.metrics
            .received
            .get_or_create(&labels)
            .inc_by(received);
        self.metrics.sent.get_or_create(&labels).inc_by(sent);
        self.log(&p.info, &labels, received, sent, &outcome);
    }

    fn log(&self, i: &ConnInfo, l: &ConnLabels, received: u64, sent: u64, outcome: &Outcome) {
        let d = |v: &Option<SocketAddr>| v.map(|a| a.to_string()).unwrap_or_default();
        // Identities moved into the labels when the connection opened.
        let id = |v: &Option<Identity>, principal: &str| match v {
            Some(a) => a.to_string(),
            None if principal != "unknown" => principal.to_owned(),
            None => String::new(),
        };
        let wl = |w: &Option<Arc<Workload>>| w.as_ref().map(|w| w.name.clone()).unwrap_or_default();
        let ns =
            |w: &Option<Arc<Workload>>| w.as_ref().map(|w| w.namespace.clone()).unwrap_or_default();
        let svc = i
            .dst_service
            .as_ref()
            .map(|s| s.hostname.clone())
            .unwrap_or_default();
        let duration_ms = self.start.elapsed().as_millis() as u64;
        match outcome {
            Outcome::Ok => info!(
                target: "access",
                direction = %self.direction,
                src.addr = d(&i.src_addr), src.workload = wl(&i.src_workload), src.namespace = ns(&i.src_workload), src.identity = id(&i.src_identity, &l.source_principal),
                dst.addr = d(&i.dst_addr), dst.hbone_addr = d(&i.dst_hbone_addr), dst.service = svc, dst.workload = wl(&i.dst_workload), dst.namespace = ns(&i.dst_workload), dst.identity = id(&i.dst_identity, &l.destination_principal),
                bytes_sent = sent, bytes_recv = received, duration_ms,
                "connection complete"
            ),
            Outcome::Denied { policy, reason } => warn!(
                target: "access",
                direction = %self.direction,
                src.addr = d(&i.src_addr), src.workload = wl(&i.src_workload), src.namespace = ns(&i.src_workload), src.identity = id(&i.src_identity, &l.source_principal),
                dst.addr = d(&i.dst_addr), dst.hbone_addr = d(&i.dst_hbone_addr), dst.service = svc, dst.workload = wl(&i.dst_workload), dst.namespace = ns(&i.dst_workload), dst.identity = id(&i.dst_identity, &l.destination_principal),
                bytes_sent = sent, bytes_recv = received, duration_ms,
                policy = policy.as_deref().unwrap_or("-"), reason = %reason,
                error = "connection denied by policy",
                "connection complete"
            ),
            Outcome::Error(e) => warn!(
                target: "access",
                direction = %self.direction,
                src.addr = d(&i.src_addr), src.workload = wl(&i.src_workload), src.namespace = ns(&i.src_workload), src.identity = id(&i.src_identity, &l.source_principal),
                dst.addr = d(&i.dst_addr), dst.hbone_addr = d(&i.dst_hbone_addr), dst.service = svc, dst.workload = wl(&i.dst_workload), dst.namespace = ns(&i.dst_workload), dst.identity = id(&i.dst_identity, &l.destination_principal),
                bytes_sent = sent, bytes_recv = received, duration_ms,
                error = %e,
                "connection complete"
            ),
        }
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        self.finish(
            0,
            0,
            Outcome::Error("connection closed by drain or cancellation".into()),
        );
    }
}
