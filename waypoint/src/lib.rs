//! The waypoint: terminates HBONE on 15008, serves the HTTP inside each tunnel through a fixed
//! list of request phases (authenticate → authorize → route → upstream → respond → log), and
//! carries each request on to the chosen endpoint over HBONE.
//!
//! Scope: L7 for traffic that ztunnels send to it. It never captures node traffic.
//!
//! Modules, one concern each:
//! - [`config`] — flags/env → one validated `Config`;
//! - [`state`], [`objects`] — the snapshot in force, the local config file and the Kubernetes
//!   objects in it; [`xds`] — the same from the control plane (delta ADS);
//! - [`route`] — HTTPRoute/GRPCRoute compilation and matching (pure);
//! - [`listener`] — the HBONE server and per-stream protocol choice (HTTP or opaque TCP);
//! - [`proxy`] — the request phases; [`grpc`] — gRPC requests and gRPC-shaped local replies;
//! - [`upstream`] — endpoint choice and HTTP over HBONE to the endpoint;
//! - [`ratelimit`] — token buckets; [`metrics`] — Istio metrics and the access log;
//!   [`trace`] — W3C trace context and OTLP span export;
//! - [`io`] — byte-stream views of HBONE streams; [`admin`], [`app`] — lifecycle.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod app;
pub mod config;
pub mod grpc;
pub mod io;
pub mod listener;
pub mod metrics;
pub mod objects;
pub mod proxy;
pub mod ratelimit;
pub mod route;
pub mod state;
pub mod trace;
pub mod upstream;
pub mod xds;
