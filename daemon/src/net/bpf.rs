//! The BPF side of the datapath: the shared maps (pinned under the
//! daemon's bpffs directory so that a restarted daemon finds them again),
//! one pinned copy of the classifiers per target network namespace, and
//! attaching them to devices (TCX links, pinned; or cls_bpf filters under
//! clsact on kernels without TCX).
//!
//! Map file descriptors are global, so map updates happen on any thread;
//! attaching and detaching run on a namespace thread (see `netns`).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::TcAttachOptions,
    },
    util::nr_cpus,
};
use chaosd_common::*;

mod attach;

pub use attach::*;

/// Priority and handle of chaosd's cls_bpf filters under clsact (they also
/// carry the program name, which is how they are found again).
pub const FILTER_PRIORITY: u16 = 0xc4a0;
pub const PROG_EGRESS: &str = "chaosd_tc";
pub const PROG_INGRESS: &str = "chaosd_tc_ingress";
pub const PROG_IFB_SEL: &str = "chaosd_ifb_sel";
/// The classifiers' verdict for a packet they leave alone (TC_ACT_UNSPEC,
/// which is TCX_NEXT), as BPF_PROG_TEST_RUN reports it.
pub const VERDICT_PASS: u32 = -1i32 as u32;

const MAP_NAMES: [&str; 7] = [
    "CHAOSD_CONTROL",
    "CHAOSD_DEVICES",
    "CHAOSD_INDEX",
    "CHAOSD_RULES",
    "CHAOSD_PEERS",
    "CHAOSD_STATS",
    "CHAOSD_PROTECTED",
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading chaosd's BPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "another chaosd uses the BPF directory {} (its lock is held): give each daemon its own --bpf-dir",
        .0.display()
    )]
    Locked(PathBuf),
    #[error("{0}")]
    Other(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BpfError {
    let what = what.into();
    move |source| BpfError::Io { what, source }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { map, source }
}

/// The shared maps, opened from (or created at) their pins.
pub struct Maps {
    pub control: Array<MapData, Control>,
    pub devices: HashMap<MapData, DevKey, DevConf>,
    pub index: HashMap<MapData, IndexKey, Slot>,
    pub rules: Array<MapData, Rule>,
    pub peers: LpmTrie<MapData, PeerKey, u8>,
    pub stats: PerCpuArray<MapData, RuleStats>,
    pub protected: HashMap<MapData, u32, u8>,
    /// Rule ids in use (from the RULES map at start, then kept here).
    pub used_ids: BTreeSet<u32>,
}

pub struct Datapath {
    dir: PathBuf,
    pub maps: Mutex<Maps>,
    /// Classifier copies of namespaces whose last rule went: loaded but
    /// neither attached nor pinned (held only by these fds, gone with the
    /// daemon), so that the next fault there skips BPF_PROG_LOAD and the
    /// verifier (~100 ms per program).
    spare: Mutex<std::collections::HashMap<u32, Vec<(u8, SchedClassifier)>>>,
    /// The selector in front of the mirred action to IFBs (no per-namespace
    /// state, so one copy, pinned as `prog-ifb-sel`).
    ifb_sel: SchedClassifier,
    grace: Duration,
    /// TCX links where the kernel has them (6.6+), clsact otherwise.
    pub tcx: bool,
    /// The heartbeat found in the pinned control map at start was older
    /// than the grace period: the dead man's switch had fired.
    pub stale_at_start: bool,
    /// CLOCK_BOOTTIME of the last heartbeat written (0: none yet).
    last_beat: std::sync::atomic::AtomicU64,
}

/// CLOCK_BOOTTIME now, as `bpf_ktime_get_boot_ns` sees it.
pub fn boot_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Mounts bpffs on `mountpoint` unless it already is one.
pub fn ensure_bpffs(mountpoint: &Path) -> Result<(), BpfError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    fs::create_dir_all(mountpoint).map_err(io(format!("create {}", mountpoint.display())))?;
    let st = nix::sys::statfs::statfs(mountpoint)
        .map_err(|e| BpfError::Other(format!("statfs {}: {e}", mountpoint.display())))?;
    if st.filesystem_type().0 as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(Some("bpf"), mountpoint, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|e| BpfError::Other(format!("mount bpffs on {}: {e}", mountpoint.display())))
}

/// Locks chaosd's BPF directory (flock on the directory itself, which
/// bpffs allows) for as long as the returned guard lives: two daemons
/// sharing one directory would share, and wipe, each other's rules and
/// programs. Creates the directory (and mounts bpffs on its parent) first.
pub fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<fs::File>, BpfError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = dir.parent() {
        ensure_bpffs(parent)?;
    }
    fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
        .map_err(io(format!("open {}", dir.display())))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        nix::errno::Errno::EWOULDBLOCK => BpfError::Locked(dir.to_path_buf()),
        e => BpfError::Other(format!("lock {}: {e}", dir.display())),
    })
}

impl Datapath {
    /// Opens (or creates and pins) the maps under `dir`, records the grace
    /// period and refreshes the heartbeat.
    pub fn open(dir: &Path, grace: Duration, protected: &[u16], tcx: bool) -> Result<Self, BpfError> {
        if let Some(parent) = dir.parent() {
            ensure_bpffs(parent)?;
        }
        fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let mut loader = EbpfLoader::new();
        // No CO-RE relocations in these programs: skip parsing the kernel's
        // BTF, which costs hundreds of milliseconds per load.
        loader.btf(None);
        let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(crate::BPF_OBJECT).map_err(BpfError::Load)?;
        let sel_pin = dir.join("prog-ifb-sel");
        let ifb_sel = match SchedClassifier::from_pin(&sel_pin) {
            Ok(p) => p,
            Err(_) => {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(PROG_IFB_SEL)
                    .ok_or_else(|| BpfError::Other(format!("BPF object has no program {PROG_IFB_SEL}")))?
                    .try_into()
                    .map_err(|source| BpfError::Program { what: PROG_IFB_SEL.into(), source })?;
                prog.load()
                    .map_err(|source| BpfError::Program { what: format!("BPF_PROG_LOAD {PROG_IFB_SEL}"), source })?;
                prog.pin(&sel_pin).map_err(|e| BpfError::Other(format!("pin {}: {e}", sel_pin.display())))?;
                SchedClassifier::from_pin(&sel_pin)
                    .map_err(|source| BpfError::Program { what: format!("open {}", sel_pin.display()), source })?
            }
        };
        let mut take = |name: &'static str| {
            ebpf.take_map(name).ok_or_else(|| BpfError::Other(format!("BPF object has no map {name}")))
        };
        let control: Array<MapData, Control> = take("CHAOSD_CONTROL")?.try_into().map_err(map_err("CONTROL"))?;
        let devices = take("CHAOSD_DEVICES")?.try_into().map_err(map_err("DEVICES"))?;
        let index = take("CHAOSD_INDEX")?.try_into().map_err(map_err("INDEX"))?;
        let rules: Array<MapData, Rule> = take("CHAOSD_RULES")?.try_into().map_err(map_err("RULES"))?;
        let peers = take("CHAOSD_PEERS")?.try_into().map_err(map_err("PEERS"))?;
        let stats = take("CHAOSD_STATS")?.try_into().map_err(map_err("STATS"))?;
        let mut protected_map: HashMap<MapData, u32, u8> =
            take("CHAOSD_PROTECTED")?.try_into().map_err(map_err("PROTECTED"))?;

        let old = control.get(&CONTROL_HEARTBEAT, 0).map_err(map_err("CONTROL"))?;
        let stale_at_start = old.heartbeat_ns != 0 && boot_ns().saturating_sub(old.heartbeat_ns) > old.grace_ns;
        let mut used_ids = BTreeSet::new();
        for id in 1..MAX_RULES {
            if let Ok(r) = rules.get(&id, 0)
                && r.action != ACTION_NONE
            {
                used_ids.insert(id);
            }
        }
        // Protected ports are configuration: replace whatever was there.
        let old_ports: Vec<u32> = protected_map.keys().filter_map(Result::ok).collect();
        for p in old_ports {
            let _ = protected_map.remove(&p);
        }
        for p in protected {
            protected_map.insert(*p as u32, 1, 0).map_err(map_err("PROTECTED"))?;
        }
        let dp = Self {
            dir: dir.to_path_buf(),
            maps: Mutex::new(Maps { control, devices, index, rules, peers, stats, protected: protected_map, used_ids }),
            spare: Mutex::new(std::collections::HashMap::new()),
            ifb_sel,
            grace,
            tcx,
            stale_at_start,
            last_beat: std::sync::atomic::AtomicU64::new(0),
        };
        dp.heartbeat()?;
        Ok(dp)
    }

    /// File descriptor of the IFB selector program (for cls_bpf filters).
    pub fn ifb_sel_fd(&self) -> Result<i32, BpfError> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = self.ifb_sel.fd().map_err(|source| BpfError::Program { what: PROG_IFB_SEL.into(), source })?;
        Ok(fd.as_fd().as_raw_fd())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refreshes the dead man's switch.
    pub fn heartbeat(&self) -> Result<(), BpfError> {
        let now = boot_ns();
        let c = Control { heartbeat_ns: now, grace_ns: self.grace.as_nanos() as u64 };
        self.lock().control.set(CONTROL_HEARTBEAT, c, 0).map_err(map_err("CONTROL"))?;
        self.last_beat.store(now, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// How long ago the last heartbeat was written (CLOCK_BOOTTIME, so time
    /// the daemon spent stopped or the host suspended counts).
    pub fn since_last_beat(&self) -> Duration {
        let last = self.last_beat.load(std::sync::atomic::Ordering::SeqCst);
        Duration::from_nanos(boot_ns().saturating_sub(last))
    }

    /// The dead man's switch's grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Directory of the pins of one namespace's programs and links.
    pub fn ns_dir(&self, netns: u32) -> PathBuf {
        self.dir.join(format!("ns-{netns}"))
    }

    pub fn prog_pin(&self, netns: u32, dir: u8) -> PathBuf {
        self.ns_dir(netns).join(if dir == DIR_EGRESS { "prog-egress" } else { "prog-ingress" })
    }

    pub fn link_pin(&self, netns: u32, ifindex: u32, dir: u8) -> PathBuf {
        self.ns_dir(netns).join(format!("link-{ifindex}-{}", if dir == DIR_EGRESS { "egress" } else { "ingress" }))
    }

    /// Loads the classifiers for one namespace (sharing the pinned maps)
    /// and pins them, unless they are pinned already.
    pub fn ensure_programs(&self, netns: u32) -> Result<(), BpfError> {
        if self.prog_pin(netns, DIR_EGRESS).exists() && self.prog_pin(netns, DIR_INGRESS).exists() {
            return Ok(());
        }
        let ns_dir = self.ns_dir(netns);
        fs::create_dir_all(&ns_dir).map_err(io(format!("create {}", ns_dir.display())))?;
        if let Some(progs) = self.spare.lock().unwrap_or_else(|e| e.into_inner()).remove(&netns) {
            for (dir, mut prog) in progs {
                let pin = self.prog_pin(netns, dir);
                let _ = fs::remove_file(&pin);
                prog.pin(&pin).map_err(|e| BpfError::Other(format!("pin program at {}: {e}", pin.display())))?;
            }
            return Ok(());
        }
        let mut loader = EbpfLoader::new();
        // No CO-RE relocations in these programs: skip parsing the kernel's
        // BTF, which costs hundreds of milliseconds per load.
        loader.btf(None);
        let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, self.dir.join(n))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        loader.override_global("NETNS", &netns, true);
        let mut ebpf = loader.load(crate::BPF_OBJECT).map_err(BpfError::Load)?;
        for (name, dir) in [(PROG_EGRESS, DIR_EGRESS), (PROG_INGRESS, DIR_INGRESS)] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| BpfError::Other(format!("BPF object has no program {name}")))?
                .try_into()
                .map_err(|source| BpfError::Program { what: format!("program {name}"), source })?;
            prog.load().map_err(|source| BpfError::Program { what: format!("BPF_PROG_LOAD {name}"), source })?;
            let pin = self.prog_pin(netns, dir);
            let _ = fs::remove_file(&pin);
            prog.pin(&pin).map_err(|e| BpfError::Other(format!("pin {name} at {}: {e}", pin.display())))?;
        }
        Ok(())
    }

    /// Removes the namespace's program pins and directory (links must be
    /// gone already; the programs unload with their last reference).
    pub fn remove_programs(&self, netns: u32) -> Result<(), BpfError> {
        const SPARE_MAX: usize = 64;
        let dir = self.ns_dir(netns);
        {
            let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < SPARE_MAX && !spare.contains_key(&netns) {
                let progs: Vec<(u8, SchedClassifier)> = [DIR_EGRESS, DIR_INGRESS]
                    .into_iter()
                    .filter_map(|d| SchedClassifier::from_pin(self.prog_pin(netns, d)).ok().map(|p| (d, p)))
                    .collect();
                if progs.len() == 2 {
                    spare.insert(netns, progs);
                }
            }
        }
        match fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(format!("read {}", dir.display()))(e)),
            Ok(entries) => {
                for e in entries.flatten() {
                    let name = e.file_name();
                    // A link pin left here means something is still attached.
                    if name.to_string_lossy().starts_with("link-") {
                        unpin_link(&e.path())?;
                    } else {
                        fs::remove_file(e.path()).map_err(io(format!("unpin {}", e.path().display())))?;
                    }
                }
            }
        }
        fs::remove_dir(&dir).map_err(io(format!("remove {}", dir.display())))
    }

    /// Namespaces that have program pins.
    pub fn pinned_namespaces(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return vec![] };
        entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("ns-")?.parse().ok()).collect()
    }

    /// Sum of a rule's per-CPU counters.
    pub fn rule_stats(&self, id: u32) -> RuleStats {
        let maps = self.lock();
        let mut sum = RuleStats::default();
        if let Ok(values) = maps.stats.get(&id, 0) {
            for v in values.iter() {
                sum.matched += v.matched;
                sum.dropped += v.dropped;
                sum.delayed += v.delayed;
            }
        }
        sum
    }

    /// Zeroes a rule's per-CPU counters (ids are reused).
    pub fn reset_stats(maps: &mut Maps, id: u32) -> Result<(), BpfError> {
        let n = nr_cpus().map_err(|(p, e)| BpfError::Io { what: p.to_string(), source: e })?;
        let values = PerCpuValues::try_from(vec![RuleStats::default(); n]).map_err(io("per-CPU counters"))?;
        maps.stats.set(id, values, 0).map_err(map_err("STATS"))
    }
}
