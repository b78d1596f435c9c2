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
    #[error("at most {MAX_RANGES} port ranges per list (got {0}); merge them into fewer ranges")]
    TooManyRanges(usize),
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
        any.into_iter()
            .chain(self.ports.iter().flat_map(|r| r.first..=r.last))
    }

    /// Index into `DevConf::users` / bit of `DevConf::mask`.
    pub fn slot(&self) -> usize {
        (self.proto == PROTO_ALL) as usize * 3 + self.role as usize
    }
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

fn spans(list: &[PortRange]) -> Result<([PortSpan; MAX_RANGES], u8), CompileError> {
    if list.len() > MAX_RANGES {
        return Err(CompileError::TooManyRanges(list.len()));
    }
    let mut out = [PortSpan::default(); MAX_RANGES];
    for (o, r) in out.iter_mut().zip(list) {
        *o = PortSpan { first: r.first, last: r.last };
    }
    Ok((out, list.len() as u8))
}

fn width(list: &[PortRange]) -> u32 {
    list.iter().map(|r| (r.last - r.first) as u32 + 1).sum()
}

/// Protocol keys the rule is indexed under, and the protocol it checks.
fn protocols(sel: &Selector) -> (Vec<u8>, u8) {
    match sel.protocol {
        Protocol::All => (vec![PROTO_ALL], PROTO_ALL),
        Protocol::Tcp => (vec![PROTO_TCP], PROTO_TCP),
        Protocol::Udp => (vec![PROTO_UDP], PROTO_UDP),
        // Found only through the ICMP keys, so "all" is exact enough.
        Protocol::Icmp => (vec![PROTO_ICMP, PROTO_ICMPV6], PROTO_ALL),
    }
}

/// `classid`: the HTB class the classifier steers to (delay family and
/// bandwidth), 0 otherwise. `deadline_ns`: CLOCK_BOOTTIME, 0 for none.
pub fn compile(fault: &NetworkFault, classid: u32, deadline_ns: u64) -> Result<Compiled, CompileError> {
    let sel = &fault.selector;
    let (either, n_either) = spans(&sel.ports)?;
    let (src, n_src) = spans(&sel.source_ports)?;
    let (dst, n_dst) = spans(&sel.destination_ports)?;
    let (keys, proto) = protocols(sel);
    let (action, loss_threshold, correlation) = match &fault.action {
        NetAction::Loss { percent, correlation } => {
            (ACTION_LOSS, (percent / 100.0 * 4_294_967_296.0).round() as u64, scale_u32(*correlation))
        }
        NetAction::Partition => (ACTION_PARTITION, 0, 0),
        _ => (ACTION_CLASSIFY, 0, 0),
    };
    let mut rule = Rule {
        deadline_ns,
        loss_threshold,
        correlation,
        classid,
        action,
        proto,
        flags: 0,
        n_either,
        n_src,
        n_dst,
        _pad: [0; 2],
        either,
        src,
        dst,
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
    if !peers.is_empty() {
        rule.flags |= FLAG_PEERS;
    }
    // The most selective exact list becomes the index; the others are
    // checked from the rule.
    let mut tables = Vec::new();
    for proto_key in keys {
        let small = |l: &[PortRange]| !l.is_empty() && width(l) <= EXPAND_LIMIT;
        if small(&sel.destination_ports) {
            tables.push(Table { proto: proto_key, role: ROLE_DPORT, ports: sel.destination_ports.clone() });
        } else if small(&sel.source_ports) {
            tables.push(Table { proto: proto_key, role: ROLE_SPORT, ports: sel.source_ports.clone() });
        } else if small(&sel.ports) {
            tables.push(Table { proto: proto_key, role: ROLE_DPORT, ports: sel.ports.clone() });
            tables.push(Table { proto: proto_key, role: ROLE_SPORT, ports: sel.ports.clone() });
        } else {
            tables.push(Table { proto: proto_key, role: ROLE_ANY, ports: vec![] });
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
        && nonempty.iter().any(|l| {
            l.iter().all(|r| (r.first..=r.last).all(|p| protected.contains(&p)))
        })
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
        if has_ports(s) { all.into_iter().filter(|p| matches!(p, Protocol::Tcp | Protocol::Udp)).collect() } else { all }
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
        assert_eq!(c.tables.len(), 2);
        assert_eq!(c.tables[0].ports().collect::<Vec<_>>(), vec![7000]);
        let f = NetworkFault { selector: sel(&[(1, 65535)]), action: NetAction::Partition };
        let c = compile(&f, 0, 0).unwrap();
        assert_eq!(c.tables, vec![Table { proto: PROTO_ALL, role: ROLE_ANY, ports: vec![] }]);
        assert_eq!(c.tables[0].ports().collect::<Vec<_>>(), vec![0]);
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
