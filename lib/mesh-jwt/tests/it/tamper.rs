//! Any single-byte change to a signed token is refused (never accepted, never taken for
//! "no token"): strict Base64url plus signature checks over the exact received text.

use std::sync::OnceLock;

use http::HeaderMap;
use mesh_jwt::Authenticator;
use proptest::prelude::*;

use crate::keys::*;

struct Fixture {
    authn: Authenticator,
    tokens: Vec<String>,
    rt: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (ec, ed, rsa) = (Key::p256(), Key::ed25519(), Key::rsa());
        let set = jwks(&[ec.jwk("ec", None), ed.jwk("ed", None), rsa.jwk("rsa", None)]);
        let c = claims(ISS);
        Fixture {
            authn: Authenticator::new(&[ra("r", vec![rule(&set)])]).unwrap(),
            tokens: vec![
                ec.sign("ES256", Some("ec"), &c),
                ed.sign("EdDSA", Some("ed"), &c),
                rsa.sign("RS256", Some("rsa"), &c),
                rsa.sign("PS256", None, &c),
            ],
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    })
}

fn outcome(token: &str) -> Result<bool, String> {
    let f = fixture();
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "bad header".to_string())?,
    );
    f.rt.block_on(f.authn.authenticate(&mut h, &"/".parse().unwrap()))
        .map(|j| j.is_some())
        .map_err(|e| e.body().to_string())
}

#[test]
fn untampered_tokens_are_accepted() {
    for t in &fixture().tokens {
        assert_eq!(outcome(t), Ok(true));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn any_single_byte_tamper_is_rejected(which in 0usize..4, pos in any::<prop::sample::Index>(), byte in 0x21u8..0x7f) {
        let t = &fixture().tokens[which];
        let i = pos.index(t.len());
        prop_assume!(t.as_bytes()[i] != byte);
        let mut b = t.as_bytes().to_vec();
        b[i] = byte;
        let tampered = String::from_utf8(b).unwrap();
        let got = outcome(&tampered);
        prop_assert!(got.is_err(), "tampered token at {} ({:?}) gave {:?}", i, byte as char, got);
    }
}
