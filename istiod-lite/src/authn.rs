//! Who is calling: bearer token → a Kubernetes service account and the node its pod runs on.
//!
//! In a cluster this is a TokenReview of the projected token (audience `istio-ca`) plus the
//! pod the token is bound to (that gives the node). The lab and "no cluster" mode use
//! [`StaticTokens`]: a file listing tokens with the identity and node each stands for.
//! Unknown, missing or malformed tokens are refused — never treated as anonymous.

use std::{collections::BTreeMap, future::Future, path::Path, pin::Pin};

use serde::Deserialize;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The node of the caller's pod, when known (required to impersonate).
    pub node: Option<String>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)?;
        if let Some(n) = &self.node {
            write!(f, "@{n}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send the service-account token as `authorization: Bearer <token>`")]
    Missing,
    #[error("the token is not valid for this control plane")]
    Invalid,
    #[error("reading the static token file {path}: {reason}")]
    File { path: String, reason: String },
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;

/// Authenticates a bearer token.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, token: Option<&'a str>) -> AuthFuture<'a>;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    token: String,
    /// `namespace/name`.
    service_account: String,
    #[serde(default)]
    node: Option<String>,
}

/// A fixed token table.
#[derive(Debug, Clone, Default)]
pub struct StaticTokens(BTreeMap<String, Caller>);

impl StaticTokens {
    pub fn parse(path: &str, text: &str) -> Result<Self, AuthError> {
        let file_err = |reason: String| AuthError::File {
            path: path.to_owned(),
            reason,
        };
        let entries: Vec<Entry> =
            serde_yaml::from_str(text).map_err(|e| file_err(e.to_string()))?;
        let mut m = BTreeMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            let (ns, sa) = e.service_account.split_once('/').ok_or_else(|| {
                file_err(format!(
                    "[{i}].serviceAccount {:?} is not namespace/name",
                    e.service_account
                ))
            })?;
            if e.token.is_empty() {
                return Err(file_err(format!("[{i}].token is empty")));
            }
            m.insert(
                e.token,
                Caller {
                    namespace: ns.to_owned(),
                    service_account: sa.to_owned(),
                    node: e.node,
                },
            );
        }
        Ok(StaticTokens(m))
    }

    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }
}

impl Authenticator for StaticTokens {
    fn authenticate<'a>(&'a self, token: Option<&'a str>) -> AuthFuture<'a> {
        Box::pin(async move {
            let t = token.ok_or(AuthError::Missing)?;
            self.0.get(t).cloned().ok_or(AuthError::Invalid)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_map_to_callers_and_bad_files_name_the_entry() {
        let t = StaticTokens::parse(
            "t.yaml",
            "- {token: abc, serviceAccount: istio-system/ztunnel, node: node-a}\n",
        )
        .unwrap();
        let c = t.authenticate(Some("abc")).await.unwrap();
        assert_eq!(c.to_string(), "istio-system/ztunnel@node-a");
        assert!(matches!(
            t.authenticate(Some("x")).await,
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            t.authenticate(None).await,
            Err(AuthError::Missing)
        ));
        let e = StaticTokens::parse("t.yaml", "- {token: a, serviceAccount: nope}\n").unwrap_err();
        assert!(e.to_string().contains("[0].serviceAccount"), "{e}");
    }
}
