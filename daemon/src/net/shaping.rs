//! Qdiscs for the delay family and bandwidth: an HTB root (handle
//! c4a0:) whose default class 1 never shapes, one class per rule
//! (c4a0:<rule+1>) selected by the classifier through skb->priority, with a
//! netem leaf for the delay family. Ingress goes through an IFB device
//! per shaped device. All functions with `_here` or taking a socket run on
//! a namespace thread.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoKind, LinkFlags, LinkMessage},
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};

use self::options::{htb_class_options, netem_options};
use super::objects::NetObject;
use crate::{
    netlink::{NetlinkError, RouteSocket},
    owner::Owner,
    spec::{Direction, NetAction},
    tc::{self, QdiscSpec},
};

mod options;

pub use chaosd_common::HTB_MAJOR;
/// Priority of the cls_bpf + mirred filter that moves delayed ingress
/// packets to the IFB (after chaosd's classifier at 0xc4a0).
pub const IFB_FILTER_PRIORITY: u16 = 0xc4a1;
/// The chain of chaosd's HTB that holds the owner's mark (never run).
pub const MARK_CHAIN: u32 = 0xc4a0;
/// What the owner's label names on IFB devices and HTB marks.
pub const OWNER_MARK: &str = "chaosd_owner";
/// Default class: unshaped (rate far above any link).
pub(crate) const DEFAULT_MINOR: u16 = 1;
/// 100 Gbit/s in bytes per second, the "never shapes" rate.
const UNSHAPED_BPS: u64 = 100_000_000_000 / 8;

/// Why shaping could not be set up, checked or removed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ShapingError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("device {name}: {source}")]
    NoDevice {
        name: String,
        #[source]
        source: nix::Error,
    },
    /// A shaping object of a live fault is no longer in the kernel.
    #[error("{0}")]
    Missing(String),
}

pub fn classid(rule: u32) -> u32 {
    ((HTB_MAJOR as u32) << 16) | (rule + 1)
}

/// Names of chaosd's IFB devices start with this.
pub const IFB_PREFIX: &str = "chaosd-ifb";

pub fn ifb_name(ifindex: u32) -> String {
    format!("{IFB_PREFIX}{ifindex}")
}

/// What one fault needs on which device.
pub struct Plan {
    pub classid: u32,
    pub action: NetAction,
    /// (device that carries the HTB, IFB for which device if ingress).
    pub targets: Vec<(String, Option<(String, u32)>)>,
}

impl Plan {
    /// `devices`: (name, ifindex) of each device the fault shapes.
    pub fn new<'a>(
        rule: u32,
        action: &NetAction,
        dir: Direction,
        devices: impl IntoIterator<Item = (&'a str, u32)>,
    ) -> Self {
        let mut targets = Vec::new();
        for (name, ifindex) in devices {
            if dir.egress() {
                targets.push((name.to_string(), None));
            }
            if dir.ingress() {
                targets.push((ifb_name(ifindex), Some((name.to_string(), ifindex))));
            }
        }
        Self { classid: classid(rule), action: action.clone(), targets }
    }

    /// The journal objects, in creation order.
    pub fn objects(&self, netns: u32) -> Vec<NetObject> {
        let mut out = Vec::new();
        for (dev, ifb) in &self.targets {
            if let Some((for_ifname, _)) = ifb {
                out.push(NetObject::Ifb { netns, name: dev.clone(), for_ifname: for_ifname.clone() });
            }
            out.push(NetObject::Htb { netns, ifname: dev.clone() });
            out.push(NetObject::Class { netns, ifname: dev.clone(), classid: self.classid });
        }
        out
    }
}

fn ifindex_here(name: &str) -> Result<u32, ShapingError> {
    nix::net::if_::if_nametoindex(name).map_err(|source| ShapingError::NoDevice { name: name.into(), source })
}

/// Sets everything up; returns (device ifindex, IFB ifindex) for ingress.
/// Runs on a thread inside the target namespace. Validation has made sure
/// that an HTB root or IFB already there is this daemon's.
pub(crate) fn apply_here(plan: &Plan, sel_fd: i32, owner: &Owner) -> Result<Vec<(u32, u32)>, ShapingError> {
    let mut sock = RouteSocket::open()?;
    let mut ifbs = Vec::new();
    for (dev, ifb) in &plan.targets {
        if let Some((_, for_ifindex)) = ifb {
            if nix::net::if_::if_nametoindex(dev.as_str()).is_err() {
                tc::link_add(&mut sock, dev, InfoKind::Ifb, Some(&owner.label(OWNER_MARK)))?;
            }
            let idx = ifindex_here(dev)?;
            link_set_up(&mut sock, idx)?;
            ifbs.push((*for_ifindex, idx));
        }
        let idx = ifindex_here(dev)?;
        ensure_htb(&mut sock, idx, sel_fd, owner)?;
        add_class(&mut sock, idx, plan.classid, &plan.action)?;
        if let Some((for_ifname, for_ifindex)) = ifb {
            ensure_clsact(for_ifname)?;
            add_ifb_filter(&mut sock, *for_ifindex, idx, sel_fd, owner)?;
        }
    }
    Ok(ifbs)
}

fn link_set_up(sock: &mut RouteSocket, ifindex: u32) -> Result<(), NetlinkError> {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    sock.request(&format!("set link {ifindex} up"), RouteNetlinkMessage::SetLink(msg), 0)
}

fn handle(id: u32) -> TcHandle {
    TcHandle { major: (id >> 16) as u16, minor: id as u16 }
}

/// Whether chaosd's HTB (`HTB_MAJOR:`) is a device's root qdisc.
pub(crate) fn htb_root_is_ours(sock: &mut RouteSocket, ifindex: u32) -> Result<bool, NetlinkError> {
    Ok(tc::qdiscs(sock, Some(ifindex))?.iter().any(is_htb_root))
}

/// chaosd's HTB root, in a qdisc dump.
pub(crate) fn is_htb_root(q: &tc::Qdisc) -> bool {
    q.kind == "htb" && q.handle.major == HTB_MAJOR && q.parent == TcHandle::ROOT
}

/// Class handles on a device.
fn classes(sock: &mut RouteSocket, ifindex: u32) -> Result<Vec<TcHandle>, NetlinkError> {
    let req = tc::tc_message(ifindex, tc::NO_HANDLE, tc::NO_HANDLE);
    let mut out = Vec::new();
    for m in sock.dump("dump classes", RouteNetlinkMessage::GetTrafficClass(req))? {
        if let RouteNetlinkMessage::NewTrafficClass(c) = m
            && c.header.index as u32 == ifindex
        {
            out.push(c.header.handle);
        }
    }
    Ok(out)
}

/// Puts chaosd's HTB at the root unless it is there already, with the
/// owner's mark: a cls_bpf filter on chain `MARK_CHAIN` of the HTB, which
/// nothing ever jumps to, so it never runs; it exists to carry the owner's
/// label, since a qdisc has no field of its own for one.
fn ensure_htb(sock: &mut RouteSocket, ifindex: u32, sel_fd: i32, owner: &Owner) -> Result<(), NetlinkError> {
    if htb_root_is_ours(sock, ifindex)? {
        return Ok(());
    }
    let mut msg = tc::tc_message(ifindex, TcHandle::ROOT, TcHandle { major: HTB_MAJOR, minor: 0 });
    msg.attributes.push(TcAttribute::Kind("htb".into()));
    msg.attributes.push(TcAttribute::Other(netlink_packet_core::DefaultNla::new(
        tc::TCA_OPTIONS,
        tc::htb_init_options(DEFAULT_MINOR as u32),
    )));
    // Replacing is only reached when forced or when the root is a kernel
    // default (validated before).
    let flags = NLM_F_CREATE | NLM_F_REPLACE;
    sock.request(&format!("add HTB root on ifindex {ifindex}"), RouteNetlinkMessage::NewQueueDiscipline(msg), flags)?;
    let label = owner.label(OWNER_MARK);
    tc::bpf_filter_add(
        sock,
        ifindex,
        &tc::BpfFilter {
            parent: TcHandle { major: HTB_MAJOR, minor: 0 },
            priority: IFB_FILTER_PRIORITY,
            chain: Some(MARK_CHAIN),
            prog_fd: sel_fd,
            name: &label,
            direct_action: false,
            actions: None,
        },
    )?;
    let mut cls = tc::tc_message(
        ifindex,
        TcHandle { major: HTB_MAJOR, minor: 0 },
        TcHandle { major: HTB_MAJOR, minor: DEFAULT_MINOR },
    );
    cls.attributes.push(TcAttribute::Kind("htb".into()));
    cls.attributes.push(TcAttribute::Other(netlink_packet_core::DefaultNla::new(
        tc::TCA_OPTIONS,
        htb_class_options(UNSHAPED_BPS, 200_000),
    )));
    sock.request("add HTB default class", RouteNetlinkMessage::NewTrafficClass(cls), NLM_F_CREATE | NLM_F_EXCL)
}

/// The label of the owner's mark on chaosd's HTB root of a device (None:
/// no mark, e.g. left by a chaosd older than marks).
pub fn htb_mark(sock: &mut RouteSocket, ifindex: u32) -> Result<Option<String>, NetlinkError> {
    let mut req = tc::tc_message(ifindex, TcHandle { major: HTB_MAJOR, minor: 0 }, tc::NO_HANDLE);
    req.attributes.push(TcAttribute::Chain(MARK_CHAIN));
    for m in sock.dump("dump the HTB's mark", RouteNetlinkMessage::GetTrafficFilter(req))? {
        let RouteNetlinkMessage::NewTrafficFilter(f) = m else { continue };
        if f.header.index as u32 != ifindex {
            continue;
        }
        if let Some(name) = bpf_filter_name(&f)
            && name.starts_with(OWNER_MARK)
        {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// The name a cls_bpf filter carries (chaosd writes its labels there).
pub fn bpf_filter_name(f: &TcMessage) -> Option<String> {
    f.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => Some(n.clone()),
            _ => None,
        }),
        _ => None,
    })
}

/// The rule's class, with a netem leaf for the delay family.
fn add_class(sock: &mut RouteSocket, ifindex: u32, classid: u32, action: &NetAction) -> Result<(), NetlinkError> {
    let (bps, burst) = match action {
        NetAction::Bandwidth { rate_bps, burst_bytes } => {
            let bytes = (rate_bps / 8).max(1);
            // tc's default: rate/HZ (250) plus one MTU.
            let burst = if *burst_bytes > 0 { *burst_bytes } else { ((bytes / 250) as u32).max(1600) + 1514 };
            (bytes, burst)
        }
        _ => (UNSHAPED_BPS, 200_000),
    };
    let mut cls = tc::tc_message(ifindex, TcHandle { major: HTB_MAJOR, minor: 0 }, handle(classid));
    cls.attributes.push(TcAttribute::Kind("htb".into()));
    cls.attributes
        .push(TcAttribute::Other(netlink_packet_core::DefaultNla::new(tc::TCA_OPTIONS, htb_class_options(bps, burst))));
    sock.request(
        &format!("add HTB class {:x}:{:x} on ifindex {ifindex}", classid >> 16, classid & 0xffff),
        RouteNetlinkMessage::NewTrafficClass(cls),
        NLM_F_CREATE | NLM_F_EXCL,
    )?;
    if action.needs_netem() {
        tc::qdisc_add(
            sock,
            ifindex,
            &QdiscSpec {
                kind: "netem",
                parent: handle(classid),
                handle: TcHandle { major: (classid & 0xffff) as u16, minor: 0 },
                options: Some(netem_options(action)),
            },
        )?;
    }
    Ok(())
}

/// cls_bpf (not direct-action) running `chaosd_ifb_sel` with a mirred
/// "egress redirect" to the IFB; an existing one is kept.
fn add_ifb_filter(sock: &mut RouteSocket, dev: u32, ifb: u32, sel_fd: i32, owner: &Owner) -> Result<(), NetlinkError> {
    const TCA_ACT_KIND: u16 = 1;
    const TCA_ACT_OPTIONS: u16 = 2;
    const TCA_MIRRED_PARMS: u16 = 2;
    const TC_ACT_STOLEN: i32 = 4;
    const TCA_EGRESS_REDIR: i32 = 1;
    // struct tc_mirred: index, capab, action, refcnt, bindcnt, eaction, ifindex
    let mut parms = Vec::with_capacity(28);
    for v in [0i32, 0, TC_ACT_STOLEN, 0, 0, TCA_EGRESS_REDIR] {
        parms.extend_from_slice(&v.to_ne_bytes());
    }
    parms.extend_from_slice(&ifb.to_ne_bytes());
    let mut act = tc::nla(TCA_ACT_KIND, b"mirred\0");
    act.extend(tc::nla(TCA_ACT_OPTIONS, &tc::nla(TCA_MIRRED_PARMS, &parms)));
    let label = owner.label(super::bpf::PROG_IFB_SEL);
    let filter = tc::BpfFilter {
        parent: tc::CLSACT_INGRESS,
        priority: IFB_FILTER_PRIORITY,
        chain: None,
        prog_fd: sel_fd,
        name: &label,
        direct_action: false,
        actions: Some(tc::nla(1, &act)),
    };
    match tc::bpf_filter_add(sock, dev, &filter) {
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
        r => r,
    }
}

fn del_ifb_filter(sock: &mut RouteSocket, dev: u32) -> Result<(), NetlinkError> {
    let mut msg = tc::tc_message(dev, tc::CLSACT_INGRESS, tc::NO_HANDLE);
    msg.header.info = (IFB_FILTER_PRIORITY as u32) << 16;
    sock.request(
        &format!("delete the IFB redirect filter on ifindex {dev}"),
        RouteNetlinkMessage::DelTrafficFilter(msg),
        0,
    )
}

/// Number of tc filters under a device's clsact (ingress + egress).
fn clsact_filters(sock: &mut RouteSocket, dev: u32) -> Result<usize, NetlinkError> {
    let mut n = 0;
    for parent in [tc::CLSACT_INGRESS, tc::CLSACT_EGRESS] {
        let req = tc::tc_message(dev, parent, tc::NO_HANDLE);
        n += sock
            .dump("dump filters", RouteNetlinkMessage::GetTrafficFilter(req))?
            .iter()
            .filter(|m| matches!(m, RouteNetlinkMessage::NewTrafficFilter(f) if f.header.index as u32 == dev))
            .count();
    }
    Ok(n)
}

/// Removes a device's clsact qdisc when no filter is left under it.
pub(crate) fn remove_clsact_if_empty(ifname: &str) -> Result<(), ShapingError> {
    let Ok(idx) = nix::net::if_::if_nametoindex(ifname) else { return Ok(()) };
    let mut sock = RouteSocket::open()?;
    if !tc::qdiscs(&mut sock, Some(idx))?.iter().any(|q| q.kind == "clsact") {
        return Ok(());
    }
    if clsact_filters(&mut sock, idx)? > 0 {
        return Ok(());
    }
    remove_clsact(ifname)
}

/// Adds a clsact qdisc unless the device has one.
pub(crate) fn ensure_clsact(ifname: &str) -> Result<(), ShapingError> {
    let mut sock = RouteSocket::open()?;
    let idx = ifindex_here(ifname)?;
    if tc::qdiscs(&mut sock, Some(idx))?.iter().any(|q| q.kind == "clsact") {
        return Ok(());
    }
    tc::qdisc_add(
        &mut sock,
        idx,
        &QdiscSpec { kind: "clsact", parent: TcHandle::CLSACT, handle: tc::CLSACT_HANDLE, options: None },
    )?;
    Ok(())
}

/// Removes the clsact qdisc of a device (one chaosd created).
pub(crate) fn remove_clsact(ifname: &str) -> Result<(), ShapingError> {
    let Ok(idx) = nix::net::if_::if_nametoindex(ifname) else { return Ok(()) };
    let mut sock = RouteSocket::open()?;
    match tc::qdisc_del(&mut sock, idx, TcHandle::CLSACT, tc::CLSACT_HANDLE) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EINVAL)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether the shaping objects of a live experiment are all in place:
/// its classes under chaosd's HTB root, its IFBs and their redirect
/// filters. Runs on a thread inside the namespace.
pub(crate) fn verify_here(objects: &[NetObject]) -> Result<(), ShapingError> {
    let mut sock = RouteSocket::open()?;
    for o in objects {
        match o {
            NetObject::Class { ifname, classid, .. } => {
                let idx = ifindex_here(ifname)?;
                if !htb_root_is_ours(&mut sock, idx)? {
                    return Err(ShapingError::Missing(format!(
                        "chaosd's HTB root {HTB_MAJOR:x}: is no longer on {ifname}"
                    )));
                }
                if !classes(&mut sock, idx)?.contains(&handle(*classid)) {
                    return Err(ShapingError::Missing(format!(
                        "HTB class {:x}:{:x} is no longer on {ifname}",
                        classid >> 16,
                        classid & 0xffff
                    )));
                }
            }
            NetObject::Ifb { name, for_ifname, .. } => {
                ifindex_here(name).map_err(|_| ShapingError::Missing(format!("IFB device {name} is gone")))?;
                let dev = ifindex_here(for_ifname)?;
                let mut req = tc::tc_message(dev, tc::CLSACT_INGRESS, tc::NO_HANDLE);
                req.header.info = (IFB_FILTER_PRIORITY as u32) << 16;
                let filters = sock.dump("dump the IFB redirect filter", RouteNetlinkMessage::GetTrafficFilter(req))?;
                let present = filters.iter().any(|m| {
                    matches!(m, RouteNetlinkMessage::NewTrafficFilter(f)
                        if f.header.index as u32 == dev && (f.header.info >> 16) as u16 == IFB_FILTER_PRIORITY)
                });
                if !present {
                    return Err(ShapingError::Missing(format!(
                        "the filter that steers {for_ifname}'s ingress to {name} is gone"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Undoes shaping objects: classes first, then HTB roots without rule
/// classes, then IFBs without rule classes. Missing things are fine.
pub fn undo_here(objects: &[NetObject]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut sock = match RouteSocket::open() {
        Ok(s) => s,
        Err(e) => return vec![e.to_string()],
    };
    let gone = |e: &NetlinkError| matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EINVAL));
    for o in objects {
        if let NetObject::Class { ifname, classid, .. } = o {
            let Ok(idx) = nix::net::if_::if_nametoindex(ifname.as_str()) else { continue };
            let msg = tc::tc_message(idx, TcHandle { major: HTB_MAJOR, minor: 0 }, handle(*classid));
            match sock.request(&format!("delete class on {ifname}"), RouteNetlinkMessage::DelTrafficClass(msg), 0) {
                Ok(()) => {}
                Err(e) if gone(&e) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    for o in objects {
        if let NetObject::Htb { ifname, .. } = o {
            let Ok(idx) = nix::net::if_::if_nametoindex(ifname.as_str()) else { continue };
            let saved = objects.iter().find_map(|s| match s {
                NetObject::SavedRoot { ifname: dev, tree, .. } if dev == ifname => Some(tree),
                _ => None,
            });
            if !htb_root_is_ours(&mut sock, idx).unwrap_or(false) {
                continue;
            }
            let busy = classes(&mut sock, idx)
                .map(|c| c.iter().any(|h| h.major == HTB_MAJOR && h.minor != DEFAULT_MINOR && h.minor != 0))
                .unwrap_or(true);
            if busy {
                continue;
            }
            if let Some(tree) = saved {
                // The user's tree goes back in place of ours, exactly.
                let restored = super::qdisc_tree::restore(&mut sock, idx, tree)
                    .and_then(|()| super::qdisc_tree::differences(&mut sock, idx, tree));
                match restored {
                    Ok(diff) if diff.is_empty() => {}
                    Ok(diff) => errors.push(format!(
                        "the root qdisc tree of {ifname} was restored but differs from the saved one: {}",
                        diff.join("; ")
                    )),
                    Err(e) => errors.push(format!("restoring the user's root qdisc tree of {ifname}: {e}")),
                }
                continue;
            }
            match tc::qdisc_del(&mut sock, idx, TcHandle::ROOT, TcHandle { major: HTB_MAJOR, minor: 0 }) {
                Ok(()) => {}
                Err(e) if gone(&e) => {}
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    for o in objects {
        if let NetObject::Ifb { name, for_ifname, .. } = o {
            let Ok(idx) = nix::net::if_::if_nametoindex(name.as_str()) else { continue };
            let busy = classes(&mut sock, idx)
                .map(|c| c.iter().any(|h| h.major == HTB_MAJOR && h.minor != DEFAULT_MINOR && h.minor != 0))
                .unwrap_or(false);
            if busy {
                continue;
            }
            if let Ok(dev) = nix::net::if_::if_nametoindex(for_ifname.as_str()) {
                match del_ifb_filter(&mut sock, dev) {
                    Ok(()) => {}
                    Err(e) if gone(&e) => {}
                    Err(e) => errors.push(e.to_string()),
                }
                if let Err(e) = remove_clsact_if_empty(for_ifname) {
                    errors.push(e.to_string());
                }
            }
            if let Err(e) = tc::link_del_by_name(&mut sock, name)
                && !gone(&e)
            {
                errors.push(e.to_string());
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests;
