//! Compiles the waypoint's OTLP trace protos (`proto/opentelemetry/…`, a minimal subset of
//! opentelemetry-proto) with protox (pure Rust, no `protoc`) into prost messages and a tonic
//! client, plus the server the tests' collector uses.

use std::{io, path::PathBuf};

fn main() -> io::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").map_err(io::Error::other)?;
    let root = PathBuf::from(manifest).join("proto");
    let files = [
        "opentelemetry/proto/common/v1/common.proto",
        "opentelemetry/proto/resource/v1/resource.proto",
        "opentelemetry/proto/trace/v1/trace.proto",
        "opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ]
    .map(|f| root.join(f));
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root]).map_err(|e| io::Error::other(format!("{e:?}")))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_fds(fds)
}
