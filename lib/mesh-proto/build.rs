//! Compiles every `.proto` under the workspace's `proto/` (the mesh's contracts at the top,
//! the OTLP trace subset under `opentelemetry/`) with protox (pure Rust, so no `protoc` is
//! needed on the build machine) and generates prost messages and tonic services.

use std::{
    io,
    path::{Path, PathBuf},
};

fn main() -> io::Result<()> {
    // Read at run time (cargo sets it for every build-script run), not baked in at compile
    // time: a build script binary reused from another checkout must not look there.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").map_err(io::Error::other)?;
    let root = PathBuf::from(manifest).join("../../proto");
    let mut files = Vec::new();
    protos(&root, &mut files)?;
    files.sort();
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root]).map_err(|e| io::Error::other(format!("{e:?}")))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // No `connect()` helpers: callers bring their own channel (our TLS, our connector).
        .build_transport(false)
        .compile_fds(fds)
}

/// Every `.proto` file under `dir`, recursively.
fn protos(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            println!("cargo:rerun-if-changed={}", p.display());
            protos(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "proto") {
            out.push(p);
        }
    }
    Ok(())
}
