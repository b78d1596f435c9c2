//! The metrics listener: `GET /metrics` on `--metrics-listen ADDR:PORT`,
//! served by axum (already in the tree through tonic).

use std::{future::Future, io, net::SocketAddr, sync::Arc};

use axum::{Router, http::header, response::IntoResponse, routing::get};

use super::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "cannot serve metrics on {addr}: the address is already in use; stop what listens there or pass another --metrics-listen ADDR:PORT"
    )]
    InUse { addr: SocketAddr },
    /// The io error is part of the one line the daemon prints, not a
    /// `source` that `{:#}` would print a second time.
    #[error("cannot serve metrics on {addr}: {error}; pass another --metrics-listen ADDR:PORT")]
    Other { addr: SocketAddr, error: io::Error },
}

/// Binds the listener. Called before the daemon touches anything, so a
/// taken port stops the start at once.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    let listener = std::net::TcpListener::bind(addr).map_err(|error| match error.kind() {
        io::ErrorKind::AddrInUse => ListenError::InUse { addr },
        _ => ListenError::Other { addr, error },
    })?;
    listener.set_nonblocking(true).map_err(|error| ListenError::Other { addr, error })?;
    Ok(listener)
}

/// Starts serving `/metrics` and counting recoveries from `events` on the
/// current runtime, until `stop` is cancelled.
pub fn spawn(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    events: tokio::sync::broadcast::Receiver<crate::engine::Event>,
    stop: tokio_util::sync::CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics on /metrics");
    }
    tokio::spawn(metrics.clone().follow(events));
    tokio::spawn(async move {
        if let Err(e) = serve(listener, metrics, stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
}

/// Serves `/metrics` until `shutdown` completes. Each scrape reads the
/// engine on a blocking thread.
pub async fn serve(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                match tokio::task::spawn_blocking(move || metrics.encode()).await {
                    Ok(text) => {
                        ([(header::CONTENT_TYPE, prometheus_client::encoding::prometheus_text::CONTENT_TYPE)], text)
                            .into_response()
                    }
                    Err(_) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "metrics: the scrape panicked; see chaosd's log\n",
                    )
                        .into_response(),
                }
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_one_line_naming_the_address_and_the_option() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let msg = bind(addr).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "{msg}");
        assert!(msg.contains(&addr.to_string()) && msg.contains("already in use"), "{msg}");
        assert!(msg.contains("--metrics-listen"), "{msg}");
        // An address this host does not have: the kernel's reason, once.
        let msg = format!("{:#}", anyhow::Error::from(bind("192.0.2.1:9464".parse().unwrap()).unwrap_err()));
        assert_eq!(msg.matches("Cannot assign requested address").count(), 1, "{msg}");
    }
}
