//! Compiles every `.proto` under the workspace's `proto/` with protox (pure Rust, so no
//! `protoc` is needed on the build machine) and generates prost messages and tonic services.

use std::{io, path::PathBuf};

fn main() -> io::Result<()> {
    // Read at run time (cargo sets it for every build-script run), not baked in at compile
    // time: a build script binary reused from another checkout must not look there.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").map_err(io::Error::other)?;
    let root = PathBuf::from(manifest).join("../../proto");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
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
