//! Pure translation of a validated `NetworkFault` into what the classifier
//! reads (a `Rule`, the index tables it is found through, its peer
//! prefixes), and the overlap test behind conflict refusal. No kernel here:
//! everything is unit-tested without root.

use std::net::IpAddr;

use chaosd_common::{
    ACTION_CLASSIFY, ACTION_LOSS, ACTION_PARTITION, FLAG_PEERS, MAX_RANGES, PROTO_ALL, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP, PortSpan, ROLE_ANY, ROLE_DPORT, ROLE_SPORT, Rule,
};
use ipnet::IpNet;

use crate::spec::{NetAction, NetworkFault, PortRange, Protocol, Selector};

/// A port list wider than this is not expanded into exact index entries;
/// the rule is indexed under "any port" and the ports are checked from the
/// rule itself (still a constant amount of work per packet).
pub const EXPAND_LIMIT: u32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("a port list wider than {EXPAND_LIMIT} ports may have at most {MAX_RANGES} ranges (got {0}); merge them")]
    TooManyRanges(usize),
    #[error("combine at most two of --port, --sport and --dport in one fault")]
    TooManyLists,
    #[error("two port lists wider than {EXPAND_LIMIT} ports each cannot be combined; narrow one of them")]
    TooWide,
    #[error("ICMP has no ports; drop the port selectors or choose tcp/udp")]
    IcmpPorts,
}

/// One index table a rule is entered in: protocol key, role, and the ports
/// (empty for `ROLE_ANY`, meaning the single key port 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub proto: u8,
    pub role: u8,
    pub ports: Vec<PortRange>,
}

impl Table {
    /// Exact keys (port numbers) of the table.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        let any = (self.role == ROLE_ANY).then_some(0u16);
        any.into_iter().chain(self.ports.iter().flat_map(|r| r.first..=r.last))
    }

    /// Index into `DevConf::users` / bit of `DevConf::mask`.
    pub fn slot(&self) -> usize {
        device_slot(self.proto, self.role)
    }
}

/// Index into `DevConf::users` (and bit of `DevConf::mask`) of the index
/// table with protocol key `proto` and port role `role`.
pub fn device_slot(proto: u8, role: u8) -> usize {
    (proto == PROTO_ALL) as usize * 3 + role as usize
}

#[derive(Clone, Debug, PartialEq)]
pub struct Compiled {
    pub rule: Rule,
    pub tables: Vec<Table>,
    /// (prefix length in bits of the 16-byte mapped address, address).
    pub peers: Vec<(u32, [u8; 16])>,
}

/// The address as the classifier sees it: IPv4 mapped into IPv6.
pub fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn width(list: &[PortRange]) -> u32 {
    list.iter().map(|r| (r.last - r.first) as u32 + 1).sum()
}

/// Which port lists are indexed (expanded into exact keys) and which one,
/// if any, the program checks from the rule: (index role(s) with ports,
/// residual (role, ranges)).
type Split = (Vec<(u8, Vec<PortRange>)>, Option<(u8, Vec<PortRange>)>);

fn split_ports(sel: &Selector) -> Result<Split, CompileError> {
    // (role used for the index, role of the residual check, list)
    let lists: Vec<(u8, &Vec<PortRange>)> =
        [(ROLE_DPORT, &sel.destination_ports), (ROLE_SPORT, &sel.source_ports), (ROLE_ANY, &sel.ports)]
            .into_iter()
            .filter(|(_, l)| !l.is_empty())
            .collect();
    let index_of = |role: u8, l: &Vec<PortRange>| -> Vec<(u8, Vec<PortRange>)> {
        if role == ROLE_ANY { vec![(ROLE_DPORT, l.clone()), (ROLE_SPORT, l.clone())] } else { vec![(role, l.clone())] }
    };
    let resid = |role: u8, l: &Vec<PortRange>| -> Result<(u8, Vec<PortRange>), CompileError> {
        if l.len() > MAX_RANGES {
            return Err(CompileError::TooManyRanges(l.len()));
        }
        Ok((role, l.clone()))
    };
    match lists.as_slice() {
        [] => Ok((vec![], None)),
        [(role, l)] if width(l) <= EXPAND_LIMIT => Ok((index_of(*role, l), None)),
        [(role, l)] => Ok((vec![], Some(resid(*role, l)?))),
        [(r1, l1), (r2, l2)] => {
            let (a, b) = if width(l1) <= width(l2) { ((r1, l1), (r2, l2)) } else { ((r2, l2), (r1, l1)) };
            if width(a.1) > EXPAND_LIMIT {
                return Err(CompileError::TooWide);
            }
            Ok((index_of(*a.0, a.1), Some(resid(*b.0, b.1)?)))
        }
        _ => Err(CompileError::TooManyLists),
    }
}

/// `classid`: the HTB class the classifier steers to (delay family and
/// bandwidth), 0 otherwise. `deadline_ns`: CLOCK_BOOTTIME, 0 for none.
pub fn compile(fault: &NetworkFault, classid: u32, deadline_ns: u64) -> Result<Compiled, CompileError> {
    let sel = &fault.selector;
    let has_ports = !(sel.ports.is_empty() && sel.source_ports.is_empty() && sel.destination_ports.is_empty());
    let (keys, proto): (Vec<u8>, u8) = match (sel.protocol, has_ports) {
        (Protocol::All, false) => (vec![PROTO_ALL], PROTO_ALL),
        // Only TCP and UDP carry ports.
        (Protocol::All, true) => (vec![PROTO_TCP, PROTO_UDP], PROTO_ALL),
        (Protocol::Tcp, _) => (vec![PROTO_TCP], PROTO_TCP),
        (Protocol::Udp, _) => (vec![PROTO_UDP], PROTO_UDP),
        (Protocol::Icmp, true) => return Err(CompileError::IcmpPorts),
        // Found only through the ICMP keys, so "all" is exact enough.
        (Protocol::Icmp, false) => (vec![PROTO_ICMP, PROTO_ICMPV6], PROTO_ALL),
    };
    let (index, residual) = split_ports(sel)?;
    let (action, loss_threshold, correlation) = match &fault.action {
        NetAction::Loss { percent, correlation } => {
            (ACTION_LOSS, (percent / 100.0 * 4_294_967_296.0).round() as u64, scale_u32(*correlation))
        }
        NetAction::Partition => (ACTION_PARTITION, 0, 0),
        _ => (ACTION_CLASSIFY, 0, 0),
    };
    let mut resid = [PortSpan::default(); MAX_RANGES];
    let (resid_role, n_resid) = match &residual {
        Some((role, l)) => {
            for (o, r) in resid.iter_mut().zip(l) {
                *o = PortSpan { first: r.first, last: r.last };
            }
            (*role, l.len() as u8)
        }
        None => (ROLE_ANY, 0),
    };
    let peers: Vec<(u32, [u8; 16])> = sel
        .peers
        .iter()
        .map(|net| {
            let net = net.trunc();
            let len = match net {
                IpNet::V4(n) => 96 + n.prefix_len() as u32,
                IpNet::V6(n) => n.prefix_len() as u32,
            };
            (len, mapped(net.addr()))
        })
        .collect();
    let rule = Rule {
        deadline_ns,
        loss_threshold,
        correlation,
        classid,
        action,
        proto,
        flags: if peers.is_empty() { 0 } else { FLAG_PEERS },
        resid_role,
        n_resid,
        has_ports: has_ports as u8,
        _pad: [0; 2],
        resid,
    };
    let mut tables = Vec::new();
    for proto_key in keys {
        if index.is_empty() {
            tables.push(Table { proto: proto_key, role: ROLE_ANY, ports: vec![] });
        }
        for (role, ports) in &index {
            tables.push(Table { proto: proto_key, role: *role, ports: ports.clone() });
        }
    }
    Ok(Compiled { rule, tables, peers })
}

fn scale_u32(percent: f64) -> u32 {
    (percent / 100.0 * u32::MAX as f64).round() as u32
}

/// Whether a selector's port lists name only protected ports (so the fault
/// could match nothing but protected traffic, which is never matched).
pub fn only_protected(sel: &Selector, protected: &[u16]) -> bool {
    let lists = [&sel.ports, &sel.source_ports, &sel.destination_ports];
    let nonempty: Vec<_> = lists.iter().filter(|l| !l.is_empty()).collect();
    !nonempty.is_empty()
        && nonempty.iter().any(|l| l.iter().all(|r| (r.first..=r.last).all(|p| protected.contains(&p))))
}

/// Whether two faults on the same namespace could act on the same packet.
/// `devs_a`/`devs_b` are the resolved device names.
pub fn overlaps(a: &Selector, devs_a: &[String], b: &Selector, devs_b: &[String]) -> bool {
    if !devs_a.iter().any(|d| devs_b.contains(d)) {
        return false;
    }
    if !(a.direction.egress() && b.direction.egress() || a.direction.ingress() && b.direction.ingress()) {
        return false;
    }
    if !protocols_overlap(a, b) {
        return false;
    }
    if !peers_overlap(&a.peers, &b.peers) {
        return false;
    }
    ports_overlap(a, b)
}

fn has_ports(s: &Selector) -> bool {
    !(s.ports.is_empty() && s.source_ports.is_empty() && s.destination_ports.is_empty())
}

fn protocols_overlap(a: &Selector, b: &Selector) -> bool {
    // With ports, only TCP and UDP packets can match.
    let set = |s: &Selector| -> Vec<Protocol> {
        let all = match s.protocol {
            Protocol::All => vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::All],
            p => vec![p],
        };
        if has_ports(s) {
            all.into_iter().filter(|p| matches!(p, Protocol::Tcp | Protocol::Udp)).collect()
        } else {
            all
        }
    };
    let (sa, sb) = (set(a), set(b));
    sa.iter().any(|p| sb.contains(p))
}

fn peers_overlap(a: &[IpNet], b: &[IpNet]) -> bool {
    if a.is_empty() || b.is_empty() {
        return true;
    }
    a.iter().any(|x| b.iter().any(|y| x.contains(y) || y.contains(x)))
}

fn meet(a: &[PortRange], b: &[PortRange]) -> bool {
    a.is_empty() || b.is_empty() || a.iter().any(|x| b.iter().any(|y| x.overlaps(y)))
}

/// Port lists overlap when some port satisfies both selectors in the same
/// role. A packet that goes from one faulted port to another (e.g. 1883 ->
/// 7000 with faults on either port) is acted on by one of them only (the
/// destination-port index is looked up first): such faults coexist, as
/// users expect of faults on different ports.
fn ports_overlap(a: &Selector, b: &Selector) -> bool {
    let src = |s: &Selector| if s.source_ports.is_empty() { s.ports.clone() } else { s.source_ports.clone() };
    let dst = |s: &Selector| if s.destination_ports.is_empty() { s.ports.clone() } else { s.destination_ports.clone() };
    meet(&a.ports, &b.ports)
        && meet(&a.source_ports, &b.source_ports)
        && meet(&a.destination_ports, &b.destination_ports)
        && (meet(&src(a), &src(b)) || meet(&dst(a), &dst(b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Direction;

    fn sel(ports: &[(u16, u16)]) -> Selector {
        Selector {
            devices: vec![],
            protocol: Protocol::All,
            ports: ports.iter().map(|&(first, last)| PortRange { first, last }).collect(),
            source_ports: vec![],
            destination_ports: vec![],
            peers: vec![],
            direction: Direction::Both,
        }
    }
    fn devs() -> Vec<String> {
        vec!["eth0".into()]
    }

    #[test]
    fn single_port_is_indexed_both_ways_and_wide_range_under_any() {
        let f = NetworkFault { selector: sel(&[(7000, 7000)]), action: NetAction::Partition };
        let c = compile(&f, 0, 0).unwrap();
        // TCP and UDP, each by destination and by source port.
        assert_eq!(c.tables.len(), 4);
        assert_eq!(c.tables[0].ports().collect::<Vec<_>>(), vec![7000]);
        assert_eq!(c.rule.n_resid, 0);
        let f = NetworkFault { selector: sel(&[(1, 65535)]), action: NetAction::Partition };
        let c = compile(&f, 0, 0).unwrap();
        assert_eq!(c.tables[0], Table { proto: PROTO_TCP, role: ROLE_ANY, ports: vec![] });
        assert_eq!(c.tables[0].ports().collect::<Vec<_>>(), vec![0]);
        assert_eq!((c.rule.n_resid, c.rule.resid_role), (1, ROLE_ANY));
        let f = NetworkFault { selector: sel(&[]), action: NetAction::Partition };
        assert_eq!(compile(&f, 0, 0).unwrap().tables, vec![Table { proto: PROTO_ALL, role: ROLE_ANY, ports: vec![] }]);
    }

    #[test]
    fn loss_threshold_and_peers_are_scaled() {
        let mut s = sel(&[]);
        s.peers = vec!["10.1.2.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()];
        let f = NetworkFault { selector: s, action: NetAction::Loss { percent: 25.0, correlation: 0.0 } };
        let c = compile(&f, 0, 0).unwrap();
        assert_eq!(c.rule.loss_threshold, 1 << 30);
        assert_eq!(c.rule.flags & FLAG_PEERS, FLAG_PEERS);
        assert_eq!(c.peers[0].0, 120);
        assert_eq!(&c.peers[0].1[10..], &[0xff, 0xff, 10, 1, 2, 0]);
        assert_eq!(c.peers[1].0, 64);
    }

    #[test]
    fn overlap_needs_every_dimension_to_meet() {
        let a = sel(&[(7000, 7000)]);
        let b = sel(&[(7001, 7001)]);
        assert!(!overlaps(&a, &devs(), &b, &devs()));
        assert!(overlaps(&a, &devs(), &sel(&[(6000, 8000)]), &devs()));
        assert!(!overlaps(&a, &devs(), &a, &["eth1".into()]));
        let mut c = a.clone();
        c.direction = Direction::Egress;
        let mut d = a.clone();
        d.direction = Direction::Ingress;
        assert!(!overlaps(&c, &devs(), &d, &devs()));
        let mut e = a.clone();
        e.peers = vec!["10.0.0.0/24".parse().unwrap()];
        let mut f = a.clone();
        f.peers = vec!["10.0.1.0/24".parse().unwrap()];
        assert!(!overlaps(&e, &devs(), &f, &devs()));
        f.peers = vec!["10.0.0.0/16".parse().unwrap()];
        assert!(overlaps(&e, &devs(), &f, &devs()));
        // No ports at all overlaps with everything on the device.
        assert!(overlaps(&sel(&[]), &devs(), &a, &devs()));
        // ICMP never carries ports.
        let mut icmp = sel(&[]);
        icmp.protocol = Protocol::Icmp;
        assert!(!overlaps(&icmp, &devs(), &a, &devs()));
    }

    #[test]
    fn source_and_destination_lists_combine() {
        let mut a = sel(&[]);
        a.source_ports = vec![PortRange { first: 1000, last: 1000 }];
        let mut b = sel(&[]);
        b.destination_ports = vec![PortRange { first: 2000, last: 2000 }];
        // A packet 1000 -> 2000 matches both.
        assert!(overlaps(&a, &devs(), &b, &devs()));
        assert!(overlaps(&a, &devs(), &sel(&[(1000, 1000)]), &devs()));
        let mut c = sel(&[]);
        c.source_ports = vec![PortRange { first: 1001, last: 1001 }];
        assert!(!overlaps(&a, &devs(), &c, &devs()));
    }

    #[test]
    fn protected_only_selectors_are_detected() {
        assert!(only_protected(&sel(&[(22, 22)]), &[22]));
        assert!(!only_protected(&sel(&[(22, 23)]), &[22]));
        assert!(!only_protected(&sel(&[]), &[22]));
    }
}
