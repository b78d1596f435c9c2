//! Planning the order in which a saved tree is created again.

use super::*;

/// One step of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
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
pub(super) struct Filler {
    pub(super) parent: u32,
    pub(super) chain: u32,
    pub(super) prio: u16,
    /// 0 for the instance, the expected id for a hash table.
    pub(super) table: u32,
}

pub(super) fn plan(tree: &SavedTree) -> Vec<Op> {
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

pub(super) fn plan_classes(tree: &SavedTree, qdisc: usize, ops: &mut Vec<Op>) {
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
pub(super) struct Instance {
    pub(super) parent: u32,
    pub(super) chain: u32,
    pub(super) info: u32,
    pub(super) kind: String,
    pub(super) entries: Vec<usize>,
}

pub(super) fn instances(tree: &SavedTree) -> Vec<Instance> {
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
pub(super) fn is_bare(f: &SavedObject) -> bool {
    (f.handle == 0 || f.kind == "u32") && !nlas(&f.attrs).iter().any(|(ty, _)| ty & NLA_TYPE_MASK == TCA_OPTIONS)
}

pub(super) fn plan_filters(tree: &SavedTree, ops: &mut Vec<Op>) {
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
pub(super) fn plan_instance(tree: &SavedTree, t: &Instance, ops: &mut Vec<Op>) {
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
pub(super) fn plan_u32(tree: &SavedTree, major: u32, ops: &mut Vec<Op>) {
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
