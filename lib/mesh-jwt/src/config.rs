//! From RequestAuthentications to providers: one provider per `jwtRules` entry, in input
//! order, as istiod names them `origins-<i>` (`pilot/pkg/security/authn/policy_applier.go`).
//!
//! Checks, each naming the object and field: the admission webhook's
//! (`mesh_policy::validate::validate_request_authentication`, repeated here per field so the
//! error points at it), header names that HTTP accepts, and `timeout` as a Go duration.
//!
//! Key source per rule, as istiod's default (`PILOT_JWT_ENABLE_REMOTE_JWKS=istiod`) resolves
//! it: inline `jwks` if set; else `jwksUri`; else the issuer's OpenID discovery document. An
//! inline `jwks` that is not a key set is an error (the webhook parses it); one whose keys are
//! all unusable is accepted with a [`ConfigWarning`] and rejects that rule's tokens with
//! "Jwks doesn't have any valid public key" (Envoy logs and fails closed the same way).

use std::{borrow::Borrow, sync::Arc, time::Duration};

use http::{HeaderName, Uri};
use mesh_policy::model::{JwtRule, RequestAuthentication};

use crate::{
    error::{ConfigError, ConfigWarning},
    extract::Locations,
    fetch::{JwksStore, Remote, Source},
    jwks::{JwksError, KeySet},
    output::{ClaimHeader, Outputs},
    token::sanitize_audience,
};

/// Istio's default `jwtRules[].timeout` for fetching keys.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) enum Keys {
    Inline(Arc<KeySet>),
    /// An inline `jwks` with no usable key.
    Unusable,
    Remote {
        remote: Arc<Remote>,
        timeout: Duration,
    },
}

/// One `jwtRules` entry, ready to check tokens.
#[derive(Debug)]
pub(crate) struct Provider {
    /// `namespace/name` and the rule index, for logs.
    pub object: String,
    pub index: usize,
    /// Empty accepts any `iss`.
    pub issuer: String,
    /// Sanitized (`http(s)://` and a trailing `/` removed); empty accepts any `aud`.
    pub audiences: Vec<String>,
    pub locations: Locations,
    pub outputs: Outputs,
    pub keys: Keys,
}

fn err(object: &str, field: String, message: impl Into<String>) -> ConfigError {
    ConfigError {
        object: object.to_string(),
        field,
        message: message.into(),
    }
}

/// Go's `time.ParseDuration` for the forms Kubernetes users write (`5s`, `1.5s`, `500ms`,
/// `1m30s`); negative durations are refused.
pub(crate) fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

fn header_name(object: &str, field: String, name: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::try_from(name).map_err(|_| {
        err(
            object,
            field,
            format!("{name:?} is not a valid HTTP header name"),
        )
    })
}

fn http_uri(object: &str, field: String, text: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = text
        .parse()
        .map_err(|e| err(object, field.clone(), format!("{text:?} is not a URI: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(err(
            object,
            field,
            format!("{text:?} must be an absolute http:// or https:// URI"),
        )),
    }
}

/// Build the provider of `ra.spec.jwtRules[i]`.
fn provider(
    ra: &RequestAuthentication,
    i: usize,
    rule: &JwtRule,
    store: &JwksStore,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<Provider, ConfigError> {
    let object = ra.key();
    let o = object.as_str();
    let f = |name: &str| format!("spec.jwtRules[{i}].{name}");
    if rule.issuer.is_empty() && rule.jwks_uri.is_empty() {
        return Err(err(
            o,
            f("issuer"),
            "issuer or jwksUri must be non-empty string",
        ));
    }
    if let Some(j) = rule.audiences.iter().position(String::is_empty) {
        return Err(err(
            o,
            f(&format!("audiences[{j}]")),
            "audience must be non-empty string",
        ));
    }
    let mut headers = Vec::new();
    for (j, h) in rule.from_headers.iter().enumerate() {
        if h.name.is_empty() {
            return Err(err(
                o,
                f(&format!("fromHeaders[{j}].name")),
                "location header name must be non-empty string",
            ));
        }
        let name = header_name(o, f(&format!("fromHeaders[{j}].name")), &h.name)?;
        headers.push((name, h.prefix.clone()));
    }
    if let Some(j) = rule.from_params.iter().position(String::is_empty) {
        return Err(err(
            o,
            f(&format!("fromParams[{j}]")),
            "location query must be non-empty string",
        ));
    }
    if let Some(j) = rule.from_cookies.iter().position(String::is_empty) {
        return Err(err(
            o,
            f(&format!("fromCookies[{j}]")),
            "cookie name must be non-empty string",
        ));
    }
    let payload_header = match rule.output_payload_to_header.as_str() {
        "" => None,
        h => Some(header_name(o, f("outputPayloadToHeader"), h)?),
    };
    let mut claim_headers = Vec::new();
    for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
        if c.claim.is_empty() || c.header.is_empty() {
            return Err(err(
                o,
                f(&format!("outputClaimToHeaders[{j}]")),
                "outputClaimToHeaders header and claim value must be non-empty string",
            ));
        }
        claim_headers.push(ClaimHeader {
            header: header_name(
                o,
                f(&format!("outputClaimToHeaders[{j}].header")),
                &c.header,
            )?,
            claim: c.claim.clone(),
        });
    }
    let timeout = match &rule.timeout {
        None => DEFAULT_FETCH_TIMEOUT,
        Some(t) => parse_go_duration(t)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                err(
                    o,
                    f("timeout"),
                    format!("{t:?} is not a positive duration such as \"5s\""),
                )
            })?,
    };
    let keys = if !rule.jwks.is_empty() {
        match KeySet::parse(&rule.jwks) {
            Ok(k) => Keys::Inline(Arc::new(k)),
            // The webhook parses `jwks` (`jwk.Parse`) and rejects what is not a key set.
            Err(e @ (JwksError::ParseError | JwksError::NoKeys | JwksError::BadKeys)) => {
                return Err(err(o, f("jwks"), format!("jwks parse error: {e}")));
            }
            Err(e) => {
                let w = ConfigWarning {
                    object: object.clone(),
                    field: f("jwks"),
                    message: format!("{e}; every token of this rule is rejected"),
                };
                tracing::warn!(object = %w.object, field = %w.field, error = %e, "inline JWKS unusable");
                warnings.push(w);
                Keys::Unusable
            }
        }
    } else if !rule.jwks_uri.is_empty() {
        let uri = http_uri(o, f("jwksUri"), &rule.jwks_uri)?;
        Keys::Remote {
            remote: store.get(Source::Jwks(uri)),
            timeout,
        }
    } else {
        let base = rule.issuer.trim_end_matches('/');
        let text = format!("{base}/.well-known/openid-configuration");
        let uri = http_uri(o, f("issuer"), &text).map_err(|mut e| {
            e.message = format!(
                "without jwksUri the issuer must be an http(s) URL for OpenID discovery ({})",
                e.message
            );
            e
        })?;
        Keys::Remote {
            remote: store.get(Source::Discovery(uri)),
            timeout,
        }
    };
    Ok(Provider {
        object,
        index: i,
        issuer: rule.issuer.clone(),
        audiences: rule
            .audiences
            .iter()
            .map(|a| sanitize_audience(a).to_string())
            .collect(),
        locations: Locations::new(headers, rule.from_params.clone(), rule.from_cookies.clone()),
        outputs: Outputs {
            payload_header,
            claim_headers,
            forward: rule.forward_original_token,
        },
        keys,
    })
}

/// Every provider of `policies`, in order, or the first error.
pub(crate) fn providers(
    policies: impl IntoIterator<Item = impl Borrow<RequestAuthentication>>,
    store: &JwksStore,
) -> Result<(Vec<Provider>, Vec<ConfigWarning>), ConfigError> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for ra in policies {
        let ra = ra.borrow();
        for (i, rule) in ra.spec.jwt_rules.iter().enumerate() {
            out.push(provider(ra, i, rule, store, &mut warnings)?);
        }
        // What the webhook rejects beyond the rules (selector, targetRefs).
        let v = mesh_policy::validate::validate_request_authentication(ra);
        if let Some(e) = v.errors.first() {
            return Err(err(&ra.key(), "spec".into(), e.clone()));
        }
    }
    Ok((out, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("5s", Some(5_000) ; "seconds")]
    #[test_case("1.5s", Some(1_500) ; "fraction")]
    #[test_case("500ms", Some(500) ; "millis")]
    #[test_case("1m30s", Some(90_000) ; "compound")]
    #[test_case("0", Some(0) ; "zero")]
    #[test_case("", None ; "empty")]
    #[test_case("5", None ; "no unit")]
    #[test_case("-1s", None ; "negative")]
    #[test_case("3d", None ; "unknown unit")]
    fn go_durations(s: &str, want_ms: Option<u64>) {
        assert_eq!(parse_go_duration(s).map(|d| d.as_millis() as u64), want_ms);
    }
}
