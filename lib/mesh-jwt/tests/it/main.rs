//! mesh-jwt end to end: real keys (aws-lc-rs) sign real tokens; RequestAuthentications built
//! as users write them; a loopback HTTP server serves JWKS.
//!
//! - `local`: inline JWKS — algorithms, every failure text, locations, outputs, several rules;
//! - `remote`: `jwksUri` and OpenID discovery — caching, refresh, keep-last-good, fail closed;
//! - `tamper`: any single-byte change of a signed token is refused (property test).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod keys;
mod local;
mod remote;
mod server;
mod tamper;
