//! `mesh-bench`: the load tools the benchmark harness (`bench/run.py`) runs inside its
//! network namespaces, and the micro-benchmarks `bench/callgrind.sh` counts instructions of.
//!
//! Every command prints one JSON object on stdout and nothing else there; progress goes to
//! stderr. Every loop is bounded by a count or a duration.

mod cpscale;
mod httprate;
mod load;
mod micro;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-bench",
    about = "Benchmark helpers (see bench/README.md)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo server: echoes every connection until it closes.
    Server {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// New connections per second: connect, 1 byte each way, close; `concurrency` at a time.
    Connrate {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// Opens `count` connections (each proven end to end by an echoed byte), holds them
    /// until `ready_file` is removed or `seconds` pass, then closes them all.
    Hold {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        ready_file: std::path::PathBuf,
        #[arg(long, default_value_t = 300.0)]
        seconds: f64,
    },
    /// Open-loop HTTP/1.1 GETs at a fixed rate over keep-alive connections (plain or TLS);
    /// latency is measured from each request's due time.
    HttpRate(httprate::Plan),
    /// Control-plane scale: istiod-lite with many pods and services, many xDS clients, one
    /// change pushed to all of them (push latency, istiod-lite CPU and memory).
    CpScale {
        #[arg(long)]
        istiod_bin: std::path::PathBuf,
        #[arg(long, default_value_t = 10_000)]
        pods: usize,
        #[arg(long, default_value_t = 1_000)]
        services: usize,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        #[arg(long, default_value_t = 50)]
        poll_ms: u64,
    },
    /// Deterministic in-process work for instruction counting (single thread).
    Micro {
        #[command(subcommand)]
        what: micro::Micro,
    },
}

fn main() -> anyhow::Result<()> {
    load::raise_fd_limit();
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Server { listen } => load::runtime()?.block_on(load::server(listen))?,
        Cmd::Connrate {
            to,
            seconds,
            concurrency,
        } => load::runtime()?.block_on(load::connrate(to, seconds, concurrency))?,
        Cmd::Hold {
            to,
            count,
            ready_file,
            seconds,
        } => load::runtime()?.block_on(load::hold(to, count, &ready_file, seconds))?,
        Cmd::HttpRate(plan) => load::runtime()?.block_on(httprate::run(plan))?,
        Cmd::CpScale {
            istiod_bin,
            pods,
            services,
            clients,
            poll_ms,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(cpscale::run(cpscale::Params {
                istiod_bin,
                pods,
                services,
                clients,
                poll: std::time::Duration::from_millis(poll_ms),
            }))?,
        Cmd::Micro { what } => micro::run(what)?,
    };
    println!("{out}");
    Ok(())
}
