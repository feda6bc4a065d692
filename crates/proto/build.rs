//! Compiles `proto/*.proto` with protox (pure Rust), so no `protoc` is needed anywhere, and
//! writes their encoded descriptors for gRPC reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["raft.proto", "runnel.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptors.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: batches and snapshot chunks are never copied twice.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
