//! Trace spans: the W3C trace context of each request, and the one SERVER span per HTTP
//! request the waypoint proxies or answers itself, exported over OTLP ([`export`]).
//!
//! ```text
//! traceparent 00-T-P-01 ──► waypoint span S (trace T, parent P) ──► upstream gets 00-T-S-01
//!   (none or invalid) ────► new trace T', sampled with TRACING_SAMPLING % ─► 00-T'-S-0x
//! ```
//!
//! Invariants:
//! - the span id the waypoint sends upstream is the id of its own span, so the upstream's
//!   parent is the waypoint; `tracestate` passes through untouched;
//! - the caller's sampled flag decides; only a trace the waypoint starts is sampled here;
//! - with tracing off, or for an unsampled request, nothing is built but the context
//!   (two random numbers): no clock read, no allocation, no channel send;
//! - a span is built from the request's [`Record`] (the access-log facts) at export time, on
//!   the exporter's task, not on the request path.
//!
//! Attributes follow what Envoy's tracer and Istio's custom tags put on a waypoint's
//! spans (see `docs/waypoint.md`, Tracing), all string-valued as Envoy sends them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Request, header};

use crate::{metrics::Record, state::Target};

pub mod export;

/// The generated OTLP messages and client (`proto/opentelemetry`, built by `mesh-proto`).
pub mod proto {
    pub use mesh_proto::opentelemetry::proto::{
        collector::trace::v1 as collector, common::v1 as common, resource::v1 as resource,
        trace::v1 as trace,
    };
}

use proto::{common, trace as otlp};

/// Where one request sits in its trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    /// The caller's span (the waypoint span's parent); `None` when the waypoint started the
    /// trace.
    pub parent: Option<u64>,
    /// The waypoint's span: the parent id the upstream hop sees.
    pub span_id: u64,
    /// W3C trace flags; bit 0 is "sampled".
    pub flags: u8,
}

fn hex_u128(s: &str) -> Option<u128> {
    (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
}

/// `(trace id, parent span id, flags)` of a valid W3C `traceparent` (any version but `ff`,
/// later versions read by their version-00 prefix); all-zero ids are invalid.
pub fn parse_traceparent(s: &str) -> Option<(u128, u64, u8)> {
    let mut parts = s.split('-');
    let version = parts.next()?;
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version.eq_ignore_ascii_case("ff") || !hex(parent, 16) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = hex_u128(trace).filter(|t| *t != 0)?;
    let parent = u64::from_str_radix(parent, 16).ok().filter(|p| *p != 0)?;
    let flags = (flags.len() == 2)
        .then(|| u8::from_str_radix(flags, 16).ok())
        .flatten()?;
    Some((trace, parent, flags))
}

impl TraceContext {
    /// Continues the caller's trace (its flags kept) or starts one, sampled with probability
    /// `sample_ppm` per million. The span id is always new.
    pub fn continue_or_start(incoming: Option<&HeaderValue>, sample_ppm: u32) -> TraceContext {
        let span_id = rand::random::<u64>().max(1);
        match incoming
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
        {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                parent: Some(parent),
                span_id,
                flags,
            },
            None => TraceContext {
                trace_id: rand::random::<u128>().max(1),
                parent: None,
                span_id,
                flags: u8::from(sample_ppm > 0 && rand::random_range(0..1_000_000) < sample_ppm),
            },
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` for the upstream hop: version 00, our span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        let s = format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        );
        HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// What the request path holds when tracing is on: the sampling rate for new traces and
/// where finished spans go.
#[derive(Debug, Clone)]
pub struct Tracing {
    /// TRACING_SAMPLING as parts per million.
    pub sample_ppm: u32,
    pub sink: export::Sink,
}

/// The facts of an exported span that the access-log [`Record`] does not keep. Only built
/// for sampled requests while tracing is on.
#[derive(Debug, Clone)]
pub struct SpanStart {
    pub sink: export::Sink,
    pub start: SystemTime,
    /// Envoy's operation name for inbound spans: `<service host>:<port>/*`.
    pub name: String,
    pub protocol: &'static str,
    pub tracestate: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    /// Istio's cluster name for the backend chosen (`inbound-vip|port|http|host`).
    pub upstream_cluster: Option<String>,
}

/// The request's trace context, and what its span needs when it is to be exported.
pub fn begin<B>(
    tracing: Option<&Tracing>,
    req: &Request<B>,
    target: Option<&Target>,
    dst: std::net::SocketAddr,
) -> (TraceContext, Option<Box<SpanStart>>) {
    let ctx = TraceContext::continue_or_start(
        req.headers().get("traceparent"),
        tracing.map_or(0, |t| t.sample_ppm),
    );
    let Some(t) = tracing.filter(|_| ctx.sampled()) else {
        return (ctx, None);
    };
    let h = req.headers();
    let name = match target {
        Some(Target::Service { service, port }) => format!("{}:{port}/*", service.hostname),
        Some(Target::Workload { addr, .. }) => format!("{addr}/*"),
        None => format!("{dst}/*"),
    };
    let start = Box::new(SpanStart {
        sink: t.sink.clone(),
        start: SystemTime::now(),
        name,
        protocol: if req.version() == http::Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        tracestate: joined(h, "tracestate"),
        user_agent: joined(h, header::USER_AGENT.as_str()),
        request_id: joined(h, "x-request-id"),
        upstream_cluster: None,
    });
    (ctx, Some(start))
}

/// Every value of header `name`, comma-joined (W3C allows `tracestate` in several lines).
fn joined(h: &HeaderMap, name: &str) -> Option<String> {
    let mut vs = h.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let first = vs.next()?.to_string();
    Some(vs.fold(first, |mut acc, v| {
        acc.push(',');
        acc.push_str(v);
        acc
    }))
}

/// Names the backend cluster on the span, when there is one to export.
pub fn set_cluster(rec: &mut Record, host: &str, port: u16) {
    if let Some(s) = rec.span.as_mut() {
        s.upstream_cluster = Some(format!("inbound-vip|{port}|http|{host}"));
    }
}

/// Hands the finished request to the exporter (never waits: a full queue drops and counts).
pub fn finish(rec: Record) {
    if let Some(sink) = rec.span.as_ref().map(|s| s.sink.clone()) {
        sink.send(Box::new(rec));
    }
}

/// The attributes every span of this waypoint carries, and its resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `<gateway>.<namespace>`: the xDS node's cluster, which Istio uses as the OTel
    /// service name.
    pub service_name: String,
    pub node_id: String,
    /// The Gateway (the waypoint's canonical service).
    pub gateway: String,
    pub namespace: String,
    pub mesh_id: String,
    pub cluster_id: String,
}

fn kv(key: &str, v: impl Into<String>) -> common::KeyValue {
    common::KeyValue {
        key: key.to_string(),
        value: Some(common::AnyValue {
            value: Some(common::any_value::Value::StringValue(v.into())),
        }),
    }
}

impl Identity {
    pub fn resource(&self) -> proto::resource::Resource {
        proto::resource::Resource {
            attributes: vec![kv("service.name", &self.service_name)],
            dropped_attributes_count: 0,
        }
    }

    /// Envoy's and Istio's per-proxy tags.
    fn static_attributes(&self) -> Vec<common::KeyValue> {
        vec![
            kv("component", "proxy"),
            kv("node_id", &self.node_id),
            kv("istio.canonical_service", &self.gateway),
            kv("istio.canonical_revision", "latest"),
            kv("istio.namespace", &self.namespace),
            kv("istio.mesh_id", &self.mesh_id),
            kv("istio.cluster_id", &self.cluster_id),
        ]
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The OTLP span of a finished request (`None` if it was not to be exported).
pub fn to_span(rec: &Record, id: &Identity) -> Option<otlp::Span> {
    let s = rec.span.as_deref()?;
    let l = &rec.labels;
    let mut a = id.static_attributes();
    a.push(kv("http.method", &rec.method));
    a.push(kv(
        "http.url",
        format!("http://{}{}", rec.authority, rec.path),
    ));
    a.push(kv("http.protocol", s.protocol));
    a.push(kv("http.status_code", l.response_code.to_string()));
    a.push(kv("response_flags", l.response_flags));
    a.push(kv("request_size", rec.request_bytes.to_string()));
    a.push(kv("response_size", rec.response_bytes.to_string()));
    a.push(kv("user_agent", s.user_agent.as_deref().unwrap_or("-")));
    let peer = rec.src_addr.ip().to_canonical().to_string();
    a.push(kv("peer.address", peer));
    if let Some(r) = &s.request_id {
        a.push(kv("guid:x-request-id", r));
    }
    if let Some(c) = &s.upstream_cluster {
        a.push(kv("upstream_cluster", c));
        a.push(kv("upstream_cluster.name", c));
    }
    if let Some(u) = &rec.upstream {
        a.push(kv("upstream_address", u));
    }
    if !l.grpc_response_status.is_empty() {
        a.push(kv("grpc.status_code", &l.grpc_response_status));
    }
    for (k, v) in [
        ("istio.source_principal", &*l.src.source_principal),
        ("istio.source_workload", &*l.src.source_workload),
        ("istio.source_namespace", &*l.src.source_workload_namespace),
        ("istio.source_canonical_service", &*l.src.source_app),
        ("istio.source_canonical_revision", &*l.src.source_version),
        ("istio.source_cluster_id", &*l.src.source_cluster),
        ("istio.destination_service", &*l.svc.destination_service),
        ("istio.destination_principal", &*l.dst.destination_principal),
        ("istio.destination_workload", &*l.dst.destination_workload),
        (
            "istio.destination_namespace",
            &*l.dst.destination_workload_namespace,
        ),
        (
            "istio.destination_canonical_service",
            &*l.dst.destination_app,
        ),
        (
            "istio.destination_canonical_revision",
            &*l.dst.destination_version,
        ),
        ("istio.destination_cluster_id", &*l.dst.destination_cluster),
    ] {
        a.push(kv(k, v));
    }
    if let Some(r) = &rec.route {
        a.push(kv("istio.route", r));
    }
    match (l.response_flags, &rec.policy) {
        ("RBAC", Some(p)) => a.push(kv("istio.authorization.deny_policy.name", p)),
        ("UAEX", Some(p)) => a.push(kv("istio.request_authentication.name", p)),
        _ => {}
    }
    let error = l.response_code >= 500 || l.response_code == 0;
    let status = if error {
        a.push(kv("error", "true"));
        Some(otlp::Status {
            message: rec.reason.clone().unwrap_or_default(),
            code: otlp::status::StatusCode::Error as i32,
        })
    } else {
        None
    };
    let start = nanos(s.start);
    let end = start + Duration::from_secs_f64(rec.duration_ms.max(0.0) / 1000.0).as_nanos() as u64;
    Some(otlp::Span {
        trace_id: rec.trace.trace_id.to_be_bytes().to_vec(),
        span_id: rec.trace.span_id.to_be_bytes().to_vec(),
        trace_state: s.tracestate.clone().unwrap_or_default(),
        parent_span_id: rec
            .trace
            .parent
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        flags: u32::from(rec.trace.flags),
        name: s.name.clone(),
        kind: otlp::span::SpanKind::Server as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes: a,
        dropped_attributes_count: 0,
        dropped_events_count: 0,
        dropped_links_count: 0,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" => Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1)) ; "valid sampled")]
    #[test_case("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00" => Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 0)) ; "valid unsampled")]
    #[test_case("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra" => Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1)) ; "future version with more fields")]
    #[test_case("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra" => None ; "version 00 with more fields")]
    #[test_case("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" => None ; "version ff")]
    #[test_case("00-00000000000000000000000000000000-00f067aa0ba902b7-01" => None ; "zero trace id")]
    #[test_case("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01" => None ; "zero parent id")]
    #[test_case("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01" => None ; "short trace id")]
    #[test_case("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7" => None ; "no flags")]
    #[test_case("00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" => None ; "sign is not hex")]
    #[test_case("garbage" => None ; "garbage")]
    fn traceparent_parsing(s: &str) -> Option<(u128, u64, u8)> {
        parse_traceparent(s)
    }

    #[test]
    fn a_new_trace_is_sampled_by_the_configured_rate() {
        let all = (0..200)
            .map(|_| TraceContext::continue_or_start(None, 1_000_000))
            .filter(TraceContext::sampled)
            .count();
        assert_eq!(all, 200);
        let none = (0..200)
            .map(|_| TraceContext::continue_or_start(None, 0))
            .filter(TraceContext::sampled)
            .count();
        assert_eq!(none, 0);
        // The caller's decision wins over the rate, both ways.
        let unsampled =
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        let c = TraceContext::continue_or_start(Some(&unsampled), 1_000_000);
        assert!(!c.sampled());
        assert_eq!(c.parent, Some(0x00f067aa0ba902b7));
        assert_ne!(c.span_id, 0x00f067aa0ba902b7);
        let s = c.traceparent();
        assert_eq!(
            s.to_str().unwrap(),
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-00", c.span_id)
        );
    }
}
