//! What this host can really do, learned by trying it: load chaosd's BPF
//! classifier, attach it by TCX and by clsact, create netem, HTB and IFB in a
//! scratch network namespace that vanishes afterwards. Nothing is inferred
//! from version numbers.

use std::{collections::BTreeSet, fs, path::Path};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{NlOptions, TcAttachOptions},
};
use netlink_packet_route::{link::InfoKind, tc::TcHandle};

use crate::{
    netlink::RouteSocket,
    netns::run_in_scratch_netns,
    tc::{self, QdiscSpec},
};

/// The outcome of one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub available: bool,
    pub detail: String,
}

impl Probe {
    fn yes(detail: impl Into<String>) -> Self {
        Self { available: true, detail: detail.into() }
    }
    fn no(detail: impl Into<String>) -> Self {
        Self { available: false, detail: detail.into() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
    /// v1 controllers plus a v2 hierarchy (usually without controllers).
    Hybrid,
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupProbe {
    pub version: CgroupVersion,
    pub controllers: Vec<String>,
    pub detail: String,
}

#[derive(Clone, Debug)]
pub struct HostProbe {
    pub kernel_release: String,
    pub bpf_prog_load: Probe,
    pub btf: Probe,
    pub netem: Probe,
    pub ifb: Probe,
    pub htb: Probe,
    pub clsact: Probe,
    pub tcx: Probe,
    pub cgroup: CgroupProbe,
    pub effective_capabilities: Vec<String>,
}

/// One fault kind and whether this host can inject it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultAvailability {
    pub fault: &'static str,
    pub available: bool,
    pub reason: String,
}

pub fn probe_host() -> HostProbe {
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let t = std::time::Instant::now();
    let (bpf_prog_load, tcx, clsact) = probe_bpf();
    tracing::debug!(elapsed_ms = t.elapsed().as_millis() as u64, "probed BPF load and attach");
    let t = std::time::Instant::now();
    let (netem, htb, ifb) = probe_qdiscs();
    tracing::debug!(elapsed_ms = t.elapsed().as_millis() as u64, "probed qdiscs and ifb");
    let t = std::time::Instant::now();
    let btf = probe_btf();
    tracing::debug!(elapsed_ms = t.elapsed().as_millis() as u64, "probed BTF");
    HostProbe {
        kernel_release,
        bpf_prog_load,
        btf,
        netem,
        ifb,
        htb,
        clsact,
        tcx,
        cgroup: probe_cgroup(Path::new("/proc/self/mounts"), Path::new("/sys/fs/cgroup")),
        effective_capabilities: effective_capabilities(),
    }
}

fn probe_btf() -> Probe {
    match aya::Btf::from_sys_fs() {
        Ok(_) => Probe::yes("parsed /sys/kernel/btf/vmlinux"),
        Err(e) => Probe::no(format!("/sys/kernel/btf/vmlinux: {e}")),
    }
}

/// Loads the classifier and attaches it to lo of a scratch namespace, once by
/// TCX and once through a clsact qdisc.
fn probe_bpf() -> (Probe, Probe, Probe) {
    let result = run_in_scratch_netns(|| {
        let mut ebpf = match aya::Ebpf::load(crate::BPF_OBJECT) {
            Ok(e) => e,
            Err(e) => {
                let p = Probe::no(format!("loading chaosd's BPF object: {e}"));
                return (p.clone(), p.clone(), p);
            }
        };
        let prog: &mut SchedClassifier = match ebpf.program_mut("chaosd_tc").map(TryInto::try_into) {
            Some(Ok(p)) => p,
            _ => {
                let p = Probe::no("chaosd's BPF object has no classifier chaosd_tc");
                return (p.clone(), p.clone(), p);
            }
        };
        if let Err(e) = prog.load() {
            let p = Probe::no(format!("BPF_PROG_LOAD of chaosd's classifier: {e}"));
            return (p.clone(), p.clone(), p);
        }
        let load = Probe::yes("loaded chaosd's tc classifier (BPF_PROG_LOAD)");
        let tcx = match prog.attach_with_options(
            "lo",
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        ) {
            Ok(id) => {
                let _ = prog.detach(id);
                Probe::yes("attached a classifier by TCX link in a scratch namespace")
            }
            Err(e) => Probe::no(format!("TCX attach: {e}")),
        };
        let clsact = match RouteSocket::open().and_then(|mut s| {
            tc::qdisc_add(
                &mut s,
                1,
                &QdiscSpec {
                    kind: "clsact",
                    parent: TcHandle::CLSACT,
                    handle: crate::tc::CLSACT_HANDLE,
                    options: None,
                },
            )
        }) {
            Err(e) => Probe::no(e.to_string()),
            Ok(()) => match prog.attach_with_options(
                "lo",
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions::default()),
            ) {
                Ok(id) => {
                    let _ = prog.detach(id);
                    Probe::yes("created clsact and attached a cls_bpf filter in a scratch namespace")
                }
                Err(e) => Probe::no(format!("cls_bpf attach under clsact: {e}")),
            },
        };
        (load, tcx, clsact)
    });
    result.unwrap_or_else(|e| {
        let p = Probe::no(e.to_string());
        (p.clone(), p.clone(), p)
    })
}

/// Creates netem and HTB root qdiscs and an IFB device in a scratch namespace.
fn probe_qdiscs() -> (Probe, Probe, Probe) {
    let result = run_in_scratch_netns(|| {
        let mut sock = match RouteSocket::open() {
            Ok(s) => s,
            Err(e) => {
                let p = Probe::no(e.to_string());
                return (p.clone(), p.clone(), p);
            }
        };
        let root = |kind, options| QdiscSpec {
            kind,
            parent: TcHandle::ROOT,
            handle: TcHandle { major: 1, minor: 0 },
            options: Some(options),
        };
        let mut try_root = |spec: QdiscSpec, what: &str| match tc::qdisc_add(&mut sock, 1, &spec) {
            Ok(()) => {
                let _ = tc::qdisc_del(&mut sock, 1, TcHandle::ROOT, spec.handle);
                Probe::yes(format!("created a {what} qdisc in a scratch namespace"))
            }
            Err(e) => Probe::no(e.to_string()),
        };
        let netem = try_root(root("netem", tc::netem_noop_options(1000)), "netem");
        let htb = try_root(root("htb", tc::htb_init_options(0)), "HTB");
        let ifb = match tc::link_add(&mut sock, "chaosd-probe", InfoKind::Ifb, None) {
            Ok(()) => {
                let _ = tc::link_del_by_name(&mut sock, "chaosd-probe");
                Probe::yes("created an ifb device in a scratch namespace")
            }
            Err(e) => Probe::no(e.to_string()),
        };
        (netem, htb, ifb)
    });
    result.unwrap_or_else(|e| {
        let p = Probe::no(e.to_string());
        (p.clone(), p.clone(), p)
    })
}

/// Reads the cgroup layout from a mounts table and the cgroup root.
pub fn probe_cgroup(mounts: &Path, cgroup_root: &Path) -> CgroupProbe {
    let table = match fs::read_to_string(mounts) {
        Ok(t) => t,
        Err(e) => {
            return CgroupProbe {
                version: CgroupVersion::None,
                controllers: vec![],
                detail: format!("reading {}: {e}", mounts.display()),
            };
        }
    };
    let root = cgroup_root.to_string_lossy();
    let mut v2_at_root = false;
    let mut v2_elsewhere = None;
    let mut v1: BTreeSet<String> = BTreeSet::new();
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, mountpoint, fstype, opts, ..] = f[..] else { continue };
        match fstype {
            "cgroup2" if mountpoint == root => v2_at_root = true,
            "cgroup2" => v2_elsewhere = Some(mountpoint.to_string()),
            "cgroup" => {
                for o in opts.split(',') {
                    // Mount options that are not controllers.
                    if !matches!(
                        o,
                        "rw" | "ro"
                            | "nosuid"
                            | "nodev"
                            | "noexec"
                            | "relatime"
                            | "noatime"
                            | "xattr"
                            | "clone_children"
                            | "noprefix"
                            | "cpuset_v2_mode"
                            | "favordynmods"
                    ) && !o.starts_with("name=")
                        && !o.contains('=')
                    {
                        v1.insert(o.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    if v2_at_root {
        let file = cgroup_root.join("cgroup.controllers");
        let controllers =
            fs::read_to_string(&file).map(|s| s.split_whitespace().map(String::from).collect()).unwrap_or_default();
        return CgroupProbe { version: CgroupVersion::V2, controllers, detail: format!("unified hierarchy at {root}") };
    }
    if v1.is_empty() {
        return CgroupProbe {
            version: CgroupVersion::None,
            controllers: vec![],
            detail: "no cgroup hierarchy mounted".into(),
        };
    }
    let (version, detail) = match v2_elsewhere {
        Some(at) => (CgroupVersion::Hybrid, format!("v1 controllers under {root}, v2 hierarchy at {at}")),
        None => (CgroupVersion::V1, format!("v1 controllers under {root}")),
    };
    CgroupProbe { version, controllers: v1.into_iter().collect(), detail }
}

fn effective_capabilities() -> Vec<String> {
    let mut names: Vec<String> = caps::read(None, caps::CapSet::Effective)
        .map(|set| set.into_iter().map(|c| c.to_string()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

impl HostProbe {
    /// Which fault kinds work here, and why not when they do not.
    pub fn fault_availability(&self) -> Vec<FaultAvailability> {
        let mut out = Vec::new();
        let attach = self.tcx.available || self.clsact.available;
        let bpf_reason = if !self.bpf_prog_load.available {
            format!("BPF programs cannot be loaded: {}", self.bpf_prog_load.detail)
        } else if !attach {
            format!("classifiers cannot be attached: tcx: {}; clsact: {}", self.tcx.detail, self.clsact.detail)
        } else {
            String::new()
        };
        let bpf_ok = bpf_reason.is_empty();
        for fault in ["loss", "partition"] {
            out.push(FaultAvailability { fault, available: bpf_ok, reason: bpf_reason.clone() });
        }
        let bw_reason = if !bpf_ok {
            bpf_reason.clone()
        } else if !self.htb.available {
            format!("no HTB qdisc: {}", self.htb.detail)
        } else {
            String::new()
        };
        out.push(FaultAvailability { fault: "bandwidth", available: bw_reason.is_empty(), reason: bw_reason.clone() });
        let netem_reason = if !bw_reason.is_empty() {
            bw_reason
        } else if !self.netem.available {
            format!("the kernel has no netem qdisc (sch_netem): {}", self.netem.detail)
        } else {
            String::new()
        };
        for fault in ["delay", "duplicate", "corrupt", "reorder"] {
            out.push(FaultAvailability { fault, available: netem_reason.is_empty(), reason: netem_reason.clone() });
        }
        let has = |c: &str| self.cgroup.controllers.iter().any(|x| x == c);
        let cpu_ok = has("cpu") || has("cpuacct");
        out.push(FaultAvailability {
            fault: "stress-cpu",
            available: cpu_ok,
            reason: if cpu_ok { String::new() } else { format!("no cpu cgroup controller ({})", self.cgroup.detail) },
        });
        let mem_ok = has("memory");
        out.push(FaultAvailability {
            fault: "stress-memory",
            available: mem_ok,
            reason: if mem_ok {
                String::new()
            } else {
                format!("no memory cgroup controller ({})", self.cgroup.detail)
            },
        });
        let kill_ok = self.effective_capabilities.iter().any(|c| c == "CAP_KILL");
        for fault in ["kill", "pause"] {
            out.push(FaultAvailability {
                fault,
                available: kill_ok,
                reason: if kill_ok { String::new() } else { "the daemon lacks CAP_KILL".into() },
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn cgroup_v2_reads_controllers_from_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cg");
        fs::create_dir(&root).unwrap();
        write(&root, "cgroup.controllers", "cpuset cpu io memory pids\n");
        let root_s = root.display().to_string();
        let mounts = write(dir.path(), "mounts", &format!("cgroup2 {root_s} cgroup2 rw,nosuid 0 0\n"));
        let p = probe_cgroup(&mounts, &root);
        assert_eq!(p.version, CgroupVersion::V2);
        assert_eq!(p.controllers, ["cpuset", "cpu", "io", "memory", "pids"]);
    }

    #[test]
    fn cgroup_v1_with_unified_is_hybrid_and_lists_v1_controllers() {
        let dir = tempfile::tempdir().unwrap();
        let mounts = write(
            dir.path(),
            "mounts",
            "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
             cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n\
             cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
             cgroup /sys/fs/cgroup/systemd cgroup rw,xattr,name=systemd 0 0\n",
        );
        let p = probe_cgroup(&mounts, Path::new("/sys/fs/cgroup"));
        assert_eq!(p.version, CgroupVersion::Hybrid);
        assert_eq!(p.controllers, ["cpu", "cpuacct", "memory"]);
    }

    #[test]
    fn no_netem_disables_only_the_delay_family() {
        let yes = Probe::yes("ok");
        let host = HostProbe {
            kernel_release: "x".into(),
            bpf_prog_load: yes.clone(),
            btf: yes.clone(),
            netem: Probe::no("Specified qdisc kind is unknown"),
            ifb: yes.clone(),
            htb: yes.clone(),
            clsact: yes.clone(),
            tcx: yes,
            cgroup: CgroupProbe { version: CgroupVersion::V2, controllers: vec!["cpu".into()], detail: String::new() },
            effective_capabilities: vec!["CAP_KILL".into()],
        };
        let av = host.fault_availability();
        let get = |f: &str| av.iter().find(|a| a.fault == f).unwrap().clone();
        assert!(get("loss").available && get("partition").available && get("bandwidth").available);
        assert!(!get("delay").available && get("delay").reason.contains("no netem"));
        assert!(!get("stress-memory").available);
    }
}
