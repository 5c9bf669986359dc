//! istiod-lite driving real ztunnels: manifests in a directory → index → translation →
//! delta xDS and the CA on one TLS port → two in-process ztunnels on loopback carrying HBONE
//! traffic. Policy changes are made the way a user makes them: by editing manifests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Parser;
use mesh_proto::istio::v1::auth::{
    IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
};
use mesh_test::{echo, raise_fd_limit, round_trip, socks_connect};

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, host))
}

fn manifests(net: u8, app_port: u16) -> String {
    let (sleep, echo, vip) = (ip(net, 2), ip(net, 3), ip(net, 100));
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
  containers: [{{name: c, image: x, ports: [{{name: tcp-echo, containerPort: {app_port}}}]}}]
status: {{phase: Running, podIP: {echo}, conditions: [{{type: Ready, status: "True"}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: foo}}
spec:
  clusterIP: {vip}
  selector: {{app: echo}}
  ports: [{{name: tcp, port: 80, targetPort: tcp-echo}}]
"#
    )
}

const DENY_BAR: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-bar, namespace: foo}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [bar]}}]}]
"#;

struct Lab {
    net: u8,
    dir: tempfile::TempDir,
    cp: istiod_lite::app::Bound,
    a: ztunnel::app::Bound,
    _b: ztunnel::app::Bound,
}

fn write(p: &Path, body: &str) -> PathBuf {
    std::fs::write(p, body).unwrap();
    p.to_owned()
}

impl Lab {
    async fn new(net: u8) -> Lab {
        raise_fd_limit();
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("manifests");
        std::fs::create_dir(&m).unwrap();
        let app = echo(ip(net, 3)).await;
        write(&m.join("apps.yaml"), &manifests(net, app.port()));
        // A broken manifest next to the good ones must not stop them.
        write(
            &m.join("broken.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: foo}\nspec: {containers: 7}\n",
        );
        let tokens = write(
            &dir.path().join("tokens.yaml"),
            "- {token: tok-a, serviceAccount: istio-system/ztunnel, node: node-a}\n\
             - {token: tok-b, serviceAccount: istio-system/ztunnel, node: node-b}\n",
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
        let a = ztunnel_for(&dir, &cp, &root, "node-a", "tok-a", ip(net, 2)).await;
        let b = ztunnel_for(&dir, &cp, &root, "node-b", "tok-b", ip(net, 3)).await;
        for z in [&a, &b] {
            for _ in 0..500 {
                if z.ready.is_ready() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(z.ready.is_ready(), "not ready: {:?}", z.ready.pending());
        }
        Lab {
            net,
            dir,
            cp,
            a,
            _b: b,
        }
    }

    async fn send(&self) -> std::io::Result<Vec<u8>> {
        let s = socks_connect(
            self.a.addresses.socks5.unwrap(),
            ip(self.net, 2),
            SocketAddr::new(ip(self.net, 100), 80),
        )
        .await?;
        round_trip(s, b"ping").await
    }

    async fn eventually(&self, allowed: bool) {
        for _ in 0..100 {
            if self.send().await.is_ok_and(|r| r == b"ping") == allowed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "traffic never became {}",
            if allowed { "allowed" } else { "denied" }
        );
    }

    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }
}

async fn ztunnel_for(
    dir: &tempfile::TempDir,
    cp: &istiod_lite::app::Bound,
    root: &Path,
    node: &str,
    token: &str,
    at: IpAddr,
) -> ztunnel::app::Bound {
    let token_file = write(&dir.path().join(format!("{node}.token")), token);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_become_mesh_traffic_and_policy_edits_take_effect() {
    let lab = Lab::new(70).await;
    assert_eq!(lab.send().await.unwrap(), b"ping");

    // A user applies a DENY policy: the destination ztunnel enforces it...
    write(&lab.manifests().join("policy.yaml"), DENY_BAR);
    lab.eventually(false).await;
    // ...and deleting the file removes it (a delta removal over xDS).
    std::fs::remove_file(lab.manifests().join("policy.yaml")).unwrap();
    lab.eventually(true).await;
    assert!(lab.cp.stats.nacks.lock().unwrap().is_empty());
    let snap = lab.cp.snapshots.borrow().clone();
    let addrs = &snap.0[mesh_proto::type_url::ADDRESS];
    assert!(addrs.contains_key("Kubernetes//Pod/foo/echo"), "{addrs:?}");
    assert!(
        !addrs.contains_key("Kubernetes//Pod/foo/bad"),
        "the broken pod is skipped"
    );
}

async fn ca_call(lab: &Lab, token: &str, impersonate: &str) -> Result<Vec<String>, tonic::Status> {
    let cp = ztunnel::config::ControlPlane {
        address: format!("https://{}", lab.cp.grpc_addr),
        authority: lab.cp.grpc_addr.to_string(),
        server_name: "istiod.istio-system.svc".into(),
        root_ca: lab.dir.path().join("root.pem"),
    };
    let creds = ztunnel::controlplane::Credentials {
        token_path: write(&lab.dir.path().join("probe.token"), token),
        cluster_id: "Kubernetes".into(),
    };
    let mut client =
        IstioCertificateServiceClient::new(ztunnel::controlplane::channel(&cp).unwrap());
    let id: mesh_core::Identity = impersonate.parse().unwrap();
    let csr = mesh_tls::ca::build_csr(&id).unwrap();
    let req = IstioCertificateRequest {
        csr: csr.csr_pem,
        validity_duration: 3600,
        metadata: Some(prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(impersonate.into())),
                },
            )]
            .into(),
        }),
    };
    client
        .create_certificate(creds.request(req))
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_identities_of_pods_on_the_callers_node() {
    let lab = Lab::new(71).await;
    let echo_id = "spiffe://cluster.local/ns/foo/sa/echo";
    // node-b's ztunnel may have echo's identity: echo runs on node-b.
    let chain = ca_call(&lab, "tok-b", echo_id).await.unwrap();
    assert!(chain.len() >= 2, "leaf and root");
    // node-a's ztunnel may not.
    let e = ca_call(&lab, "tok-a", echo_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("no pod with that identity runs on node-a"),
        "{}",
        e.message()
    );
    // An unknown token gets nothing at all.
    let e = ca_call(&lab, "forged", echo_id).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
}
