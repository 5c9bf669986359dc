//! SPIFFE workload identities as Istio writes them: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
//!
//! Parsing is strict (SPIFFE ID spec §2: lowercase trust domain of `[a-z0-9._-]`, path segments
//! of `[A-Za-z0-9._-]`, no empty, `.` or `..` segments) because an identity that parses is
//! trusted for authorization decisions.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// SPIFFE caps the whole ID at 2048 bytes; longer input is rejected before parsing.
const MAX_LEN: usize = 2048;

/// A verified-shape SPIFFE identity of an Istio workload.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not an Istio SPIFFE identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity is empty")]
    Empty,
    #[error("identity is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("identity {0:?} does not start with \"spiffe://\"")]
    Scheme(String),
    #[error("identity {0:?} has an invalid trust domain (want lowercase [a-z0-9._-], non-empty)")]
    TrustDomain(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Path(String),
    #[error(
        "identity {id:?} has an invalid {field} segment {segment:?} (want [A-Za-z0-9._-], not '.' or '..')"
    )]
    Segment {
        id: String,
        field: &'static str,
        segment: String,
    },
}

impl Identity {
    /// Builds an identity from its parts, validating each of them.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let id = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        id.parse()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The same namespace and service account under another trust domain (alias matching).
    pub fn with_trust_domain(&self, trust_domain: &str) -> Result<Self, IdentityError> {
        Self::new(trust_domain, &self.namespace, &self.service_account)
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        })
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdentityError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(IdentityError::TooLong);
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_owned()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Path(s.to_owned()))?;
        if !valid_trust_domain(td) {
            return Err(IdentityError::TrustDomain(s.to_owned()));
        }
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::Path(s.to_owned()));
        };
        for (field, segment) in [("namespace", ns), ("service account", sa)] {
            if !valid_segment(segment) {
                return Err(IdentityError::Segment {
                    id: s.to_owned(),
                    field,
                    segment: segment.to_owned(),
                });
            }
        }
        Ok(Identity {
            trust_domain: td.to_owned(),
            namespace: ns.to_owned(),
            service_account: sa.to_owned(),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case(
        "spiffe://cluster.local/ns/default/sa/sleep",
        "cluster.local",
        "default",
        "sleep"
    )]
    #[test_case(
        "spiffe://td-1.example_x/ns/a.b/sa/A-Z_0",
        "td-1.example_x",
        "a.b",
        "A-Z_0"
    )]
    fn parses(s: &str, td: &str, ns: &str, sa: &str) {
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain(), td);
        assert_eq!(id.namespace(), ns);
        assert_eq!(id.service_account(), sa);
        assert_eq!(id.to_string(), s);
    }

    #[test_case("" => IdentityError::Empty ; "empty")]
    #[test_case("http://cluster.local/ns/a/sa/b" => matches IdentityError::Scheme(_) ; "scheme")]
    #[test_case("spiffe://cluster.local" => matches IdentityError::Path(_) ; "no path")]
    #[test_case("spiffe:///ns/a/sa/b" => matches IdentityError::TrustDomain(_) ; "empty td")]
    #[test_case("spiffe://Cluster.local/ns/a/sa/b" => matches IdentityError::TrustDomain(_) ; "uppercase td")]
    #[test_case("spiffe://cluster.local/ns/a/sa/b/extra" => matches IdentityError::Path(_) ; "extra segment")]
    #[test_case("spiffe://cluster.local/sa/b/ns/a" => matches IdentityError::Path(_) ; "swapped")]
    #[test_case("spiffe://cluster.local/ns//sa/b" => matches IdentityError::Segment { field: "namespace", .. } ; "empty ns")]
    #[test_case("spiffe://cluster.local/ns/a/sa/.." => matches IdentityError::Segment { field: "service account", .. } ; "dotdot")]
    #[test_case("spiffe://cluster.local/ns/a b/sa/c" => matches IdentityError::Segment { .. } ; "space")]
    #[test_case("spiffe://cluster.local/ns/a/sa/b?x=1" => matches IdentityError::Segment { .. } ; "query")]
    fn rejects(s: &str) -> IdentityError {
        s.parse::<Identity>().unwrap_err()
    }

    #[test]
    fn rejects_overlong() {
        let s = format!("spiffe://cluster.local/ns/a/sa/{}", "x".repeat(MAX_LEN));
        assert_eq!(s.parse::<Identity>().unwrap_err(), IdentityError::TooLong);
    }
}
