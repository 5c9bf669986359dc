//! The node agent's configuration: the only place in the agent that reads flags and
//! environment variables. [`Args`] is what the operator set; [`Config`] is the validated
//! result the rest of the agent receives. All problems are reported together, and `main`
//! exits with status 64 (EX_USAGE).

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::{enablement::Policy, redirect::Family};

/// A positive duration (`500ms`, `5s`, `1m`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = mesh_rt::config::parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?} must be a positive duration"));
    }
    Ok(d)
}

/// Where pod and namespace knowledge comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `<pod-source-dir>/cluster.yaml` (the netns lab and tests).
    Files,
    /// kube-rs watches (this node's pods, all namespaces), mirrored to
    /// `<pod-source-dir>/cluster.yaml` for the plugin.
    Kubernetes,
}

/// Command-line flags and their environment variables (Istio's names where it has one).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "mesh-cni-agent",
    version,
    about = "Node agent of the mesh: installs the CNI plugin, redirects enrolled pods' traffic inside their netns, hands the netns to ztunnel over ZDS."
)]
pub struct Args {
    /// This node's name; only pods scheduled here are enrolled.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// ZDS socket the agent listens on and ztunnel connects to.
    #[arg(
        long,
        env = "ZTUNNEL_UDS",
        default_value = "/var/run/ztunnel/ztunnel.sock"
    )]
    pub ztunnel_uds: PathBuf,

    /// Socket the CNI plugin asks the agent on.
    #[arg(
        long,
        env = "CNI_AGENT_SOCKET",
        default_value = "/var/run/mesh-cni/cni.sock"
    )]
    pub cni_socket: PathBuf,

    /// Where pods and namespaces come from.
    #[arg(long, env = "POD_SOURCE", value_enum, default_value = "files")]
    pub pod_source: SourceKind,

    /// Kubeconfig for the Kubernetes source; default: in-cluster ServiceAccount.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Directory of `cluster.yaml`: read by the files source, written (mirrored) by the
    /// Kubernetes source; also put in the plugin's conflist entry so the plugin reads the
    /// same labels.
    #[arg(long, env = "POD_SOURCE_DIR")]
    pub pod_source_dir: Option<PathBuf>,

    /// Network namespace to treat as the node's (probe SNAT rule, ipsets); default: our own.
    #[arg(long, env = "HOST_NETNS")]
    pub host_netns: Option<PathBuf>,

    /// Prefix for `CNI_NETNS` paths (`/host` when the host's /var/run/netns is mounted there).
    #[arg(long, env = "NETNS_PREFIX")]
    pub netns_prefix: Option<PathBuf>,

    /// The host's /proc, scanned to find the netns of pods that were already running.
    #[arg(long, env = "PROC_ROOT", default_value = "/proc")]
    pub proc_root: PathBuf,

    /// Capture DNS (UDP/TCP 53) to ztunnel's :15053.
    #[arg(long, env = "AMBIENT_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,

    /// Install IPv6 rules too.
    #[arg(long, env = "AMBIENT_IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    pub ipv6: bool,

    /// Namespaces never enrolled (comma-separated).
    #[arg(
        long,
        env = "EXCLUDE_NAMESPACES",
        default_value = "kube-system",
        value_delimiter = ','
    )]
    pub exclude_namespaces: Vec<String>,

    /// The mesh's own namespace (its ztunnel and agent pods are never enrolled).
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub mesh_namespace: String,

    /// How often the pod source is re-read and every pod reconciled.
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Copy the plugin binary and chain it into the primary CNI's conflist (and keep it so).
    #[arg(long, env = "CHAINED_CNI_PLUGIN", default_value_t = true, action = clap::ArgAction::Set)]
    pub install_cni: bool,

    /// Where the plugin binary is installed.
    #[arg(long, env = "CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// The CNI configuration directory watched for the primary CNI's conflist.
    #[arg(long, env = "CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// The `mesh-cni` binary to install; default: next to this agent's binary.
    #[arg(long, env = "CNI_PLUGIN_BINARY")]
    pub plugin_binary: Option<PathBuf>,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node_name: String,
    pub ztunnel_uds: PathBuf,
    pub cni_socket: PathBuf,
    pub pod_source: SourceKind,
    pub kubeconfig: Option<PathBuf>,
    pub pod_source_dir: PathBuf,
    pub host_netns: Option<PathBuf>,
    pub netns_prefix: PathBuf,
    pub proc_root: PathBuf,
    pub dns_capture: bool,
    pub families: Vec<Family>,
    pub exclude_namespaces: Vec<String>,
    pub mesh_namespace: String,
    #[serde(serialize_with = "ser_duration")]
    pub resync_interval: Duration,
    /// `None`: do not install or chain the plugin.
    pub install: Option<Install>,
    pub log: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Install {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub plugin_binary: PathBuf,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

impl Serialize for Family {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let Args {
            node_name,
            ztunnel_uds,
            cni_socket,
            pod_source,
            kubeconfig,
            pod_source_dir,
            host_netns,
            netns_prefix,
            proc_root,
            dns_capture,
            ipv6,
            exclude_namespaces,
            mesh_namespace,
            resync_interval,
            install_cni,
            cni_bin_dir,
            cni_conf_dir,
            plugin_binary,
            log,
        } = self;
        let mut problems = Vec::new();
        let node_name = node_name.filter(|n| !n.is_empty()).unwrap_or_else(|| {
            problems.push(
                "NODE_NAME (--node-name) is required: only pods of this node are enrolled".into(),
            );
            String::new()
        });
        let pod_source_dir = pod_source_dir.unwrap_or_else(|| {
            problems.push(
                "POD_SOURCE_DIR (--pod-source-dir) is required: the plugin reads pod labels from its cluster.yaml (written by you with POD_SOURCE=files, mirrored by the agent with POD_SOURCE=kubernetes)"
                    .into(),
            );
            PathBuf::new()
        });
        if kubeconfig.is_some() && pod_source != SourceKind::Kubernetes {
            problems.push("KUBECONFIG is set but POD_SOURCE is not kubernetes".into());
        }
        if ztunnel_uds == cni_socket {
            problems.push(format!(
                "ZTUNNEL_UDS and CNI_AGENT_SOCKET are both {}; they must differ",
                cni_socket.display()
            ));
        }
        if mesh_namespace.is_empty() {
            problems.push("POD_NAMESPACE (--mesh-namespace) must not be empty".into());
        }
        let install = if install_cni {
            let plugin_binary = plugin_binary.or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join(crate::cni::PLUGIN_TYPE)))
            });
            match plugin_binary {
                Some(p) => Some(Install {
                    bin_dir: cni_bin_dir,
                    conf_dir: cni_conf_dir,
                    plugin_binary: p,
                }),
                None => {
                    problems.push(
                        "CNI_PLUGIN_BINARY is not set and the agent's own path is unknown".into(),
                    );
                    None
                }
            }
        } else {
            None
        };
        if !problems.is_empty() {
            return Err(ConfigError(problems));
        }
        let mut families = vec![Family::V4];
        if ipv6 {
            families.push(Family::V6);
        }
        Ok(Config {
            node_name,
            ztunnel_uds,
            cni_socket,
            pod_source,
            kubeconfig,
            pod_source_dir,
            host_netns,
            netns_prefix: netns_prefix.unwrap_or_default(),
            proc_root,
            dns_capture,
            families,
            exclude_namespaces: exclude_namespaces
                .into_iter()
                .filter(|n| !n.is_empty())
                .collect(),
            mesh_namespace,
            resync_interval,
            install,
            log,
        })
    }
}

impl Config {
    pub fn policy(&self) -> Policy {
        Policy {
            exclude_namespaces: self.exclude_namespaces.clone(),
            mesh_namespace: self.mesh_namespace.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["mesh-cni-agent"];
        argv.extend(extra);
        let args = Args::try_parse_from(argv).map_err(|e| e.to_string())?;
        args.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config_validates_with_istio_defaults() {
        let c = parse(&[
            "--node-name",
            "node1",
            "--pod-source-dir",
            "/lab",
            "--install-cni",
            "false",
        ])
        .unwrap();
        assert_eq!(c.families, [Family::V4, Family::V6]);
        assert!(c.dns_capture);
        assert_eq!(
            c.ztunnel_uds,
            PathBuf::from("/var/run/ztunnel/ztunnel.sock")
        );
        assert_eq!(c.exclude_namespaces, ["kube-system"]);
        assert!(c.install.is_none());
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let e = parse(&[
            "--node-name",
            "",
            "--ztunnel-uds",
            "/s",
            "--cni-socket",
            "/s",
            "--install-cni",
            "false",
        ])
        .unwrap_err();
        assert!(e.contains("NODE_NAME"), "{e}");
        assert!(e.contains("POD_SOURCE_DIR"), "{e}");
        assert!(e.contains("must differ"), "{e}");
    }

    #[test]
    fn switches_and_lists_parse() {
        let c = parse(&[
            "--node-name=n",
            "--pod-source-dir=/d",
            "--ipv6=false",
            "--dns-capture=false",
            "--exclude-namespaces=kube-system,other",
            "--resync-interval=250ms",
            "--install-cni=true",
            "--plugin-binary=/bin/mesh-cni",
        ])
        .unwrap();
        assert_eq!(c.families, [Family::V4]);
        assert!(!c.dns_capture);
        assert_eq!(c.exclude_namespaces, ["kube-system", "other"]);
        assert_eq!(c.resync_interval, Duration::from_millis(250));
        assert_eq!(
            c.install.unwrap().plugin_binary,
            PathBuf::from("/bin/mesh-cni")
        );
        assert_eq!(c.pod_source, SourceKind::Files);
        let k = parse(&[
            "--node-name=n",
            "--pod-source-dir=/d",
            "--install-cni=false",
            "--pod-source=kubernetes",
        ])
        .unwrap();
        assert_eq!(k.pod_source, SourceKind::Kubernetes);
        let e = parse(&[
            "--node-name=n",
            "--pod-source-dir=/d",
            "--install-cni=false",
            "--kubeconfig=/kc",
        ])
        .unwrap_err();
        assert!(e.contains("POD_SOURCE is not kubernetes"), "{e}");
        let e = parse(&[
            "--node-name=n",
            "--pod-source-dir=/d",
            "--resync-interval=0s",
        ])
        .unwrap_err();
        assert!(e.contains("positive"), "{e}");
    }
}
