//! chaosd's API over TCP: TLS 1.3 only (rustls), a client certificate signed
//! by `--tls-client-ca` required, optionally only for the subjects on an
//! allow-list. Nothing else is offered on that port: a client that does not
//! speak TLS is turned away before any gRPC byte is read.
//!
//! Everything the configuration names is read and checked at start
//! (`TlsSettings::load`), so a wrong file stops the daemon with one line
//! before anything is served.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    CertificateError, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `chaosd serve --listen-tls ...` names.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Client certificate subjects (CN or a SAN) allowed; empty: any
    /// certificate the CA signed.
    pub allow_subjects: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}: {detail}")]
    Pem { what: &'static str, path: PathBuf, expected: &'static str, detail: String },
    #[error("{what} {path} is not a valid X.509 certificate: {detail}")]
    BadCert { what: &'static str, path: PathBuf, detail: String },
    #[error("server certificate {path} expired on {date}: make a new one (`chaosctl certs server`)")]
    Expired { path: PathBuf, date: String },
    #[error("server certificate {path} is not valid before {date}: check the clock or make a new one")]
    NotYetValid { path: PathBuf, date: String },
    #[error("--tls-key {key} is not the private key of --tls-cert {cert}: give the key the certificate was made for")]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("--tls-cert {cert} / --tls-key {key}: {detail}")]
    Config { cert: PathBuf, key: PathBuf, detail: String },
    #[error("--tls-client-ca {path}: {detail}")]
    ClientCa { path: PathBuf, detail: String },
    #[error("cannot listen on {addr} (--listen-tls)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// rustls with *ring*: builds with a C compiler alone (aws-lc-rs wants
/// cmake and several minutes more on a 2-core machine). rustls deprecated it
/// for lacking post-quantum key exchange; X25519 is what the clients offer.
#[expect(deprecated, reason = "ring has no post-quantum key exchange; see above")]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A checked TLS configuration, ready to serve.
pub struct TlsSettings {
    pub listen: SocketAddr,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings").field("listen", &self.listen).finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Seconds since the epoch, and the date, of a validity bound.
fn bound(t: &x509_parser::time::ASN1Time) -> (i64, String) {
    (t.timestamp(), t.to_string())
}

impl TlsSettings {
    /// Reads and checks every file; builds the TLS 1.3 server configuration.
    pub fn load(o: &TlsOptions) -> Result<Self, TlsError> {
        let chain = certs("server certificate", &o.cert)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| TlsError::BadCert {
            what: "server certificate",
            path: o.cert.clone(),
            detail: e.to_string(),
        })?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let (after, after_date) = bound(&parsed.validity().not_after);
        if after < now {
            return Err(TlsError::Expired { path: o.cert.clone(), date: after_date });
        }
        let (before, before_date) = bound(&parsed.validity().not_before);
        if before > now {
            return Err(TlsError::NotYetValid { path: o.cert.clone(), date: before_date });
        }
        let key_pem = read("private key", &o.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
            what: "private key",
            path: o.key.clone(),
            expected: "private key (PKCS#8, PKCS#1 or SEC1)",
            detail: e.to_string(),
        })?;

        let mut roots = RootCertStore::empty();
        for c in certs("client CA", &o.client_ca)? {
            roots.add(c).map_err(|e| TlsError::ClientCa {
                path: o.client_ca.clone(),
                detail: format!("not a usable CA: {e}"),
            })?;
        }
        let provider = crate::tls::provider();
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsError::ClientCa { path: o.client_ca.clone(), detail: e.to_string() })?;
        let verifier: Arc<dyn ClientCertVerifier> = if o.allow_subjects.is_empty() {
            webpki
        } else {
            Arc::new(AllowList { inner: webpki, subjects: o.allow_subjects.clone() })
        };
        let config_err = |e: rustls::Error| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch { key: o.key.clone(), cert: o.cert.clone() },
            e => TlsError::Config { cert: o.cert.clone(), key: o.key.clone(), detail: e.to_string() },
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(config_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(config_err)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { listen: o.listen, acceptor: TlsAcceptor::from(Arc::new(config)) })
    }

    /// Binds the TCP port (before any runtime exists, so that the port is
    /// known when the protected ports are set).
    pub fn bind(self) -> Result<TlsListener, TlsError> {
        let bind_err = |source| TlsError::Bind { addr: self.listen, source };
        let listener = std::net::TcpListener::bind(self.listen).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        Ok(TlsListener { listener, acceptor: self.acceptor, local })
    }
}

/// Connections that passed the handshake, for the gRPC server.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>>;

/// The bound TLS port.
pub struct TlsListener {
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    local: SocketAddr,
}

impl TlsListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Connections that completed the handshake with an accepted client
    /// certificate. Each handshake runs in a task of its own, so a slow or
    /// silent client holds up nobody; a refused one is logged in one line.
    /// Call within a tokio runtime.
    pub fn incoming(self) -> std::io::Result<Incoming> {
        let listener = TcpListener::from_std(self.listener)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    // The server stopped: stop accepting.
                    () = tx.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a TCP connection on the TLS port");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = self.acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, tcp)).await {
                        Ok(Ok(conn)) => {
                            let _ = tx.send(Ok(conn)).await;
                        }
                        Ok(Err(Refused(Some(why)))) => tracing::warn!(%peer, "refused an API connection: {why}"),
                        Ok(Err(Refused(None))) => {}
                        Err(_) => tracing::warn!(
                            %peer,
                            "refused an API connection: no TLS handshake within {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        ),
                    }
                });
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Why a connection was turned away (`None`: already logged).
struct Refused(Option<String>);

async fn handshake(acceptor: &TlsAcceptor, tcp: TcpStream) -> Result<TlsConn, Refused> {
    // A TLS connection starts with a handshake record (content type 22).
    // Anything else is a client without TLS, which would otherwise show up
    // as a cryptic record-layer error.
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Err(Refused(Some("the client closed the connection before any TLS handshake".into()))),
        Ok(_) if first[0] != 0x16 => {
            return Err(Refused(Some(
                "the client does not speak TLS (plaintext?): this port serves TLS 1.3 with client certificates only"
                    .into(),
            )));
        }
        Ok(_) => {}
        Err(e) => return Err(Refused(Some(format!("reading from the client: {e}")))),
    }
    let local = tcp.local_addr().ok();
    let remote = tcp.peer_addr().ok();
    match acceptor.accept(tcp).await {
        Ok(stream) => Ok(TlsConn { stream, info: TcpConnectInfo { local_addr: local, remote_addr: remote } }),
        Err(e) => Err(Refused(describe(&e))),
    }
}

/// A refused handshake in words (`None`: the allow-list logged it).
fn describe(e: &std::io::Error) -> Option<String> {
    let Some(tls) = e.get_ref().and_then(|s| s.downcast_ref::<rustls::Error>()) else {
        return Some(format!("TLS handshake failed: {e}"));
    };
    use rustls::Error as E;
    Some(match tls {
        E::NoCertificatesPresented => {
            "the client sent no certificate (one signed by --tls-client-ca is required)".into()
        }
        E::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => return None,
        E::InvalidCertificate(c) => format!("the client's certificate was refused: {}", cert_problem(c)),
        E::PeerIncompatible(p) => format!("the client cannot do what this port requires (TLS 1.3): {p:?}"),
        E::AlertReceived(a) => format!("the client aborted the handshake ({a:?}): it does not trust this server?"),
        other => format!("TLS handshake failed: {other}"),
    })
}

fn cert_problem(c: &CertificateError) -> String {
    match c {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "it has expired".into(),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "it is not valid yet".into(),
        // BadSignature: signed by a CA with the same name but another key.
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            "it is not signed by --tls-client-ca (unknown CA)".into()
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "it is not a client certificate (extended key usage)".into()
        }
        other => other.to_string(),
    }
}

/// The CN values and subject alternative names (DNS, IP, e-mail) of a
/// certificate: the names `--tls-allow-subject` is compared with.
pub fn subject_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) | GeneralName::RFC822Name(d) => names.push((*d).to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string()),
                    16 => names.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    names
}

/// The CA's verdict first, then the subject: a certificate the CA signed
/// whose names are not on the list ends the handshake with `access_denied`,
/// which chaosctl reports as such.
#[derive(Debug)]
struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    subjects: Vec<String>,
}

impl ClientCertVerifier for AllowList {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let names = subject_names(end_entity);
        if names.iter().any(|n| self.subjects.contains(n)) {
            return Ok(ClientCertVerified::assertion());
        }
        tracing::warn!(
            "refused an API connection: the client certificate's names ({}) are not on --tls-allow-subject ({})",
            names.join(", "),
            self.subjects.join(", ")
        );
        Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// An accepted TLS connection.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
