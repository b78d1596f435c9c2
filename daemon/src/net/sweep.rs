//! Removing what carries chaosd's marks but belongs to no journal entry
//! (the daemon died between the kernel and the journal, or the journal
//! was lost), at every start:
//!
//! - in the pinned maps: rule ids that no known experiment recorded (their
//!   index entries, peers and device shares), devices left without rules,
//!   and namespace program pins without devices;
//! - in every network namespace reachable on the host (see
//!   `target::reachable_namespaces`): chaosd's HTB root (handle
//!   `HTB_MAJOR:`, with its classes and netem leaves) or single classes of
//!   it, IFB devices named `chaosd-ifb<N>`, and chaosd's cls_bpf filters
//!   under clsact (the classifiers at `FILTER_PRIORITY`, the IFB redirect
//!   at `IFB_FILTER_PRIORITY`), unless a known experiment's journal
//!   objects account for them.
//!
//! Each of those carries its owner's label (see `crate::owner`): the IFB in
//! its alias, the filters in their name, the HTB root in a mark filter on a
//! chain nothing runs. What belongs to another daemon that is running is
//! never touched; what belongs to a daemon that is gone (or carries no
//! label, from a chaosd older than labels) is removed.
//!
//! A clsact qdisc carries no mark: one chaosd created and one the user
//! created before (possibly empty) look the same to the kernel, and
//! `ensure_clsact` does not record which it was. The sweep therefore
//! removes only chaosd's filters and leaves the clsact (inert once empty),
//! logging that it did so. A journal that still knows the experiment
//! (`NetObject::Clsact`) is what lets revert remove it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use chaosd_common::{DIR_EGRESS, DIR_INGRESS, HTB_MAJOR};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcHandle, TcMessage},
};
use serde_json::Value;

use super::{
    bpf::{self, AttachKind, Datapath},
    maps as rulemaps,
    objects::NetObject,
    shaping,
    target::{self, FoundNs},
};
use crate::{
    driver::decode_records,
    experiment::Experiment,
    netlink::{NetlinkError, RouteSocket},
    owner::{Owner, Whose},
    tc,
};

pub fn sweep(dp: &Datapath, owner: &Owner, known: &[(Experiment, Vec<Value>)]) -> Vec<String> {
    let mut objects = Vec::new();
    for (exp, records) in known {
        match decode_records::<NetObject>("network", records) {
            Ok(o) => objects.extend(o),
            // What is chaosd's and not accounted for cannot be told apart
            // from what this experiment holds: sweep nothing.
            Err(e) => {
                tracing::error!(id = %exp.id, error = %e, "not sweeping: a known experiment's records do not decode");
                return Vec::new();
            }
        }
    }
    let mut removed = sweep_maps(dp, &objects);
    removed.extend(sweep_namespaces(owner, &objects));
    removed
}

/// Rule ids, links and pins in the maps under the daemon's bpffs directory.
fn sweep_maps(dp: &Datapath, known: &[NetObject]) -> Vec<String> {
    let known_ids: BTreeSet<u32> =
        known.iter().filter_map(|o| if let NetObject::Rule { rule, .. } = o { Some(*rule) } else { None }).collect();
    let mut removed = Vec::new();
    let mut maps = dp.lock();
    let orphans = rulemaps::unknown_rules(&maps, &known_ids);
    if orphans.is_empty() {
        return removed;
    }
    for dk in rulemaps::remove_unplaced(&mut maps, &orphans) {
        let _ = bpf::unpin_link(&dp.link_pin(dk.netns, dk.ifindex, dk.dir as u8));
        removed.push(format!("classifier on ifindex {} of netns {}", dk.ifindex, dk.netns));
    }
    removed.extend(orphans.iter().map(|id| format!("rule {id}")));
    let live_ns: BTreeSet<u32> = maps.devices.keys().filter_map(Result::ok).map(|k| k.netns).collect();
    drop(maps);
    for netns in dp.pinned_namespaces() {
        if !live_ns.contains(&netns) && dp.remove_programs(netns).is_ok() {
            removed.push(format!("programs of netns {netns}"));
        }
    }
    removed
}

/// What the known experiments hold in one namespace (names are device
/// names inside it).
#[derive(Debug, Default)]
struct Owned {
    ifbs: BTreeSet<String>,
    /// Devices whose IFB redirect filter is owned.
    ifb_feeds: BTreeSet<String>,
    htbs: BTreeSet<String>,
    classes: BTreeSet<(String, u32)>,
    /// (ifindex, direction) of devices whose classifier a known rule
    /// uses (as a cls_bpf filter on kernels without TCX).
    filters: BTreeSet<(u32, u8)>,
    clsacts: BTreeSet<String>,
}

fn owned_by_namespace(known: &[NetObject]) -> BTreeMap<u32, Owned> {
    let mut out: BTreeMap<u32, Owned> = BTreeMap::new();
    for o in known.iter().cloned() {
        match o {
            NetObject::Ifb { netns, name, for_ifname } => {
                let e = out.entry(netns).or_default();
                e.ifbs.insert(name);
                e.ifb_feeds.insert(for_ifname);
            }
            NetObject::Htb { netns, ifname } => {
                out.entry(netns).or_default().htbs.insert(ifname);
            }
            NetObject::Class { netns, ifname, classid } => {
                out.entry(netns).or_default().classes.insert((ifname, classid));
            }
            NetObject::Attach { netns, ifindex, dir, how: AttachKind::Clsact, .. } => {
                out.entry(netns).or_default().filters.insert((ifindex, dir));
            }
            NetObject::Clsact { netns, ifname, .. } => {
                out.entry(netns).or_default().clsacts.insert(ifname);
            }
            // Only the experiment that attached a device's classifier
            // records the Attach; every rule on the device uses it.
            NetObject::Rule { netns, devices, egress, ingress, .. } => {
                let e = out.entry(netns).or_default();
                for (ifindex, _) in devices {
                    for (on, dir) in [(egress, DIR_EGRESS), (ingress, DIR_INGRESS)] {
                        if on {
                            e.filters.insert((ifindex, dir));
                        }
                    }
                }
            }
            NetObject::Attach { .. } | NetObject::Programs { .. } | NetObject::SavedRoot { .. } => {}
        }
    }
    out
}

/// Visits every reachable namespace on its own thread and removes what
/// chaosd marked there and no known experiment accounts for.
fn sweep_namespaces(owner: &Owner, known: &[NetObject]) -> Vec<String> {
    let started = Instant::now();
    let owned = owned_by_namespace(known);
    let nobody = Owned::default();
    let found = target::reachable_namespaces();
    let mut removed = Vec::new();
    for ns in &found {
        let mine = owned.get(&ns.inode).unwrap_or(&nobody);
        // A namespace that vanished before its thread entered it had
        // nothing left to sweep.
        let Ok(outcome) = ns.netns().run(|| sweep_here(owner, mine)) else { continue };
        let place = place(ns);
        removed.extend(outcome.removed.into_iter().map(|r| format!("{r} in network namespace {place}")));
        for note in outcome.kept_clsact {
            tracing::info!(
                netns = %place,
                device = %note,
                "left the clsact qdisc after removing chaosd's filters: nothing tells whether chaosd or the user \
                 created it (it holds no filter now)"
            );
        }
        for e in outcome.errors {
            tracing::warn!(netns = %place, error = %e, "sweeping chaosd's leftovers");
        }
    }
    tracing::info!(
        namespaces = found.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "swept network namespaces for chaosd's qdiscs, filters and IFB devices"
    );
    removed
}

fn place(ns: &FoundNs) -> String {
    format!("{} ({})", ns.inode, ns.label)
}

#[derive(Debug, Default)]
struct Outcome {
    removed: Vec<String>,
    /// Devices whose clsact is left empty after chaosd's filters went.
    kept_clsact: Vec<String>,
    errors: Vec<String>,
}

/// The object is gone already (or went while we looked).
fn gone(e: &NetlinkError) -> bool {
    matches!(e.errno(), Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::EINVAL))
}

/// A cls_bpf filter chaosd attaches: its name starts with "chaosd_"
/// (followed by its owner's label) and it sits at one of chaosd's two
/// priorities.
fn chaosd_filter(f: &TcMessage) -> Option<String> {
    if tc::kind_of(&f.attributes) != "bpf" {
        return None;
    }
    let prio = (f.header.info >> 16) as u16;
    if prio != bpf::FILTER_PRIORITY && prio != shaping::IFB_FILTER_PRIORITY {
        return None;
    }
    shaping::bpf_filter_name(f).filter(|n| n.starts_with("chaosd_"))
}

/// Runs on a thread inside one namespace. What carries another running
/// daemon's label is left alone; what carries a dead daemon's (or no
/// label) goes; what carries ours goes unless a known experiment owns it.
fn sweep_here(owner: &Owner, owned: &Owned) -> Outcome {
    let mut out = Outcome::default();
    let mut sock = match RouteSocket::open() {
        Ok(s) => s,
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    let (links, qdiscs) = match (tc::links(&mut sock), tc::qdiscs(&mut sock, None)) {
        (Ok(l), Ok(q)) => (l, q),
        (Err(e), _) | (_, Err(e)) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    let name_of = |ifindex: u32| links.iter().find(|l| l.ifindex == ifindex).map(|l| l.name.clone());

    // 1. chaosd's filters under clsact, first: nothing is steered to an
    //    IFB or class that is about to go.
    for q in qdiscs.iter().filter(|q| q.kind == "clsact") {
        let Some(dev) = name_of(q.ifindex) else { continue };
        let mut took = 0;
        let mut left = 0;
        for (dir, parent) in [(DIR_EGRESS, tc::CLSACT_EGRESS), (DIR_INGRESS, tc::CLSACT_INGRESS)] {
            let req = tc::tc_message(q.ifindex, parent, tc::NO_HANDLE);
            let filters = match sock.dump(&format!("dump filters of {dev}"), RouteNetlinkMessage::GetTrafficFilter(req))
            {
                Ok(f) => f,
                Err(e) => {
                    if !gone(&e) {
                        out.errors.push(e.to_string());
                    }
                    left += 1;
                    continue;
                }
            };
            for m in filters {
                let RouteNetlinkMessage::NewTrafficFilter(f) = m else { continue };
                if f.header.index as u32 != q.ifindex {
                    continue;
                }
                // Each priority also dumps a header entry without a handle.
                if f.header.handle == (tc::NO_HANDLE) {
                    continue;
                }
                let Some(name) = chaosd_filter(&f) else {
                    left += 1;
                    continue;
                };
                let prio = (f.header.info >> 16) as u16;
                if !sweepable_or_mine(owner, &name) {
                    left += 1;
                    continue;
                }
                let ours = owner.whose(&name) == Whose::Mine
                    && if prio == shaping::IFB_FILTER_PRIORITY {
                        owned.ifb_feeds.contains(&dev)
                    } else {
                        owned.filters.contains(&(q.ifindex, dir))
                    };
                if ours {
                    left += 1;
                    continue;
                }
                let mut del = tc::tc_message(q.ifindex, parent, f.header.handle);
                del.header.info = f.header.info;
                del.attributes.push(TcAttribute::Kind("bpf".into()));
                let side = if dir == DIR_EGRESS { "egress" } else { "ingress" };
                match sock.request(
                    &format!("delete filter {name} from {dev} {side}"),
                    RouteNetlinkMessage::DelTrafficFilter(del),
                    0,
                ) {
                    Ok(()) => {
                        took += 1;
                        out.removed.push(format!("cls_bpf filter {name} (prio {prio:#x}) on {dev} {side}"));
                    }
                    Err(e) if gone(&e) => {}
                    Err(e) => {
                        left += 1;
                        out.errors.push(e.to_string());
                    }
                }
            }
        }
        if took > 0 && left == 0 && !owned.clsacts.contains(&dev) {
            out.kept_clsact.push(dev);
        }
    }

    // 2. IFB devices (their qdiscs go with them).
    let mut deleted = BTreeSet::new();
    for l in links.iter().filter(|l| l.ifb && l.name.starts_with(shaping::IFB_PREFIX)) {
        let whose = l.alias.as_deref().map_or(Whose::Unlabelled, |a| owner.whose(a));
        if matches!(whose, Whose::Live(_)) || (whose == Whose::Mine && owned.ifbs.contains(&l.name)) {
            continue;
        }
        match tc::link_del_by_name(&mut sock, &l.name) {
            Ok(()) => {
                deleted.insert(l.ifindex);
                out.removed.push(format!("IFB device {}", l.name));
            }
            Err(e) if gone(&e) => {}
            Err(e) => out.errors.push(e.to_string()),
        }
    }

    // 3. chaosd's HTB roots; under a known root, classes nobody owns.
    for q in qdiscs.iter().filter(|q| shaping::is_htb_root(q)) {
        if deleted.contains(&q.ifindex) {
            continue;
        }
        let Some(dev) = name_of(q.ifindex) else { continue };
        let whose = match shaping::htb_mark(&mut sock, q.ifindex) {
            Ok(mark) => mark.as_deref().map_or(Whose::Unlabelled, |m| owner.whose(m)),
            Err(e) => {
                if !gone(&e) {
                    out.errors.push(e.to_string());
                }
                continue;
            }
        };
        if matches!(whose, Whose::Live(_)) {
            continue;
        }
        if whose != Whose::Mine || !owned.htbs.contains(&dev) {
            match tc::qdisc_del(&mut sock, q.ifindex, TcHandle::ROOT, q.handle) {
                Ok(()) => out.removed.push(format!("HTB root {HTB_MAJOR:x}: on {dev} (with its classes and leaves)")),
                Err(e) if gone(&e) => {}
                Err(e) => out.errors.push(e.to_string()),
            }
            continue;
        }
        let req = tc::tc_message(q.ifindex, tc::NO_HANDLE, tc::NO_HANDLE);
        let classes = match sock.dump(&format!("dump classes of {dev}"), RouteNetlinkMessage::GetTrafficClass(req)) {
            Ok(c) => c,
            Err(e) => {
                if !gone(&e) {
                    out.errors.push(e.to_string());
                }
                continue;
            }
        };
        for m in classes {
            let RouteNetlinkMessage::NewTrafficClass(c) = m else { continue };
            let h = c.header.handle;
            if c.header.index as u32 != q.ifindex || h.major != HTB_MAJOR || h.minor <= shaping::DEFAULT_MINOR {
                continue;
            }
            let classid = ((h.major as u32) << 16) | h.minor as u32;
            if owned.classes.contains(&(dev.clone(), classid)) {
                continue;
            }
            let del = tc::tc_message(q.ifindex, TcHandle { major: HTB_MAJOR, minor: 0 }, h);
            match sock.request(
                &format!("delete class {:x}:{:x} on {dev}", h.major, h.minor),
                RouteNetlinkMessage::DelTrafficClass(del),
                0,
            ) {
                Ok(()) => out.removed.push(format!("HTB class {:x}:{:x} on {dev}", h.major, h.minor)),
                Err(e) if gone(&e) => {}
                Err(e) => out.errors.push(e.to_string()),
            }
        }
    }
    out
}

/// Whether a labelled object may be looked at for removal: ours (then the
/// journal decides) or a dead daemon's; never a running daemon's.
fn sweepable_or_mine(owner: &Owner, label: &str) -> bool {
    let whose = owner.whose(label);
    whose == Whose::Mine || whose.sweepable()
}
