//! Process plumbing shared by the mesh's binaries.
//!
//! Owns the lifecycle pieces every long-running component needs, so each binary follows the
//! same bind → ready → drain sequence:
//! - [`drain`] — a trigger/watcher pair; servers stop accepting on the signal and the process
//!   waits for in-flight work up to a deadline;
//! - [`readiness`] — named tasks that block readiness, so `/healthz/ready` can say what it
//!   waits for;
//! - [`http`] — a tiny HTTP/1 server for admin, metrics and readiness endpoints;
//! - [`logging`] — tracing setup with a runtime-adjustable filter;
//! - [`signal`] — SIGTERM/SIGINT;
//! - [`source`] — the snapshot-source trait the control plane and the node agent share;
//! - [`watch`] — polling a configuration file for changes.

pub mod config;
pub mod drain;
pub mod http;
pub mod logging;
pub mod memory;
pub mod readiness;
pub mod signal;
pub mod source;
pub mod watch;
