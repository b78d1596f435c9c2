//! Connecting to chaosd over its unix socket, and turning failures into one
//! line a person can act on.

use std::path::{Path, PathBuf};

use chaos_proto::chaosd::v1::chaosd_client::ChaosdClient;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::TlsEndpoint;

/// A failure to show the user: the message and the exit code.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: u8,
}

impl CliError {
    /// Exit code 1: the daemon refused or failed the request.
    pub fn refused(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: 1 }
    }
    /// Exit code 2: bad usage or no daemon.
    pub fn usage(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: 2 }
    }
}

/// Exit status when the reader of stdout went away (`chaosctl list | head
/// -1`): the status a shell shows for a writer ended by SIGPIPE (128 + 13),
/// so scripts see what they see from other tools, and no message.
pub const CLOSED_PIPE: u8 = 141;

impl CliError {
    /// The output pipe was closed by its reader: end quietly.
    pub fn closed_pipe() -> Self {
        Self { message: String::new(), code: CLOSED_PIPE }
    }

    pub fn is_closed_pipe(&self) -> bool {
        self.code == CLOSED_PIPE && self.message.is_empty()
    }
}

/// A failed write to stdout.
impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Self::closed_pipe();
        }
        Self::refused(format!("cannot write the output to stdout: {e}; redirect it where it can be written"))
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        let code = s.code();
        // Transport failures (the daemon died or closed the connection) come
        // back as Unavailable/Unknown/Internal with an h2 or transport message.
        let lost = matches!(code, tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal)
            && (s.message().contains("transport")
                || s.message().contains("h2 protocol")
                || s.message().contains("connection"));
        if lost {
            return Self::usage(format!("lost the connection to chaosd (did it stop?): {}", s.message()));
        }
        let kind = match code {
            tonic::Code::InvalidArgument => "invalid argument",
            tonic::Code::NotFound => "not found",
            tonic::Code::FailedPrecondition => "failed precondition",
            tonic::Code::AlreadyExists => "conflict",
            tonic::Code::Unavailable => "unavailable",
            tonic::Code::Unimplemented => "not implemented",
            _ => "error",
        };
        Self::refused(format!("{kind}: {}", s.message()))
    }
}

/// Where chaosd is: its unix socket (the default) or its TLS port.
#[derive(Clone, Debug)]
pub enum Daemon {
    Socket(PathBuf),
    Tls(std::sync::Arc<TlsEndpoint>),
}

impl std::fmt::Display for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Daemon::Socket(p) => write!(f, "{}", p.display()),
            Daemon::Tls(t) => f.write_str(&t.url),
        }
    }
}

impl Daemon {
    /// The socket, or the endpoint when one is given (with its files).
    pub fn new(
        socket: &Path,
        endpoint: Option<&str>,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Self, String> {
        match endpoint {
            None => {
                if ca.is_some() || cert.is_some() || key.is_some() {
                    return Err("--ca, --cert and --key go with --endpoint https://HOST:PORT (or CHAOSCTL_ENDPOINT); \
                                without one chaosctl uses the unix socket"
                        .into());
                }
                Ok(Daemon::Socket(socket.to_path_buf()))
            }
            Some(url) => Ok(Daemon::Tls(std::sync::Arc::new(TlsEndpoint::new(url, ca, cert, key)?))),
        }
    }
}

pub async fn connect(daemon: &Daemon) -> Result<ChaosdClient<Channel>, CliError> {
    match daemon {
        Daemon::Socket(socket) => connect_socket(socket).await,
        Daemon::Tls(ep) => connect_tls(ep).await,
    }
}

async fn connect_tls(ep: &std::sync::Arc<TlsEndpoint>) -> Result<ChaosdClient<Channel>, CliError> {
    let config = ep.client_config().map_err(CliError::usage)?;
    ep.clone().preflight(config.clone()).await.map_err(CliError::usage)?;
    let dial = ep.clone();
    // As for the socket, the URI is unused: the connector dials and does TLS.
    let channel = Endpoint::from_static("http://chaosd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (ep, config) = (dial.clone(), config.clone());
            async move { ep.dial(config).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| {
            CliError::usage(
                crate::tls::explain(ep, &e).unwrap_or_else(|| format!("cannot reach chaosd at {}: {e}", ep.url)),
            )
        })?;
    Ok(ChaosdClient::new(channel))
}

/// A failed request to a daemon: a TLS refusal (which, in TLS 1.3, comes
/// with the first request) in the words of [`crate::tls::explain`], else as
/// for any request.
pub fn request_error(daemon: &Daemon, s: tonic::Status) -> CliError {
    if let Daemon::Tls(ep) = daemon
        && let Some(line) = crate::tls::explain(ep, &s)
    {
        return CliError::usage(line);
    }
    CliError::from(s)
}

async fn connect_socket(socket: &Path) -> Result<ChaosdClient<Channel>, CliError> {
    // Check reachability first so the error names the socket and the cause.
    if let Err(e) = UnixStream::connect(socket).await {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => "permission denied: run chaosctl with sudo".to_string(),
            _ => format!("is `sudo chaosd serve` running? ({e})"),
        };
        return Err(CliError::usage(format!("cannot reach chaosd at {}: {hint}", socket.display())));
    }
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = Endpoint::from_static("http://chaosd.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .map_err(|e| CliError::usage(format!("cannot reach chaosd at {}: {e}", socket.display())))?;
    Ok(ChaosdClient::new(channel))
}
