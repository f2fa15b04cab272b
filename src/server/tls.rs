//! TLS termination: rustls with required client certificates, and the
//! per-connection identity handed to tonic.
//!
//! tokenvault terminates TLS itself (rather than through tonic's
//! `ServerTlsConfig`) so it can read the client identity once per connection
//! and, later, swap certificates without a restart.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use crate::{
    config::TlsFiles,
    identity::{ClientId, IdentityError, Peer},
};

/// Why the TLS material cannot be used. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {reason}")]
    Pem {
        /// Which setting (`tls.cert`, ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls refused the material (e.g. key does not match certificate).
    #[error("TLS configuration refused: {0}")]
    Rustls(String),
}

/// Builds the server's rustls configuration from the configured files.
///
/// # Errors
/// If a file is missing, unparsable or inconsistent.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs("tls.cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Pem {
        what: "tls.key",
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs("tls.client_ca", &files.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::Pem {
            what: "tls.client_ca",
            path: files.client_ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let mut crls = Vec::new();
    for path in &files.crls {
        let pem_err = |reason: String| TlsError::Pem {
            what: "tls.crl_files",
            path: path.clone(),
            reason,
        };
        let found = CertificateRevocationListDer::pem_file_iter(path)
            .map_err(|e| pem_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(e.to_string()))?;
        if found.is_empty() {
            return Err(pem_err("no X509 CRL block found".into()));
        }
        crls.extend(found);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .with_crls(crls)
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// An accepted, handshaken mTLS connection and the identity it proved.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
}

impl Connected for TlsConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow
/// client cannot hold up others), sending finished connections to `out`
/// until `stop` changes or `out` is closed.
pub async fn accept_loop(
    listener: TcpListener,
    config: Arc<super::reload::SharedTls>,
    trust_domains: Arc<Vec<String>>,
    handshake_timeout: Duration,
    out: mpsc::Sender<io::Result<TlsConn>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE or a reset before accept: keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // Each handshake takes the configuration in force when it starts.
        let acceptor = TlsAcceptor::from(config.current());
        let out = out.clone();
        let trust_domains = Arc::clone(&trust_domains);
        tokio::spawn(async move {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let peer = peer_of(&stream, remote, &trust_domains);
                    if let Err(e) = peer.identity.as_ref() {
                        tracing::warn!(remote.addr = %remote, error = %e, "client certificate has no usable identity");
                    }
                    // The receiver is gone only while shutting down.
                    let _ = out.send(Ok(TlsConn { stream, peer })).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(remote.addr = %remote, error = %e, "TLS handshake failed")
                }
                Err(_) => tracing::info!(remote.addr = %remote, "TLS handshake timed out"),
            }
        });
    }
}

fn peer_of(stream: &TlsStream<TcpStream>, remote: SocketAddr, trust_domains: &[String]) -> Peer {
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map_or(Err(IdentityError::NoCertificate), |leaf| {
            ClientId::from_certificate(leaf)
        })
        .and_then(|id| id.check_trust_domain(trust_domains));
    Peer {
        identity: Arc::new(identity),
        remote_addr: Some(remote),
    }
}
