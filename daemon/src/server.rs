//! The gRPC server on a unix socket: socket ownership (directory 0700,
//! socket 0600, lock against a second daemon, stale socket removal) and the
//! serve loop, which takes its listener and shutdown future from the caller.

use std::{
    fs::{self, File, OpenOptions},
    future::Future,
    io::{Read, Seek, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
};

use chaos_proto::chaosd::v1::chaosd_server::ChaosdServer;
use nix::fcntl::{Flock, FlockArg};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
};
use tokio_stream::{StreamExt, wrappers::UnixListenerStream};
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::{process::clients, service::ChaosdService};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another chaosd is already serving on {socket} (pid {pid}); stop it first or pass --socket PATH")]
    Busy { socket: PathBuf, pid: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io { action, path: path.to_path_buf(), source }
}

/// The bound API socket. Holds the lock file for as long as it lives and
/// removes the socket file when dropped.
pub struct ApiSocket {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
    _lock: Flock<File>,
}

impl ApiSocket {
    /// Binds `path` (creating its directory 0700), refusing when another
    /// daemon holds `PATH.lock`. A stale socket file left by a killed daemon
    /// is replaced.
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.exists()
        {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err("create directory", dir))?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open lock file", &lock_path))?;
        let mut owner = String::new();
        let _ = file.read_to_string(&mut owner);
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let pid = owner.trim();
                return Err(SocketError::Busy {
                    socket: path.to_path_buf(),
                    pid: if pid.is_empty() { "unknown".into() } else { pid.into() },
                });
            }
            Err((_, e)) => return Err(io_err("lock", &lock_path)(e.into())),
        };
        lock.set_len(0).map_err(io_err("write lock file", &lock_path))?;
        lock.rewind().map_err(io_err("write lock file", &lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io_err("write lock file", &lock_path))?;

        match fs::remove_file(path) {
            Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket left by an earlier daemon"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale socket", path)(e)),
        }
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_err("bind", path))?;
        listener.set_nonblocking(true).map_err(io_err("set non-blocking", path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err("chmod 0600", path))?;
        Ok(Self { path: path.to_path_buf(), listener: Some(listener), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listener, registered with the current tokio runtime.
    pub fn take_listener(&mut self) -> std::io::Result<UnixListener> {
        UnixListener::from_std(self.listener.take().expect("listener taken once"))
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Serves the API on `listener` (and on the TLS port, when given) until
/// `shutdown` completes, then drains in-flight requests.
pub async fn run(
    listener: UnixListener,
    tls: Option<crate::tls::Incoming>,
    service: ChaosdService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(ClientConn::new));
    let closing = service.closing();
    let stopping = service.closing();
    // The server drains open streams before it returns: `Watch` streams
    // must end when the shutdown starts, or a watcher would hold it off.
    let shutdown = async move {
        shutdown.await;
        closing.cancel();
    };
    let api = ChaosdServer::new(service);
    let unix = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .add_service(api.clone())
        .serve_with_incoming_shutdown(incoming, shutdown);
    let Some(tls) = tls else {
        return unix.await;
    };
    // One shutdown for both: the unix server's cancels `closing`.
    let tcp = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(64)
        .add_service(api)
        .serve_with_incoming_shutdown(tls, async move { stopping.cancelled().await });
    tokio::try_join!(unix, tcp).map(|_| ())
}

/// An accepted connection, registered as a client of chaosd (by its peer
/// credentials) for as long as it is open, so that process faults leave
/// the process at the other end alone.
struct ClientConn {
    stream: UnixStream,
    _client: clients::Registration,
}

impl ClientConn {
    fn new(stream: UnixStream) -> Self {
        let pid = stream.peer_cred().ok().and_then(|c| c.pid());
        Self { _client: clients::register(pid), stream }
    }
}

impl Connected for ClientConn {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for ClientConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientConn {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_bind_is_refused_and_names_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/chaosd.sock");
        let first = ApiSocket::bind(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let err = ApiSocket::bind(&path).err().expect("second bind must fail");
        let msg = err.to_string();
        assert!(msg.contains("already serving") && msg.contains(&std::process::id().to_string()), "{msg}");
        drop(first);
        assert!(!path.exists(), "socket removed on drop");
        // A stale socket file (daemon killed) does not block a new daemon.
        std::os::unix::net::UnixListener::bind(&path).unwrap();
        let _again = ApiSocket::bind(&path).unwrap();
    }
}
