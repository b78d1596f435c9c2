//! `chaosctl get ID`: everything about one experiment.

use chaos_proto::chaosd::v1 as pb;

use crate::{
    client::CliError,
    experiment,
    output::{self, Output},
};

pub async fn run(daemon: &crate::client::Daemon, out: Output, id: String) -> Result<(), CliError> {
    let mut client = crate::client::connect(daemon).await?;
    let exp =
        client.get(pb::GetRequest { id }).await.map_err(|s| crate::client::request_error(daemon, s))?.into_inner();
    match out {
        Output::Json => output::print_json(&experiment::to_json(&exp))?,
        Output::Table => output::print_rows(&experiment::details(&exp))?,
    }
    Ok(())
}
