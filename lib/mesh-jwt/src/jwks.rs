//! JSON Web Key Sets: parsing (key material through `jsonwebtoken::jwk`) and signature
//! checks on aws-lc-rs, with the key selection of Envoy's `verifyJwtWithoutTimeChecking`:
//!
//! - a key whose `kid` differs from the token's is skipped (when both have one);
//! - a key whose `alg` differs from the token's is skipped (when the key has one);
//! - any remaining key that verifies the signature accepts the token;
//! - none remaining: "Jwks doesn't have key to match kid or alg from Jwt"; some remaining
//!   but none verifies: "Jwt verification fails".
//!
//! A key that cannot be used (unknown `kty`, bad numbers, unsupported curve) is skipped with a
//! debug log, as Envoy does; a set left without any key is an error.

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk},
};
use serde_json::Value;

use crate::{
    error::Failure,
    token::{Alg, Token, b64url_decode},
};

/// Why a JWKS document is unusable (Envoy's JWKS status texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("Jwks is an invalid JSON")]
    ParseError,
    #[error("Jwks does not have [keys] field")]
    NoKeys,
    #[error("[keys] in Jwks is not an array")]
    BadKeys,
    #[error("Jwks doesn't have any valid public key")]
    NoValidKeys,
}

#[derive(Debug)]
enum Material {
    /// Verified by `jsonwebtoken`'s aws-lc-rs provider.
    Jwt(DecodingKey, Family),
    /// ES512 (P-521), which `jsonwebtoken` does not offer: an uncompressed point for aws-lc-rs.
    P521(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec(Curve),
    Okp,
    Oct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

#[derive(Debug)]
struct Key {
    kid: String,
    alg: String,
    material: Material,
}

/// The usable keys of one JWKS document.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parse a JWKS document (`{"keys": [...]}`).
    pub fn parse(text: &str) -> Result<KeySet, JwksError> {
        let doc: Value = serde_json::from_str(text).map_err(|_| JwksError::ParseError)?;
        let Value::Object(doc) = doc else {
            return Err(JwksError::ParseError);
        };
        let list = match doc.get("keys") {
            None => return Err(JwksError::NoKeys),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(JwksError::BadKeys),
        };
        let keys: Vec<Key> = list
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match key(v) {
                Ok(k) => Some(k),
                Err(why) => {
                    tracing::debug!(index = i, reason = why, "JWKS key skipped");
                    None
                }
            })
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoValidKeys);
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Check the token's signature against the set.
    pub(crate) fn verify(&self, t: &Token<'_>) -> Result<(), Failure> {
        let mut matched = false;
        for k in &self.keys {
            if !t.kid.is_empty() && !k.kid.is_empty() && k.kid != t.kid {
                continue;
            }
            if !k.alg.is_empty() && k.alg != t.alg.as_str() {
                continue;
            }
            matched = true;
            // Envoy answers a wrong-length Ed25519 signature at once, keys left or not.
            if t.alg == Alg::EdDSA
                && matches!(k.material, Material::Jwt(_, Family::Okp))
                && t.signature.len() != 64
            {
                return Err(Failure::JwtEd25519SignatureWrongLength);
            }
            if k.verifies(t) {
                return Ok(());
            }
        }
        Err(if matched {
            Failure::JwtVerificationFail
        } else {
            Failure::JwksKidAlgMismatch
        })
    }
}

fn key(v: &Value) -> Result<Key, &'static str> {
    let Value::Object(m) = v else {
        return Err("not an object");
    };
    let text = |k: &str| match m.get(k) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("kid or alg is not a string"),
    };
    let (kid, alg) = (text("kid")?, text("alg")?);
    let jwk: Jwk = serde_json::from_value(v.clone()).map_err(|_| "not a supported JWK")?;
    let material = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P521 => {
            let (x, y) = (
                b64url_decode(&p.x).ok_or("EC x is not Base64url")?,
                b64url_decode(&p.y).ok_or("EC y is not Base64url")?,
            );
            if x.len() != 66 || y.len() != 66 {
                return Err("EC P-521 coordinates have the wrong length");
            }
            let mut point = Vec::with_capacity(133);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Material::P521(point)
        }
        params => {
            let family = match params {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => Family::Ec(Curve::P256),
                    EllipticCurve::P384 => Family::Ec(Curve::P384),
                    _ => return Err("unsupported EC curve"),
                },
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    Family::Okp
                }
                AlgorithmParameters::OctetKeyPair(_) => return Err("unsupported OKP curve"),
                AlgorithmParameters::OctetKey(_) => Family::Oct,
                _ => return Err("unsupported kty"),
            };
            let dk = DecodingKey::from_jwk(&jwk).map_err(|_| "bad key material")?;
            Material::Jwt(dk, family)
        }
    };
    Ok(Key { kid, alg, material })
}

impl Key {
    fn verifies(&self, t: &Token<'_>) -> bool {
        match (&self.material, t.alg) {
            (Material::P521(point), Alg::ES512) => {
                use aws_lc_rs::signature::{ECDSA_P521_SHA512_FIXED, UnparsedPublicKey};
                UnparsedPublicKey::new(&ECDSA_P521_SHA512_FIXED, point)
                    .verify(t.signed.as_bytes(), &t.signature)
                    .is_ok()
            }
            (Material::P521(_), _) => false,
            (Material::Jwt(key, family), alg) => {
                let Some(a) = jwt_alg(alg, *family) else {
                    return false;
                };
                let sig = base64::Engine::encode(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                    &t.signature,
                );
                matches!(
                    jsonwebtoken::crypto::verify(&sig, t.signed.as_bytes(), key, a),
                    Ok(true)
                )
            }
        }
    }
}

/// The `jsonwebtoken` algorithm for a token algorithm, if the key's family can check it.
fn jwt_alg(alg: Alg, family: Family) -> Option<Algorithm> {
    Some(match (alg, family) {
        (Alg::RS256, Family::Rsa) => Algorithm::RS256,
        (Alg::RS384, Family::Rsa) => Algorithm::RS384,
        (Alg::RS512, Family::Rsa) => Algorithm::RS512,
        (Alg::PS256, Family::Rsa) => Algorithm::PS256,
        (Alg::PS384, Family::Rsa) => Algorithm::PS384,
        (Alg::PS512, Family::Rsa) => Algorithm::PS512,
        (Alg::ES256, Family::Ec(Curve::P256)) => Algorithm::ES256,
        (Alg::ES384, Family::Ec(Curve::P384)) => Algorithm::ES384,
        (Alg::EdDSA, Family::Okp) => Algorithm::EdDSA,
        (Alg::HS256, Family::Oct) => Algorithm::HS256,
        (Alg::HS384, Family::Oct) => Algorithm::HS384,
        (Alg::HS512, Family::Oct) => Algorithm::HS512,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    #[test_case("nope", JwksError::ParseError ; "not json")]
    #[test_case("[]", JwksError::ParseError ; "not an object")]
    #[test_case("{}", JwksError::NoKeys ; "no keys")]
    #[test_case(r#"{"keys":{}}"#, JwksError::BadKeys ; "keys not a list")]
    #[test_case(r#"{"keys":[]}"#, JwksError::NoValidKeys ; "empty")]
    #[test_case(r#"{"keys":[{"kty":"XYZ"},{"kty":"RSA","n":"!","e":"AQAB"},{"kty":"OKP","crv":"X25519","x":"AA"}]}"#, JwksError::NoValidKeys ; "only unusable keys")]
    fn jwks_errors(text: &str, want: JwksError) {
        assert_eq!(KeySet::parse(text).unwrap_err(), want);
    }

    #[test]
    fn unusable_keys_are_skipped() {
        let text = r#"{"keys":[{"kty":"XYZ"},{"kty":"oct","k":"c2VjcmV0","kid":"h"}]}"#;
        assert_eq!(KeySet::parse(text).unwrap().len(), 1);
    }
}
