//! Leader election against a real kube-apiserver v1.20.2 (same harness as `k8s.rs`): of two
//! istiod-lite replicas one holds the Lease `istiod-lite-leader` and deploys waypoints; when it
//! drains it releases the Lease and the other takes over at once and deploys; a Lease taken by
//! a replica that then disappears (a crash) is taken over once it has not been renewed for the
//! lease duration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::{apps::v1::Deployment, coordination::v1::Lease};
use kube::{
    Api,
    api::{DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::json;

fn holder(l: &Lease) -> String {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

fn transitions(l: &Lease) -> i32 {
    l.spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or_default()
}

async fn gateway(c: &Cluster, ns: &str, name: &str) {
    let gws: Api<DynamicObject> = Api::namespaced_with(
        c.client(),
        ns,
        &resource("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
    );
    let gw: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
    }))
    .unwrap();
    gws.create(&PostParams::default(), &gw).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_hands_over_on_drain_and_after_a_crash() {
    let Some(c) = Cluster::up("one_replica_leads_and_hands_over_on_drain_and_after_a_crash").await
    else {
        return;
    };
    c.install_crds().await;
    let ns = "mesh-k8s-leader";
    c.namespace(ns, true).await;
    let leases: Api<Lease> = c.ns_api("default");
    let deps: Api<Deployment> = c.ns_api(ns);
    let args = |name: &'static str| {
        [
            "--pod-namespace",
            "default",
            "--pod-name",
            name,
            "--leader-lease-duration",
            "3s",
        ]
    };
    let a = c.istiod_args(&c.kubeconfig, &args("istiod-a")).await;
    eventually("istiod-a holds the Lease", || {
        let leases = leases.clone();
        async move {
            let l = leases.get_opt("istiod-lite-leader").await.ok()??;
            (holder(&l) == "istiod-a").then_some(())
        }
    })
    .await;
    let b = c.istiod_args(&c.kubeconfig, &args("istiod-b")).await;
    // b follows: over more than a lease duration the holder stays a (a renews every 0.5 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let l = leases.get("istiod-lite-leader").await.unwrap();
    assert_eq!(holder(&l), "istiod-a", "{l:?}");
    assert_eq!(transitions(&l), 0, "{l:?}");
    gateway(&c, ns, "first").await;
    eventually("the leader deploys the first waypoint", || {
        let deps = deps.clone();
        async move { deps.get_opt("first").await.ok().flatten() }
    })
    .await;

    // a drains: it releases the Lease, b takes it at its next round (well within a lease).
    let released = Instant::now();
    a.run(async {}).await;
    eventually("istiod-b holds the Lease after a's release", || {
        let leases = leases.clone();
        async move {
            let l = leases.get_opt("istiod-lite-leader").await.ok()??;
            (holder(&l) == "istiod-b").then_some(l)
        }
    })
    .await;
    assert!(
        released.elapsed() < Duration::from_secs(3),
        "handover after a release took {:?}",
        released.elapsed()
    );
    gateway(&c, ns, "second").await;
    eventually("the new leader deploys the second waypoint", || {
        let deps = deps.clone();
        async move { deps.get_opt("second").await.ok().flatten() }
    })
    .await;

    // A replica that takes the Lease and then vanishes (never renews): b waits out the lease
    // as its own clock sees it, then takes over again.
    leases
        .patch(
            "istiod-lite-leader",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "istiod-ghost"}})),
        )
        .await
        .unwrap();
    let taken = Instant::now();
    let before = transitions(&leases.get("istiod-lite-leader").await.unwrap());
    let l = eventually("istiod-b takes over the ghost's expired Lease", || {
        let leases = leases.clone();
        async move {
            let l = leases.get_opt("istiod-lite-leader").await.ok()??;
            (holder(&l) == "istiod-b").then_some(l)
        }
    })
    .await;
    assert!(
        taken.elapsed() >= Duration::from_secs(3),
        "took over a live-looking Lease after {:?}",
        taken.elapsed()
    );
    assert_eq!(transitions(&l), before + 1, "{l:?}");
    b.run(async {}).await;
}
