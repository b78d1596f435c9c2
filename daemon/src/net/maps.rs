//! Entering a compiled rule into the maps and taking it out again. Callers
//! hold the maps lock, so two rules never race on a slot or a DevConf.

use std::collections::{BTreeMap, BTreeSet};

use chaosd_common::{ACTION_NONE, DevConf, DevKey, IndexKey, MAX_RULES, Rule, SLOT_RULES, mask_bit};

use super::{
    bpf::{BpfError, Datapath, Maps, peer_key},
    rules::{self, Compiled},
};

/// Where a rule is entered: namespace, devices, directions.
pub struct Placement<'a> {
    pub netns: u32,
    pub ifindexes: &'a [u32],
    pub dirs: &'a [u8],
}

fn index_keys<'a>(c: &'a Compiled, at: &'a Placement<'a>) -> impl Iterator<Item = (usize, DevKey, IndexKey)> + 'a {
    at.ifindexes.iter().flat_map(move |&ifindex| {
        at.dirs.iter().flat_map(move |&dir| {
            c.tables.iter().enumerate().flat_map(move |(ti, t)| {
                t.ports().map(move |port| {
                    (
                        ti,
                        DevKey { netns: at.netns, ifindex, dir: dir as u32 },
                        IndexKey {
                            netns: at.netns,
                            ifindex,
                            dir,
                            proto: t.proto,
                            role: t.role,
                            _pad: 0,
                            port,
                            _pad2: 0,
                        },
                    )
                })
            })
        })
    })
}

pub fn alloc_id(maps: &mut Maps) -> Option<u32> {
    let id = (1..MAX_RULES).find(|id| !maps.used_ids.contains(id))?;
    maps.used_ids.insert(id);
    Some(id)
}

/// A slot that has no room: (key, the rule ids already there).
#[derive(Debug)]
pub struct SlotFull {
    pub key: IndexKey,
    pub rules: [u32; SLOT_RULES],
}

/// Enters rule `id`. Returns the (device, direction) pairs that had no
/// rule before (they need the classifier attached), or the first full slot.
pub fn install(
    maps: &mut Maps,
    id: u32,
    c: &Compiled,
    at: &Placement<'_>,
) -> Result<Result<Vec<DevKey>, SlotFull>, BpfError> {
    // Check room first, so that a refusal changes nothing.
    for (_, _, key) in index_keys(c, at) {
        if let Ok(slot) = maps.index.get(&key, 0)
            && !slot.rules.contains(&0)
        {
            return Ok(Err(SlotFull { key, rules: slot.rules }));
        }
    }
    Datapath::reset_stats(maps, id)?;
    maps.rules.set(id, c.rule, 0).map_err(|source| BpfError::Map { map: "RULES", source })?;
    for (len, addr) in &c.peers {
        maps.peers.insert(&peer_key(id, *len, *addr), 1, 0).map_err(|source| BpfError::Map { map: "PEERS", source })?;
    }
    for (_, _, key) in index_keys(c, at) {
        let mut slot = maps.index.get(&key, 0).unwrap_or_default();
        if let Some(free) = slot.rules.iter_mut().find(|r| **r == 0) {
            *free = id;
        }
        maps.index.insert(key, slot, 0).map_err(|source| BpfError::Map { map: "INDEX", source })?;
    }
    let mut fresh = Vec::new();
    for &ifindex in at.ifindexes {
        for &dir in at.dirs {
            let dk = DevKey { netns: at.netns, ifindex, dir: dir as u32 };
            let mut conf = maps.devices.get(&dk, 0).unwrap_or_default();
            if conf.users.iter().all(|u| *u == 0) {
                fresh.push(dk);
            }
            for t in &c.tables {
                conf.users[t.slot()] += 1;
                conf.mask |= mask_bit(t.slot() >= 3, t.role);
            }
            maps.devices.insert(dk, conf, 0).map_err(|source| BpfError::Map { map: "DEVICES", source })?;
        }
    }
    Ok(Ok(fresh))
}

/// Sets the IFB a device's ingress rules redirect to.
pub fn set_ifb(maps: &mut Maps, dk: DevKey, ifb_ifindex: u32) -> Result<(), BpfError> {
    let mut conf: DevConf = maps.devices.get(&dk, 0).unwrap_or_default();
    conf.ifb_ifindex = ifb_ifindex;
    maps.devices.insert(dk, conf, 0).map_err(|source| BpfError::Map { map: "DEVICES", source })
}

/// Takes rule `id` out again (idempotent). Returns the (device, direction)
/// pairs left without any rule (their classifier can be detached).
pub fn remove(maps: &mut Maps, id: u32, c: &Compiled, at: &Placement<'_>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut present = std::collections::HashSet::new();
    for (ti, dk, key) in index_keys(c, at) {
        let Ok(mut slot) = maps.index.get(&key, 0) else { continue };
        if !slot.rules.contains(&id) {
            continue;
        }
        present.insert((dk, ti));
        for r in slot.rules.iter_mut() {
            if *r == id {
                *r = 0;
            }
        }
        let res =
            if slot.rules.iter().all(|r| *r == 0) { maps.index.remove(&key) } else { maps.index.insert(key, slot, 0) };
        if let Err(e) = res {
            errors.push(format!("BPF map INDEX: {e}"));
        }
    }
    for (dk, ti) in present {
        let slot_ix = c.tables[ti].slot();
        let Ok(mut conf) = maps.devices.get(&dk, 0) else { continue };
        conf.users[slot_ix] = conf.users[slot_ix].saturating_sub(1);
        if conf.users[slot_ix] == 0 {
            conf.mask &= !(1 << slot_ix);
        }
        let res = if conf.users.iter().all(|u| *u == 0) {
            maps.devices.remove(&dk)
        } else {
            maps.devices.insert(dk, conf, 0)
        };
        if let Err(e) = res {
            errors.push(format!("BPF map DEVICES: {e}"));
        }
    }
    // A DevConf without users (e.g. an IFB set before a failed install)
    // must not keep the device counted as in use.
    for &ifindex in at.ifindexes {
        for &dir in at.dirs {
            let dk = DevKey { netns: at.netns, ifindex, dir: dir as u32 };
            if maps.devices.get(&dk, 0).is_ok_and(|c| c.users.iter().all(|u| *u == 0)) {
                let _ = maps.devices.remove(&dk);
            }
        }
    }
    for (len, addr) in &c.peers {
        let _ = maps.peers.remove(&peer_key(id, *len, *addr));
    }
    if let Err(e) = maps.rules.set(id, Rule::default(), 0) {
        errors.push(format!("BPF map RULES: {e}"));
    }
    maps.used_ids.remove(&id);
    errors
}

/// Whether a device still has rules in a direction.
pub fn device_in_use(maps: &Maps, dk: &DevKey) -> bool {
    maps.devices.get(dk, 0).is_ok()
}

/// Whether any device of a namespace still has rules.
pub fn netns_in_use(maps: &Maps, netns: u32) -> bool {
    maps.devices.keys().filter_map(Result::ok).any(|k| k.netns == netns)
}

/// Rule ids in use in the kernel's maps that `known` does not hold (left
/// by a daemon that died between the kernel and the journal).
pub fn unknown_rules(maps: &Maps, known: &BTreeSet<u32>) -> Vec<u32> {
    (1..MAX_RULES)
        .filter(|id| !known.contains(id))
        .filter(|id| maps.rules.get(id, 0).map(|r| r.action != ACTION_NONE).unwrap_or(false))
        .collect()
}

/// Takes rules whose placement is not known (no journal entry) out of
/// every map: their index entries, the device shares recounted from what
/// is left, their peers and their slots. Returns the (device, direction)
/// pairs left without any rule, whose DevConf is gone (their classifier
/// can be detached). Best effort: a map entry that cannot be written is
/// left for the next sweep.
pub fn remove_unplaced(maps: &mut Maps, ids: &[u32]) -> Vec<DevKey> {
    let keys: Vec<_> = maps.index.keys().filter_map(Result::ok).collect();
    let mut users: BTreeMap<DevKey, BTreeMap<usize, BTreeSet<u32>>> = BTreeMap::new();
    for key in keys {
        let Ok(mut slot) = maps.index.get(&key, 0) else { continue };
        for r in slot.rules.iter_mut() {
            if ids.contains(r) {
                *r = 0;
            }
        }
        let dk = DevKey { netns: key.netns, ifindex: key.ifindex, dir: key.dir as u32 };
        let table = rules::device_slot(key.proto, key.role);
        for r in slot.rules.iter().filter(|r| **r != 0) {
            users.entry(dk).or_default().entry(table).or_default().insert(*r);
        }
        let _ =
            if slot.rules.iter().all(|r| *r == 0) { maps.index.remove(&key) } else { maps.index.insert(key, slot, 0) };
    }
    let mut unused = Vec::new();
    let devs: Vec<_> = maps.devices.keys().filter_map(Result::ok).collect();
    for dk in devs {
        let old = maps.devices.get(&dk, 0).unwrap_or_default();
        match users.get(&dk) {
            None => {
                let _ = maps.devices.remove(&dk);
                unused.push(dk);
            }
            Some(tables) => {
                let mut conf = DevConf { ifb_ifindex: old.ifb_ifindex, ..Default::default() };
                for (t, ids) in tables {
                    conf.users[*t] = ids.len() as u16;
                    conf.mask |= 1 << t;
                }
                let _ = maps.devices.insert(dk, conf, 0);
            }
        }
    }
    let peer_keys: Vec<_> = maps.peers.keys().filter_map(Result::ok).collect();
    for k in peer_keys {
        if ids.contains(&u32::from_ne_bytes(k.data().rule)) {
            let _ = maps.peers.remove(&k);
        }
    }
    for id in ids {
        let _ = maps.rules.set(*id, Rule::default(), 0);
        maps.used_ids.remove(id);
    }
    unused
}
