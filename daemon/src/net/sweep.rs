//! Removing what carries chaosd's marks but belongs to no journal entry:
//! rule ids in the maps that no known experiment recorded (their index
//! entries, peers and device shares), devices left without rules, and
//! namespace program pins without devices.

use std::collections::{BTreeMap, BTreeSet};

use chaosd_common::{ACTION_NONE, DevConf, DevKey, MAX_RULES, Rule, mask_bit};
use serde_json::Value;

use super::{
    bpf::{self, Datapath},
    objects::NetObject,
};
use crate::experiment::Experiment;

pub fn sweep(dp: &Datapath, known: &[(Experiment, Vec<Value>)]) -> Vec<String> {
    let known_ids: BTreeSet<u32> = known
        .iter()
        .flat_map(|(_, objs)| objs.iter().filter_map(NetObject::from_value))
        .filter_map(|o| if let NetObject::Rule { rule, .. } = o { Some(rule) } else { None })
        .collect();
    let mut removed = Vec::new();
    let mut maps = dp.lock();
    let orphans: Vec<u32> = (1..MAX_RULES)
        .filter(|id| !known_ids.contains(id))
        .filter(|id| maps.rules.get(id, 0).map(|r| r.action != ACTION_NONE).unwrap_or(false))
        .collect();
    if orphans.is_empty() {
        return removed;
    }
    // Index entries: drop orphan ids, and recount who uses each device.
    let keys: Vec<_> = maps.index.keys().filter_map(Result::ok).collect();
    let mut users: BTreeMap<DevKey, BTreeMap<usize, BTreeSet<u32>>> = BTreeMap::new();
    for key in keys {
        let Ok(mut slot) = maps.index.get(&key, 0) else { continue };
        for r in slot.rules.iter_mut() {
            if orphans.contains(r) {
                *r = 0;
            }
        }
        let dk = DevKey { netns: key.netns, ifindex: key.ifindex, dir: key.dir as u32 };
        let table = (key.proto == 0) as usize * 3 + key.role as usize;
        for r in slot.rules.iter().filter(|r| **r != 0) {
            users.entry(dk).or_default().entry(table).or_default().insert(*r);
        }
        let _ =
            if slot.rules.iter().all(|r| *r == 0) { maps.index.remove(&key) } else { maps.index.insert(key, slot, 0) };
    }
    let devs: Vec<_> = maps.devices.keys().filter_map(Result::ok).collect();
    for dk in devs {
        let old = maps.devices.get(&dk, 0).unwrap_or_default();
        match users.get(&dk) {
            None => {
                let _ = maps.devices.remove(&dk);
                let _ = bpf::unpin_link(&dp.link_pin(dk.netns, dk.ifindex, dk.dir as u8));
                removed.push(format!("classifier on ifindex {} of netns {}", dk.ifindex, dk.netns));
            }
            Some(tables) => {
                let mut conf = DevConf { ifb_ifindex: old.ifb_ifindex, ..Default::default() };
                for (t, ids) in tables {
                    conf.users[*t] = ids.len() as u16;
                    conf.mask |= mask_bit(*t >= 3, (*t % 3) as u8);
                }
                let _ = maps.devices.insert(dk, conf, 0);
            }
        }
    }
    let peer_keys: Vec<_> = maps.peers.keys().filter_map(Result::ok).collect();
    for k in peer_keys {
        if orphans.contains(&u32::from_ne_bytes(k.data().rule)) {
            let _ = maps.peers.remove(&k);
        }
    }
    for id in &orphans {
        let _ = maps.rules.set(*id, Rule::default(), 0);
        maps.used_ids.remove(id);
        removed.push(format!("rule {id}"));
    }
    let live_ns: BTreeSet<u32> = maps.devices.keys().filter_map(Result::ok).map(|k| k.netns).collect();
    drop(maps);
    for netns in dp.pinned_namespaces() {
        if !live_ns.contains(&netns) && dp.remove_programs(netns).is_ok() {
            removed.push(format!("programs of netns {netns}"));
        }
    }
    removed
}
