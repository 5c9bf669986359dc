//! OTLP trace spans from the waypoint (issue 7 §4), through the real path on loopback:
//! client → ztunnel A → HBONE → waypoint → HBONE → ztunnel B → app, with an in-process tonic
//! OTLP collector. Each test owns a 127.N.0.0/24 block (N = 140…144); the collector listens
//! on .9.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::net::TcpListener;
use waypoint::trace::proto::{
    collector::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::any_value::Value,
    trace::{Span, span::SpanKind, status::StatusCode},
};

use common::*;

// ------------------------------------------------------------------ the collector

#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start(net: u8) -> (Collector, SocketAddr) {
        let l = TcpListener::bind((ip(net, 9), 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = Collector::default();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(c.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        (c, addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    fn service_names(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|r| r.resource.as_ref().map(|r| attrs(&r.attributes)))
            .filter_map(|a| a.get("service.name").cloned())
            .collect()
    }

    /// Waits until `n` spans arrived, then a few batch intervals more so extra ones show.
    async fn wait_for(&self, n: usize) -> Vec<Span> {
        for _ in 0..500 {
            if self.spans().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.spans()
    }
}

fn attrs(kv: &[waypoint::trace::proto::common::KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

async fn lab_with_collector(net: u8, objects: &str) -> (Lab, Collector) {
    let (collector, addr) = Collector::start(net).await;
    let lab = Lab::with_waypoint_args(
        net,
        objects,
        false,
        &[
            "--tracing-otlp-endpoint".into(),
            format!("http://{addr}"),
            "--tracing-sampling".into(),
            "100".into(),
            "--tracing-batch-interval".into(),
            "50ms".into(),
        ],
    )
    .await;
    (lab, collector)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_request_exports_one_server_span_that_parents_the_upstream() {
    let (lab, collector) = lab_with_collector(140, "").await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let r = send(
        &mut c,
        "GET",
        "/traced",
        &[
            ("traceparent", &tp),
            ("tracestate", "vendor=opaque,other=1"),
            ("user-agent", "tracing-test/1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // What the app saw: the same trace, our span as its parent, tracestate unchanged.
    let hit = lab
        .hits()
        .into_iter()
        .find(|h| h.path == "/traced")
        .unwrap();
    let up = &hit.headers["traceparent"];
    let parts: Vec<&str> = up.split('-').collect();
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE, "01"), "{up}");
    assert_ne!(parts[2], PARENT, "the upstream hop has a new parent");
    assert_eq!(hit.headers["tracestate"], "vendor=opaque,other=1");

    let spans = collector.wait_for(1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let s = &spans[0];
    assert_eq!(hex(&s.trace_id), TRACE);
    assert_eq!(hex(&s.parent_span_id), PARENT);
    assert_eq!(
        hex(&s.span_id),
        parts[2],
        "the upstream's parent is our span"
    );
    assert_eq!(s.kind, SpanKind::Server as i32);
    assert_eq!(s.name, "echo.foo.svc.cluster.local:80/*");
    assert_eq!(s.trace_state, "vendor=opaque,other=1");
    assert_eq!(s.flags & 0xff, 1);
    assert!(s.status.is_none(), "{:?}", s.status);
    assert!(s.end_time_unix_nano >= s.start_time_unix_nano && s.start_time_unix_nano > 0);
    let a = attrs(&s.attributes);
    for (k, v) in [
        ("component", "proxy"),
        ("http.method", "GET"),
        ("http.url", "http://echo.foo.svc.cluster.local/traced"),
        ("http.protocol", "HTTP/1.1"),
        ("http.status_code", "200"),
        ("response_flags", "-"),
        ("user_agent", "tracing-test/1"),
        ("peer.address", "127.140.0.2"),
        (
            "upstream_cluster",
            "inbound-vip|80|http|echo.foo.svc.cluster.local",
        ),
        ("istio.canonical_service", "waypoint"),
        ("istio.namespace", "foo"),
        ("istio.mesh_id", "cluster.local"),
        ("istio.cluster_id", "Kubernetes"),
        (
            "istio.source_principal",
            "spiffe://cluster.local/ns/bar/sa/sleep",
        ),
        ("istio.source_workload", "sleep"),
        ("istio.source_namespace", "bar"),
        ("istio.destination_service", "echo.foo.svc.cluster.local"),
        ("istio.destination_workload", "echo"),
        (
            "istio.destination_principal",
            "spiffe://cluster.local/ns/foo/sa/echo",
        ),
    ] {
        assert_eq!(a.get(k).map(String::as_str), Some(v), "{k} in {a:#?}");
    }
    assert!(a["node_id"].starts_with("waypoint~"), "{a:#?}");
    assert!(a["upstream_address"].starts_with("127.140.0.3:"), "{a:#?}");
    assert!(!a.contains_key("error"));
    assert_eq!(collector.service_names(), vec!["waypoint.foo".to_string()]);
    assert_eq!(
        lab.wp.tracer.as_ref().unwrap().stats().exported(),
        1,
        "counted as exported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_export_nothing_and_new_traces_follow_the_rate() {
    let (lab, collector) = lab_with_collector(141, "").await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let unsampled = format!("00-{TRACE}-{PARENT}-00");
    for _ in 0..3 {
        let r = send(&mut c, "GET", "/quiet", &[("traceparent", &unsampled)]).await;
        assert_eq!(r.status, 200);
    }
    // The caller's "not sampled" travels on.
    let hit = lab.hits().into_iter().find(|h| h.path == "/quiet").unwrap();
    assert!(hit.headers["traceparent"].ends_with("-00"), "{hit:?}");
    // No context at all: the waypoint starts a trace, sampled at 100 %.
    assert_eq!(send(&mut c, "GET", "/fresh", &[]).await.status, 200);
    let spans = collector.wait_for(1).await;
    assert_eq!(spans.len(), 1, "only the fresh trace: {spans:#?}");
    let s = &spans[0];
    assert!(s.parent_span_id.is_empty(), "a root span");
    let hit = lab.hits().into_iter().find(|h| h.path == "/fresh").unwrap();
    assert_eq!(
        hit.headers["traceparent"],
        format!("00-{}-{}-01", hex(&s.trace_id), hex(&s.span_id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_failed_requests_export_spans_naming_policy_and_error() {
    let (lab, collector) = lab_with_collector(
        142,
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-admin, namespace: foo}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
    action: DENY
    rules:
    - to: [{operation: {paths: ["/admin"]}}]
"#,
    )
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let r = send(&mut c, "GET", "/admin", &[("traceparent", &tp)]).await;
    assert_eq!(r.status, 403);
    let r = send(&mut c, "GET", "/status/500", &[("traceparent", &tp)]).await;
    assert_eq!(r.status, 500);
    let spans = collector.wait_for(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let by_url = |u: &str| {
        spans
            .iter()
            .find(|s| attrs(&s.attributes)["http.url"].ends_with(u))
            .unwrap_or_else(|| panic!("no span for {u}: {spans:#?}"))
    };

    let denied = by_url("/admin");
    let a = attrs(&denied.attributes);
    assert_eq!(a["http.status_code"], "403");
    assert_eq!(a["response_flags"], "RBAC");
    assert_eq!(a["istio.authorization.deny_policy.name"], "foo/no-admin");
    assert!(!a.contains_key("upstream_cluster"), "never sent upstream");
    assert_eq!(hex(&denied.trace_id), TRACE);
    assert_eq!(hex(&denied.parent_span_id), PARENT);
    assert!(denied.status.is_none(), "a 4xx is not a server error");

    let failed = by_url("/status/500");
    let a = attrs(&failed.attributes);
    assert_eq!(a["http.status_code"], "500");
    assert_eq!(a["error"], "true");
    let status = failed.status.as_ref().unwrap();
    assert_eq!(status.code, StatusCode::Error as i32);
    assert_ne!(failed.span_id, denied.span_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_neither_fails_nor_slows_requests() {
    // A port that was just free: nothing answers there.
    let dead = TcpListener::bind((ip(143, 9), 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let lab = Lab::with_waypoint_args(
        143,
        "",
        false,
        &[
            "--tracing-otlp-endpoint".into(),
            format!("http://{dead}"),
            "--tracing-sampling".into(),
            "100".into(),
            "--tracing-batch-interval".into(),
            "20ms".into(),
            "--tracing-batch-size".into(),
            "4".into(),
            "--tracing-queue-size".into(),
            "8".into(),
        ],
    )
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let n = 60;
    let started = tokio::time::Instant::now();
    for _ in 0..n {
        let r = send(&mut c, "GET", "/", &[]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let took = started.elapsed();
    // Export retries back off for 0.3 s per batch; requests must not wait for any of it.
    assert!(took < Duration::from_secs(5), "{n} requests took {took:?}");
    let stats = lab.wp.tracer.as_ref().unwrap().stats().clone();
    let mut lost = 0;
    for _ in 0..500 {
        lost = stats.dropped("queue_full") + stats.dropped("export_failed");
        if lost == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lost, n, "every span is accounted for as dropped");
    assert!(
        stats.dropped("queue_full") > 0,
        "the small queue overflowed"
    );
    assert_eq!(stats.exported(), 0);
    let (_, metrics) = mesh_test::http_get(lab.wp.addresses.stats, "/metrics").await;
    assert!(
        metrics.contains("waypoint_trace_spans_dropped_total{reason=\"export_failed\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_at_shutdown_are_flushed() {
    let (collector, addr) = Collector::start(144).await;
    let lab = Lab::with_waypoint_args(
        144,
        "",
        false,
        &[
            "--tracing-otlp-endpoint".into(),
            format!("http://{addr}"),
            "--tracing-sampling".into(),
            "100".into(),
            // Far longer than the test: only the shutdown flush can send it.
            "--tracing-batch-interval".into(),
            "1h".into(),
        ],
    )
    .await;
    {
        let mut c = lab.h1(lab.vip(100, 80)).await;
        assert_eq!(send(&mut c, "GET", "/last", &[]).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(collector.spans().is_empty(), "nothing sent before shutdown");
    let Lab { wp, .. } = lab;
    wp.wait_termination(async {}).await;
    let spans = collector.spans();
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert!(attrs(&spans[0].attributes)["http.url"].ends_with("/last"));
}
