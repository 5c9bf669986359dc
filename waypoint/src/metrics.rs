//! Istio's request metrics and the access log: one [`Record`] per request, written once.
//!
//! Metric names and labels are Istio's standard ones (`istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`),
//! with `reporter="waypoint"` as Istio's ambient waypoints report. Opaque TCP streams count in
//! `istio_tcp_connections_opened_total`/`closed_total` and the byte counters.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tracing::info;

/// Istio's standard request labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
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
    pub src_addr: String,
    pub dst_addr: String,
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
    /// Writes the access-log line and records the metrics. Called exactly once per request.
    pub fn finish(&self, m: &Metrics) {
        let l = &self.labels;
        info!(
            target: "access",
            src_identity = %l.source_principal,
            src_addr = %self.src_addr,
            src_workload = %l.source_workload,
            dst_service = %l.destination_service,
            dst_addr = %self.dst_addr,
            dst_workload = %l.destination_workload,
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
        m.requests.get_or_create(l).inc();
        m.duration.get_or_create(l).observe(self.duration_ms);
        m.request_bytes
            .get_or_create(l)
            .observe(self.request_bytes as f64);
        m.response_bytes
            .get_or_create(l)
            .observe(self.response_bytes as f64);
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
