//! Upstream protocol selection through the whole path (client → ztunnel A → waypoint →
//! ztunnel B → app): the destination Service port decides HTTP/1.1 or HTTP/2, never the
//! client, as Istio's waypoint does (docs/waypoint.md, "Protocol selection").
//!
//! The harness declares `echo` port 80 as `http`; these tests make `echo` an HTTP/1.1-only
//! app and declare `echo-v2` (`appProtocol: http2`) and `mirror` (port name `grpc-x`) as
//! HTTP/2 ports served by an HTTP/2-only app.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

const H2_PORTS: &str = r#"
- apiVersion: v1
  kind: Service
  metadata: {name: echo-v2, namespace: foo}
  spec: {ports: [{name: web, port: 80, appProtocol: http2}]}
- apiVersion: v1
  kind: Service
  metadata: {name: mirror, namespace: foo}
  spec: {ports: [{name: grpc-x, port: 80}]}
"#;

async fn h2_client(lab: &Lab, vip: u8) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = lab.dial(lab.vip(vip, 80)).await;
    let (c, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    c
}

fn last_hit(lab: &Lab, app: &str) -> Hit {
    lab.hits()
        .into_iter()
        .rfind(|h| h.app == app)
        .unwrap_or_else(|| panic!("{app} saw no request"))
}

/// The access-log line of a request to `dst` containing `needle` (written when the response
/// body ends: waits for it).
async fn access_line(dst: &str, needle: &str) -> String {
    let logs = logs();
    for _ in 0..200 {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains(&format!("dst_addr={dst}")) && l.contains(needle))
        {
            return l.to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("no access-log line for {dst} with {needle}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_is_downgraded_to_http1_on_an_http_port() {
    logs();
    let lab = Lab::with_app_versions(
        80,
        "",
        [AppVersion::Http1, AppVersion::Both, AppVersion::Both],
    )
    .await;
    let mut c = h2_client(&lab, 100).await;
    let req = Request::builder()
        .method("POST")
        .uri("http://echo.foo.svc.cluster.local/plain?q=1")
        .body(Full::new(Bytes::from_static(b"body")))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2, "the client keeps h2");
    assert_eq!(resp.headers()["x-backend"], "echo");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "echo POST /plain");
    let hit = last_hit(&lab, "echo");
    assert_eq!(hit.version, http::Version::HTTP_11);
    assert_eq!(hit.headers["host"], "echo.foo.svc.cluster.local");
    let line = access_line(&lab.vip(100, 80).to_string(), "path=/plain").await;
    assert!(
        line.contains("protocol=\"http2\"") && line.contains("upstream_protocol=\"http\""),
        "{line}"
    );

    // gRPC-style trailers cross the downgrade: the client sent `te: trailers`, the app
    // declared them and sent them chunked, the waypoint hands them on as h2 trailers.
    let req = Request::builder()
        .method("POST")
        .uri("http://echo.foo.svc.cluster.local/echo.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("no trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "hello");
    assert_eq!(last_hit(&lab, "echo").version, http::Version::HTTP_11);

    // A streamed request body with trailers: the trailers are dropped towards the HTTP/1.1
    // app (Envoy's HTTP/1 codec default), the request itself goes through.
    let s = lab.dial(lab.vip(100, 80)).await;
    let (mut c, conn) = hyper::client::conn::http2::handshake::<_, _, AppBody>(
        TokioExecutor::new(),
        TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut t = http::HeaderMap::new();
    t.insert("x-checksum", "1234".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"a"))),
        Ok(hyper::body::Frame::trailers(t)),
    ];
    let req = Request::builder()
        .method("POST")
        .uri("http://echo.foo.svc.cluster.local/streamed")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let hit = last_hit(&lab, "echo");
    assert_eq!(
        (hit.path.as_str(), hit.version),
        ("/streamed", http::Version::HTTP_11)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_is_upgraded_to_h2_on_http2_and_grpc_ports() {
    logs();
    let lab = Lab::with_app_versions(
        81,
        H2_PORTS,
        [AppVersion::Both, AppVersion::Http2, AppVersion::Http2],
    )
    .await;
    for (vip, app, host) in [
        (101, "echo-v2", "echo-v2.foo.svc.cluster.local"),
        (102, "mirror", "mirror.foo.svc.cluster.local"),
    ] {
        let mut c = lab.h1(lab.vip(vip, 80)).await;
        let req = Request::builder()
            .uri("/plain")
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = c.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{app}");
        assert_eq!(
            resp.version(),
            http::Version::HTTP_11,
            "the client keeps HTTP/1.1"
        );
        assert_eq!(resp.headers()["x-backend"], app);
        let hit = last_hit(&lab, app);
        assert_eq!(hit.version, http::Version::HTTP_2, "{app}");
        assert_eq!(hit.path, "/plain");
        let line = access_line(&lab.vip(vip, 80).to_string(), "path=/plain").await;
        assert!(
            line.contains("protocol=\"http\"") && line.contains("upstream_protocol=\"http2\""),
            "{line}"
        );
    }

    // An h2 client to an h2 port stays h2.
    let mut c = h2_client(&lab, 101).await;
    let req = Request::builder()
        .uri("http://echo-v2.foo.svc.cluster.local/h2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(last_hit(&lab, "echo-v2").version, http::Version::HTTP_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_trailers_reach_an_http1_client_only_with_te_trailers() {
    let lab = Lab::with_app_versions(
        82,
        H2_PORTS,
        [AppVersion::Both, AppVersion::Http2, AppVersion::Both],
    )
    .await;
    for te in [true, false] {
        let mut c = lab.h1(lab.vip(101, 80)).await;
        let mut b = Request::builder()
            .method("POST")
            .uri("/echo.Echo/Say")
            .header("host", "echo-v2.foo.svc.cluster.local")
            .header("content-type", "application/grpc");
        if te {
            b = b.header("te", "trailers");
        }
        let resp = c
            .send_request(b.body(Full::new(Bytes::from_static(b"hi"))).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        assert_eq!(collected.to_bytes(), "hi");
        if te {
            let t = trailers.expect("te: trailers, yet no trailers");
            assert_eq!(t["grpc-status"], "0");
            assert_eq!(t["grpc-message"], "ok");
        } else {
            assert!(trailers.is_none(), "trailers without te: trailers");
        }
        assert_eq!(last_hit(&lab, "echo-v2").version, http::Version::HTTP_2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_goes_http1_even_to_an_http2_port() {
    // `mirror` is declared `grpc-x` here but its app speaks both: the upgrade must still go
    // out as HTTP/1.1 (an h2 upstream has no Upgrade).
    let lab = Lab::with_app_versions(
        83,
        H2_PORTS,
        [AppVersion::Both, AppVersion::Both, AppVersion::Both],
    )
    .await;
    let mut c = lab.h1(lab.vip(102, 80)).await;
    let req = Request::builder()
        .uri("/ws")
        .header("host", "mirror.foo.svc.cluster.local")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(std::time::Duration::from_secs(5), io.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    assert_eq!(last_hit(&lab, "mirror").version, http::Version::HTTP_11);
}
