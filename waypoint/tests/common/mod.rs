//! The harness of the waypoint's in-process tests: the apps (HTTP/1.1 + HTTP/2 echo, a real
//! tonic gRPC service), and a lab of two ztunnels and a waypoint on loopback with real TLS.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{body::Frame, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

// ------------------------------------------------------------------ apps

#[derive(Debug, Clone)]
pub struct Hit {
    pub app: String,
    pub method: String,
    pub path: String,
    /// The HTTP version the app was spoken to in.
    pub version: http::Version,
    pub headers: HashMap<String, String>,
}

pub type Hits = Arc<Mutex<Vec<Hit>>>;

pub type AppBody = BoxBody<Bytes, Infallible>;

pub fn body(s: impl Into<Bytes>) -> AppBody {
    Full::new(s.into()).boxed()
}

pub async fn app_handle(
    name: String,
    hits: Hits,
    flaky: Arc<Mutex<u32>>,
    mut req: Request<hyper::body::Incoming>,
) -> Response<AppBody> {
    let path = req.uri().path().to_string();
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    hits.lock().unwrap().push(Hit {
        app: name.clone(),
        method: req.method().to_string(),
        path: path.clone(),
        version: req.version(),
        headers,
    });
    if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(body("status"));
        *r.status_mut() = StatusCode::from_u16(code.parse().unwrap()).unwrap();
        return r;
    }
    if path == "/flaky" {
        let mut n = flaky.lock().unwrap();
        *n += 1;
        let mut r = Response::new(body(format!("try {n}")));
        if *n == 1 {
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        return r;
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        return Response::new(body("late"));
    }
    if path == "/ws" {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let up = on.await.unwrap();
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 1024];
            loop {
                let n = io.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                io.write_all(&buf[..n]).await.unwrap();
            }
        });
        let mut r = Response::new(body(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().unwrap());
        r.headers_mut()
            .insert("connection", "Upgrade".parse().unwrap());
        return r;
    }
    if path.starts_with("/echo.Echo/") {
        let data = req.into_body().collect().await.unwrap().to_bytes();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(data)),
            Ok(Frame::trailers(trailers)),
        ];
        let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        // Declared, so an HTTP/1.1 server sends them (chunked) to a `te: trailers` caller.
        r.headers_mut()
            .insert("trailer", "grpc-status, grpc-message".parse().unwrap());
        return r;
    }
    let mut r = Response::new(body(format!("{name} {} {path}", req.method())));
    r.headers_mut().insert("x-backend", name.parse().unwrap());
    r
}

/// Which HTTP versions an app serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppVersion {
    /// HTTP/1.1 and HTTP/2 (prior knowledge), told apart by the preface.
    Both,
    /// HTTP/1.1 only: an HTTP/2 preface is a parse error.
    Http1,
    /// HTTP/2 with prior knowledge only.
    Http2,
}

/// An HTTP/1.1 + HTTP/2 app on `ip`, recording every request into `hits`.
pub async fn app(ip: IpAddr, name: &str, hits: Hits) -> SocketAddr {
    app_with(ip, name, hits, AppVersion::Both).await
}

/// An app on `ip` serving only the given HTTP versions, recording every request into `hits`.
pub async fn app_with(ip: IpAddr, name: &str, hits: Hits, version: AppVersion) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let name = name.to_string();
    let flaky = Arc::new(Mutex::new(0));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (name, hits, flaky) = (name.clone(), hits.clone(), flaky.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let (name, hits, flaky) = (name.clone(), hits.clone(), flaky.clone());
                    async move { Ok::<_, Infallible>(app_handle(name, hits, flaky, req).await) }
                });
                let io = TokioIo::new(s);
                let _ = match version {
                    AppVersion::Both => {
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(io, svc)
                            .await
                    }
                    AppVersion::Http1 => hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await
                        .map_err(Into::into),
                    AppVersion::Http2 => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                            .map_err(Into::into)
                    }
                };
            });
        }
    });
    addr
}

/// A real gRPC server on `ip`: tonic's `grpc.health.v1.Health`, with service `echo.Echo`
/// SERVING. The reporter flips statuses (streamed to `Watch` callers).
pub async fn grpc_app(ip: IpAddr) -> (SocketAddr, tonic_health::server::HealthReporter) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("echo.Echo", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    (addr, reporter)
}

// ------------------------------------------------------------------ the lab

pub struct Lab {
    pub _dir: tempfile::TempDir,
    pub net: u8,
    pub a: ztunnel::app::Bound,
    pub _b: ztunnel::app::Bound,
    pub wp: waypoint::app::Bound,
    pub hits: Hits,
    pub health: tonic_health::server::HealthReporter,
}

pub fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, host))
}

pub fn mesh_yaml(net: u8, ports: &[u16; 5]) -> String {
    let (c, s, w) = (ip(net, 2), ip(net, 3), ip(net, 5));
    let [p1, p2, p3, p4, p5] = ports;
    let svc = |name: &str, vip: u8, sport: u16, tport: u16| {
        format!(
            "- name: {name}\n  namespace: foo\n  hostname: {name}.foo.svc.cluster.local\n  vips: [/{}]\n  ports: {{{sport}: {tport}}}\n  waypoint: {{destination: {{Address: /{w}}}, hboneMtlsPort: 15008}}\n",
            ip(net, vip)
        )
    };
    format!(
        r#"workloads:
- uid: bar/sleep
  name: sleep
  namespace: bar
  serviceAccount: sleep
  workloadIps: [{c}]
  protocol: HBONE
  node: node-a
- uid: foo/echo
  name: echo
  namespace: foo
  serviceAccount: echo
  workloadIps: [{s}]
  protocol: HBONE
  node: node-b
  services:
    foo/echo.foo.svc.cluster.local: {{80: {p1}}}
    foo/echo-v2.foo.svc.cluster.local: {{80: {p2}}}
    foo/mirror.foo.svc.cluster.local: {{80: {p3}}}
    foo/tcp-echo.foo.svc.cluster.local: {{9000: {p4}}}
    foo/grpc.foo.svc.cluster.local: {{50051: {p5}}}
- uid: foo/waypoint
  name: waypoint
  namespace: foo
  serviceAccount: waypoint
  workloadIps: [{w}]
  protocol: HBONE
  node: node-w
services:
{}{}{}{}{}"#,
        svc("echo", 100, 80, *p1),
        svc("echo-v2", 101, 80, *p2),
        svc("mirror", 102, 80, *p3),
        svc("tcp-echo", 103, 9000, *p4),
        svc("grpc", 104, 50051, *p5),
    )
}

pub const SERVICE_OBJECTS: &str = r#"
- apiVersion: v1
  kind: Service
  metadata: {name: echo, namespace: foo}
  spec: {ports: [{name: http, port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: tcp-echo, namespace: foo}
  spec: {ports: [{name: tcp-echo, port: 9000}]}
- apiVersion: v1
  kind: Service
  metadata: {name: grpc, namespace: foo}
  spec: {ports: [{name: grpc, port: 50051}]}
"#;

impl Lab {
    /// `objects`: YAML list items (each starting with `- `) added to the waypoint's file.
    pub async fn new(net: u8, objects: &str) -> Lab {
        Lab::new_with(net, objects, false).await
    }

    /// `v4_mapped`: the waypoint listens on an IPv6 socket bound to `::ffff:<ip>`, so its
    /// peers arrive as IPv4-mapped IPv6 addresses (what a `[::]` listener sees in a pod).
    pub async fn new_with(net: u8, objects: &str, v4_mapped: bool) -> Lab {
        Lab::with_waypoint_args(net, objects, v4_mapped, &[]).await
    }

    /// `extra`: further waypoint flags (e.g. `--tracing-otlp-endpoint`).
    pub async fn with_waypoint_args(
        net: u8,
        objects: &str,
        v4_mapped: bool,
        extra: &[String],
    ) -> Lab {
        Lab::build(net, objects, v4_mapped, extra, [AppVersion::Both; 3]).await
    }

    /// `versions`: what the echo, echo-v2 and mirror apps serve.
    pub async fn with_app_versions(net: u8, objects: &str, versions: [AppVersion; 3]) -> Lab {
        Lab::build(net, objects, false, &[], versions).await
    }

    async fn build(
        net: u8,
        objects: &str,
        v4_mapped: bool,
        extra: &[String],
        versions: [AppVersion; 3],
    ) -> Lab {
        mesh_test::raise_fd_limit();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        let pem = mesh_tls::ca::LocalCa::generate_pem("cluster.local").unwrap();
        for (name, b) in pem.files() {
            std::fs::write(ca.join(name), b).unwrap();
        }
        let hits: Hits = Arc::default();
        let s = ip(net, 3);
        let [v1, v2, v3] = versions;
        let p1 = app_with(s, "echo", hits.clone(), v1).await.port();
        let p2 = app_with(s, "echo-v2", hits.clone(), v2).await.port();
        let p3 = app_with(s, "mirror", hits.clone(), v3).await.port();
        let p4 = mesh_test::echo(s).await.port();
        let (grpc, health) = grpc_app(s).await;
        let mesh = mesh_yaml(net, &[p1, p2, p3, p4, grpc.port()]);
        let zpath = dir.path().join("mesh.yaml");
        std::fs::write(&zpath, &mesh).unwrap();
        let wpath = dir.path().join("waypoint.yaml");
        std::fs::write(
            &wpath,
            format!("waypoint: {{name: waypoint, namespace: foo}}\n{mesh}objects:\n{SERVICE_OBJECTS}{objects}\n"),
        )
        .unwrap();
        let zt = |node: &str, host: u8| {
            let args: Vec<String> = [
                "ztunnel",
                "--local-xds-path",
                zpath.to_str().unwrap(),
                "--local-ca-dir",
                ca.to_str().unwrap(),
                "--node-name",
                node,
                "--inbound-addr",
                &format!("{}:15008", ip(net, host)),
                "--outbound-addr",
                &format!("{}:0", ip(net, host)),
                "--inbound-plaintext-addr",
                &format!("{}:0", ip(net, host)),
                "--socks5-addr",
                &format!("{}:0", ip(net, host)),
                "--admin-addr",
                "127.0.0.1:0",
                "--stats-addr",
                "127.0.0.1:0",
                "--readiness-addr",
                "127.0.0.1:0",
                "--packet-mark",
                "0",
                "--drain-deadline",
                "1s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            ztunnel::config::Args::try_parse_from(args)
                .unwrap()
                .validate()
                .unwrap()
        };
        let a = ztunnel::app::build(zt("node-a", 2), None, tokio::runtime::Handle::current())
            .await
            .unwrap();
        let b = ztunnel::app::build(zt("node-b", 3), None, tokio::runtime::Handle::current())
            .await
            .unwrap();
        let hbone_addr = if v4_mapped {
            format!("[::ffff:{}]:15008", ip(net, 5))
        } else {
            format!("{}:15008", ip(net, 5))
        };
        let base = [
            "waypoint",
            "--config",
            wpath.to_str().unwrap(),
            "--local-ca-dir",
            ca.to_str().unwrap(),
            "--hbone-addr",
            &hbone_addr,
            "--admin-addr",
            "127.0.0.1:0",
            "--stats-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
            "--drain-deadline",
            "1s",
        ];
        let wcfg = waypoint::config::Args::try_parse_from(
            base.iter()
                .map(|s| s.to_string())
                .chain(extra.iter().cloned()),
        )
        .unwrap()
        .validate()
        .unwrap();
        let wp = waypoint::app::build(wcfg, None).await.unwrap();
        for _ in 0..500 {
            if a.ready.is_ready() && b.ready.is_ready() && wp.ready.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            wp.ready.is_ready(),
            "waypoint not ready: {:?}",
            wp.ready.pending()
        );
        Lab {
            _dir: dir,
            net,
            a,
            _b: b,
            wp,
            hits,
            health,
        }
    }

    pub fn vip(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(ip(self.net, host), port)
    }

    /// A TCP stream from the client workload to `dst`, through ztunnel A's SOCKS5 entry.
    pub async fn dial(&self, dst: SocketAddr) -> TcpStream {
        mesh_test::socks_connect(self.a.addresses.socks5.unwrap(), ip(self.net, 2), dst)
            .await
            .unwrap()
    }

    pub async fn h1(
        &self,
        dst: SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let s = self.dial(dst).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        send
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

pub async fn send(
    c: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "echo.foo.svc.cluster.local");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.ready().await.unwrap();
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        c.send_request(b.body(Full::new(Bytes::new())).unwrap()),
    )
    .await
    .expect("request timed out")
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

pub const ROUTE_HEAD: &str = "- apiVersion: gateway.networking.k8s.io/v1\n  kind: HTTPRoute\n";

/// Access-log lines of every test in this binary (one global subscriber); tests filter by
/// their own addresses.
pub fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let w = buf.clone();
        let make = move || LogWriter(w.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("access=info")
            .with_ansi(false)
            .with_writer(make)
            .try_init();
        buf
    })
    .clone()
}

pub struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
