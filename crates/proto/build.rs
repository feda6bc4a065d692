//! Compiles `proto/*.proto` with protox (pure Rust), so no `protoc` is needed anywhere.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["raft.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: batches and snapshot chunks are never copied twice.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
