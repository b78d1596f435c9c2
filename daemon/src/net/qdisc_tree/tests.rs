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
    let q =
        SavedObject { kind: "htb".into(), parent: TC_H_ROOT, handle: 0x1_0000, info: 0, chain: None, attrs: vec![] };
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
    let q =
        SavedObject { kind: "tbf".into(), parent: 0x1_0010, handle: 0x10_0000, info: 0, chain: None, attrs: vec![] };
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
    let deps_by_key: Vec<Option<u32>> =
        (0..n).map(|i| if i > 0 && rng.random_bool(0.6) { Some(keys[rng.random_range(0..i)]) } else { None }).collect();
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
    let root =
        SavedObject { kind: "htb".into(), parent: TC_H_ROOT, handle: 0x1_0000, info: 0, chain: None, attrs: vec![] };
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
    let root =
        SavedObject { kind: "htb".into(), parent: TC_H_ROOT, handle: 0x1_0000, info: 0, chain: None, attrs: vec![] };
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
    let root =
        SavedObject { kind: "htb".into(), parent: TC_H_ROOT, handle: 0x1_0000, info: 0, chain: None, attrs: vec![] };
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
