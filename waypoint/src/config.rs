//! The waypoint's configuration: the only place that reads flags and environment variables.
//!
//! [`Args`] is what the operator typed (every flag has an environment variable); [`Config`]
//! is the validated result the rest of the program receives. All problems are reported
//! together and `main` exits with status 64 (EX_USAGE).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use mesh_rt::config::parse_duration;
use serde::Serialize;

/// Where workloads, services and Kubernetes objects come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ConfigSource {
    /// A local YAML file (`docs/waypoint.md`), re-read when it changes.
    File(PathBuf),
    // Xds { address, root_ca, token_path }: delta ADS with `istio.workload.Address` and
    // `mesh.config.v1.KubeObject`; needs ztunnel's generic xDS client moved to a lib first.
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "waypoint",
    version,
    about = "Envoy-free waypoint: L7 policy and routing inside HBONE."
)]
pub struct Args {
    /// The waypoint's identity, Gateway, workloads, services and objects (YAML).
    #[arg(long, env = "WAYPOINT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Issue the waypoint's certificate from a local CA in Istio's `cacerts` layout.
    #[arg(long, env = "LOCAL_CA_DIR")]
    pub local_ca_dir: Option<PathBuf>,

    /// Lifetime of certificates issued by the local CA.
    #[arg(long, env = "LOCAL_CA_CERT_TTL", default_value = "24h")]
    pub local_ca_cert_ttl: String,

    /// The mesh trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Further trust domains whose clients are accepted (comma-separated).
    #[arg(long, env = "TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    pub trust_domain_aliases: Vec<String>,

    /// HBONE listener.
    #[arg(long, env = "HBONE_ADDR", default_value = "[::]:15008")]
    pub hbone_addr: SocketAddr,

    /// Admin: /config_dump, /quitquitquit, /logging (keep on loopback).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus /metrics.
    #[arg(long, env = "STATS_ADDR", default_value = "[::]:15020")]
    pub stats_addr: SocketAddr,

    /// /healthz/ready.
    #[arg(long, env = "READINESS_ADDR", default_value = "[::]:15021")]
    pub readiness_addr: SocketAddr,

    /// How long open requests may finish after SIGTERM.
    #[arg(long, env = "DRAIN_DEADLINE", default_value = "5s")]
    pub drain_deadline: String,

    /// How long to wait for a client's first bytes on a port of unknown protocol before
    /// treating it as opaque TCP.
    #[arg(long, env = "PROTOCOL_DETECTION_TIMEOUT", default_value = "100ms")]
    pub protocol_detection_timeout: String,

    /// Connect timeout for upstream HBONE connections.
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "10s")]
    pub connect_timeout: String,

    /// Largest request head (request line and headers) accepted from a client, bytes.
    #[arg(long, env = "MAX_REQUEST_HEADERS_BYTES", default_value = "61440")]
    pub max_request_headers_bytes: usize,

    /// Request bodies up to this size are buffered so they can be retried and mirrored.
    #[arg(long, env = "RETRY_BUFFER_BYTES", default_value = "65536")]
    pub retry_buffer_bytes: usize,

    /// Data-plane worker threads.
    #[arg(long, env = "WORKER_THREADS", default_value = "2")]
    pub worker_threads: usize,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,

    /// One JSON object per log line.
    #[arg(long, env = "LOG_JSON", default_value = "false")]
    pub log_json: bool,
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    pub source: ConfigSource,
    pub local_ca_dir: PathBuf,
    pub local_ca_cert_ttl: Duration,
    pub trust_domain: String,
    pub trust_domain_aliases: Vec<String>,
    pub hbone_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub drain_deadline: Duration,
    pub protocol_detection_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_request_headers_bytes: usize,
    pub retry_buffer_bytes: usize,
    pub worker_threads: usize,
    pub log_level: String,
    pub log_json: bool,
}

/// Every problem found in the arguments.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let Args {
            config,
            local_ca_dir,
            local_ca_cert_ttl,
            trust_domain,
            trust_domain_aliases,
            hbone_addr,
            admin_addr,
            stats_addr,
            readiness_addr,
            drain_deadline,
            protocol_detection_timeout,
            connect_timeout,
            max_request_headers_bytes,
            retry_buffer_bytes,
            worker_threads,
            log_level,
            log_json,
        } = self;
        let mut errs = Vec::new();
        let mut dur = |name: &str, v: &str, min: Duration| match parse_duration(v) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                errs.push(format!("{name}: {v:?} must be at least {min:?}"));
                min
            }
            Err(e) => {
                errs.push(format!("{name}: {e}"));
                min
            }
        };
        let local_ca_cert_ttl = dur(
            "LOCAL_CA_CERT_TTL",
            &local_ca_cert_ttl,
            Duration::from_secs(60),
        );
        let drain_deadline = dur("DRAIN_DEADLINE", &drain_deadline, Duration::ZERO);
        let protocol_detection_timeout = dur(
            "PROTOCOL_DETECTION_TIMEOUT",
            &protocol_detection_timeout,
            Duration::from_millis(1),
        );
        let connect_timeout = dur(
            "CONNECT_TIMEOUT",
            &connect_timeout,
            Duration::from_millis(1),
        );
        let source = match config {
            Some(p) => ConfigSource::File(p),
            None => {
                errs.push(
                    "WAYPOINT_CONFIG (--config): required; xDS is not supported yet".to_string(),
                );
                ConfigSource::File(PathBuf::new())
            }
        };
        let local_ca_dir = local_ca_dir.unwrap_or_else(|| {
            errs.push(
                "LOCAL_CA_DIR (--local-ca-dir): required; the Istio CA client is not wired yet (make one with `meshctl ca create DIR`)".to_string(),
            );
            PathBuf::new()
        });
        if trust_domain.is_empty() || trust_domain.contains('/') {
            errs.push(format!(
                "TRUST_DOMAIN: {trust_domain:?} is not a trust domain"
            ));
        }
        if worker_threads == 0 {
            errs.push("WORKER_THREADS: must be at least 1".into());
        }
        if max_request_headers_bytes < 1024 {
            errs.push("MAX_REQUEST_HEADERS_BYTES: must be at least 1024".into());
        }
        if !errs.is_empty() {
            return Err(ConfigError(errs));
        }
        Ok(Config {
            source,
            local_ca_dir,
            local_ca_cert_ttl,
            trust_domain,
            trust_domain_aliases,
            hbone_addr,
            admin_addr,
            stats_addr,
            readiness_addr,
            drain_deadline,
            protocol_detection_timeout,
            connect_timeout,
            max_request_headers_bytes,
            retry_buffer_bytes,
            worker_threads,
            log_level,
            log_json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_together() {
        let e = Args::try_parse_from([
            "waypoint",
            "--drain-deadline",
            "soon",
            "--worker-threads",
            "0",
        ])
        .unwrap()
        .validate()
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("DRAIN_DEADLINE"), "{s}");
        assert!(s.contains("WORKER_THREADS"), "{s}");
        assert!(s.contains("WAYPOINT_CONFIG"), "{s}");
        assert!(s.contains("LOCAL_CA_DIR"), "{s}");
    }

    #[test]
    fn defaults_validate() {
        let c = Args::try_parse_from(["waypoint", "--config", "/x.yaml", "--local-ca-dir", "/ca"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.hbone_addr.port(), 15008);
        assert_eq!(c.protocol_detection_timeout, Duration::from_millis(100));
    }
}
