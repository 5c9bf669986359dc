//! `mesh-cni`: the chained CNI plugin the container runtime executes for every pod sandbox.
//! Synchronous and short-lived; logs go to stderr, only the CNI result or error goes to
//! stdout. The logic lives in `cni_plugin::plugin`.

use std::io::{Read, Write};

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MESH_CNI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // The CNI contract is the environment plus stdin; both are handed to pure parsing.
    let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => cni_plugin::plugin::run(&env, &stdin),
        Err(e) => {
            let err = cni_plugin::cni::Error::Io(format!(
                "reading the network configuration from stdin: {e}"
            ));
            cni_plugin::plugin::Outcome {
                stdout: err.to_json("1.0.0"),
                error: Some(err),
            }
        }
    };
    if let Some(e) = &outcome.error {
        tracing::error!(code = e.code(), error = %e, "CNI invocation failed");
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    if outcome.error.is_some() {
        std::process::exit(1);
    }
}
