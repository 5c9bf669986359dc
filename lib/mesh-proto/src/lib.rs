//! Generated protobuf and gRPC code for the mesh's wire contracts (`proto/`), nothing else.
//!
//! Module paths mirror the proto packages so generated cross-package references resolve.
//! Conversions to the domain model live with their users (ztunnel, istiod-lite), keeping
//! `mesh-core` free of prost.

#![allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]

pub mod istio {
    pub mod workload {
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }
}
