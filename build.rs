//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building
//! tokenvault never needs a system `protoc`. The encoded descriptor set is
//! written next to the generated code for server reflection.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn Error>> {
    let protos = [
        "proto/tokenvault/v1/tokenvault.proto",
        "proto/tokenvault/v1/subjects.proto",
        "proto/tokenvault/v1/admin.proto",
        "proto/tokenvault/v1/audit.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("tokenvault_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
