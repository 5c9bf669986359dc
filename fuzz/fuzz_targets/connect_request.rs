//! CONNECT request heads as an HBONE server receives them: any method, any authority bytes.
//! Validation must never panic, and whatever it accepts must be a real `IP:port` with a
//! non-zero port that round-trips through its own formatting.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_hbone::header;

fuzz_target!(|data: &[u8]| {
    let (method, rest) = match data.split_first() {
        Some((m, r)) => (*m, r),
        None => return,
    };
    let Ok(authority) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(addr) = header::parse_authority(authority) {
        assert_ne!(addr.port(), 0);
        assert_eq!(header::parse_authority(&addr.to_string()), Ok(addr));
    }
    let method = if method % 2 == 0 { http::Method::CONNECT } else { http::Method::GET };
    if let Ok(req) = http::Request::builder().method(method).uri(authority).body(()) {
        if let Ok(addr) = header::validate(&req) {
            assert_eq!(req.method(), http::Method::CONNECT);
            assert_ne!(addr.port(), 0);
        }
    }
    // Identities arrive in certificates and policies: parsing must be total too.
    if let Ok(id) = authority.parse::<mesh_core::Identity>() {
        assert_eq!(id.to_string().parse::<mesh_core::Identity>(), Ok(id));
    }
});
