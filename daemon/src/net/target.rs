//! Finding the target's network namespace and what is in it (devices,
//! their addresses, their root qdiscs), through netlink dumps made on a
//! thread inside the namespace.

use std::net::IpAddr;

use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    tc::{TcAttribute, TcHandle, TcMessage},
};

use crate::{
    error::ApiError,
    netlink::{NetlinkError, RouteSocket},
    netns::NetnsRef,
    spec::Target,
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
    let inode = netns.inode().map_err(|e| match target {
        Target::NetnsName(n) => ApiError::NotFound(format!(
            "network namespace '{n}' not found (no /run/netns/{n}): create it or check `ip netns list` ({e})"
        )),
        Target::Pid(p) => ApiError::NotFound(format!("pid {p} has no reachable network namespace (did it exit?): {e}")),
        _ => ApiError::NotFound(format!("{target}: {e}")),
    })?;
    Ok(TargetNs { netns, inode: inode as u32 })
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
    let mut devices: Vec<Device> = Vec::new();
    for m in sock.dump("dump links", RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        if let RouteNetlinkMessage::NewLink(l) = m {
            let name = l
                .attributes
                .iter()
                .find_map(|a| if let LinkAttribute::IfName(n) = a { Some(n.clone()) } else { None })
                .unwrap_or_default();
            devices.push(Device { ifindex: l.header.index, name, ..Default::default() });
        }
    }
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
    for m in sock.dump("dump qdiscs", RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()))? {
        if let RouteNetlinkMessage::NewQueueDiscipline(q) = m {
            if q.header.parent != TcHandle::ROOT {
                continue;
            }
            let kind = q
                .attributes
                .iter()
                .find_map(|a| if let TcAttribute::Kind(k) = a { Some(k.clone()) } else { None })
                .unwrap_or_default();
            if let Some(d) = devices.iter_mut().find(|d| d.ifindex as i32 == q.header.index) {
                d.root_qdisc = Some((kind, q.header.handle.major));
            }
        }
    }
    Ok(devices)
}

/// The devices a selector names; empty means every device but lo. A name
/// that does not exist is NotFound, listing what does.
pub fn select<'a>(all: &'a [Device], names: &[String], label: &str) -> Result<Vec<&'a Device>, ApiError> {
    if names.is_empty() {
        let v: Vec<_> = all.iter().filter(|d| d.name != "lo").collect();
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
            all.iter().find(|d| &d.name == n).ok_or_else(|| {
                let have: Vec<_> = all.iter().map(|d| d.name.as_str()).collect();
                ApiError::NotFound(format!(
                    "no device '{n}' in network namespace {label} (devices: {})",
                    have.join(", ")
                ))
            })
        })
        .collect()
}
