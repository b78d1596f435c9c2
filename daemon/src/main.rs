//! `chaosd serve`: the privileged chaos daemon.

use std::{
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use chaosd::{
    engine::{Drivers, Engine, Slot},
    journal::{self, Journal},
    owner::Owner,
    privilege, probe, server,
    service::ChaosdService,
};
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
    Serve(Box<ServeArgs>),
    /// A stressor started by the daemon (internal).
    #[command(hide = true)]
    Stressor(chaosd::stress::worker::StressorArgs),
    /// Resumes paused processes if the daemon dies (internal).
    #[command(hide = true)]
    PauseGuardian(chaosd::process::guardian::GuardianArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Unix socket of the API (directory created 0700, socket 0600).
    #[arg(long, default_value = "/run/chaosd/chaosd.sock", env = "CHAOSD_SOCKET")]
    socket: PathBuf,
    /// Directory of the journal.
    #[arg(long, default_value = "/var/lib/chaosd")]
    state_dir: PathBuf,
    /// Dead man's switch: network faults stop this long after the daemon
    /// stops refreshing its heartbeat (e.g. killed).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    grace: std::time::Duration,
    /// chaosd's directory on bpffs, where programs and maps are pinned so a
    /// restarted daemon adopts them.
    #[arg(long, default_value = "/sys/fs/bpf/chaosd")]
    bpf_dir: PathBuf,
    /// Ports never matched by a network fault (repeatable).
    #[arg(long = "protect-port", default_values_t = [22u16], value_parser = protected_port)]
    protect_ports: Vec<u16>,
    /// Serve Prometheus metrics over HTTP on ADDR:PORT at /metrics (e.g.
    /// 127.0.0.1:9464); off when absent. Unauthenticated: keep it on
    /// loopback or a trusted network.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Also serve the API over TCP on ADDR:PORT: TLS 1.3 only, with a client
    /// certificate signed by --tls-client-ca required. The port joins the
    /// protected ports.
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    listen_tls: Option<std::net::SocketAddr>,
    /// The server's certificate chain (PEM), for --listen-tls.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM), for --listen-tls.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign the clients' certificates.
    #[arg(long, value_name = "FILE", requires = "listen_tls")]
    tls_client_ca: Option<PathBuf>,
    /// Accept only client certificates with this subject (its CN or one of
    /// its subject alternative names); repeatable. Default: any the CA signed.
    #[arg(long = "tls-allow-subject", value_name = "NAME", requires = "listen_tls")]
    tls_allow_subjects: Vec<String>,
}

/// A port to protect: 1..65535. Port 0 is no port a packet carries, so
/// protecting it would protect nothing while looking as if it did.
fn protected_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(format!("'{s}' is not a port: give a port from 1 to 65535 (22 is protected by default)")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Stressor(args) = cli.command {
        return chaosd::stress::worker::run(args);
    }
    if let Command::PauseGuardian(args) = cli.command {
        return chaosd::process::guardian::run(args);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHAOSD_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Stressor(_) | Command::PauseGuardian(_) => unreachable!("dispatched before logging is set up"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaosd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(mut args: ServeArgs) -> anyhow::Result<()> {
    privilege::check()?;
    // Bound before anything is created, locked or probed: a taken port
    // stops the start with nothing done.
    let metrics_listener = args.metrics_listen.map(chaosd::metrics::http::bind).transpose()?;
    // Every TLS file is read and checked before anything is bound.
    let tls = match (&args.listen_tls, &args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(listen), Some(cert), Some(key), Some(ca)) => {
            let settings = chaosd::tls::TlsSettings::load(&chaosd::tls::TlsOptions {
                listen: *listen,
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
                allow_subjects: args.tls_allow_subjects.clone(),
            })?;
            Some(settings)
        }
        _ => None,
    };
    create_private_dir(&args.state_dir)?;
    let mut socket = server::ApiSocket::bind(&args.socket)?;
    // Every lock before anything is touched: a second daemon that would
    // share the socket, the journal or the BPF directory stops here.
    let journal = Journal::open(&args.state_dir, journal::current_boot_id())?;
    let owner = Owner::of_state_dir(&args.state_dir)?;
    let _bpf_dir_lock = match chaosd::net::bpf::lock_dir(&args.bpf_dir) {
        Ok(lock) => Some(lock),
        Err(e @ chaosd::net::bpf::BpfError::Locked(_)) => return Err(e.into()),
        // Without bpffs there are no network faults to protect; the driver
        // says why when it fails to open.
        Err(e) => {
            tracing::warn!(error = %e, "cannot lock the BPF directory");
            None
        }
    };
    // After the locks (a second daemon is told about those, not about a
    // port in use), before the drivers: the bound port (also for port 0)
    // is protected like SSH, so no network fault can cut the connection
    // that would recover it.
    let tls = tls.map(|t| t.bind()).transpose()?;
    if let Some(port) = tls.as_ref().map(|t| t.local_addr().port())
        && !args.protect_ports.contains(&port)
    {
        args.protect_ports.push(port);
    }
    let dropped = privilege::drop_unneeded().context("dropping unneeded capabilities")?;
    tracing::debug!(?dropped, "dropped capabilities");

    let probe_started = std::time::Instant::now();
    let host = Arc::new(probe::probe_host());
    tracing::info!(elapsed_ms = probe_started.elapsed().as_millis() as u64, "probed the host");
    log_probe(&host);
    let engine = Arc::new(Engine::new(journal, build_drivers(&host, &args, owner)));
    let reconciled = engine.reconcile().context("reconciling the journal with the kernel")?;
    for id in &reconciled.resumed {
        tracing::info!(%id, "experiment resumed");
    }
    for (id, reason) in &reconciled.reverted {
        tracing::info!(%id, %reason, "experiment ended at start");
    }
    for what in &reconciled.swept {
        tracing::info!(%what, "removed an object chaosd left without a journal entry");
    }
    let ticker = Ticker::start(engine.clone());
    let service = ChaosdService::new(host.clone(), engine.clone(), args.state_dir.display().to_string());
    let metrics = metrics_listener.map(|listener| {
        let metrics = Arc::new(chaosd::metrics::Metrics::new(engine.clone(), &host, &reconciled));
        (listener, metrics, engine.subscribe())
    });
    let service = match &metrics {
        Some((_, m, _)) => service.with_metrics(m.clone()),
        None => service,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let socket_path = socket.path().to_path_buf();
    let (listener, tls) = {
        let _guard = runtime.enter();
        let tls_addr = tls.as_ref().map(|t| t.local_addr().to_string());
        let tls = tls.map(|t| t.incoming()).transpose().context("registering the TLS port")?;
        (socket.take_listener().context("registering the API socket")?, (tls, tls_addr))
    };
    let (tls, tls_addr) = tls;
    runtime.block_on(async move {
        match &tls_addr {
            Some(addr) => tracing::info!(
                socket = %socket_path.display(),
                tls = %addr,
                version = chaosd::VERSION,
                "chaosd serving"
            ),
            None => tracing::info!(socket = %socket_path.display(), version = chaosd::VERSION, "chaosd serving"),
        }
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let stopping = tokio_util::sync::CancellationToken::new();
        if let Some((listener, metrics, events)) = metrics {
            chaosd::metrics::http::spawn(listener, metrics, events, stopping.clone());
        }
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            stopping.cancel();
        };
        server::run(listener, tls, service, shutdown).await.context("serving the API")?;
        anyhow::Ok(())
    })?;
    // Recover before the socket goes away: nothing of ours stays in the
    // kernel after a clean stop.
    ticker.stop();
    let errors = engine.shutdown();
    drop(socket);
    if !errors.is_empty() {
        let list: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("stopped, but recovery was incomplete: {}", list.join("; "));
    }
    tracing::info!("chaosd stopped");
    Ok(())
}

/// The drivers this host can run.
fn build_drivers(host: &probe::HostProbe, args: &ServeArgs, owner: Owner) -> Drivers {
    let network = {
        let config = chaosd::net::NetConfig {
            grace: args.grace,
            protected_ports: args.protect_ports.clone(),
            api_socket: args.socket.clone(),
            bpffs: args.bpf_dir.clone(),
            owner,
        };
        match chaosd::net::NetworkDriver::new(host, config) {
            Ok(d) => Slot::Ready(Box::new(d)),
            Err(e) => Slot::Unavailable(format!("network faults are unavailable: {e}")),
        }
    };
    // Stressors and the pause guardian are re-execs of this binary.
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            let why = format!("cannot find chaosd's own binary to start stressors: {e}");
            return Drivers { network, stress: Slot::Unavailable(why.clone()), process: Slot::Unavailable(why) };
        }
    };
    Drivers {
        network,
        stress: match chaosd::stress::StressDriver::new(exe.clone()) {
            Ok(d) => Slot::Ready(Box::new(d)),
            Err(e) => Slot::Unavailable(e.to_string()),
        },
        process: Slot::Ready(Box::new(chaosd::process::ProcessDriver::new(exe, args.grace))),
    }
}

/// Background thread driving the engine's periodic work: expiry and driver
/// ticks every 100 ms, liveness and counter events every second.
struct Ticker {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl Ticker {
    fn start(engine: Arc<Engine>) -> Self {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("chaosd-ticker".into())
            .spawn(move || {
                let mut n: u64 = 0;
                while !flag.load(Ordering::SeqCst) {
                    let each_second = n.is_multiple_of(10);
                    engine.tick(each_second);
                    if each_second {
                        engine.publish_counters();
                    }
                    n += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            })
            .expect("spawning the ticker thread");
        Self { stop, handle }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.handle.join();
    }
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
