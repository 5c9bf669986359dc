//! Test keys and token signing, independent of the crate under test: keys are generated and
//! tokens signed with aws-lc-rs directly; JWKs are written by hand from the public parts.

use std::sync::{Arc, OnceLock};

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::KeySize,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use mesh_policy::model::{ClaimToHeader, JwtHeader, JwtRule, ObjectMeta, RequestAuthentication};
use serde_json::{Value, json};

pub fn b64(b: impl AsRef<[u8]>) -> String {
    B64.encode(b)
}

pub enum Key {
    Rsa(Arc<RsaKeyPair>),
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
    Hmac(Vec<u8>),
}

fn rsa() -> Arc<RsaKeyPair> {
    static K: OnceLock<Arc<RsaKeyPair>> = OnceLock::new();
    K.get_or_init(|| Arc::new(RsaKeyPair::generate(KeySize::Rsa2048).unwrap()))
        .clone()
}

impl Key {
    pub fn rsa() -> Key {
        // One RSA key per process: generation is the slow part.
        Key::Rsa(rsa())
    }
    pub fn p256() -> Key {
        Key::Ec(
            EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap(),
            "P-256",
        )
    }
    pub fn p384() -> Key {
        Key::Ec(
            EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).unwrap(),
            "P-384",
        )
    }
    pub fn p521() -> Key {
        Key::Ec(
            EcdsaKeyPair::generate(&signature::ECDSA_P521_SHA512_FIXED_SIGNING).unwrap(),
            "P-521",
        )
    }
    pub fn hmac() -> Key {
        Key::Hmac(b"a shared secret of thirty-two b.".to_vec())
    }
    pub fn ed25519() -> Key {
        Key::Ed(Ed25519KeyPair::generate().unwrap())
    }

    /// The public JWK, with `kid` (and `alg` if given).
    pub fn jwk(&self, kid: &str, alg: Option<&str>) -> Value {
        let mut v = match self {
            Key::Rsa(k) => {
                let p = k.public_key();
                json!({"kty": "RSA", "n": b64(p.modulus().big_endian_without_leading_zero()),
                       "e": b64(p.exponent().big_endian_without_leading_zero())})
            }
            Key::Ec(k, crv) => {
                let point = k.public_key().as_ref();
                let (x, y) = point[1..].split_at((point.len() - 1) / 2);
                json!({"kty": "EC", "crv": crv, "x": b64(x), "y": b64(y)})
            }
            Key::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key().as_ref())})
            }
            Key::Hmac(secret) => json!({"kty": "oct", "k": b64(secret)}),
        };
        v["kid"] = json!(kid);
        if let Some(a) = alg {
            v["alg"] = json!(a);
        }
        v
    }

    /// A compact JWS of `claims` with header `{"alg", "kid"}`.
    pub fn sign(&self, alg: &str, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": alg, "typ": "JWT"});
        if let Some(k) = kid {
            header["kid"] = json!(k);
        }
        let signed = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
        let sig = self.raw_sign(alg, signed.as_bytes());
        format!("{signed}.{}", b64(sig))
    }

    fn raw_sign(&self, alg: &str, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Key::Rsa(k) => {
                let enc: &'static dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => panic!("{alg} is not an RSA algorithm"),
                };
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(enc, &rng, msg, &mut sig).unwrap();
                sig
            }
            Key::Ec(k, _) => k.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Key::Ed(k) => k.sign(msg).as_ref().to_vec(),
            Key::Hmac(secret) => {
                use aws_lc_rs::hmac;
                let alg = match alg {
                    "HS256" => hmac::HMAC_SHA256,
                    "HS384" => hmac::HMAC_SHA384,
                    "HS512" => hmac::HMAC_SHA512,
                    _ => panic!("{alg} is not an HMAC algorithm"),
                };
                hmac::sign(&hmac::Key::new(alg, secret), msg)
                    .as_ref()
                    .to_vec()
            }
        }
    }
}

pub fn jwks(keys: &[Value]) -> String {
    json!({"keys": keys}).to_string()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims valid for an hour from `iss`, subject `alice`.
pub fn claims(iss: &str) -> Value {
    json!({"iss": iss, "sub": "alice", "iat": now(), "exp": now() + 3600})
}

pub const ISS: &str = "https://issuer.example";

/// A rule for `ISS` with the given inline JWKS.
pub fn rule(jwks: &str) -> JwtRule {
    JwtRule {
        issuer: ISS.into(),
        jwks: jwks.into(),
        ..Default::default()
    }
}

pub fn header(name: &str, prefix: &str) -> JwtHeader {
    JwtHeader {
        name: name.into(),
        prefix: prefix.into(),
    }
}

pub fn claim_header(header: &str, claim: &str) -> ClaimToHeader {
    ClaimToHeader {
        header: header.into(),
        claim: claim.into(),
    }
}

pub fn ra(name: &str, rules: Vec<JwtRule>) -> RequestAuthentication {
    let mut r = RequestAuthentication {
        meta: ObjectMeta {
            name: name.into(),
            namespace: Some("foo".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    r.spec.jwt_rules = rules;
    r
}
