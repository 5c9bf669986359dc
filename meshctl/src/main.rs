//! `meshctl`: the operator's command-line tool.
//!
//! - `meshctl ca create DIR`: a CA in Istio's `cacerts` layout for local/dev meshes;
//! - `meshctl ztunnel config-dump`: what a running ztunnel knows (workloads, services,
//!   policies, certificates);
//! - `meshctl ztunnel log-level [FILTER]`: read or change its log filter at runtime;
//! - `meshctl authz check`: explain offline which hop allows or denies a request, and why
//!   (logic in `authz.rs`).

mod authz;

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Operate and debug the mesh.")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Certificate authority helpers.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Inspect a running ztunnel through its admin port.
    #[command(subcommand)]
    Ztunnel(ZtunnelCmd),
    /// Authorization policy tools.
    #[command(subcommand)]
    Authz(AuthzCmd),
}

#[derive(Subcommand)]
enum AuthzCmd {
    /// Explain, offline, the decision Istio ambient makes for one request at each hop
    /// (waypoint, destination ztunnel), with the deciding policy and rule. Exit 0 for any
    /// decision, 2 for bad input.
    Check {
        /// A multi-document YAML file of Kubernetes objects, or a directory of .yaml files.
        #[arg(long)]
        policies: PathBuf,
        /// The request to explain (source, destination, protocol, http, waypoint).
        #[arg(long)]
        request: PathBuf,
        /// Mesh settings: trust_domain, root_namespace, trust_domain_aliases, feature_flags,
        /// path_normalization, strict_policy.
        #[arg(long)]
        mesh: Option<PathBuf>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "text")]
        output: authz::Output,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Write a new self-signed root CA (ca-key.pem, ca-cert.pem, cert-chain.pem,
    /// root-cert.pem) into DIR, for ztunnel's LOCAL_CA_DIR or istiod's cacerts Secret.
    Create {
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ZtunnelCmd {
    /// Print the ztunnel's configuration and state as JSON.
    ConfigDump {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Show the log filter, or set it (e.g. `info,access=info,ztunnel::proxy=debug`).
    LogLevel {
        filter: Option<String>,
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
}

fn main() -> std::process::ExitCode {
    match Cli::parse().cmd {
        Cmd::Authz(AuthzCmd::Check {
            policies,
            request,
            mesh,
            output,
        }) => match authz::check(&policies, &request, mesh.as_deref(), output) {
            Ok(out) => {
                print!("{out}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshctl authz check: {e}");
                std::process::ExitCode::from(2)
            }
        },
        Cmd::Ca(cmd) => exit(run_ca(cmd)),
        Cmd::Ztunnel(cmd) => exit(run_ztunnel(cmd)),
    }
}

fn exit(r: anyhow::Result<()>) -> std::process::ExitCode {
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_ca(cmd: CaCmd) -> anyhow::Result<()> {
    match cmd {
        CaCmd::Create {
            dir,
            trust_domain,
            force,
        } => create_ca(&dir, &trust_domain, force),
    }
}

fn run_ztunnel(cmd: ZtunnelCmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cmd {
            ZtunnelCmd::ConfigDump { admin } => {
                let body = request(admin, http::Method::GET, "/config_dump").await?;
                println!("{body}");
            }
            ZtunnelCmd::LogLevel {
                filter: None,
                admin,
            } => {
                print!("{}", request(admin, http::Method::GET, "/logging").await?);
            }
            ZtunnelCmd::LogLevel {
                filter: Some(f),
                admin,
            } => {
                let path = format!("/logging?level={f}");
                print!("{}", request(admin, http::Method::POST, &path).await?);
            }
        }
        Ok(())
    })
}

fn create_ca(dir: &std::path::Path, trust_domain: &str, force: bool) -> anyhow::Result<()> {
    let pem = mesh_tls::ca::LocalCa::generate_pem(trust_domain)
        .with_context(|| format!("generating a CA for trust domain {trust_domain:?}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, _) in pem.files() {
        let p = dir.join(name);
        if p.exists() && !force {
            bail!("{} exists; pass --force to replace the CA", p.display());
        }
    }
    for (name, body) in pem.files() {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
        #[cfg(unix)]
        if name == "ca-key.pem" {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    println!(
        "CA for trust domain {trust_domain} written to {}",
        dir.display()
    );
    Ok(())
}

async fn request(addr: SocketAddr, method: http::Method, path: &str) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| {
            format!("connecting to the admin port {addr} (is ztunnel running? is --admin right?)")
        })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("{path}: HTTP {status}: {}", text.trim());
    }
    Ok(text)
}
