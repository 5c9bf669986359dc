//! Waypoint deployment against a real kube-apiserver v1.20.2 (same harness as `k8s.rs`): a
//! Gateway of class `istio-waypoint` gets its ServiceAccount, Deployment and Service (owned by
//! it, Istio's labels and ports, written by server-side apply as `istiod-lite`), objects
//! deleted or edited by someone else come back, and the Gateway's status gets its addresses and
//! `Accepted`/`Programmed` conditions. Waypoints get routes, policies and DestinationRules as
//! written (`mesh.config.v1.KubeObject`) over delta xDS.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Service, ServiceAccount},
};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use mesh_proto::{
    envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
    mesh::config::v1::KubeObject,
    type_url,
};
use prost::Message;
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

    // Applied one after the other: the Service may lag the Deployment.
    let svc = eventually("the waypoint Service", || {
        let svcs = svcs.clone();
        async move { svcs.get_opt("waypoint").await.ok().flatten() }
    })
    .await;
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

/// A delta ADS client subscribed to `mesh.config.v1.KubeObject`, as a waypoint would be.
struct KubeXds {
    tx: tokio::sync::mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
    held: BTreeMap<String, serde_json::Value>,
    removed: Vec<String>,
}

impl KubeXds {
    async fn connect(c: &Cluster, cp: &istiod_lite::app::Bound, token: &str) -> KubeXds {
        let mut client = AggregatedDiscoveryServiceClient::new(
            ztunnel::controlplane::channel(&c.control_plane(cp)).unwrap(),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "waypoint~127.0.0.1~waypoint-0.mesh-k8s-kube~mesh-k8s-kube.svc.cluster.local"
                    .into(),
                ..Default::default()
            }),
            type_url: type_url::KUBE_OBJECT.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = client
            .delta_aggregated_resources(
                c.credentials("waypoint", token)
                    .request(tokio_stream::wrappers::ReceiverStream::new(rx)),
            )
            .await
            .unwrap()
            .into_inner();
        KubeXds {
            tx,
            rx,
            held: BTreeMap::new(),
            removed: Vec::new(),
        }
    }

    /// One response, applied and ACKed; returns the names it carried.
    async fn next(&mut self) -> Vec<String> {
        let r = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no xDS response in time")
            .unwrap()
            .expect("xDS stream ended");
        assert_eq!(r.type_url, type_url::KUBE_OBJECT);
        let mut names = Vec::new();
        for res in &r.resources {
            let any = res.resource.as_ref().unwrap();
            assert_eq!(any.type_url, type_url::KUBE_OBJECT);
            let o = KubeObject::decode(any.value.as_slice()).unwrap();
            assert_eq!(res.name, format!("{}/{}/{}", o.kind, o.namespace, o.name));
            let v: serde_json::Value = serde_json::from_slice(&o.json).unwrap();
            assert_eq!(v["apiVersion"], o.api_version.as_str());
            assert_eq!(v["kind"], o.kind.as_str());
            self.held.insert(res.name.clone(), v);
            names.push(res.name.clone());
        }
        for n in &r.removed_resources {
            self.held.remove(n);
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
        names
    }
}

async fn create_dynamic(c: &Cluster, ns: &str, ar: &ApiResource, body: serde_json::Value) {
    let api: Api<DynamicObject> = Api::namespaced_with(c.client(), ns, ar);
    let mut body = body;
    body["apiVersion"] = json!(ar.api_version);
    body["kind"] = json!(ar.kind);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(body).unwrap(),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoints_get_routes_and_policies_as_written_over_delta_xds() {
    let Some(c) = Cluster::up("waypoints_get_routes_and_policies_as_written_over_delta_xds").await
    else {
        return;
    };
    c.install_crds().await;
    let ns = "mesh-k8s-kube";
    c.namespace(ns, true).await;
    c.service_account(ns, "waypoint").await;
    let wp = c
        .pod(
            ns,
            "waypoint-0",
            "waypoint",
            "node-a",
            json!({"app": "waypoint"}),
        )
        .await;
    let http = resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
    let grpc = resource("gateway.networking.k8s.io", "v1", "GRPCRoute", "grpcroutes");
    let dr = resource(
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    );
    let ra = resource(
        "security.istio.io",
        "v1",
        "RequestAuthentication",
        "requestauthentications",
    );
    let ap = resource(
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    );
    let route_spec = json!({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
                            "rules": [{"backendRefs": [{"name": "reviews-v1", "port": 9080}]}]});
    create_dynamic(
        &c,
        ns,
        &http,
        json!({"metadata": {"name": "reviews"}, "spec": route_spec}),
    )
    .await;
    create_dynamic(
        &c,
        ns,
        &grpc,
        json!({"metadata": {"name": "grpc"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "grpc"}]}}),
    )
    .await;
    create_dynamic(
        &c,
        ns,
        &dr,
        json!({"metadata": {"name": "reviews"},
        "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}),
    )
    .await;
    create_dynamic(
        &c,
        ns,
        &ra,
        json!({"metadata": {"name": "jwt"},
        "spec": {"jwtRules": [{"issuer": "https://issuer.example"}]}}),
    )
    .await;
    create_dynamic(
        &c,
        ns,
        &ap,
        json!({"metadata": {"name": "allow-get"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
                 "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}}),
    )
    .await;

    create::<Service>(
        c.ns_api(ns),
        json!({"metadata": {"name": "reviews"},
               "spec": {"selector": {"app": "reviews"},
                        "ports": [{"name": "http", "port": 9080, "appProtocol": "http"}]}}),
    )
    .await;

    let cp = c.istiod().await;
    let token = c.token(ns, "waypoint", &wp, "istio-ca").await;
    let mut xds = KubeXds::connect(&c, &cp, &token).await;
    // Everything existed before istiod-lite started: the first answer holds all of it.
    let first = xds.next().await;
    let want = [
        format!("AuthorizationPolicy/{ns}/allow-get"),
        format!("DestinationRule/{ns}/reviews"),
        format!("GRPCRoute/{ns}/grpc"),
        format!("HTTPRoute/{ns}/reviews"),
        format!("RequestAuthentication/{ns}/jwt"),
        format!("Service/{ns}/reviews"),
    ];
    let ours: Vec<String> = xds
        .held
        .keys()
        .filter(|k| k.contains(&format!("/{ns}/")))
        .cloned()
        .collect();
    assert_eq!(ours, want, "{first:?}");
    assert!(
        xds.held.contains_key("Service/default/kubernetes"),
        "every namespace's objects are sent (no per-waypoint filtering yet)"
    );
    let svc = &xds.held[&want[5]];
    assert_eq!(svc["apiVersion"], "v1");
    assert_eq!(svc["spec"]["ports"][0]["appProtocol"], "http", "{svc}");
    let route = &xds.held[&want[3]];
    assert_eq!(route["spec"], route_spec, "the spec as written");
    assert_eq!(route["metadata"]["namespace"], ns);
    assert!(route["metadata"].get("managedFields").is_none(), "{route}");
    assert!(route.get("status").is_none(), "{route}");
    assert_eq!(
        xds.held[&want[0]]["spec"]["rules"][0]["to"][0]["operation"]["methods"][0],
        "GET"
    );

    // A status-only change sends nothing; a spec change sends that object alone.
    let routes: Api<DynamicObject> = Api::namespaced_with(c.client(), ns, &http);
    routes
        .patch_status(
            "reviews",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"parents": []}})),
        )
        .await
        .unwrap();
    let grpcs: Api<DynamicObject> = Api::namespaced_with(c.client(), ns, &grpc);
    grpcs
        .patch(
            "grpc",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"hostnames": ["grpc.example"]}})),
        )
        .await
        .unwrap();
    let changed = xds.next().await;
    assert_eq!(changed, [format!("GRPCRoute/{ns}/grpc")]);
    assert_eq!(
        xds.held[&changed[0]]["spec"]["hostnames"][0],
        "grpc.example"
    );

    // A deletion arrives as removed_resources.
    let drs: Api<DynamicObject> = Api::namespaced_with(c.client(), ns, &dr);
    drs.delete("reviews", &DeleteParams::default())
        .await
        .unwrap();
    let gone = format!("DestinationRule/{ns}/reviews");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !xds.removed.contains(&gone) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no removal of {gone}"
        );
        xds.next().await;
    }
    assert!(!xds.held.contains_key(&gone));
    assert_eq!(xds.held.len(), 6, "{:?}", xds.held.keys());
}
