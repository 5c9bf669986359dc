//! The whole path in-process on loopback, with real TLS everywhere:
//! client → ztunnel A (SOCKS5 entry) → HBONE → waypoint → HBONE → ztunnel B → app.
//! Each test owns a 127.N.0.0/24 block: .2 client + ztunnel A, .3 apps + ztunnel B,
//! .5 the waypoint, .100+ service VIPs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_and_denies_by_method_path_and_header() {
    let lab = Lab::new(
        60,
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: public-get, namespace: foo}
  spec:
    targetRefs: [{kind: Service, group: "", name: echo}]
    rules:
    - from: [{source: {principals: [cluster.local/ns/bar/sa/sleep]}}]
      to: [{operation: {methods: [GET], paths: ["/public/*"]}}]
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: block-header, namespace: foo}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
    action: DENY
    rules:
    - when: [{key: "request.headers[x-block]", values: ["yes"]}]
"#,
    )
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let r = send(&mut c, "GET", "/public/a", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("echo GET /public/a"));
    let r = send(&mut c, "POST", "/public/a", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    let r = send(&mut c, "GET", "/private", &[]).await;
    assert_eq!(r.status, 403);
    let r = send(&mut c, "GET", "/public/a", &[("x-block", "yes")]).await;
    assert_eq!(r.status, 403);
    // The same keep-alive connection still works after denials.
    assert_eq!(send(&mut c, "GET", "/public/b", &[]).await.status, 200);
    // The server saw the waypoint's identity and only the allowed requests.
    let seen: Vec<String> = lab
        .hits()
        .iter()
        .map(|h| format!("{} {}", h.method, h.path))
        .collect();
    assert_eq!(seen, vec!["GET /public/a", "GET /public/b"]);
}

// A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; source.ipBlocks must still
// match them (a DENY by ipBlocks that never matched would fail open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_blocks_match_ipv4_clients_on_a_dual_stack_listener() {
    let lab = Lab::new_with(
        75,
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-lab-net, namespace: foo}
  spec:
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
    action: DENY
    rules:
    - from: [{source: {ipBlocks: ["127.75.0.0/24"]}}]
      to: [{operation: {paths: ["/denied"]}}]
"#,
        true,
    )
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    assert_eq!(send(&mut c, "GET", "/ok", &[]).await.status, 200);
    let r = send(&mut c, "GET", "/denied", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_backends_split_90_10() {
    let lab = Lab::new(61, &format!(
        "{ROUTE_HEAD}  metadata: {{name: split, namespace: foo}}\n  spec:\n    parentRefs: [{{group: \"\", kind: Service, name: echo, port: 80}}]\n    rules:\n    - backendRefs: [{{name: echo, port: 80, weight: 90}}, {{name: echo-v2, port: 80, weight: 10}}]\n"
    ))
    .await;
    // The issue's 10k requests: with p = 0.1 the standard deviation of the share is 0.003,
    // so 0.09..0.11 is more than 3 sigma either way.
    let n = 10_000;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut c = lab.h1(lab.vip(100, 80)).await;
        tasks.push(tokio::spawn(async move {
            let mut v2 = 0;
            for _ in 0..n / 4 {
                let r = send(&mut c, "GET", "/", &[]).await;
                assert_eq!(r.status, 200);
                if r.headers["x-backend"] == "echo-v2" {
                    v2 += 1;
                }
            }
            v2
        }));
    }
    let mut v2 = 0;
    for t in tasks {
        v2 += t.await.unwrap();
    }
    let share = v2 as f64 / n as f64;
    assert!(
        (0.09..=0.11).contains(&share),
        "echo-v2 got {v2} of {n} ({share:.3})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_and_the_server_sees_both_tries() {
    let lab = Lab::new(62, "").await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let r = send(&mut c, "GET", "/flaky", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "try 2");
    let tries = lab.hits().iter().filter(|h| h.path == "/flaky").count();
    assert_eq!(tries, 2);
    // A persistent 503 is tried 1 + 2 times (Istio's default), then returned.
    let r = send(&mut c, "GET", "/status/503", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        lab.hits()
            .iter()
            .filter(|h| h.path == "/status/503")
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_returns_504() {
    let lab = Lab::new(63, &format!(
        "{ROUTE_HEAD}  metadata: {{name: slow, namespace: foo}}\n  spec:\n    parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n    rules:\n    - timeouts: {{request: 200ms}}\n      backendRefs: [{{name: echo, port: 80}}]\n"
    ))
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let t0 = std::time::Instant::now();
    let r = send(&mut c, "GET", "/delay/3000", &[]).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(send(&mut c, "GET", "/delay/1", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_delivers_a_copy_and_filters_edit_headers() {
    let lab = Lab::new(64, &format!(
        "{ROUTE_HEAD}  metadata: {{name: m, namespace: foo}}\n  spec:\n    parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n    rules:\n    - filters:\n      - {{type: RequestMirror, requestMirror: {{backendRef: {{name: mirror, port: 80}}}}}}\n      - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-added, value: yes}}], remove: [x-drop]}}}}\n      - {{type: ResponseHeaderModifier, responseHeaderModifier: {{add: [{{name: x-resp, value: wp}}]}}}}\n      backendRefs: [{{name: echo, port: 80}}]\n"
    ))
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let r = send(&mut c, "GET", "/copy-me", &[("x-drop", "1")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-resp"], "wp");
    let mut mirrored = None;
    for _ in 0..200 {
        mirrored = lab.hits().into_iter().find(|h| h.app == "mirror");
        if mirrored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m = mirrored.expect("mirror got no copy");
    assert_eq!(m.path, "/copy-me");
    assert!(m.headers["host"].ends_with("-shadow"), "{:?}", m.headers);
    let main = lab.hits().into_iter().find(|h| h.app == "echo").unwrap();
    assert_eq!(main.headers.get("x-added").map(String::as_str), Some("yes"));
    assert!(!main.headers.contains_key("x-drop"));
    assert!(main.headers.contains_key("traceparent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_rate_limit_returns_429() {
    let lab = Lab::new(65, &format!(
        "{ROUTE_HEAD}  metadata:\n    name: limited\n    namespace: foo\n    annotations: {{waypoint.mesh.io/rate-limit-requests: \"3\", waypoint.mesh.io/rate-limit-interval: 60s}}\n  spec:\n    parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n"
    ))
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(send(&mut c, "GET", "/", &[]).await.status);
    }
    assert_eq!(codes, vec![200, 200, 200, 429, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_passes_and_grpc_trailers_arrive() {
    let lab = Lab::new(66, "").await;
    let s = lab.dial(lab.vip(100, 80)).await;
    let (mut c, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::builder()
            .method("POST")
            .uri("http://echo.foo.svc.cluster.local/echo.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from(format!("hello {i}"))))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("no trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), format!("hello {i}"));
    }
    let req = Request::builder()
        .uri("http://echo.foo.svc.cluster.local/plain")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-backend"], "echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_grpc_service_answers_unary_errors_and_streams() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    // L7 policy applies to gRPC calls like any request: a DENY on a metadata header.
    let lab = Lab::new(
        76,
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-blocked, namespace: foo}
  spec:
    targetRefs: [{kind: Service, group: "", name: grpc}]
    action: DENY
    rules:
    - to: [{operation: {paths: [/grpc.health.v1.Health/Check]}}]
      when: [{key: "request.headers[x-block]", values: ["yes"]}]
"#,
    )
    .await;
    let (socks, src, dst) = (
        lab.a.addresses.socks5.unwrap(),
        ip(lab.net, 2),
        lab.vip(104, 50051),
    );
    // tonic's own client (h2, grpc-timeout, trailers), dialling through ztunnel A.
    let channel =
        tonic::transport::Endpoint::from_static("http://grpc.foo.svc.cluster.local:50051")
            .connect_with_connector(tower::service_fn(move |_| async move {
                mesh_test::socks_connect(socks, src, dst)
                    .await
                    .map(TokioIo::new)
            }))
            .await
            .unwrap();
    let mut client = HealthClient::new(channel);
    let req = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let ok = client.check(req("echo.Echo")).await.unwrap().into_inner();
    assert_eq!(ok.status, ServingStatus::Serving as i32);
    // An error is a trailers-only response (grpc-status in the headers): it must arrive as
    // the server's status, not as a proxy error.
    let err = client.check(req("no.Such")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    // Server streaming: the first message, then one pushed later by the server.
    let mut watch = client.watch(req("echo.Echo")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    lab.health
        .set_service_status("echo.Echo", tonic_health::ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("no streamed update")
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The denied call is answered as gRPC, as Envoy's waypoint does: a trailers-only
    // response with PERMISSION_DENIED and the RBAC text (not an HTTP 403 with a text body,
    // which a gRPC client reads as a malformed message).
    let mut blocked = tonic::Request::new(req("echo.Echo"));
    blocked.metadata_mut().insert(
        "x-block",
        tonic::metadata::MetadataValue::from_static("yes"),
    );
    let denied = client.check(blocked).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(denied.message(), "RBAC: access denied");
    // ... and the channel is still good for the next call.
    let again = client.check(req("echo.Echo")).await.unwrap().into_inner();
    assert_eq!(again.status, ServingStatus::NotServing as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes() {
    let lab = Lab::new(67, "").await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let req = Request::builder()
        .uri("/ws")
        .header("host", "echo")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let up = hyper::upgrade::on(resp).await.unwrap();
    let mut io = TokioIo::new(up);
    io.write_all(b"ping over the upgrade").await.unwrap();
    let mut buf = vec![0u8; 21];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping over the upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_fail_alone() {
    let lab = Lab::new(68, "").await;
    let mut good = lab.h1(lab.vip(100, 80)).await;
    assert_eq!(send(&mut good, "GET", "/", &[]).await.status, 200);
    // A broken header line.
    let mut bad = lab.dial(lab.vip(100, 80)).await;
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    // A head over the limit.
    let mut big = lab.dial(lab.vip(100, 80)).await;
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let _ = big.write_all(huge.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    // The well-behaved client is unaffected.
    assert_eq!(send(&mut good, "GET", "/after", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_port_is_relayed_opaquely_and_invalid_routes_are_reported() {
    let lab = Lab::new(69, &format!(
        "{ROUTE_HEAD}  metadata: {{name: broken, namespace: foo}}\n  spec:\n    parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n    rules: [{{matches: [{{path: {{type: RegularExpression, value: \"(\"}}}}]}}]\n{ROUTE_HEAD}  metadata: {{name: redirect, namespace: foo}}\n  spec:\n    parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n    rules:\n    - matches: [{{path: {{type: PathPrefix, value: /old}}}}]\n      filters: [{{type: RequestRedirect, requestRedirect: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}, statusCode: 301}}}}]\n    - backendRefs: [{{name: echo, port: 80}}]\n"
    ))
    .await;
    // Non-HTTP bytes on a tcp-named port: relayed untouched.
    let s = lab.dial(lab.vip(103, 9000)).await;
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let back = mesh_test::round_trip(s, &data).await.unwrap();
    assert_eq!(back, data);
    // The broken route is reported; the valid one serves.
    let (status, dump) = mesh_test::http_get(lab.wp.addresses.admin, "/config_dump").await;
    assert_eq!(status, 200);
    assert!(
        dump.contains("HTTPRoute foo/broken: spec.rules[0].matches[0].path.value"),
        "{dump}"
    );
    let mut c = lab.h1(lab.vip(100, 80)).await;
    let r = send(&mut c, "GET", "/old/x?q=1", &[]).await;
    assert_eq!(r.status, 301);
    assert_eq!(
        r.headers["location"],
        "http://echo.foo.svc.cluster.local/new/x?q=1"
    );
    assert_eq!(send(&mut c, "GET", "/other", &[]).await.status, 200);
    // Istio-named metrics with the waypoint as reporter.
    let (_, metrics) = mesh_test::http_get(lab.wp.addresses.stats, "/metrics").await;
    assert!(
        metrics.contains("istio_requests_total{reporter=\"waypoint\""),
        "{metrics}"
    );
    assert!(metrics.contains("response_code=\"301\""), "{metrics}");
    assert!(
        metrics.contains("source_principal=\"spiffe://cluster.local/ns/bar/sa/sleep\""),
        "{metrics}"
    );
    assert!(
        metrics.contains("istio_request_duration_milliseconds_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("istio_tcp_connections_opened_total"),
        "{metrics}"
    );
}

const JWT_SECRET: &[u8] = b"waypoint-test-secret-0123456789ab";

fn token(iss: &str, sub: &str, secret: &[u8]) -> String {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("k1".into());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({"iss": iss, "sub": sub, "exp": exp});
    jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_is_validated_then_authorized_by_request_principal() {
    let lab = Lab::new(
        70,
        r#"
- apiVersion: security.istio.io/v1
  kind: RequestAuthentication
  metadata: {name: jwt, namespace: foo}
  spec:
    targetRefs: [{kind: Service, group: "", name: echo}]
    jwtRules:
    - issuer: test-issuer
      jwks: '{"keys":[{"kty":"oct","k":"d2F5cG9pbnQtdGVzdC1zZWNyZXQtMDEyMzQ1Njc4OWFi","alg":"HS256","kid":"k1"}]}'
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: need-jwt, namespace: foo}
  spec:
    targetRefs: [{kind: Service, group: "", name: echo}]
    rules:
    - from: [{source: {requestPrincipals: ["test-issuer/alice"]}}]
"#,
    )
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    // No token: passes authentication, has no principal, so the ALLOW policy denies.
    let r = send(&mut c, "GET", "/", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (403, "RBAC: access denied"));
    // A token signed with another key: 401 from authentication.
    let bad = format!(
        "Bearer {}",
        token("test-issuer", "alice", b"some-other-secret-0123456789abcd")
    );
    let r = send(&mut c, "GET", "/", &[("authorization", &bad)]).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.headers.contains_key("www-authenticate"));
    // The right principal.
    let good = format!("Bearer {}", token("test-issuer", "alice", JWT_SECRET));
    let r = send(&mut c, "GET", "/", &[("authorization", &good)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A valid token of another subject: 403.
    let bob = format!("Bearer {}", token("test-issuer", "bob", JWT_SECRET));
    assert_eq!(
        send(&mut c, "GET", "/", &[("authorization", &bob)])
            .await
            .status,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_names_the_deciding_policy_and_faults_abort() {
    let logs = logs();
    let lab = Lab::new(
        71,
        &format!(
            r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {{name: no-delete, namespace: foo}}
  spec:
    targetRefs: [{{kind: Service, group: "", name: echo}}]
    action: DENY
    rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]
{ROUTE_HEAD}  metadata:
    name: faulty
    namespace: foo
    annotations: {{waypoint.mesh.io/fault-abort-status: "418"}}
  spec:
    parentRefs: [{{group: "", kind: Service, name: echo}}]
    rules: [{{matches: [{{path: {{type: PathPrefix, value: /teapot}}}}]}}]
"#
        ),
    )
    .await;
    let mut c = lab.h1(lab.vip(100, 80)).await;
    assert_eq!(send(&mut c, "DELETE", "/x", &[]).await.status, 403);
    let r = send(&mut c, "GET", "/teapot", &[]).await;
    assert_eq!(r.status, 418);
    assert!(lab.hits().is_empty(), "neither request reached the app");
    // The record is written when the response body ends; give it a moment.
    let vip = lab.vip(100, 80).to_string();
    let mut mine = Vec::new();
    for _ in 0..100 {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        mine = text
            .lines()
            .filter(|l| l.contains(&format!("dst_addr={vip}")))
            .map(str::to_string)
            .collect();
        if mine.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deny = mine
        .iter()
        .find(|l| l.contains("method=DELETE"))
        .expect("no log line for the DELETE");
    let has = |l: &str, k: &str, v: &str| {
        l.contains(&format!("{k}={v} ")) || l.contains(&format!("{k}=\"{v}\""))
    };
    assert!(has(deny, "status", "403"), "{deny}");
    assert!(has(deny, "policy", "foo/no-delete"), "{deny}");
    assert!(
        has(
            deny,
            "src_identity",
            "spiffe://cluster.local/ns/bar/sa/sleep"
        ),
        "{deny}"
    );
    assert!(has(deny, "flags", "RBAC"), "{deny}");
    let fault = mine
        .iter()
        .find(|l| l.contains("path=/teapot"))
        .expect("no log line for the fault");
    assert!(
        has(fault, "status", "418") && has(fault, "route", "foo/faulty#0"),
        "{fault}"
    );
    assert!(has(fault, "flags", "FI"), "{fault}");
}

/// Not a pass/fail test: prints requests per second through the whole path
/// (`cargo test -p waypoint --test direct -- --ignored --nocapture throughput`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput() {
    let lab = Lab::new(72, "").await;
    let (conns, per) = (8, 2500);
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut c = lab.h1(lab.vip(100, 80)).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                assert_eq!(send(&mut c, "GET", "/", &[]).await.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n = conns * per;
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{n} requests over {conns} keep-alive connections in {s:.2}s: {:.0} req/s",
        n as f64 / s
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_port_is_authorized_on_the_tcp_chain() {
    // An ALLOW rule that needs an HTTP attribute is skipped on a TCP port (Envoy semantics), so
    // with only that policy nothing is allowed; a port-only ALLOW admits the stream.
    let lab = Lab::new(
        73,
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: http-only, namespace: foo}
  spec:
    targetRefs: [{kind: Service, group: "", name: tcp-echo}]
    rules: [{to: [{operation: {methods: [GET]}}]}]
"#,
    )
    .await;
    // Refused on the CONNECT (401), so ztunnel's SOCKS5 entry reports a failure.
    let r = mesh_test::socks_connect(
        lab.a.addresses.socks5.unwrap(),
        ip(lab.net, 2),
        lab.vip(103, 9000),
    )
    .await;
    assert!(r.is_err(), "denied TCP stream was opened");
    let lab2 = Lab::new(
        74,
        r#"
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: port-ok, namespace: foo}
  spec:
    targetRefs: [{kind: Service, group: "", name: tcp-echo}]
    rules: [{to: [{operation: {ports: ["9000"]}}]}]
"#,
    )
    .await;
    let s = lab2.dial(lab2.vip(103, 9000)).await;
    assert_eq!(mesh_test::round_trip(s, b"hello").await.unwrap(), b"hello");
}
