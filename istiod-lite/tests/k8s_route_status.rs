//! Route status against a real kube-apiserver v1.20.2 (same harness as `k8s.rs`): HTTPRoutes
//! with a Service parent get Istio's `status.parents` entry (`Accepted`, `ResolvedRefs`,
//! `controllerName: istio.io/gateway-controller`, the parentRef echoed back); a route the
//! waypoint would refuse says so naming the field, without touching the valid one; fixing it
//! flips the condition; a route for another controller's Gateway is left alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

fn routes(c: &Cluster, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        c.client(),
        ns,
        &resource("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
    )
}

/// The route's conditions towards its first parent, once its parent entry exists.
async fn parent_status(
    api: &Api<DynamicObject>,
    name: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    eventually(&format!("status of HTTPRoute {name}"), || {
        let api = api.clone();
        let want = &want;
        async move {
            let r = api.get(name).await.ok()?;
            let p = r.data.get("status")?.get("parents")?.get(0)?.clone();
            want(&p).then_some(p)
        }
    })
    .await
}

fn cond<'a>(p: &'a Value, t: &str) -> &'a Value {
    p["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == t))
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_with_service_parents_get_istio_status_and_invalid_ones_name_the_field() {
    let Some(c) =
        Cluster::up("routes_with_service_parents_get_istio_status_and_invalid_ones_name_the_field")
            .await
    else {
        return;
    };
    c.install_crds().await;
    let ns = "mesh-k8s-routes";
    c.namespace(ns, true).await;
    for svc in ["reviews", "reviews-v1"] {
        create::<Service>(
            c.ns_api(ns),
            json!({"metadata": {"name": svc}, "spec": {"ports": [{"port": 9080}]}}),
        )
        .await;
    }
    let _cp = c.istiod().await;
    let api = routes(&c, ns);
    let route = |name: &str, rules: Value| -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080}],
                     "rules": rules}
        }))
        .unwrap()
    };
    let pp = PostParams::default();
    api.create(
        &pp,
        &route(
            "good",
            json!([{"backendRefs": [{"name": "reviews-v1", "port": 9080}]}]),
        ),
    )
    .await
    .unwrap();
    api.create(
        &pp,
        &route(
            "bad",
            json!([{"matches": [{"path": {"type": "RegularExpression", "value": "(["}}],
                    "backendRefs": [{"name": "reviews-v2", "port": 9080}]}]),
        ),
    )
    .await
    .unwrap();
    // A route for some ingress Gateway that is not the mesh's: no entry from us.
    let ingress: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "ingress"},
        "spec": {"parentRefs": [{"name": "public"}], "rules": [{"backendRefs": [{"name": "reviews"}]}]}
    }))
    .unwrap();
    api.create(&pp, &ingress).await.unwrap();

    let good = parent_status(&api, "good", |_| true).await;
    assert_eq!(
        good["controllerName"], "istio.io/gateway-controller",
        "{good}"
    );
    assert_eq!(
        good["parentRef"],
        json!({"group": "", "kind": "Service", "name": "reviews", "port": 9080})
    );
    let a = cond(&good, "Accepted");
    assert_eq!(
        (&a["status"], &a["reason"], &a["message"]),
        (
            &json!("True"),
            &json!("Accepted"),
            &json!("Route was valid")
        ),
        "{good}"
    );
    assert_eq!(a["observedGeneration"], 1, "{good}");
    assert_eq!(cond(&good, "ResolvedRefs")["status"], "True", "{good}");

    let bad = parent_status(&api, "bad", |_| true).await;
    let a = cond(&bad, "Accepted");
    assert_eq!(
        (&a["status"], &a["reason"]),
        (&json!("False"), &json!("UnsupportedValue")),
        "{bad}"
    );
    assert!(
        a["message"]
            .as_str()
            .unwrap_or("")
            .contains("spec.rules[0].matches[0].path"),
        "{bad}"
    );
    let r = cond(&bad, "ResolvedRefs");
    assert_eq!(r["reason"], "BackendNotFound", "{bad}");
    assert_eq!(
        r["message"],
        format!("backend(s) not found: {ns}/reviews-v2"),
        "{bad}"
    );

    // The user fixes the route: Accepted flips (new generation), ResolvedRefs still false.
    api.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                                                 "backendRefs": [{"name": "reviews-v2", "port": 9080}]}]}})),
    )
    .await
    .unwrap();
    let fixed = parent_status(&api, "bad", |p| cond(p, "Accepted")["status"] == "True").await;
    assert_eq!(cond(&fixed, "Accepted")["observedGeneration"], 2, "{fixed}");
    assert_eq!(cond(&fixed, "ResolvedRefs")["status"], "False", "{fixed}");
    // The backend appears: resolved.
    create::<Service>(
        c.ns_api(ns),
        json!({"metadata": {"name": "reviews-v2"}, "spec": {"ports": [{"port": 9080}]}}),
    )
    .await;
    parent_status(&api, "bad", |p| cond(p, "ResolvedRefs")["status"] == "True").await;

    let ingress = api.get("ingress").await.unwrap();
    assert!(
        ingress
            .data
            .get("status")
            .is_none_or(|s| s.get("parents").is_none()),
        "{:?}",
        ingress.data
    );
}
