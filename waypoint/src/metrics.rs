//! Istio's request metrics and the access log: one [`Record`] per request, written once.
//!
//! Metric names and labels are Istio's standard ones (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`),
//! with `reporter="waypoint"` as Istio's ambient waypoints report. Opaque TCP streams count in
//! `istio_tcp_connections_opened_total`/`closed_total` and the byte counters.

use std::sync::{Arc, LazyLock, Mutex};

use mesh_core::{
    Identity,
    workload::{Service, Workload},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, LabelSetEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tracing::info;

/// A label value shared by every request carrying it: cloning it is a reference count.
pub type Label = Arc<str>;

fn unknown() -> Label {
    static U: LazyLock<Label> = LazyLock::new(|| Arc::from("unknown"));
    U.clone()
}

fn label_or_unknown(v: &str) -> Label {
    if v.is_empty() {
        unknown()
    } else {
        Arc::from(v)
    }
}

/// A group of labels built once and shared (the same for every request of a downstream
/// connection while the workload or service it comes from stays the same). Encodes as its
/// own labels, in place.
#[derive(Debug, Hash, PartialEq, Eq)]
pub struct Group<T>(pub Arc<T>);

impl<T> Clone for Group<T> {
    fn clone(&self) -> Self {
        Group(self.0.clone())
    }
}

impl<T> std::ops::Deref for Group<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: EncodeLabelSet> EncodeLabelSet for Group<T> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// The source workload's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source_workload: Label,
    pub source_workload_namespace: Label,
    pub source_principal: Label,
    pub source_app: Label,
    pub source_version: Label,
    pub source_cluster: Label,
}

impl SourceLabels {
    fn new(w: Option<&Workload>, peer: Option<&Identity>) -> Self {
        let f = |g: fn(&Workload) -> &str| w.map_or_else(unknown, |w| label_or_unknown(g(w)));
        SourceLabels {
            source_workload: f(|w| w.workload_name()),
            source_workload_namespace: f(|w| &w.namespace),
            source_principal: peer.map_or_else(unknown, |p| Arc::from(p.to_string())),
            source_app: f(|w| w.canonical_service()),
            source_version: f(|w| w.canonical_revision()),
            source_cluster: f(|w| &w.cluster_id),
        }
    }
}

/// The destination service's labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: Label,
    pub destination_service_namespace: Label,
    pub destination_service_name: Label,
}

impl ServiceLabels {
    fn new(s: &Service) -> Self {
        ServiceLabels {
            destination_service: Arc::from(s.hostname.as_str()),
            destination_service_namespace: Arc::from(s.namespace.as_str()),
            destination_service_name: Arc::from(s.name.as_str()),
        }
    }

    /// A request to a workload address, or one that never found its destination.
    pub fn unknown() -> Group<Self> {
        static U: LazyLock<Group<ServiceLabels>> = LazyLock::new(|| {
            Group(Arc::new(ServiceLabels {
                destination_service: unknown(),
                destination_service_namespace: unknown(),
                destination_service_name: unknown(),
            }))
        });
        U.clone()
    }
}

/// The destination workload's labels (the endpoint the request went to).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination_workload: Label,
    pub destination_workload_namespace: Label,
    pub destination_principal: Label,
    pub destination_app: Label,
    pub destination_version: Label,
    pub destination_cluster: Label,
}

impl DestinationLabels {
    fn new(w: &Workload) -> Self {
        DestinationLabels {
            destination_workload: Arc::from(w.workload_name()),
            destination_workload_namespace: Arc::from(w.namespace.as_str()),
            destination_principal: w
                .identity()
                .map_or_else(|_| unknown(), |i| Arc::from(i.to_string())),
            destination_app: Arc::from(w.canonical_service()),
            destination_version: Arc::from(w.canonical_revision()),
            destination_cluster: label_or_unknown(&w.cluster_id),
        }
    }

    /// A request that never reached an endpoint.
    pub fn unknown() -> Group<Self> {
        static U: LazyLock<Group<DestinationLabels>> = LazyLock::new(|| {
            Group(Arc::new(DestinationLabels {
                destination_workload: unknown(),
                destination_workload_namespace: unknown(),
                destination_principal: unknown(),
                destination_app: unknown(),
                destination_version: unknown(),
                destination_cluster: unknown(),
            }))
        });
        U.clone()
    }
}

/// Istio's standard request labels, in Istio's order.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    #[prometheus(flatten)]
    pub src: Group<SourceLabels>,
    #[prometheus(flatten)]
    pub svc: Group<ServiceLabels>,
    #[prometheus(flatten)]
    pub dst: Group<DestinationLabels>,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// One label set's request series, looked up once and then reused.
#[derive(Debug)]
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// What one downstream connection reuses between its requests: its label groups (keyed by
/// the workload or service entry they were built from, so a configuration change rebuilds
/// them) and the series of its last label set. Requests on one connection nearly always
/// share these, so the steady state builds no label string and hashes no label set.
#[derive(Debug, Default)]
pub struct LabelCache {
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    src: Option<(Option<Arc<Workload>>, Group<SourceLabels>)>,
    svc: Option<(Arc<Service>, Group<ServiceLabels>)>,
    dst: Option<(Arc<Workload>, Group<DestinationLabels>)>,
    series: Option<(RequestLabels, Series)>,
}

/// The group in `slot` if it was built from this very entry, else a new one, kept there.
fn cached<K, T>(
    slot: &mut Option<(Arc<K>, Group<T>)>,
    key: &Arc<K>,
    build: impl FnOnce(&K) -> T,
) -> Group<T> {
    if let Some((k, g)) = slot
        && Arc::ptr_eq(k, key)
    {
        return g.clone();
    }
    let g = Group(Arc::new(build(key)));
    *slot = Some((key.clone(), g.clone()));
    g
}

impl LabelCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source labels of a client: its workload entry (if known) and its identity, the
    /// same for the whole connection.
    pub fn source(&self, w: Option<Arc<Workload>>, peer: Option<&Identity>) -> Group<SourceLabels> {
        let mut c = self.lock();
        if let Some((k, g)) = &c.src
            && match (k, &w) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        {
            return g.clone();
        }
        let g = Group(Arc::new(SourceLabels::new(w.as_deref(), peer)));
        c.src = Some((w, g.clone()));
        g
    }

    pub fn service(&self, s: &Arc<Service>) -> Group<ServiceLabels> {
        cached(&mut self.lock().svc, s, ServiceLabels::new)
    }

    pub fn destination(&self, w: &Arc<Workload>) -> Group<DestinationLabels> {
        cached(&mut self.lock().dst, w, DestinationLabels::new)
    }

    /// Runs `f` on the series of `l`, from the last label set if it is the same.
    fn with_series(&self, m: &Metrics, l: &RequestLabels, f: impl FnOnce(&Series)) {
        let mut c = self.lock();
        if let Some((k, s)) = &c.series
            && k == l
        {
            return f(s);
        }
        let s = Series {
            requests: m.requests.get_or_create(l).clone(),
            duration: m.duration.get_or_create(l).clone(),
            request_bytes: m.request_bytes.get_or_create(l).clone(),
            response_bytes: m.response_bytes.get_or_create(l).clone(),
        };
        f(&s);
        c.series = Some((l.clone(), s));
    }
}

/// Istio's standard TCP labels (a subset of the request labels).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_principal: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub destination_principal: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1.0, 10.0, 10,
    ))
}

type Hist = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// The registered families.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    duration: Hist,
    request_bytes: Hist,
    response_bytes: Hist,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("istio");
        r.register("requests", "Requests handled", m.requests.clone());
        r.register(
            "request_duration_milliseconds",
            "Request duration",
            m.duration.clone(),
        );
        r.register(
            "request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        r.register(
            "response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "Opaque TCP streams opened",
            m.tcp_opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "Opaque TCP streams closed",
            m.tcp_closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes sent to clients",
            m.tcp_sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes received from clients",
            m.tcp_received.clone(),
        );
        Arc::new(m)
    }
}

/// Everything one request's log line and metrics say.
#[derive(Debug, Clone)]
pub struct Record {
    pub labels: RequestLabels,
    pub src_addr: std::net::SocketAddr,
    pub dst_addr: std::net::SocketAddr,
    pub upstream: Option<String>,
    pub authority: String,
    pub method: String,
    pub path: String,
    pub route: Option<String>,
    pub policy: Option<String>,
    pub reason: Option<String>,
    pub attempts: u32,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The HTTP version spoken to the upstream (`http` / `http2`), chosen by the destination
    /// port's protocol; `-` when the request never went upstream.
    pub upstream_protocol: &'static str,
    pub traceparent: String,
    /// The request's place in its trace (its span id is the one sent upstream).
    pub trace: crate::trace::TraceContext,
    /// Set when the request's span is to be exported ([`crate::trace`]).
    pub span: Option<Box<crate::trace::SpanStart>>,
}

impl Record {
    /// Writes the access-log line and records the metrics. Called exactly once per request;
    /// `cache` is the downstream connection's.
    pub fn finish(&self, m: &Metrics, cache: &LabelCache) {
        let l = &self.labels;
        info!(
            target: "access",
            src_identity = %l.src.source_principal,
            src_addr = %self.src_addr,
            src_workload = %l.src.source_workload,
            dst_service = %l.svc.destination_service,
            dst_addr = %self.dst_addr,
            dst_workload = %l.dst.destination_workload,
            upstream = self.upstream.as_deref().unwrap_or("-"),
            authority = %self.authority,
            method = %self.method,
            path = %self.path,
            protocol = l.request_protocol,
            upstream_protocol = self.upstream_protocol,
            status = l.response_code,
            grpc_status = %l.grpc_response_status,
            flags = l.response_flags,
            route = self.route.as_deref().unwrap_or("-"),
            policy = self.policy.as_deref().unwrap_or("-"),
            reason = self.reason.as_deref().unwrap_or("-"),
            attempts = self.attempts,
            duration_ms = format!("{:.3}", self.duration_ms),
            bytes_in = self.request_bytes,
            bytes_out = self.response_bytes,
            traceparent = %self.traceparent,
            "request"
        );
        cache.with_series(m, l, |s| {
            s.requests.inc();
            s.duration.observe(self.duration_ms);
            s.request_bytes.observe(self.request_bytes as f64);
            s.response_bytes.observe(self.response_bytes as f64);
        });
    }
}

/// An opaque TCP stream's accounting.
pub fn tcp_opened(m: &Metrics, l: &TcpLabels) {
    m.tcp_opened.get_or_create(l).inc();
}

pub fn tcp_closed(m: &Metrics, l: &TcpLabels, sent: u64, received: u64) {
    m.tcp_closed.get_or_create(l).inc();
    m.tcp_sent.get_or_create(l).inc_by(sent);
    m.tcp_received.get_or_create(l).inc_by(received);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(labels: RequestLabels) -> Record {
        Record {
            labels,
            src_addr: "10.0.0.1:40000".parse().unwrap(),
            dst_addr: "10.96.0.1:80".parse().unwrap(),
            upstream: None,
            authority: "svc".into(),
            method: "GET".into(),
            path: "/".into(),
            route: None,
            policy: None,
            reason: None,
            attempts: 1,
            duration_ms: 1.0,
            request_bytes: 0,
            response_bytes: 10,
            upstream_protocol: "http",
            traceparent: String::new(),
            trace: crate::trace::TraceContext {
                trace_id: 1,
                parent: None,
                span_id: 2,
                flags: 0,
            },
            span: None,
        }
    }

    fn labels(
        cache: &LabelCache,
        svc: &Arc<Service>,
        w: &Arc<Workload>,
        code: u16,
    ) -> RequestLabels {
        RequestLabels {
            reporter: "waypoint",
            src: cache.source(None, None),
            svc: cache.service(svc),
            dst: cache.destination(w),
            request_protocol: "http",
            response_code: code,
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    fn scrape(r: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap();
        out
    }

    #[test]
    fn cached_series_follow_the_labels_and_configuration_changes() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        let cache = LabelCache::default();
        let svc = |name: &str| {
            Arc::new(Service {
                name: name.into(),
                namespace: "ns".into(),
                hostname: format!("{name}.ns.svc.cluster.local"),
                ..Default::default()
            })
        };
        let (a, w) = (
            svc("a"),
            Arc::new(Workload {
                name: "pod-1".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                ..Default::default()
            }),
        );
        for code in [200, 200, 503, 200] {
            record(labels(&cache, &a, &w, code)).finish(&m, &cache);
        }
        // The same service under a new entry (a configuration push) and another service.
        let a2 = svc("a");
        record(labels(&cache, &a2, &w, 200)).finish(&m, &cache);
        record(labels(&cache, &svc("b"), &w, 200)).finish(&m, &cache);
        let text = scrape(&reg);
        let line = |svc: &str, code: u16| {
            format!(
                "istio_requests_total{{reporter=\"waypoint\",source_workload=\"unknown\",\
                 source_workload_namespace=\"unknown\",source_principal=\"unknown\",\
                 source_app=\"unknown\",source_version=\"unknown\",source_cluster=\"unknown\",\
                 destination_service=\"{svc}.ns.svc.cluster.local\",\
                 destination_service_namespace=\"ns\",destination_service_name=\"{svc}\",\
                 destination_workload=\"pod-1\",destination_workload_namespace=\"ns\",\
                 destination_principal=\"spiffe://cluster.local/ns/ns/sa/sa\",\
                 destination_app=\"pod-1\",destination_version=\"latest\",\
                 destination_cluster=\"unknown\",request_protocol=\"http\",\
                 response_code=\"{code}\",grpc_response_status=\"\",response_flags=\"-\",\
                 connection_security_policy=\"mutual_tls\"}}"
            )
        };
        for (svc, code, n) in [("a", 200, 4), ("a", 503, 1), ("b", 200, 1)] {
            let want = format!("{} {n}\n", line(svc, code));
            assert!(text.contains(&want), "missing {want} in\n{text}");
        }
        assert!(text.contains("istio_request_bytes_count{"), "{text}");
    }
}
