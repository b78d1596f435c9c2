//! `chaosctl watch [ID]`: stream state changes and counters. With an id,
//! the experiment's state now, then its changes; it ends when the
//! experiment does (an ended one prints its final state and ends at once).

use chaos_proto::chaosd::v1 as pb;

use crate::{
    client::CliError,
    experiment,
    output::{self, Output},
};

pub async fn run(daemon: &crate::client::Daemon, out: Output, id: Option<String>) -> Result<(), CliError> {
    let mut client = crate::client::connect(daemon).await?;
    let mut stream = client
        .watch(pb::WatchRequest { id: id.unwrap_or_default() })
        .await
        .map_err(|s| crate::client::request_error(daemon, s))?
        .into_inner();
    while let Some(ev) = stream.message().await.map_err(|s| crate::client::request_error(daemon, s))? {
        let kind = match ev.kind() {
            pb::EventKind::Counters => "counters",
            _ => "state",
        };
        let Some(exp) = ev.experiment else { continue };
        match out {
            Output::Json => {
                let mut v = experiment::to_json(&exp);
                v["event"] = serde_json::Value::String(kind.into());
                output::line(serde_json::to_string(&v).expect("JSON values serialize"))?;
            }
            Output::Table => {
                let rows = experiment::table(std::slice::from_ref(&exp));
                let row = &rows[1];
                output::print_rows(&[vec![
                    kind.to_string(),
                    row[0].clone(),
                    row[1].clone(),
                    row[2].clone(),
                    row[3].clone(),
                    row[4].clone(),
                ]])?;
            }
        }
    }
    Ok(())
}
