//! The local configuration file: arbitrary YAML must yield a state or a named error, never
//! a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ztunnel::localconfig::parse("fuzz.yaml", text);
    }
});
