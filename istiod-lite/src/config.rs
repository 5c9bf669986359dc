//! istiod-lite's configuration: the only place that reads flags and environment variables.
//!
//! [`Args`] is what the operator typed (Istio's variable names where istiod has one);
//! [`Config`] is the validated result. Every problem is reported at once and `main` exits 64.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use mesh_rt::config::parse_duration;
use serde::Serialize;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "istiod-lite",
    version,
    about = "The mesh's control plane: delta xDS and the Istio CA on :15012."
)]
pub struct Args {
    /// A directory of Kubernetes YAML manifests (every `*.yaml`/`*.yml`, multi-document),
    /// re-read when it changes: the lab's source, and a way to try the mesh without a cluster.
    #[arg(long, env = "MANIFESTS_DIR")]
    pub manifests: Option<PathBuf>,

    /// Watch a Kubernetes API server, reached with this kubeconfig file (its current
    /// context). Callers are then authenticated by TokenReview.
    #[arg(long, env = "ISTIOD_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch the Kubernetes API server of the cluster istiod-lite runs in (the pod's
    /// service-account token and `KUBERNETES_SERVICE_HOST`). Callers are then authenticated by
    /// TokenReview.
    #[arg(long, env = "ISTIOD_IN_CLUSTER", default_value_t = false)]
    pub in_cluster: bool,

    /// How long a successful TokenReview is reused for the same token, so that every xDS
    /// stream and certificate request is not an API round trip.
    #[arg(long, env = "TOKEN_REVIEW_CACHE_TTL", value_parser = parse_duration, default_value = "60s")]
    pub token_review_cache: Duration,

    /// xDS and CA, over TLS.
    #[arg(long, env = "GRPC_ADDR", default_value = "[::]:15012")]
    pub grpc_addr: SocketAddr,

    /// Readiness (`/ready`) and debug (`/debug/snapshot`), plain HTTP.
    #[arg(long, env = "MONITOR_ADDR", default_value = "127.0.0.1:15014")]
    pub monitor_addr: SocketAddr,

    /// The CA in Istio's `cacerts` layout (ca-key.pem, ca-cert.pem, cert-chain.pem,
    /// root-cert.pem). If the directory has none of them, a self-signed root is generated
    /// and written there (as istiod does with its istio-ca-secret).
    #[arg(long, env = "CA_DIR")]
    pub ca_dir: PathBuf,

    /// DNS names in the serving certificate of :15012.
    #[arg(
        long,
        env = "ISTIOD_DNS_NAMES",
        value_delimiter = ',',
        default_value = "istiod.istio-system.svc,istiod.istio-system.svc.cluster.local"
    )]
    pub dns_names: Vec<String>,

    /// Callers allowed in without Kubernetes: a YAML list of `{token, serviceAccount:
    /// ns/name, node}` (the lab's stand-in for TokenReview).
    #[arg(long, env = "STATIC_TOKENS")]
    pub static_tokens: Option<PathBuf>,

    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Node agents (`namespace/serviceaccount`, comma-separated) that may ask for the
    /// certificates of the pods on their own node (Istio's impersonation rule).
    #[arg(
        long,
        env = "CA_TRUSTED_NODE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "istio-system/ztunnel"
    )]
    pub ca_trusted_node_accounts: Vec<String>,

    /// With Kubernetes and more than one replica: only the holder of the Lease
    /// `istiod-lite-leader` deploys waypoints and writes status (every replica serves xDS and
    /// the CA). Off: this replica always does (run one replica only).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// How long a leader's Lease holds without renewal before another replica takes over;
    /// the leader renews every sixth of it and steps down after half of it without renewal.
    #[arg(long, env = "LEADER_ELECTION_LEASE_DURATION", value_parser = parse_duration, default_value = "30s")]
    pub leader_lease_duration: Duration,

    /// This replica's name in the Lease (the Deployment sets it from the pod name).
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// The Lease's namespace (the Deployment sets the pod's); default ROOT_NAMESPACE.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    #[arg(long, env = "DOMAIN_SUFFIX", default_value = "cluster.local")]
    pub domain_suffix: String,

    /// Policies here without a selector apply mesh-wide.
    #[arg(long, env = "ROOT_NAMESPACE", default_value = "istio-system")]
    pub root_namespace: String,

    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// The longest certificate lifetime granted, whatever a client asks for.
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", value_parser = parse_duration, default_value = "24h")]
    pub max_cert_ttl: Duration,

    /// How often the manifests directory is checked for changes.
    #[arg(long, env = "MANIFESTS_POLL", value_parser = parse_duration, default_value = "1s")]
    pub manifests_poll: Duration,

    /// Deploy a waypoint (ServiceAccount, Deployment, Service) for every Gateway of class
    /// `istio-waypoint`, and write the Gateway's status (Kubernetes source only).
    #[arg(long, env = "DEPLOY_WAYPOINTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub deploy_waypoints: bool,

    /// The container image of deployed waypoints.
    #[arg(long, env = "WAYPOINT_IMAGE", default_value = "mesh/waypoint:latest")]
    pub waypoint_image: String,

    /// `imagePullPolicy` of deployed waypoints: Always, IfNotPresent or Never.
    #[arg(
        long,
        env = "WAYPOINT_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub waypoint_image_pull_policy: String,

    /// Arguments of the waypoint container, comma-separated (empty: the image's default).
    #[arg(long, env = "WAYPOINT_ARGS", value_delimiter = ',')]
    pub waypoint_args: Vec<String>,

    /// Where deployed waypoints reach this control plane (xDS and CA), as their
    /// `XDS_ADDRESS`/`CA_ADDRESS`.
    #[arg(
        long,
        env = "WAYPOINT_XDS_ADDRESS",
        default_value = "https://istiod.istio-system.svc:15012"
    )]
    pub waypoint_xds_address: String,

    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
}

/// What istiod-lite deploys for a waypoint Gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointConfig {
    /// Off: Gateways are only read (binding), nothing is deployed and no status is written.
    pub deploy: bool,
    pub image: String,
    pub image_pull_policy: String,
    pub args: Vec<String>,
    pub xds_address: String,
}

/// Leader election on a `coordination.k8s.io/v1` Lease ([`crate::leader`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderConfig {
    pub namespace: String,
    pub identity: String,
    #[serde(serialize_with = "secs")]
    pub lease_duration: Duration,
}

/// Where objects come from (exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum SourceConfig {
    /// A directory of manifests, polled every `poll`; callers need `STATIC_TOKENS`.
    Manifests {
        dir: PathBuf,
        #[serde(serialize_with = "secs")]
        poll: Duration,
    },
    /// Kubernetes watches; callers are authenticated by TokenReview.
    Kubernetes {
        /// `None`: in-cluster configuration.
        kubeconfig: Option<PathBuf>,
        #[serde(serialize_with = "secs")]
        token_review_cache: Duration,
    },
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub source: SourceConfig,
    pub grpc_addr: SocketAddr,
    pub monitor_addr: SocketAddr,
    pub ca_dir: PathBuf,
    pub dns_names: Vec<String>,
    pub static_tokens: Option<PathBuf>,
    pub trust_domain: String,
    pub domain_suffix: String,
    pub root_namespace: String,
    pub cluster_id: String,
    #[serde(serialize_with = "secs")]
    pub max_cert_ttl: Duration,
    pub ca_trusted_node_accounts: Vec<String>,
    /// `None`: the manifest source (nothing to lead), or `LEADER_ELECTION=false`.
    pub leader: Option<LeaderConfig>,
    pub waypoints: WaypointConfig,
    pub log_level: String,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{}s", d.as_secs()))
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let Args {
            manifests,
            kubeconfig,
            in_cluster,
            token_review_cache,
            grpc_addr,
            monitor_addr,
            ca_dir,
            dns_names,
            static_tokens,
            trust_domain,
            ca_trusted_node_accounts,
            leader_election,
            leader_lease_duration,
            pod_name,
            pod_namespace,
            domain_suffix,
            root_namespace,
            cluster_id,
            max_cert_ttl,
            manifests_poll,
            deploy_waypoints,
            waypoint_image,
            waypoint_image_pull_policy,
            waypoint_args,
            waypoint_xds_address,
            log_level,
        } = self;
        let mut errs = Vec::new();
        let chosen = [
            manifests.is_some().then_some("MANIFESTS_DIR (--manifests)"),
            kubeconfig
                .is_some()
                .then_some("ISTIOD_KUBECONFIG (--kubeconfig)"),
            in_cluster.then_some("ISTIOD_IN_CLUSTER (--in-cluster)"),
        ];
        let chosen: Vec<&str> = chosen.into_iter().flatten().collect();
        if chosen.is_empty() {
            errs.push(
                "no source: set one of MANIFESTS_DIR (--manifests, a directory of Kubernetes YAML), ISTIOD_KUBECONFIG (--kubeconfig FILE) or ISTIOD_IN_CLUSTER=true (--in-cluster)"
                    .to_owned(),
            );
        } else if chosen.len() > 1 {
            errs.push(format!(
                "more than one source: {} are set; choose one",
                chosen.join(" and ")
            ));
        }
        if manifests.is_some() && static_tokens.is_none() {
            errs.push(
                "the manifest source needs STATIC_TOKENS (--static-tokens): a YAML list of {token, serviceAccount: ns/name, node} for the callers allowed in"
                    .to_owned(),
            );
        }
        if manifests.is_none() && static_tokens.is_some() {
            errs.push(
                "STATIC_TOKENS is only for the manifest source: with Kubernetes, callers are authenticated by TokenReview; unset it"
                    .to_owned(),
            );
        }
        if token_review_cache > Duration::from_secs(600) {
            errs.push(
                "TOKEN_REVIEW_CACHE_TTL must be at most 10m (a revoked token stays accepted that long)"
                    .to_owned(),
            );
        }
        if mesh_core::Identity::new(&trust_domain, "ns", "sa").is_err() {
            errs.push(format!(
                "TRUST_DOMAIN {trust_domain:?} is not a valid trust domain"
            ));
        }
        let dns_names: Vec<String> = dns_names.into_iter().filter(|n| !n.is_empty()).collect();
        if dns_names.is_empty() {
            errs.push("ISTIOD_DNS_NAMES is empty: the serving certificate needs a name".to_owned());
        }
        if max_cert_ttl < Duration::from_secs(60) {
            errs.push("MAX_WORKLOAD_CERT_TTL must be at least 1m".to_owned());
        }
        if manifests_poll.is_zero() {
            errs.push("MANIFESTS_POLL must be positive".to_owned());
        }
        if waypoint_image.trim().is_empty() {
            errs.push("WAYPOINT_IMAGE is empty: deployed waypoints need an image".to_owned());
        }
        if !["Always", "IfNotPresent", "Never"].contains(&waypoint_image_pull_policy.as_str()) {
            errs.push(format!(
                "WAYPOINT_IMAGE_PULL_POLICY {waypoint_image_pull_policy:?} must be Always, IfNotPresent or Never"
            ));
        }
        if !waypoint_xds_address.starts_with("https://") {
            errs.push(format!(
                "WAYPOINT_XDS_ADDRESS {waypoint_xds_address:?} must be an https:// URL (xDS and the CA are served over TLS)"
            ));
        }
        let ca_trusted_node_accounts: Vec<String> = ca_trusted_node_accounts
            .into_iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        for a in &ca_trusted_node_accounts {
            if a.split_once('/')
                .is_none_or(|(ns, sa)| ns.is_empty() || sa.is_empty() || sa.contains('/'))
            {
                errs.push(format!(
                    "CA_TRUSTED_NODE_ACCOUNTS entry {a:?} must be namespace/serviceaccount (e.g. istio-system/ztunnel)"
                ));
            }
        }
        if leader_lease_duration < Duration::from_secs(3) {
            errs.push("LEADER_ELECTION_LEASE_DURATION must be at least 3s".to_owned());
        }
        if !errs.is_empty() {
            return Err(ConfigError(errs));
        }
        let leader = (leader_election && manifests.is_none()).then(|| LeaderConfig {
            namespace: pod_namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| root_namespace.clone()),
            identity: pod_name.filter(|n| !n.is_empty()).unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                format!("{}-{}", host.trim(), std::process::id())
            }),
            lease_duration: leader_lease_duration,
        });
        // The manifest source has no API server to deploy to.
        let deploy = deploy_waypoints && manifests.is_none();
        let source = match manifests {
            Some(dir) => SourceConfig::Manifests {
                dir,
                poll: manifests_poll,
            },
            None => SourceConfig::Kubernetes {
                kubeconfig,
                token_review_cache,
            },
        };
        Ok(Config {
            source,
            grpc_addr,
            monitor_addr,
            ca_dir,
            dns_names,
            static_tokens,
            trust_domain,
            domain_suffix,
            root_namespace,
            cluster_id,
            max_cert_ttl,
            ca_trusted_node_accounts,
            leader,
            waypoints: WaypointConfig {
                deploy,
                image: waypoint_image,
                image_pull_policy: waypoint_image_pull_policy,
                args: waypoint_args
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .collect(),
                xds_address: waypoint_xds_address,
            },
            log_level,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Config, String> {
        let mut v = vec!["istiod-lite"];
        v.extend_from_slice(a);
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_istiod() {
        let c = args(&["--manifests", "m", "--static-tokens", "t", "--ca-dir", "ca"]).unwrap();
        assert_eq!(c.grpc_addr.port(), 15012);
        assert_eq!(c.root_namespace, "istio-system");
        assert_eq!(c.max_cert_ttl, Duration::from_secs(86400));
        assert!(c.dns_names.contains(&"istiod.istio-system.svc".to_owned()));
    }

    #[test]
    fn leader_election_and_trusted_node_accounts() {
        let c = args(&["--kubeconfig", "kc", "--ca-dir", "ca"]).unwrap();
        assert_eq!(c.ca_trusted_node_accounts, ["istio-system/ztunnel"]);
        let l = c.leader.expect("on by default with Kubernetes");
        assert_eq!(l.namespace, "istio-system");
        assert_eq!(l.lease_duration, Duration::from_secs(30));
        assert!(!l.identity.is_empty());
        let c = args(&[
            "--kubeconfig",
            "kc",
            "--ca-dir",
            "ca",
            "--pod-name",
            "istiod-7f9",
            "--pod-namespace",
            "mesh-system",
            "--ca-trusted-node-accounts",
            "mesh-system/ztunnel, mesh-system/other",
        ])
        .unwrap();
        let l = c.leader.unwrap();
        assert_eq!(
            (l.identity.as_str(), l.namespace.as_str()),
            ("istiod-7f9", "mesh-system")
        );
        assert_eq!(
            c.ca_trusted_node_accounts,
            ["mesh-system/ztunnel", "mesh-system/other"]
        );
        let c = args(&[
            "--kubeconfig",
            "kc",
            "--ca-dir",
            "ca",
            "--leader-election",
            "false",
        ]);
        assert!(c.unwrap().leader.is_none());
        // The manifest source has nothing to lead.
        let c = args(&["--manifests", "m", "--static-tokens", "t", "--ca-dir", "ca"]).unwrap();
        assert!(c.leader.is_none());
        let e = args(&[
            "--kubeconfig",
            "kc",
            "--ca-dir",
            "ca",
            "--ca-trusted-node-accounts",
            "ztunnel",
            "--leader-lease-duration",
            "1s",
        ])
        .unwrap_err();
        assert!(
            e.contains("CA_TRUSTED_NODE_ACCOUNTS entry \"ztunnel\""),
            "{e}"
        );
        assert!(e.contains("LEADER_ELECTION_LEASE_DURATION"), "{e}");
    }

    #[test]
    fn every_problem_is_reported() {
        let e = args(&[
            "--ca-dir",
            "ca",
            "--trust-domain",
            "BAD!",
            "--max-cert-ttl",
            "5s",
        ])
        .unwrap_err();
        for want in ["MANIFESTS_DIR", "TRUST_DOMAIN", "MAX_WORKLOAD_CERT_TTL"] {
            assert!(e.contains(want), "{want} missing from {e}");
        }
    }

    #[test]
    fn exactly_one_source() {
        let c = args(&["--kubeconfig", "kc", "--ca-dir", "ca"]).unwrap();
        assert_eq!(
            c.source,
            SourceConfig::Kubernetes {
                kubeconfig: Some("kc".into()),
                token_review_cache: Duration::from_secs(60)
            }
        );
        let c = args(&["--in-cluster", "--ca-dir", "ca"]).unwrap();
        assert!(matches!(
            c.source,
            SourceConfig::Kubernetes {
                kubeconfig: None,
                ..
            }
        ));
        let e = args(&["--manifests", "m", "--in-cluster", "--ca-dir", "ca"]).unwrap_err();
        assert!(e.contains("more than one source"), "{e}");
        let e = args(&[
            "--kubeconfig",
            "kc",
            "--static-tokens",
            "t",
            "--ca-dir",
            "ca",
        ])
        .unwrap_err();
        assert!(
            e.contains("STATIC_TOKENS is only for the manifest source"),
            "{e}"
        );
        let e = args(&["--manifests", "m", "--ca-dir", "ca"]).unwrap_err();
        assert!(e.contains("needs STATIC_TOKENS"), "{e}");
    }
}
