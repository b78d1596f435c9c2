//! Traffic-control and link primitives over rtnetlink: the one home of the
//! link and qdisc dumps, of the tc handles and attribute numbers chaosd
//! uses, and of creating and deleting qdiscs, filters and links.
//! netlink-packet-route has no netem or HTB option types, so their
//! `TCA_OPTIONS` payloads are built here byte for byte from the kernel's
//! uapi structs (include/uapi/linux/pkt_sched.h).

use netlink_packet_core::{DefaultNla, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    tc::{TcAttribute, TcHandle, TcMessage},
};

use crate::netlink::{NetlinkError, RouteSocket};

/// `TCA_OPTIONS`: a qdisc's, class's or filter's kind-specific options.
pub(crate) const TCA_OPTIONS: u16 = 2;
/// The clsact qdisc itself (`ffff:`).
pub(crate) const CLSACT_HANDLE: TcHandle = TcHandle { major: 0xffff, minor: 0 };
/// clsact's ingress hook, the parent of ingress filters (`ffff:fff2`).
pub(crate) const CLSACT_INGRESS: TcHandle = TcHandle { major: 0xffff, minor: 0xfff2 };
/// clsact's egress hook, the parent of egress filters (`ffff:fff3`).
pub(crate) const CLSACT_EGRESS: TcHandle = TcHandle { major: 0xffff, minor: 0xfff3 };
/// "Any" in a dump request or a delete by priority.
pub(crate) const NO_HANDLE: TcHandle = TcHandle { major: 0, minor: 0 };

/// One qdisc as a dump reports it.
#[derive(Clone, Debug)]
pub(crate) struct Qdisc {
    pub ifindex: u32,
    pub kind: String,
    pub handle: TcHandle,
    pub parent: TcHandle,
}

/// The `TCA_KIND` of a tc object ("" when it has none).
pub(crate) fn kind_of(attrs: &[TcAttribute]) -> String {
    attrs.iter().find_map(|a| if let TcAttribute::Kind(k) = a { Some(k.clone()) } else { None }).unwrap_or_default()
}

/// The qdiscs of one device, or of every device of the socket's namespace.
pub(crate) fn qdiscs(sock: &mut RouteSocket, ifindex: Option<u32>) -> Result<Vec<Qdisc>, NetlinkError> {
    let req = tc_message(ifindex.unwrap_or(0), NO_HANDLE, NO_HANDLE);
    let mut out = Vec::new();
    for m in sock.dump("dump qdiscs", RouteNetlinkMessage::GetQueueDiscipline(req))? {
        let RouteNetlinkMessage::NewQueueDiscipline(q) = m else { continue };
        let at = q.header.index as u32;
        if ifindex.is_some_and(|i| i != at) {
            continue;
        }
        out.push(Qdisc { ifindex: at, kind: kind_of(&q.attributes), handle: q.header.handle, parent: q.header.parent });
    }
    Ok(out)
}

/// One link as a dump reports it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Link {
    pub ifindex: u32,
    pub name: String,
    /// An IFB device.
    pub ifb: bool,
    /// IFLA_IFALIAS (chaosd labels its IFBs with their owner).
    pub alias: Option<String>,
}

/// Every link of the socket's namespace.
pub(crate) fn links(sock: &mut RouteSocket) -> Result<Vec<Link>, NetlinkError> {
    let mut out = Vec::new();
    for m in sock.dump("dump links", RouteNetlinkMessage::GetLink(LinkMessage::default()))? {
        let RouteNetlinkMessage::NewLink(l) = m else { continue };
        let mut link = Link { ifindex: l.header.index, ..Default::default() };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::LinkInfo(info) => {
                    link.ifb = info.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Ifb)));
                }
                _ => {}
            }
        }
        out.push(link);
    }
    Ok(out)
}

/// A qdisc to create: `kind` with raw `TCA_OPTIONS` bytes.
pub struct QdiscSpec {
    pub kind: &'static str,
    pub parent: TcHandle,
    pub handle: TcHandle,
    pub options: Option<Vec<u8>>,
}

/// A tc message header for `ifindex` (0: every device, in a dump).
pub(crate) fn tc_message(ifindex: u32, parent: TcHandle, handle: TcHandle) -> TcMessage {
    let mut msg = TcMessage::default();
    msg.header.family = AddressFamily::Unspec;
    msg.header.index = ifindex as i32;
    msg.header.parent = parent;
    msg.header.handle = handle;
    msg
}

/// Adds a qdisc; fails if one already sits at that parent (never replaces).
pub fn qdisc_add(sock: &mut RouteSocket, ifindex: u32, spec: &QdiscSpec) -> Result<(), NetlinkError> {
    let mut msg = tc_message(ifindex, spec.parent, spec.handle);
    msg.attributes.push(TcAttribute::Kind(spec.kind.to_string()));
    if let Some(opts) = &spec.options {
        msg.attributes.push(TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, opts.clone())));
    }
    sock.request(
        &format!("add {} qdisc on ifindex {ifindex}", spec.kind),
        RouteNetlinkMessage::NewQueueDiscipline(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

pub fn qdisc_del(sock: &mut RouteSocket, ifindex: u32, parent: TcHandle, handle: TcHandle) -> Result<(), NetlinkError> {
    let msg = tc_message(ifindex, parent, handle);
    sock.request(
        &format!("delete qdisc {}:{} on ifindex {ifindex}", handle.major, handle.minor),
        RouteNetlinkMessage::DelQueueDiscipline(msg),
        0,
    )
}

/// `struct tc_netem_qopt` with only a queue limit: a netem that does nothing,
/// enough to learn whether the kernel has netem.
pub fn netem_noop_options(limit: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    // latency, limit, loss, gap, duplicate, jitter
    for v in [0u32, limit, 0, 0, 0, 0] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b
}

/// Nested `TCA_HTB_INIT` (struct tc_htb_glob) with the given default class.
pub fn htb_init_options(default_class: u32) -> Vec<u8> {
    const TCA_HTB_INIT: u16 = 2;
    const TC_HTB_PROTOVER: u32 = 3;
    let mut glob = Vec::with_capacity(20);
    // version, rate2quantum, defcls, debug, direct_pkts
    for v in [TC_HTB_PROTOVER, 10, default_class, 0, 0] {
        glob.extend_from_slice(&v.to_ne_bytes());
    }
    nla(TCA_HTB_INIT, &glob)
}

/// One netlink attribute (header + value, padded to 4 bytes).
pub fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut b = Vec::with_capacity(len.next_multiple_of(4));
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize(len.next_multiple_of(4), 0);
    b
}

/// Creates a link of a driver-only kind (ifb, dummy) in the socket's
/// namespace, then sets its `alias` (IFLA_IFALIAS), which the kernel
/// ignores in the creating message. If the alias cannot be set the link is
/// deleted again: a link without its alias would look unowned.
pub fn link_add(sock: &mut RouteSocket, name: &str, kind: InfoKind, alias: Option<&str>) -> Result<(), NetlinkError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind.clone())]));
    sock.request(&format!("create {kind} link {name}"), RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)?;
    let Some(alias) = alias else { return Ok(()) };
    let mut set = LinkMessage::default();
    set.attributes.push(LinkAttribute::IfName(name.to_string()));
    set.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
    if let Err(e) = sock.request(&format!("set the alias of {name}"), RouteNetlinkMessage::SetLink(set), 0) {
        let _ = link_del_by_name(sock, name);
        return Err(e);
    }
    Ok(())
}

/// A cls_bpf filter (handle 1, every protocol) running an already loaded
/// program; `name` is free text the kernel reports back in dumps, which is
/// how chaosd labels its filters with their owner.
pub struct BpfFilter<'a> {
    pub parent: TcHandle,
    pub priority: u16,
    /// A chain other than 0: never run unless something jumps there.
    pub chain: Option<u32>,
    pub prog_fd: i32,
    pub name: &'a str,
    /// The program's return value is the verdict (clsact classifiers).
    pub direct_action: bool,
    /// Nested TCA_BPF_ACT actions, if any.
    pub actions: Option<Vec<u8>>,
}

pub fn bpf_filter_add(sock: &mut RouteSocket, ifindex: u32, f: &BpfFilter<'_>) -> Result<(), NetlinkError> {
    const TCA_BPF_ACT: u16 = 1;
    const TCA_BPF_FD: u16 = 6;
    const TCA_BPF_NAME: u16 = 7;
    const TCA_BPF_FLAGS: u16 = 8;
    const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
    let mut name = f.name.as_bytes().to_vec();
    name.push(0);
    let mut opts = nla(TCA_BPF_FD, &f.prog_fd.to_ne_bytes());
    opts.extend(nla(TCA_BPF_NAME, &name));
    if f.direct_action {
        opts.extend(nla(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes()));
    }
    if let Some(act) = &f.actions {
        opts.extend(nla(TCA_BPF_ACT, act));
    }
    let mut msg = tc_message(ifindex, f.parent, TcHandle { major: 0, minor: 1 });
    msg.header.info = ((f.priority as u32) << 16) | (libc::ETH_P_ALL as u16).to_be() as u32;
    msg.attributes.push(TcAttribute::Kind("bpf".into()));
    if let Some(chain) = f.chain {
        msg.attributes.push(TcAttribute::Chain(chain));
    }
    msg.attributes.push(TcAttribute::Other(DefaultNla::new(TCA_OPTIONS, opts)));
    sock.request(
        &format!("add cls_bpf filter {} on ifindex {ifindex}", f.name),
        RouteNetlinkMessage::NewTrafficFilter(msg),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

pub fn link_del_by_name(sock: &mut RouteSocket, name: &str) -> Result<(), NetlinkError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    sock.request(&format!("delete link {name}"), RouteNetlinkMessage::DelLink(msg), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nla_is_padded_and_carries_its_length() {
        let b = nla(7, &[1, 2, 3]);
        assert_eq!(b.len(), 8);
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 7);
        assert_eq!(u16::from_ne_bytes([b[2], b[3]]), 7);
    }

    #[test]
    fn htb_init_is_one_nested_attribute_of_the_glob_struct() {
        let b = htb_init_options(0x10);
        assert_eq!(b.len(), 24);
        assert_eq!(u32::from_ne_bytes(b[12..16].try_into().unwrap()), 0x10);
    }
}
