//! Who is calling: bearer token → a Kubernetes service account and the node its pod runs on.
//!
//! Two authenticators:
//! - [`TokenReviewAuthenticator`] (the Kubernetes source): a `TokenReview` of the projected
//!   token for audience `istio-ca`; only `system:serviceaccount:<ns>:<sa>` users are
//!   accepted. The node comes from the token's pod binding: the reviewed user's
//!   `authentication.kubernetes.io/node-name` extra when the server sets it (1.30+), else the
//!   bound pod (`…/pod-name`, checked against `…/pod-uid`) looked up in the index, then in
//!   the API, → `spec.nodeName`. A token bound to no pod authenticates without a node (it may
//!   get its own identity, never impersonate). Successful reviews are cached for a short TTL,
//!   keyed by the SHA-256 of the token.
//! - [`StaticTokens`] (the lab and "no cluster" mode): a file listing tokens with the
//!   identity and node each stands for.
//!
//! Unknown, missing or malformed tokens are refused — never treated as anonymous — and every
//! refusal says why.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::index::{self, Index};

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
    #[error("the Kubernetes API server did not authenticate the token: {reason}")]
    NotAuthenticated { reason: String },
    #[error(
        "the token is not for audience {audience}: {reason} (mount a projected service-account token with `audience: {audience}`)"
    )]
    WrongAudience { audience: String, reason: String },
    #[error(
        "{username:?} is not a service account: only `system:serviceaccount:<namespace>:<name>` tokens are accepted"
    )]
    NotServiceAccount { username: String },
    #[error(
        "the token is bound to pod {pod}, which does not exist (deleted or recreated); the caller must use a token of its current pod"
    )]
    PodNotFound { pod: String },
    #[error(
        "the token is bound to pod {pod} uid {token_uid}, but that pod now has uid {pod_uid} (recreated); refusing a stale token"
    )]
    PodReplaced {
        pod: String,
        token_uid: String,
        pod_uid: String,
    },
    #[error(
        "asking the Kubernetes API server: {reason} (istiod-lite needs `create` on tokenreviews.authentication.k8s.io and `get` on pods)"
    )]
    Api { reason: String },
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

/// The audience ztunnels' projected tokens carry (Istio's `istio-ca`).
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// `user.extra` keys the service-account authenticator sets for a pod-bound token.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Set by API servers 1.30+ (ServiceAccountTokenPodNodeInfo); absent on older ones.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Reviewed tokens kept at most; past this, expired entries are dropped, then everything.
const CACHE_MAX: usize = 10_000;

/// What a successful review says about the caller, before the node is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub namespace: String,
    pub service_account: String,
    /// `(name, uid)` of the pod the token is bound to (in the caller's namespace).
    pub pod: Option<(String, Option<String>)>,
    pub node: Option<String>,
}

/// Interprets a TokenReview status (pure, so every refusal is unit-tested).
pub fn interpret_review(
    status: Option<&TokenReviewStatus>,
    audience: &str,
) -> Result<Reviewed, AuthError> {
    let Some(st) = status else {
        return Err(AuthError::NotAuthenticated {
            reason: "the TokenReview came back without a status".into(),
        });
    };
    let reason = st
        .error
        .clone()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "no reason given".into());
    if st.authenticated != Some(true) {
        // The API server says "token audiences [...] is invalid for the target audiences".
        if reason.contains("audience") {
            return Err(AuthError::WrongAudience {
                audience: audience.into(),
                reason,
            });
        }
        return Err(AuthError::NotAuthenticated { reason });
    }
    if let Some(auds) = &st.audiences
        && !auds.iter().any(|a| a == audience)
    {
        return Err(AuthError::WrongAudience {
            audience: audience.into(),
            reason: format!("the API server authenticated it for {auds:?}"),
        });
    }
    let user = st.user.as_ref();
    let username = user.and_then(|u| u.username.clone()).unwrap_or_default();
    let not_sa = || AuthError::NotServiceAccount {
        username: username.clone(),
    };
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(not_sa)?;
    let (ns, sa) = rest.split_once(':').ok_or_else(not_sa)?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return Err(not_sa());
    }
    let extra = |k: &str| {
        user.and_then(|u| u.extra.as_ref())
            .and_then(|e| e.get(k))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(Reviewed {
        namespace: ns.to_owned(),
        service_account: sa.to_owned(),
        pod: extra(EXTRA_POD_NAME).map(|name| (name, extra(EXTRA_POD_UID))),
        node: extra(EXTRA_NODE_NAME),
    })
}

/// Authenticates callers with the Kubernetes TokenReview API.
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    index: watch::Receiver<Arc<Index>>,
    audience: String,
    ttl: Duration,
    cache: Mutex<HashMap<[u8; 32], (Instant, Caller)>>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenReviewAuthenticator {
    /// Reviews tokens for [`ISTIO_CA_AUDIENCE`]; pods are looked up in `index` first.
    pub fn new(client: kube::Client, index: watch::Receiver<Arc<Index>>, ttl: Duration) -> Self {
        TokenReviewAuthenticator {
            client,
            index,
            audience: ISTIO_CA_AUDIENCE.to_owned(),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, c)| c.clone())
    }

    fn remember(&self, key: [u8; 32], caller: &Caller) {
        if self.ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now(), caller.clone()));
    }

    async fn review(&self, token: &str) -> Result<Reviewed, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let done = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Api {
                reason: format!("TokenReview: {e}"),
            })?;
        interpret_review(done.status.as_ref(), &self.audience)
    }

    /// The node of pod `ns/name` (checked against the token's pod uid, if it names one).
    async fn node_of(&self, ns: &str, name: &str, uid: Option<&str>) -> Result<String, AuthError> {
        let pod_key = index::key(Some(ns), Some(name));
        let from_index = self.index.borrow().pods.get(&pod_key).cloned();
        let pod = match from_index {
            Some(p) if uid.is_none() || p.metadata.uid.as_deref() == uid => Some(p),
            // Missing or different in the index (it may lag a fresh pod): ask the API.
            _ => {
                let api: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), ns);
                api.get_opt(name)
                    .await
                    .map_err(|e| AuthError::Api {
                        reason: format!("getting pod {pod_key}: {e}"),
                    })?
                    .map(Arc::new)
            }
        };
        let Some(pod) = pod else {
            return Err(AuthError::PodNotFound { pod: pod_key });
        };
        if let (Some(want), Some(have)) = (uid, pod.metadata.uid.as_deref())
            && want != have
        {
            return Err(AuthError::PodReplaced {
                pod: pod_key,
                token_uid: want.to_owned(),
                pod_uid: have.to_owned(),
            });
        }
        pod.spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::NotAuthenticated {
                reason: format!("the token's pod {pod_key} is not scheduled to a node"),
            })
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: Option<&'a str>) -> AuthFuture<'a> {
        Box::pin(async move {
            let t = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
            let key = token_hash(t);
            if let Some(c) = self.cached(&key) {
                return Ok(c);
            }
            let r = self.review(t).await?;
            let node = match (&r.node, &r.pod) {
                (Some(n), _) => Some(n.clone()),
                (None, Some((pod, uid))) => {
                    Some(self.node_of(&r.namespace, pod, uid.as_deref()).await?)
                }
                (None, None) => {
                    debug!(namespace = %r.namespace, service_account = %r.service_account, "token bound to no pod: caller has no node");
                    None
                }
            };
            let caller = Caller {
                namespace: r.namespace,
                service_account: r.service_account,
                node,
            };
            info!(caller = %caller, "token reviewed");
            self.remember(key, &caller);
            Ok(caller)
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

    fn status(json: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn reviews_are_interpreted_and_every_refusal_says_why() {
        let ok = status(serde_json::json!({
            "authenticated": true, "audiences": ["istio-ca"],
            "user": {"username": "system:serviceaccount:istio-system:ztunnel",
                     "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-a"],
                               "authentication.kubernetes.io/pod-uid": ["u1"]}}
        }));
        let r = interpret_review(Some(&ok), "istio-ca").unwrap();
        assert_eq!(
            r,
            Reviewed {
                namespace: "istio-system".into(),
                service_account: "ztunnel".into(),
                pod: Some(("ztunnel-a".into(), Some("u1".into()))),
                node: None,
            }
        );
        let with_node = status(serde_json::json!({
            "authenticated": true,
            "user": {"username": "system:serviceaccount:a:b",
                     "extra": {"authentication.kubernetes.io/node-name": ["node-a"]}}
        }));
        assert_eq!(
            interpret_review(Some(&with_node), "istio-ca")
                .unwrap()
                .node
                .as_deref(),
            Some("node-a")
        );
        let cases = [
            (
                serde_json::json!({"authenticated": false, "error": "[invalid bearer token, token audiences [\"api\"] is invalid for the target audiences [\"istio-ca\"]]"}),
                "is not for audience istio-ca",
            ),
            (
                serde_json::json!({"error": "invalid bearer token"}),
                "did not authenticate the token: invalid bearer token",
            ),
            (
                serde_json::json!({"authenticated": true, "audiences": ["other"], "user": {"username": "system:serviceaccount:a:b"}}),
                "authenticated it for [\"other\"]",
            ),
            (
                serde_json::json!({"authenticated": true, "user": {"username": "alice"}}),
                "\"alice\" is not a service account",
            ),
            (
                serde_json::json!({"authenticated": true, "user": {"username": "system:serviceaccount:nosa"}}),
                "is not a service account",
            ),
        ];
        for (json, want) in cases {
            let e = interpret_review(Some(&status(json.clone())), "istio-ca").unwrap_err();
            assert!(e.to_string().contains(want), "{json}: {e}");
        }
        assert!(matches!(
            interpret_review(None, "istio-ca"),
            Err(AuthError::NotAuthenticated { .. })
        ));
    }

    #[test]
    fn token_hashes_differ_per_token() {
        assert_eq!(token_hash("a"), token_hash("a"));
        assert_ne!(token_hash("a"), token_hash("b"));
    }

    /// A scripted API server: TokenReview says `istio-system/ztunnel` bound to pod
    /// `ztunnel-a` uid `u1`; GET of that pod answers `pod` (404 when `None`).
    #[derive(Default)]
    struct Script {
        reviews: usize,
        pod_gets: usize,
        pod: Option<serde_json::Value>,
    }

    fn scripted(script: Arc<Mutex<Script>>) -> kube::Client {
        let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
            let script = script.clone();
            async move {
                let mut s = script.lock().unwrap();
                let (code, body) = match req.uri().path() {
                    "/apis/authentication.k8s.io/v1/tokenreviews" => {
                        s.reviews += 1;
                        (
                            200,
                            serde_json::json!({
                                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                "spec": {},
                                "status": {"authenticated": true, "audiences": ["istio-ca"],
                                    "user": {"username": "system:serviceaccount:istio-system:ztunnel",
                                             "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-a"],
                                                       "authentication.kubernetes.io/pod-uid": ["u1"]}}}
                            }),
                        )
                    }
                    "/api/v1/namespaces/istio-system/pods/ztunnel-a" => {
                        s.pod_gets += 1;
                        match &s.pod {
                            Some(p) => (200, p.clone()),
                            None => (
                                404,
                                serde_json::json!({
                                    "apiVersion": "v1", "kind": "Status", "status": "Failure",
                                    "reason": "NotFound", "code": 404,
                                    "message": "pods \"ztunnel-a\" not found"
                                }),
                            ),
                        }
                    }
                    other => panic!("unexpected request {other}"),
                };
                let resp = http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body.to_string().into_bytes()))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        kube::Client::new(svc, "default")
    }

    fn pod_json(uid: &str, node: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ztunnel-a", "namespace": "istio-system", "uid": uid},
            "spec": {"nodeName": node, "containers": []}
        })
    }

    fn index_with(pod: Option<serde_json::Value>) -> watch::Receiver<Arc<Index>> {
        let mut idx = Index::default();
        if let Some(p) = pod {
            idx.apply(crate::index::Object::Pod(
                serde_json::from_value(p).unwrap(),
            ));
        }
        watch::channel(Arc::new(idx)).1
    }

    #[tokio::test]
    async fn reviews_are_cached_and_the_node_comes_from_the_bound_pod() {
        let script = Arc::new(Mutex::new(Script {
            pod: Some(pod_json("u1", "node-a")),
            ..Default::default()
        }));
        let a = TokenReviewAuthenticator::new(
            scripted(script.clone()),
            index_with(None),
            Duration::from_secs(60),
        );
        let c = a.authenticate(Some("tok")).await.unwrap();
        assert_eq!(c.to_string(), "istio-system/ztunnel@node-a");
        assert_eq!(a.authenticate(Some("tok")).await.unwrap(), c);
        {
            let s = script.lock().unwrap();
            assert_eq!(
                (s.reviews, s.pod_gets),
                (1, 1),
                "the second call is served from the cache"
            );
        }
        a.authenticate(Some("other")).await.unwrap();
        assert_eq!(
            script.lock().unwrap().reviews,
            2,
            "another token is reviewed"
        );
        assert!(matches!(
            a.authenticate(Some("")).await,
            Err(AuthError::Missing)
        ));

        // No cache: every call is a review; a pod in the index needs no GET.
        let script = Arc::new(Mutex::new(Script::default()));
        let a = TokenReviewAuthenticator::new(
            scripted(script.clone()),
            index_with(Some(pod_json("u1", "node-b"))),
            Duration::ZERO,
        );
        for _ in 0..2 {
            let c = a.authenticate(Some("tok")).await.unwrap();
            assert_eq!(c.node.as_deref(), Some("node-b"));
        }
        let s = script.lock().unwrap();
        assert_eq!((s.reviews, s.pod_gets), (2, 0));
    }

    #[tokio::test]
    async fn a_missing_or_recreated_pod_is_refused() {
        let script = Arc::new(Mutex::new(Script::default()));
        let a = TokenReviewAuthenticator::new(
            scripted(script.clone()),
            index_with(None),
            Duration::from_secs(60),
        );
        let e = a.authenticate(Some("tok")).await.unwrap_err();
        assert!(matches!(e, AuthError::PodNotFound { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("istio-system/ztunnel-a, which does not exist"),
            "{e}"
        );

        // Same name, new uid (in the index and in the API): a stale token.
        script.lock().unwrap().pod = Some(pod_json("u2", "node-b"));
        let a = TokenReviewAuthenticator::new(
            scripted(script.clone()),
            index_with(Some(pod_json("u2", "node-b"))),
            Duration::from_secs(60),
        );
        let e = a.authenticate(Some("tok")).await.unwrap_err();
        assert!(matches!(e, AuthError::PodReplaced { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("uid u1, but that pod now has uid u2"),
            "{e}"
        );
        // Refusals are not cached.
        a.authenticate(Some("tok")).await.unwrap_err();
        assert_eq!(script.lock().unwrap().reviews, 3);
    }
}
