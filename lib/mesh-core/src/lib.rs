//! The mesh's domain model, shared by every binary.
//!
//! This crate owns the vocabulary (identities, workloads, services, L4 authorization policy)
//! and the pure decisions made on it. It must stay free of tokio, kube, tonic and prost so
//! that the control plane, the data plane and `meshctl` agree on one meaning of each type;
//! wire formats convert into these types in `mesh-proto`.

pub mod identity;
pub mod policy;
pub mod workload;

pub use identity::{Identity, IdentityError};
