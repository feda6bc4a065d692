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
    // Every message knows its full name: the codec looks its limits up by it.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: batches and snapshot chunks are never copied twice.
        .bytes(".")
        // Requests are checked against count and size limits before prost decodes them.
        .codec_path("crate::wire::BoundedCodec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
