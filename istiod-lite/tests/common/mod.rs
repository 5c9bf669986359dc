//! The apiserver-tier harness shared by the `k8s*` test binaries: one loopback
//! kube-apiserver + etcd per test (`e2e/k8s/up.sh --no-kcm`, stopped by PID with `down.sh`
//! on drop), object helpers, and a delta ADS client with ztunnel's credentials.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use clap::Parser;
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use mesh_core::{
    policy::Authorization,
    workload::{Service as MeshService, Workload},
};
use mesh_proto::{
    convert::{self, AddressResource},
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    type_url,
};
use prost::Message;
use serde_json::json;

pub const WAIT: Duration = Duration::from_secs(30);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One loopback apiserver + etcd, stopped by PID (`down.sh`) on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
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
    pub async fn up(test: &str) -> Option<Cluster> {
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

    /// kubectl 1.20 from the cache, on this cluster.
    pub fn kubectl(&self, args: &[&str]) -> std::process::Output {
        let k8s_dir =
            std::env::var("MESH_K8S_DIR").unwrap_or_else(|_| "/var/cache/mesh-k8s".into());
        Command::new(Path::new(&k8s_dir).join("bin/kubectl"))
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn client(&self) -> Client {
        self.client.clone().unwrap()
    }

    /// Every CRD in `manifests/crds/` (security.istio.io, networking.istio.io, Gateway API);
    /// any CEL rules stripped in memory for the 1.20 server. Returns once all are served.
    pub async fn install_crds(&self) {
        let crd = ApiResource {
            group: "apiextensions.k8s.io".into(),
            version: "v1".into(),
            api_version: "apiextensions.k8s.io/v1".into(),
            kind: "CustomResourceDefinition".into(),
            plural: "customresourcedefinitions".into(),
        };
        let api: Api<DynamicObject> = Api::all_with(self.client(), &crd);
        let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("manifests/crds"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        let mut served = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let mut v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                if v.is_null() {
                    continue;
                }
                strip_cel(&mut v);
                let group = v["spec"]["group"].as_str().unwrap().to_owned();
                let version = v["spec"]["versions"][0]["name"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let plural = v["spec"]["names"]["plural"].as_str().unwrap().to_owned();
                served.push((format!("{group}/{version}"), plural));
                let obj: DynamicObject = serde_json::from_value(v).unwrap();
                api.create(&PostParams::default(), &obj).await.unwrap();
            }
        }
        let c = self.client();
        eventually("the CRDs are served", || {
            let c = c.clone();
            let served = served.clone();
            async move {
                for (gv, plural) in &served {
                    let r = c.list_api_group_resources(gv).await.ok()?;
                    r.resources.iter().find(|r| &r.name == plural)?;
                }
                Some(())
            }
        })
        .await;
    }

    pub fn ns_api<K>(&self, ns: &str) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        Api::namespaced(self.client(), ns)
    }

    pub async fn namespace(&self, name: &str, ambient: bool) {
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
    pub async fn pod(
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
    pub async fn set_running(&self, ns: &str, name: &str, ip: &str) {
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
    pub async fn force_delete_pod(&self, ns: &str, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client(), ns);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        api.delete(name, &dp).await.unwrap();
    }

    pub async fn service_account(&self, ns: &str, name: &str) {
        create::<ServiceAccount>(self.ns_api(ns), json!({"metadata": {"name": name}})).await;
    }

    /// A TokenRequest token for `ns/sa`, bound to `pod`, for `audience`.
    pub async fn token(&self, ns: &str, sa: &str, pod: &Pod, audience: &str) -> String {
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

    pub fn write(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    /// istiod-lite on this cluster; returns once every watch has listed.
    pub async fn istiod(&self) -> istiod_lite::app::Bound {
        self.istiod_with(&self.kubeconfig.clone()).await
    }

    /// istiod-lite reaching the cluster through `kubeconfig` (e.g. one that impersonates).
    pub async fn istiod_with(&self, kubeconfig: &Path) -> istiod_lite::app::Bound {
        // The leader Lease in `default` (every API server has it; istio-system may not exist).
        self.istiod_args(kubeconfig, &["--pod-namespace", "default"])
            .await
    }

    /// istiod-lite with more flags (e.g. `--pod-name`, `--leader-lease-duration`).
    pub async fn istiod_args(&self, kubeconfig: &Path, extra: &[&str]) -> istiod_lite::app::Bound {
        let mut argv = vec![
            "istiod-lite".to_owned(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--ca-dir".into(),
            self.dir.path().join("ca").display().to_string(),
            "--grpc-addr".into(),
            "127.0.0.1:0".into(),
            "--monitor-addr".into(),
            "127.0.0.1:0".into(),
        ];
        argv.extend(extra.iter().map(|a| a.to_string()));
        let args = istiod_lite::config::Args::try_parse_from(argv).unwrap();
        let cp = tokio::time::timeout(WAIT, istiod_lite::app::build(args.validate().unwrap()))
            .await
            .expect("istiod-lite did not finish its initial list")
            .unwrap();
        self.write("root.pem", &cp.root_pem);
        cp
    }

    pub fn control_plane(&self, cp: &istiod_lite::app::Bound) -> ztunnel::config::ControlPlane {
        ztunnel::config::ControlPlane {
            address: format!("https://{}", cp.grpc_addr),
            authority: cp.grpc_addr.to_string(),
            server_name: "istiod.istio-system.svc".into(),
            root_ca: self.dir.path().join("root.pem"),
        }
    }

    pub fn credentials(&self, name: &str, token: &str) -> ztunnel::controlplane::Credentials {
        ztunnel::controlplane::Credentials {
            token_path: self.write(&format!("{name}.token"), token),
            cluster_id: "Kubernetes".into(),
        }
    }
}

pub async fn create<K>(api: Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap()
}

pub fn strip_cel(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("x-kubernetes-validations");
            m.values_mut().for_each(strip_cel);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_cel),
        _ => {}
    }
}

pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
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
pub struct Xds {
    pub tx: tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    pub rx: tonic::Streaming<DeltaDiscoveryResponse>,
    pub workloads: BTreeMap<String, Workload>,
    pub services: BTreeMap<String, MeshService>,
    pub authorizations: BTreeMap<String, Authorization>,
    /// Every name ever removed, in order.
    pub removed: Vec<String>,
    /// Types answered at least once.
    pub answered: std::collections::BTreeSet<String>,
}

impl Xds {
    pub async fn connect(
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
    pub async fn next(&mut self) {
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
    pub async fn until(&mut self, what: &str, pred: impl Fn(&Xds) -> bool) {
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
pub async fn ztunnel_pod(c: &Cluster, name: &str, node: &str) -> Pod {
    c.pod(
        "istio-system",
        name,
        "ztunnel",
        node,
        json!({"app": "ztunnel"}),
    )
    .await
}

/// The API resource of a custom kind (`group/version`, its plural).
pub fn resource(group: &str, version: &str, kind: &str, plural: &str) -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}
