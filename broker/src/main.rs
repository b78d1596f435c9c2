//! `broker`: run a broker node, or `broker bench` to load any MQTT broker.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use broker::config::Config;

#[derive(Parser)]
#[command(name = "broker", about = "MQTT 3.1.1/5.0 broker node with durable sessions")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load client for any MQTT broker: throughput, latency, loss.
    Bench(Box<broker::bench::BenchArgs>),
    /// Inspect a running cluster node.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, their state, route counts, forward queue depths and the
    /// last resync, as a node sees them (its GET /cluster).
    Status(broker::cluster_status::StatusArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    node_name: Option<String>,
    /// "every-ack" or "group".
    #[arg(long)]
    fsync: Option<String>,
    #[arg(long)]
    group_commit_ms: Option<u64>,
    #[arg(long)]
    password_file: Option<PathBuf>,
    #[arg(long)]
    max_packet_size: Option<u32>,
    /// Threads of the event loop (1: a single thread, the default).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Backlog of the MQTT listener: connections the kernel completes and
    /// queues while the broker is busy; a burst beyond it stalls clients a
    /// second or more (SYN retransmission). Default: max_connections. The
    /// kernel caps it at net.core.somaxconn (a sysctl, per network
    /// namespace): raise that too for a larger backlog.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=i64::from(broker::config::MAX_LISTEN_BACKLOG)))]
    listen_backlog: Option<u32>,
    /// Cluster API (gRPC) listener, IP:PORT or IP (port 7000). With this or
    /// --join the node is part of a cluster.
    #[arg(long, value_name = "ADDR[:PORT]")]
    cluster_listen: Option<String>,
    /// Address peers use to reach this node's cluster listener, when not
    /// the listener's own (default: --cluster-listen).
    #[arg(long, value_name = "ADDR:PORT")]
    cluster_advertise: Option<String>,
    /// Static seeds: other nodes' cluster listeners, comma separated.
    #[arg(long, value_name = "HOST:PORT,...", value_delimiter = ',')]
    join: Vec<String>,
    /// Heartbeat interval towards each peer (ms).
    #[arg(long)]
    cluster_heartbeat_ms: Option<u64>,
    /// A peer silent for this long is suspect (ms).
    #[arg(long)]
    cluster_suspect_after_ms: Option<u64>,
    /// A peer silent for this long is down (ms).
    #[arg(long)]
    cluster_down_after_ms: Option<u64>,
    /// Forwards queued per peer beyond which new ones are dropped.
    #[arg(long, value_name = "N")]
    cluster_forward_queue: Option<usize>,
    /// A peer down longer than this (s) keeps at most
    /// --cluster-down-peer-max-queued forwards; the rest is dropped.
    #[arg(long, value_name = "SECS")]
    cluster_down_peer_keep_secs: Option<u64>,
    #[arg(long, value_name = "N")]
    cluster_down_peer_max_queued: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Bench(args)) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .thread_name("bench")
                .enable_all()
                .build()
                .context("starting tokio")?;
            rt.block_on(broker::bench::run(*args))
        }
        Some(Cmd::Cluster { cmd: ClusterCmd::Status(args) }) => broker::cluster_status::run(&args),
        None => {
            let cfg = config(cli.run)?;
            runtime(&cfg)?.block_on(run_broker(cfg))
        }
    }
}

/// The broker's event loop: by default one worker thread that reads, routes
/// and writes, so a message crosses no thread between the publisher's socket
/// and the subscribers' sockets (see architecture.md). The multi-threaded
/// scheduler even with one worker, so that `worker_threads` can spread
/// connections over more cores on machines that need it.
fn runtime(cfg: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    let slice = cfg.sched_slice_us;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads.max(1))
        // Named apart from a load client's tokio threads in top, perf and
        // /proc/PID/task.
        .thread_name("broker-loop")
        .on_thread_start(move || {
            if slice > 0
                && let Err(e) = broker::sched::set_thread_slice(slice)
            {
                tracing::warn!(error = %e, slice_us = slice, "sched_setattr: keeping the default time slice");
            }
        })
        .on_thread_unpark(broker::outbox::new_round)
        .enable_all()
        .build()
        .context("starting tokio")
}

fn config(a: RunArgs) -> anyhow::Result<Config> {
    let mut cfg = match &a.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(v) = a.mqtt_listen {
        cfg.mqtt_listen = v;
    }
    if let Some(v) = a.http_listen {
        cfg.http_listen = Some(v);
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = Some(v);
    }
    if let Some(v) = a.node_name {
        cfg.node_name = v;
    }
    if let Some(v) = a.fsync {
        cfg.fsync = v;
    }
    if let Some(v) = a.group_commit_ms {
        cfg.group_commit_ms = v;
    }
    if let Some(v) = a.password_file {
        cfg.password_file = Some(v);
    }
    if let Some(v) = a.max_packet_size {
        cfg.max_packet_size = v;
    }
    if let Some(v) = a.worker_threads {
        cfg.worker_threads = v;
    }
    if let Some(v) = a.listen_backlog {
        cfg.listen_backlog = Some(v);
    }
    if a.cluster_listen.is_some() {
        cfg.cluster_listen = a.cluster_listen;
    }
    if a.cluster_advertise.is_some() {
        cfg.cluster_advertise = a.cluster_advertise;
    }
    if !a.join.is_empty() {
        cfg.join = a.join;
    }
    if let Some(v) = a.cluster_heartbeat_ms {
        cfg.cluster_heartbeat_ms = v;
    }
    if let Some(v) = a.cluster_suspect_after_ms {
        cfg.cluster_suspect_after_ms = v;
    }
    if let Some(v) = a.cluster_down_after_ms {
        cfg.cluster_down_after_ms = v;
    }
    if let Some(v) = a.cluster_forward_queue {
        cfg.cluster_forward_queue = v;
    }
    if let Some(v) = a.cluster_down_peer_keep_secs {
        cfg.cluster_down_peer_keep_secs = v;
    }
    if let Some(v) = a.cluster_down_peer_max_queued {
        cfg.cluster_down_peer_max_queued = v;
    }
    cfg.fsync_policy()?;
    cfg.listen_backlog()?;
    cfg.cluster_listen()?;
    Ok(cfg)
}

async fn run_broker(cfg: Config) -> anyhow::Result<()> {
    let (listener, backlog) = broker::server::bind_mqtt(cfg.mqtt_listen, cfg.listen_backlog()?)
        .with_context(|| format!("binding MQTT listener {}", cfg.mqtt_listen))?;
    if backlog.granted < backlog.asked {
        let somaxconn = backlog.somaxconn.unwrap_or(backlog.granted);
        let raise = format!("sysctl -w net.core.somaxconn={}", backlog.asked);
        if cfg.listen_backlog.is_some() {
            tracing::warn!(
                asked = backlog.asked,
                somaxconn,
                "listen backlog capped at net.core.somaxconn; {raise} lifts the cap"
            );
        } else {
            // The default (max_connections) is capped on most hosts: worth
            // a line, not a warning on every start.
            tracing::info!(
                max_connections = cfg.max_connections,
                somaxconn,
                "listen backlog capped at net.core.somaxconn; {raise} lifts the cap"
            );
        }
    }
    let http = match cfg.http_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding HTTP listener {addr}"))?)
        }
        None => None,
    };
    let cluster = match cfg.cluster_listen()? {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding cluster listener {addr}"))?,
        ),
        None => None,
    };
    tracing::info!(
        node = %cfg.node_name,
        cluster = ?cluster.as_ref().and_then(|c| c.local_addr().ok()),
        mqtt = %listener.local_addr()?,
        backlog = backlog.granted,
        http = ?http.as_ref().and_then(|h| h.local_addr().ok()),
        data_dir = ?cfg.data_dir,
        fsync = %cfg.fsync,
        auth = cfg.password_file.is_some(),
        "broker listening (MQTT 3.1.1 and 5.0 on the same port)"
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        stop.cancel();
    });
    broker::server::run_node(cfg, listener, http, cluster, shutdown).await?;
    Ok(())
}
