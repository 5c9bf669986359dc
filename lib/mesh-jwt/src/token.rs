//! Parsing a compact JWS token into its header fields, claims and signature, with the checks
//! and failure names of Envoy's `Jwt::parseFromString` (in order: shape, header Base64url and
//! JSON, `alg`, `kid`, payload Base64url and JSON, registered claims' types, signature
//! Base64url). No key is involved here and nothing is trusted yet.
//!
//! As in Envoy, empty sections are skipped when splitting at `.` (so `a.b.` has two sections
//! and `a..b.c` three), and the signed text is rebuilt as `header.payload`.
//!
//! Base64url is decoded strictly: padding optional (as Envoy accepts both), but non-zero
//! trailing bits are refused, so two different encodings never decode to the same bytes and
//! any change to a token's text changes what is verified.

use base64::{
    Engine,
    alphabet::URL_SAFE,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use serde_json::{Map, Value};

use crate::error::Failure;

const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(false),
);

pub(crate) fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    B64URL.decode(s).ok()
}

/// The signature algorithms Envoy implements (`isImplemented` in `jwt.cc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    ES512,
    HS256,
    HS384,
    HS512,
    EdDSA,
}

impl Alg {
    fn parse(s: &str) -> Option<Alg> {
        Some(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "ES512" => Alg::ES512,
            "HS256" => Alg::HS256,
            "HS384" => Alg::HS384,
            "HS512" => Alg::HS512,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::RS384 => "RS384",
            Alg::RS512 => "RS512",
            Alg::PS256 => "PS256",
            Alg::PS384 => "PS384",
            Alg::PS512 => "PS512",
            Alg::ES256 => "ES256",
            Alg::ES384 => "ES384",
            Alg::ES512 => "ES512",
            Alg::HS256 => "HS256",
            Alg::HS384 => "HS384",
            Alg::HS512 => "HS512",
            Alg::EdDSA => "EdDSA",
        }
    }
}

/// A token that parsed; its signature is not checked yet.
#[derive(Debug, Clone)]
pub(crate) struct Token<'a> {
    /// `header.payload`: the signed bytes.
    pub signed: String,
    pub payload_b64: &'a str,
    pub alg: Alg,
    /// Empty when absent (Envoy's convention).
    pub kid: String,
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    /// 0 when absent.
    pub exp: u64,
    /// 0 when absent.
    pub nbf: u64,
    pub claims: Map<String, Value>,
    pub signature: Vec<u8>,
}

fn object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

fn opt_string(m: &Map<String, Value>, key: &str, bad: Failure) -> Result<String, Failure> {
    match m.get(key) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad),
    }
}

/// Envoy's `StructUtils::GetUInt64`: any JSON number in `0..2^64` (fractions truncated).
fn opt_u64(
    m: &Map<String, Value>,
    key: &str,
    not_int: Failure,
    range: Failure,
) -> Result<u64, Failure> {
    match m.get(key) {
        None => Ok(0),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                return Ok(u);
            }
            match n.as_f64() {
                Some(f) if (0.0..18_446_744_073_709_551_616.0).contains(&f) => Ok(f as u64),
                _ => Err(range),
            }
        }
        Some(_) => Err(not_int),
    }
}

fn audiences(m: &Map<String, Value>) -> Result<Vec<String>, Failure> {
    match m.get("aud") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(Failure::JwtAudNotString),
        Some(_) => Err(Failure::JwtAudNotString),
    }
}

/// Parse `raw` the way Envoy does; the first failing check names the failure.
pub(crate) fn parse(raw: &str) -> Result<Token<'_>, Failure> {
    // Envoy splits with `absl::SkipEmpty()`: empty sections do not count.
    let mut parts = raw.split('.').filter(|p| !p.is_empty());
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Failure::JwtBadFormat);
    };
    let header_bytes = b64url_decode(h).ok_or(Failure::JwtHeaderBadBase64)?;
    let header = object(&header_bytes).ok_or(Failure::JwtHeaderBadJson)?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) => Alg::parse(a).ok_or(Failure::JwtHeaderNotImplementedAlg)?,
        _ => return Err(Failure::JwtHeaderBadAlg),
    };
    let kid = opt_string(&header, "kid", Failure::JwtHeaderBadKid)?;

    let payload_bytes = b64url_decode(p).ok_or(Failure::JwtPayloadBadBase64)?;
    let claims = object(&payload_bytes).ok_or(Failure::JwtPayloadBadJson)?;
    let iss = opt_string(&claims, "iss", Failure::JwtIssNotString)?;
    let sub = opt_string(&claims, "sub", Failure::JwtSubNotString)?;
    opt_u64(
        &claims,
        "iat",
        Failure::JwtIatNotInteger,
        Failure::JwtIatOutOfRange,
    )?;
    let nbf = opt_u64(
        &claims,
        "nbf",
        Failure::JwtNbfNotInteger,
        Failure::JwtNbfOutOfRange,
    )?;
    let exp = opt_u64(
        &claims,
        "exp",
        Failure::JwtExpNotInteger,
        Failure::JwtExpOutOfRange,
    )?;
    opt_string(&claims, "jti", Failure::JwtJtiNotString)?;
    let aud = audiences(&claims)?;

    let signature = b64url_decode(s).ok_or(Failure::JwtSignatureBadBase64)?;
    Ok(Token {
        signed: format!("{h}.{p}"),
        payload_b64: p,
        alg,
        kid,
        iss,
        sub,
        aud,
        exp,
        nbf,
        claims,
        signature,
    })
}

/// Envoy's `verifyTimeConstraint`: not before `nbf - skew`, not after `exp + skew`;
/// `exp` absent (0) never expires.
pub(crate) fn check_time(t: &Token<'_>, now: u64, skew: u64) -> Result<(), Failure> {
    if now.saturating_add(skew) < t.nbf {
        return Err(Failure::JwtNotYetValid);
    }
    if t.exp != 0 && now > t.exp.saturating_add(skew) {
        return Err(Failure::JwtExpired);
    }
    Ok(())
}

/// Envoy's `CheckAudience`: audiences compare without an `http://`/`https://` prefix and
/// without a trailing `/`; no configured audiences allow any token.
pub(crate) fn sanitize_audience(a: &str) -> &str {
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("https://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn enc(v: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn tok(header: &str, payload: &str) -> String {
        format!("{}.{}.{}", enc(header), enc(payload), enc("sig"))
    }

    #[test_case("a.b", Failure::JwtBadFormat ; "two parts")]
    #[test_case("a.b.c.d", Failure::JwtBadFormat ; "four parts")]
    #[test_case("!!.e30.c2ln", Failure::JwtHeaderBadBase64 ; "header base64")]
    #[test_case(&format!("{}.e30.c2ln", enc("not json")), Failure::JwtHeaderBadJson ; "header json")]
    #[test_case(&format!("{}.e30.c2ln", enc("[1]")), Failure::JwtHeaderBadJson ; "header not an object")]
    #[test_case(&tok("{}", "{}"), Failure::JwtHeaderBadAlg ; "alg missing")]
    #[test_case(&tok(r#"{"alg":1}"#, "{}"), Failure::JwtHeaderBadAlg ; "alg not a string")]
    #[test_case(&tok(r#"{"alg":"none"}"#, "{}"), Failure::JwtHeaderNotImplementedAlg ; "alg none")]
    #[test_case(&tok(r#"{"alg":"RS256","kid":7}"#, "{}"), Failure::JwtHeaderBadKid ; "kid not a string")]
    #[test_case(&format!("{}.!!.c2ln", enc(r#"{"alg":"RS256"}"#)), Failure::JwtPayloadBadBase64 ; "payload base64")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, "nope"), Failure::JwtPayloadBadJson ; "payload json")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"iss":1}"#), Failure::JwtIssNotString ; "iss type")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"sub":[]}"#), Failure::JwtSubNotString ; "sub type")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"iat":"1"}"#), Failure::JwtIatNotInteger ; "iat type")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"nbf":-1}"#), Failure::JwtNbfOutOfRange ; "nbf negative")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"exp":true}"#), Failure::JwtExpNotInteger ; "exp type")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"jti":1}"#), Failure::JwtJtiNotString ; "jti type")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"aud":[1]}"#), Failure::JwtAudNotString ; "aud list type")]
    #[test_case(&tok(r#"{"alg":"RS256"}"#, r#"{"aud":{}}"#), Failure::JwtAudNotString ; "aud type")]
    #[test_case(&format!("{}.{}.!!", enc(r#"{"alg":"RS256"}"#), enc("{}")), Failure::JwtSignatureBadBase64 ; "signature base64")]
    #[test_case("a.b.", Failure::JwtBadFormat ; "empty signature section is skipped")]
    fn parse_failures(raw: &str, want: Failure) {
        assert_eq!(parse(raw).unwrap_err(), want);
    }

    #[test]
    fn parses_registered_claims() {
        let raw = tok(
            r#"{"alg":"ES256","kid":"k1"}"#,
            r#"{"iss":"i","sub":"s","aud":["a","b"],"exp":10,"nbf":5.5,"x":{"y":1}}"#,
        );
        let t = parse(&raw).unwrap();
        assert_eq!((t.alg, t.kid.as_str()), (Alg::ES256, "k1"));
        assert_eq!((t.iss.as_str(), t.sub.as_str()), ("i", "s"));
        assert_eq!(t.aud, ["a", "b"]);
        assert_eq!((t.exp, t.nbf), (10, 5));
        assert_eq!(t.signature, b"sig");
        assert!(raw.starts_with(&t.signed));
        assert_eq!(t.claims["x"]["y"], 1);
    }

    #[test]
    fn padded_base64url_is_accepted_and_trailing_bits_are_not() {
        let h = base64::engine::general_purpose::URL_SAFE.encode(r#"{"alg": "RS256"}"#);
        assert!(h.ends_with('='));
        assert!(parse(&format!("{h}.e30.c2ln")).is_ok());
        // Three characters carry 2 bytes and 2 spare bits: "c2k" has them zero, "c2l" not.
        assert!(b64url_decode("c2k").is_some());
        assert!(b64url_decode("c2l").is_none());
    }

    #[test_case(100, 0, 100, Ok(()) ; "no claims")]
    #[test_case(100, 160, 0, Ok(()) ; "nbf within skew")]
    #[test_case(100, 161, 0, Err(Failure::JwtNotYetValid) ; "nbf beyond skew")]
    #[test_case(100, 0, 40, Ok(()) ; "exp within skew")]
    #[test_case(101, 0, 40, Err(Failure::JwtExpired) ; "exp beyond skew")]
    fn time_constraints(now: u64, nbf: u64, exp: u64, want: Result<(), Failure>) {
        let raw = tok(
            r#"{"alg":"RS256"}"#,
            &format!(r#"{{"nbf":{nbf},"exp":{exp}}}"#),
        );
        let t = parse(&raw).unwrap();
        assert_eq!(check_time(&t, now, 60), want);
    }

    #[test_case("https://a.example/", "a.example")]
    #[test_case("http://a", "a")]
    #[test_case("a/", "a")]
    #[test_case("spiffe://x", "spiffe://x")]
    fn audience_sanitizing(a: &str, want: &str) {
        assert_eq!(sanitize_audience(a), want);
    }
}
