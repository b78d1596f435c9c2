//! The system under test: a local cluster the runner starts with
//! scripts/cluster-up (and removes with cluster-down), or attached nodes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use super::plan::{self, Plan};

#[derive(Debug, Clone, serde::Serialize)]
pub struct Node {
    pub name: String,
    pub mqtt: SocketAddr,
    pub http: Option<SocketAddr>,
    pub ipv4: Option<String>,
    pub netns: Option<String>,
    pub pid: Option<u32>,
    pub pid_file: Option<PathBuf>,
    pub cgroup: Option<String>,
    /// Process faults by name when no pid is known.
    pub process: Option<String>,
    /// The node names its own chaosd: a node without a netns is then that
    /// daemon's host namespace.
    pub own_chaosd: bool,
}

impl Node {
    /// The broker's pid now (re-read from the pid file: the topology
    /// restarts a killed node under a new pid).
    pub fn current_pid(&self) -> Option<u32> {
        if let Some(f) = &self.pid_file {
            return std::fs::read_to_string(f).ok()?.trim().parse().ok();
        }
        self.pid
    }

    pub fn alive(&self) -> bool {
        self.current_pid().is_some_and(|p| Path::new(&format!("/proc/{p}")).exists())
    }
}

pub struct Sut {
    pub nodes: Vec<Node>,
    /// Namespace the workload runs in.
    pub client_netns: Option<String>,
    /// Set when the runner started the cluster and must remove it.
    pub local: Option<Local>,
}

pub struct Local {
    pub scripts: PathBuf,
    pub run_dir: PathBuf,
}

#[derive(Deserialize)]
struct Topology {
    hub_netns: String,
    nodes: Vec<TopoNode>,
}

#[derive(Deserialize)]
struct TopoNode {
    name: String,
    netns: String,
    ipv4: String,
    mqtt: SocketAddr,
    http: Option<SocketAddr>,
    pid_file: PathBuf,
}

/// Where cluster-up lives: the plan's `scripts`, $CHAOSCTL_SCRIPTS,
/// ./scripts, or scripts/ of the checkout chaosctl was built in.
pub fn scripts_dir(from_plan: Option<&str>) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Some(p) = from_plan {
        cands.push(p.into());
    }
    if let Ok(p) = std::env::var("CHAOSCTL_SCRIPTS") {
        cands.push(p.into());
    }
    cands.push("scripts".into());
    if let Ok(exe) = std::env::current_exe()
        && let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent)
    {
        cands.push(root.join("scripts"));
    }
    for c in cands {
        if c.join("cluster-up").exists() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(format!(
        "cannot find scripts/cluster-up (looked in {}): run from the chaosd checkout, or set CHAOSCTL_SCRIPTS or \
         sut.scripts",
        tried.join(", ")
    ))
}

/// Each attached node's own chaosd (an endpoint named in the plan), by
/// node name.
pub fn node_daemons(plan: &Plan) -> Result<Vec<(String, crate::client::Daemon)>, String> {
    let plan::Sut::Attach { nodes, .. } = &plan.sut else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for n in nodes {
        if let Some(c) = &n.chaosd {
            let ep = crate::tls::TlsEndpoint::new(
                &c.endpoint,
                Some(c.ca.clone().into()),
                Some(c.cert.clone().into()),
                Some(c.key.clone().into()),
            )
            .map_err(|e| format!("node {}: {e}", n.name))?;
            out.push((n.name.clone(), crate::client::Daemon::Tls(std::sync::Arc::new(ep))));
        }
    }
    Ok(out)
}

/// Starts (local) or describes (attach) the SUT. Blocking: runs before the
/// async runtime exists.
pub fn start(plan: &Plan, run_dir: &Path) -> Result<Sut, String> {
    match &plan.sut {
        plan::Sut::Attach { client_netns, nodes } => Ok(Sut {
            nodes: nodes
                .iter()
                .map(|n| Node {
                    name: n.name.clone(),
                    mqtt: n.mqtt,
                    http: n.http,
                    ipv4: Some(n.mqtt.ip().to_string()),
                    netns: n.netns.clone(),
                    pid: n.pid,
                    pid_file: n.pid_file.as_ref().map(PathBuf::from),
                    cgroup: n.cgroup.clone(),
                    process: n.process.clone(),
                    own_chaosd: n.chaosd.is_some(),
                })
                .collect(),
            client_netns: client_netns.clone(),
            local: None,
        }),
        plan::Sut::Local { nodes, scripts, broker, restart_delay } => {
            let scripts = scripts_dir(scripts.as_deref())?;
            let dir = run_dir.join("cluster");
            // Short: netns and veth names are built from it.
            let name = format!("cr{}", std::process::id() % 100_000);
            let mut cmd = Command::new(scripts.join("cluster-up"));
            cmd.arg("--run-dir").arg(&dir).args(["--name", &name, "--nodes", &nodes.to_string()]).args([
                "--restart-delay",
                &restart_delay.as_secs().max(1).to_string(),
                "--json",
            ]);
            if let Some(b) = broker {
                cmd.args(["--broker", b]);
            }
            let out = cmd.output().map_err(|e| format!("cannot run {}: {e}", scripts.join("cluster-up").display()))?;
            let local = Local { scripts: scripts.clone(), run_dir: dir.clone() };
            if !out.status.success() {
                let _ = stop_local(&local);
                return Err(format!(
                    "scripts/cluster-up failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let topo: Topology = match serde_json::from_slice(&out.stdout)
                .or_else(|_| serde_json::from_slice(&std::fs::read(dir.join("topology.json")).unwrap_or_default()))
            {
                Ok(t) => t,
                Err(e) => {
                    let _ = stop_local(&local);
                    return Err(format!("cluster-up printed no topology JSON I can read: {e}"));
                }
            };
            Ok(Sut {
                nodes: topo
                    .nodes
                    .into_iter()
                    .map(|n| Node {
                        name: n.name,
                        mqtt: n.mqtt,
                        http: n.http,
                        ipv4: Some(n.ipv4),
                        netns: Some(n.netns),
                        pid: None,
                        pid_file: Some(n.pid_file),
                        cgroup: None,
                        process: None,
                        own_chaosd: false,
                    })
                    .collect(),
                client_netns: Some(topo.hub_netns),
                local: Some(local),
            })
        }
    }
}

pub fn stop_local(l: &Local) -> Result<(), String> {
    let out = Command::new(l.scripts.join("cluster-down"))
        .arg("--run-dir")
        .arg(&l.run_dir)
        .output()
        .map_err(|e| format!("cannot run cluster-down: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("cluster-down failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Moves the calling thread into a named network namespace. Called on the
/// main thread before the async runtime starts, so every thread the
/// runtime creates inherits it.
/// Returns the namespace it left, for [`return_to`].
pub fn enter_netns(name: &str) -> Result<std::fs::File, String> {
    let here = std::fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| format!("cannot open this thread's network namespace: {e}"))?;
    let path = Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    setns(&f).map_err(|e| format!("cannot enter network namespace {name}: {e}"))?;
    Ok(here)
}

/// Back to the namespace `enter_netns` left (cluster-down runs there).
pub fn return_to(ns: &std::fs::File) -> Result<(), String> {
    setns(ns).map_err(|e| format!("cannot return to the original network namespace: {e}"))
}

fn setns(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns with a valid descriptor only changes this thread's
    // network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
