//! `chaosctl recover ID` / `--all`: end experiments; returns once the
//! target is back to its state before injection.

use chaos_proto::chaosd::v1 as pb;

use crate::{
    client::CliError,
    experiment,
    output::{self, Output},
};

pub async fn run(daemon: &crate::client::Daemon, out: Output, id: Option<String>, all: bool) -> Result<(), CliError> {
    use pb::recover_request::Which;
    let which = match (id, all) {
        (Some(id), false) => Which::Id(id),
        (None, true) => Which::All(true),
        _ => return Err(CliError::usage("give an experiment id or --all")),
    };
    let mut client = crate::client::connect(daemon).await?;
    let done = client
        .recover(pb::RecoverRequest { which: Some(which) })
        .await
        .map_err(|s| crate::client::request_error(daemon, s))?
        .into_inner()
        .recovered;
    match out {
        Output::Json => output::print_json(&serde_json::Value::Array(done.iter().map(experiment::to_json).collect()))?,
        Output::Table if done.is_empty() => output::line("nothing to recover")?,
        Output::Table => {
            for e in &done {
                output::line(format!("{} {}: {}", e.id, experiment::state_name(e.state()), e.summary))?;
            }
        }
    }
    Ok(())
}
