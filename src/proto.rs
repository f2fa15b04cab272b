//! Generated protobuf and gRPC types. Only `api`, `server` and `client` use
//! them; the vault core never does.

/// `tokenvault.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tokenvault.v1");
}

/// The encoded descriptor set of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tokenvault_descriptor");

/// Clears the plaintext `value` of the generated messages that carry one
/// when they are dropped: a response's after tonic has encoded it, a
/// request's if it is refused before the vault moves it into a zeroizing
/// `SecretValue`. (Copies in the HTTP/2 and TLS buffers are out of reach;
/// see SECURITY.md.)
macro_rules! clear_value_on_drop {
    ($($message:ident),* $(,)?) => {
        $(
            impl Drop for v1::$message {
                fn drop(&mut self) {
                    zeroize::Zeroize::zeroize(&mut self.value);
                }
            }
        )*
    };
}

clear_value_on_drop!(
    TokenizeItem,
    LookupItem,
    UpdateValueRequest,
    RevealedValue,
    SubjectField,
);
