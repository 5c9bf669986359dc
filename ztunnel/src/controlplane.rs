//! The gRPC channel to the control plane (istiod or istiod-lite on `:15012`), shared by the
//! xDS client and the CA client.
//!
//! The machinery lives in `mesh_xds::controlplane` (the waypoint uses it too); this module
//! keeps ztunnel's names. TLS is ours (rustls, TLS 1.3, ALPN h2, server name checked against
//! the configured roots). Every request carries the service-account token as
//! `authorization: Bearer …` and the cluster id as `ClusterID`, as Istio's ztunnel sends
//! them. The token file is re-read per request, so kubelet's token rotation needs no
//! restart; a missing token file is sent as no header and the control plane decides (it
//! refuses, and its error names the reason).

pub use mesh_xds::controlplane::{ControlPlaneError, Credentials, channel, load_roots};
