//! A minimal HTTP/1.1 endpoint for `/metrics`, `/health` and `/cluster`: three
//! GET routes do not justify an HTTP framework.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::cluster::View;
use crate::metrics::Metrics;

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    node: String,
    cluster: Option<View>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((s, _)) = r else { continue };
                let (m, n, c) = (metrics.clone(), node.clone(), cluster.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(5), answer(s, &m, &n, c.as_ref())).await;
                });
            }
            _ = shutdown.cancelled() => break,
        }
    }
}

/// `/health`: "ok" while every known peer is up, "degraded" (still 200: the
/// node serves its clients) naming the others.
fn health(node: &str, cluster: Option<&View>) -> String {
    let down = cluster.map(View::peers_down).unwrap_or_default();
    let v = if down.is_empty() {
        serde_json::json!({"status": "ok", "node": node})
    } else {
        serde_json::json!({"status": "degraded", "node": node, "peers_down": down})
    };
    format!("{v}\n")
}

async fn answer(mut s: TcpStream, metrics: &Metrics, node: &str, cluster: Option<&View>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render(node)),
        ("GET", "/health") => ("200 OK", "application/json", health(node, cluster)),
        ("GET", "/cluster") => match cluster {
            Some(c) => ("200 OK", "application/json", format!("{}\n", serde_json::to_string(&c.status())?)),
            None => (
                "404 Not Found",
                "text/plain",
                "this node is not clustered (no --cluster-listen or --join)\n".to_owned(),
            ),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "method not allowed\n".to_owned()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}
