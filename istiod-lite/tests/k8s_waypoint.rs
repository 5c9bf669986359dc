//! Waypoint deployment against a real kube-apiserver v1.20.2 (same harness as `k8s.rs`): a
//! Gateway of class `istio-waypoint` gets its ServiceAccount, Deployment and Service (owned by
//! it, Istio's labels and ports, written by server-side apply as `istiod-lite`), objects
//! deleted or edited by someone else come back, and the Gateway's status gets its addresses and
//! `Accepted`/`Programmed` conditions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Service, ServiceAccount},
};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn gateway_resource() -> ApiResource {
    ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    }
}

fn cluster_ip(s: &Service) -> String {
    s.spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_gateway_gets_its_deployment_service_and_status() {
    let Some(c) = Cluster::up("a_waypoint_gateway_gets_its_deployment_service_and_status").await
    else {
        return;
    };
    c.install_crds().await;
    let ns = "mesh-k8s-wp";
    c.namespace(ns, true).await;
    let cp = c.istiod().await;
    let gws: Api<DynamicObject> = Api::namespaced_with(c.client(), ns, &gateway_resource());
    let gw: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "infrastructure": {"labels": {"team": "payments"}},
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    }))
    .unwrap();
    let gw = gws.create(&PostParams::default(), &gw).await.unwrap();
    let uid = gw.metadata.uid.clone().unwrap();

    let deps: Api<Deployment> = c.ns_api(ns);
    let svcs: Api<Service> = c.ns_api(ns);
    let sas: Api<ServiceAccount> = c.ns_api(ns);
    let dep = eventually("the waypoint Deployment", || {
        let deps = deps.clone();
        async move { deps.get_opt("waypoint").await.ok().flatten() }
    })
    .await;
    let owner = &dep.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
        ("Gateway", "waypoint", uid.as_str())
    );
    assert_eq!(owner.api_version, "gateway.networking.k8s.io/v1");
    let labels = dep.metadata.labels.clone().unwrap();
    assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "waypoint");
    assert_eq!(
        labels["gateway.istio.io/managed"],
        "istio.io-mesh-controller"
    );
    assert_eq!(labels["team"], "payments", "infrastructure labels copied");
    let managers: Vec<String> = dep
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(managers.contains(&"istiod-lite".to_owned()), "{managers:?}");
    let spec = dep.spec.as_ref().unwrap();
    let tmpl = spec.template.metadata.as_ref().unwrap();
    let pod_labels = tmpl.labels.as_ref().unwrap();
    assert_eq!(pod_labels["istio.io/dataplane-mode"], "none");
    assert_eq!(pod_labels["sidecar.istio.io/inject"], "false");
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
    let image = pod.containers[0].image.clone().unwrap();
    assert_eq!(image, "mesh/waypoint:latest", "the configured image");

    let svc = svcs.get("waypoint").await.unwrap();
    let ports: Vec<(String, i32, Option<String>)> = svc
        .spec
        .as_ref()
        .unwrap()
        .ports
        .iter()
        .flatten()
        .map(|p| {
            (
                p.name.clone().unwrap_or_default(),
                p.port,
                p.app_protocol.clone(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("status-port".to_owned(), 15021, Some("tcp".to_owned())),
            ("mesh".to_owned(), 15008, Some("hbone".to_owned()))
        ]
    );
    assert_eq!(
        svc.metadata.owner_references.as_ref().unwrap()[0].uid,
        uid,
        "the Service is owned by the Gateway"
    );
    let sa = sas.get("waypoint").await.unwrap();
    assert_eq!(sa.metadata.owner_references.as_ref().unwrap()[0].uid, uid);
    let root: Api<ConfigMap> = c.ns_api(ns);
    let root = root.get("istio-ca-root-cert").await.unwrap();
    assert_eq!(
        root.data.unwrap()["root-cert.pem"],
        cp.root_pem,
        "the mesh root for the waypoint's XDS_ROOT_CA"
    );

    // Status: addresses of the Service, Accepted and Programmed.
    let status_with = |ip: String| {
        let gws = gws.clone();
        move || {
            let gws = gws.clone();
            let ip = ip.clone();
            async move {
                let g = gws.get("waypoint").await.ok()?;
                let st = g.data.get("status")?.clone();
                let addrs = st["addresses"].as_array()?.clone();
                let values: Vec<&str> = addrs.iter().filter_map(|a| a["value"].as_str()).collect();
                values.contains(&ip.as_str()).then_some(st)
            }
        }
    };
    let st = eventually(
        "the Gateway status names the Service",
        status_with(cluster_ip(&svc)),
    )
    .await;
    assert_eq!(
        st["addresses"][0],
        json!({"type": "Hostname", "value": format!("waypoint.{ns}.svc.cluster.local")})
    );
    let cond = |t: &str| {
        st["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(cond("Accepted")["status"], "True");
    assert_eq!(cond("Accepted")["reason"], "Accepted");
    assert_eq!(cond("Programmed")["status"], "True");
    assert_eq!(cond("Programmed")["reason"], "Programmed");
    assert_eq!(
        cond("Programmed")["message"],
        format!(
            "Resource programmed, assigned to service(s) waypoint.{ns}.svc.cluster.local:15008"
        )
    );
    assert_eq!(cond("Programmed")["observedGeneration"], 1);

    // Steady state: no apply loop (nothing rewrites the objects or the status).
    let before = (
        deps.get("waypoint")
            .await
            .unwrap()
            .metadata
            .resource_version,
        gws.get("waypoint").await.unwrap().metadata.resource_version,
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = (
        deps.get("waypoint")
            .await
            .unwrap()
            .metadata
            .resource_version,
        gws.get("waypoint").await.unwrap().metadata.resource_version,
    );
    assert_eq!(
        before, after,
        "reconciling a settled waypoint writes nothing"
    );

    // The Service is deleted: it comes back, and the status follows its new ClusterIP.
    let old_uid = svc.metadata.uid.clone();
    svcs.delete("waypoint", &DeleteParams::default())
        .await
        .unwrap();
    let back = eventually("the Service is re-created", || {
        let svcs = svcs.clone();
        let old_uid = old_uid.clone();
        async move {
            let s = svcs.get_opt("waypoint").await.ok().flatten()?;
            (s.metadata.uid != old_uid).then_some(s)
        }
    })
    .await;
    eventually(
        "the status names the new ClusterIP",
        status_with(cluster_ip(&back)),
    )
    .await;

    // Someone else changes the image: istiod-lite owns that field and sets it back.
    deps.patch(
        "waypoint",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "istio-proxy", "image": "someone/else:1"}]}}}})),
    )
    .await
    .unwrap();
    eventually("the image is restored", || {
        let deps = deps.clone();
        async move {
            let d = deps.get("waypoint").await.ok()?;
            let img = d.spec?.template.spec?.containers[0].image.clone()?;
            (img == "mesh/waypoint:latest").then_some(())
        }
    })
    .await;

    // The Deployment is deleted: it comes back.
    deps.delete("waypoint", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the Deployment is re-created", || {
        let deps = deps.clone();
        let old = dep.metadata.uid.clone();
        async move {
            let d = deps.get_opt("waypoint").await.ok().flatten()?;
            (d.metadata.uid != old).then_some(())
        }
    })
    .await;

    // A Gateway of another class is left alone.
    let other: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "ingress"},
        "spec": {"gatewayClassName": "other", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}
    }))
    .unwrap();
    gws.create(&PostParams::default(), &other).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(deps.get_opt("ingress").await.unwrap().is_none());
    let g = gws.get("ingress").await.unwrap();
    assert!(
        g.data
            .get("status")
            .is_none_or(|s| s.get("conditions").is_none())
    );
}
