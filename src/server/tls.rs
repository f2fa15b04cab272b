//! TLS termination: rustls with required client certificates, and the
//! per-connection identity handed to tonic.
//!
//! tokenvault terminates TLS itself (rather than through tonic's
//! `ServerTlsConfig`) so it can read the client identity once per connection
//! and, later, swap certificates without a restart.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::HandshakeSignatureValid,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime, pem::PemObject,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::{
    config::TlsFiles,
    identity::{ClientId, IdentityError, Peer},
    shared::Shared,
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

/// The TLS material in force: the rustls configuration new handshakes use,
/// the client-certificate verifier inside it (kept so open connections can be
/// checked again when CRLs change), and the SPIFFE trust domains accepted.
pub struct TlsState {
    /// What new handshakes use.
    pub config: Arc<ServerConfig>,
    /// The verifier `config` holds (rustls does not hand it back).
    verifier: Arc<dyn ClientCertVerifier>,
    /// `tls.trust_domains`.
    pub trust_domains: Vec<String>,
}

impl TlsState {
    /// Whether a client chain that passed an earlier handshake would still
    /// pass one now: same CAs, current CRLs, and valid at this moment.
    fn still_valid(&self, chain: &[CertificateDer<'static>]) -> Result<(), rustls::Error> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(rustls::Error::NoCertificatesPresented)?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(drop)
    }
}

/// Builds the server's TLS state from the configured files.
///
/// # Errors
/// If a file is missing, unparsable or inconsistent.
pub fn tls_state(files: &TlsFiles, trust_domains: &[String]) -> Result<TlsState, TlsError> {
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
    let webpki =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .with_crls(crls)
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let verifier: Arc<dyn ClientCertVerifier> = Arc::new(RequireClientAuth(webpki));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(Arc::clone(&verifier))
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsState {
        config: Arc::new(config),
        verifier,
        trust_domains: trust_domains.to_vec(),
    })
}

/// webpki's client verifier, plus one rule: the leaf must carry the
/// clientAuth extended key usage. webpki refuses a certificate whose EKU
/// names other uses only (a server certificate), but accepts one with no
/// EKU extension at all, for any use; a vault that reads identities from
/// client certificates wants certificates issued for that.
#[derive(Debug)]
struct RequireClientAuth(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for RequireClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        let client_auth = X509Certificate::from_der(end_entity).is_ok_and(|(_, cert)| {
            cert.extended_key_usage()
                .ok()
                .flatten()
                .is_some_and(|eku| eku.value.client_auth)
        });
        if !client_auth {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
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
///
/// The connection can be closed from outside (a CRL reload revoked its
/// certificate, or the certificate expired): reads then see the end of the
/// stream, and HTTP/2 closes the connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
    /// Its entry in the registry of open connections, removed on drop.
    entry: Arc<ConnEntry>,
    registry: Arc<Connections>,
    /// Counts against `server.max_connections` until dropped.
    _slot: OwnedSemaphorePermit,
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        self.registry.remove(self.entry.id);
    }
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
        // Register first, then check: a close between the two still wakes us.
        self.entry.register(cx.waker());
        if self.entry.is_closed() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.entry.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
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
        if self.entry.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// One open connection, as the registry knows it.
struct ConnEntry {
    id: u64,
    /// The client's certificate chain, as presented (leaf first).
    chain: Vec<CertificateDer<'static>>,
    remote: SocketAddr,
    closed: AtomicBool,
    /// The task reading the connection, woken when it is closed.
    reader: Mutex<Option<Waker>>,
}

impl ConnEntry {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn register(&self, waker: &Waker) {
        let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if !reader.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *reader = Some(waker.clone());
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(waker) = self
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            waker.wake();
        }
    }
}

/// Every open mTLS connection with the chain its client presented, so that
/// a CRL reload or a certificate's expiry can end connections that a new
/// handshake would refuse (HTTP/2 keepalive would otherwise keep them open
/// for ever).
#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnEntry>>>,
}

impl Connections {
    fn add(&self, chain: Vec<CertificateDer<'static>>, remote: SocketAddr) -> Arc<ConnEntry> {
        let entry = Arc::new(ConnEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            chain,
            remote,
            closed: AtomicBool::new(false),
            reader: Mutex::new(None),
        });
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry.id, Arc::clone(&entry));
        entry
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every open connection whose client `tls` would refuse now:
    /// its chain (revoked by a CRL, expired, or no longer from a trusted
    /// CA), or its identity (a trust domain `tls.trust_domains` no longer
    /// accepts). Returns how many were closed.
    pub fn close_refused(&self, tls: &TlsState) -> usize {
        let open: Vec<Arc<ConnEntry>> = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut closed = 0;
        for entry in open {
            if entry.is_closed() {
                continue;
            }
            let refused = match tls.still_valid(&entry.chain) {
                Err(e) => Some(e.to_string()),
                Ok(()) => identity_of(&entry.chain, &tls.trust_domains)
                    .err()
                    .map(|e| e.to_string()),
            };
            if let Some(e) = refused {
                tracing::warn!(remote.addr = %entry.remote, error = %e, "closing a connection whose client certificate is no longer accepted");
                entry.close();
                closed += 1;
            }
        }
        closed
    }
}

/// What the accept loop needs besides its listener.
pub struct AcceptSettings {
    /// The TLS state in force; each handshake takes the current one.
    pub tls: Arc<Shared<TlsState>>,
    /// The registry open connections join.
    pub connections: Arc<Connections>,
    /// How long a client may take to finish the handshake.
    pub handshake_timeout: Duration,
    /// `server.max_connections`: connections (handshaking or open) at once.
    pub max_connections: usize,
}

/// The first pause after a failed accept (EMFILE and the like), doubled on
/// each failure in a row up to [`ACCEPT_BACKOFF_MAX`], so a process out of
/// descriptors does not spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow
/// client cannot hold up others), sending finished connections to `out`
/// until `stop` changes or `out` is closed. Past `max_connections`, a new
/// connection is closed at once (and logged, at most once a minute).
pub async fn accept_loop(
    listener: TcpListener,
    settings: AcceptSettings,
    out: mpsc::Sender<io::Result<TlsConn>>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut last_full_warning: Option<std::time::Instant> = None;
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    pair
                }
                Err(e) => {
                    tracing::warn!(error = %e, pause_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if last_full_warning.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(
                    remote.addr = %remote,
                    limit = settings.max_connections,
                    "connection refused: server.max_connections reached"
                );
                last_full_warning = Some(std::time::Instant::now());
            }
            drop(tcp);
            continue;
        };
        // Each handshake takes the configuration in force when it starts.
        let tls = settings.tls.current();
        let acceptor = TlsAcceptor::from(Arc::clone(&tls.config));
        let out = out.clone();
        let connections = Arc::clone(&settings.connections);
        let handshake_timeout = settings.handshake_timeout;
        tokio::spawn(async move {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let chain: Vec<CertificateDer<'static>> = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|chain| chain.iter().map(|c| c.clone().into_owned()).collect())
                        .unwrap_or_default();
                    let peer = peer_of(&chain, remote, &tls.trust_domains);
                    if let Err(e) = peer.identity.as_ref() {
                        tracing::warn!(remote.addr = %remote, error = %e, "client certificate has no usable identity");
                    }
                    let entry = connections.add(chain, remote);
                    let conn = TlsConn {
                        stream,
                        peer,
                        entry,
                        registry: connections,
                        _slot: slot,
                    };
                    // The receiver is gone only while shutting down.
                    let _ = out.send(Ok(conn)).await;
                }
                Ok(Err(e)) => {
                    tracing::info!(remote.addr = %remote, error = %e, "TLS handshake failed")
                }
                Err(_) => tracing::info!(remote.addr = %remote, "TLS handshake timed out"),
            }
        });
    }
}

fn peer_of(
    chain: &[CertificateDer<'static>],
    remote: SocketAddr,
    trust_domains: &[String],
) -> Peer {
    Peer {
        identity: Arc::new(identity_of(chain, trust_domains)),
        remote_addr: Some(remote),
    }
}

/// The identity a client chain gives, if `trust_domains` accepts it.
fn identity_of(
    chain: &[CertificateDer<'static>],
    trust_domains: &[String],
) -> Result<ClientId, IdentityError> {
    chain
        .first()
        .map_or(Err(IdentityError::NoCertificate), |leaf| {
            ClientId::from_certificate(leaf)
        })
        .and_then(|id| id.check_trust_domain(trust_domains))
}
