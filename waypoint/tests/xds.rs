//! The waypoint configured by a real istiod-lite (in-process, manifest directory, static
//! tokens, its CA): delta xDS for the waypoint (`istio.workload.Address` +
//! `mesh.config.v1.KubeObject`) and for two ztunnels, certificates from the Istio CA, and
//! traffic client → ztunnel A → waypoint → ztunnel B → app routed and denied per the
//! manifests. Edits are made as a user makes them: by rewriting and deleting manifests.
//! 127.N.0.1 istiod-lite, .2 client + ztunnel A, .3 app pod + ztunnel B, .5 the waypoint,
//! .100/.101 service VIPs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, host))
}

fn write(p: &Path, body: &str) -> PathBuf {
    std::fs::write(p, body).unwrap();
    p.to_owned()
}

/// An HTTP app answering `<name> <method> <path>`.
async fn app(at: IpAddr, name: &'static str) -> u16 {
    let l = TcpListener::bind((at, 0)).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "{name} {} {}",
                        req.method(),
                        req.uri().path()
                    )))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    port
}

fn manifests(net: u8, p1: u16, p2: u16) -> String {
    let (sleep, echo, wp) = (ip(net, 2), ip(net, 3), ip(net, 5));
    let (vip1, vip2) = (ip(net, 100), ip(net, 101));
    format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: foo, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: bar, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: foo}}
spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]}}
status: {{addresses: [{{type: IPAddress, value: "{wp}"}}]}}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-abc
  namespace: foo
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {{serviceAccountName: waypoint, nodeName: node-w, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: {wp}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: bar, labels: {{app: sleep}}}}
spec: {{serviceAccountName: sleep, nodeName: node-a, containers: [{{name: c, image: x}}]}}
status: {{phase: Running, podIP: {sleep}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo, namespace: foo, labels: {{app: echo}}}}
spec:
  serviceAccountName: echo
  nodeName: node-b
  containers:
  - name: c
    image: x
    ports: [{{name: http-v1, containerPort: {p1}}}, {{name: http-v2, containerPort: {p2}}}]
status: {{phase: Running, podIP: {echo}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: foo, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: {vip1}
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: http-v1}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v2, namespace: foo, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: {vip2}
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: http-v2}}]
"#
    )
}

/// `/v2…` goes to echo-v2, the rest to echo.
const ROUTE_SPLIT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: foo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo, port: 80}]
"#;

/// Everything goes to echo-v2.
const ROUTE_ALL_V2: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: foo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v2, port: 80}]
"#;

const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"#;

/// A route the waypoint cannot serve: istiod-lite passes it on, the waypoint NACKs it.
const BAD_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: foo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-v2}]
  rules: [{matches: [{method: "NOT A METHOD"}]}]
"#;

struct Lab {
    net: u8,
    dir: tempfile::TempDir,
    cp: istiod_lite::app::Bound,
    a: ztunnel::app::Bound,
    _b: ztunnel::app::Bound,
    wp: waypoint::app::Bound,
}

async fn ztunnel_for(
    lab_dir: &Path,
    cp: &istiod_lite::app::Bound,
    root: &Path,
    node: &str,
    token: &str,
    at: IpAddr,
) -> ztunnel::app::Bound {
    let token_file = write(&lab_dir.join(format!("{node}.token")), token);
    let args = ztunnel::config::Args::try_parse_from([
        "ztunnel".to_owned(),
        "--xds-address".into(),
        format!("https://{}", cp.grpc_addr),
        "--alt-xds-hostname".into(),
        "istiod.istio-system.svc".into(),
        "--xds-root-ca".into(),
        root.display().to_string(),
        "--auth-token-path".into(),
        token_file.display().to_string(),
        "--node-name".into(),
        node.into(),
        "--inbound-addr".into(),
        format!("{at}:15008"),
        "--outbound-addr".into(),
        format!("{at}:0"),
        "--inbound-plaintext-addr".into(),
        format!("{at}:0"),
        "--socks5-addr".into(),
        format!("{at}:0"),
        "--admin-addr".into(),
        "127.0.0.1:0".into(),
        "--stats-addr".into(),
        "127.0.0.1:0".into(),
        "--readiness-addr".into(),
        "127.0.0.1:0".into(),
        "--packet-mark".into(),
        "0".into(),
        "--drain-deadline".into(),
        "1s".into(),
    ])
    .unwrap();
    ztunnel::app::build(
        args.validate().unwrap(),
        None,
        tokio::runtime::Handle::current(),
    )
    .await
    .unwrap()
}

impl Lab {
    async fn new(net: u8) -> Lab {
        mesh_test::raise_fd_limit();
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("manifests");
        std::fs::create_dir(&m).unwrap();
        let p1 = app(ip(net, 3), "echo").await;
        let p2 = app(ip(net, 3), "echo-v2").await;
        write(&m.join("apps.yaml"), &manifests(net, p1, p2));
        write(&m.join("route.yaml"), ROUTE_SPLIT);
        write(&m.join("policy.yaml"), DENY_ADMIN);
        write(&m.join("broken.yaml"), BAD_ROUTE);
        let tokens = write(
            &dir.path().join("tokens.yaml"),
            "- {token: tok-a, serviceAccount: istio-system/ztunnel, node: node-a}\n\
             - {token: tok-b, serviceAccount: istio-system/ztunnel, node: node-b}\n\
             - {token: tok-w, serviceAccount: foo/waypoint}\n",
        );
        let args = istiod_lite::config::Args::try_parse_from([
            "istiod-lite".to_owned(),
            "--manifests".into(),
            m.display().to_string(),
            "--ca-dir".into(),
            dir.path().join("ca").display().to_string(),
            "--static-tokens".into(),
            tokens.display().to_string(),
            "--grpc-addr".into(),
            format!("{}:0", ip(net, 1)),
            "--monitor-addr".into(),
            "127.0.0.1:0".into(),
            "--manifests-poll".into(),
            "1s".into(),
        ])
        .unwrap();
        let cp = istiod_lite::app::build(args.validate().unwrap())
            .await
            .unwrap();
        let root = write(&dir.path().join("root.pem"), &cp.root_pem);
        let a = ztunnel_for(dir.path(), &cp, &root, "node-a", "tok-a", ip(net, 2)).await;
        let b = ztunnel_for(dir.path(), &cp, &root, "node-b", "tok-b", ip(net, 3)).await;
        let wtoken = write(&dir.path().join("waypoint.token"), "tok-w");
        let wcfg = waypoint::config::Args::try_parse_from([
            "waypoint".to_owned(),
            "--xds-address".into(),
            format!("https://{}", cp.grpc_addr),
            "--alt-xds-hostname".into(),
            "istiod.istio-system.svc".into(),
            "--xds-root-ca".into(),
            root.display().to_string(),
            "--auth-token-path".into(),
            wtoken.display().to_string(),
            "--pod-name".into(),
            "waypoint-abc".into(),
            "--pod-namespace".into(),
            "foo".into(),
            "--instance-ip".into(),
            ip(net, 5).to_string(),
            "--service-account".into(),
            "waypoint".into(),
            "--gateway-name".into(),
            "waypoint".into(),
            "--hbone-addr".into(),
            format!("{}:15008", ip(net, 5)),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--stats-addr".into(),
            "127.0.0.1:0".into(),
            "--readiness-addr".into(),
            "127.0.0.1:0".into(),
            "--drain-deadline".into(),
            "1s".into(),
        ])
        .unwrap()
        .validate()
        .unwrap();
        let wp = waypoint::app::build(wcfg, None).await.unwrap();
        for _ in 0..1000 {
            if a.ready.is_ready() && b.ready.is_ready() && wp.ready.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (what, r) in [
            ("ztunnel A", &a.ready),
            ("ztunnel B", &b.ready),
            ("waypoint", &wp.ready),
        ] {
            assert!(r.is_ready(), "{what} not ready: {:?}", r.pending());
        }
        Lab {
            net,
            dir,
            cp,
            a,
            _b: b,
            wp,
        }
    }

    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// GET `path` on the echo VIP from the client, through ztunnel A and the waypoint.
    async fn get(&self, path: &str) -> (StatusCode, String) {
        let s = mesh_test::socks_connect(
            self.a.addresses.socks5.unwrap(),
            ip(self.net, 2),
            SocketAddr::new(ip(self.net, 100), 80),
        )
        .await
        .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "echo.foo.svc.cluster.local")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Waits until GET `path` answers `want` (status and body prefix).
    async fn eventually(&self, path: &str, status: StatusCode, body: &str) {
        let mut last = None;
        for _ in 0..100 {
            let got = self.get(path).await;
            if got.0 == status && got.1.starts_with(body) {
                return;
            }
            last = Some(got);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("GET {path}: wanted {status} {body:?}, last got {last:?}");
    }

    /// Waits until the waypoint's snapshot satisfies `f`.
    async fn snapshot_until(&self, what: &str, f: impl Fn(&waypoint::state::Snapshot) -> bool) {
        for _ in 0..100 {
            if f(&self.wp.proxy.store.get()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let s = self.wp.proxy.store.get();
        panic!(
            "waypoint never had {what}: routes {:?}, policies {:?}, rejected {:?}",
            s.routes.iter().map(|r| r.key()).collect::<Vec<_>>(),
            s.policies
                .authorization_policies
                .iter()
                .map(|p| p.key())
                .collect::<Vec<_>>(),
            s.errors
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_lite_objects_configure_the_waypoint_and_edits_arrive_as_deltas() {
    let lab = Lab::new(90).await;

    // Config arrival: the route, the policy, the services; the bad route is refused by name.
    let s = lab.wp.proxy.store.get();
    assert_eq!(
        s.routes.iter().map(|r| r.key()).collect::<Vec<_>>(),
        ["foo/echo"],
        "rejected: {:?}",
        s.errors
    );
    assert_eq!(
        s.policies
            .authorization_policies
            .iter()
            .map(|p| p.key())
            .collect::<Vec<_>>(),
        ["foo/deny-admin"]
    );
    assert!(s.service("foo", "echo").is_some() && s.service("foo", "echo-v2").is_some());
    assert!(
        s.errors
            .iter()
            .any(|e| e.starts_with("HTTPRoute/foo/broken: ") && e.contains("method")),
        "{:?}",
        s.errors
    );
    {
        let nacks = lab.cp.stats.nacks.lock().unwrap();
        assert!(
            nacks.iter().any(|(node, msg)| node
                == &format!(
                    "waypoint~{}~waypoint-abc.foo~foo.svc.cluster.local",
                    ip(90, 5)
                )
                && msg.contains("HTTPRoute/foo/broken")),
            "{nacks:?}"
        );
        assert!(
            nacks.iter().all(|(node, _)| node.starts_with("waypoint~")),
            "ztunnels accept everything: {nacks:?}"
        );
    }

    // Traffic: routed and denied per the objects.
    lab.eventually("/hello", StatusCode::OK, "echo GET /hello")
        .await;
    lab.eventually("/v2/x", StatusCode::OK, "echo-v2 GET /v2/x")
        .await;
    let (status, body) = lab.get("/admin").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A user edits the route: the new routing applies.
    write(&lab.manifests().join("route.yaml"), ROUTE_ALL_V2);
    lab.eventually("/hello", StatusCode::OK, "echo-v2 GET /hello")
        .await;

    // Deleting the policy and the broken route removes them (delta removals).
    std::fs::remove_file(lab.manifests().join("policy.yaml")).unwrap();
    std::fs::remove_file(lab.manifests().join("broken.yaml")).unwrap();
    lab.snapshot_until("no policy and no rejection", |s| {
        s.policies.authorization_policies.is_empty() && s.errors.is_empty()
    })
    .await;
    lab.eventually("/admin", StatusCode::OK, "echo-v2 GET /admin")
        .await;

    // The config dump shows what is in force.
    let dump = waypoint::admin::config_dump(&waypoint::admin::AdminState {
        cfg: lab.wp.proxy.cfg.clone(),
        store: lab.wp.proxy.store.clone(),
        log: None,
        shutdown: tokio::sync::mpsc::channel(1).0,
    });
    assert_eq!(dump["routes"][0]["name"], "foo/echo", "{dump}");
    assert_eq!(dump["rejected"], serde_json::json!([]), "{dump}");
    assert!(dump["config"]["source"]["xds"].is_object(), "{dump}");
}
