//! `chaosctl list`: active experiments with their counters.

use chaos_proto::chaosd::v1 as pb;

use crate::{
    client::CliError,
    experiment,
    output::{self, Output},
};

pub async fn run(daemon: &crate::client::Daemon, out: Output, all: bool) -> Result<(), CliError> {
    let mut client = crate::client::connect(daemon).await?;
    let list = client
        .list(pb::ListRequest { include_ended: all })
        .await
        .map_err(|s| crate::client::request_error(daemon, s))?
        .into_inner()
        .experiments;
    match out {
        Output::Json => output::print_json(&serde_json::Value::Array(list.iter().map(experiment::to_json).collect()))?,
        Output::Table if list.is_empty() => {
            output::line(format!("no {}experiments", if all { "" } else { "active " }))?
        }
        Output::Table => output::print_rows(&experiment::table(&list))?,
    }
    Ok(())
}
