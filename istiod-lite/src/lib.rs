//! istiod-lite: sources → index → translate → delta xDS, plus the Istio CA.
//!
//! ```text
//!  manifests dir ─┐                       ┌─► delta ADS (Address, Authorization) ─► ztunnels
//!  kube watches ──┴─► Index ─► translate ─┤
//!                     (apply/   (pure)    └─► CA: CreateCertificate (token → node rule)
//!                      delete/reset) ──────────► delta ADS (KubeObject, verbatim) ─► waypoints
//!                        │
//!                        └─► deploy: waypoint Gateways → SA/Deployment/Service + status (SSA),
//!                            route status (HTTPRoute/GRPCRoute parents the mesh owns),
//!                            on the elected leader only (a Lease)
//! ```
//!
//! Every push is a new immutable [`xds::Snapshot`]; each xDS stream diffs it against what its
//! client holds and sends only the difference.

pub mod app;
pub mod authn;
pub mod ca;
pub mod config;
pub mod deploy;
pub mod index;
pub mod k8s;
pub mod leader;
pub mod route_status;
pub mod source;
pub mod status;
pub mod translate;
pub mod waypoint;
pub mod xds;
