//! Errors: why a request was refused ([`AuthnError`], with Envoy's exact body text and status)
//! and why a set of RequestAuthentications cannot be applied ([`ConfigError`]).
//!
//! The texts of [`Failure`] are Envoy's `getStatusString` (`source/common/jwt/status.cc`,
//! formerly `jwt_verify_lib`), byte for byte: clients and tests written against Istio compare
//! them. Only the failures this crate can produce are listed.

use http::{HeaderValue, StatusCode};

/// One reason a token was refused, as Envoy's jwt_authn names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// Not a failure on its own (a request without a token passes); kept for completeness of
    /// the aggregation rules.
    JwtMissed,
    JwtNotYetValid,
    JwtExpired,
    JwtBadFormat,
    JwtHeaderBadBase64,
    JwtHeaderBadJson,
    JwtHeaderBadAlg,
    JwtHeaderNotImplementedAlg,
    JwtHeaderBadKid,
    JwtPayloadBadBase64,
    JwtPayloadBadJson,
    JwtIssNotString,
    JwtSubNotString,
    JwtIatNotInteger,
    JwtIatOutOfRange,
    JwtNbfNotInteger,
    JwtNbfOutOfRange,
    JwtExpNotInteger,
    JwtExpOutOfRange,
    JwtJtiNotString,
    JwtAudNotString,
    JwtSignatureBadBase64,
    JwtEd25519SignatureWrongLength,
    JwtUnknownIssuer,
    JwtAudienceNotAllowed,
    JwtVerificationFail,
    JwksNoValidKeys,
    JwksKidAlgMismatch,
    JwksFetchFail,
}

impl Failure {
    /// The response body Envoy sends (no trailing newline).
    pub fn body(self) -> &'static str {
        match self {
            Failure::JwtMissed => "Jwt is missing",
            Failure::JwtNotYetValid => "Jwt not yet valid",
            Failure::JwtExpired => "Jwt is expired",
            Failure::JwtBadFormat => {
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            }
            Failure::JwtHeaderBadBase64 => "Jwt header is an invalid Base64url encoded",
            Failure::JwtHeaderBadJson => "Jwt header is an invalid JSON",
            Failure::JwtHeaderBadAlg => "Jwt header [alg] field is required and must be a string",
            Failure::JwtHeaderNotImplementedAlg => "Jwt header [alg] is not supported",
            Failure::JwtHeaderBadKid => "Jwt header [kid] field is not a string",
            Failure::JwtPayloadBadBase64 => "Jwt payload is an invalid Base64url encoded",
            Failure::JwtPayloadBadJson => "Jwt payload is an invalid JSON",
            Failure::JwtIssNotString => "Jwt payload [iss] field is not a string",
            Failure::JwtSubNotString => "Jwt payload [sub] field is not a string",
            Failure::JwtIatNotInteger => "Jwt payload [iat] field is not an integer",
            Failure::JwtIatOutOfRange => "Jwt payload [iat] field is not a positive 64 bit integer",
            Failure::JwtNbfNotInteger => "Jwt payload [nbf] field is not an integer",
            Failure::JwtNbfOutOfRange => "Jwt payload [nbf] field is not a positive 64 bit integer",
            Failure::JwtExpNotInteger => "Jwt payload [exp] field is not an integer",
            Failure::JwtExpOutOfRange => "Jwt payload [exp] field is not a positive 64 bit integer",
            Failure::JwtJtiNotString => "Jwt payload [jti] field is not a string",
            Failure::JwtAudNotString => "Jwt payload [aud] field is not a string or string list",
            Failure::JwtSignatureBadBase64 => "Jwt signature is an invalid Base64url encoded",
            Failure::JwtEd25519SignatureWrongLength => "Jwt ED25519 signature is wrong length",
            Failure::JwtUnknownIssuer => "Jwt issuer is not configured",
            Failure::JwtAudienceNotAllowed => "Audiences in Jwt are not allowed",
            Failure::JwtVerificationFail => "Jwt verification fails",
            Failure::JwksNoValidKeys => "Jwks doesn't have any valid public key",
            Failure::JwksKidAlgMismatch => "Jwks doesn't have key to match kid or alg from Jwt",
            Failure::JwksFetchFail => "Jwks remote fetch is failed",
        }
    }

    /// Envoy answers 403 for a disallowed audience and 401 for everything else
    /// (`Filter::onComplete` in `jwt_authn/filter.cc`).
    pub fn status(self) -> StatusCode {
        match self {
            Failure::JwtAudienceNotAllowed => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// A short stable name for access logs and metric labels.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::JwtMissed => "jwt_missing",
            Failure::JwtNotYetValid => "jwt_not_yet_valid",
            Failure::JwtExpired => "jwt_expired",
            Failure::JwtUnknownIssuer => "jwt_unknown_issuer",
            Failure::JwtAudienceNotAllowed => "jwt_audience_not_allowed",
            Failure::JwtVerificationFail => "jwt_verification_fail",
            Failure::JwksNoValidKeys => "jwks_no_valid_keys",
            Failure::JwksKidAlgMismatch => "jwks_kid_alg_mismatch",
            Failure::JwksFetchFail => "jwks_fetch_fail",
            _ => "jwt_malformed",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.body())
    }
}

impl std::error::Error for Failure {}

/// A request refused by RequestAuthentication. The caller answers it locally with
/// [`AuthnError::status`], [`AuthnError::body`] and a `www-authenticate` header
/// ([`AuthnError::www_authenticate`]), or all at once with [`AuthnError::response`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request authentication failed: {failure} (realm {realm})")]
pub struct AuthnError {
    failure: Failure,
    realm: String,
}

impl AuthnError {
    pub(crate) fn new(failure: Failure, realm: String) -> Self {
        AuthnError { failure, realm }
    }

    pub fn failure(&self) -> Failure {
        self.failure
    }

    /// 401, or 403 for "Audiences in Jwt are not allowed" (as Envoy).
    pub fn status(&self) -> StatusCode {
        self.failure.status()
    }

    /// Envoy's body text, e.g. `Jwt is expired`.
    pub fn body(&self) -> &'static str {
        self.failure.body()
    }

    /// `Bearer realm="<scheme>://<host><path>", error="invalid_token"`, as Envoy sets it.
    pub fn www_authenticate(&self) -> String {
        if self.failure == Failure::JwtMissed {
            format!("Bearer realm=\"{}\"", self.realm)
        } else {
            format!("Bearer realm=\"{}\", error=\"invalid_token\"", self.realm)
        }
    }

    /// The local reply: status, `content-type: text/plain`, `www-authenticate`, the body.
    pub fn response(&self) -> http::Response<String> {
        let mut resp = http::Response::new(self.body().to_string());
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        // The realm comes from request headers that were valid header values already; a
        // value that still does not fit is left out rather than failing the reply.
        if let Ok(v) = HeaderValue::from_str(&self.www_authenticate()) {
            h.insert(http::header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}

/// A RequestAuthentication that cannot be applied. Every error names the object and the
/// field, like `kubectl apply` would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("RequestAuthentication {object}: {field}: {message}")]
pub struct ConfigError {
    /// `namespace/name`.
    pub object: String,
    /// The field path, e.g. `spec.jwtRules[0].jwksUri`.
    pub field: String,
    pub message: String,
}

/// A rule that was accepted but will refuse every token it is asked to check (Envoy logs
/// these and keeps going, failing closed), e.g. an inline `jwks` without a usable key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("RequestAuthentication {object}: {field}: {message}")]
pub struct ConfigWarning {
    pub object: String,
    pub field: String,
    pub message: String,
}
