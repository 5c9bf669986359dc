//! Mesh-wide settings the policy decisions depend on (`meshConfig` fields and istiod feature
//! flags, with Istio's defaults), plus the status condition type both hops report.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::path::PathNormalization;

/// istiod feature flags that change policy decisions. Defaults are Istio's (all off).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureFlags {
    /// `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`: attach `istio_allow_waypoint_<ns>_<name>` (ALLOW the
    /// waypoint's identity) to every workload bound to a waypoint.
    pub auto_allow_waypoint_policy: bool,
    /// `AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY`: send dry-run policies to ztunnel (logged,
    /// never enforced) instead of not sending them.
    pub ambient_dry_run: bool,
    /// `ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES`: selector policies that select the
    /// waypoint's own pods are enforced with L4 semantics at the waypoint.
    pub layered_waypoint_policies: bool,
}

/// The flag names understood in `feature_flags`.
pub const FEATURE_FLAG_NAMES: [&str; 3] = [
    "PILOT_AUTO_ALLOW_WAYPOINT_POLICY",
    "AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY",
    "ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES",
];

impl FeatureFlags {
    /// Reads `NAME: bool` (or `"true"`/`"false"`) pairs; unknown names are an error naming them.
    pub fn from_map(map: &BTreeMap<String, serde_yaml::Value>) -> Result<Self, String> {
        let mut f = FeatureFlags::default();
        for (k, v) in map {
            let b = match v {
                serde_yaml::Value::Bool(b) => *b,
                serde_yaml::Value::String(s) => crate::model::parse_go_bool(s)
                    .ok_or_else(|| format!("feature_flags.{k}: {s:?} is not a boolean"))?,
                other => return Err(format!("feature_flags.{k}: {other:?} is not a boolean")),
            };
            match k.as_str() {
                "PILOT_AUTO_ALLOW_WAYPOINT_POLICY" => f.auto_allow_waypoint_policy = b,
                "AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY" => f.ambient_dry_run = b,
                "ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES" => f.layered_waypoint_policies = b,
                other => {
                    return Err(format!(
                        "feature_flags.{other}: unknown flag (known: {})",
                        FEATURE_FLAG_NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(f)
    }
}

/// Mesh settings. `Default` is Istio's default mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshConfig {
    pub trust_domain: String,
    pub root_namespace: String,
    pub trust_domain_aliases: Vec<String>,
    pub feature_flags: FeatureFlags,
    pub path_normalization: PathNormalization,
    /// Ours, not Istio's: every rule Istio would silently weaken fails closed instead.
    pub strict_policy: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            trust_domain_aliases: Vec::new(),
            feature_flags: FeatureFlags::default(),
            path_normalization: PathNormalization::Base,
            strict_policy: false,
        }
    }
}

impl MeshConfig {
    /// The trust domain and its aliases (Envoy's trust-domain bundle).
    pub fn trust_domain_bundle(&self) -> Vec<String> {
        let mut v = vec![self.trust_domain.clone()];
        for a in &self.trust_domain_aliases {
            if !v.contains(a) {
                v.push(a.clone());
            }
        }
        v
    }
}

/// Which status condition a policy gets (istiod writes these on the AuthorizationPolicy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConditionType {
    ZtunnelAccepted,
    WaypointAccepted,
}

/// A status condition with Istio's reasons (`Accepted`, `UnsupportedValue`, `Invalid`,
/// `AncestorNotBound`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// The object's kind (`AuthorizationPolicy`, `PeerAuthentication`).
    pub kind: &'static str,
    pub policy: String,
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// `"True"` or `"False"`, as Kubernetes writes it.
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

impl Condition {
    pub fn new(
        policy: &str,
        type_: ConditionType,
        ok: bool,
        reason: &str,
        message: impl Into<String>,
    ) -> Self {
        Condition {
            kind: "AuthorizationPolicy",
            policy: policy.to_string(),
            type_,
            status: if ok { "True" } else { "False" },
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    /// The same condition on an object of another kind.
    pub fn of_kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }
}
