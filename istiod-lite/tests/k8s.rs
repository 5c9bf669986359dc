//! istiod-lite against a real kube-apiserver v1.20.2 (`e2e/k8s`, loopback only): objects a
//! user creates through the API become xDS resources, changes arrive as deltas, and the CA
//! authenticates callers by TokenReview of real TokenRequest tokens.
//!
//! Each test starts its own apiserver + etcd with `e2e/k8s/up.sh --no-kcm` in a temp state
//! directory and stops exactly those processes with `down.sh` when its [`Cluster`] drops
//! (also on panic). Without the binaries the tests print why and pass, unless
//! `MESH_REQUIRE_K8S=1` (CI), which makes that a failure. There is no kubelet: pods get their
//! `/status` patched as a kubelet would, and are force-deleted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use clap::Parser;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, Service, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use mesh_core::{
    policy::Authorization,
    workload::{HealthStatus, PortMap, Service as MeshService, TunnelProtocol, Workload},
};
use mesh_proto::{
    convert::{self, AddressResource},
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    istio::v1::auth::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
    type_url,
};
use prost::Message;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One loopback apiserver + etcd, stopped by PID (`down.sh`) on drop.
struct Cluster {
    dir: tempfile::TempDir,
    state: PathBuf,
    kubeconfig: PathBuf,
    client: Option<Client>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = Command::new("bash")
            .arg(repo().join("e2e/k8s/down.sh"))
            .arg(&self.state)
            .output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!("down.sh failed: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
}

impl Cluster {
    /// A fresh cluster, or `None` (after saying why) when the binaries are not built.
    async fn up(test: &str) -> Option<Cluster> {
        let k8s_dir =
            std::env::var("MESH_K8S_DIR").unwrap_or_else(|_| "/var/cache/mesh-k8s".into());
        let bin = Path::new(&k8s_dir).join("bin/kube-apiserver");
        if !bin.exists() {
            let why = format!(
                "{} is missing: run `bash e2e/k8s/build.sh` (see docs/testing.md)",
                bin.display()
            );
            if std::env::var("MESH_REQUIRE_K8S").as_deref() == Ok("1") {
                panic!("MESH_REQUIRE_K8S=1 but {why}");
            }
            eprintln!("SKIPPED {test}: {why}; MESH_REQUIRE_K8S=1 makes this a failure");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let out = Command::new("bash")
            .arg(repo().join("e2e/k8s/up.sh"))
            .arg("--no-kcm")
            .arg(&state)
            .output()
            .unwrap();
        // up.sh stops what it started when it fails; from here on, Drop runs down.sh.
        let mut c = Cluster {
            kubeconfig: state.join("kubeconfig"),
            state,
            dir,
            client: None,
        };
        assert!(
            out.status.success(),
            "up.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.client = Some(istiod_lite::k8s::client(Some(&c.kubeconfig)).await.unwrap());
        Some(c)
    }

    fn client(&self) -> Client {
        self.client.clone().unwrap()
    }

    /// The mesh's security.istio.io CRDs (`manifests/crds/`); any CEL rules stripped in memory
    /// for the 1.20 server.
    async fn install_crds(&self) {
        let text =
            std::fs::read_to_string(repo().join("manifests/crds/security.istio.io.yaml")).unwrap();
        let crd = ApiResource {
            group: "apiextensions.k8s.io".into(),
            version: "v1".into(),
            api_version: "apiextensions.k8s.io/v1".into(),
            kind: "CustomResourceDefinition".into(),
            plural: "customresourcedefinitions".into(),
        };
        let api: Api<DynamicObject> = Api::all_with(self.client(), &crd);
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            strip_cel(&mut v);
            let obj: DynamicObject = serde_json::from_value(v).unwrap();
            api.create(&PostParams::default(), &obj).await.unwrap();
        }
        let c = self.client();
        eventually("the security CRDs are served", || {
            let c = c.clone();
            async move {
                let r = c
                    .list_api_group_resources("security.istio.io/v1")
                    .await
                    .ok()?;
                let names: Vec<&str> = r.resources.iter().map(|r| r.name.as_str()).collect();
                (names.contains(&"authorizationpolicies") && names.contains(&"peerauthentications"))
                    .then_some(())
            }
        })
        .await;
    }

    fn ns_api<K>(&self, ns: &str) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        Api::namespaced(self.client(), ns)
    }

    async fn namespace(&self, name: &str, ambient: bool) {
        let labels = if ambient {
            json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            json!({})
        };
        create::<Namespace>(
            Api::all(self.client()),
            json!({"metadata": {"name": name, "labels": labels}}),
        )
        .await;
    }

    /// A pod on `node` with service account `sa` (set explicitly: SA admission is off).
    async fn pod(
        &self,
        ns: &str,
        name: &str,
        sa: &str,
        node: &str,
        labels: serde_json::Value,
    ) -> Pod {
        create::<Pod>(
            self.ns_api(ns),
            json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {"nodeName": node, "serviceAccountName": sa,
                         "containers": [{"name": "app", "image": "registry.invalid/app:never-pulled",
                                         "ports": [{"name": "http", "containerPort": 8080}]}]}
            }),
        )
        .await
    }

    /// What the kubelet would report for a started, ready pod.
    async fn set_running(&self, ns: &str, name: &str, ip: &str) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let now = "2026-01-01T00:00:00Z";
        let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running", "hostIP": "127.0.0.1", "podIP": ip, "podIPs": [{"ip": ip}],
                "startTime": now,
                "conditions": [cond("Initialized"), cond("ContainersReady"), cond("Ready"), cond("PodScheduled")]
            }})),
        )
        .await
        .unwrap();
    }

    /// Pods bound to a node never finish graceful deletion without a kubelet.
    async fn force_delete_pod(&self, ns: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        api.delete(name, &dp).await.unwrap();
    }

    async fn service_account(&self, ns: &str, name: &str) {
        create::<ServiceAccount>(self.ns_api(ns), json!({"metadata": {"name": name}})).await;
    }

    /// A TokenRequest token for `ns/sa`, bound to `pod`, for `audience`.
    async fn token(&self, ns: &str, sa: &str, pod: &Pod, audience: &str) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![audience.into()],
                expiration_seconds: Some(3600),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..Default::default()
        };
        let r = api
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .unwrap();
        r.status.unwrap().token
    }

    fn write(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    /// istiod-lite on this cluster; returns once every watch has listed.
    async fn istiod(&self) -> istiod_lite::app::Bound {
        let args = istiod_lite::config::Args::try_parse_from([
            "istiod-lite".to_owned(),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--ca-dir".into(),
            self.dir.path().join("ca").display().to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--monitor-addr".into(),
            "127.0.0.1:0".into(),
        ])
        .unwrap();
        let cp = tokio::time::timeout(WAIT, istiod_lite::app::build(args.validate().unwrap()))
            .await
            .expect("istiod-lite did not finish its initial list")
            .unwrap();
        self.write("root.pem", &cp.root_pem);
        cp
    }

    fn control_plane(&self, cp: &istiod_lite::app::Bound) -> ztunnel::config::ControlPlane {
        ztunnel::config::ControlPlane {
            address: format!("https://{}", cp.grpc_addr),
            authority: cp.grpc_addr.to_string(),
            server_name: "istiod.istio-system.svc".into(),
            root_ca: self.dir.path().join("root.pem"),
        }
    }

    fn credentials(&self, name: &str, token: &str) -> ztunnel::controlplane::Credentials {
        ztunnel::controlplane::Credentials {
            token_path: self.write(&format!("{name}.token"), token),
            cluster_id: "Kubernetes".into(),
        }
    }
}

async fn create<K>(api: Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap()
}

fn strip_cel(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("x-kubernetes-validations");
            m.values_mut().for_each(strip_cel);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_cel),
        _ => {}
    }
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A delta ADS client (ztunnel's channel and credentials), keeping what it was sent.
struct Xds {
    tx: tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, MeshService>,
    authorizations: BTreeMap<String, Authorization>,
    /// Every name ever removed, in order.
    removed: Vec<String>,
    /// Types answered at least once.
    answered: std::collections::BTreeSet<String>,
}

impl Xds {
    async fn connect(
        cp: &ztunnel::config::ControlPlane,
        creds: &ztunnel::controlplane::Credentials,
    ) -> Result<Xds, tonic::Status> {
        let mut client =
            AggregatedDiscoveryServiceClient::new(ztunnel::controlplane::channel(cp).unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        for t in [type_url::ADDRESS, type_url::AUTHORIZATION] {
            tx.send(DeltaDiscoveryRequest {
                node: Some(Node {
                    id: "ztunnel~127.0.0.1~ztunnel-a.istio-system~istio-system.svc.cluster.local"
                        .into(),
                    ..Default::default()
                }),
                type_url: t.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let rx = client
            .delta_aggregated_resources(
                creds.request(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await?
            .into_inner();
        Ok(Xds {
            tx,
            rx,
            workloads: BTreeMap::new(),
            services: BTreeMap::new(),
            authorizations: BTreeMap::new(),
            removed: Vec::new(),
            answered: Default::default(),
        })
    }

    /// Applies one response (and ACKs it).
    async fn next(&mut self) {
        let r = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no xDS response in time")
            .unwrap()
            .expect("xDS stream ended");
        for res in &r.resources {
            let body = &res.resource.as_ref().unwrap().value;
            if r.type_url == type_url::ADDRESS {
                let a = mesh_proto::istio::workload::Address::decode(body.as_slice()).unwrap();
                match convert::address_from_proto(a).unwrap() {
                    AddressResource::Workload(w) => {
                        self.workloads.insert(res.name.clone(), w);
                    }
                    AddressResource::Service(s) => {
                        self.services.insert(res.name.clone(), s);
                    }
                }
            } else {
                let a =
                    mesh_proto::istio::security::Authorization::decode(body.as_slice()).unwrap();
                self.authorizations.insert(
                    res.name.clone(),
                    convert::authorization_from_proto(a).unwrap(),
                );
            }
        }
        self.answered.insert(r.type_url.clone());
        for n in &r.removed_resources {
            self.workloads.remove(n);
            self.services.remove(n);
            self.authorizations.remove(n);
            self.removed.push(n.clone());
        }
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Reads responses until `pred` holds.
    async fn until(&mut self, what: &str, pred: impl Fn(&Xds) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !pred(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {what}\nworkloads: {:?}\nservices: {:?}\nauthorizations: {:?}",
                self.workloads.keys().collect::<Vec<_>>(),
                self.services.keys().collect::<Vec<_>>(),
                self.authorizations.keys().collect::<Vec<_>>()
            );
            self.next().await;
        }
    }
}

/// The node agent: `istio-system/ztunnel` pod on `node`.
async fn ztunnel_pod(c: &Cluster, name: &str, node: &str) -> Pod {
    c.pod(
        "istio-system",
        name,
        "ztunnel",
        node,
        json!({"app": "ztunnel"}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_objects_become_xds_resources_and_changes_arrive_as_deltas() {
    let Some(c) =
        Cluster::up("api_objects_become_xds_resources_and_changes_arrive_as_deltas").await
    else {
        return;
    };
    c.install_crds().await;
    let ns = "mesh-k8s-xds";
    c.namespace("istio-system", false).await;
    c.service_account("istio-system", "ztunnel").await;
    let zt = ztunnel_pod(&c, "ztunnel-a", "node-a").await;
    c.namespace(ns, true).await;
    c.pod(ns, "echo", "echo", "node-b", json!({"app": "echo"}))
        .await;
    c.set_running(ns, "echo", "127.0.90.3").await;
    c.pod(ns, "sleep", "sleep", "node-a", json!({"app": "sleep"}))
        .await;
    c.set_running(ns, "sleep", "127.0.90.2").await;
    let svc: Service = create(
        c.ns_api(ns),
        json!({"metadata": {"name": "echo"},
                   "spec": {"selector": {"app": "echo"},
                            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    )
    .await;
    let vip = svc.spec.unwrap().cluster_ip.unwrap();
    let ap = |version: &str| ApiResource {
        group: "security.istio.io".into(),
        version: version.into(),
        api_version: format!("security.istio.io/{version}"),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    };
    let policy = |version: &str, body: serde_json::Value| -> DynamicObject {
        let mut v = body;
        v["apiVersion"] = json!(format!("security.istio.io/{version}"));
        v["kind"] = json!("AuthorizationPolicy");
        serde_json::from_value(v).unwrap()
    };
    let v1: Api<DynamicObject> = Api::namespaced_with(c.client(), ns, &ap("v1"));
    v1.create(
        &PostParams::default(),
        &policy(
            "v1",
            json!({"metadata": {"name": "allow-sleep"},
                   "spec": {"selector": {"matchLabels": {"app": "echo"}},
                            "rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/sleep")]}}]}]}}),
        ),
    )
    .await
    .unwrap();
    // Written as v1beta1, read through v1 (one storage): must arrive the same way.
    let v1beta1: Api<DynamicObject> = Api::namespaced_with(c.client(), ns, &ap("v1beta1"));
    v1beta1
        .create(
            &PostParams::default(),
            &policy(
                "v1beta1",
                json!({"metadata": {"name": "deny-9000"},
                       "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]}}),
            ),
        )
        .await
        .unwrap();

    let cp = c.istiod().await;
    let token = c.token("istio-system", "ztunnel", &zt, "istio-ca").await;
    let mut xds = Xds::connect(&c.control_plane(&cp), &c.credentials("ztunnel-a", &token))
        .await
        .unwrap();
    let echo_uid = format!("Kubernetes//Pod/{ns}/echo");
    let sleep_uid = format!("Kubernetes//Pod/{ns}/sleep");
    let allow = format!("{ns}/allow-sleep");
    let deny = format!("{ns}/deny-9000");
    let host = format!("{ns}/echo.{ns}.svc.cluster.local");
    // Everything existed before istiod-lite started, and it serves only after every watch
    // has listed: the first answer of each type is already complete (no partial view).
    xds.until("a first answer of both types", |x| x.answered.len() == 2)
        .await;
    assert!(
        xds.workloads.contains_key(&echo_uid)
            && xds.workloads.contains_key(&sleep_uid)
            && xds.services.contains_key(&host)
            && xds.authorizations.contains_key(&allow)
            && xds.authorizations.contains_key(&deny),
        "first answers incomplete: {:?} {:?} {:?}",
        xds.workloads.keys().collect::<Vec<_>>(),
        xds.services.keys().collect::<Vec<_>>(),
        xds.authorizations.keys().collect::<Vec<_>>()
    );
    let echo = &xds.workloads[&echo_uid];
    assert_eq!(echo.protocol, TunnelProtocol::Hbone, "ambient namespace");
    assert_eq!(echo.status, HealthStatus::Healthy, "Running and Ready");
    assert_eq!(echo.service_account, "echo");
    assert_eq!(echo.node, "node-b");
    assert_eq!(echo.workload_ips[0].to_string(), "127.0.90.3");
    assert_eq!(echo.authorization_policies, std::slice::from_ref(&allow));
    assert_eq!(
        echo.services[&host],
        PortMap::from([(80, 8080)]),
        "named target port resolved through the container port"
    );
    let s = &xds.services[&host];
    assert_eq!(s.vips[0].address.to_string(), vip);
    assert!(
        !xds.workloads
            .contains_key("Kubernetes//Pod/istio-system/ztunnel-a"),
        "a pod without an IP is no workload"
    );

    // The namespace leaves the mesh: the same workload, now plain TCP, without policies.
    let nss: Api<Namespace> = Api::all(c.client());
    nss.patch(
        ns,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}})),
    )
    .await
    .unwrap();
    xds.until("echo becomes TunnelProtocol NONE", |x| {
        x.workloads
            .get(&echo_uid)
            .is_some_and(|w| w.protocol == TunnelProtocol::None)
    })
    .await;
    assert!(xds.workloads[&echo_uid].authorization_policies.is_empty());

    // Deleting the policy and a pod removes them by name.
    v1.delete("allow-sleep", &DeleteParams::default())
        .await
        .unwrap();
    xds.until("the policy is removed", |x| x.removed.contains(&allow))
        .await;
    c.force_delete_pod(ns, "sleep").await;
    xds.until("sleep is removed", |x| x.removed.contains(&sleep_uid))
        .await;
    assert!(xds.workloads.contains_key(&echo_uid));
    assert!(
        xds.authorizations.contains_key(&deny),
        "the other policy stays"
    );
    assert!(cp.stats.nacks.lock().unwrap().is_empty());

    // A token for another audience opens no stream.
    let wrong = c
        .token(
            "istio-system",
            "ztunnel",
            &zt,
            "https://kubernetes.default.svc.cluster.local",
        )
        .await;
    let e = Xds::connect(&c.control_plane(&cp), &c.credentials("wrong", &wrong))
        .await
        .err()
        .expect("a wrong-audience token must be refused");
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("not for audience istio-ca"),
        "{}",
        e.message()
    );
}

async fn ca_call(
    c: &Cluster,
    cp: &istiod_lite::app::Bound,
    name: &str,
    token: &str,
    impersonate: &str,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = IstioCertificateServiceClient::new(
        ztunnel::controlplane::channel(&c.control_plane(cp)).unwrap(),
    );
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
        .create_certificate(c.credentials(name, token).request(req))
        .await
        .map(|r| r.into_inner().cert_chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_trusts_tokenreview_and_signs_only_for_pods_on_the_callers_node() {
    let Some(c) =
        Cluster::up("the_ca_trusts_tokenreview_and_signs_only_for_pods_on_the_callers_node").await
    else {
        return;
    };
    // No Istio CRDs on this cluster: istiod-lite must still become ready (no policies).
    c.namespace("istio-system", false).await;
    c.service_account("istio-system", "ztunnel").await;
    let zt_a = ztunnel_pod(&c, "ztunnel-a", "node-a").await;
    let zt_gone = ztunnel_pod(&c, "ztunnel-gone", "node-a").await;
    // With an IP it is a workload, so the test can see when istiod-lite has dropped it.
    c.set_running("istio-system", "ztunnel-gone", "127.0.91.9")
        .await;
    let ns = "mesh-k8s-ca";
    c.namespace(ns, true).await;
    c.service_account(ns, "app").await;
    let app = c
        .pod(ns, "app-a", "app", "node-a", json!({"app": "app"}))
        .await;
    c.pod(ns, "db-b", "db", "node-b", json!({"app": "db"}))
        .await;

    let cp = c.istiod().await;
    let token_a = c.token("istio-system", "ztunnel", &zt_a, "istio-ca").await;
    let app_id = format!("spiffe://cluster.local/ns/{ns}/sa/app");
    let db_id = format!("spiffe://cluster.local/ns/{ns}/sa/db");

    // node-a's ztunnel gets the identity of a pod on node-a: the leaf carries exactly it.
    let chain = ca_call(&c, &cp, "zt-a", &token_a, &app_id).await.unwrap();
    let certs = mesh_tls::cert::parse_pem_certs(&chain.concat()).unwrap();
    let leaf = mesh_tls::cert::CertInfo::parse(&certs[0]).unwrap();
    assert_eq!(
        leaf.identities
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&app_id)
    );
    // ...and never that of a pod on node-b (the node rule, with the node from the token).
    let e = ca_call(&c, &cp, "zt-a", &token_a, &db_id)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message()
            .contains("no pod with that identity runs on node-a"),
        "{}",
        e.message()
    );

    // A workload's own token may not impersonate, even an identity on its node.
    let token_app = c.token(ns, "app", &app, "istio-ca").await;
    let e = ca_call(
        &c,
        &cp,
        "app",
        &token_app,
        &format!("spiffe://cluster.local/ns/{ns}/sa/other"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("may not impersonate"),
        "{}",
        e.message()
    );
    // Its own identity it may have.
    ca_call(&c, &cp, "app", &token_app, &app_id).await.unwrap();

    // A token whose pod is gone: the API server itself invalidates it once its pod lookup
    // sees the deletion; during the short window where it does not yet, istiod-lite's own
    // lookup refuses it ("does not exist"). The token is used only after istiod-lite has
    // seen the deletion, so it was never reviewed (or cached) while the pod existed.
    let token_gone = c
        .token("istio-system", "ztunnel", &zt_gone, "istio-ca")
        .await;
    c.force_delete_pod("istio-system", "ztunnel-gone").await;
    let gone_uid = "Kubernetes//Pod/istio-system/ztunnel-gone";
    let mut snaps = cp.snapshots.clone();
    tokio::time::timeout(
        WAIT,
        snaps.wait_for(|s| !s.0[type_url::ADDRESS].contains_key(gone_uid)),
    )
    .await
    .expect("istiod-lite never saw the pod deletion")
    .unwrap();
    let e = ca_call(&c, &cp, "gone", &token_gone, &app_id)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("Token has been invalidated")
            || e.message().contains("does not exist"),
        "{}",
        e.message()
    );

    // Wrong audience and garbage are refused, each saying why.
    let wrong = c
        .token(
            "istio-system",
            "ztunnel",
            &zt_a,
            "https://kubernetes.default.svc.cluster.local",
        )
        .await;
    let e = ca_call(&c, &cp, "wrong", &wrong, &app_id)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("not for audience istio-ca"),
        "{}",
        e.message()
    );
    let e = ca_call(&c, &cp, "junk", "not-a-jwt", &app_id)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(
        e.message().contains("did not authenticate the token"),
        "{}",
        e.message()
    );

    // The CRDs arrive after istiod-lite started without them: discovery is retried and the
    // policies are then watched, with no restart.
    c.install_crds().await;
    let v1: Api<DynamicObject> = Api::namespaced_with(
        c.client(),
        ns,
        &ApiResource {
            group: "security.istio.io".into(),
            version: "v1".into(),
            api_version: "security.istio.io/v1".into(),
            kind: "AuthorizationPolicy".into(),
            plural: "authorizationpolicies".into(),
        },
    );
    let late: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "late"}, "spec": {"action": "DENY", "rules": [{}]}
    }))
    .unwrap();
    v1.create(&PostParams::default(), &late).await.unwrap();
    let mut snaps = cp.snapshots.clone();
    let key = format!("{ns}/late");
    tokio::time::timeout(
        WAIT,
        snaps.wait_for(|s| s.0[type_url::AUTHORIZATION].contains_key(&key)),
    )
    .await
    .expect("a policy created after the CRD was installed late never arrived")
    .unwrap();
}
