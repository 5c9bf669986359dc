//! What an accepted token leaves behind: the claims authorization sees, and the request
//! headers of `outputPayloadToHeader` and `outputClaimToHeaders` (Envoy's `handleGoodJwt`).
//!
//! - claims for policy are the payload with the space-delimited claims Istio configures by
//!   default (`scope`, `permission`) split into lists, as Envoy's
//!   `normalize_payload_in_metadata` does before RBAC reads `request.auth.claims`;
//! - `outputPayloadToHeader` gets the payload segment exactly as received (Base64url, no
//!   padding);
//! - `outputClaimToHeaders`: the claim is found by a `.`-separated path; a string is copied,
//!   a number is written without decimals when integral (else `%lf`), a boolean as
//!   `true`/`false`, an object or list as standard Base64 of its JSON; a missing claim or
//!   one that is not a valid header value adds nothing;
//! - both kinds of output header are removed from every request first, so a client cannot
//!   supply them.

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

/// The claims Istio normalizes by default (`buildSpaceDelimitedClaims`).
const SPACE_DELIMITED: [&str; 2] = ["permission", "scope"];

/// The payload as RBAC sees it.
pub(crate) fn claims_for_policy(claims: &Map<String, Value>) -> Map<String, Value> {
    let mut out = claims.clone();
    for c in SPACE_DELIMITED {
        if let Some(Value::String(s)) = claims.get(c) {
            let list = s
                .split(' ')
                .filter(|e| !e.is_empty())
                .map(|e| Value::String(e.to_string()))
                .collect();
            out.insert(c.to_string(), Value::Array(list));
        }
    }
    out
}

/// One `outputClaimToHeaders` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimHeader {
    pub header: HeaderName,
    pub claim: String,
}

/// The output settings of one rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Outputs {
    pub payload_header: Option<HeaderName>,
    pub claim_headers: Vec<ClaimHeader>,
    pub forward: bool,
}

impl Outputs {
    /// Headers a client may not set itself.
    pub fn sanitize(&self, headers: &mut HeaderMap) {
        if let Some(h) = &self.payload_header {
            headers.remove(h);
        }
        for c in &self.claim_headers {
            headers.remove(&c.header);
        }
    }

    /// Add the output headers for an accepted token.
    pub fn apply(&self, headers: &mut HeaderMap, payload_b64: &str, claims: &Map<String, Value>) {
        if let Some(h) = &self.payload_header
            && let Ok(v) = HeaderValue::from_str(payload_b64)
        {
            headers.append(h.clone(), v);
        }
        for c in &self.claim_headers {
            let value = claim_path(claims, &c.claim).and_then(claim_header_value);
            match value.map(|v| HeaderValue::from_str(&v)) {
                Some(Ok(v)) => {
                    headers.append(c.header.clone(), v);
                }
                Some(Err(_)) => {
                    tracing::debug!(claim = %c.claim, header = %c.header, "claim is not a valid header value; not copied");
                }
                None => {}
            }
        }
    }
}

fn claim_path<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut segs = path.split('.');
    let mut cur = claims.get(segs.next()?)?;
    for s in segs {
        cur = cur.as_object()?.get(s)?;
    }
    Some(cur)
}

/// Envoy's `addJWTClaimToHeader` conversions.
fn claim_header_value(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 9.2e18 => format!("{}", f as i64),
            (_, _, Some(f)) => format!("{f:.6}"),
            _ => return None,
        },
        Value::Object(_) | Value::Array(_) => {
            base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).ok()?)
        }
        Value::Null => return None,
    };
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use test_case::test_case;

    #[test_case(json!("v"), Some("v") ; "string")]
    #[test_case(json!(""), None ; "empty string")]
    #[test_case(json!(true), Some("true") ; "bool")]
    #[test_case(json!(42), Some("42") ; "integer")]
    #[test_case(json!(2.0), Some("2") ; "integral float")]
    #[test_case(json!(1.5), Some("1.500000") ; "float")]
    #[test_case(json!(["a", 1]), Some("WyJhIiwxXQ==") ; "list as base64 json")]
    #[test_case(json!({"k": "v"}), Some("eyJrIjoidiJ9") ; "object as base64 json")]
    #[test_case(json!(null), None ; "null")]
    fn claim_values(v: Value, want: Option<&str>) {
        assert_eq!(claim_header_value(&v).as_deref(), want);
    }

    #[test]
    fn nested_claims_and_normalized_scopes() {
        let claims =
            json!({"a": {"b": {"c": "deep"}}, "scope": "read  write", "permission": ["x"]});
        let claims = claims.as_object().unwrap();
        assert_eq!(claim_path(claims, "a.b.c"), Some(&json!("deep")));
        assert_eq!(claim_path(claims, "a.x"), None);
        let p = claims_for_policy(claims);
        assert_eq!(p["scope"], json!(["read", "write"]));
        assert_eq!(p["permission"], json!(["x"]));
    }

    #[test]
    fn outputs_sanitize_then_apply() {
        let o = Outputs {
            payload_header: Some(HeaderName::from_static("x-payload")),
            claim_headers: vec![ClaimHeader {
                header: HeaderName::from_static("x-sub"),
                claim: "sub".into(),
            }],
            forward: false,
        };
        let mut h = HeaderMap::new();
        h.insert("x-payload", HeaderValue::from_static("forged"));
        h.insert("x-sub", HeaderValue::from_static("forged"));
        o.sanitize(&mut h);
        assert!(h.is_empty());
        let claims = json!({"sub": "alice"});
        o.apply(&mut h, "eyJzdWIiOiJhbGljZSJ9", claims.as_object().unwrap());
        assert_eq!(h["x-payload"], "eyJzdWIiOiJhbGljZSJ9");
        assert_eq!(h["x-sub"], "alice");
    }
}
