//! The CNI plugin and node agent of the mesh: Istio-compatible in-pod redirection, the
//! plugin ↔ agent protocol, and the ZDS server that hands pod netns to ztunnel.

pub mod cni;
pub mod enablement;
pub mod iptables;
pub mod netns;
pub mod plugin;
pub mod protocol;
pub mod redirect;
pub mod source;
pub mod zds;
