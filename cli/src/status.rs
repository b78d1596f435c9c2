//! `chaosctl status`: what the daemon is and what this host can do.

use chaos_proto::chaosd::v1 as pb;
use serde_json::{Value, json};

use crate::{
    client::CliError,
    output::{self, Output},
};

pub async fn run(daemon: &crate::client::Daemon, out: Output) -> Result<(), CliError> {
    let mut client = crate::client::connect(daemon).await?;
    let status =
        client.status(pb::StatusRequest {}).await.map_err(|s| crate::client::request_error(daemon, s))?.into_inner();
    match out {
        Output::Json => output::print_json(&to_json(&status))?,
        Output::Table => print_table(&status)?,
    }
    Ok(())
}

fn probe_json(p: &Option<pb::Probe>) -> Value {
    let p = p.clone().unwrap_or_default();
    json!({ "available": p.available, "detail": p.detail })
}

pub fn to_json(s: &pb::StatusResponse) -> Value {
    let caps = s.capabilities.clone().unwrap_or_default();
    let cg = caps.cgroup.clone().unwrap_or_default();
    json!({
        "version": s.version,
        "pid": s.pid,
        "uptime": output::duration_json(&s.uptime),
        "state_dir": s.state_dir,
        "active_experiments": s.active_experiments,
        "capabilities": {
            "kernel_release": caps.kernel_release,
            "bpf_prog_load": probe_json(&caps.bpf_prog_load),
            "btf": probe_json(&caps.btf),
            "netem": probe_json(&caps.netem),
            "ifb": probe_json(&caps.ifb),
            "htb": probe_json(&caps.htb),
            "clsact": probe_json(&caps.clsact),
            "tcx": probe_json(&caps.tcx),
            "cgroup": {
                "version": cg.version().as_str_name(),
                "controllers": cg.controllers,
                "detail": cg.detail,
            },
            "effective_capabilities": caps.effective_capabilities,
        },
        "faults": s.faults.iter().map(|f| json!({
            "fault": f.fault, "available": f.available, "reason": f.reason,
        })).collect::<Vec<_>>(),
    })
}

fn print_table(s: &pb::StatusResponse) -> std::io::Result<()> {
    let caps = s.capabilities.clone().unwrap_or_default();
    let cg = caps.cgroup.clone().unwrap_or_default();
    let uptime = s.uptime.as_ref().and_then(chaos_proto::duration_from_proto).unwrap_or_default();
    output::line(format!("chaosd {} (pid {}), up {}", s.version, s.pid, output::human_duration(uptime)))?;
    output::line(format!(
        "kernel {}, state in {}, {} active experiment(s)",
        caps.kernel_release, s.state_dir, s.active_experiments
    ))?;
    output::line("")?;
    let cgroup_version = match cg.version() {
        pb::CgroupVersion::V1 => "v1",
        pb::CgroupVersion::V2 => "v2",
        pb::CgroupVersion::Hybrid => "hybrid (v1 + v2)",
        pb::CgroupVersion::Unspecified => "none",
    };
    let mut rows = vec![vec!["PROBE".to_string(), "RESULT".into(), "DETAIL".into()]];
    for (name, p) in [
        ("bpf program load", &caps.bpf_prog_load),
        ("btf", &caps.btf),
        ("tcx", &caps.tcx),
        ("clsact", &caps.clsact),
        ("netem", &caps.netem),
        ("htb", &caps.htb),
        ("ifb", &caps.ifb),
    ] {
        let p = p.clone().unwrap_or_default();
        rows.push(vec![name.into(), if p.available { "yes".into() } else { "NO".into() }, p.detail]);
    }
    rows.push(vec!["cgroup".into(), cgroup_version.into(), format!("{} [{}]", cg.detail, cg.controllers.join(" "))]);
    output::print_rows(&rows)?;
    output::line("")?;
    let mut rows = vec![vec!["FAULT".to_string(), "AVAILABLE".into(), "WHY NOT".into()]];
    for f in &s.faults {
        rows.push(vec![f.fault.clone(), if f.available { "yes".into() } else { "NO".into() }, f.reason.clone()]);
    }
    output::print_rows(&rows)?;
    output::line("")?;
    output::line(format!("capabilities: {}", caps.effective_capabilities.join(" ")))
}
