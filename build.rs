//! Compiles `proto/tasker/v1/*.proto` with protox (pure Rust: no system `protoc`) and
//! generates tonic code plus the descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tasker/v1/common.proto",
        "proto/tasker/v1/readiness.proto",
        "proto/tasker/v1/admin.proto",
        "proto/tasker/v1/tasks.proto",
        "proto/tasker/v1/workers.proto",
        "proto/tasker/v1/schedules.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    // imported by workers.proto (the Work stream's errors)
    println!("cargo:rerun-if-changed=proto/google/rpc/status.proto");
    // `sqlx::migrate!` embeds migrations/ at compile time; a new or edited migration must
    // rebuild the crate, or the binary would run yesterday's schema.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("tasker_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::proto::codec::TaskerCodec")
        // google.rpc.Status (the Work stream's per-call errors) is tonic-types' own type, the
        // one tonic_types::StatusExt builds details with
        .extern_path(".google.rpc", "::tonic_types::pb")
        .file_descriptor_set_path(&descriptor_path)
        .compile_fds(fds)?;
    Ok(())
}
