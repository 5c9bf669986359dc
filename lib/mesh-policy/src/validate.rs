//! Admission validation as Istio's webhook does it (`pkg/config/validation/validation.go`
//! `ValidateAuthorizationPolicy`, `ValidatePeerAuthentication`, `ValidateRequestAuthentication`,
//! helpers in `pkg/config/security/security.go`), with the webhook's messages.
//!
//! Errors reject the object; warnings are what `kubectl apply` prints and the object is kept.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{
    Action, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TargetRef,
    WorkloadSelector, parse_go_bool,
};

/// The result of validating one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// An object the webhook would reject, with the webhook's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {kind} {key} is rejected by validation: {message}")]
pub struct Rejected {
    pub origin: String,
    pub kind: &'static str,
    pub key: String,
    pub message: String,
}

const MAX_TARGET_REFS: usize = 16;
const MAX_RULES: usize = 512;
const MAX_SERVICE_ACCOUNTS: usize = 16;
const MAX_SERVICE_ACCOUNT_LEN: usize = 320;

fn check_empty_values(errs: &mut Vec<String>, key: &str, values: &[String]) {
    if values.iter().any(|v| v.is_empty()) {
        errs.push(format!("empty value not allowed, found in {key}"));
    }
}

/// `security.ValidateIPs`: an address or a CIDR.
pub fn validate_ips(errs: &mut Vec<String>, values: &[String]) {
    for v in values {
        if v.contains('/') {
            if let Err(e) = v.parse::<IpNet>() {
                errs.push(format!("bad CIDR range ({v}): {e}"));
            }
        } else if v.parse::<IpAddr>().is_err() {
            errs.push(format!("bad IP address ({v})"));
        }
    }
}

/// `security.ValidatePorts`: integers 0..65535 (named ports are not allowed).
pub fn validate_ports(errs: &mut Vec<String>, values: &[String]) {
    for p in values {
        match p.parse::<u64>() {
            Ok(n) if n <= 65535 => {}
            Ok(_) => errs.push(format!("bad port ({p}): port out of range")),
            Err(_) => errs.push(format!(
                "bad port ({p}): strconv.ParseUint: parsing {p:?}: invalid syntax"
            )),
        }
    }
}

fn check_service_accounts(errs: &mut Vec<String>, key: &str, values: &[String]) {
    check_empty_values(errs, key, values);
    if values.len() > MAX_SERVICE_ACCOUNTS {
        errs.push(format!(
            "{key}: at most {MAX_SERVICE_ACCOUNTS} service accounts are allowed, found {}",
            values.len()
        ));
    }
    for v in values {
        if v.contains('*') {
            errs.push(format!("wildcard is not supported in {key}, found {v:?}"));
        }
        if v.len() > MAX_SERVICE_ACCOUNT_LEN {
            errs.push(format!(
                "{key} value {v:?} is longer than {MAX_SERVICE_ACCOUNT_LEN} characters"
            ));
        }
        if v.split('/').count() > 2 || v.starts_with('/') || v.ends_with('/') {
            errs.push(format!(
                "{key} value {v:?} must be of the form <service-account> or <namespace>/<service-account>"
            ));
        }
    }
}

fn check_trust_domains(errs: &mut Vec<String>, key: &str, values: &[String]) {
    check_empty_values(errs, key, values);
    for v in values {
        let stars = v.matches('*').count();
        let chars: Vec<char> = v.chars().collect();
        let inner = chars.len() > 2 && chars[1..chars.len() - 1].contains(&'*');
        if stars > 1 || inner {
            errs.push(format!(
                "{key} value {v:?}: a wildcard `*` is allowed once, only at the start or the end"
            ));
        }
        if v.contains('/') {
            errs.push(format!("{key} value {v:?} must not contain `/`"));
        }
    }
}

/// `security.IsPathTemplate`.
pub fn is_path_template(p: &str) -> bool {
    p.contains("{*}") || p.contains("{**}")
}

/// `security.CheckValidPathTemplate`: named variables, `{}`, and bare `*`/`**` segments are
/// unsupported in a template; `{**}` must be the last operator.
fn check_valid_path_template(errs: &mut Vec<String>, key: &str, paths: &[String]) {
    for p in paths {
        if !is_path_template(p) {
            continue;
        }
        if unsupported_template_syntax(p) || any_glob_not_last(p) {
            errs.push(format!(
                "invalid or unsupported path template, found in {key}"
            ));
            return;
        }
    }
}

fn unsupported_template_syntax(p: &str) -> bool {
    if p.contains("/*") || p.contains("*/") {
        return true;
    }
    let b = p.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c != b'{' {
            continue;
        }
        // `{\w*}` (named variable or empty braces) or `{\w+=*}` / `{\w+=**}`.
        let rest = &p[i + 1..];
        let word: usize = rest
            .bytes()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == b'_')
            .count();
        let after = &rest[word..];
        if after.starts_with('}') {
            return true;
        }
        if word > 0 && (after.starts_with("=*}") || after.starts_with("=**}")) {
            return true;
        }
    }
    false
}

fn any_glob_not_last(p: &str) -> bool {
    match p.find("{**}") {
        Some(i) => {
            let rest = &p[i + 4..];
            rest.contains("{*}") || rest.contains("{**}")
        }
        None => false,
    }
}

/// `security.ValidateAttribute`: the known `when` keys and their value formats.
fn validate_attribute(key: &str, values: &[String]) -> Result<(), String> {
    if values.iter().any(|v| v.is_empty()) {
        return Err(format!("empty value not allowed, found in {key}"));
    }
    let map_key = |key: &str| {
        let open = key.find('[');
        match open {
            Some(o) if key.ends_with(']') && o > 0 && o + 2 < key.len() => Ok(()),
            _ => Err(format!("bad key ({key}): should have format a[b]")),
        }
    };
    let ips = |values: &[String]| {
        let mut e = Vec::new();
        validate_ips(&mut e, values);
        if e.is_empty() {
            Ok(())
        } else {
            Err(e.join("; "))
        }
    };
    match key {
        k if k.starts_with("request.headers") => map_key(k),
        "source.ip" | "remote.ip" | "destination.ip" => ips(values),
        "source.namespace"
        | "source.principal"
        | "source.serviceAccount"
        | "source.trustDomain"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(()),
        k if k.starts_with("request.auth.claims") => map_key(k),
        "destination.port" => {
            let mut e = Vec::new();
            validate_ports(&mut e, values);
            if e.is_empty() {
                Ok(())
            } else {
                Err(e.join("; "))
            }
        }
        k if k.starts_with("experimental.envoy.filters.") => map_key(k),
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        k if k.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ => Err(format!("unknown attribute: {key}")),
    }
}

fn validate_one_of_selector_type(
    errs: &mut Vec<String>,
    selector: Option<&WorkloadSelector>,
    target_ref: Option<&TargetRef>,
    target_refs: &[TargetRef],
) {
    let set = usize::from(selector.is_some())
        + usize::from(target_ref.is_some())
        + usize::from(!target_refs.is_empty());
    if set > 1 {
        errs.push("only one of targetRefs or workloadSelector can be set".into());
    }
}

fn validate_workload_selector(v: &mut Validation, selector: Option<&WorkloadSelector>) {
    let Some(selector) = selector else { return };
    for (k, val) in &selector.match_labels {
        if k.is_empty() {
            v.errors.push(format!(
                "empty key is not supported in selector: \"{k}={val}\""
            ));
        }
        if k.contains('*') || val.contains('*') {
            v.errors.push(format!(
                "wildcard is not supported in selector: \"{k}={val}\""
            ));
        }
    }
    if selector.match_labels.is_empty() {
        v.warnings
            .push("workload selector specified without labels".into());
    }
}

fn validate_target_ref(errs: &mut Vec<String>, r: &TargetRef) {
    if r.name.is_empty() {
        errs.push("targetRef name must be set".into());
    }
    if !r.namespace.is_empty() {
        errs.push(
            "targetRef namespace must not be set; cross namespace referencing is not supported"
                .into(),
        );
    }
    if !(r.is_service() || r.is_service_entry() || r.is_gateway() || r.is_gateway_class()) {
        errs.push(format!(
            "targetRef must be to one of [core/v1/Service networking.istio.io/v1/ServiceEntry gateway.networking.k8s.io/v1/Gateway gateway.networking.k8s.io/v1/GatewayClass] but was {}/{}",
            r.group, r.kind
        ));
    }
}

fn validate_targets(
    errs: &mut Vec<String>,
    target_ref: Option<&TargetRef>,
    target_refs: &[TargetRef],
) {
    if target_refs.len() > MAX_TARGET_REFS {
        errs.push(format!(
            "spec.targetRefs: Too many: {}: must have at most {MAX_TARGET_REFS} items",
            target_refs.len()
        ));
    }
    for r in target_ref.into_iter().chain(target_refs) {
        validate_target_ref(errs, r);
    }
}

fn validate_dry_run(errs: &mut Vec<String>, p: &AuthorizationPolicy) {
    let Some(val) = p.meta.annotations.get("istio.io/dry-run") else {
        return;
    };
    let (ns, name) = (p.namespace(), &p.meta.name);
    match p.spec.action {
        Action::Allow | Action::Deny => {
            if parse_go_bool(val).is_none() {
                errs.push(format!(
                    "{ns}/{name} has annotation istio.io/dry-run with invalid value ({val}): strconv.ParseBool: parsing {val:?}: invalid syntax"
                ));
            }
        }
        other => errs.push(format!(
            "the annotation istio.io/dry-run currently only supports action ALLOW/DENY, found action {other} in {ns}/{name}"
        )),
    }
}

/// `ValidateAuthorizationPolicy`.
pub fn validate_authorization_policy(p: &AuthorizationPolicy) -> Validation {
    let mut v = Validation::default();
    let spec = &p.spec;
    let mut errs = Vec::new();
    validate_dry_run(&mut errs, p);
    validate_one_of_selector_type(
        &mut errs,
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
    );
    validate_workload_selector(&mut v, spec.selector.as_ref());
    errs.append(&mut v.errors);
    validate_targets(&mut errs, spec.target_ref.as_ref(), &spec.target_refs);
    let no_rules = spec.rules().is_empty();
    if spec.rules().len() > MAX_RULES {
        errs.push(format!(
            "spec.rules: Too many: {}: must have at most {MAX_RULES} items",
            spec.rules().len()
        ));
    }

    if spec.action == Action::Custom {
        if no_rules {
            errs.push("CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request".into());
        } else if spec.provider.as_ref().is_none_or(|pr| pr.name.is_empty()) {
            errs.push("`provider.name` must not be empty".into());
        }
        for rule in spec.rules() {
            for from in rule.from.iter().flatten() {
                if let Some(src) = &from.source {
                    for (set, name) in [
                        (&src.namespaces, "From.Namespaces"),
                        (&src.not_namespaces, "From.NotNamespaces"),
                        (&src.service_accounts, "From.ServiceAccounts"),
                        (&src.not_service_accounts, "From.NotServiceAccounts"),
                        (&src.principals, "From.Principals"),
                        (&src.not_principals, "From.NotPrincipals"),
                        (&src.request_principals, "From.RequestPrincipals"),
                        (&src.not_request_principals, "From.NotRequestPrincipals"),
                        (&src.trust_domains, "From.TrustDomains"),
                        (&src.not_trust_domains, "From.NotTrustDomains"),
                    ] {
                        if !set.is_empty() {
                            errs.push(format!(
                                "{name} is currently not supported with CUSTOM action"
                            ));
                        }
                    }
                }
            }
            for when in rule.when.iter().flatten() {
                let k = when.key.as_str();
                if matches!(
                    k,
                    "source.namespace"
                        | "source.serviceAccount"
                        | "source.principal"
                        | "source.trustDomain"
                ) || k.starts_with("request.auth.")
                {
                    errs.push(format!("{k} is currently not supported with CUSTOM action"));
                }
            }
        }
    }
    if spec.provider.is_some() && spec.action != Action::Custom {
        errs.push(format!(
            "`provider` must not be with non CUSTOM action, found {}",
            spec.action
        ));
    }
    if spec.action == Action::Deny && no_rules {
        errs.push("DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request".into());
    }

    for (i, rule) in spec.rules().iter().enumerate() {
        if rule.from.as_ref().is_some_and(|f| f.is_empty()) {
            errs.push(format!("`from` must not be empty, found at rule {i}"));
        }
        let (mut tcp_in_from, mut tcp_in_to, mut from_exist, mut to_exist) =
            (false, false, false, false);
        for from in rule.from.iter().flatten() {
            let Some(src) = &from.source else {
                errs.push(format!("`from.source` must not be nil, found at rule {i}"));
                continue;
            };
            from_exist = true;
            let identity = src.principals.len()
                + src.not_principals.len()
                + src.namespaces.len()
                + src.not_namespaces.len();
            if identity > 0 && (src.service_accounts.len() + src.not_service_accounts.len()) > 0 {
                errs.push(format!(
                    "cannot set serviceAccounts with namespaces or principals, found at rule {i}"
                ));
            }
            if src.is_empty() {
                errs.push(format!(
                    "`from.source` must not be empty, found at rule {i}"
                ));
            }
            validate_ips(&mut errs, &src.ip_blocks);
            validate_ips(&mut errs, &src.not_ip_blocks);
            validate_ips(&mut errs, &src.remote_ip_blocks);
            validate_ips(&mut errs, &src.not_remote_ip_blocks);
            check_empty_values(&mut errs, "Principals", &src.principals);
            check_empty_values(&mut errs, "RequestPrincipals", &src.request_principals);
            check_empty_values(&mut errs, "Namespaces", &src.namespaces);
            check_service_accounts(&mut errs, "ServiceAccounts", &src.service_accounts);
            check_empty_values(&mut errs, "IpBlocks", &src.ip_blocks);
            check_empty_values(&mut errs, "RemoteIpBlocks", &src.remote_ip_blocks);
            check_empty_values(&mut errs, "NotPrincipals", &src.not_principals);
            check_empty_values(
                &mut errs,
                "NotRequestPrincipals",
                &src.not_request_principals,
            );
            check_empty_values(&mut errs, "NotNamespaces", &src.not_namespaces);
            check_service_accounts(&mut errs, "NotServiceAccounts", &src.not_service_accounts);
            check_empty_values(&mut errs, "NotIpBlocks", &src.not_ip_blocks);
            check_empty_values(&mut errs, "NotRemoteIpBlocks", &src.not_remote_ip_blocks);
            check_trust_domains(&mut errs, "TrustDomains", &src.trust_domains);
            check_trust_domains(&mut errs, "NotTrustDomains", &src.not_trust_domains);
            let tcp = [
                &src.principals,
                &src.not_principals,
                &src.ip_blocks,
                &src.not_ip_blocks,
                &src.namespaces,
                &src.not_namespaces,
                &src.remote_ip_blocks,
                &src.not_remote_ip_blocks,
                &src.service_accounts,
                &src.not_service_accounts,
                &src.trust_domains,
                &src.not_trust_domains,
            ];
            if tcp.iter().any(|l| !l.is_empty()) {
                tcp_in_from = true;
            }
        }
        if rule.to.as_ref().is_some_and(|t| t.is_empty()) {
            errs.push(format!("`to` must not be empty, found at rule {i}"));
        }
        for to in rule.to.iter().flatten() {
            let Some(op) = &to.operation else {
                errs.push(format!("`to.operation` must not be nil, found at rule {i}"));
                continue;
            };
            to_exist = true;
            if op.is_empty() {
                errs.push(format!(
                    "`to.operation` must not be empty, found at rule {i}"
                ));
            }
            validate_ports(&mut errs, &op.ports);
            validate_ports(&mut errs, &op.not_ports);
            for (key, list) in [
                ("Ports", &op.ports),
                ("Methods", &op.methods),
                ("Paths", &op.paths),
                ("Hosts", &op.hosts),
                ("NotPorts", &op.not_ports),
                ("NotMethods", &op.not_methods),
                ("NotPaths", &op.not_paths),
                ("NotHosts", &op.not_hosts),
            ] {
                check_empty_values(&mut errs, key, list);
            }
            check_valid_path_template(&mut errs, "Paths", &op.paths);
            check_valid_path_template(&mut errs, "NotPaths", &op.not_paths);
            if !op.ports.is_empty() || !op.not_ports.is_empty() {
                tcp_in_to = true;
            }
        }
        for cond in rule.when.iter().flatten() {
            let key = &cond.key;
            if key.is_empty() {
                errs.push("`key` must not be empty".into());
            } else if cond.values.is_empty() && cond.not_values.is_empty() {
                errs.push(format!(
                    "at least one of `values` or `notValues` must be set for key {key}"
                ));
            } else {
                if let Err(e) = validate_attribute(key, &cond.values) {
                    errs.push(format!("invalid `value` for `key` {key}: {e}"));
                }
                if let Err(e) = validate_attribute(key, &cond.not_values) {
                    errs.push(format!("invalid `notValue` for `key` {key}: {e}"));
                }
            }
        }
        if ((from_exist && !to_exist && !tcp_in_from) || (to_exist && !tcp_in_to))
            && spec.action == Action::Deny
        {
            v.warnings.push("configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port".into());
        }
    }
    let prefix = format!("invalid policy {}.{}:", p.meta.name, p.namespace());
    v.errors = errs.into_iter().map(|e| format!("{prefix} {e}")).collect();
    v
}

/// `ValidatePeerAuthentication`.
pub fn validate_peer_authentication(p: &PeerAuthentication) -> Validation {
    let mut v = Validation::default();
    let spec = &p.spec;
    if !spec.has_selector_labels() && spec.port_level_mtls.as_ref().is_some_and(|m| !m.is_empty()) {
        v.errors
            .push("mesh/namespace peer authentication cannot have port level mTLS".into());
    }
    if spec
        .port_level_mtls
        .as_ref()
        .is_some_and(|m| m.is_empty() && spec.bad_port_keys.is_empty())
    {
        v.errors
            .push("port level mTLS, if defined, must have at least one element".into());
    }
    let bad_range = spec
        .port_level_mtls
        .iter()
        .flat_map(|m| m.keys())
        .any(|p| *p == 0 || *p > 65535);
    if bad_range || !spec.bad_port_keys.is_empty() {
        v.errors.push("port must be in range 1..65535".into());
    }
    validate_workload_selector(&mut v, spec.selector.as_ref());
    v
}

/// `ValidateRequestAuthentication` (selector/targetRefs and the JWT rule checks that need no
/// network access; `jwks` is not parsed).
pub fn validate_request_authentication(p: &RequestAuthentication) -> Validation {
    let mut v = Validation::default();
    let spec = &p.spec;
    let mut errs = Vec::new();
    validate_one_of_selector_type(
        &mut errs,
        spec.selector.as_ref(),
        spec.target_ref.as_ref(),
        &spec.target_refs,
    );
    validate_workload_selector(&mut v, spec.selector.as_ref());
    errs.append(&mut v.errors);
    validate_targets(&mut errs, spec.target_ref.as_ref(), &spec.target_refs);
    for rule in &spec.jwt_rules {
        if rule.audiences.iter().any(|a| a.is_empty()) {
            errs.push("audience must be non-empty string".into());
        }
        if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
            errs.push("issuer or jwksUri must be non-empty string".into());
        }
        if !rule.jwks_uri.is_empty() {
            let scheme = rule.jwks_uri.split("://").next().unwrap_or_default();
            if !rule.jwks_uri.contains("://") || !(scheme == "http" || scheme == "https") {
                errs.push(format!("URI scheme {scheme:?} is not supported"));
            }
        }
        if rule.from_headers.iter().any(|h| h.name.is_empty()) {
            errs.push("location header name must be non-empty string".into());
        }
        if rule.from_params.iter().any(|h| h.is_empty()) {
            errs.push("location query must be non-empty string".into());
        }
        if rule.from_cookies.iter().any(|h| h.is_empty()) {
            errs.push("cookie name must be non-empty string".into());
        }
        if rule
            .output_claim_to_headers
            .iter()
            .any(|c| c.claim.is_empty() || c.header.is_empty())
        {
            errs.push(
                "outputClaimToHeaders header and claim value must be non-empty string".into(),
            );
        }
    }
    v.errors = errs;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_objects;
    use test_case::test_case;

    fn ap(spec: &str) -> AuthorizationPolicy {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n{spec}"
        );
        let mut set = parse_objects("t.yaml", &text).unwrap();
        set.authorization_policies.remove(0)
    }

    // Every case: istio/istio pkg/config/validation/validation_test.go
    // (TestValidateAuthorizationPolicy) and authz-semantics.md §2.2.
    #[test_case("  action: DENY\n", "DENY action without `rules` is meaningless" ; "deny without rules")]
    #[test_case("  action: CUSTOM\n", "CUSTOM action without `rules` is meaningless" ; "custom without rules")]
    #[test_case("  action: CUSTOM\n  rules: [{}]\n", "`provider.name` must not be empty" ; "custom without provider")]
    #[test_case("  action: DENY\n  provider: {name: x}\n  rules: [{}]\n", "`provider` must not be with non CUSTOM action, found DENY" ; "provider without custom")]
    #[test_case("  action: CUSTOM\n  provider: {name: x}\n  rules: [{from: [{source: {principals: [a]}}]}]\n", "From.Principals is currently not supported with CUSTOM action" ; "custom with principals")]
    #[test_case("  action: CUSTOM\n  provider: {name: x}\n  rules: [{when: [{key: \"request.auth.claims[a]\", values: [b]}]}]\n", "request.auth.claims[a] is currently not supported with CUSTOM action" ; "custom with request auth")]
    #[test_case("  selector: {matchLabels: {a: b}}\n  targetRefs: [{kind: Service, name: s}]\n", "only one of targetRefs or workloadSelector can be set" ; "selector and targetRefs")]
    #[test_case("  targetRefs: [{kind: Service, name: s, namespace: bar}]\n", "cross namespace referencing is not supported" ; "targetRef namespace")]
    #[test_case("  targetRefs: [{kind: Service}]\n", "targetRef name must be set" ; "targetRef name")]
    #[test_case("  targetRefs: [{kind: Deployment, group: apps, name: d}]\n", "targetRef must be to one of" ; "targetRef kind")]
    #[test_case("  selector: {matchLabels: {app: \"a*\"}}\n", "wildcard is not supported in selector" ; "selector wildcard")]
    #[test_case("  rules: [{from: []}]\n", "`from` must not be empty, found at rule 0" ; "from empty")]
    #[test_case("  rules: [{to: []}]\n", "`to` must not be empty, found at rule 0" ; "to empty")]
    #[test_case("  rules: [{from: [{}]}]\n", "`from.source` must not be nil, found at rule 0" ; "from source nil")]
    #[test_case("  rules: [{from: [{source: {}}]}]\n", "`from.source` must not be empty, found at rule 0" ; "from source empty")]
    #[test_case("  rules: [{to: [{operation: {}}]}]\n", "`to.operation` must not be empty, found at rule 0" ; "to operation empty")]
    #[test_case("  rules: [{to: [{}]}]\n", "`to.operation` must not be nil, found at rule 0" ; "to operation nil")]
    #[test_case("  rules: [{from: [{source: {principals: [\"\"]}}]}]\n", "empty value not allowed, found in Principals" ; "empty principal")]
    #[test_case("  rules: [{to: [{operation: {ports: [http]}}]}]\n", "bad port (http)" ; "named port")]
    #[test_case("  rules: [{to: [{operation: {ports: [\"70000\"]}}]}]\n", "bad port (70000)" ; "port range")]
    #[test_case("  rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]\n", "bad CIDR range (10.0.0.0/33)" ; "bad cidr")]
    #[test_case("  rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]\n", "bad IP address (10.0.0.300)" ; "bad ip")]
    #[test_case("  rules: [{from: [{source: {serviceAccounts: [a], namespaces: [b]}}]}]\n", "cannot set serviceAccounts with namespaces or principals, found at rule 0" ; "sa with namespaces")]
    #[test_case("  rules: [{from: [{source: {serviceAccounts: [\"a/*\"]}}]}]\n", "wildcard is not supported in ServiceAccounts" ; "sa wildcard")]
    #[test_case("  rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]\n", "must be of the form" ; "sa format")]
    #[test_case("  rules: [{from: [{source: {trustDomains: [\"a*b\"]}}]}]\n", "allowed once, only at the start or the end" ; "td wildcard middle")]
    #[test_case("  rules: [{when: [{key: source.ip}]}]\n", "at least one of `values` or `notValues` must be set for key source.ip" ; "when no values")]
    #[test_case("  rules: [{when: [{key: \"\", values: [a]}]}]\n", "`key` must not be empty" ; "when empty key")]
    #[test_case("  rules: [{when: [{key: foo.bar, values: [a]}]}]\n", "invalid `value` for `key` foo.bar: unknown attribute: foo.bar" ; "when unknown key")]
    #[test_case("  rules: [{when: [{key: destination.namespace, values: [a]}]}]\n", "attribute destination.namespace is replaced by the metadata.namespace" ; "destination namespace")]
    #[test_case("  rules: [{when: [{key: \"destination.labels[a]\", values: [a]}]}]\n", "is replaced by the workload selector" ; "destination labels")]
    #[test_case("  rules: [{when: [{key: destination.user, values: [a]}]}]\n", "deprecated attribute destination.user" ; "destination user")]
    #[test_case("  rules: [{when: [{key: request.headers, values: [a]}]}]\n", "should have format a[b]" ; "header key format")]
    #[test_case("  rules: [{when: [{key: destination.port, notValues: [x]}]}]\n", "invalid `notValue` for `key` destination.port" ; "when port")]
    #[test_case("  rules: [{to: [{operation: {paths: [\"/{*}/{name}\"]}}]}]\n", "invalid or unsupported path template, found in Paths" ; "named template var")]
    #[test_case("  rules: [{to: [{operation: {paths: [\"/{**}/{*}\"]}}]}]\n", "invalid or unsupported path template, found in Paths" ; "glob not last")]
    #[test_case("  rules: [{to: [{operation: {paths: [\"/{*}/*\"]}}]}]\n", "invalid or unsupported path template, found in Paths" ; "template with star")]
    fn rejected(spec: &str, want: &str) {
        let v = validate_authorization_policy(&ap(spec));
        assert!(
            v.errors.iter().any(|e| e.contains(want)),
            "want {want:?} in {:?}",
            v.errors
        );
        assert!(
            v.errors
                .iter()
                .all(|e| e.starts_with("invalid policy p.foo: ")),
            "{:?}",
            v.errors
        );
    }

    #[test_case("  {}\n" ; "allow nothing")]
    #[test_case("  rules: [{}]\n" ; "allow all")]
    #[test_case("  action: DENY\n  rules: [{}]\n" ; "deny all")]
    #[test_case("  action: AUDIT\n  rules: [{}]\n" ; "audit")]
    #[test_case("  action: CUSTOM\n  provider: {name: ext}\n  rules: [{to: [{operation: {paths: [/admin]}}]}]\n" ; "custom ok")]
    #[test_case("  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  rules: [{}]\n" ; "gateway target")]
    #[test_case("  targetRefs: [{kind: Service, group: \"\", name: s}]\n" ; "service target")]
    #[test_case("  rules: [{to: [{operation: {paths: [\"/{*}/x/{**}\"]}}]}]\n" ; "valid template")]
    #[test_case("  rules: [{from: [{source: {principals: [\"cluster.local/ns/*/sa/x\"]}}]}]\n" ; "middle wildcard is not rejected")]
    #[test_case("  rules: [{when: [{key: source.serviceAccount, values: [a/b]}, {key: connection.sni, values: [x]}, {key: \"request.auth.claims[groups]\", values: [x]}]}]\n" ; "valid keys")]
    fn accepted(spec: &str) {
        let v = validate_authorization_policy(&ap(spec));
        assert!(v.errors.is_empty(), "{:?}", v.errors);
    }

    #[test]
    fn warnings_match_the_webhook() {
        // validation.go: HTTP-only DENY rule warning; empty selector warning.
        let v = validate_authorization_policy(&ap(
            "  action: DENY\n  rules: [{to: [{operation: {methods: [POST]}}]}]\n",
        ));
        assert!(v.errors.is_empty());
        assert!(v.warnings[0].contains("will deny all traffic to TCP ports"));
        let v = validate_authorization_policy(&ap(
            "  action: DENY\n  rules: [{to: [{operation: {methods: [POST], ports: [\"80\"]}}]}]\n",
        ));
        assert!(v.warnings.is_empty());
        let v = validate_authorization_policy(&ap("  selector: {}\n"));
        assert_eq!(
            v.warnings,
            vec!["workload selector specified without labels"]
        );
    }

    #[test]
    fn dry_run_annotation() {
        let mut p = ap("  action: AUDIT\n  rules: [{}]\n");
        p.meta
            .annotations
            .insert("istio.io/dry-run".into(), "true".into());
        let v = validate_authorization_policy(&p);
        assert!(v.errors[0].contains("only supports action ALLOW/DENY, found action AUDIT"));
        let mut p = ap("  rules: [{}]\n");
        p.meta
            .annotations
            .insert("istio.io/dry-run".into(), "yes".into());
        assert!(validate_authorization_policy(&p).errors[0].contains("invalid value (yes)"));
    }

    #[test]
    fn peer_authentication_rules() {
        let parse = |spec: &str| {
            let text = format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: foo}}\nspec:\n{spec}"
            );
            parse_objects("t.yaml", &text)
                .unwrap()
                .peer_authentications
                .remove(0)
        };
        let v = validate_peer_authentication(&parse(
            "  mtls: {mode: STRICT}\n  portLevelMtls: {8080: {mode: DISABLE}}\n",
        ));
        assert_eq!(
            v.errors,
            vec!["mesh/namespace peer authentication cannot have port level mTLS"]
        );
        let v = validate_peer_authentication(&parse(
            "  selector: {matchLabels: {a: b}}\n  portLevelMtls: {0: {mode: DISABLE}}\n",
        ));
        assert_eq!(v.errors, vec!["port must be in range 1..65535"]);
        let v = validate_peer_authentication(&parse(
            "  selector: {matchLabels: {a: b}}\n  portLevelMtls: {}\n",
        ));
        assert_eq!(
            v.errors,
            vec!["port level mTLS, if defined, must have at least one element"]
        );
        assert!(
            validate_peer_authentication(&parse("  mtls: {mode: STRICT}\n"))
                .errors
                .is_empty()
        );
    }

    #[test]
    fn request_authentication_rules() {
        let text = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: r, namespace: foo}\nspec:\n  jwtRules: [{jwksUri: \"ftp://x\"}, {issuer: a, audiences: [\"\"]}]\n";
        let ra = parse_objects("t.yaml", text)
            .unwrap()
            .request_authentications
            .remove(0);
        let v = validate_request_authentication(&ra);
        assert!(v.errors.iter().any(|e| e.contains("URI scheme \"ftp\"")));
        assert!(
            v.errors
                .iter()
                .any(|e| e == "audience must be non-empty string")
        );
    }
}
