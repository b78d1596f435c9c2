//! Wires the parts together: store, router, listeners.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Auth, AuthError};
use crate::config::{Config, ConfigError};
use crate::conn::{self, Shared};
use crate::metrics::Metrics;
use crate::router::Router;
use crate::store::{Loaded, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// The MQTT listener's backlog: what was asked for and what the kernel
/// grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub asked: u32,
    /// `asked`, or `net.core.somaxconn` if that is lower: `listen(2)`
    /// silently lowers a larger backlog to it.
    pub granted: u32,
    /// `net.core.somaxconn` of the network namespace, when readable.
    pub somaxconn: Option<u32>,
}

/// `net.core.somaxconn` of this process's network namespace.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok()?.trim().parse().ok()
}

/// Binds the MQTT listener with a backlog of `asked` (capped at
/// `net.core.somaxconn` as the kernel does). Tokio's `TcpListener::bind`
/// takes no backlog. Call inside a tokio runtime.
pub fn bind_mqtt(addr: SocketAddr, asked: u32) -> std::io::Result<(TcpListener, Backlog)> {
    let somaxconn = somaxconn();
    let granted = somaxconn.map_or(asked, |m| asked.min(m)).clamp(1, crate::config::MAX_LISTEN_BACKLOG);
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    // As tokio's bind: a restarted broker binds its port again while the
    // previous one's connections are in TIME_WAIT.
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(i32::try_from(granted).unwrap_or(i32::MAX))?;
    let listener = TcpListener::from_std(sock.into())?;
    Ok((listener, Backlog { asked, granted, somaxconn }))
}

/// How long a restarted cluster node waits for the routes of the peers it
/// knew before it serves MQTT: two link backoffs with room to spare.
const ROUTES_WAIT: Duration = Duration::from_secs(5);

/// Runs a broker on `listener` (and `http` for metrics) until `shutdown`.
/// Taking bound listeners lets tests use port 0.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<Arc<Metrics>, ServerError> {
    run_node(cfg, listener, http, None, shutdown).await
}

/// `run`, and a cluster node serving the Cluster API on `cluster` (the
/// cluster's settings come from `cfg`). Returns an error if the cluster
/// refused this node (its name is taken).
pub async fn run_node(
    cfg: Config,
    listener: TcpListener,
    http: Option<TcpListener>,
    cluster_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<Arc<Metrics>, ServerError> {
    let policy = cfg.fsync_policy()?;
    let metrics = Arc::new(Metrics::default());
    let auth = cfg.password_file.as_deref().map(Auth::load).transpose()?;
    let (store, mut loaded) = match &cfg.data_dir {
        Some(dir) => {
            let store = Store::open(dir)?;
            let loaded = store.load()?;
            let n: usize = loaded.sessions.values().map(|s| s.entries.len()).sum();
            tracing::info!(
                dir = %dir.display(),
                sessions = loaded.sessions.len(),
                messages = n,
                retained = loaded.retained.len(),
                ?policy,
                "store opened"
            );
            (Some(store.spawn(policy, metrics.clone())), loaded)
        }
        None => (None, Loaded::default()),
    };
    let cfg = Arc::new(cfg);
    let (router_tx, router_rx) = crate::inbox::inbox();
    // The cluster's state exists before the router, which reports the
    // routes it restores from disk to it; it starts serving after.
    let mut cluster = match &cluster_listener {
        Some(l) => {
            let bound = l.local_addr().map_err(|e| crate::config::ConfigError::ClusterListen(e.to_string()))?;
            let settings = cfg.cluster_settings(bound)?;
            let mut c = crate::cluster::Cluster::new(
                settings,
                router_tx.clone(),
                store.as_ref().map(crate::store::StoreHandle::sender),
                shutdown.clone(),
            );
            c.restore(std::mem::take(&mut loaded.cluster));
            Some(c)
        }
        None => None,
    };
    if let Some(c) = &cluster {
        // Before the HTTP listener answers: a scrape shows the cluster's
        // series from the first one on.
        let _ = metrics.extra.set(Box::new(c.metrics_renderer()));
    }
    let router = Router::new(cfg.clone(), metrics.clone(), store, loaded, cluster.as_ref().map(|c| c.outlet.clone()));
    let router_task = tokio::spawn(router.run(router_rx, router_tx.clone()));
    if let Some(h) = http {
        let view = cluster.as_ref().map(crate::cluster::Cluster::view);
        tokio::spawn(crate::http::serve(h, metrics.clone(), cfg.node_name.clone(), view, shutdown.clone()));
    }
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        metrics: metrics.clone(),
        router: router_tx,
        auth,
        next_id: AtomicU64::new(1),
        cluster: cluster.as_ref().map(|c| c.outlet.clone()),
    });
    if let (Some(c), Some(l)) = (cluster.as_mut(), cluster_listener) {
        c.start(l);
        // MQTT clients wait in the listen backlog meanwhile: a publish
        // acknowledged before the peers' routes are back reaches none of
        // their subscribers.
        let missing = c.routes_learned(ROUTES_WAIT).await;
        if !missing.is_empty() {
            tracing::warn!(peers = ?missing, "serving MQTT without the routes of these peers (not heard from since the restart)");
        }
    }
    let fatal = async {
        match &cluster {
            Some(c) => c.fatal().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(fatal);
    let mut failed = None;
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if metrics.connections_current.load(Relaxed) as usize >= cfg.max_connections {
                    tracing::warn!(%peer, "closing connection: max_connections reached");
                    continue;
                }
                tracker.spawn(conn::serve(stream, peer, shared.clone(), shutdown.clone()));
            }
            _ = shutdown.cancelled() => break,
            e = &mut fatal => {
                failed = Some(e);
                shutdown.cancel();
                break;
            }
        }
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    shared.router.stop();
    drop(shared);
    let _ = router_task.await;
    if let Some(c) = &cluster {
        c.close_store();
    }
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(metrics),
    }
}
