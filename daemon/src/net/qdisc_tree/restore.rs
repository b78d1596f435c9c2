//! Carrying out a plan: removing the root and creating every object.

use super::*;

pub(super) fn remove_root(sock: &mut RouteSocket, ifindex: u32) -> Result<(), NetlinkError> {
    let root = crate::tc::qdiscs(sock, Some(ifindex))?.into_iter().find(|q| u32::from(q.parent) == TC_H_ROOT);
    let Some(root) = root else { return Ok(()) };
    if u32::from(root.handle) == 0 {
        return Ok(());
    }
    let mut msg = TcMessage::default();
    msg.header.index = ifindex as i32;
    msg.header.parent = TC_H_ROOT.into();
    msg.header.handle = root.handle;
    let what = format!("delete root qdisc {} on ifindex {ifindex}", handle_text(root.handle.into()));
    sock.request(&what, RouteNetlinkMessage::DelQueueDiscipline(msg), 0)
}

pub(super) fn tc_message(ifindex: u32, obj: &SavedObject, handle: u32, attrs: &[u8]) -> TcMessage {
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

pub(super) fn filler_object(f: &Filler) -> SavedObject {
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

pub(super) fn filler_table_options() -> Vec<u8> {
    const TCA_U32_DIVISOR: u16 = 4;
    let mut inner = Vec::new();
    push_nla(&mut inner, TCA_U32_DIVISOR, &1u32.to_ne_bytes());
    let mut attrs = Vec::new();
    push_nla(&mut attrs, TCA_OPTIONS, &inner);
    attrs
}

/// Runs one step; on failure, the object it concerned and the kernel's error.
pub(super) fn execute(
    sock: &mut RouteSocket,
    ifindex: u32,
    tree: &SavedTree,
    op: &Op,
) -> Result<(), (String, NetlinkError)> {
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
pub(super) fn remap_taken_actions(sock: &mut RouteSocket, tree: &SavedTree) -> SavedTree {
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

pub(super) fn action_exists(sock: &mut RouteSocket, kind: &str, index: u32) -> bool {
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
pub(super) fn visit_actions(f: &SavedObject, visit: &mut impl FnMut(&str, u32)) {
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
pub(super) fn action_identity(action: &[u8]) -> Option<(String, u32)> {
    let attrs = nlas(action);
    let kind = c_string(attrs.iter().find(|(ty, _)| ty & NLA_TYPE_MASK == 1)?.1);
    let opts = attrs.iter().find(|(ty, _)| ty & NLA_TYPE_MASK == 2)?.1;
    let layout = action_layout(&kind)?;
    let (index_at, _, _) = parms_offsets(&kind);
    let parms = nlas(opts).into_iter().find(|(ty, _)| ty & NLA_TYPE_MASK == layout.parms[0])?.1;
    let index = u32::from_ne_bytes(parms.get(index_at..index_at + 4)?.try_into().ok()?);
    Some((kind, index))
}

pub(super) fn rewrite_actions(f: &mut SavedObject, remap: &BTreeMap<(String, u32), u32>) {
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
