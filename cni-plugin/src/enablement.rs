//! "Is this pod in the mesh?" — Istio's default enablement selectors, as one pure function.
//!
//! A pod is ambient when the pod has `istio.io/dataplane-mode=ambient`, or its namespace has
//! it and the pod does not say `istio.io/dataplane-mode=none`. Always excluded, whatever the
//! labels: host-network pods (no netns of their own), sidecar-injected pods, excluded
//! namespaces, and the mesh's own pods (ztunnel, the node agent) in the mesh namespace.

use std::collections::BTreeMap;

use crate::source::Pod;

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const MODE_AMBIENT: &str = "ambient";
pub const MODE_NONE: &str = "none";
/// Pod annotation recording the enrollment state: `enabled` (or `pending`).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// Present on sidecar-injected pods.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Name prefixes of the mesh's own pods in the mesh namespace (skipped by the plugin
/// before any lookup, so the agent's own pod never waits for the agent).
pub const MESH_POD_PREFIXES: &[&str] = &["ztunnel-", "mesh-cni-node-", "istio-cni-node-"];
/// `app` label values of the mesh's own pods.
const MESH_APPS: &[&str] = &["ztunnel", "mesh-cni-node", "istio-cni-node"];

/// The exclusions that do not depend on labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub exclude_namespaces: Vec<String>,
    pub mesh_namespace: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Ambient,
    Skip(Reason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    HostNetwork,
    SidecarInjected,
    ExcludedNamespace,
    MeshComponent,
    OptedOut,
    NotLabelled,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HostNetwork => "host network",
            Reason::SidecarInjected => "sidecar injected",
            Reason::ExcludedNamespace => "excluded namespace",
            Reason::MeshComponent => "mesh component",
            Reason::OptedOut => "pod label istio.io/dataplane-mode=none",
            Reason::NotLabelled => "no ambient label on pod or namespace",
        }
    }
}

impl Policy {
    /// Excluded by namespace and name alone (no lookup needed).
    pub fn skip_by_name(&self, namespace: &str, name: &str) -> Option<Reason> {
        if self.exclude_namespaces.iter().any(|n| n == namespace) {
            return Some(Reason::ExcludedNamespace);
        }
        if namespace == self.mesh_namespace && MESH_POD_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            return Some(Reason::MeshComponent);
        }
        None
    }

    pub fn decide(
        &self,
        pod: &Pod,
        namespace_labels: Option<&BTreeMap<String, String>>,
    ) -> Decision {
        if let Some(r) = self.skip_by_name(&pod.namespace, &pod.name) {
            return Decision::Skip(r);
        }
        if pod.namespace == self.mesh_namespace
            && pod
                .labels
                .get("app")
                .is_some_and(|a| MESH_APPS.contains(&a.as_str()))
        {
            return Decision::Skip(Reason::MeshComponent);
        }
        if pod.host_network {
            return Decision::Skip(Reason::HostNetwork);
        }
        if pod.annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
            return Decision::Skip(Reason::SidecarInjected);
        }
        match pod.labels.get(DATAPLANE_MODE).map(String::as_str) {
            Some(MODE_AMBIENT) => return Decision::Ambient,
            Some(MODE_NONE) => return Decision::Skip(Reason::OptedOut),
            _ => {}
        }
        let ns_ambient = namespace_labels
            .and_then(|l| l.get(DATAPLANE_MODE))
            .is_some_and(|m| m == MODE_AMBIENT);
        if ns_ambient {
            Decision::Ambient
        } else {
            Decision::Skip(Reason::NotLabelled)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(ns: &str, name: &str, l: &[(&str, &str)]) -> Pod {
        Pod {
            uid: "u".into(),
            name: name.into(),
            namespace: ns.into(),
            node_name: "n".into(),
            labels: labels(l),
            annotations: BTreeMap::new(),
            ips: vec![],
            service_account: "default".into(),
            host_network: false,
            phase: String::new(),
        }
    }

    fn policy() -> Policy {
        Policy {
            exclude_namespaces: vec!["kube-system".into()],
            mesh_namespace: "istio-system".into(),
        }
    }

    const AMB: &[(&str, &str)] = &[(DATAPLANE_MODE, MODE_AMBIENT)];
    const NONE: &[(&str, &str)] = &[(DATAPLANE_MODE, MODE_NONE)];

    #[test_case("foo", "app", &[], AMB, Decision::Ambient ; "namespace label")]
    #[test_case("foo", "app", AMB, &[], Decision::Ambient ; "pod label alone")]
    #[test_case("foo", "app", NONE, AMB, Decision::Skip(Reason::OptedOut) ; "pod opts out")]
    #[test_case("foo", "app", &[], &[], Decision::Skip(Reason::NotLabelled) ; "no labels")]
    #[test_case("foo", "app", &[], &[(DATAPLANE_MODE, "sidecar")], Decision::Skip(Reason::NotLabelled) ; "other mode")]
    #[test_case("kube-system", "coredns", AMB, AMB, Decision::Skip(Reason::ExcludedNamespace) ; "excluded namespace")]
    #[test_case("istio-system", "ztunnel-x1", AMB, AMB, Decision::Skip(Reason::MeshComponent) ; "ztunnel by name")]
    #[test_case("istio-system", "mesh-cni-node-7", AMB, AMB, Decision::Skip(Reason::MeshComponent) ; "agent by name")]
    #[test_case("istio-system", "zt", &[("app", "ztunnel"), (DATAPLANE_MODE, MODE_AMBIENT)], AMB, Decision::Skip(Reason::MeshComponent) ; "ztunnel by app label")]
    #[test_case("other", "ztunnel-x1", &[], AMB, Decision::Ambient ; "prefix only counts in the mesh namespace")]
    fn decide(
        ns: &str,
        name: &str,
        pod_labels: &[(&str, &str)],
        ns_labels: &[(&str, &str)],
        want: Decision,
    ) {
        let nsl = labels(ns_labels);
        assert_eq!(
            policy().decide(&pod(ns, name, pod_labels), Some(&nsl)),
            want
        );
    }

    #[test]
    fn host_network_and_sidecars_are_never_ambient() {
        let mut p = pod("foo", "a", AMB);
        p.host_network = true;
        assert_eq!(
            policy().decide(&p, None),
            Decision::Skip(Reason::HostNetwork)
        );
        let mut p = pod("foo", "a", AMB);
        p.annotations
            .insert(SIDECAR_STATUS_ANNOTATION.into(), "{}".into());
        assert_eq!(
            policy().decide(&p, None),
            Decision::Skip(Reason::SidecarInjected)
        );
    }

    #[test]
    fn unknown_namespace_means_not_ambient() {
        assert_eq!(
            policy().decide(&pod("foo", "a", &[]), None),
            Decision::Skip(Reason::NotLabelled)
        );
    }
}
