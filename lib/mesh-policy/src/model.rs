//! The `security.istio.io` objects as users write them (AuthorizationPolicy, PeerAuthentication,
//! RequestAuthentication, v1 and v1beta1 share one schema) and parsing of multi-document YAML.
//!
//! Parsing is strict like `kubectl apply` (server-side strict field validation): an unknown
//! field is an error that names its path, so a typo such as `principal:` never silently widens
//! a policy. Objects of other kinds (Deployments, Services, Gateways...) are skipped.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Where an object came from, for error messages: `file` and the 1-based document number.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    pub file: String,
    pub document: usize,
    /// The 0-based index in a `kind: List` document (`kubectl get -o yaml` output).
    pub item: Option<usize>,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.item {
            Some(i) => write!(f, "{} (document {}, items[{i}])", self.file, self.document),
            None => write!(f, "{} (document {})", self.file, self.document),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    /// Absent in a manifest means the namespace it is applied to (`default`).
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339; oldest wins between PeerAuthentications of one level.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

/// `selector` (Istio's `WorkloadSelector`). `selector: {}` is kept distinct from no selector.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Label-subset match (`matchLabels ⊆ labels`).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// `targetRef`/`targetRefs` entry (Istio's `PolicyTargetReference`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

impl TargetRef {
    /// The group with `""` spelled `core`, as Istio compares them.
    pub fn canonical_group(&self) -> &str {
        if self.group.is_empty() {
            "core"
        } else {
            &self.group
        }
    }
    pub fn is_service(&self) -> bool {
        self.kind == "Service" && self.canonical_group() == "core"
    }
    pub fn is_service_entry(&self) -> bool {
        self.kind == "ServiceEntry" && self.group == "networking.istio.io"
    }
    pub fn is_gateway(&self) -> bool {
        self.kind == "Gateway" && self.group == "gateway.networking.k8s.io"
    }
    pub fn is_gateway_class(&self) -> bool {
        self.kind == "GatewayClass" && self.group == "gateway.networking.k8s.io"
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Provider {
    #[serde(default)]
    pub name: String,
}

/// `rules[].from[].source`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
}

impl Source {
    /// Fields only an HTTP proxy can evaluate (`httpSources` in istiod's ambient conversion).
    pub fn http_fields(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (name, list) in [
            ("remoteIpBlocks", &self.remote_ip_blocks),
            ("notRemoteIpBlocks", &self.not_remote_ip_blocks),
            ("requestPrincipals", &self.request_principals),
            ("notRequestPrincipals", &self.not_request_principals),
        ] {
            if !list.is_empty() {
                v.push(name);
            }
        }
        v
    }

    pub fn has_trust_domains(&self) -> bool {
        !self.trust_domains.is_empty() || !self.not_trust_domains.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        *self == Source::default()
    }
}

/// `rules[].to[].operation`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

impl Operation {
    /// Fields only an HTTP proxy can evaluate (`httpOperations` in istiod's ambient conversion).
    pub fn http_fields(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (name, list) in [
            ("hosts", &self.hosts),
            ("notHosts", &self.not_hosts),
            ("methods", &self.methods),
            ("notMethods", &self.not_methods),
            ("paths", &self.paths),
            ("notPaths", &self.not_paths),
        ] {
            if !list.is_empty() {
                v.push(name);
            }
        }
        v
    }

    pub fn is_empty(&self) -> bool {
        *self == Operation::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    #[serde(default)]
    pub source: Option<Source>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// `rules[].when[]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// The five `when` keys istiod converts for ztunnel (`l4WhenAttributes`).
pub const L4_WHEN_KEYS: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

/// `when` keys that need HTTP at an Envoy (waypoint) TCP filter chain.
pub fn is_http_only_key(key: &str) -> bool {
    key == "remote.ip" || key.starts_with("request.")
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Option<Vec<From>>,
    #[serde(default)]
    pub to: Option<Vec<To>>,
    #[serde(default)]
    pub when: Option<Vec<Condition>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Hidden legacy singular form (1.20/1.21, Gateway only).
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub provider: Option<Provider>,
    /// `None` (absent) and `Some([])` both mean "no rules" (protobuf cannot tell them apart).
    #[serde(default)]
    pub rules: Option<Vec<Rule>>,
}

impl AuthorizationPolicySpec {
    /// `targetRef` and `targetRefs` together, as `model.GetTargetRefs` returns them.
    pub fn all_target_refs(&self) -> Vec<&TargetRef> {
        self.target_ref.iter().chain(&self.target_refs).collect()
    }
    pub fn rules(&self) -> &[Rule] {
        self.rules.as_deref().unwrap_or(&[])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthorizationPolicy {
    pub meta: ObjectMeta,
    pub spec: AuthorizationPolicySpec,
    pub origin: Origin,
}

impl AuthorizationPolicy {
    /// `namespace/name`, the key ztunnel and every decision use.
    pub fn key(&self) -> String {
        format!("{}/{}", self.meta.namespace(), self.meta.name)
    }
    pub fn namespace(&self) -> &str {
        self.meta.namespace()
    }
    /// `istio.io/dry-run: "true"`.
    pub fn dry_run(&self) -> bool {
        self.meta
            .annotations
            .get("istio.io/dry-run")
            .is_some_and(|v| parse_go_bool(v) == Some(true))
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeerAuthenticationSpec {
    #[serde(default)]
    selector: Option<WorkloadSelector>,
    #[serde(default)]
    mtls: Option<Mtls>,
    #[serde(default)]
    port_level_mtls: Option<serde_yaml::Mapping>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<Mtls>,
    /// Keys are workload (container) ports. `Some(empty)` is kept for validation.
    pub port_level_mtls: Option<BTreeMap<u32, Mtls>>,
    /// Keys that are not numbers (`portLevelMtls` is `map<uint32, MutualTLS>`).
    pub bad_port_keys: Vec<String>,
}

impl PeerAuthenticationSpec {
    pub fn mode(&self) -> MtlsMode {
        self.mtls.as_ref().map(|m| m.mode).unwrap_or_default()
    }
    /// A selector with at least one label (istiod's "workload policy" test).
    pub fn has_selector_labels(&self) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| !s.match_labels.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerAuthentication {
    pub meta: ObjectMeta,
    pub spec: PeerAuthenticationSpec,
    pub origin: Origin,
}

impl PeerAuthentication {
    pub fn key(&self) -> String {
        format!("{}/{}", self.meta.namespace(), self.meta.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimToHeader {
    #[serde(default)]
    pub header: String,
    #[serde(default)]
    pub claim: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: String,
    #[serde(default)]
    pub jwks: String,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: String,
    #[serde(default)]
    pub forward_original_token: bool,
    #[serde(default)]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    #[serde(default)]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<TargetRef>,
    #[serde(default)]
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

impl RequestAuthenticationSpec {
    pub fn all_target_refs(&self) -> Vec<&TargetRef> {
        self.target_ref.iter().chain(&self.target_refs).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestAuthentication {
    pub meta: ObjectMeta,
    pub spec: RequestAuthenticationSpec,
    pub origin: Origin,
}

impl RequestAuthentication {
    pub fn key(&self) -> String {
        format!("{}/{}", self.meta.namespace(), self.meta.name)
    }
}

/// Every security object found in the input, in input order.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub request_authentications: Vec<RequestAuthentication>,
}

impl PolicySet {
    pub fn extend(&mut self, other: PolicySet) {
        self.authorization_policies
            .extend(other.authorization_policies);
        self.peer_authentications.extend(other.peer_authentications);
        self.request_authentications
            .extend(other.request_authentications);
    }
}

/// Why input YAML could not be read as security objects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{origin}: not valid YAML: {message}")]
    Yaml { origin: Origin, message: String },
    #[error("{origin}: a Kubernetes object needs `apiVersion` and `kind` (found {found})")]
    NotAnObject { origin: Origin, found: String },
    #[error(
        "{origin}: {kind} {namespace}/{name}: apiVersion {api_version:?} is not served; use security.istio.io/v1 or security.istio.io/v1beta1"
    )]
    ApiVersion {
        origin: Origin,
        kind: String,
        namespace: String,
        name: String,
        api_version: String,
    },
    #[error("{origin}: {kind} {namespace}/{name}: {message}")]
    Field {
        origin: Origin,
        kind: String,
        namespace: String,
        name: String,
        message: String,
    },
    #[error("{origin}: {kind} has no metadata.name")]
    NoName { origin: Origin, kind: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<S> {
    #[serde(default)]
    #[allow(dead_code)]
    api_version: String,
    #[serde(default)]
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<S>,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde_yaml::Value>,
}

/// Splits a YAML stream at `---` document markers, returning (1-based first line, text).
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if marker || line == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
            if let Some(rest) = line.strip_prefix("---").filter(|r| !r.trim().is_empty()) {
                current.push_str(rest.trim_start());
                current.push('\n');
            }
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

const SECURITY_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// Parses every security object in a multi-document YAML text. `file` names it in errors.
pub fn parse_objects(file: &str, text: &str) -> Result<PolicySet, Box<ParseError>> {
    let mut set = PolicySet::default();
    let mut document = 0;
    for (first_line, doc) in split_documents(text) {
        let value: serde_yaml::Value = match serde_yaml::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                document += 1;
                return Err(Box::new(ParseError::Yaml {
                    origin: Origin {
                        file: file.to_string(),
                        document,
                        item: None,
                    },
                    message: shift_lines(&e.to_string(), first_line),
                }));
            }
        };
        if value.is_null() {
            continue;
        }
        document += 1;
        let origin = Origin {
            file: file.to_string(),
            document,
            item: None,
        };
        let is_list = value.get("kind").and_then(|v| v.as_str()) == Some("List");
        if let (true, Some(items)) = (is_list, value.get("items").and_then(|i| i.as_sequence())) {
            for (i, item) in items.iter().enumerate() {
                let text = serde_yaml::to_string(item).map_err(|e| {
                    Box::new(ParseError::Yaml {
                        origin: origin.clone(),
                        message: e.to_string(),
                    })
                })?;
                let origin = Origin {
                    item: Some(i),
                    ..origin.clone()
                };
                parse_document(&mut set, origin, 1, &text, item)?;
            }
            continue;
        }
        parse_document(&mut set, origin, first_line, &doc, &value)?;
    }
    Ok(set)
}

/// Parses one object (a document, or an item of a `List`) into `set`.
fn parse_document(
    set: &mut PolicySet,
    origin: Origin,
    first_line: usize,
    doc: &str,
    value: &serde_yaml::Value,
) -> Result<(), Box<ParseError>> {
    let (Some(api_version), Some(kind)) = (
        value.get("apiVersion").and_then(|v| v.as_str()),
        value.get("kind").and_then(|v| v.as_str()),
    ) else {
        let found = match &value {
            serde_yaml::Value::Mapping(_) => "a mapping without them".to_string(),
            other => format!("{other:?}"),
        };
        return Err(Box::new(ParseError::NotAnObject { origin, found }));
    };
    let meta_name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_string();
    let meta_ns = value
        .get("metadata")
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default")
        .to_string();
    let field_err = |message: String| {
        Box::new(ParseError::Field {
            origin: origin.clone(),
            kind: kind.to_string(),
            namespace: meta_ns.clone(),
            name: meta_name.clone(),
            message: shift_lines(&message, first_line),
        })
    };
    let known = matches!(
        kind,
        "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication"
    );
    if !known {
        return Ok(());
    }
    if !api_version.starts_with("security.istio.io/") {
        return Ok(());
    }
    if !SECURITY_VERSIONS.contains(&api_version) {
        return Err(Box::new(ParseError::ApiVersion {
            origin,
            kind: kind.to_string(),
            namespace: meta_ns,
            name: meta_name,
            api_version: api_version.to_string(),
        }));
    }
    if meta_name.is_empty() {
        return Err(Box::new(ParseError::NoName {
            origin,
            kind: kind.to_string(),
        }));
    }
    match kind {
        "AuthorizationPolicy" => {
            let env: Envelope<AuthorizationPolicySpec> =
                serde_yaml::from_str(doc).map_err(|e| field_err(e.to_string()))?;
            set.authorization_policies.push(AuthorizationPolicy {
                meta: env.metadata,
                spec: env.spec.unwrap_or_default(),
                origin: origin.clone(),
            });
        }
        "PeerAuthentication" => {
            let env: Envelope<RawPeerAuthenticationSpec> =
                serde_yaml::from_str(doc).map_err(|e| field_err(e.to_string()))?;
            let raw = env.spec.unwrap_or_default();
            let mut bad_port_keys = Vec::new();
            let mut port_level_mtls = None;
            if let Some(m) = raw.port_level_mtls {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    let key = match &k {
                        serde_yaml::Value::String(s) => s.clone(),
                        serde_yaml::Value::Number(n) => n.to_string(),
                        other => format!("{other:?}"),
                    };
                    let mtls: Mtls = serde_yaml::from_value(v)
                        .map_err(|e| field_err(format!("spec.portLevelMtls.{key}: {e}")))?;
                    match key.parse::<u32>() {
                        Ok(p) => {
                            out.insert(p, mtls);
                        }
                        Err(_) => bad_port_keys.push(key),
                    }
                }
                port_level_mtls = Some(out);
            }
            set.peer_authentications.push(PeerAuthentication {
                meta: env.metadata,
                spec: PeerAuthenticationSpec {
                    selector: raw.selector,
                    mtls: raw.mtls,
                    port_level_mtls,
                    bad_port_keys,
                },
                origin: origin.clone(),
            });
        }
        _ => {
            let env: Envelope<RequestAuthenticationSpec> =
                serde_yaml::from_str(doc).map_err(|e| field_err(e.to_string()))?;
            set.request_authentications.push(RequestAuthentication {
                meta: env.metadata,
                spec: env.spec.unwrap_or_default(),
                origin: origin.clone(),
            });
        }
    }
    Ok(())
}

/// Rewrites serde_yaml's "at line N" (relative to one document) to the file's line numbers.
fn shift_lines(message: &str, first_line: usize) -> String {
    let Some(pos) = message.find("at line ") else {
        return message.to_string();
    };
    let (head, tail) = message.split_at(pos + "at line ".len());
    let digits: String = tail.chars().take_while(|c| c.is_ascii_digit()).collect();
    match digits.parse::<usize>() {
        Ok(n) => format!("{head}{}{}", n + first_line - 1, &tail[digits.len()..]),
        Err(_) => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: foo}
spec:
  action: DENY
  rules: [{}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: pa, namespace: foo}
spec:
  selector: {matchLabels: {app: x}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    \"9090\": {mode: DISABLE}
";

    #[test]
    fn parses_multi_document_and_skips_other_kinds() {
        let set = parse_objects("p.yaml", TWO).unwrap();
        assert_eq!(set.authorization_policies.len(), 1);
        let ap = &set.authorization_policies[0];
        assert_eq!(ap.key(), "foo/a");
        assert_eq!(ap.spec.action, Action::Deny);
        assert_eq!(ap.spec.rules(), &[Rule::default()]);
        let pa = &set.peer_authentications[0];
        assert_eq!(pa.spec.mode(), MtlsMode::Strict);
        let ports = pa.spec.port_level_mtls.as_ref().unwrap();
        assert_eq!(ports.get(&8080).unwrap().mode, MtlsMode::Permissive);
        assert_eq!(ports.get(&9090).unwrap().mode, MtlsMode::Disable);
        assert_eq!(pa.origin.document, 3);
    }

    #[test]
    fn unknown_field_is_named_with_its_path_and_file_line() {
        let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: foo}
spec:
  rules:
  - from:
    - source:
        principal: [x]
";
        let e = parse_objects("p.yaml", text).unwrap_err().to_string();
        assert!(e.contains("p.yaml (document 1)"), "{e}");
        assert!(e.contains("AuthorizationPolicy foo/a"), "{e}");
        assert!(e.contains("unknown field `principal`"), "{e}");
        assert!(e.contains("spec.rules[0].from[0].source"), "{e}");
        assert!(e.contains("line 8"), "{e}");
    }

    #[test]
    fn unknown_action_and_version_are_errors() {
        let bad_action = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec: {action: REJECT}
";
        let e = parse_objects("p.yaml", bad_action).unwrap_err().to_string();
        assert!(e.contains("REJECT"), "{e}");
        let bad_version = "apiVersion: security.istio.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: a}
";
        assert!(matches!(
            parse_objects("p.yaml", bad_version).map_err(|e| *e),
            Err(ParseError::ApiVersion { .. })
        ));
    }

    #[test]
    fn namespace_defaults_and_selector_empty_is_kept() {
        let text = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec: {selector: {}}
";
        let set = parse_objects("p.yaml", text).unwrap();
        let ap = &set.authorization_policies[0];
        assert_eq!(ap.key(), "default/a");
        assert_eq!(ap.spec.selector, Some(WorkloadSelector::default()));
    }

    #[test]
    fn kubectl_list_output_is_read_item_by_item() {
        let text = "apiVersion: v1
kind: List
items:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: a, namespace: foo, uid: x, resourceVersion: \"1\"}
  spec: {action: DENY, rules: [{}]}
  status: {conditions: []}
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: b, namespace: foo}
  spec: {rules: [{form: []}]}
";
        let e = parse_objects("l.yaml", text).unwrap_err().to_string();
        assert!(
            e.starts_with("l.yaml (document 1, items[1]): AuthorizationPolicy foo/b"),
            "{e}"
        );
        assert!(e.contains("unknown field `form`"), "{e}");
        let ok = text.replace("form", "from");
        let set = parse_objects("l.yaml", &ok).unwrap();
        assert_eq!(set.authorization_policies.len(), 2);
        assert_eq!(set.authorization_policies[0].origin.item, Some(0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in ["a: [", "- 1\n- 2", "kind: X", ": :"] {
            let _ = parse_objects("p.yaml", text);
        }
        assert!(parse_objects("p.yaml", "- 1\n- 2").is_err());
    }
}
