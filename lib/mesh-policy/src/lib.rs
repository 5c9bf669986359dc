//! Istio security policy, from the objects users apply to the decision each hop makes.
//!
//! One pure crate (no tokio, kube or tonic) used by ztunnel's control plane, the waypoint and
//! `meshctl authz check`:
//!
//! - [`model`]: AuthorizationPolicy / PeerAuthentication / RequestAuthentication and parsing;
//! - [`validate`]: Istio's admission webhook, with its messages;
//! - [`scope`]: which hop enforces which policy, and whether traffic traverses a waypoint;
//! - [`l4`]: the conversion to ztunnel's `mesh_core::policy::Authorization`, with status;
//! - [`peerauthn`]: PeerAuthentication as ztunnel DENY policies;
//! - [`rbac`]: the waypoint evaluator (Envoy RBAC semantics, HTTP and TCP chains);
//! - [`matcher`], [`path`]: value matchers and path normalization;
//! - [`istiod`]: the Authorization resources and per-workload policy keys xDS carries;
//! - [`explain`]: the end-to-end, multi-hop decision with the deciding policy and rule.
//!
//! Semantics: `shared/reference/authz-semantics.md` and `waypoint-semantics.md`.

pub mod explain;
pub mod istiod;
pub mod l4;
pub mod matcher;
pub mod mesh;
pub mod model;
pub mod path;
pub mod peerauthn;
pub mod rbac;
pub mod scope;
pub mod validate;

pub use explain::{Decision, Explanation, Hop, HopKind, Request, explain};
pub use mesh::{Condition, ConditionType, FeatureFlags, MeshConfig};
pub use model::{PolicySet, parse_objects};
