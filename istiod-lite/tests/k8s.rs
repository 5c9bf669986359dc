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

mod common;

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::{
    Api,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams},
};
use mesh_core::workload::{HealthStatus, PortMap, TunnelProtocol};
use mesh_proto::{
    istio::v1::auth::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
    type_url,
};
use serde_json::json;

use common::*;

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
