//! TLS 1.3 AES-GCM record protection backed by ring, for CPUs where ring's AES-GCM is the
//! fast one.
//!
//! Bulk tunnel traffic spends most of its crypto time sealing and opening 16 KiB records.
//! On x86-64 CPUs with VAES and VPCLMULQDQ but without AVX-512 (AMD Zen 3/4 and others),
//! ring 0.17 has a VAES-AVX2 AES-GCM and aws-lc 0.47 falls back to its AVX (AES-NI) code:
//! sealing 16 KiB records on one core ran at 5.0-6.5 GB/s with ring and 2.3-3.5 GB/s with
//! aws-lc on such a machine. With AVX-512, aws-lc's AVX-512 code is used as before.
//!
//! Only the AEAD changes: the suites keep aws-lc's hash and HKDF (from its own suite
//! definitions), and key exchange and signatures stay aws-lc's. The wire format is the
//! standard TLS 1.3 record protection (RFC 8446 §5.2-5.3), so either end may use either.

use std::sync::OnceLock;

use ring::aead;
use rustls::{
    ContentType, Error, ProtocolVersion, SupportedCipherSuite, Tls13CipherSuite,
    crypto::aws_lc_rs::cipher_suite,
    crypto::cipher::{
        AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter,
        Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm,
        UnsupportedOperationError, make_tls13_aad,
    },
};

/// Whether this CPU runs ring's VAES-AVX2 AES-GCM and lacks the AVX-512 one aws-lc uses.
pub fn ring_aes_gcm_is_faster() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("avx2")
            && !std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The mesh's two TLS 1.3 suites, AES-128-GCM first, with ring's AEAD.
pub fn ring_suites() -> Vec<SupportedCipherSuite> {
    static SUITES: OnceLock<[&'static Tls13CipherSuite; 2]> = OnceLock::new();
    let [a, b] = SUITES.get_or_init(|| {
        [
            with_ring(cipher_suite::TLS13_AES_128_GCM_SHA256, &RING_AES_128_GCM),
            with_ring(cipher_suite::TLS13_AES_256_GCM_SHA384, &RING_AES_256_GCM),
        ]
    });
    vec![
        SupportedCipherSuite::Tls13(a),
        SupportedCipherSuite::Tls13(b),
    ]
}

/// aws-lc's definition of `suite` with its AEAD replaced.
fn with_ring(
    suite: SupportedCipherSuite,
    aead_alg: &'static dyn Tls13AeadAlgorithm,
) -> &'static Tls13CipherSuite {
    // TLS 1.2 suites exist only when another crate enables rustls' `tls12` feature.
    #[allow(unreachable_patterns)]
    let s = match suite {
        SupportedCipherSuite::Tls13(s) => s,
        _ => unreachable!("aws-lc's TLS13_* suites are TLS 1.3 suites"),
    };
    // Built once per process (see `ring_suites`), so the two leaked suites are not a leak.
    Box::leak(Box::new(Tls13CipherSuite {
        common: rustls::CipherSuiteCommon {
            suite: s.common.suite,
            hash_provider: s.common.hash_provider,
            confidentiality_limit: s.common.confidentiality_limit,
        },
        hkdf_provider: s.hkdf_provider,
        aead_alg,
        quic: s.quic,
    }))
}

static RING_AES_128_GCM: RingAesGcm = RingAesGcm(&aead::AES_128_GCM);
static RING_AES_256_GCM: RingAesGcm = RingAesGcm(&aead::AES_256_GCM);

struct RingAesGcm(&'static aead::Algorithm);

impl RingAesGcm {
    fn key(&self, key: &AeadKey) -> aead::LessSafeKey {
        // rustls hands over exactly `key_len()` bytes.
        let unbound = aead::UnboundKey::new(self.0, key.as_ref())
            .unwrap_or_else(|_| unreachable!("rustls passes a key of key_len() bytes"));
        aead::LessSafeKey::new(unbound)
    }
}

impl Tls13AeadAlgorithm for RingAesGcm {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Encrypter {
            key: self.key(&key),
            iv,
        })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Decrypter {
            key: self.key(&key),
            iv,
        })
    }

    fn key_len(&self) -> usize {
        self.0.key_len()
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<rustls::ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok(if self.0.key_len() == 16 {
            rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        } else {
            rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        })
    }
}

struct Encrypter {
    key: aead::LessSafeKey,
    iv: Iv,
}

impl MessageEncrypter for Encrypter {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        // TLSInnerPlaintext: content, the real content type, no padding; then the tag.
        let total = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total);
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls13_aad(total));
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        self.key
            .seal_in_place_append_tag(nonce, aad, &mut payload)
            .map_err(|_| Error::EncryptError)?;
        // TLS 1.3 records say application data and TLS 1.2 outside (RFC 8446 §5.1).
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + self.key.algorithm().tag_len()
    }
}

struct Decrypter {
    key: aead::LessSafeKey,
    iv: Iv,
}

impl MessageDecrypter for Decrypter {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < self.key.algorithm().tag_len() {
            return Err(Error::DecryptError);
        }
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain = self
            .key
            .open_in_place(nonce, aad, payload)
            .map_err(|_| Error::DecryptError)?
            .len();
        payload.truncate(plain);
        msg.into_tls13_unpadded_message()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::{sync::Arc, time::Duration};

    use rustls::{ClientConnection, ConnectionCommon, ServerConnection, pki_types::ServerName};

    use crate::{
        TrustPolicy,
        ca::LocalCa,
        config::{client_config_with, server_config_with},
        provider_for,
    };

    /// Moves `from`'s pending records to `to`; whether there were any.
    fn flush<A, B>(from: &mut ConnectionCommon<A>, to: &mut ConnectionCommon<B>) -> bool {
        let mut moved = false;
        while from.wants_write() {
            let mut buf = Vec::new();
            from.write_tls(&mut buf).unwrap();
            let mut r = buf.as_slice();
            while !r.is_empty() {
                to.read_tls(&mut r).unwrap();
                to.process_new_packets().unwrap();
            }
            moved = true;
        }
        moved
    }

    /// Moves every pending record from one side to the other until neither has more.
    fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
        for _ in 0..64 {
            let to_server = flush(c, s);
            if !(flush(s, c) || to_server) {
                return;
            }
        }
    }

    fn read_all(r: &mut dyn std::io::Read, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            got += r.read(&mut out[got..]).unwrap();
        }
        out
    }

    /// Either end may protect records with either library: same suite, same bytes on the wire.
    #[test]
    fn ring_and_aws_lc_record_protection_interoperate() {
        let ca = LocalCa::generate("cluster.local").unwrap();
        let ttl = Duration::from_secs(3600);
        let client_id = "spiffe://cluster.local/ns/a/sa/client".parse().unwrap();
        let server_id: mesh_core::Identity =
            "spiffe://cluster.local/ns/b/sa/server".parse().unwrap();
        let cc = ca.issue(&client_id, ttl).unwrap();
        let sc = ca.issue(&server_id, ttl).unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
        for (client_ring, server_ring) in [(true, false), (false, true), (true, true)] {
            let ccfg = client_config_with(&cc, vec![server_id.clone()], provider_for(client_ring))
                .unwrap();
            let scfg = server_config_with(
                &sc,
                TrustPolicy::new("cluster.local"),
                provider_for(server_ring),
            )
            .unwrap();
            let mut c =
                ClientConnection::new(Arc::new(ccfg), ServerName::try_from("10.0.0.1").unwrap())
                    .unwrap();
            let mut s = ServerConnection::new(Arc::new(scfg)).unwrap();
            pump(&mut c, &mut s);
            assert!(!c.is_handshaking() && !s.is_handshaking());
            assert_eq!(
                c.negotiated_cipher_suite().map(|x| x.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
            let mut got = Vec::new();
            for chunk in big.chunks(8192) {
                std::io::Write::write_all(&mut c.writer(), chunk).unwrap();
                pump(&mut c, &mut s);
                got.extend(read_all(&mut s.reader(), chunk.len()));
            }
            assert_eq!(got, big, "client to server");
            std::io::Write::write_all(&mut s.writer(), b"and back").unwrap();
            pump(&mut c, &mut s);
            assert_eq!(
                read_all(&mut c.reader(), 8),
                b"and back",
                "server to client"
            );
        }
    }

    #[test]
    fn a_tampered_record_is_refused() {
        use rustls::crypto::cipher::{AeadKey, InboundOpaqueMessage, Iv, OutboundPlainMessage};
        let alg = &super::RING_AES_256_GCM;
        let key = || AeadKey::from([9u8; 32]);
        let iv = || Iv::from([3u8; 12]);
        let mut enc = rustls::crypto::cipher::Tls13AeadAlgorithm::encrypter(alg, key(), iv());
        let mut dec = rustls::crypto::cipher::Tls13AeadAlgorithm::decrypter(alg, key(), iv());
        let msg = OutboundPlainMessage {
            typ: rustls::ContentType::ApplicationData,
            version: rustls::ProtocolVersion::TLSv1_3,
            payload: b"hello"[..].into(),
        };
        let mut wire = enc.encrypt(msg, 0).unwrap().encode();
        let ok = wire.clone();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut bad = wire[5..].to_vec();
        let m = InboundOpaqueMessage::new(
            rustls::ContentType::ApplicationData,
            rustls::ProtocolVersion::TLSv1_2,
            &mut bad,
        );
        assert!(dec.decrypt(m, 0).is_err(), "a flipped tag bit is refused");
        let mut good = ok[5..].to_vec();
        let m = InboundOpaqueMessage::new(
            rustls::ContentType::ApplicationData,
            rustls::ProtocolVersion::TLSv1_2,
            &mut good,
        );
        assert_eq!(dec.decrypt(m, 0).unwrap().payload, b"hello");
    }
}
