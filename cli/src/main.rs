//! chaosctl: the command-line client of chaosd.

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
    if let Command::Run(args) = cli.command {
        // Before any runtime: the runner may enter another network namespace.
        return ExitCode::from(run::main(&cli.socket, args));
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
            Command::Status => status::run(&cli.socket, cli.output).await,
            Command::Inject(cmd) => inject::run(&cli.socket, cli.output, *cmd).await,
            Command::List { all } => list::run(&cli.socket, cli.output, all).await,
            Command::Get { id } => get::run(&cli.socket, cli.output, id).await,
            Command::Recover { id, all } => recover::run(&cli.socket, cli.output, id, all).await,
            Command::Watch { id } => watch::run(&cli.socket, cli.output, id).await,
            Command::Run(_) => unreachable!("handled above"),
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
