//! chaosctl's side of chaosd's TLS port: the client configuration (TLS 1.3,
//! the CA that signed chaosd's certificate, our certificate and key), the
//! connection, and TLS failures in one line that says which side refused
//! what.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    AlertDescription, CertificateError, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

/// `--endpoint https://HOST:PORT` with its files.
#[derive(Clone, Debug)]
pub struct TlsEndpoint {
    /// As the user wrote it, for messages.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsEndpoint {
    /// Checks the endpoint and which files go with it (files are read at
    /// connect time, so that `--check` of a plan needs none of them).
    pub fn new(url: &str, ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Self, String> {
        let (host, port) = parse_url(url)?;
        let ca = ca.ok_or_else(|| {
            format!("endpoint {url} needs a CA (--ca or CHAOSCTL_CA): the certificate that signed chaosd's")
        })?;
        match (&cert, &key) {
            (Some(_), None) => return Err("a client certificate (--cert) needs its key (--key)".into()),
            (None, Some(_)) => return Err("a key (--key) needs its certificate (--cert)".into()),
            _ => {}
        }
        Ok(Self { url: url.to_string(), host, port, ca, cert, key })
    }

    /// The client configuration: TLS 1.3 only, our certificate if any.
    fn config(&self) -> Result<ClientConfig, String> {
        let mut roots = RootCertStore::empty();
        for c in read_certs("--ca", &self.ca)? {
            roots.add(c).map_err(|e| format!("--ca {}: not a usable CA certificate: {e}", self.ca.display()))?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS set-up: {e}"))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs("--cert", cert)?;
                let pem = std::fs::read(key).map_err(|e| format!("cannot read --key {}: {e}", key.display()))?;
                let der = PrivateKeyDer::from_pem_slice(&pem)
                    .map_err(|e| format!("--key {} holds no PEM private key: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, der).map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "--key {} is not the private key of --cert {}: give the key the certificate was made for",
                        key.display(),
                        cert.display()
                    ),
                    e => format!("--cert {} / --key {}: {e}", cert.display(), key.display()),
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A TCP connection to the endpoint with the TLS handshake done. An
    /// error's message is already the line to show.
    pub async fn dial(self: Arc<Self>, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
        let name = match self.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(self.host.clone())
                .map_err(|_| Described::io(format!("'{}' is not a host name or an IP address", self.host)))?,
        };
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| Described::io(format!("cannot reach chaosd at {}: {e}", self.url)))?;
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| Described::io(describe_io(&self, &e).unwrap_or_else(|| format!("{}: TLS: {e}", self.url))))
    }

    /// Whether the daemon accepts us. In TLS 1.3 the server judges the
    /// client's certificate after the client's side of the handshake is
    /// done, so its refusal (an alert) arrives with the first read, where a
    /// gRPC call may see only a closed connection. One read on a connection
    /// of our own tells which: the daemon's HTTP/2 settings, or its alert.
    pub async fn preflight(self: Arc<Self>, config: Arc<ClientConfig>) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let url = self.url.clone();
        let mut s = self.clone().dial(config).await.map_err(|e| explain(&self, &e).unwrap_or_else(|| e.to_string()))?;
        let said = async {
            // The HTTP/2 client preface and an empty SETTINGS frame.
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await?;
            s.flush().await?;
            let mut buf = [0u8; 64];
            s.read(&mut buf).await
        };
        match tokio::time::timeout(std::time::Duration::from_secs(10), said).await {
            Ok(Ok(n)) if n > 0 => Ok(()),
            Ok(Ok(_)) => Err(format!("chaosd at {url} closed the connection after the TLS handshake")),
            Ok(Err(e)) => Err(explain(&self, &e).unwrap_or_else(|| format!("chaosd at {url}: {e}"))),
            Err(_) => Err(format!("chaosd at {url} did not answer within 10 s after the TLS handshake")),
        }
    }

    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        self.config().map(Arc::new)
    }
}

/// *ring*, as chaosd: it builds with a C compiler alone.
#[expect(deprecated, reason = "ring has no post-quantum key exchange; the daemon offers none either")]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{flag} {} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// `https://HOST:PORT` (HOST a name, an IPv4 address or [IPv6]).
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        if url.starts_with("http://") {
            return Err(format!(
                "endpoint {url}: chaosd's TCP API is TLS only: write https://HOST:PORT and pass --ca, --cert and --key"
            ));
        }
        return Err(format!("endpoint {url}: write https://HOST:PORT (e.g. https://node1:7443)"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, p),
        _ => return Err(format!("endpoint {url}: give the port, e.g. https://node1:7443")),
    };
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.contains(['/', '@', '[', ']']) || (host.contains(':') && host.parse::<IpAddr>().is_err()) {
        return Err(format!("endpoint {url}: '{host}' is not a host name or an IP address"));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("endpoint {url}: '{port}' is not a port (1-65535)")),
    };
    Ok((host.to_string(), port))
}

/// An error whose message is the whole line to show the user.
#[derive(Debug)]
pub struct Described(pub String);

impl std::fmt::Display for Described {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Described {}

impl Described {
    fn io(msg: String) -> std::io::Error {
        std::io::Error::other(Described(msg))
    }
}

/// The user's line for a failure somewhere in `err`'s chain of sources: a
/// message made by `dial`, or a TLS alert the server sent after the
/// handshake (in TLS 1.3 the server judges the client's certificate only
/// after the client considers the handshake done, so the refusal arrives
/// with the first request).
pub fn explain(ep: &TlsEndpoint, err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(d) = e.downcast_ref::<Described>() {
            return Some(d.0.clone());
        }
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return Some(describe(ep, t));
        }
        // rustls's reader reports an alert that arrives with data as text.
        if let Some(name) = e.to_string().strip_prefix("received fatal alert: ") {
            let alert =
                ALERTS.iter().find(|a| format!("{a:?}") == name).copied().unwrap_or(AlertDescription::Unknown(0));
            return Some(describe(ep, &rustls::Error::AlertReceived(alert)));
        }
        // io::Error's own `source` skips the error it wraps.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            cur = Some(inner);
            continue;
        }
        cur = e.source();
    }
    None
}

/// The alerts `describe` words, as rustls prints them.
const ALERTS: [AlertDescription; 6] = [
    AlertDescription::CertificateRequired,
    AlertDescription::UnknownCA,
    AlertDescription::CertificateExpired,
    AlertDescription::AccessDenied,
    AlertDescription::ProtocolVersion,
    AlertDescription::DecryptError,
];

fn describe_io(ep: &TlsEndpoint, e: &std::io::Error) -> Option<String> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).map(|t| describe(ep, t))
}

fn describe(ep: &TlsEndpoint, e: &rustls::Error) -> String {
    let at = &ep.url;
    let ca = ep.ca.display();
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            // BadSignature: a CA of the same name as --ca, not the same key.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                format!(
                    "chaosd at {at}: its certificate is not signed by --ca {ca} (unknown CA): pass the CA that signed it"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("chaosd at {at}: its certificate has expired: make it a new one (chaosctl certs server)")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("chaosd at {at}: its certificate is not valid yet (check the clocks)")
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "chaosd at {at}: its certificate is not for '{}' (name mismatch): connect by a name or address the \
                 certificate has, or make one with that --name/--addr",
                ep.host
            ),
            other => format!("chaosd at {at}: its certificate is not acceptable: {other}"),
        },
        rustls::Error::AlertReceived(a) => match a {
            AlertDescription::CertificateRequired => format!(
                "chaosd at {at} refused the connection: it requires a client certificate (pass --cert and --key, or \
                 CHAOSCTL_CERT and CHAOSCTL_KEY)"
            ),
            // A CA of the same name but another key: the signature fails.
            AlertDescription::UnknownCA | AlertDescription::DecryptError => format!(
                "chaosd at {at} refused the client certificate: it is not signed by a CA the daemon trusts \
                 (its --tls-client-ca)"
            ),
            AlertDescription::CertificateExpired => {
                format!(
                    "chaosd at {at} refused the client certificate: it has expired (chaosctl certs client makes a new one)"
                )
            }
            AlertDescription::AccessDenied => format!(
                "chaosd at {at} refused the client certificate: its subject is not on the daemon's --tls-allow-subject list"
            ),
            AlertDescription::ProtocolVersion => {
                format!("chaosd at {at} refused the connection: it speaks TLS 1.3 only")
            }
            other => format!("chaosd at {at} refused the connection (TLS alert {other:?})"),
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("{at} did not answer with TLS: is that chaosd's --listen-tls port (and not a plaintext service)?")
        }
        rustls::Error::PeerIncompatible(p) => format!("chaosd at {at}: no common TLS 1.3 parameters ({p:?})"),
        other => format!("chaosd at {at}: TLS: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("https://node1:7443").unwrap(), ("node1".into(), 7443));
        assert_eq!(parse_url("https://127.0.0.1:7443/").unwrap(), ("127.0.0.1".into(), 7443));
        assert_eq!(parse_url("https://[::1]:7443").unwrap(), ("::1".into(), 7443));
        assert!(parse_url("http://node1:7443").unwrap_err().contains("TLS only"));
        assert!(parse_url("https://node1").unwrap_err().contains("give the port"));
        assert!(parse_url("https://node1:0").unwrap_err().contains("not a port"));
        assert!(parse_url("https://a/b:7443").unwrap_err().contains("not a host name"));
        assert!(parse_url("node1:7443").unwrap_err().contains("https://HOST:PORT"));
    }

    #[test]
    fn files_that_go_together() {
        let ca = Some(PathBuf::from("ca.pem"));
        assert!(TlsEndpoint::new("https://a:1", None, None, None).unwrap_err().contains("needs a CA"));
        assert!(TlsEndpoint::new("https://a:1", ca.clone(), Some("c".into()), None).unwrap_err().contains("--key"));
        assert!(TlsEndpoint::new("https://a:1", ca, None, None).is_ok());
    }
}
