//! The control-plane client machinery shared by ztunnel and the waypoint.
//!
//! - [`controlplane`] — the TLS gRPC channel to istiod / istiod-lite and the credentials
//!   (bearer token, cluster id) every request carries;
//! - [`client`] — the delta ADS session loop: wildcard subscriptions, ACK/NACK per
//!   response, reconnect with capped jittered backoff, `initial_resource_versions` on resync;
//! - [`node`] — Istio's node id and metadata, by proxy type (`ztunnel`, `waypoint`).
//!
//! What a resource *means* is not known here: each program plugs in a [`client::Handler`]
//! that turns the resources of its types into its own state and names the ones it refuses.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod controlplane;
pub mod node;

pub use client::{Applied, Client, Handler, Known, Rejected, XdsError, initial_request};
pub use controlplane::{ControlPlane, ControlPlaneError, Credentials, channel, load_roots};
pub use node::NodeInfo;
