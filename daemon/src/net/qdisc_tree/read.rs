//! Reading a device's tree from the kernel and normalizing each object.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Role {
    Qdisc,
    Class,
    Chain,
    Filter,
}

pub(super) fn snapshot(sock: &mut RouteSocket, ifindex: u32, strict: bool) -> Result<SavedTree, QdiscTreeError> {
    let dump_err = |source| QdiscTreeError::Dump { ifindex, source };
    let mut shared = BTreeSet::new();
    let record = |msg: &TcMessage, role: Role, shared: &mut BTreeSet<(String, u32)>| {
        let (obj, problem) = normalize(msg, role, shared);
        match problem {
            Some(reason) if strict => {
                Err(QdiscTreeError::Unrestorable { ifindex, object: describe(role, &obj), reason })
            }
            _ => Ok(obj),
        }
    };

    let mut req = TcMessage::default();
    req.header.index = ifindex as i32;
    let mut qdiscs = Vec::new();
    for m in sock.dump("dump qdiscs", RouteNetlinkMessage::GetQueueDiscipline(req)).map_err(dump_err)? {
        let RouteNetlinkMessage::NewQueueDiscipline(q) = m else { continue };
        let parent = u32::from(q.header.parent);
        if q.header.index as u32 != ifindex || parent == TC_H_INGRESS {
            continue;
        }
        qdiscs.push(record(&q, Role::Qdisc, &mut shared)?);
    }
    // The root comes first in a dump; keep it there whatever happens.
    qdiscs.sort_by_key(|q| q.parent != TC_H_ROOT);
    let majors: HashSet<u32> = qdiscs.iter().map(|q| q.handle >> 16).collect();

    let mut classes = Vec::new();
    let mut req = TcMessage::default();
    req.header.index = ifindex as i32;
    for m in sock.dump("dump classes", RouteNetlinkMessage::GetTrafficClass(req)).map_err(dump_err)? {
        let RouteNetlinkMessage::NewTrafficClass(c) = m else { continue };
        if c.header.index as u32 != ifindex || !majors.contains(&(u32::from(c.header.handle) >> 16)) {
            continue;
        }
        classes.push(record(&c, Role::Class, &mut shared)?);
    }

    // Filter blocks: each user qdisc's and each of its classes'.
    let mut blocks = Vec::new();
    for q in qdiscs.iter().filter(|q| q.handle != 0) {
        blocks.push(q.handle);
        blocks.extend(
            classes.iter().filter(|c| c.handle >> 16 == q.handle >> 16 && c.handle & 0xffff != 0).map(|c| c.handle),
        );
    }
    let mut chains = Vec::new();
    let mut filters = Vec::new();
    for parent in blocks {
        let mut req = TcMessage::default();
        req.header.index = ifindex as i32;
        req.header.parent = parent.into();
        let what = format!("dump chains of {}", handle_text(parent));
        for m in sock.dump(&what, RouteNetlinkMessage::GetTrafficChain(req.clone())).map_err(dump_err)? {
            let RouteNetlinkMessage::NewTrafficChain(c) = m else { continue };
            if c.header.index as u32 == ifindex {
                let mut obj = record(&c, Role::Chain, &mut shared)?;
                obj.parent = parent;
                chains.push(obj);
            }
        }
        let what = format!("dump filters of {}", handle_text(parent));
        for m in sock.dump(&what, RouteNetlinkMessage::GetTrafficFilter(req)).map_err(dump_err)? {
            let RouteNetlinkMessage::NewTrafficFilter(f) = m else { continue };
            if f.header.index as u32 == ifindex {
                let mut obj = record(&f, Role::Filter, &mut shared)?;
                obj.parent = parent;
                if obj.kind == "u32" && is_bare(&obj) {
                    obj.handle = u32_root(ifindex, &obj).map_err(dump_err)?;
                }
                filters.push(obj);
            }
        }
    }
    let shared_actions = shared.into_iter().map(|(kind, index)| SharedAction { kind, index }).collect();
    Ok(SavedTree { version: FORMAT_VERSION, qdiscs, classes, chains, filters, shared_actions })
}

/// The root hash table of a u32 instance. A dump does not tell: every u32
/// instance of a qdisc lists the tables of all instances with its priority
/// (from every chain and class), its own root among them. A get of handle
/// fff00000 (TC_U32_ROOT) answers with the instance's root. The answer to a
/// get is what `RouteSocket::request` drops, hence a socket of its own.
pub(super) fn u32_root(ifindex: u32, instance: &SavedObject) -> Result<u32, NetlinkError> {
    const TC_U32_ROOT: u32 = 0xFFF0_0000;
    let op = format!("look up the root table of {}", describe(Role::Filter, instance));
    let msg = tc_message(ifindex, instance, TC_U32_ROOT, &[]);
    let answers = get(&op, RouteNetlinkMessage::GetTrafficFilter(msg))?;
    Ok(answers
        .into_iter()
        .find_map(
            |m| if let RouteNetlinkMessage::NewTrafficFilter(f) = m { Some(f.header.handle.into()) } else { None },
        )
        .unwrap_or(0))
}

/// One request on a fresh rtnetlink socket of this thread's namespace,
/// with the kernel's answers.
pub(super) fn get(op: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let io = |source| NetlinkError::Io { op: op.to_string(), source };
    let socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    packet.finalize();
    let mut out = vec![0; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0).map_err(io)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut answers = Vec::new();
    loop {
        let n = socket.recv(&mut &mut buf[..], 0).map_err(io)?;
        let mut offset = 0;
        while offset < n {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                .map_err(|e| NetlinkError::Decode { op: op.to_string(), detail: e.to_string() })?;
            let len = reply.header.length as usize;
            if len == 0 {
                return Err(NetlinkError::Decode { op: op.to_string(), detail: "zero-length message".into() });
            }
            offset += len;
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => answers.push(m),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(answers),
                        Some(code) => {
                            Err(NetlinkError::Kernel { op: op.to_string(), errno: -code.get(), ext_ack: None })
                        }
                    };
                }
                NetlinkPayload::Done(_) => return Ok(answers),
                _ => {}
            }
        }
    }
}

/// A dumped object without what the kernel reports but does not take, and
/// the reason it cannot be recreated, if any. Actions that exist on their
/// own are added to `shared`.
pub(super) fn normalize(
    msg: &TcMessage,
    role: Role,
    shared: &mut BTreeSet<(String, u32)>,
) -> (SavedObject, Option<String>) {
    let kind = msg
        .attributes
        .iter()
        .find_map(|a| if let TcAttribute::Kind(k) = a { Some(k.clone()) } else { None })
        .unwrap_or_default();
    let mut obj = SavedObject {
        kind: kind.clone(),
        parent: msg.header.parent.into(),
        handle: msg.header.handle.into(),
        info: if role == Role::Filter { msg.header.info } else { 0 },
        chain: None,
        attrs: Vec::new(),
    };
    let mut problem = None;
    for attr in &msg.attributes {
        match attr {
            TcAttribute::Kind(_) => {}
            TcAttribute::Chain(c) => obj.chain = Some(*c),
            TcAttribute::Stats(_)
            | TcAttribute::Stats2(_)
            | TcAttribute::Xstats(_)
            | TcAttribute::HwOffload(_)
            | TcAttribute::DumpInvisible(_)
            | TcAttribute::Fcnt(_)
            | TcAttribute::Rate(_) => {}
            TcAttribute::Options(_) => {
                let payload = options_payload(attr, &kind);
                let (payload, p) = match role {
                    Role::Qdisc => (normalize_qdisc_options(&kind, &payload), None),
                    Role::Class => (payload, None),
                    Role::Chain | Role::Filter => normalize_filter_options(&kind, &payload, shared),
                };
                problem = problem.or(p);
                push_nla(&mut obj.attrs, TCA_OPTIONS, &payload);
            }
            TcAttribute::Stab(value) => {
                if let Some(p) = stab_problem(value) {
                    problem = problem.or(Some(p));
                }
                push_nla(&mut obj.attrs, TCA_STAB, value);
            }
            TcAttribute::Other(_) => {
                let raw = emitted(attr);
                for (ty, value) in nlas(&raw) {
                    if !matches!(ty & NLA_TYPE_MASK, TCA_PAD | TCA_EXT_WARN_MSG) {
                        push_nla(&mut obj.attrs, ty, value);
                    }
                }
            }
            _ => {
                // A variant newer than this code: keep it as the kernel sent it.
                obj.attrs.extend_from_slice(&emitted(attr));
            }
        }
    }
    (obj, problem)
}

pub(super) fn emitted<T: Emitable>(attr: &T) -> Vec<u8> {
    let mut buf = vec![0; attr.buffer_len()];
    attr.emit(&mut buf);
    buf
}

/// The payload of `TCA_OPTIONS` as the kernel sent it.
pub(super) fn options_payload(attr: &TcAttribute, kind: &str) -> Vec<u8> {
    let raw = emitted(attr);
    let Some((_, value)) = nlas(&raw).into_iter().next() else { return Vec::new() };
    if CRATE_PARSED_KINDS.contains(&kind) {
        return value.to_vec();
    }
    // The crate kept the whole attribute as one option: unwrap it once.
    nlas(value).into_iter().next().map(|(_, v)| v.to_vec()).unwrap_or_default()
}

pub(super) fn stab_problem(value: &[u8]) -> Option<String> {
    let base = nlas(value).into_iter().find(|(ty, _)| ty & NLA_TYPE_MASK == TCA_STAB_BASE)?.1;
    // struct tc_sizespec: tsize is the last u32 (offset 20).
    let tsize = base.get(20..24).map(|b| u32::from_ne_bytes(b.try_into().unwrap_or_default()))?;
    (tsize > 0).then(|| "its size table: the kernel reports the table's parameters but not its data".to_string())
}

pub(super) fn normalize_qdisc_options(kind: &str, payload: &[u8]) -> Vec<u8> {
    const TCA_HTB_INIT: u16 = 2;
    match kind {
        // struct tc_htb_glob: the kernel reports its version as 3.17
        // (0x30011) but takes only the major, 3; direct_pkts (offset 16) is
        // a counter.
        "htb" => map_nlas(payload, |ty, v| match ty {
            TCA_HTB_INIT if v.len() >= 20 => {
                let mut v = v.to_vec();
                let version = u32::from_ne_bytes(v[0..4].try_into().unwrap_or_default());
                if version > 0xffff {
                    v[0..4].copy_from_slice(&(version >> 16).to_ne_bytes());
                }
                v[16..20].fill(0);
                Some(v)
            }
            _ => Some(v.to_vec()),
        }),
        _ => payload.to_vec(),
    }
}

/// Where a classifier keeps its actions, police, flags and counters.
pub(super) struct ClassifierLayout {
    pub(super) act: Option<u16>,
    pub(super) police: Option<u16>,
    /// `TCA_CLS_FLAGS_*`, whose IN_HW/NOT_IN_HW bits are state.
    pub(super) flags: Option<u16>,
    /// Counters and padding.
    pub(super) drop: &'static [u16],
}

pub(super) fn classifier_layout(kind: &str) -> Option<ClassifierLayout> {
    let l = |act, police, flags, drop| Some(ClassifierLayout { act, police, flags, drop });
    match kind {
        "u32" => l(Some(7), Some(6), Some(11), &[9, 12]),
        "bpf" => l(Some(1), Some(2), Some(9), &[]),
        "matchall" => l(Some(2), None, Some(3), &[4, 5]),
        "basic" => l(Some(3), Some(4), None, &[5, 6]),
        "flower" => l(Some(3), None, Some(22), &[86]),
        "fw" => l(Some(4), Some(2), None, &[]),
        "route" => l(Some(6), Some(5), None, &[]),
        "flow" => l(Some(9), Some(10), None, &[]),
        "cgroup" => l(Some(1), Some(2), None, &[]),
        _ => None,
    }
}

pub(super) const TCA_CLS_FLAGS_STATE: u32 = (1 << 2) | (1 << 3);

pub(super) fn normalize_filter_options(
    kind: &str,
    payload: &[u8],
    shared: &mut BTreeSet<(String, u32)>,
) -> (Vec<u8>, Option<String>) {
    const TCA_U32_MARK: u16 = 10;
    const TCA_BPF_FD: u16 = 6;
    const TCA_BPF_ID: u16 = 11;
    const TCA_BPF_TAG: u16 = 10;
    let Some(layout) = classifier_layout(kind) else { return (payload.to_vec(), None) };
    let mut problem = None;
    let out = map_nlas(payload, |ty, v| {
        if layout.drop.contains(&ty) {
            return None;
        }
        if Some(ty) == layout.flags && v.len() == 4 {
            let flags = u32::from_ne_bytes(v.try_into().unwrap_or_default()) & !TCA_CLS_FLAGS_STATE;
            return (flags != 0).then(|| flags.to_ne_bytes().to_vec());
        }
        if Some(ty) == layout.act {
            let (v, p) = normalize_actions(v, shared);
            problem = problem.take().or(p);
            return Some(v);
        }
        if Some(ty) == layout.police {
            problem = problem.take().or(Some(police_problem()));
            let (v, _) = normalize_action_options("police", v, shared);
            return Some(v);
        }
        match (kind, ty) {
            // struct tc_u32_mark: success (offset 8) counts matches.
            ("u32", TCA_U32_MARK) if v.len() >= 12 => {
                let mut v = v.to_vec();
                v[8..12].fill(0);
                Some(v)
            }
            ("bpf", TCA_BPF_FD | TCA_BPF_ID) => {
                problem = problem
                    .take()
                    .or(Some("it runs an eBPF program, which is gone once its filter is removed".to_string()));
                Some(v.to_vec())
            }
            ("bpf", TCA_BPF_TAG) => Some(v.to_vec()),
            _ => Some(v.to_vec()),
        }
    });
    (out, problem)
}

pub(super) fn police_problem() -> String {
    "it polices: the kernel does not report a police action's rate tables".to_string()
}

/// `TCA_*_ACT`: a list of actions, each a nest of `TCA_ACT_*`.
pub(super) fn normalize_actions(payload: &[u8], shared: &mut BTreeSet<(String, u32)>) -> (Vec<u8>, Option<String>) {
    const TCA_ACT_KIND: u16 = 1;
    const TCA_ACT_OPTIONS: u16 = 2;
    const TCA_ACT_STATS: u16 = 4;
    const TCA_ACT_PAD: u16 = 5;
    const TCA_ACT_FLAGS: u16 = 7;
    const TCA_ACT_USED_HW_STATS: u16 = 9;
    const TCA_ACT_IN_HW_COUNT: u16 = 10;
    // TCA_ACT_FLAGS_NO_PERCPU_STATS | SKIP_HW | SKIP_SW: what a user sets.
    const USER_FLAGS: u32 = 0x7;
    let mut problem = None;
    let out = map_nlas(payload, |_, action| {
        let kind = nlas(action)
            .into_iter()
            .find(|(ty, _)| ty & NLA_TYPE_MASK == TCA_ACT_KIND)
            .map(|(_, v)| c_string(v))
            .unwrap_or_default();
        Some(map_nlas(action, |ty, v| match ty {
            TCA_ACT_STATS | TCA_ACT_PAD | TCA_ACT_USED_HW_STATS | TCA_ACT_IN_HW_COUNT => None,
            TCA_ACT_FLAGS if v.len() == 8 => {
                let value = u32::from_ne_bytes(v[0..4].try_into().unwrap_or_default()) & USER_FLAGS;
                (value != 0).then(|| [value.to_ne_bytes(), value.to_ne_bytes()].concat())
            }
            TCA_ACT_OPTIONS => {
                let (v, p) = normalize_action_options(&kind, v, shared);
                problem = problem.take().or(p);
                Some(v)
            }
            _ => Some(v.to_vec()),
        }))
    });
    (out, problem)
}

/// Where an action kind keeps its parameters (a struct starting with
/// `tc_gen`: index, capab, action, refcnt, bindcnt), its timestamps (struct
/// tcf_t) and its padding and counters.
pub(super) struct ActionLayout {
    pub(super) parms: &'static [u16],
    pub(super) tm: u16,
    pub(super) drop: &'static [u16],
}

pub(super) fn action_layout(kind: &str) -> Option<ActionLayout> {
    let l = |parms, tm, drop| Some(ActionLayout { parms, tm, drop });
    match kind {
        "mirred" => l(&[2], 1, &[3]),
        "gact" => l(&[2], 1, &[4]),
        "pedit" => l(&[2, 4], 1, &[3]),
        "skbedit" => l(&[2], 1, &[6]),
        "nat" | "csum" | "connmark" => l(&[1], 2, &[3]),
        "vlan" => l(&[2], 1, &[5]),
        "tunnel_key" => l(&[2], 1, &[8]),
        "sample" | "skbmod" => l(&[2], 1, &[6]),
        "ife" => l(&[1], 2, &[7]),
        "bpf" => l(&[2], 1, &[7]),
        "simple" => l(&[2], 1, &[4]),
        "mpls" | "gate" => l(&[2], 1, &[3]),
        "ctinfo" => l(&[3], 2, &[1, 8, 9, 10]),
        "ct" => l(&[1], 2, &[15]),
        "police" => l(&[1], 6, &[7]),
        _ => None,
    }
}

/// Offsets of index, refcnt and bindcnt in an action's parameters.
pub(super) fn parms_offsets(kind: &str) -> (usize, usize, usize) {
    // struct tc_police: index, action, limit, burst, mtu, rate, peakrate,
    // refcnt, bindcnt; every other action starts with tc_gen.
    if kind == "police" { (0, 44, 48) } else { (0, 12, 16) }
}

pub(super) fn normalize_action_options(
    kind: &str,
    payload: &[u8],
    shared: &mut BTreeSet<(String, u32)>,
) -> (Vec<u8>, Option<String>) {
    const TCF_T_LEN: usize = 32;
    const TCA_ACT_BPF_FD: u16 = 5;
    const TCA_ACT_BPF_ID: u16 = 9;
    let Some(layout) = action_layout(kind) else { return (payload.to_vec(), None) };
    let (index_at, refcnt_at, bindcnt_at) = parms_offsets(kind);
    let mut problem = (kind == "police").then(police_problem);
    let out = map_nlas(payload, |ty, v| {
        if ty == layout.tm && v.len() == TCF_T_LEN {
            return None;
        }
        // Padding is empty; a flag attribute of the same number would not be.
        if layout.drop.contains(&ty) && (v.is_empty() || kind == "ctinfo") {
            return None;
        }
        if kind == "bpf" && matches!(ty, TCA_ACT_BPF_FD | TCA_ACT_BPF_ID) {
            problem = problem.take().or(Some("an action runs an eBPF program".to_string()));
        }
        if layout.parms.contains(&ty) && v.len() >= bindcnt_at + 4 {
            let word = |at: usize| u32::from_ne_bytes(v[at..at + 4].try_into().unwrap_or_default());
            if ty == layout.parms[0] && word(refcnt_at) > word(bindcnt_at) {
                shared.insert((kind.to_string(), word(index_at)));
            }
            let mut v = v.to_vec();
            v[refcnt_at..refcnt_at + 4].fill(0);
            v[bindcnt_at..bindcnt_at + 4].fill(0);
            return Some(v);
        }
        Some(v.to_vec())
    });
    (out, problem)
}

pub(super) fn c_string(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}
