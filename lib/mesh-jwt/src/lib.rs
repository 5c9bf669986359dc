//! JWT validation for Istio's RequestAuthentication, as the waypoint applies it: the behaviour
//! of Envoy's `jwt_authn` filter as istiod configures it, without Envoy.
//!
//! # Use
//!
//! ```no_run
//! # async fn demo(ras: Vec<mesh_policy::model::RequestAuthentication>,
//! #               mut req: http::Request<()>) -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_jwt::{Authenticator, Options};
//!
//! // Once per configuration change, from the RequestAuthentications that apply to the target
//! // (`mesh_policy::scope::waypoint_request_authentications`). Keep one `JwksStore` (in
//! // `Options::jwks`) for the process so fetched keys survive rebuilds.
//! let authn = Authenticator::with_options(&ras, Options::default())?;
//!
//! // Per request, before authorization:
//! match authn.authenticate_request(&mut req).await {
//!     Ok(jwt) => { /* `jwt: Option<mesh_policy::rbac::Jwt>` goes into rbac::HttpView::jwt */ }
//!     Err(e) => {
//!         let reply = e.response(); // 401 (403 for audiences), Envoy's text, www-authenticate
//!         # let _ = reply;
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [`Authenticator::authenticate`] takes `(&mut HeaderMap, &Uri)` when the caller has no
//! `http::Request`; it skips only the CORS preflight bypass.
//!
//! # Semantics
//!
//! - No token for any rule: the request passes with no principal (`Ok(None)`); policy decides
//!   (`requestPrincipals: ["*"]` then denies it with 403).
//! - A token that fails: `Err(AuthnError)`; the body is Envoy's text ([`Failure::body`]),
//!   e.g. `Jwt is expired`, `Jwt not yet valid`, `Jwt verification fails`,
//!   `Jwt issuer is not configured`, `Jwks doesn't have key to match kid or alg from Jwt`,
//!   `Jwks remote fetch is failed`; status 401, except `Audiences in Jwt are not allowed`
//!   which Envoy answers with 403.
//! - Several rules and tokens: see [`authn`] (istiod's requirement tree and Envoy's choice
//!   of failure).
//! - Token locations, and which are removed when forwarding is off: see [`extract`].
//! - Claims for policy and output headers: see [`output`].
//! - Keys: inline `jwks`, `jwksUri`, or OpenID discovery from the issuer; cached, refreshed
//!   every 20 minutes, last good keys kept on failure, fail closed if never fetched: see
//!   [`fetch`]. Algorithms: RS256/384/512, PS256/384/512, ES256/384/512, EdDSA (Ed25519),
//!   HS256/384/512, all on aws-lc-rs.
//! - Time: `exp` and `nbf` with 60 s of clock skew ([`DEFAULT_CLOCK_SKEW`]).
//!
//! # Modules
//!
//! | module | owns |
//! |---|---|
//! | [`authn`] | [`Authenticator`], [`Options`], the requirement evaluation |
//! | [`config`] | RequestAuthentication → providers, per-field [`ConfigError`]s |
//! | [`extract`] | token locations and removal |
//! | [`token`] | parsing a compact JWS with Envoy's checks, time and audience rules |
//! | [`jwks`] | JWKS parsing, key selection, signature checks |
//! | [`fetch`] | remote JWKS over HTTP(S), [`JwksStore`] cache and refresh |
//! | [`output`] | claims for policy, `outputPayloadToHeader`, `outputClaimToHeaders` |
//! | [`error`] | [`AuthnError`], [`Failure`] (Envoy's texts), [`ConfigError`] |

#![forbid(unsafe_code)]

pub mod authn;
pub mod config;
pub mod error;
pub mod extract;
pub mod fetch;
pub mod jwks;
pub mod output;
pub mod token;

pub use authn::{Authenticator, DEFAULT_CLOCK_SKEW, DEFAULT_REFRESH_INTERVAL, Options};
pub use config::DEFAULT_FETCH_TIMEOUT;
pub use error::{AuthnError, ConfigError, ConfigWarning, Failure};
pub use fetch::{FetchError, JwksStatus, JwksStore, client_config};
pub use jwks::{JwksError, KeySet};
pub use mesh_policy::rbac::Jwt;
pub use token::Alg;
