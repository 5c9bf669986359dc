//! The Kubernetes pod source against a real kube-apiserver (`e2e/k8s`, loopback only, no
//! kubelet). Pins: only this node's pods are seen; namespace labels and pod status IPs come
//! through; a namespace label change reaches `load()`; the `ambient.istio.io/redirection`
//! annotation is set and removed on the pod via `pods/status`.
//!
//! Needs the apiserver binaries (`bash e2e/k8s/build.sh`); skips with a notice otherwise,
//! unless MESH_REQUIRE_K8S=1 (CI), which makes that a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use cni_plugin::{
    kube_source::{self, KubeAnnotator, KubeSource},
    source::PodAnnotator,
};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One loopback apiserver + etcd, stopped by `down.sh` (by PID) on drop.
struct Cluster {
    _dir: tempfile::TempDir,
    state: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("e2e/k8s/down.sh"))
            .arg(&self.state)
            .output();
    }
}

fn cluster() -> Option<Cluster> {
    let dir = std::env::var("MESH_K8S_DIR").unwrap_or_else(|_| "/var/cache/mesh-k8s".into());
    let bin = Path::new(&dir).join("bin/kube-apiserver");
    if !bin.exists() {
        let why = format!("{} is missing: run `bash e2e/k8s/build.sh`", bin.display());
        if std::env::var("MESH_REQUIRE_K8S").as_deref() == Ok("1") {
            panic!("MESH_REQUIRE_K8S=1 but {why}");
        }
        eprintln!("SKIPPED: {why}; MESH_REQUIRE_K8S=1 makes this a failure");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = Command::new("bash")
        .arg(repo().join("e2e/k8s/up.sh"))
        .arg("--no-kcm")
        .arg(&state)
        .output()
        .unwrap();
    let c = Cluster { _dir: tmp, state };
    assert!(
        out.status.success(),
        "up.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(c)
}

fn pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "foo"},
        "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]}
    }))
    .unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_source_sees_this_nodes_pods_and_annotates_them() {
    let Some(c) = cluster() else { return };
    let client = kube_source::client(Some(&c.state.join("kubeconfig")))
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "foo", "labels": {"istio.io/dataplane-mode": "ambient"}}
    }))
    .unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "foo");
    pods.create(&PostParams::default(), &pod("here", "node1"))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("there", "node2"))
        .await
        .unwrap();
    // No kubelet: play its part and report the pod's IP.
    let status = serde_json::json!({"status": {"phase": "Running", "podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}]}});
    pods.patch_status("here", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let mirror = tempfile::tempdir().unwrap();
    let (_trigger, drain) = mesh_rt::drain::new();
    let source = KubeSource {
        client: client.clone(),
        node: "node1".into(),
        mirror: Some(mirror.path().to_path_buf()),
    };
    let rx = mesh_rt::source::subscribe(source, drain).await.unwrap();
    let src = std::sync::Arc::new(KubeAnnotator::new(client.clone()));
    eventually("the pod's IP in the source", || {
        rx.borrow()
            .pod("foo", "here")
            .is_some_and(|p| !p.ips.is_empty())
    })
    .await;
    let state = (**rx.borrow()).clone();
    assert!(
        state.pod("foo", "there").is_none(),
        "a pod of another node was watched"
    );
    let here = state.pod("foo", "here").unwrap().clone();
    assert_eq!(here.node_name, "node1");
    assert_eq!(
        here.ips,
        vec!["10.244.1.2".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(
        state.namespace_labels("foo").unwrap()["istio.io/dataplane-mode"],
        "ambient"
    );
    assert!(mirror.path().join("cluster.yaml").exists());

    // The namespace leaves the mesh: the source follows.
    let unlabel = serde_json::json!({"metadata": {"labels": {"istio.io/dataplane-mode": null}}});
    namespaces
        .patch("foo", &PatchParams::default(), &Patch::Merge(&unlabel))
        .await
        .unwrap();
    eventually("the label change in the source", || {
        rx.borrow()
            .namespace_labels("foo")
            .is_some_and(|l| !l.contains_key("istio.io/dataplane-mode"))
    })
    .await;
    // ... and so does the plugin's mirror.
    eventually("the label change in the plugin's mirror", || {
        cni_plugin::source::FilesSource::new(mirror.path())
            .load()
            .is_ok_and(|m| {
                m.namespace_labels("foo")
                    .is_some_and(|l| !l.contains_key("istio.io/dataplane-mode"))
            })
    })
    .await;

    // Annotate through pods/status, then remove it.
    let (s2, p2) = (src.clone(), here.clone());
    tokio::spawn(async move { s2.annotate(&p2, "ambient.istio.io/redirection", Some("enabled")) })
        .await
        .unwrap()
        .unwrap();
    let got = pods.get("here").await.unwrap();
    assert_eq!(
        got.metadata
            .annotations
            .unwrap_or_default()
            .get("ambient.istio.io/redirection")
            .map(String::as_str),
        Some("enabled")
    );
    let (s2, p2) = (src.clone(), here.clone());
    tokio::spawn(async move { s2.annotate(&p2, "ambient.istio.io/redirection", None) })
        .await
        .unwrap()
        .unwrap();
    let got = pods.get("here").await.unwrap();
    assert!(
        !got.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("ambient.istio.io/redirection")
    );
}
