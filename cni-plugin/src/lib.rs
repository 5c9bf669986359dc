//! The CNI plugin and node agent of the mesh: Istio-compatible in-pod redirection, the
//! plugin ↔ agent protocol, and the ZDS server that hands pod netns to ztunnel.
//!
//! | module | owns |
//! |---|---|
//! | `cni` | CNI spec types, env/stdin parsing, result and error JSON |
//! | `plugin` | the plugin's ADD/DEL/CHECK/VERSION logic (`bin/mesh-cni.rs` is its `main`) |
//! | `enablement` | "is this pod ambient?" |
//! | `protocol` | plugin ↔ agent requests on `cni.sock` |
//! | `redirect` | pure rule generation (Istio's constants and rules) |
//! | `iptables` | the `RuleBackend` trait and its iptables-restore implementation |
//! | `netns` | netns fds, running code inside a netns (the only `unsafe`) |
//! | `discover` | finding running pods' netns via `/proc/*/cgroup` |
//! | `zds` | the ZDS server (node agent ↔ ztunnel) |
//! | `agent` | enroll/unenroll state machine and reconcile |
//! | `source` | pod/namespace snapshots (`mesh_rt::source::Source`), the annotator trait, the files source |
//! | `kube_source` | the Kubernetes (kube-rs) pod source, mirrored to files for the plugin |
//! | `install` | plugin binary install, conflist chaining, directory watch |
//! | `config` | the agent's validated `Config` (the only env/flag reader) |
//! | `app` | the agent's wiring (sockets, loops) |

pub mod agent;
pub mod app;
pub mod cni;
pub mod config;
pub mod discover;
pub mod enablement;
pub mod install;
pub mod iptables;
pub mod kube_source;
pub mod netns;
pub mod plugin;
pub mod protocol;
pub mod redirect;
pub mod source;
pub mod zds;
