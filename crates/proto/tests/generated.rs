//! The Rust types and services in `src/generated/` are what `proto/` compiles to.
//!
//! They are checked in, not built by a build script, so that no crate that depends on
//! `runnel-proto` (the client above all) pulls a protobuf compiler into its build. This test
//! compiles `proto/` again (protox, pure Rust: no `protoc`) and fails when the checked-in files
//! differ; `RUNNEL_REGENERATE_PROTO=1 cargo test -p runnel-proto --test generated` rewrites
//! them after a change to `proto/`.

use std::path::{Path, PathBuf};

use prost::Message;

/// The files generation writes, all under `src/generated/`.
const FILES: [&str; 3] = ["runnel.v1.rs", "runnel.raft.v1.rs", "descriptors.bin"];

fn generate(out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let fds = protox::compile(["raft.proto", "runnel.proto"], [&root])?;
    std::fs::write(out.join("descriptors.bin"), fds.encode_to_vec())?;
    // Every message knows its full name: the codec looks its limits up by it.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .out_dir(out)
        // `bytes` fields as `bytes::Bytes`: batches and snapshot chunks are never copied twice.
        .bytes(".")
        // Requests are checked against count and size limits before prost decodes them.
        .codec_path("crate::wire::BoundedCodec")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}

#[test]
fn checked_in_code_matches_proto() {
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path()).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/generated");
    let regenerate = std::env::var_os("RUNNEL_REGENERATE_PROTO").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for f in FILES {
        let fresh = std::fs::read(tmp.path().join(f)).unwrap();
        let kept = std::fs::read(dir.join(f)).unwrap_or_default();
        if fresh != kept {
            if regenerate {
                std::fs::write(dir.join(f), &fresh).unwrap();
            } else {
                stale.push(f);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "src/generated/{stale:?} differ from what proto/ compiles to: run \
         RUNNEL_REGENERATE_PROTO=1 cargo test -p runnel-proto --test generated"
    );
}
