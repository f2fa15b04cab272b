//! Generated protobuf and gRPC types. Only `api`, `server` and `client` use
//! them; the vault core never does.

/// `tokenvault.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tokenvault.v1");
}

/// The encoded descriptor set of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tokenvault_descriptor");
