//! `manifests/` against a real kube-apiserver v1.20.2 (same harness as `k8s.rs`): every
//! manifest passes `kubectl apply --dry-run=server` (the CRDs and the namespace applied for
//! real first), the kustomize base lists every file, and istiod-lite running as its own
//! ServiceAccount (`istio-system/istiod`, impersonated) with only the shipped ClusterRole
//! lists every kind it watches, deploys a waypoint and writes its status, and writes
//! AuthorizationPolicies' `ZtunnelAccepted` and `WaypointAccepted` conditions.
//!
//! The Helm chart (`manifests/chart`): `helm lint` passes, the plain manifests are exactly what
//! it renders with its defaults (`manifests/render.sh --check`), and rendered with other
//! values into another namespace it passes the server dry run and names no `istio-system`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::ConfigMap};
use kube::{
    Api,
    api::{DynamicObject, PostParams},
};
use serde_json::json;

fn ok(what: &str, out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The project's pinned Helm (`e2e/k8s/helm.sh` installs it next to kubectl), or `None`
/// (the test is skipped, unless `MESH_REQUIRE_K8S=1` makes that a failure).
fn helm(test: &str) -> Option<PathBuf> {
    let dir = std::env::var("MESH_K8S_DIR").unwrap_or_else(|_| "/var/cache/mesh-k8s".into());
    let helm = Path::new(&dir).join("bin/helm");
    if helm.exists() {
        return Some(helm);
    }
    let why = format!("{} is missing (run bash e2e/k8s/helm.sh)", helm.display());
    if std::env::var("MESH_REQUIRE_K8S").as_deref() == Ok("1") {
        panic!("MESH_REQUIRE_K8S=1 but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

fn chart() -> String {
    repo().join("manifests/chart").display().to_string()
}

#[test]
fn the_chart_lints_and_renders_exactly_the_plain_manifests() {
    let Some(helm) = helm("the_chart_lints_and_renders_exactly_the_plain_manifests") else {
        return;
    };
    let lint = std::process::Command::new(&helm)
        .args(["lint", "--strict", &chart()])
        .output()
        .unwrap();
    ok("helm lint", &lint);
    let check = std::process::Command::new("bash")
        .arg(repo().join("manifests/render.sh"))
        .arg("--check")
        .env("MESH_HELM", &helm)
        .output()
        .unwrap();
    ok(
        "manifests/render.sh --check (the plain manifests are stale: run bash manifests/render.sh)",
        &check,
    );
}

/// Every YAML file under `manifests/` but the chart, relative to it.
fn manifest_files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "chart") {
                    walk(&p, base, out);
                }
            } else if p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
            {
                out.push(p.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let base = repo().join("manifests");
    let mut out = Vec::new();
    walk(&base, &base, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_passes_server_dry_run_and_the_rbac_is_enough() {
    let Some(c) = Cluster::up("every_manifest_passes_server_dry_run_and_the_rbac_is_enough").await
    else {
        return;
    };
    let manifests: PathBuf = repo().join("manifests");
    let m = |rel: &str| manifests.join(rel).display().to_string();

    // The kustomize base lists every manifest file.
    let kustomization = std::fs::read_to_string(manifests.join("kustomization.yaml")).unwrap();
    let k: serde_yaml::Value = serde_yaml::from_str(&kustomization).unwrap();
    let mut listed: Vec<String> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    assert_eq!(listed, manifest_files(), "kustomization.yaml resources");

    // CRDs and the namespace for real, then everything as a server-side dry run.
    ok("apply crds", &c.kubectl(&["apply", "-f", &m("crds")]));
    ok(
        "crds established",
        &c.kubectl(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd",
            "--all",
        ]),
    );
    ok(
        "apply namespace",
        &c.kubectl(&["apply", "-f", &m("namespace.yaml")]),
    );
    for f in manifest_files() {
        let out = ok(
            &format!("dry run of {f}"),
            &c.kubectl(&["apply", "--dry-run=server", "-f", &m(&f)]),
        );
        assert!(out.contains("(server dry run)"), "{f}: {out}");
    }
    let out = ok(
        "dry run of the kustomize base",
        &c.kubectl(&["apply", "--dry-run=server", "-k", &m("")]),
    );
    for want in [
        "deployment.apps/istiod",
        "daemonset.apps/ztunnel",
        "daemonset.apps/istio-cni-node",
        "clusterrole.rbac.authorization.k8s.io/istiod-lite",
        "gatewayclass.gateway.networking.k8s.io/istio-waypoint",
    ] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }

    // The chart with other values into another namespace: nothing may still say istio-system.
    if let Some(helm) = helm("every_manifest_passes_server_dry_run_and_the_rbac_is_enough") {
        c.namespace("mesh-helm", false).await;
        let rendered = std::process::Command::new(&helm)
            .args(["template", "mesh", &chart(), "--namespace", "mesh-helm"])
            .args([
                "--set",
                "hub=registry.example/mesh,tag=v9,istiod.replicas=2",
            ])
            .args([
                "--set",
                "trustDomain=example.org,cni.binDir=/home/kubernetes/bin",
            ])
            .args([
                "--set",
                "istiod.env.AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY=true",
            ])
            .args(["--set", "waypointClass.enabled=false"])
            .output()
            .unwrap();
        let rendered = ok("helm template", &rendered);
        assert!(!rendered.contains("istio-system"), "{rendered}");
        for want in [
            "https://istiod.mesh-helm.svc:15012",
            "image: registry.example/mesh/ztunnel:v9",
            "value: mesh-helm/ztunnel",
            "replicas: 2",
            "path: /home/kubernetes/bin",
            "value: \"example.org\"",
        ] {
            assert!(rendered.contains(want), "{want} missing from:\n{rendered}");
        }
        assert!(!rendered.contains("kind: GatewayClass"), "{rendered}");
        let f = c.write("chart.yaml", &rendered);
        let out = ok(
            "dry run of the rendered chart",
            &c.kubectl(&["apply", "--dry-run=server", "-f", &f.display().to_string()]),
        );
        for want in [
            "deployment.apps/istiod",
            "daemonset.apps/ztunnel",
            "daemonset.apps/istio-cni-node",
            "role.rbac.authorization.k8s.io/istiod-lite-leader",
        ] {
            assert!(out.contains(want), "{want} missing from:\n{out}");
        }
    }

    // istiod-lite's RBAC for real, and istiod-lite impersonating its ServiceAccount.
    ok(
        "apply istiod-lite",
        &c.kubectl(&["apply", "-f", &m("istiod-lite/istiod-lite.yaml")]),
    );
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&c.kubeconfig).unwrap()).unwrap();
    for u in kc["users"].as_sequence_mut().unwrap() {
        u["user"]["as"] = "system:serviceaccount:istio-system:istiod".into();
    }
    let as_istiod = c.write("istiod.kubeconfig", &serde_yaml::to_string(&kc).unwrap());
    // Returns only once every watched kind listed: a missing list/watch verb fails here.
    // The leader Lease in istio-system: the Role in istiod-lite.yaml must allow it.
    let cp = c
        .istiod_args(&as_istiod, &["--pod-namespace", "istio-system"])
        .await;
    // The mesh root for ztunnel's istiod-ca-cert volume, published in istio-system.
    let cms: Api<ConfigMap> = c.ns_api("istio-system");
    let root = eventually("istio-system/istio-ca-root-cert", || {
        let cms = cms.clone();
        async move { cms.get_opt("istio-ca-root-cert").await.ok().flatten() }
    })
    .await;
    assert_eq!(root.data.unwrap()["root-cert.pem"], cp.root_pem);

    let ns = "mesh-k8s-rbac";
    c.namespace(ns, true).await;
    let gws: Api<DynamicObject> = Api::namespaced_with(
        c.client(),
        ns,
        &resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    );
    let gw: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint"},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    }))
    .unwrap();
    gws.create(&PostParams::default(), &gw).await.unwrap();
    let deps: Api<Deployment> = c.ns_api(ns);
    eventually("the waypoint Deployment, applied as istiod", || {
        let deps = deps.clone();
        async move { deps.get_opt("waypoint").await.ok().flatten() }
    })
    .await;
    let aps: Api<DynamicObject> = Api::namespaced_with(
        c.client(),
        ns,
        &resource(
            "security.istio.io",
            "v1",
            "AuthorizationPolicy",
            "authorizationpolicies",
        ),
    );
    let ap: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-get"},
        "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}
    }))
    .unwrap();
    aps.create(&PostParams::default(), &ap).await.unwrap();
    let cond = eventually("the policy's ZtunnelAccepted, written as istiod", || {
        let aps = aps.clone();
        async move {
            let p = aps.get("deny-get").await.ok()?;
            let conds = p.data.get("status")?.get("conditions")?.as_array()?.clone();
            conds.into_iter().find(|c| c["type"] == "ZtunnelAccepted")
        }
    })
    .await;
    // HTTP methods are beyond ztunnel: Istio's reason and message (mesh-policy's).
    assert_eq!(cond["status"], "False", "{cond}");
    assert_eq!(cond["reason"], "UnsupportedValue", "{cond}");
    assert!(
        cond["message"]
            .as_str()
            .unwrap_or("")
            .contains("ztunnel does not support HTTP attributes (found: methods)"),
        "{cond}"
    );
    eventually("the Gateway Programmed, written as istiod", || {
        let gws = gws.clone();
        async move {
            let g = gws.get("waypoint").await.ok()?;
            let conds = g.data.get("status")?.get("conditions")?.as_array()?.clone();
            conds
                .iter()
                .any(|c| c["type"] == "Programmed" && c["status"] == "True")
                .then_some(())
        }
    })
    .await;
    // A targetRefs policy on the waypoint: WaypointAccepted, bound to it.
    let wp_policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "at-waypoint"},
        "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                 "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}
    }))
    .unwrap();
    aps.create(&PostParams::default(), &wp_policy)
        .await
        .unwrap();
    let cond = eventually("the policy's WaypointAccepted", || {
        let aps = aps.clone();
        async move {
            let p = aps.get("at-waypoint").await.ok()?;
            let conds = p.data.get("status")?.get("conditions")?.as_array()?.clone();
            conds.into_iter().find(|c| c["type"] == "WaypointAccepted")
        }
    })
    .await;
    assert_eq!(cond["status"], "True", "{cond}");
    assert_eq!(cond["reason"], "Accepted", "{cond}");
    assert_eq!(cond["message"], format!("bound to {ns}/waypoint"), "{cond}");

    // Route status, written as istiod (httproutes/status in the ClusterRole).
    create::<k8s_openapi::api::core::v1::Service>(
        c.ns_api(ns),
        json!({"metadata": {"name": "reviews"}, "spec": {"ports": [{"port": 9080}]}}),
    )
    .await;
    let routes: Api<DynamicObject> = Api::namespaced_with(
        c.client(),
        ns,
        &resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    );
    let route: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "reviews"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                 "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}]}
    }))
    .unwrap();
    routes.create(&PostParams::default(), &route).await.unwrap();
    eventually("the route's Accepted, written as istiod", || {
        let routes = routes.clone();
        async move {
            let r = routes.get("reviews").await.ok()?;
            let p = r.data.get("status")?.get("parents")?.get(0)?.clone();
            (p["conditions"][0]["status"] == "True").then_some(())
        }
    })
    .await;
}
