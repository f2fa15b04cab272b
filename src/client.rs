//! A small mTLS client, used by `tokenvault client` and the tests.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use crate::proto::v1::token_vault_client::TokenVaultClient;

/// The files a client presents and trusts.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// CA bundle that signed the server certificate.
    pub ca: PathBuf,
    /// The client certificate (PEM).
    pub cert: PathBuf,
    /// The client private key (PEM).
    pub key: PathBuf,
    /// The name the server certificate must carry (e.g. `localhost`).
    pub server_name: String,
}

impl ClientTls {
    /// The files of one of the dev client identities (`support` or
    /// `checkout`) in a `--dev` directory.
    pub fn dev(dev_dir: &Path, client: &str) -> Self {
        let tls = dev_dir.join("tls");
        Self {
            ca: tls.join("ca.pem"),
            cert: tls.join("clients").join(format!("{client}.pem")),
            key: tls.join("clients").join(format!("{client}.key")),
            server_name: "localhost".into(),
        }
    }
}

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The address or TLS settings were refused, or the connection failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The transport error.
        source: tonic::transport::Error,
    },
}

/// Opens an mTLS channel to `addr` (`host:port`).
///
/// # Errors
/// See [`ClientError`].
pub async fn channel(addr: &str, tls: &ClientTls) -> Result<Channel, ClientError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| ClientError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
        .domain_name(tls.server_name.clone());
    let connect_err = |source| ClientError::Connect {
        addr: addr.to_owned(),
        source,
    };
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(connect_err)?
        .tls_config(config)
        .map_err(connect_err)?
        .connect()
        .await
        .map_err(connect_err)
}

/// A `TokenVault` client over [`channel`].
///
/// # Errors
/// See [`ClientError`].
pub async fn connect(
    addr: &str,
    tls: &ClientTls,
) -> Result<TokenVaultClient<Channel>, ClientError> {
    Ok(TokenVaultClient::new(channel(addr, tls).await?))
}
