//! `chaosd serve`: the privileged chaos daemon.

use std::{
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use chaosd::{privilege, probe, server, service::ChaosdService};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "chaosd", version, about = "Node-level chaos daemon: network, stress and process faults")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the chaosd API (needs root).
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Unix socket of the API (directory created 0700, socket 0600).
    #[arg(long, default_value = "/run/chaosd/chaosd.sock", env = "CHAOSD_SOCKET")]
    socket: PathBuf,
    /// Directory of the journal.
    #[arg(long, default_value = "/var/lib/chaosd")]
    state_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHAOSD_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaosd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    privilege::check()?;
    create_private_dir(&args.state_dir)?;
    let mut socket = server::ApiSocket::bind(&args.socket)?;
    let dropped = privilege::drop_unneeded().context("dropping unneeded capabilities")?;
    tracing::debug!(?dropped, "dropped capabilities");

    let host = probe::probe_host();
    log_probe(&host);
    let service = ChaosdService::new(Arc::new(host), args.state_dir.display().to_string());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async move {
        let listener = socket.take_listener().context("registering the API socket")?;
        tracing::info!(socket = %socket.path().display(), version = chaosd::VERSION, "chaosd serving");
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        server::run(listener, service, shutdown).await.context("serving the API")?;
        drop(socket);
        tracing::info!("chaosd stopped");
        Ok(())
    })
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))
}

fn log_probe(host: &probe::HostProbe) {
    for f in host.fault_availability() {
        if f.available {
            tracing::info!(fault = f.fault, "available");
        } else {
            tracing::warn!(fault = f.fault, reason = %f.reason, "unavailable");
        }
    }
}
