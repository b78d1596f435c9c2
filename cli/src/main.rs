//! chaosctl: the command-line client of chaosd.

mod certs;
mod client;
mod experiment;
mod get;
mod inject;
mod list;
mod output;
mod parse;
mod recover;
mod run;
mod status;
mod tls;
mod watch;

use std::{io::Write, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use output::Output;

#[derive(Parser)]
#[command(name = "chaosctl", version, about = "Control chaosd: inject, list and recover faults")]
struct Cli {
    /// Socket of the daemon.
    #[arg(long, global = true, env = "CHAOSD_SOCKET", default_value = "/run/chaosd/chaosd.sock")]
    socket: PathBuf,
    /// chaosd's TLS port instead of the socket: https://HOST:PORT (a daemon
    /// started with --listen-tls); needs --ca, and --cert/--key.
    #[arg(long, global = true, env = "CHAOSCTL_ENDPOINT", value_name = "URL")]
    endpoint: Option<String>,
    /// CA certificate (PEM) that signed chaosd's certificate.
    #[arg(long, global = true, env = "CHAOSCTL_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to chaosd.
    #[arg(long, global = true, env = "CHAOSCTL_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "CHAOSCTL_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the daemon's version, uptime and what this host can do.
    Status,
    /// Start an experiment; prints its id.
    #[command(subcommand)]
    Inject(Box<inject::InjectCommand>),
    /// List active experiments (with --all, also ended ones).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Show one experiment with its counters.
    Get { id: String },
    /// End an experiment (or all) and restore the target.
    Recover {
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Stream experiment events (all, or one id).
    Watch { id: Option<String> },
    /// Run a chaos plan (TOML) against a broker cluster with an MQTT
    /// workload and write a verdict report. Exit 0 all pass, 1 a case
    /// failed, 2 a case unknown / not run or the run could not start.
    Run(run::RunArgs),
    /// Make a small CA, server certificates for chaosd's TLS port and
    /// client certificates for chaosctl (no openssl needed).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with success; usage errors exit 2.
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    if let Command::Certs(cmd) = cli.command {
        return match certs::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "chaosctl: {}", e.message);
                ExitCode::from(e.code)
            }
        };
    }
    let daemon = match client::Daemon::new(&cli.socket, cli.endpoint.as_deref(), cli.ca, cli.cert, cli.key) {
        Ok(d) => d,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "chaosctl: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Run(args) = cli.command {
        // Before any runtime: the runner may enter another network namespace.
        return ExitCode::from(run::main(&daemon, args));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "chaosctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Status => status::run(&daemon, cli.output).await,
            Command::Inject(cmd) => inject::run(&daemon, cli.output, *cmd).await,
            Command::List { all } => list::run(&daemon, cli.output, all).await,
            Command::Get { id } => get::run(&daemon, cli.output, id).await,
            Command::Recover { id, all } => recover::run(&daemon, cli.output, id, all).await,
            Command::Watch { id } => watch::run(&daemon, cli.output, id).await,
            Command::Run(_) | Command::Certs(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if !e.is_closed_pipe() {
                // stderr may be closed or full too; nothing is left to tell then.
                let _ = writeln!(std::io::stderr(), "chaosctl: {}", e.message);
            }
            ExitCode::from(e.code)
        }
    }
}
