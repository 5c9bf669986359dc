//! The [`Authenticator`]: the jwt_authn filter istiod configures for the RequestAuthentications
//! that apply, evaluated per request.
//!
//! istiod turns rules `P1..Pn` into one requirement (`policy_applier.go`):
//!
//! ```text
//!   n = 1:  ANY{ P1, allow_missing }
//!   n > 1:  ANY{ P1, .., Pn, ALL{ ANY{P1, allow_missing}, .., ANY{Pn, allow_missing} } }
//! ```
//!
//! and Envoy evaluates it (`verifier.cc`, `authenticator.cc`) as follows, which is what
//! [`Authenticator::authenticate`] does:
//!
//! - a provider `Pi` looks for tokens in its own locations only; none found is "missing";
//!   every token it found must pass, checked in reverse extraction order, the first failure
//!   failing `Pi`; each token: parse, issuer (`iss` equals the rule's `issuer`, any if unset;
//!   else "Jwt issuer is not configured"), time (`nbf`/`exp` with 60 s of skew), audiences
//!   (when the rule has some), keys (fetched if remote), signature;
//! - the first `Pi` that passes wins: its outputs are applied and its token's claims become
//!   the request's [`Jwt`] (with several accepted tokens, the first found);
//! - otherwise, when every `Pi` found nothing, the request passes without a principal;
//! - otherwise it fails with one failure chosen like Envoy's `AnyVerifierImpl`: errors other
//!   than "missing" and "issuer is not configured" win over those two, a later one over an
//!   earlier one, and "issuer is not configured" over "missing".
//!
//! Before anything, the output headers of every rule (`outputPayloadToHeader`,
//! `outputClaimToHeaders`) are removed from the request, so only this filter can set them.

use std::{
    borrow::Borrow,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, Method, Uri};
use mesh_policy::{model::RequestAuthentication, rbac::Jwt};
use serde_json::{Map, Value};

use crate::{
    config::{Keys, Provider, providers},
    error::{AuthnError, ConfigError, ConfigWarning, Failure},
    extract::{self, Location},
    fetch::{FetchSettings, JwksStore},
    jwks::KeySet,
    output::claims_for_policy,
    token::{self, sanitize_audience},
};

/// Istio's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL` default.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// Envoy's default `clock_skew_seconds`.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Settings of an [`Authenticator`] beyond the RequestAuthentications themselves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Remote JWKS older than this are fetched again (default 20 minutes).
    pub refresh_interval: Duration,
    /// After a failed fetch, the next try waits at least this long (default 1 s); until then
    /// the last good keys are used, or the tokens are rejected if there are none.
    pub retry_interval: Duration,
    /// Allowed clock difference for `exp` and `nbf` (default 60 s).
    pub clock_skew: Duration,
    /// Largest JWKS or discovery document accepted (default 1 MiB).
    pub max_jwks_bytes: usize,
    /// TLS for `https` JWKS; `None` trusts the system roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The JWKS cache; share one store between the authenticators of a process.
    pub jwks: JwksStore,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            retry_interval: Duration::from_secs(1),
            clock_skew: DEFAULT_CLOCK_SKEW,
            max_jwks_bytes: 1 << 20,
            tls: None,
            jwks: JwksStore::default(),
        }
    }
}

/// A token accepted by one provider.
struct Accepted {
    location: Location,
    payload_b64: String,
    iss: String,
    sub: String,
    claims: Map<String, Value>,
}

/// JWT authentication for the RequestAuthentications that apply to one waypoint target.
#[derive(Debug)]
pub struct Authenticator {
    providers: Vec<Provider>,
    warnings: Vec<ConfigWarning>,
    fetch: FetchSettings,
    clock_skew: u64,
}

impl Authenticator {
    /// Build from the RequestAuthentications that apply (in the order istiod would list them),
    /// with default [`Options`]. Takes `&[RequestAuthentication]`, `Vec<&RequestAuthentication>`
    /// (what `mesh_policy::scope::waypoint_request_authentications` returns) and the like.
    pub fn new(
        policies: impl IntoIterator<Item = impl Borrow<RequestAuthentication>>,
    ) -> Result<Self, ConfigError> {
        Self::with_options(policies, Options::default())
    }

    pub fn with_options(
        policies: impl IntoIterator<Item = impl Borrow<RequestAuthentication>>,
        opts: Options,
    ) -> Result<Self, ConfigError> {
        if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
            // Only when another crate turned on a second jsonwebtoken backend; ours is aws-lc-rs.
            let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
        }
        let (providers, warnings) = providers(policies, &opts.jwks)?;
        Ok(Authenticator {
            providers,
            warnings,
            fetch: FetchSettings {
                refresh_interval: opts.refresh_interval,
                retry_interval: opts.retry_interval,
                max_bytes: opts.max_jwks_bytes,
                tls: opts.tls,
            },
            clock_skew: opts.clock_skew.as_secs(),
        })
    }

    /// No rule applies: every request passes without a principal.
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Rules accepted but unable to accept any token (e.g. an inline `jwks` with no usable key).
    pub fn warnings(&self) -> &[ConfigWarning] {
        &self.warnings
    }

    /// Fetch every remote JWKS now (e.g. at startup), so the first request does not wait.
    /// Failures are logged; requests then retry.
    pub async fn prefetch(&self) {
        for p in &self.providers {
            if let Keys::Remote { remote, timeout } = &p.keys {
                let _ = remote.keys(&self.fetch, *timeout).await;
            }
        }
    }

    /// As [`Authenticator::authenticate`], plus Istio's `bypassCorsPreflight`: an `OPTIONS`
    /// request with `origin` and `access-control-request-method` is not authenticated.
    pub async fn authenticate_request<B>(
        &self,
        req: &mut http::Request<B>,
    ) -> Result<Option<Jwt>, AuthnError> {
        if is_cors_preflight(req.method(), req.headers()) {
            return Ok(None);
        }
        let uri = req.uri().clone();
        self.authenticate(req.headers_mut(), &uri).await
    }

    /// Authenticate one request.
    ///
    /// - `Ok(None)`: no token for any rule (or no rules): pass, without a request principal;
    /// - `Ok(Some(jwt))`: a token was accepted; `headers` now carry the rule's outputs and,
    ///   unless `forwardOriginalToken`, no longer the header the token came in;
    /// - `Err(e)`: answer locally with `e.status()` and `e.body()` (see [`AuthnError`]).
    pub async fn authenticate(
        &self,
        headers: &mut HeaderMap,
        uri: &Uri,
    ) -> Result<Option<Jwt>, AuthnError> {
        if self.providers.is_empty() {
            return Ok(None);
        }
        for p in &self.providers {
            p.outputs.sanitize(headers);
        }
        let mut outcomes = Vec::with_capacity(self.providers.len());
        for p in &self.providers {
            match self.verify(p, headers, uri).await {
                Ok(Some(accepted)) => {
                    tracing::debug!(object = %p.object, rule = p.index, "JWT accepted");
                    return Ok(Some(self.accept(p, headers, accepted)));
                }
                Ok(None) => outcomes.push(Failure::JwtMissed),
                Err(f) => {
                    tracing::debug!(object = %p.object, rule = p.index, reason = f.reason(), "JWT rejected by rule");
                    outcomes.push(f);
                }
            }
        }
        if self.providers.len() > 1 {
            // ALL{ ANY{Pi, allow_missing} }: the first Pi that found a token and failed.
            let all = outcomes
                .iter()
                .copied()
                .find(|f| *f != Failure::JwtMissed)
                .unwrap_or(Failure::JwtMissed);
            outcomes.push(all);
        }
        match aggregate(&outcomes) {
            Failure::JwtMissed => Ok(None),
            f => {
                tracing::debug!(reason = f.reason(), "request authentication failed");
                Err(AuthnError::new(f, realm(headers, uri)))
            }
        }
    }

    async fn verify(
        &self,
        p: &Provider,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Result<Option<Vec<Accepted>>, Failure> {
        let found = p.locations.extract(headers, uri);
        if found.is_empty() {
            return Ok(None);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut accepted = Vec::with_capacity(found.len());
        let mut keys: Option<Arc<KeySet>> = None;
        for f in found.into_iter().rev() {
            let t = token::parse(&f.token)?;
            if !p.issuer.is_empty() && t.iss != p.issuer {
                return Err(Failure::JwtUnknownIssuer);
            }
            token::check_time(&t, now, self.clock_skew)?;
            if !p.audiences.is_empty()
                && !t
                    .aud
                    .iter()
                    .any(|a| p.audiences.iter().any(|c| c == sanitize_audience(a)))
            {
                return Err(Failure::JwtAudienceNotAllowed);
            }
            let set = match &keys {
                Some(k) => k.clone(),
                None => {
                    let k = match &p.keys {
                        Keys::Inline(k) => k.clone(),
                        Keys::Unusable => return Err(Failure::JwksNoValidKeys),
                        Keys::Remote { remote, timeout } => {
                            remote.keys(&self.fetch, *timeout).await?
                        }
                    };
                    keys = Some(k.clone());
                    k
                }
            };
            set.verify(&t)?;
            accepted.push(Accepted {
                location: f.location.clone(),
                payload_b64: t.payload_b64.to_string(),
                iss: t.iss.clone(),
                sub: t.sub.clone(),
                claims: t.claims.clone(),
            });
        }
        Ok(Some(accepted))
    }

    fn accept(&self, p: &Provider, headers: &mut HeaderMap, accepted: Vec<Accepted>) -> Jwt {
        for a in &accepted {
            p.outputs.apply(headers, &a.payload_b64, &a.claims);
            if !p.outputs.forward {
                extract::remove(headers, &a.location);
            }
        }
        // Checked last, so it is the one Envoy's metadata ends up holding.
        match accepted.into_iter().last() {
            Some(a) => Jwt {
                iss: a.iss,
                sub: a.sub,
                claims: claims_for_policy(&a.claims),
            },
            None => Jwt::default(),
        }
    }
}

/// Envoy's `AnyVerifierImpl` choice among failed children.
fn aggregate(children: &[Failure]) -> Failure {
    let mut out = Failure::JwtMissed;
    for &c in children {
        let weak = matches!(c, Failure::JwtMissed | Failure::JwtUnknownIssuer);
        if !weak || out == Failure::JwtMissed {
            out = c;
        }
    }
    out
}

fn is_cors_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(http::header::ORIGIN)
        && headers.contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Envoy's `buildOriginalUri`: `<x-forwarded-proto>://<host><path>`.
fn realm(headers: &HeaderMap, uri: &Uri) -> String {
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .or(uri.scheme_str())
        .unwrap_or("http");
    let host = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        })
        .unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    format!("{proto}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Failure::*;
    use test_case::test_case;

    #[test_case(&[JwtMissed], JwtMissed ; "single missing passes")]
    #[test_case(&[JwtUnknownIssuer], JwtUnknownIssuer ; "single wrong issuer")]
    #[test_case(&[JwtUnknownIssuer, JwtExpired, JwtExpired], JwtExpired ; "real error beats wrong issuer")]
    #[test_case(&[JwtExpired, JwtUnknownIssuer, JwtExpired], JwtExpired ; "order does not hide a real error")]
    #[test_case(&[JwtMissed, JwtUnknownIssuer, JwtUnknownIssuer], JwtUnknownIssuer ; "wrong issuer beats missing")]
    #[test_case(&[JwtVerificationFail, JwtExpired], JwtExpired ; "later real error wins")]
    fn any_verifier_aggregation(children: &[Failure], want: Failure) {
        assert_eq!(aggregate(children), want);
    }

    #[test]
    fn realm_is_scheme_host_path() {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "svc.ns".parse().unwrap());
        assert_eq!(realm(&h, &"/a?b=1".parse().unwrap()), "http://svc.ns/a?b=1");
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(realm(&h, &"/".parse().unwrap()), "https://svc.ns/");
    }

    #[test]
    fn cors_preflight_needs_all_three() {
        let mut h = HeaderMap::new();
        h.insert(http::header::ORIGIN, "https://a".parse().unwrap());
        assert!(!is_cors_preflight(&Method::OPTIONS, &h));
        h.insert(
            http::header::ACCESS_CONTROL_REQUEST_METHOD,
            "GET".parse().unwrap(),
        );
        assert!(is_cors_preflight(&Method::OPTIONS, &h));
        assert!(!is_cors_preflight(&Method::GET, &h));
    }
}
