//! The waypoint objects for one Gateway and the status istiod-lite wants on it: pure
//! functions of the Gateway and [`Settings`], following the facts of Istio's `waypoint`
//! template (names, labels, annotations, owner references, ports; waypoint-semantics.md
//! §1.1) with the mesh's own container (configured like ztunnel: `XDS_ADDRESS`,
//! `CA_ADDRESS`, the `istio-ca` token, the root in `istio-ca-root-cert`).

use std::collections::{BTreeMap, BTreeSet, hash_map::DefaultHasher};
use std::hash::{Hash, Hasher};

use serde_json::{Value, json};

use super::DeployError;
use crate::{
    config::WaypointConfig,
    waypoint::{Condition, GATEWAY_NAME_LABEL, Gateway, GatewayStatusAddress, WAYPOINT_CLASS},
};

/// The server-side apply field manager of everything istiod-lite writes.
pub const FIELD_MANAGER: &str = "istiod-lite";
pub const GATEWAY_CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// The value of [`MANAGED_LABEL`] for waypoints (Istio's controller name, `/` → `-`).
pub const CONTROLLER_LABEL: &str = "istio.io-mesh-controller";
pub const NAME_OVERRIDE: &str = "gateway.istio.io/name-override";
pub const SERVICE_ACCOUNT_OVERRIDE: &str = "gateway.istio.io/service-account";
/// The ConfigMap with the mesh root, in every namespace that has a waypoint.
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";
/// Infrastructure annotations never copied onto generated objects (as Istio).
const NOT_COPIED: [&str; 4] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    NAME_OVERRIDE,
    SERVICE_ACCOUNT_OVERRIDE,
    "gateway.istio.io/controller-version",
];
const STATUS_PORT: u16 = 15021;
const METRICS_PORT: u16 = 15020;

/// Everything a rendered waypoint needs besides its Gateway.
#[derive(Debug, Clone)]
pub struct Settings {
    pub waypoint: WaypointConfig,
    pub trust_domain: String,
    pub cluster_id: String,
    pub domain_suffix: String,
    /// PEM of the mesh roots, published as the `istio-ca-root-cert` ConfigMap.
    pub root_pem: String,
    /// Where the root ConfigMap is also published for ztunnel (`ROOT_NAMESPACE`).
    pub root_namespace: String,
}

/// The `istio-ca-root-cert` ConfigMap of `ns` (Istio's name and key).
pub fn root_cert(ns: &str, root_pem: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": ROOT_CERT_CONFIGMAP, "namespace": ns, "labels": {"istio.io/config": "true"}},
        "data": {"root-cert.pem": root_pem},
    })
}

/// The objects deployed for one Gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub name: String,
    pub service_account: Value,
    pub deployment: Value,
    pub service: Value,
    pub root_cert: Value,
}

impl Rendered {
    pub(super) fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for v in [
            &self.service_account,
            &self.deployment,
            &self.service,
            &self.root_cert,
        ] {
            v.to_string().hash(&mut h);
        }
        h.finish()
    }

    pub(super) fn service_account_name(&self) -> &str {
        self.service_account["metadata"]["name"]
            .as_str()
            .unwrap_or(&self.name)
    }
}

/// Listener name → Service port name (ports allow no `.` and 63 characters).
fn port_name(listener: &str, protocol: &str, i: usize) -> String {
    let mut n: String = listener.to_lowercase().replace('.', "-");
    n.truncate(63);
    if n.is_empty() {
        format!("{}-{i}", protocol.to_lowercase())
    } else {
        n
    }
}

fn map(m: &BTreeMap<String, String>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// The waypoint objects for `gw`, as Istio's `waypoint` template renders them (our
/// container: the mesh's waypoint, configured like ztunnel). Pure.
pub fn render(
    gw: &Gateway,
    gateway_api_version: &str,
    s: &Settings,
) -> Result<Rendered, DeployError> {
    let key = format!("{}/{}", gw.namespace(), gw.name());
    let bad = |reason: &str| DeployError::Render {
        gateway: key.clone(),
        reason: reason.to_owned(),
    };
    let uid = gw
        .metadata
        .uid
        .as_deref()
        .ok_or_else(|| bad("no metadata.uid (not read from the API server?)"))?;
    if gw.name().is_empty() {
        return Err(bad("no metadata.name"));
    }
    let ns = gw.namespace();
    let annotations = gw.metadata.annotations.clone().unwrap_or_default();
    let name = annotations
        .get(NAME_OVERRIDE)
        .cloned()
        .unwrap_or_else(|| gw.name().to_owned());
    let sa = annotations
        .get(SERVICE_ACCOUNT_OVERRIDE)
        .cloned()
        .unwrap_or_else(|| name.clone());
    let infra = gw.spec.infrastructure.clone().unwrap_or_default();
    let mut infra_annotations = infra.annotations.clone();
    infra_annotations.retain(|k, _| !NOT_COPIED.contains(&k.as_str()));
    let mut labels = infra.labels.clone();
    labels.insert(GATEWAY_NAME_LABEL.into(), gw.name().into());
    labels.insert(GATEWAY_CLASS_LABEL.into(), WAYPOINT_CLASS.into());
    let mut managed_labels = labels.clone();
    managed_labels.insert(MANAGED_LABEL.into(), CONTROLLER_LABEL.into());
    let mut pod_labels = BTreeMap::from([
        ("sidecar.istio.io/inject".to_owned(), "false".to_owned()),
        ("istio.io/dataplane-mode".to_owned(), "none".to_owned()),
        ("service.istio.io/canonical-name".to_owned(), name.clone()),
        (
            "service.istio.io/canonical-revision".to_owned(),
            "latest".to_owned(),
        ),
    ]);
    pod_labels.extend(managed_labels.clone());
    let mut pod_annotations = infra_annotations.clone();
    pod_annotations.extend([
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
        ("prometheus.io/port".to_owned(), METRICS_PORT.to_string()),
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
    ]);
    let owner = json!([{
        "apiVersion": gateway_api_version, "kind": "Gateway", "name": gw.name(), "uid": uid,
    }]);
    let meta =
        |name: &str, labels: &BTreeMap<String, String>, annotations: &BTreeMap<String, String>| {
            json!({
                "name": name, "namespace": ns, "labels": map(labels),
                "annotations": map(annotations), "ownerReferences": owner,
            })
        };
    let service_account = json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": meta(&sa, &labels, &infra_annotations),
    });
    let env = |n: &str, v: &str| json!({"name": n, "value": v});
    let field =
        |n: &str, path: &str| json!({"name": n, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let w = &s.waypoint;
    let mut container = json!({
        "name": "istio-proxy",
        "image": w.image,
        "imagePullPolicy": w.image_pull_policy,
        "ports": [
            {"containerPort": waypoint_hbone_port(), "name": "hbone", "protocol": "TCP"},
            {"containerPort": METRICS_PORT, "name": "metrics", "protocol": "TCP"},
            {"containerPort": STATUS_PORT, "name": "status-port", "protocol": "TCP"},
        ],
        "env": [
            env("XDS_ADDRESS", &w.xds_address),
            env("CA_ADDRESS", &w.xds_address),
            env("XDS_ROOT_CA", "/var/run/secrets/istio/root-cert.pem"),
            env("CA_ROOT_CA", "/var/run/secrets/istio/root-cert.pem"),
            env("AUTH_TOKEN_PATH", "/var/run/secrets/tokens/istio-token"),
            env("TRUST_DOMAIN", &s.trust_domain),
            env("CLUSTER_ID", &s.cluster_id),
            // The waypoint finds the policies and routes attached to its Gateway by name
            // (its service account may differ: gateway.istio.io/service-account).
            env("GATEWAY_NAME", gw.name()),
            field("POD_NAME", "metadata.name"),
            field("POD_NAMESPACE", "metadata.namespace"),
            field("INSTANCE_IP", "status.podIP"),
            field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field("NODE_NAME", "spec.nodeName"),
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": STATUS_PORT, "scheme": "HTTP"},
            "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 1,
        },
        "securityContext": {
            "privileged": false, "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
        ],
    });
    if !w.args.is_empty() {
        container["args"] = json!(w.args);
    }
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(&name, &managed_labels, &infra_annotations),
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: gw.name()}},
            "template": {
                "metadata": {"labels": map(&pod_labels), "annotations": map(&pod_annotations)},
                "spec": {
                    "serviceAccountName": sa,
                    "containers": [container],
                    "volumes": [
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}}]}},
                        {"name": "istiod-ca-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}},
                    ],
                },
            },
        },
    });
    let mut ports = vec![
        json!({"name": "status-port", "port": STATUS_PORT, "protocol": "TCP", "appProtocol": "tcp"}),
    ];
    let mut seen = BTreeSet::from([STATUS_PORT]);
    for (i, l) in gw.spec.listeners.iter().enumerate() {
        if l.port == 0 || !seen.insert(l.port) {
            continue;
        }
        ports.push(json!({
            "name": port_name(&l.name, &l.protocol, i), "port": l.port, "protocol": "TCP",
            "appProtocol": l.protocol.to_lowercase(),
        }));
    }
    let mut svc_annotations = infra_annotations.clone();
    svc_annotations.insert(
        "networking.istio.io/traffic-distribution".into(),
        "PreferClose".into(),
    );
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(&name, &labels, &svc_annotations),
        "spec": {"type": "ClusterIP", "selector": {GATEWAY_NAME_LABEL: gw.name()}, "ports": ports},
    });
    let root_cert = root_cert(ns, &s.root_pem);
    Ok(Rendered {
        name,
        service_account,
        deployment,
        service,
        root_cert,
    })
}

fn waypoint_hbone_port() -> u16 {
    mesh_core::workload::HBONE_PORT
}

/// The status istiod-lite wants on `gw`, given the waypoint Service's ClusterIP (if it exists
/// and has one). `now` stamps conditions whose status changes. Pure.
pub fn desired_status(
    gw: &Gateway,
    service: &str,
    cluster_ip: Option<&str>,
    domain_suffix: &str,
    now: &str,
) -> (Vec<GatewayStatusAddress>, Vec<Condition>) {
    let ns = gw.namespace();
    let host = format!("{service}.{ns}.svc.{domain_suffix}");
    let generation = gw.metadata.generation;
    let (addresses, programmed) = match cluster_ip.filter(|ip| !ip.is_empty() && *ip != "None") {
        Some(ip) => (
            vec![
                GatewayStatusAddress {
                    type_: Some("Hostname".into()),
                    value: host.clone(),
                },
                GatewayStatusAddress {
                    type_: Some("IPAddress".into()),
                    value: ip.to_owned(),
                },
            ],
            (
                "True",
                "Programmed",
                format!(
                    "Resource programmed, assigned to service(s) {host}:{}",
                    waypoint_hbone_port()
                ),
            ),
        ),
        None => (
            vec![],
            (
                "False",
                "AddressNotAssigned",
                format!("Waiting for Service {ns}/{service} to be assigned a cluster IP"),
            ),
        ),
    };
    let old = gw.status.as_ref().map(|s| &s.conditions[..]).unwrap_or(&[]);
    let cond = |t: &str, status: &str, reason: &str, message: String| {
        let since = old
            .iter()
            .find(|c| c.type_ == t && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.to_owned());
        Condition {
            type_: t.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: Some(generation.unwrap_or(0)),
            last_transition_time: Some(since),
        }
    };
    let conditions = vec![
        cond("Accepted", "True", "Accepted", "Resource accepted".into()),
        cond("Programmed", programmed.0, programmed.1, programmed.2),
    ];
    (addresses, conditions)
}

/// True when `gw` already shows exactly this status (ignoring conditions of other types).
pub(super) fn status_matches(
    gw: &Gateway,
    addresses: &[GatewayStatusAddress],
    conditions: &[Condition],
) -> bool {
    let Some(st) = &gw.status else {
        return false;
    };
    st.addresses == addresses
        && conditions
            .iter()
            .all(|c| st.conditions.iter().any(|o| o == c))
}

pub(super) fn status_body(
    gw: &Gateway,
    api_version: &str,
    addresses: &[GatewayStatusAddress],
    conditions: &[Condition],
) -> Value {
    let addrs: Vec<Value> = addresses
        .iter()
        .map(|a| json!({"type": a.type_, "value": a.value}))
        .collect();
    let conds: Vec<Value> = conditions
        .iter()
        .map(|c| {
            json!({"type": c.type_, "status": c.status, "reason": c.reason, "message": c.message,
                   "observedGeneration": c.observed_generation.unwrap_or(0),
                   "lastTransitionTime": c.last_transition_time})
        })
        .collect();
    json!({
        "apiVersion": api_version, "kind": "Gateway",
        "metadata": {"name": gw.name(), "namespace": gw.namespace()},
        "status": {"addresses": addrs, "conditions": conds},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::parse_manifests;

    fn settings() -> Settings {
        Settings {
            waypoint: WaypointConfig {
                deploy: true,
                image: "mesh/waypoint:test".into(),
                image_pull_policy: "IfNotPresent".into(),
                args: vec!["--log".into(), "debug".into()],
                xds_address: "https://istiod.istio-system.svc:15012".into(),
            },
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            domain_suffix: "cluster.local".into(),
            root_pem: "ROOT".into(),
            root_namespace: "istio-system".into(),
        }
    }

    fn gateway(extra: &str) -> Gateway {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {{name: waypoint, namespace: foo, uid: u-1, generation: 3{extra}}}\n\
             spec:\n  gatewayClassName: istio-waypoint\n  infrastructure: {{labels: {{team: a}}, annotations: {{note: x, gateway.istio.io/service-account: ignored-here}}}}\n\
             \x20 listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n"
        );
        let (mut objs, rejected) = parse_manifests("gw.yaml", &yaml);
        assert!(rejected.is_empty(), "{rejected:?}");
        match objs.pop() {
            Some(crate::index::Object::Gateway(g)) => g,
            o => panic!("{o:?}"),
        }
    }

    // Istio's waypoint template: names, labels, owner, ports (waypoint-semantics.md §1.1).
    #[test]
    fn renders_istios_waypoint_objects() {
        let r = render(&gateway(""), "gateway.networking.k8s.io/v1", &settings()).unwrap();
        let d = &r.deployment;
        assert_eq!(d["metadata"]["name"], "waypoint");
        assert_eq!(d["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(d["metadata"]["ownerReferences"][0]["kind"], "Gateway");
        assert_eq!(d["metadata"]["labels"][MANAGED_LABEL], CONTROLLER_LABEL);
        assert_eq!(d["metadata"]["labels"]["team"], "a");
        let pod = &d["spec"]["template"]["metadata"];
        assert_eq!(pod["labels"]["istio.io/dataplane-mode"], "none");
        assert_eq!(pod["labels"]["sidecar.istio.io/inject"], "false");
        assert_eq!(pod["labels"][GATEWAY_NAME_LABEL], "waypoint");
        let env = &r.deployment["spec"]["template"]["spec"]["containers"][0]["env"];
        assert!(
            env.as_array().is_some_and(|e| e
                .iter()
                .any(|v| v["name"] == "GATEWAY_NAME" && v["value"] == "waypoint")),
            "{env}"
        );
        assert_eq!(pod["annotations"]["note"], "x");
        assert!(pod["annotations"].get(SERVICE_ACCOUNT_OVERRIDE).is_none());
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "mesh/waypoint:test");
        assert_eq!(c["args"], json!(["--log", "debug"]));
        assert_eq!(
            d["spec"]["template"]["spec"]["serviceAccountName"],
            "waypoint"
        );
        let ports = r.service["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports[0]["port"], 15021);
        assert_eq!(
            ports[1],
            json!({"name": "mesh", "port": 15008, "protocol": "TCP", "appProtocol": "hbone"})
        );
        assert_eq!(
            r.service["spec"]["selector"][GATEWAY_NAME_LABEL],
            "waypoint"
        );
        assert_eq!(
            r.service_account["metadata"]["labels"][GATEWAY_CLASS_LABEL],
            WAYPOINT_CLASS
        );
        // Overrides by annotation on the Gateway itself.
        let r = render(
            &gateway(", annotations: {gateway.istio.io/name-override: wp2, gateway.istio.io/service-account: wp-sa}"),
            "gateway.networking.k8s.io/v1",
            &settings(),
        )
        .unwrap();
        assert_eq!(r.deployment["metadata"]["name"], "wp2");
        assert_eq!(r.service_account["metadata"]["name"], "wp-sa");
        let e = render(&Gateway::default(), "v", &settings()).unwrap_err();
        assert!(e.to_string().contains("no metadata.uid"), "{e}");
    }

    #[test]
    fn programmed_follows_the_service_address_and_keeps_transition_times() {
        let gw = gateway("");
        let (a, c) = desired_status(&gw, "waypoint", None, "cluster.local", "T1");
        assert!(a.is_empty());
        assert_eq!(
            (c[1].status.as_str(), c[1].reason.as_str()),
            ("False", "AddressNotAssigned")
        );
        assert_eq!(c[0].observed_generation, Some(3));
        let (a, c) = desired_status(&gw, "waypoint", Some("10.96.0.7"), "cluster.local", "T2");
        assert_eq!(a[0].value, "waypoint.foo.svc.cluster.local");
        assert_eq!(a[1].value, "10.96.0.7");
        assert_eq!(c[1].reason, "Programmed");
        assert_eq!(
            c[1].message,
            "Resource programmed, assigned to service(s) waypoint.foo.svc.cluster.local:15008"
        );
        let mut shown = gw.clone();
        shown.status = Some(crate::waypoint::GatewayStatus {
            addresses: a.clone(),
            conditions: c.clone(),
        });
        assert!(status_matches(&shown, &a, &c));
        let (_, again) =
            desired_status(&shown, "waypoint", Some("10.96.0.7"), "cluster.local", "T3");
        assert_eq!(
            again[1].last_transition_time.as_deref(),
            Some("T2"),
            "unchanged status keeps its time"
        );
        assert!(!status_matches(&gw, &a, &c));
    }
}
