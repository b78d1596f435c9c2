//! Saving a device's root qdisc tree (qdiscs, classes, filter chains,
//! filters and the actions bound to them) before a forced fault replaces
//! it, and recreating it exactly afterwards.
//!
//! What is saved is the kernel's own dump of every object, with what the
//! kernel reports but would refuse or ignore on create (statistics, hardware
//! offload state, timestamps, reference counts, padding) taken out, so the
//! same normalization also decides whether a device's tree equals a saved
//! one (`differences`). Options are kept as raw netlink attributes: an option
//! netlink-packet-route does not model survives the round trip unchanged.
//!
//! "Exactly" includes the order in which `tc` lists objects, which is the
//! order of the kernel's hash tables and lists; it depends on the order the
//! objects were created in, so the order of creation is worked out from the
//! order of the dump (see `insertion_order`), and u32's hash-table ids,
//! which the kernel allocates from a cyclic counter per qdisc, are
//! reproduced by allocating them in the same sequence (see `plan_u32`).
//! Which root table belongs to which u32 instance is not in a dump; it is
//! asked for separately (`u32_root`).
//!
//! Not saved, because a dump does not carry them: rate estimators (`tc ...
//! estimator`, only their readings are dumped); whether a chain holding
//! filters was created explicitly (`tc chain add`). Refused at save time
//! (`QdiscTreeError::Unrestorable`), because the dump cannot recreate them:
//! eBPF programs (cls_bpf and act_bpf by id; the program is gone once its
//! filter is), police actions (their rate tables are not dumped), size
//! tables with data. clsact/ingress are never part of the tree: chaosd does
//! not replace them.
//!
//! All functions run on a thread inside the device's network namespace.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use netlink_packet_core::{DefaultNla, Emitable, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAction, TcActionAttribute, TcActionMessage, TcActionMessageAttribute, TcAttribute, TcMessage},
};
use rand::{SeedableRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use crate::{
    netlink::{NetlinkError, RouteSocket},
    tc::TCA_OPTIONS,
};

/// Version of `SavedTree`'s layout; a journal entry of another version is
/// refused rather than misread.
pub const FORMAT_VERSION: u32 = 1;

const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TC_H_INGRESS: u32 = 0xFFFF_FFF1;

const TCA_STAB: u16 = 8;
const TCA_PAD: u16 = 9;
const TCA_EXT_WARN_MSG: u16 = 16;
const TCA_STAB_BASE: u16 = 1;

const NLA_TYPE_MASK: u16 = 0x3fff;

/// Kinds whose `TCA_OPTIONS` netlink-packet-route parses into a list of
/// options; for every other kind it wraps the whole attribute in one
/// `TcOption::Other`.
const CRATE_PARSED_KINDS: &[&str] = &["u32", "matchall", "flower", "ingress", "fq_codel", "bpf"];

/// Classful qdiscs whose classes are created by the user; the classes of
/// every other classful qdisc (mq, tbf, prio, ...) come with the qdisc.
const USER_CLASS_KINDS: &[&str] = &["htb", "hfsc", "drr", "qfq", "cbq"];

/// One qdisc, class, chain or filter as the kernel dumped it, normalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedObject {
    /// `TCA_KIND`; empty for a chain without a template.
    pub kind: String,
    pub parent: u32,
    pub handle: u32,
    /// Filters: priority << 16 | protocol (network byte order), as in
    /// `tcm_info`. Zero for the others (the kernel reports a refcount or a
    /// leaf handle there, neither of which can be set).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub info: u32,
    /// Filters and chains: `TCA_CHAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<u32>,
    /// The other attributes (`TCA_OPTIONS`, `TCA_STAB`, unknown ones) as
    /// netlink attributes, normalized.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "Vec::is_empty")]
    pub attrs: Vec<u8>,
}

/// An action filters refer to by index that exists on its own in the
/// kernel's action table (`tc actions add`): restoring binds to it instead
/// of creating it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedAction {
    pub kind: String,
    pub index: u32,
}

/// A device's root qdisc tree, in the kernel's dump order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTree {
    pub version: u32,
    /// Every qdisc of the root tree, the root first. Qdiscs with handle 0
    /// are the kernel's (a default root, mq's default children): they are
    /// compared, never created.
    pub qdiscs: Vec<SavedObject>,
    pub classes: Vec<SavedObject>,
    /// Every chain of every qdisc's and class's filter block, as `tc chain
    /// show` lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<SavedObject>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<SavedObject>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_actions: Vec<SharedAction>,
}

impl SavedTree {
    /// The root qdisc, if the device had one the kernel reports.
    pub fn root(&self) -> Option<&SavedObject> {
        self.qdiscs.iter().find(|q| q.parent == TC_H_ROOT)
    }

    /// The device had the kernel's default root (handle 0:, e.g. noqueue,
    /// pfifo_fast or mq): restoring it means removing whatever root is there.
    pub fn is_kernel_default(&self) -> bool {
        self.root().is_none_or(|r| r.handle == 0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QdiscTreeError {
    #[error("read the qdisc tree of ifindex {ifindex}: {source}")]
    Dump {
        ifindex: u32,
        #[source]
        source: NetlinkError,
    },
    #[error("{object} on ifindex {ifindex} cannot be saved: {reason}")]
    Unrestorable { ifindex: u32, object: String, reason: String },
    #[error("remove the root qdisc of ifindex {ifindex} to restore the saved tree: {source}")]
    RemoveRoot {
        ifindex: u32,
        #[source]
        source: NetlinkError,
    },
    /// The kernel refused an object of the saved tree. `source` names the
    /// object; `left` says what the device was left with.
    #[error("restore the qdisc tree of ifindex {ifindex}: {source}; the device was left with {left}")]
    Recreate {
        ifindex: u32,
        object: String,
        #[source]
        source: NetlinkError,
        left: String,
    },
    #[error("saved qdisc tree has format version {0}, this chaosd reads version {FORMAT_VERSION}")]
    Version(u32),
}

/// Saves the root qdisc tree of `ifindex`. Fails with `Unrestorable` when
/// the tree holds something a dump cannot recreate.
pub fn save(sock: &mut RouteSocket, ifindex: u32) -> Result<SavedTree, QdiscTreeError> {
    snapshot(sock, ifindex, true)
}

/// Recreates `tree` on `ifindex`, replacing the root qdisc there (or, when
/// the saved root was the kernel's default, removing the root so the kernel
/// attaches its default again). Does nothing when the device already has
/// the saved tree, so it can be repeated after a crash.
///
/// When the kernel refuses an object, what was recreated so far is removed
/// and the device is left with the kernel's default root qdisc, as it would
/// be with no tree at all: a partial tree (a root without its classes or
/// filters) can hold packets in a class nothing drains or send them where
/// the user never meant to, while the default qdisc only loses the user's
/// shaping. The error names the object and carries the kernel's message.
pub fn restore(sock: &mut RouteSocket, ifindex: u32, tree: &SavedTree) -> Result<(), QdiscTreeError> {
    if tree.version != FORMAT_VERSION {
        return Err(QdiscTreeError::Version(tree.version));
    }
    if differences(sock, ifindex, tree)?.is_empty() {
        return Ok(());
    }
    remove_root(sock, ifindex).map_err(|source| QdiscTreeError::RemoveRoot { ifindex, source })?;
    if tree.is_kernel_default() {
        return Ok(());
    }
    // Only now: removing the root freed the actions its filters owned.
    let tree = remap_taken_actions(sock, tree);
    for op in plan(&tree) {
        if let Err((object, source)) = execute(sock, ifindex, &tree, &op) {
            let left = match remove_root(sock, ifindex) {
                Ok(()) => "the kernel's default root qdisc".to_string(),
                Err(e) => format!("part of the saved tree (removing it failed too: {e})"),
            };
            return Err(QdiscTreeError::Recreate { ifindex, object, source, left });
        }
    }
    Ok(())
}

/// How the device's current tree differs from `tree`, one line each;
/// empty when `tc` would show both the same.
pub fn differences(sock: &mut RouteSocket, ifindex: u32, tree: &SavedTree) -> Result<Vec<String>, QdiscTreeError> {
    let now = snapshot(sock, ifindex, false)?;
    Ok(compare(tree, &now))
}

// ---------------------------------------------------------------------------
// Reading the tree

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Qdisc,
    Class,
    Chain,
    Filter,
}

fn snapshot(sock: &mut RouteSocket, ifindex: u32, strict: bool) -> Result<SavedTree, QdiscTreeError> {
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
fn u32_root(ifindex: u32, instance: &SavedObject) -> Result<u32, NetlinkError> {
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
fn get(op: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
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
fn normalize(msg: &TcMessage, role: Role, shared: &mut BTreeSet<(String, u32)>) -> (SavedObject, Option<String>) {
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

fn emitted<T: Emitable>(attr: &T) -> Vec<u8> {
    let mut buf = vec![0; attr.buffer_len()];
    attr.emit(&mut buf);
    buf
}

/// The payload of `TCA_OPTIONS` as the kernel sent it.
fn options_payload(attr: &TcAttribute, kind: &str) -> Vec<u8> {
    let raw = emitted(attr);
    let Some((_, value)) = nlas(&raw).into_iter().next() else { return Vec::new() };
    if CRATE_PARSED_KINDS.contains(&kind) {
        return value.to_vec();
    }
    // The crate kept the whole attribute as one option: unwrap it once.
    nlas(value).into_iter().next().map(|(_, v)| v.to_vec()).unwrap_or_default()
}

fn stab_problem(value: &[u8]) -> Option<String> {
    let base = nlas(value).into_iter().find(|(ty, _)| ty & NLA_TYPE_MASK == TCA_STAB_BASE)?.1;
    // struct tc_sizespec: tsize is the last u32 (offset 20).
    let tsize = base.get(20..24).map(|b| u32::from_ne_bytes(b.try_into().unwrap_or_default()))?;
    (tsize > 0).then(|| "its size table: the kernel reports the table's parameters but not its data".to_string())
}

fn normalize_qdisc_options(kind: &str, payload: &[u8]) -> Vec<u8> {
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
struct ClassifierLayout {
    act: Option<u16>,
    police: Option<u16>,
    /// `TCA_CLS_FLAGS_*`, whose IN_HW/NOT_IN_HW bits are state.
    flags: Option<u16>,
    /// Counters and padding.
    drop: &'static [u16],
}

fn classifier_layout(kind: &str) -> Option<ClassifierLayout> {
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

const TCA_CLS_FLAGS_STATE: u32 = (1 << 2) | (1 << 3);

fn normalize_filter_options(
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

fn police_problem() -> String {
    "it polices: the kernel does not report a police action's rate tables".to_string()
}

/// `TCA_*_ACT`: a list of actions, each a nest of `TCA_ACT_*`.
fn normalize_actions(payload: &[u8], shared: &mut BTreeSet<(String, u32)>) -> (Vec<u8>, Option<String>) {
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
struct ActionLayout {
    parms: &'static [u16],
    tm: u16,
    drop: &'static [u16],
}

fn action_layout(kind: &str) -> Option<ActionLayout> {
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
fn parms_offsets(kind: &str) -> (usize, usize, usize) {
    // struct tc_police: index, action, limit, burst, mtu, rate, peakrate,
    // refcnt, bindcnt; every other action starts with tc_gen.
    if kind == "police" { (0, 44, 48) } else { (0, 12, 16) }
}

fn normalize_action_options(
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

fn c_string(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned()
}

// ---------------------------------------------------------------------------
// Raw netlink attributes

/// (type with its flags, value) of each attribute; stops at a malformed one.
fn nlas(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((ty, &rest[4..len]));
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

fn push_nla(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (len.next_multiple_of(4) - len), 0);
}

/// Rebuilds a list of attributes: `f` gets each one's type (without flags)
/// and value and returns the new value, or None to drop it.
fn map_nlas(buf: &[u8], mut f: impl FnMut(u16, &[u8]) -> Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len());
    for (ty, v) in nlas(buf) {
        if let Some(v) = f(ty & NLA_TYPE_MASK, v) {
            push_nla(&mut out, ty, &v);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Comparing

fn compare(want: &SavedTree, have: &SavedTree) -> Vec<String> {
    let mut out = Vec::new();
    compare_lists(Role::Qdisc, &want.qdiscs, &have.qdiscs, &mut out);
    compare_lists(Role::Class, &want.classes, &have.classes, &mut out);
    compare_lists(Role::Chain, &want.chains, &have.chains, &mut out);
    compare_lists(Role::Filter, &want.filters, &have.filters, &mut out);
    out
}

fn compare_lists(role: Role, want: &[SavedObject], have: &[SavedObject], out: &mut Vec<String>) {
    if want == have {
        return;
    }
    let identity = |o: &SavedObject| (o.kind.clone(), o.parent, o.handle, o.info, o.chain);
    let before = out.len();
    for w in want.iter().filter(|w| !have.contains(w)) {
        if have.iter().any(|h| identity(h) == identity(w)) {
            out.push(format!("{} has other parameters", describe(role, w)));
        } else {
            out.push(format!("{} is missing", describe(role, w)));
        }
    }
    for h in have.iter().filter(|h| !want.contains(h) && !want.iter().any(|w| identity(w) == identity(h))) {
        out.push(format!("{} is not in the saved tree", describe(role, h)));
    }
    if out.len() == before {
        let what = match role {
            Role::Qdisc => "qdiscs",
            Role::Class => "classes",
            Role::Chain => "chains",
            Role::Filter => "filters",
        };
        out.push(format!("the kernel lists the {what} in another order"));
    }
}

// ---------------------------------------------------------------------------
// Naming objects the way tc does

/// `1:`, `1:10`, `:1`, `root`.
pub fn handle_text(h: u32) -> String {
    match h {
        TC_H_ROOT => "root".to_string(),
        _ if h & 0xffff == 0 => format!("{:x}:", h >> 16),
        _ if h >> 16 == 0 => format!(":{:x}", h & 0xffff),
        _ => format!("{:x}:{:x}", h >> 16, h & 0xffff),
    }
}

/// u32's `800:` (a hash table) and `800::800` / `2:a:1` (a key node).
fn u32_handle_text(h: u32) -> String {
    let (htid, hash, node) = (h >> 20, (h >> 12) & 0xff, h & 0xfff);
    let mut s = format!("{htid:x}:");
    if hash != 0 || node != 0 {
        if hash != 0 {
            s.push_str(&format!("{hash:x}"));
        }
        s.push(':');
        if node != 0 {
            s.push_str(&format!("{node:x}"));
        }
    }
    s
}

fn describe(role: Role, o: &SavedObject) -> String {
    let parent = if o.parent == TC_H_ROOT { "root".to_string() } else { format!("parent {}", handle_text(o.parent)) };
    match role {
        Role::Qdisc => format!("qdisc {} {} {parent}", o.kind, handle_text(o.handle)),
        Role::Class => format!("class {} {} {parent}", o.kind, handle_text(o.handle)),
        Role::Chain => {
            let template = if o.kind.is_empty() { String::new() } else { format!(" (template {})", o.kind) };
            format!("chain {} {parent}{template}", o.chain.unwrap_or(0))
        }
        Role::Filter => {
            let handle = match (o.handle, o.kind.as_str()) {
                (0, _) => String::new(),
                (h, "u32") if is_bare(o) => format!(" (root table {})", u32_handle_text(h)),
                (h, "u32") => format!(" {}", u32_handle_text(h)),
                (h, _) => format!(" handle {h:#x}"),
            };
            let protocol = u16::from_be_bytes(((o.info & 0xffff) as u16).to_ne_bytes());
            format!(
                "filter {}{handle} {parent} chain {} pref {} protocol {protocol:#06x}",
                o.kind,
                o.chain.unwrap_or(0),
                o.info >> 16
            )
        }
    }
}

// ---------------------------------------------------------------------------
// Planning the order of creation

/// One step of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Qdisc(usize),
    Class(usize),
    Chain(usize),
    /// A filter as saved.
    Filter(usize),
    /// Only the classifier instance (priority, protocol, kind) of a filter,
    /// without a handle or options.
    FilterBare(usize),
    /// A u32 hash table whose id the kernel allocates.
    FilterAutoHandle(usize),
    /// A u32 instance or hash table that exists only to advance u32's id
    /// counter, removed at the end.
    Filler(Filler),
    DropFiller(Filler),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Filler {
    parent: u32,
    chain: u32,
    prio: u16,
    /// 0 for the instance, the expected id for a hash table.
    table: u32,
}

fn plan(tree: &SavedTree) -> Vec<Op> {
    let mut ops = Vec::new();
    let Some(root) = tree.qdiscs.iter().position(|q| q.parent == TC_H_ROOT && q.handle != 0) else {
        return ops;
    };
    let root_major = tree.qdiscs[root].handle >> 16;
    ops.push(Op::Qdisc(root));
    plan_classes(tree, root, &mut ops);

    let others: Vec<usize> = (0..tree.qdiscs.len()).filter(|&i| i != root && tree.qdiscs[i].handle != 0).collect();
    let keys: Vec<u32> = others.iter().map(|&i| tree.qdiscs[i].handle).collect();
    let deps: Vec<Option<usize>> = others
        .iter()
        .map(|&i| {
            let major = tree.qdiscs[i].parent >> 16;
            if major == root_major { None } else { others.iter().position(|&j| tree.qdiscs[j].handle >> 16 == major) }
        })
        .collect();
    for k in insertion_order(HashModel::Qdisc, &keys, &deps) {
        ops.push(Op::Qdisc(others[k]));
        plan_classes(tree, others[k], &mut ops);
    }
    plan_filters(tree, &mut ops);
    ops
}

fn plan_classes(tree: &SavedTree, qdisc: usize, ops: &mut Vec<Op>) {
    let q = &tree.qdiscs[qdisc];
    if !USER_CLASS_KINDS.contains(&q.kind.as_str()) {
        return;
    }
    let major = q.handle >> 16;
    let own: Vec<usize> = (0..tree.classes.len())
        .filter(|&i| tree.classes[i].handle >> 16 == major && tree.classes[i].handle & 0xffff != 0)
        .collect();
    let keys: Vec<u32> = own.iter().map(|&i| tree.classes[i].handle).collect();
    let deps: Vec<Option<usize>> =
        own.iter().map(|&i| own.iter().position(|&j| tree.classes[j].handle == tree.classes[i].parent)).collect();
    let order = match q.kind.as_str() {
        "htb" | "drr" | "qfq" => insertion_order(HashModel::Class, &keys, &deps),
        _ => topological(&deps, |i| i),
    };
    ops.extend(order.into_iter().map(|k| Op::Class(own[k])));
}

/// A classifier instance: the filters of one (parent, chain, priority,
/// protocol, kind), in dump order.
struct Instance {
    parent: u32,
    chain: u32,
    info: u32,
    kind: String,
    entries: Vec<usize>,
}

fn instances(tree: &SavedTree) -> Vec<Instance> {
    let mut out: Vec<Instance> = Vec::new();
    for (i, f) in tree.filters.iter().enumerate() {
        let chain = f.chain.unwrap_or(0);
        match out.iter_mut().find(|t| t.parent == f.parent && t.chain == chain && t.info == f.info && t.kind == f.kind)
        {
            Some(t) => t.entries.push(i),
            None => {
                out.push(Instance { parent: f.parent, chain, info: f.info, kind: f.kind.clone(), entries: vec![i] })
            }
        }
    }
    out
}

/// A classifier instance's own entry in a dump: no handle, no options (for
/// u32 the handle is the instance's root table, see `u32_root`).
fn is_bare(f: &SavedObject) -> bool {
    (f.handle == 0 || f.kind == "u32") && !nlas(&f.attrs).iter().any(|(ty, _)| ty & NLA_TYPE_MASK == TCA_OPTIONS)
}

fn plan_filters(tree: &SavedTree, ops: &mut Vec<Op>) {
    let instances = instances(tree);
    let mut blocks: Vec<u32> = Vec::new();
    for p in tree.chains.iter().map(|c| c.parent).chain(instances.iter().map(|t| t.parent)) {
        if !blocks.contains(&p) {
            blocks.push(p);
        }
    }
    // Chains come into being in the order the kernel lists them: explicit
    // ones by themselves, the others with their first filter. u32
    // instances come after, in the order their hash-table ids demand, so a
    // chain holding only u32 filters is created by itself when the block
    // has other chains to keep in order (it then outlives its last filter,
    // which tc does not show).
    let mut done = vec![false; instances.len()];
    for &parent in &blocks {
        let several = tree.chains.iter().filter(|c| c.parent == parent).count() > 1;
        for (ci, c) in tree.chains.iter().enumerate().filter(|(_, c)| c.parent == parent) {
            let chain = c.chain.unwrap_or(0);
            let mut held = instances.iter().filter(|t| t.parent == parent && t.chain == chain).peekable();
            let has_filters = held.peek().is_some();
            let only_u32 = has_filters && held.all(|t| t.kind == "u32");
            if !c.kind.is_empty() || !has_filters || (several && only_u32) {
                ops.push(Op::Chain(ci));
            }
            for (ti, t) in instances.iter().enumerate() {
                if t.parent == parent && t.chain == chain && t.kind != "u32" {
                    plan_instance(tree, t, ops);
                    done[ti] = true;
                }
            }
        }
    }
    for (ti, t) in instances.iter().enumerate() {
        if !done[ti] && t.kind != "u32" {
            plan_instance(tree, t, ops);
        }
    }
    let mut scopes: Vec<u32> = Vec::new();
    for t in instances.iter().filter(|t| t.kind == "u32") {
        if !scopes.contains(&(t.parent >> 16)) {
            scopes.push(t.parent >> 16);
        }
    }
    for major in scopes {
        plan_u32(tree, major, ops);
    }
}

/// A classifier other than u32: its filters newest first, as most keep
/// them in a list they prepend to (and the rest sort by handle).
fn plan_instance(tree: &SavedTree, t: &Instance, ops: &mut Vec<Op>) {
    let nodes: Vec<usize> = t.entries.iter().copied().filter(|&i| !is_bare(&tree.filters[i])).collect();
    if nodes.is_empty() {
        ops.push(Op::FilterBare(t.entries[0]));
    }
    ops.extend(nodes.into_iter().rev().map(Op::Filter));
}

/// u32 of one qdisc: its own block and its classes' blocks share one id
/// space and one list of hash tables, which every instance (priority,
/// protocol) walks for the tables of its priority, so each instance lists
/// the tables and key nodes of all instances with its priority. Each
/// instance gets a root table when created, and tables created without a
/// handle get one too: the qdisc's first instance 800:, every later id
/// (801: up to fff:) from a cyclic counter. Explicit handles (`handle 2:`)
/// do not move the counter. So instances and counted tables are created in
/// ascending id order, with throwaway tables where the user's history left
/// gaps; a priority's tables oldest first (the kernel lists them newest
/// first); key nodes last, so the tables they link to exist.
fn plan_u32(tree: &SavedTree, major: u32, ops: &mut Vec<Op>) {
    let scope: Vec<usize> = (0..tree.filters.len())
        .filter(|&i| tree.filters[i].kind == "u32" && tree.filters[i].parent >> 16 == major)
        .collect();
    let f = |i: usize| &tree.filters[i];
    let same_instance =
        |a: usize, b: usize| (f(a).parent, f(a).chain, f(a).info) == (f(b).parent, f(b).chain, f(b).info);
    let prio = |i: usize| f(i).info >> 16;
    // Instances, by their bare entry, whose handle is the instance's root.
    let mut instances: Vec<usize> = Vec::new();
    for &i in &scope {
        if is_bare(f(i)) && !instances.iter().any(|&t| same_instance(t, i)) {
            instances.push(i);
        }
    }
    // Tables per priority, oldest first.
    let mut tables: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for &i in &scope {
        let h = f(i).handle;
        if !is_bare(f(i)) && h != 0 && h & 0xfffff == 0 {
            let list = tables.entry(prio(i)).or_default();
            if !list.contains(&h) {
                list.push(h);
            }
        }
    }
    let root_of = |h: u32| instances.iter().copied().find(|&t| f(t).handle == h && h != 0);
    let mut created: Vec<usize> = Vec::new();
    for &t in &instances {
        if !tables.get(&prio(t)).is_some_and(|l| l.contains(&f(t).handle)) {
            // Its root is not known: nothing to order it by.
            ops.push(Op::FilterBare(t));
            created.push(t);
        }
    }
    let mut seqs: Vec<VecDeque<u32>> = tables.values().map(|l| l.iter().rev().copied().collect()).collect();
    let table_prio: Vec<u32> = tables.keys().copied().collect();
    // The entry of table or node `h` that an existing instance of priority
    // `p` lists (creating through an instance that does not exist yet
    // would make one, with a root of its own).
    let via = |h: u32, p: u32, created: &[usize]| -> Option<usize> {
        let t = created.iter().copied().find(|&t| prio(t) == p)?;
        scope.iter().copied().find(|&i| f(i).handle == h && same_instance(i, t))
    };

    // Throwaway objects go in the chain of the instance with the lowest
    // root, at a priority nothing there uses.
    let first = instances.iter().copied().filter(|&t| f(t).handle != 0).min_by_key(|&t| f(t).handle);
    let Some(first) = first.or(instances.first().copied()) else { return };
    let (fparent, fchain) = (f(first).parent, f(first).chain.unwrap_or(0));
    let used: HashSet<u32> = tree
        .filters
        .iter()
        .filter(|x| x.parent == fparent && x.chain.unwrap_or(0) == fchain)
        .map(|x| x.info >> 16)
        .collect();
    let spare = (1..=0xffffu32).rev().find(|p| !used.contains(p)).unwrap_or(0xffff) as u16;
    let filler = |table| Filler { parent: fparent, chain: fchain, prio: spare, table };

    let mut fresh = created.is_empty();
    let mut next = 1u32;
    let mut filler_instance = false;
    let mut filler_tables = Vec::new();
    loop {
        // Tables with explicit handles, once an instance of their priority exists.
        let explicit = (0..seqs.len()).find_map(|s| {
            let h = *seqs[s].front()?;
            (root_of(h).is_none() && h & 0x8000_0000 == 0).then_some(())?;
            via(h, table_prio[s], &created).map(|e| (s, e))
        });
        if let Some((s, entry)) = explicit {
            seqs[s].pop_front();
            ops.push(Op::Filter(entry));
            continue;
        }
        // The lowest id next, from the counter; explicit tables only when
        // nothing else is left (an instance of their priority is missing).
        let counted = (0..seqs.len())
            .filter(|&s| seqs[s].front().is_some_and(|h| h & 0x8000_0000 != 0))
            .min_by_key(|&s| seqs[s][0]);
        let Some(s) = counted.or_else(|| (0..seqs.len()).find(|&s| !seqs[s].is_empty())) else { break };
        let Some(h) = seqs[s].pop_front() else { break };
        let htid = h >> 20;
        if htid & 0x800 != 0 {
            if htid != 0x800 {
                let id = htid & 0x7ff;
                if fresh {
                    // The qdisc's first instance takes 800: without touching the counter.
                    ops.push(Op::Filler(filler(0)));
                    filler_instance = true;
                }
                while next < id {
                    if filler_instance {
                        let table = (next | 0x800) << 20;
                        ops.push(Op::Filler(filler(table)));
                        filler_tables.push(table);
                    } else {
                        ops.push(Op::Filler(filler(0)));
                        filler_instance = true;
                    }
                    next += 1;
                }
                next = next.max(id + 1);
            }
            fresh = false;
        }
        match root_of(h) {
            Some(t) => {
                ops.push(Op::FilterBare(t));
                created.push(t);
            }
            None => {
                let p = table_prio[s];
                match via(h, p, &created) {
                    Some(e) if h & 0x8000_0000 != 0 => ops.push(Op::FilterAutoHandle(e)),
                    Some(e) => ops.push(Op::Filter(e)),
                    // No instance of its priority: an orphan of a history
                    // this cannot replay; its first entry makes one.
                    None => {
                        if let Some(&e) = scope.iter().find(|&&i| f(i).handle == h) {
                            ops.push(Op::Filter(e));
                            created.push(e);
                        }
                    }
                }
            }
        }
    }
    // Key nodes, through the instance whose root holds them, else any of
    // their priority.
    let mut nodes: Vec<u32> = Vec::new();
    for &i in &scope {
        let h = f(i).handle;
        if h & 0xfff != 0 && !nodes.contains(&h) {
            nodes.push(h);
            let owner = created.iter().copied().find(|&t| f(t).handle == h & 0xfff0_0000);
            let entry = owner
                .and_then(|t| scope.iter().copied().find(|&e| f(e).handle == h && same_instance(e, t)))
                .or_else(|| via(h, prio(i), &created))
                .unwrap_or(i);
            ops.push(Op::Filter(entry));
        }
    }
    ops.extend(filler_tables.into_iter().rev().map(|table| Op::DropFiller(filler(table))));
    if filler_instance {
        ops.push(Op::DropFiller(filler(0)));
    }
}

/// The kernel's hash tables whose listing order reveals creation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HashModel {
    /// A device's qdisc hash: 16 buckets (hash_32 of the handle), newest
    /// first in each.
    Qdisc,
    /// `Qdisc_class_hash` (htb, drr, qfq): starts with 4 buckets and doubles
    /// when more than 3/4 full; rehashing reverses each bucket.
    Class,
}

impl HashModel {
    fn initial_size(self) -> usize {
        match self {
            Self::Qdisc => 16,
            Self::Class => 4,
        }
    }

    fn grows_after(self, count: usize, size: usize) -> bool {
        self == Self::Class && count * 4 > size * 3
    }

    fn bucket(self, key: u32, size: usize) -> usize {
        match self {
            // hash_32(key, 4): GOLDEN_RATIO_32 multiplication, top bits.
            Self::Qdisc => (key.wrapping_mul(0x61C8_8647) >> 28) as usize,
            // qdisc_class_hash()
            Self::Class => {
                let mut h = key;
                h ^= h >> 8;
                h ^= h >> 4;
                h as usize & (size - 1)
            }
        }
    }

    /// The order the kernel lists `keys` in after inserting them in this order.
    fn listing(self, keys: &[u32]) -> Vec<u32> {
        let mut size = self.initial_size();
        let mut buckets: Vec<Vec<u32>> = vec![Vec::new(); size];
        for (n, &k) in keys.iter().enumerate() {
            buckets[self.bucket(k, size)].insert(0, k);
            if self.grows_after(n + 1, size) {
                size *= 2;
                let mut grown: Vec<Vec<u32>> = vec![Vec::new(); size];
                for old in &buckets {
                    for &k in old {
                        grown[self.bucket(k, size)].insert(0, k);
                    }
                }
                buckets = grown;
            }
        }
        buckets.concat()
    }
}

/// Dependency order, taking the candidates `prefer` ranks lowest first.
fn topological(deps: &[Option<usize>], prefer: impl Fn(usize) -> usize) -> Vec<usize> {
    let n = deps.len();
    let mut placed = vec![false; n];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ready =
            (0..n).filter(|&i| !placed[i] && deps[i].is_none_or(|d| placed[d] || d == i)).min_by_key(|&i| prefer(i));
        // A cycle cannot come from a kernel dump; take the rest as listed.
        let i = ready.unwrap_or_else(|| (0..n).find(|&i| !placed[i]).unwrap_or_default());
        placed[i] = true;
        out.push(i);
    }
    out
}

/// An order of inserting `keys` (given in the kernel's listing order), each
/// after its dependency, that makes the kernel list them in that order
/// again. Falls back to newest-first by listing when none is found (a
/// model that does not fit, or a history with deletions).
fn insertion_order(model: HashModel, keys: &[u32], deps: &[Option<usize>]) -> Vec<usize> {
    let n = keys.len();
    let fallback = || topological(deps, |i| n - i);
    if n == 0 || n > 200 {
        return fallback();
    }
    let mut size = model.initial_size();
    let mut grew = Vec::with_capacity(n);
    for count in 1..=n {
        let g = model.grows_after(count, size);
        if g {
            size *= 2;
        }
        grew.push(g);
    }
    let bucket: Vec<usize> = keys.iter().map(|&k| model.bucket(k, size)).collect();
    if bucket.windows(2).any(|w| w[0] > w[1]) {
        return fallback();
    }
    // Where the item inserted at time t ends up among the items of its
    // bucket: inserting prepends, growing reverses.
    let mut list: Vec<usize> = Vec::with_capacity(n);
    for (t, &g) in grew.iter().enumerate() {
        list.insert(0, t);
        if g {
            list.reverse();
        }
    }
    let mut rank = vec![0; n];
    for (pos, &t) in list.iter().enumerate() {
        rank[t] = pos;
    }
    // Several tries with different preferences among the candidates, each
    // with a bounded budget: a dead end the forward check misses costs one
    // try, not the whole search.
    let mut rng = rand::rngs::StdRng::seed_from_u64(n as u64);
    for attempt in 0..40 {
        let mut prefer: Vec<usize> = (0..n).rev().collect();
        if attempt > 0 {
            prefer.shuffle(&mut rng);
        }
        let mut search = Search::new(deps, &bucket, &rank, prefer);
        if search.place() {
            let order = search.order;
            let keys_in_order: Vec<u32> = order.iter().map(|&i| keys[i]).collect();
            if model.listing(&keys_in_order) == keys {
                return order;
            }
        }
    }
    fallback()
}

/// Depth-first search over insertion orders. Within a bucket, the items'
/// ranks (by insertion time) must increase along the listing; after each
/// placement, every run of still unplaced items between two placed ones of
/// a bucket must have enough later time slots whose ranks fall between
/// theirs, which cuts a dead end off as soon as it is entered.
struct Search<'a> {
    deps: &'a [Option<usize>],
    bucket: &'a [usize],
    rank: &'a [usize],
    /// The items of each bucket in listing order.
    members: Vec<Vec<usize>>,
    /// below[t][r]: time slots from t on whose rank is below r.
    below: Vec<Vec<u16>>,
    /// Candidates in the order to try them.
    prefer: Vec<usize>,
    time: Vec<Option<usize>>,
    order: Vec<usize>,
    budget: u32,
}

impl<'a> Search<'a> {
    fn new(deps: &'a [Option<usize>], bucket: &'a [usize], rank: &'a [usize], prefer: Vec<usize>) -> Self {
        let n = deps.len();
        let mut members = vec![Vec::new(); bucket.iter().max().map_or(0, |b| b + 1)];
        for (i, &b) in bucket.iter().enumerate() {
            members[b].push(i);
        }
        let mut below = vec![vec![0u16; n + 1]];
        for t in (0..n).rev() {
            let later = &below[below.len() - 1];
            let row = (0..=n).map(|r| later[r] + u16::from(rank[t] < r)).collect();
            below.push(row);
        }
        below.reverse();
        Self { deps, bucket, rank, members, below, prefer, time: vec![None; n], order: Vec::new(), budget: 3_000 }
    }

    /// Whether the items not placed yet still have room, with slots from
    /// `from` on free.
    fn room(&self, from: usize) -> bool {
        let n = self.deps.len();
        self.members.iter().all(|items| {
            let mut lo = 0; // ranks must be >= lo
            let mut run = 0u16;
            for &i in items {
                match self.time[i] {
                    None => run += 1,
                    Some(t) => {
                        let hi = self.rank[t];
                        if run > 0 && (hi < lo || self.below[from][hi] - self.below[from][lo] < run) {
                            return false;
                        }
                        run = 0;
                        lo = hi + 1;
                    }
                }
            }
            run == 0 || (lo <= n && self.below[from][n] - self.below[from][lo] >= run)
        })
    }

    fn place(&mut self) -> bool {
        let n = self.deps.len();
        let t = self.order.len();
        if t == n {
            return true;
        }
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        for k in 0..n {
            let c = self.prefer[k];
            if self.time[c].is_some() || self.deps[c].is_some_and(|d| d != c && self.time[d].is_none()) {
                continue;
            }
            let fits = self.order.iter().all(|&f| {
                self.bucket[f] != self.bucket[c] || (self.rank[self.time[f].unwrap_or(0)] < self.rank[t]) == (f < c)
            });
            if !fits {
                continue;
            }
            self.time[c] = Some(t);
            self.order.push(c);
            if self.room(t + 1) && self.place() {
                return true;
            }
            self.order.pop();
            self.time[c] = None;
            if self.budget == 0 {
                return false;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------
// Doing it

fn remove_root(sock: &mut RouteSocket, ifindex: u32) -> Result<(), NetlinkError> {
    let mut req = TcMessage::default();
    req.header.index = ifindex as i32;
    let root = sock
        .dump("dump qdiscs", RouteNetlinkMessage::GetQueueDiscipline(req))?
        .into_iter()
        .filter_map(|m| if let RouteNetlinkMessage::NewQueueDiscipline(q) = m { Some(q) } else { None })
        .find(|q| q.header.index as u32 == ifindex && u32::from(q.header.parent) == TC_H_ROOT);
    let Some(root) = root else { return Ok(()) };
    if u32::from(root.header.handle) == 0 {
        return Ok(());
    }
    let mut msg = TcMessage::default();
    msg.header.index = ifindex as i32;
    msg.header.parent = TC_H_ROOT.into();
    msg.header.handle = root.header.handle;
    let what = format!("delete root qdisc {} on ifindex {ifindex}", handle_text(root.header.handle.into()));
    sock.request(&what, RouteNetlinkMessage::DelQueueDiscipline(msg), 0)
}

fn tc_message(ifindex: u32, obj: &SavedObject, handle: u32, attrs: &[u8]) -> TcMessage {
    let mut msg = TcMessage::default();
    msg.header.index = ifindex as i32;
    msg.header.parent = obj.parent.into();
    msg.header.handle = handle.into();
    msg.header.info = obj.info;
    if !obj.kind.is_empty() {
        msg.attributes.push(TcAttribute::Kind(obj.kind.clone()));
    }
    if let Some(c) = obj.chain {
        msg.attributes.push(TcAttribute::Chain(c));
    }
    for (ty, value) in nlas(attrs) {
        msg.attributes.push(TcAttribute::Other(DefaultNla::new(ty, value.to_vec())));
    }
    msg
}

fn filler_object(f: &Filler) -> SavedObject {
    const ETH_P_ALL: u16 = 0x0003;
    SavedObject {
        kind: "u32".into(),
        parent: f.parent,
        handle: 0,
        info: (u32::from(f.prio) << 16) | u32::from(u16::from_ne_bytes(ETH_P_ALL.to_be_bytes())),
        chain: Some(f.chain),
        attrs: Vec::new(),
    }
}

fn filler_table_options() -> Vec<u8> {
    const TCA_U32_DIVISOR: u16 = 4;
    let mut inner = Vec::new();
    push_nla(&mut inner, TCA_U32_DIVISOR, &1u32.to_ne_bytes());
    let mut attrs = Vec::new();
    push_nla(&mut attrs, TCA_OPTIONS, &inner);
    attrs
}

/// Runs one step; on failure, the object it concerned and the kernel's error.
fn execute(sock: &mut RouteSocket, ifindex: u32, tree: &SavedTree, op: &Op) -> Result<(), (String, NetlinkError)> {
    let create = NLM_F_CREATE | NLM_F_EXCL;
    let (what, msg, flags) = match op {
        Op::Qdisc(i) => {
            let q = &tree.qdiscs[*i];
            let m = tc_message(ifindex, q, q.handle, &q.attrs);
            (describe(Role::Qdisc, q), RouteNetlinkMessage::NewQueueDiscipline(m), create)
        }
        Op::Class(i) => {
            let c = &tree.classes[*i];
            let m = tc_message(ifindex, c, c.handle, &c.attrs);
            (describe(Role::Class, c), RouteNetlinkMessage::NewTrafficClass(m), create)
        }
        Op::Chain(i) => {
            let c = &tree.chains[*i];
            let m = tc_message(ifindex, c, 0, &c.attrs);
            (describe(Role::Chain, c), RouteNetlinkMessage::NewTrafficChain(m), create)
        }
        Op::Filter(i) | Op::FilterBare(i) | Op::FilterAutoHandle(i) => {
            let f = &tree.filters[*i];
            let m = match op {
                Op::Filter(_) => tc_message(ifindex, f, f.handle, &f.attrs),
                Op::FilterBare(_) => tc_message(ifindex, f, 0, &[]),
                _ => tc_message(ifindex, f, 0, &f.attrs),
            };
            (describe(Role::Filter, f), RouteNetlinkMessage::NewTrafficFilter(m), create)
        }
        Op::Filler(f) => {
            let obj = filler_object(f);
            let attrs = if f.table == 0 { Vec::new() } else { filler_table_options() };
            let what = format!("placeholder {} (it reproduces u32's hash-table ids)", describe(Role::Filter, &obj));
            (what, RouteNetlinkMessage::NewTrafficFilter(tc_message(ifindex, &obj, 0, &attrs)), create)
        }
        Op::DropFiller(f) => {
            let obj = filler_object(f);
            let what = format!("remove placeholder {}", describe(Role::Filter, &obj));
            (what, RouteNetlinkMessage::DelTrafficFilter(tc_message(ifindex, &obj, f.table, &[])), 0)
        }
    };
    let op_text = format!("recreate {what}");
    sock.request(&op_text, msg, flags).map_err(|e| (what, e))
}

/// Actions the saved filters owned were freed with them; if another
/// action took one's index meanwhile, creating the filter with that index
/// would bind it to that other action (say, chaosd's own redirect), so it
/// gets a free index instead.
fn remap_taken_actions(sock: &mut RouteSocket, tree: &SavedTree) -> SavedTree {
    let mut wanted = BTreeSet::new();
    for f in &tree.filters {
        visit_actions(f, &mut |kind, index| {
            wanted.insert((kind.to_string(), index));
        });
    }
    let shared: BTreeSet<(String, u32)> = tree.shared_actions.iter().map(|a| (a.kind.clone(), a.index)).collect();
    let mut taken: Vec<&(String, u32)> =
        wanted.iter().filter(|a| !shared.contains(*a) && a.1 != 0 && action_exists(sock, &a.0, a.1)).collect();
    // The kernel frees a removed filter's actions from a work queue: give
    // the tree's own actions, if the root was only just removed, time to go.
    for _ in 0..50 {
        if taken.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        taken.retain(|a| action_exists(sock, &a.0, a.1));
    }
    let mut remap = BTreeMap::new();
    for (kind, index) in taken {
        let free = (1..=64u32)
            .map(|k| index.wrapping_add(k))
            .filter(|&i| i != 0 && !wanted.contains(&(kind.clone(), i)))
            .find(|&i| !action_exists(sock, kind, i));
        remap.insert((kind.clone(), *index), free.unwrap_or(0));
    }
    if remap.is_empty() {
        return tree.clone();
    }
    let mut out = tree.clone();
    for f in &mut out.filters {
        rewrite_actions(f, &remap);
    }
    out
}

fn action_exists(sock: &mut RouteSocket, kind: &str, index: u32) -> bool {
    let mut action = TcAction::default();
    action.attributes = vec![TcActionAttribute::Kind(kind.to_string()), TcActionAttribute::Index(index)];
    let mut msg = TcActionMessage::default();
    msg.attributes.push(TcActionMessageAttribute::Actions(vec![action]));
    match sock.request(&format!("look up {kind} action {index}"), RouteNetlinkMessage::GetTrafficAction(msg), 0) {
        Ok(()) => true,
        Err(e) => e.errno() != Some(libc::ENOENT) && e.errno() != Some(libc::EINVAL),
    }
}

/// Calls `f(kind, index)` for every action a filter's options hold.
fn visit_actions(f: &SavedObject, visit: &mut impl FnMut(&str, u32)) {
    let Some(layout) = classifier_layout(&f.kind) else { return };
    for (ty, opts) in nlas(&f.attrs) {
        if ty & NLA_TYPE_MASK != TCA_OPTIONS {
            continue;
        }
        for (ty, v) in nlas(opts) {
            let ty = ty & NLA_TYPE_MASK;
            if Some(ty) == layout.act {
                for (_, action) in nlas(v) {
                    if let Some((kind, index)) = action_identity(action) {
                        visit(&kind, index);
                    }
                }
            }
        }
    }
}

/// (kind, index) of one action nest.
fn action_identity(action: &[u8]) -> Option<(String, u32)> {
    let attrs = nlas(action);
    let kind = c_string(attrs.iter().find(|(ty, _)| ty & NLA_TYPE_MASK == 1)?.1);
    let opts = attrs.iter().find(|(ty, _)| ty & NLA_TYPE_MASK == 2)?.1;
    let layout = action_layout(&kind)?;
    let (index_at, _, _) = parms_offsets(&kind);
    let parms = nlas(opts).into_iter().find(|(ty, _)| ty & NLA_TYPE_MASK == layout.parms[0])?.1;
    let index = u32::from_ne_bytes(parms.get(index_at..index_at + 4)?.try_into().ok()?);
    Some((kind, index))
}

fn rewrite_actions(f: &mut SavedObject, remap: &BTreeMap<(String, u32), u32>) {
    let Some(layout) = classifier_layout(&f.kind) else { return };
    f.attrs = map_nlas(&f.attrs, |ty, opts| {
        if ty != TCA_OPTIONS {
            return Some(opts.to_vec());
        }
        Some(map_nlas(opts, |ty, v| {
            if Some(ty) != layout.act {
                return Some(v.to_vec());
            }
            Some(map_nlas(v, |_, action| {
                let Some(identity) = action_identity(action) else { return Some(action.to_vec()) };
                let Some(&new) = remap.get(&identity) else { return Some(action.to_vec()) };
                let kind = identity.0;
                let Some(layout) = action_layout(&kind) else { return Some(action.to_vec()) };
                let (index_at, _, _) = parms_offsets(&kind);
                Some(map_nlas(action, |ty, v| {
                    if ty != 2 {
                        return Some(v.to_vec());
                    }
                    Some(map_nlas(v, |ty, parms| {
                        let mut parms = parms.to_vec();
                        if ty == layout.parms[0] && parms.len() >= index_at + 4 {
                            parms[index_at..index_at + 4].copy_from_slice(&new.to_ne_bytes());
                        }
                        Some(parms)
                    }))
                }))
            }))
        }))
    });
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Attributes as a hex string: half the size of a JSON array of numbers.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            text.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 {
            return Err(D::Error::custom("odd number of hex digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16).map_err(D::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Parseable;
    use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};

    use super::*;

    fn nla(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_nla(&mut out, ty, value);
        out
    }

    fn u32s(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    /// A dumped tc message: header, then attributes.
    fn message(parent: u32, handle: u32, info: u32, attrs: &[Vec<u8>]) -> TcMessage {
        let mut buf = vec![0u8; 4];
        buf.extend_from_slice(&3i32.to_ne_bytes());
        buf.extend(u32s(&[handle, parent, info]));
        for a in attrs {
            buf.extend_from_slice(a);
        }
        TcMessage::parse(&buf).unwrap()
    }

    fn kind(k: &str) -> Vec<u8> {
        nla(1, format!("{k}\0").as_bytes())
    }

    fn options_of(obj: &SavedObject) -> Vec<u8> {
        nlas(&obj.attrs).into_iter().find(|(ty, _)| *ty == TCA_OPTIONS).unwrap().1.to_vec()
    }

    #[test]
    fn htb_qdisc_keeps_its_options_without_counters_refcount_or_stats() {
        // tc_htb_glob: version 3, rate2quantum 5, defcls 0x20, debug 0, direct_pkts 17
        let init = nla(2, &u32s(&[3, 5, 0x20, 0, 17]));
        let qlen = nla(6, &u32s(&[1000]));
        let opts = nla(TCA_OPTIONS, &[init, qlen.clone()].concat());
        let stats2 = nla(7, &nla(1, &[0u8; 16]));
        let offload = nla(12, &[0]);
        let msg = message(TC_H_ROOT, 0x1_0000, 3, &[kind("htb"), opts, stats2, offload]);
        let (obj, problem) = normalize(&msg, Role::Qdisc, &mut BTreeSet::new());
        assert_eq!(problem, None);
        assert_eq!((obj.kind.as_str(), obj.parent, obj.handle, obj.info), ("htb", TC_H_ROOT, 0x1_0000, 0));
        assert_eq!(options_of(&obj), [nla(2, &u32s(&[3, 5, 0x20, 0, 0])), qlen].concat());
        assert_eq!(nlas(&obj.attrs).len(), 1, "only TCA_OPTIONS remains");
    }

    #[test]
    fn options_of_a_kind_the_crate_does_not_parse_stay_unwrapped() {
        // pfifo: a bare struct tc_fifo_qopt, not nested attributes.
        let msg = message(0x1_0010, 0x10_0000, 2, &[kind("pfifo"), nla(TCA_OPTIONS, &u32s(&[500]))]);
        let (obj, _) = normalize(&msg, Role::Qdisc, &mut BTreeSet::new());
        assert_eq!(options_of(&obj), u32s(&[500]));
    }

    fn mirred(index: u32, refcnt: u32, bindcnt: u32) -> Vec<u8> {
        // tc_mirred: tc_gen (index, capab, action, refcnt, bindcnt), eaction, ifindex
        let parms = nla(2, &u32s(&[index, 0, 3, refcnt, bindcnt, 2, 7]));
        let tm = nla(1, &[1u8; 32]);
        let pad = nla(3, &[]);
        let opts = nla(2 | 0x8000, &[pad, tm, parms].concat());
        let stats = nla(4, &nla(1, &[9u8; 16]));
        let in_hw = nla(10, &u32s(&[0]));
        [kind("mirred"), opts, stats, in_hw].concat()
    }

    fn u32_knode(flags: u32, action: Vec<u8>) -> Vec<u8> {
        let sel = nla(5, &[0u8; 16 + 16]);
        let classid = nla(1, &u32s(&[0x1_0010]));
        let pcnt = nla(9, &[5u8; 24]);
        let mark = nla(10, &u32s(&[1, 0xff, 42]));
        let flags = nla(11, &u32s(&[flags]));
        let act = nla(7, &nla(1, &action));
        nla(TCA_OPTIONS, &[sel, classid, pcnt, mark, flags, act].concat())
    }

    #[test]
    fn u32_filter_loses_counters_hardware_state_and_action_bookkeeping() {
        let chain = nla(11, &u32s(&[0]));
        let msg = message(0x1_0000, 0x8000_0800, (1 << 16) | 8, &[kind("u32"), chain, u32_knode(8, mirred(4, 1, 1))]);
        let mut shared = BTreeSet::new();
        let (obj, problem) = normalize(&msg, Role::Filter, &mut shared);
        assert_eq!(problem, None);
        assert_eq!((obj.chain, obj.info), (Some(0), (1 << 16) | 8));
        assert!(shared.is_empty(), "an action only its filter holds is not shared");
        let opts = options_of(&obj);
        let types: Vec<u16> = nlas(&opts).iter().map(|(t, _)| *t).collect();
        assert_eq!(types, [5, 1, 10, 7], "no PCNT, and no FLAGS once NOT_IN_HW is gone");
        let mark = nlas(&opts)[2].1.to_vec();
        assert_eq!(mark, u32s(&[1, 0xff, 0]));
        let action = nlas(nlas(&opts)[3].1)[0].1.to_vec();
        let action_types: Vec<u16> = nlas(&action).iter().map(|(t, _)| t & NLA_TYPE_MASK).collect();
        assert_eq!(action_types, [1, 2], "kind and options; no stats or hardware count");
        let parms = nlas(nlas(&action)[1].1);
        assert_eq!(parms.len(), 1, "no timestamps, no padding");
        assert_eq!(parms[0].1, u32s(&[4, 0, 3, 0, 0, 2, 7]).as_slice());

        // skip_hw is the user's and stays.
        let msg = message(0x1_0000, 0x8000_0800, 1 << 16, &[kind("u32"), u32_knode(1 | 8, mirred(4, 2, 1))]);
        let (obj, _) = normalize(&msg, Role::Filter, &mut shared);
        let opts = options_of(&obj);
        assert_eq!(nlas(&opts).iter().find(|(t, _)| *t == 11).unwrap().1, u32s(&[1]).as_slice());
        assert_eq!(shared, BTreeSet::from([("mirred".to_string(), 4)]), "held by the action table too");
    }

    #[test]
    fn what_a_dump_cannot_recreate_is_named() {
        // cls_bpf with an eBPF program (by id) and a size table with data.
        let opts = nla(TCA_OPTIONS, &[nla(11, &u32s(&[77])), nla(7, b"prog\0")].concat());
        let msg = message(0x1_0000, 1, 1 << 16, &[kind("bpf"), opts]);
        let (_, problem) = normalize(&msg, Role::Filter, &mut BTreeSet::new());
        assert!(problem.unwrap().contains("eBPF"));
        let mut spec = vec![0u8; 24];
        spec[20..24].copy_from_slice(&512u32.to_ne_bytes());
        let msg = message(TC_H_ROOT, 0x1_0000, 0, &[kind("htb"), nla(TCA_STAB, &nla(1, &spec))]);
        let (_, problem) = normalize(&msg, Role::Qdisc, &mut BTreeSet::new());
        assert!(problem.unwrap().contains("size table"));
    }

    #[test]
    fn saved_tree_survives_json_and_stays_small() {
        let f = SavedObject {
            kind: "u32".into(),
            parent: 0x1_0000,
            handle: 0x8000_0800,
            info: (1 << 16) | 8,
            chain: Some(0),
            attrs: u32_knode(0, mirred(1, 1, 1)),
        };
        let q = SavedObject {
            kind: "htb".into(),
            parent: TC_H_ROOT,
            handle: 0x1_0000,
            info: 0,
            chain: None,
            attrs: vec![],
        };
        let tree = SavedTree {
            version: FORMAT_VERSION,
            qdiscs: vec![q],
            classes: vec![],
            chains: vec![],
            filters: vec![f],
            shared_actions: vec![SharedAction { kind: "mirred".into(), index: 1 }],
        };
        let json = serde_json::to_string(&tree).unwrap();
        assert_eq!(serde_json::from_str::<SavedTree>(&json).unwrap(), tree);
        assert!(json.len() < 2 * 200 + 300, "{} bytes: {json}", json.len());
        assert!(serde_json::from_str::<SavedTree>(&json.replace("\"attrs\":\"", "\"attrs\":\"0")).is_err());
    }

    #[test]
    fn restore_refuses_a_tree_of_another_format_before_touching_anything() {
        let tree = SavedTree {
            version: FORMAT_VERSION + 1,
            qdiscs: vec![],
            classes: vec![],
            chains: vec![],
            filters: vec![],
            shared_actions: vec![],
        };
        let mut sock = RouteSocket::open().unwrap();
        let err = restore(&mut sock, 1, &tree).unwrap_err();
        assert!(matches!(err, QdiscTreeError::Version(_)), "{err}");
    }

    #[test]
    fn objects_are_named_as_tc_names_them() {
        assert_eq!(handle_text(0x1_0000), "1:");
        assert_eq!(handle_text(0x1_0010), "1:10");
        assert_eq!(handle_text(0x0000_0001), ":1");
        assert_eq!(handle_text(TC_H_ROOT), "root");
        assert_eq!(u32_handle_text(0x8000_0000), "800:");
        assert_eq!(u32_handle_text(0x8000_0800), "800::800");
        assert_eq!(u32_handle_text(0x0020_a001), "2:a:1");
        let q = SavedObject {
            kind: "tbf".into(),
            parent: 0x1_0010,
            handle: 0x10_0000,
            info: 0,
            chain: None,
            attrs: vec![],
        };
        assert_eq!(describe(Role::Qdisc, &q), "qdisc tbf 10: parent 1:10");
        let f = SavedObject {
            kind: "u32".into(),
            parent: 0x1_0000,
            handle: 0x8000_0800,
            info: (1 << 16) | u32::from(u16::from_ne_bytes(0x0800u16.to_be_bytes())),
            chain: Some(0),
            attrs: nla(TCA_OPTIONS, &nla(5, &[0u8; 16])),
        };
        assert_eq!(describe(Role::Filter, &f), "filter u32 800::800 parent 1: chain 0 pref 1 protocol 0x0800");
        let instance = SavedObject { handle: 0x8010_0000, attrs: vec![], ..f };
        assert_eq!(
            describe(Role::Filter, &instance),
            "filter u32 (root table 801:) parent 1: chain 0 pref 1 protocol 0x0800"
        );
    }

    /// A random insertion history, its listing, and whether an order found
    /// from the listing reproduces it.
    fn round_trip(model: HashModel, rng: &mut StdRng, n: usize) {
        let mut keys: Vec<u32> = Vec::new();
        while keys.len() < n {
            let k = match model {
                HashModel::Qdisc => rng.random_range(1..0x200u32) << 16,
                HashModel::Class => 0x1_0000 | rng.random_range(1..0x400u32),
            };
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        // Dependencies point to something inserted earlier.
        let deps_by_key: Vec<Option<u32>> = (0..n)
            .map(|i| if i > 0 && rng.random_bool(0.6) { Some(keys[rng.random_range(0..i)]) } else { None })
            .collect();
        let listed = model.listing(&keys);
        let deps: Vec<Option<usize>> = listed
            .iter()
            .map(|k| {
                let i = keys.iter().position(|x| x == k).unwrap();
                deps_by_key[i].map(|d| listed.iter().position(|x| *x == d).unwrap())
            })
            .collect();
        let order = insertion_order(model, &listed, &deps);
        let mut seen = vec![false; n];
        for &i in &order {
            assert!(deps[i].is_none_or(|d| seen[d]), "{model:?}: dependency first");
            seen[i] = true;
        }
        let again: Vec<u32> = order.iter().map(|&i| listed[i]).collect();
        assert_eq!(model.listing(&again), listed, "{model:?}: history {keys:x?}");
    }

    #[test]
    fn creation_order_reproduces_the_kernels_listing() {
        let mut rng = StdRng::seed_from_u64(25);
        for n in 0..30 {
            for _ in 0..20 {
                round_trip(HashModel::Qdisc, &mut rng, n);
                round_trip(HashModel::Class, &mut rng, n);
            }
        }
    }

    #[test]
    fn listing_model_matches_what_the_kernel_showed() {
        // htb classes 1:1..1:13 created in ascending order; tc listed them so.
        let keys: Vec<u32> = (1..=0x13).map(|m| 0x1_0000 | m).collect();
        let listed: Vec<u32> = HashModel::Class.listing(&keys).iter().map(|k| k & 0xffff).collect();
        let mut expected = vec![0x11, 0x10, 0x13, 0x12];
        expected.extend(1..=0xf);
        assert_eq!(listed, expected);
        let handles: Vec<u32> = (2..=0x13).map(|m| m << 16).collect();
        let listed: Vec<u32> = HashModel::Qdisc.listing(&handles).iter().map(|k| k >> 16).collect();
        assert_eq!(listed, [2, 4, 6, 0xa, 8, 0xc, 0xe, 0x10, 0x12, 5, 3, 7, 9, 0xb, 0xf, 0xd, 0x11, 0x13]);
    }

    fn u32_entry(parent: u32, chain: u32, prio: u32, handle: u32, options: Vec<u8>) -> SavedObject {
        SavedObject {
            kind: "u32".into(),
            parent,
            handle,
            info: (prio << 16) | 8,
            chain: Some(chain),
            attrs: if options.is_empty() { vec![] } else { nla(TCA_OPTIONS, &options) },
        }
    }

    /// u32's id allocation as the kernel does it, driven by a plan: the id
    /// each bare instance and counted table got.
    fn allocate(tree: &SavedTree, ops: &[Op]) -> BTreeMap<usize, u32> {
        let mut fresh = true;
        let mut next = 1u32;
        let mut used = BTreeSet::new();
        let mut alloc = |used: &mut BTreeSet<u32>| {
            let mut id = next.max(1);
            while used.contains(&id) {
                id += 1;
            }
            used.insert(id);
            next = id + 1;
            id | 0x800
        };
        let mut got = BTreeMap::new();
        for op in ops {
            match op {
                Op::FilterBare(i) if tree.filters[*i].kind == "u32" => {
                    let id = if fresh { 0x800 } else { alloc(&mut used) };
                    fresh = false;
                    got.insert(*i, id);
                }
                Op::Filler(f) => {
                    let id = if f.table == 0 && fresh { 0x800 } else { alloc(&mut used) };
                    fresh = false;
                    if f.table != 0 {
                        assert_eq!(f.table >> 20, id, "placeholder table gets the id the plan expects");
                    }
                }
                Op::FilterAutoHandle(i) => {
                    got.insert(*i, alloc(&mut used));
                }
                Op::DropFiller(f) if f.table != 0 => {
                    used.remove(&((f.table >> 20) & 0x7ff));
                }
                _ => {}
            }
        }
        got
    }

    #[test]
    fn u32_ids_and_owners_come_out_as_saved_even_with_gaps() {
        let sel = || nla(5, &[0u8; 32]);
        let div = |d: u32| nla(4, &u32s(&[d]));
        // Priority 1 has three instances (1: chains 0 and 3, class 1:1),
        // roots 802:, 807: and 806:; each lists all three tables, newest
        // first, each followed by its key node.
        let prio1 = |parent: u32, chain: u32, root: u32| {
            let mut v = vec![u32_entry(parent, chain, 1, root << 20, vec![])];
            for t in [0x807u32, 0x806, 0x802] {
                v.push(u32_entry(parent, chain, 1, t << 20, div(1)));
                v.push(u32_entry(parent, chain, 1, (t << 20) | 0x800, sel()));
            }
            v
        };
        let mut filters = prio1(0x1_0000, 0, 0x802);
        filters.extend([
            // pref 3 (800:, the first; 801: was a deleted instance)
            u32_entry(0x1_0000, 0, 3, 0x8000_0000, vec![]),
            u32_entry(0x1_0000, 0, 3, 0x8000_0000, div(1)),
            u32_entry(0x1_0000, 0, 3, 0x8000_0800, sel()),
            // pref 5: root 803:, then table 2: (explicit), then 804: (counted)
            u32_entry(0x1_0000, 0, 5, 0x8030_0000, vec![]),
            u32_entry(0x1_0000, 0, 5, 0x8040_0000, div(4)),
            u32_entry(0x1_0000, 0, 5, 0x0020_0000, div(16)),
            u32_entry(0x1_0000, 0, 5, 0x0020_a800, sel()),
            u32_entry(0x1_0000, 0, 5, 0x8030_0000, div(1)),
            u32_entry(0x1_0000, 0, 5, 0x8030_0800, [sel(), nla(3, &u32s(&[0x0020_0000]))].concat()),
        ]);
        let chain3 = filters.len();
        filters.extend(prio1(0x1_0000, 3, 0x807));
        let class = filters.len();
        filters.extend(prio1(0x1_0001, 0, 0x806));
        let root = SavedObject {
            kind: "htb".into(),
            parent: TC_H_ROOT,
            handle: 0x1_0000,
            info: 0,
            chain: None,
            attrs: vec![],
        };
        let tree = SavedTree {
            version: FORMAT_VERSION,
            qdiscs: vec![root],
            classes: vec![],
            chains: vec![],
            filters,
            shared_actions: vec![],
        };
        let ops = plan(&tree);
        let got = allocate(&tree, &ops);
        let bare: Vec<usize> = (0..tree.filters.len()).filter(|&i| is_bare(&tree.filters[i])).collect();
        assert_eq!(bare.len(), 5);
        for i in bare {
            assert_eq!(
                got.get(&i),
                Some(&(tree.filters[i].handle >> 20)),
                "root of {}",
                describe(Role::Filter, &tree.filters[i])
            );
        }
        let counted = tree.filters.iter().position(|f| f.handle == 0x8040_0000).unwrap();
        assert_eq!(got[&counted], 0x804);
        let pos = |handle: u32| {
            ops.iter()
                .position(|o| matches!(o, Op::Filter(i) if tree.filters[*i].handle == handle))
                .unwrap_or_else(|| panic!("{handle:x} not created: {ops:?}"))
        };
        assert!(pos(0x0020_0000) < pos(0x8030_0800), "a table before the node linking to it");
        // Every key node once, through the instance whose root holds it.
        let nodes: Vec<&SavedObject> = ops
            .iter()
            .filter_map(|o| if let Op::Filter(i) = o { Some(&tree.filters[*i]) } else { None })
            .filter(|f| f.handle & 0xfff != 0)
            .collect();
        assert_eq!(nodes.len(), 6, "{nodes:?}");
        let node = |h: u32| nodes.iter().find(|f| f.handle == h).unwrap();
        assert_eq!((node(0x8070_0800).parent, node(0x8070_0800).chain), (tree.filters[chain3].parent, Some(3)));
        assert_eq!(node(0x8060_0800).parent, tree.filters[class].parent);
        assert_eq!((node(0x8020_0800).parent, node(0x8020_0800).chain), (0x1_0000, Some(0)));
        let last = ops.len() - 1;
        assert!(matches!(ops[last], Op::DropFiller(Filler { table: 0, .. })), "{ops:?}");
        assert!(matches!(ops[last - 1], Op::DropFiller(Filler { table: 0x8050_0000, .. })), "{ops:?}");
    }

    #[test]
    fn other_classifiers_are_created_oldest_first() {
        let bpf = |handle: u32| SavedObject {
            kind: "bpf".into(),
            parent: 0x1_0000,
            handle,
            info: 2 << 16,
            chain: Some(0),
            attrs: if handle == 0 { vec![] } else { nla(TCA_OPTIONS, &nla(3, &u32s(&[0x1_0020]))) },
        };
        let root = SavedObject {
            kind: "htb".into(),
            parent: TC_H_ROOT,
            handle: 0x1_0000,
            info: 0,
            chain: None,
            attrs: vec![],
        };
        let chain =
            SavedObject { kind: String::new(), parent: 0x1_0000, handle: 0, info: 0, chain: Some(0), attrs: vec![] };
        let tree = SavedTree {
            version: FORMAT_VERSION,
            qdiscs: vec![root],
            classes: vec![],
            chains: vec![chain],
            filters: vec![bpf(0), bpf(2), bpf(1)],
            shared_actions: vec![],
        };
        assert_eq!(plan(&tree), [Op::Qdisc(0), Op::Filter(2), Op::Filter(1)]);
    }

    #[test]
    fn shuffled_htb_classes_are_created_parents_first() {
        let mut rng = StdRng::seed_from_u64(14);
        let mut minors: Vec<u32> = (1..30).collect();
        minors.shuffle(&mut rng);
        let root = SavedObject {
            kind: "htb".into(),
            parent: TC_H_ROOT,
            handle: 0x1_0000,
            info: 0,
            chain: None,
            attrs: vec![],
        };
        let classes: Vec<SavedObject> = minors
            .iter()
            .map(|&m| SavedObject {
                kind: "htb".into(),
                parent: if m > 3 { 0x1_0000 | (m % 3 + 1) } else { TC_H_ROOT },
                handle: 0x1_0000 | m,
                info: 0,
                chain: None,
                attrs: vec![],
            })
            .collect();
        let tree = SavedTree {
            version: FORMAT_VERSION,
            qdiscs: vec![root],
            classes,
            chains: vec![],
            filters: vec![],
            shared_actions: vec![],
        };
        let mut made = BTreeSet::new();
        for op in plan(&tree) {
            if let Op::Class(i) = op {
                let c = &tree.classes[i];
                assert!(c.parent == TC_H_ROOT || made.contains(&c.parent), "{:x} before its parent", c.handle);
                made.insert(c.handle);
            }
        }
        assert_eq!(made.len(), 29);
    }
}
