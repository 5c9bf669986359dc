//! Generated protobuf and gRPC code for the mesh's wire contracts (`proto/`), and the
//! conversions between those messages and the domain model of `mesh-core`.
//!
//! Module paths mirror the proto packages so generated cross-package references resolve.
//! [`convert`] is the one place where wire values are checked on the way in (every error
//! names the field) and produced on the way out, so ztunnel and istiod-lite agree by
//! construction.

pub mod convert;

#[allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]
pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod v1 {
        pub mod auth {
            include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
        }
    }
}

#[allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]
pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
            }
        }
    }
}

#[allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]
pub mod mesh {
    pub mod config {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/mesh.config.v1.rs"));
        }
    }
}

/// The OTLP trace subset (`proto/opentelemetry`) the waypoint exports spans with, and the
/// collector service its tests run.
#[allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]
pub mod opentelemetry {
    pub mod proto {
        pub mod common {
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/opentelemetry.proto.common.v1.rs"
                ));
            }
        }
        pub mod resource {
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/opentelemetry.proto.resource.v1.rs"
                ));
            }
        }
        pub mod trace {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/opentelemetry.proto.trace.v1.rs"));
            }
        }
        pub mod collector {
            pub mod trace {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/opentelemetry.proto.collector.trace.v1.rs"
                    ));
                }
            }
        }
    }
}

/// xDS type URLs of the resources the mesh exchanges.
pub mod type_url {
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
    /// Kubernetes objects sent verbatim to waypoints (`proto/meshconfig.proto`).
    pub const KUBE_OBJECT: &str = "type.googleapis.com/mesh.config.v1.KubeObject";
}
