//! The target's cgroups, as the stressors need them: where to write a pid so
//! the stressor competes for the target's CPU quota and memory limit, and
//! where to read CPU usage, the memory limit and OOM kills. cgroup v2 (one
//! unified directory) and v1 (one directory per controller hierarchy, the
//! same relative path in each) are told apart at run time from the mount
//! table. Every path is taken relative to `Roots`, so the logic is tested
//! against a temporary directory without root.

use std::{
    fs, io,
    path::{Component, Path, PathBuf},
};

/// Where the kernel's files are. `Roots::host()` in production.
#[derive(Clone, Debug)]
pub struct Roots {
    /// A mount table (/proc/self/mounts).
    pub mounts: PathBuf,
    /// Where cgroups may be targeted (/sys/fs/cgroup).
    pub cgroup: PathBuf,
    /// procfs (/proc), for /proc/PID/cgroup and /proc/vmstat.
    pub proc: PathBuf,
}

impl Roots {
    pub fn host() -> Self {
        Self { mounts: "/proc/self/mounts".into(), cgroup: "/sys/fs/cgroup".into(), proc: "/proc".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {value} to {path}: {source}")]
    Write { path: PathBuf, value: String, source: io::Error },
    #[error("no cgroup hierarchy is mounted under {0} (neither cgroup2 nor v1 cpu/cpuacct/memory)")]
    NoHierarchy(PathBuf),
    #[error("cgroup path {path} is outside {root}: give a path under {root}")]
    Outside { path: PathBuf, root: PathBuf },
    #[error("cgroup path {path} leads to {resolved}, which is outside {root}: give a cgroup under {root}")]
    LeadsOutside { path: PathBuf, resolved: PathBuf, root: PathBuf },
    #[error("cgroup {0} does not exist")]
    Missing(PathBuf),
    #[error("cgroup path {path} {via} a symbolic link to {target}, which does not exist")]
    DanglingLink { path: PathBuf, via: String, target: PathBuf },
    #[error("{path} is not a cgroup: {what} no cgroup.procs")]
    NotACgroup { path: PathBuf, what: String },
    #[error("{path} is not inside a cgroup v1 controller hierarchy; give e.g. {example}")]
    NotInHierarchy { path: PathBuf, example: PathBuf },
    #[error("pid {0} does not exist")]
    NoPid(u32),
    #[error("/proc/{pid}/cgroup names no cgroup for {what}")]
    PidWithout { pid: u32, what: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// One v1 hierarchy: its mount point and its controllers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    pub controllers: Vec<String>,
}

impl Hierarchy {
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
}

/// v1 controllers a stressor joins: the ones it competes in (cpu, cpuacct,
/// memory) and pids, so it counts against the target's pids.max like a
/// process of the container would. cpuset, blkio and the rest are left
/// alone: joining a cpuset without cpus set fails, and they add nothing.
const V1_JOINED: &[&str] = &["cpu", "cpuacct", "memory", "pids"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    V2 { mount: PathBuf },
    V1 { hierarchies: Vec<Hierarchy> },
}

/// The cgroups of one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSet {
    pub version: Version,
    /// Directories whose cgroup.procs a stressor is written to.
    pub join: Vec<PathBuf>,
    /// Where CPU usage is read (v2: cpu.stat; v1: cpuacct.usage).
    pub cpu: Option<PathBuf>,
    /// The memory controller's directory.
    pub memory: Option<PathBuf>,
    /// A root cgroup (the host target): has no memory.events or memory.max.
    pub is_root: bool,
    /// What to call it in messages.
    pub display: String,
}

impl Layout {
    /// Reads the mount table: a cgroup2 mount at the cgroup root means v2;
    /// otherwise the v1 hierarchies with controllers (a hybrid host's
    /// /sys/fs/cgroup/unified carries no controllers and is ignored).
    pub fn detect(roots: &Roots) -> Result<Layout, CgroupError> {
        let table = read(&roots.mounts)?;
        let mut hierarchies = Vec::new();
        for line in table.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, mountpoint, fstype, opts, ..] = f[..] else { continue };
            let mountpoint = PathBuf::from(unescape_mount(mountpoint));
            match fstype {
                "cgroup2" if mountpoint == roots.cgroup => return Ok(Layout::V2 { mount: mountpoint }),
                "cgroup" if mountpoint.starts_with(&roots.cgroup) => {
                    let controllers: Vec<String> =
                        opts.split(',').filter(|o| V1_JOINED.contains(o)).map(String::from).collect();
                    if !controllers.is_empty() {
                        hierarchies.push(Hierarchy { mount: mountpoint, controllers });
                    }
                }
                _ => {}
            }
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy(roots.cgroup.clone()));
        }
        Ok(Layout::V1 { hierarchies })
    }

    pub fn version(&self) -> Version {
        match self {
            Layout::V2 { .. } => Version::V2,
            Layout::V1 { .. } => Version::V1,
        }
    }

    /// The root cgroups: stressors of a `--host` experiment compete with
    /// everything on the host, not inside chaosd's own (possibly limited)
    /// service cgroup.
    pub fn root(&self) -> CgroupSet {
        match self {
            Layout::V2 { mount } => self.v2_set(mount.clone(), true),
            Layout::V1 { hierarchies } => {
                let dirs = hierarchies.iter().map(|h| (h, h.mount.clone())).collect();
                self.v1_set(dirs, true, "the root cgroup".into())
            }
        }
    }

    /// The cgroups a process is in, from /proc/PID/cgroup.
    pub fn of_pid(&self, roots: &Roots, pid: u32) -> Result<CgroupSet, CgroupError> {
        let file = roots.proc.join(pid.to_string()).join("cgroup");
        let text = fs::read_to_string(&file).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => CgroupError::NoPid(pid),
            _ => CgroupError::Read { path: file.clone(), source: e },
        })?;
        let entries: Vec<(Vec<&str>, &str)> = text
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
                Some((ctrl.split(',').filter(|c| !c.is_empty()).collect(), path))
            })
            .collect();
        match self {
            Layout::V2 { mount } => {
                let path = entries
                    .iter()
                    .find(|(c, _)| c.is_empty())
                    .map(|(_, p)| *p)
                    .ok_or_else(|| CgroupError::PidWithout { pid, what: "the unified hierarchy".into() })?;
                let rel = path.trim_end_matches(" (deleted)").trim_start_matches('/');
                let dir = mount.join(rel);
                Ok(self.v2_set(dir.clone(), dir == *mount))
            }
            Layout::V1 { hierarchies } => {
                let mut dirs = Vec::new();
                for h in hierarchies {
                    let found = entries.iter().find(|(c, _)| h.controllers.iter().all(|hc| c.contains(&hc.as_str())));
                    if let Some((_, p)) = found {
                        dirs.push((h, h.mount.join(p.trim_start_matches('/'))));
                    }
                }
                if dirs.is_empty() {
                    return Err(CgroupError::PidWithout { pid, what: "cpu, cpuacct or memory".into() });
                }
                let is_root = dirs.iter().all(|(h, d)| h.mount == *d);
                Ok(self.v1_set(dirs, is_root, format!("the cgroup of pid {pid}")))
            }
        }
    }

    /// A cgroup named by the user: an absolute path under the cgroup root
    /// (for v1 inside one controller's hierarchy, e.g.
    /// /sys/fs/cgroup/memory/app; the same relative path is then used in
    /// the other hierarchies) or a path relative to the hierarchy roots.
    pub fn of_path(&self, roots: &Roots, path: &Path) -> Result<CgroupSet, CgroupError> {
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(CgroupError::Outside { path: path.to_path_buf(), root: roots.cgroup.clone() });
        }
        match self {
            Layout::V2 { mount } => {
                let full = if path.is_absolute() { path.to_path_buf() } else { mount.join(path) };
                if !full.starts_with(&roots.cgroup) {
                    return Err(CgroupError::Outside { path: path.to_path_buf(), root: roots.cgroup.clone() });
                }
                let dir = canonical_cgroup(&full)?;
                if !dir.starts_with(mount) {
                    return Err(CgroupError::LeadsOutside {
                        path: path.to_path_buf(),
                        resolved: dir,
                        root: mount.clone(),
                    });
                }
                Ok(self.v2_set(dir.clone(), dir == *mount))
            }
            Layout::V1 { hierarchies } => {
                let rel: PathBuf = if path.is_absolute() {
                    if !path.starts_with(&roots.cgroup) {
                        return Err(CgroupError::Outside { path: path.to_path_buf(), root: roots.cgroup.clone() });
                    }
                    let dir = canonical_cgroup(path)?;
                    let h = hierarchies
                        .iter()
                        .filter(|h| dir.starts_with(&h.mount))
                        .max_by_key(|h| h.mount.as_os_str().len());
                    let Some(h) = h else {
                        let example =
                            hierarchies.iter().find(|h| h.has("memory")).unwrap_or(&hierarchies[0]).mount.join("NAME");
                        return Err(CgroupError::NotInHierarchy { path: path.to_path_buf(), example });
                    };
                    dir.strip_prefix(&h.mount).unwrap_or(Path::new("")).to_path_buf()
                } else {
                    path.to_path_buf()
                };
                let dirs: Vec<(&Hierarchy, PathBuf)> =
                    hierarchies.iter().map(|h| (h, h.mount.join(&rel))).filter(|(_, d)| d.is_dir()).collect();
                if dirs.is_empty() {
                    return Err(CgroupError::Missing(path.to_path_buf()));
                }
                let is_root = rel.as_os_str().is_empty();
                Ok(self.v1_set(dirs, is_root, format!("cgroup {}", path.display())))
            }
        }
    }

    fn v2_set(&self, dir: PathBuf, is_root: bool) -> CgroupSet {
        CgroupSet {
            version: Version::V2,
            join: vec![dir.clone()],
            cpu: Some(dir.clone()),
            memory: Some(dir.clone()),
            is_root,
            display: format!("cgroup {}", dir.display()),
        }
    }

    fn v1_set(&self, dirs: Vec<(&Hierarchy, PathBuf)>, is_root: bool, display: String) -> CgroupSet {
        let with = |c: &str| dirs.iter().find(|(h, _)| h.has(c)).map(|(_, d)| d.clone());
        CgroupSet {
            version: Version::V1,
            join: dirs.iter().map(|(_, d)| d.clone()).collect(),
            cpu: with("cpuacct"),
            memory: with("memory"),
            is_root,
            display,
        }
    }
}

/// Resolves symlinks (v1 hosts link /sys/fs/cgroup/cpu to cpu,cpuacct) and
/// checks that the path is a cgroup directory. A path that exists but is
/// not a cgroup, or a link to nothing, is told apart from a missing one:
/// "does not exist" would send the user looking for the wrong mistake.
fn canonical_cgroup(path: &Path) -> Result<PathBuf, CgroupError> {
    let dir = match fs::canonicalize(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dangling = path
                .ancestors()
                .find(|a| a.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) && fs::metadata(a).is_err());
            return Err(match dangling.and_then(|l| fs::read_link(l).ok().map(|t| (l, t))) {
                Some((l, target)) => CgroupError::DanglingLink {
                    path: path.to_path_buf(),
                    via: if l == path { "is".into() } else { format!("goes through {},", l.display()) },
                    target,
                },
                None => CgroupError::Missing(path.to_path_buf()),
            });
        }
        Err(e) => return Err(CgroupError::Read { path: path.to_path_buf(), source: e }),
    };
    if !dir.join("cgroup.procs").exists() {
        let what = if dir == path { "it has".to_string() } else { format!("it leads to {}, which has", dir.display()) };
        return Err(CgroupError::NotACgroup { path: path.to_path_buf(), what });
    }
    Ok(dir)
}

/// /proc/self/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v as char);
            i += 4;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read { path: path.to_path_buf(), source })
}

/// `key value` lines (cpu.stat, memory.events, memory.oom_control,
/// memory.stat, /proc/vmstat).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok()).flatten()
    })
}

impl CgroupSet {
    /// Moves a process into every directory of the set. The caller does
    /// this before the stressor starts working, so all its CPU time and
    /// memory are charged to the target.
    pub fn join(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.join {
            let path = dir.join("cgroup.procs");
            fs::write(&path, pid.to_string()).map_err(|source| CgroupError::Write {
                path,
                value: pid.to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Total CPU time charged to the cgroup (and its descendants), in ns.
    pub fn cpu_usage_ns(&self) -> Result<u64, CgroupError> {
        let Some(dir) = &self.cpu else { return Ok(0) };
        match self.version {
            Version::V2 => {
                let path = dir.join("cpu.stat");
                keyed(&read(&path)?, "usage_usec")
                    .map(|us| us * 1000)
                    .ok_or(CgroupError::Read { path, source: io::Error::other("no usage_usec") })
            }
            Version::V1 => {
                let path = dir.join("cpuacct.usage");
                read(&path)?.trim().parse().map_err(|e| CgroupError::Read { path, source: io::Error::other(e) })
            }
        }
    }

    /// The memory the cgroup may use: the smallest limit on the way up to
    /// the root, or `host_total` when there is none (or when it is lower).
    pub fn memory_limit(&self, cgroup_root: &Path, host_total: u64) -> Result<u64, CgroupError> {
        let Some(dir) = &self.memory else { return Ok(host_total) };
        if self.is_root {
            return Ok(host_total);
        }
        match self.version {
            Version::V2 => {
                let mut limit = host_total;
                let mut d = dir.as_path();
                while d.starts_with(cgroup_root) {
                    if let Ok(text) = fs::read_to_string(d.join("memory.max"))
                        && let Ok(v) = text.trim().parse::<u64>()
                    {
                        limit = limit.min(v);
                    }
                    match d.parent() {
                        Some(p) => d = p,
                        None => break,
                    }
                }
                Ok(limit)
            }
            Version::V1 => {
                // memory.stat carries the limit in force through ancestors.
                let path = dir.join("memory.stat");
                let text = read(&path)?;
                Ok(keyed(&text, "hierarchical_memory_limit").unwrap_or(u64::MAX).min(host_total))
            }
        }
    }

    /// OOM kills of processes in the cgroup (v2 memory.events, v1
    /// memory.oom_control, both counting descendants), or the host's count
    /// in /proc/vmstat for a root cgroup, which has neither file in v2.
    pub fn oom_kills(&self, proc_root: &Path) -> Result<u64, CgroupError> {
        let from = |path: PathBuf| -> Result<u64, CgroupError> {
            let text = read(&path)?;
            keyed(&text, "oom_kill").ok_or(CgroupError::Read { path, source: io::Error::other("no oom_kill field") })
        };
        match (&self.memory, self.is_root, self.version) {
            (Some(dir), false, Version::V2) => from(dir.join("memory.events")),
            (Some(dir), false, Version::V1) => from(dir.join("memory.oom_control")),
            _ => from(proc_root.join("vmstat")),
        }
    }

    /// Memory charged to the cgroup now (v2 memory.current, v1
    /// memory.usage_in_bytes).
    pub fn memory_usage(&self) -> Result<u64, CgroupError> {
        let Some(dir) = &self.memory else { return Ok(0) };
        let path = match self.version {
            Version::V2 => dir.join("memory.current"),
            Version::V1 => dir.join("memory.usage_in_bytes"),
        };
        read(&path)?.trim().parse().map_err(|e| CgroupError::Read { path, source: io::Error::other(e) })
    }
}

#[cfg(test)]
mod tests;
