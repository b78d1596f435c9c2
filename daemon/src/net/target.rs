//! Finding the target's network namespace and what is in it (devices,
//! their addresses, their root qdiscs), through netlink dumps made on a
//! thread inside the namespace.

use std::net::IpAddr;

use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    tc::TcHandle,
};

use crate::{
    error::ApiError,
    netlink::{NetlinkError, RouteSocket},
    netns::NetnsRef,
    spec::Target,
    tc,
};

/// A resolved target namespace: how to enter it and its identity.
#[derive(Clone, Debug)]
pub struct TargetNs {
    pub netns: NetnsRef,
    /// Inode of the namespace file (unique among live namespaces).
    pub inode: u32,
}

/// Resolves a target to its network namespace; a missing netns or pid is
/// NotFound.
pub fn resolve(target: &Target) -> Result<TargetNs, ApiError> {
    let netns = match target {
        Target::Pid(pid) => {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(ApiError::NotFound(format!(
                    "no process with pid {pid}: check the pid (it may have exited)"
                )));
            }
            NetnsRef::of_pid(*pid)
        }
        Target::NetnsName(name) => NetnsRef::named(name),
        Target::NetnsPath(path) => NetnsRef::path(path.clone()),
        Target::Host => NetnsRef::host(),
        Target::Cgroup(_) | Target::ProcessName(_) => {
            return Err(ApiError::InvalidArgument(format!(
                "network faults need a pid, netns or host target, not {target}"
            )));
        }
    };
    let inode = netns.inode().map_err(|e| open_error(target, &netns, e))?;
    Ok(TargetNs { netns, inode: inode as u32 })
}

/// Why a target's namespace could not be opened, in the user's terms: the
/// kind of failure decides the message, since "not found" for a permission
/// denial sends the user after the wrong mistake.
fn open_error(target: &Target, netns: &NetnsRef, e: crate::netns::NetnsError) -> ApiError {
    let (path, kind) = match &e {
        crate::netns::NetnsError::Open { path, source, .. } => (path.display().to_string(), source.kind()),
        _ => (netns.file_path().display().to_string(), std::io::ErrorKind::Other),
    };
    match (kind, target) {
        (std::io::ErrorKind::NotFound, Target::NetnsName(n)) => ApiError::NotFound(format!(
            "network namespace '{n}' not found (no /run/netns/{n}): create it or check `ip netns list`"
        )),
        (std::io::ErrorKind::NotFound, Target::Pid(p)) => {
            ApiError::NotFound(format!("pid {p} exited before its network namespace could be opened: check the pid"))
        }
        (std::io::ErrorKind::NotFound, _) => {
            ApiError::NotFound(format!("{path} does not exist: give a network namespace file that does"))
        }
        (std::io::ErrorKind::PermissionDenied, _) => ApiError::FailedPrecondition(format!(
            "chaosd is not allowed to open {} ({path}: permission denied): it belongs to a user namespace \
             above chaosd's or a security policy protects it; target a namespace chaosd can open (--netns, \
             --netns-path), or run chaosd where it may open this one",
            match target {
                Target::Pid(p) => format!("the network namespace of pid {p}"),
                _ => "the network namespace file".to_string(),
            }
        )),
        _ => ApiError::Internal(format!("opening the network namespace of {target}: {e}")),
    }
}

#[derive(Clone, Debug, Default)]
pub struct Device {
    pub ifindex: u32,
    pub name: String,
    pub v4: bool,
    /// Has an IPv6 address other than link-local.
    pub v6: bool,
    /// Root qdisc kind and handle major (None: none reported).
    pub root_qdisc: Option<(String, u16)>,
    /// One of chaosd's own IFB devices (never a target).
    pub chaosd_ifb: bool,
    /// The device's alias (chaosd labels its IFBs with their owner).
    pub alias: Option<String>,
    /// The owner's mark on chaosd's HTB root, when the device has one.
    pub htb_mark: Option<String>,
}

impl Device {
    /// Root qdiscs the kernel attaches by itself (handle 0:).
    pub fn root_is_default(&self) -> bool {
        match &self.root_qdisc {
            None => true,
            Some((kind, major)) => {
                *major == 0 && matches!(kind.as_str(), "noqueue" | "pfifo_fast" | "mq" | "fq_codel" | "noop")
            }
        }
    }
}

/// Dumps links, addresses and (with `root_qdiscs`, which only shaping
/// faults need) root qdiscs. Runs on a namespace thread.
pub fn inspect_here(root_qdiscs: bool) -> Result<Vec<Device>, NetlinkError> {
    let mut sock = RouteSocket::open()?;
    let mut devices: Vec<Device> = tc::links(&mut sock)?
        .into_iter()
        .map(|l| Device {
            ifindex: l.ifindex,
            chaosd_ifb: l.ifb && l.name.starts_with(super::shaping::IFB_PREFIX),
            name: l.name,
            alias: l.alias,
            ..Default::default()
        })
        .collect();
    let mut req = AddressMessage::default();
    req.header.family = AddressFamily::Unspec;
    for m in sock.dump("dump addresses", RouteNetlinkMessage::GetAddress(req))? {
        if let RouteNetlinkMessage::NewAddress(a) = m {
            let addr = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            if let Some(d) = devices.iter_mut().find(|d| d.ifindex == a.header.index) {
                match addr {
                    Some(IpAddr::V4(_)) => d.v4 = true,
                    Some(IpAddr::V6(v6)) if (v6.segments()[0] & 0xffc0) != 0xfe80 => d.v6 = true,
                    _ => {}
                }
            }
        }
    }
    if !root_qdiscs {
        return Ok(devices);
    }
    for q in tc::qdiscs(&mut sock, None)?.into_iter().filter(|q| q.parent == TcHandle::ROOT) {
        if let Some(d) = devices.iter_mut().find(|d| d.ifindex == q.ifindex) {
            d.root_qdisc = Some((q.kind, q.handle.major));
        }
    }
    for d in devices.iter_mut() {
        if matches!(&d.root_qdisc, Some((k, m)) if k == "htb" && *m == super::shaping::HTB_MAJOR) {
            d.htb_mark = super::shaping::htb_mark(&mut sock, d.ifindex)?;
        }
    }
    Ok(devices)
}

/// The devices a selector names; empty means every device but lo and
/// chaosd's own IFBs. A name that does not exist is NotFound, listing what
/// does; one of chaosd's IFBs is refused: a fault there would act on the
/// ingress traffic another fault steered to it, in the wrong direction.
pub fn select<'a>(all: &'a [Device], names: &[String], label: &str) -> Result<Vec<&'a Device>, ApiError> {
    if names.is_empty() {
        let v: Vec<_> = all.iter().filter(|d| d.name != "lo" && !d.chaosd_ifb).collect();
        if v.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "network namespace {label} has no device but lo; name lo with --device lo to target it"
            )));
        }
        return Ok(v);
    }
    names
        .iter()
        .map(|n| {
            let found = all.iter().find(|d| &d.name == n).ok_or_else(|| {
                let have: Vec<_> = all.iter().filter(|d| !d.chaosd_ifb).map(|d| d.name.as_str()).collect();
                ApiError::NotFound(format!(
                    "no device '{n}' in network namespace {label} (devices: {})",
                    have.join(", ")
                ))
            })?;
            if found.chaosd_ifb {
                return Err(ApiError::InvalidArgument(format!(
                    "device '{n}' in network namespace {label} is chaosd's own IFB, which carries another fault's \
                     ingress traffic; target the real device with --direction ingress instead"
                )));
            }
            Ok(found)
        })
        .collect()
}

/// A network namespace found on the host, held open so that it cannot go
/// away (or its inode be reused) while it is being swept.
#[derive(Debug)]
pub struct FoundNs {
    /// Inode of the namespace (as journal objects record it).
    pub inode: u32,
    /// How it was reached: "host", "'NAME'" (/run/netns) or "of pid N".
    pub label: String,
    file: std::fs::File,
}

impl FoundNs {
    /// Enters the namespace through the held file descriptor.
    pub fn netns(&self) -> NetnsRef {
        use std::os::fd::AsRawFd;
        NetnsRef::path(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// Every network namespace reachable from the daemon, once each (by inode):
/// its own, the bind mounts under /run/netns, and those of every process
/// in /proc. Namespaces that vanish while being listed are skipped; a
/// namespace held only by a file descriptor or a bind mount in another
/// mount namespace is not reachable this way.
pub fn reachable_namespaces() -> Vec<FoundNs> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    // Namespace files all live on nsfs: a stale file under /run/netns (a
    // failed `ip netns add`) is on another filesystem and is skipped.
    let nsfs = std::fs::metadata("/proc/self/ns/net").map(|m| m.dev()).ok();
    let mut take = |path: std::path::PathBuf, label: String, out: &mut Vec<FoundNs>| {
        // /proc/PID/ns/net reads as "net:[INODE]": skip known namespaces
        // without opening them (most processes share a handful).
        if let Ok(link) = std::fs::read_link(&path) {
            let ino = link.to_str().and_then(|s| s.strip_prefix("net:[")?.strip_suffix(']')?.parse::<u64>().ok());
            if ino.is_some_and(|i| seen.contains(&i)) {
                return;
            }
        }
        let Ok(file) = std::fs::File::open(&path) else { return };
        let Ok(meta) = file.metadata() else { return };
        if Some(meta.dev()) != nsfs {
            return;
        }
        if seen.insert(meta.ino()) {
            out.push(FoundNs { inode: meta.ino() as u32, label, file });
        }
    };
    take("/proc/self/ns/net".into(), "host".into(), &mut out);
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            take(e.path(), format!("'{}'", e.file_name().to_string_lossy()), &mut out);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            take(e.path().join("ns/net"), format!("of pid {pid}"), &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(path: &str) -> crate::netns::NetnsError {
        crate::netns::NetnsError::Open {
            label: "x".into(),
            path: path.into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        }
    }

    #[test]
    fn a_permission_denial_is_not_called_an_exited_pid() {
        // A root chaosd holds CAP_SYS_PTRACE, so only an LSM or a user
        // namespace above it can deny the open: not reproducible on every
        // host, hence tested here on the mapping itself.
        let e = open_error(&Target::Pid(1), &NetnsRef::of_pid(1), denied("/proc/1/ns/net")).to_string();
        assert!(e.contains("permission denied") && e.contains("pid 1") && e.contains("--netns"), "{e}");
        assert!(!e.contains("exit") && !e.contains("not found"), "{e}");
    }

    #[test]
    fn a_missing_namespace_is_not_found() {
        let gone = crate::netns::NetnsError::Open {
            label: "x".into(),
            path: "/run/netns/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let e = open_error(&Target::NetnsName("x".into()), &NetnsRef::named("x"), gone);
        assert!(matches!(e, ApiError::NotFound(_)), "{e:?}");
        assert!(e.to_string().contains("ip netns list"), "{e}");
    }
}
