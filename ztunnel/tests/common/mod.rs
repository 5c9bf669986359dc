//! Test harness: ztunnels, echo apps and clients on loopback, each test in its own
//! 127.N.0.0/24 block so tests run in parallel without port clashes on :15008.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod controlplane;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use clap::Parser;
pub use mesh_test::*;
use ztunnel::{app::Bound, config::Args};

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub net: u8,
}

impl Mesh {
    /// A temp dir with a shared CA. `net` must be unique per test (2..=250).
    pub fn new(net: u8) -> Self {
        raise_fd_limit();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        std::fs::create_dir(&ca).unwrap();
        let pem = mesh_tls::ca::LocalCa::generate_pem("cluster.local").unwrap();
        for (name, body) in pem.files() {
            std::fs::write(ca.join(name), body).unwrap();
        }
        Mesh { dir, net }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.net, 0, host))
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    pub fn write(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    /// Starts a ztunnel for `node` from a local config file and the shared local CA.
    pub async fn ztunnel(
        &self,
        config: &std::path::Path,
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> Bound {
        let source = [
            "--local-xds-path".to_owned(),
            config.display().to_string(),
            "--local-ca-dir".to_owned(),
            self.ca_dir().display().to_string(),
        ];
        let b = self.ztunnel_with(&source, node, ip, extra).await;
        wait_ready(&b).await;
        b
    }

    /// Starts a ztunnel for `node` with the given config/cert source flags, with its HBONE
    /// listener on `ip:15008`; does not wait for readiness.
    pub async fn ztunnel_with(
        &self,
        source: &[String],
        node: &str,
        ip: IpAddr,
        extra: &[&str],
    ) -> Bound {
        let mut args: Vec<String> = vec!["ztunnel".into()];
        args.extend(source.iter().cloned());
        args.extend([
            "--node-name".into(),
            node.into(),
            "--inbound-addr".into(),
            format!("{ip}:15008"),
            "--outbound-addr".into(),
            format!("{ip}:0"),
            "--inbound-plaintext-addr".into(),
            format!("{ip}:0"),
            "--socks5-addr".into(),
            format!("{ip}:0"),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--stats-addr".into(),
            "127.0.0.1:0".into(),
            "--readiness-addr".into(),
            "127.0.0.1:0".into(),
            "--packet-mark".into(),
            "0".into(),
            "--drain-deadline".into(),
            "3s".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let cfg = Args::try_parse_from(args).unwrap().validate().unwrap();
        ztunnel::app::build(cfg, None, tokio::runtime::Handle::current())
            .await
            .unwrap()
    }
}

/// Waits up to 5 s for readiness.
pub async fn wait_ready(bound: &Bound) {
    for _ in 0..500 {
        if bound.ready.is_ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("ztunnel not ready: {:?}", bound.ready.pending());
}
