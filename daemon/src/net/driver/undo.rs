//! Taking a network fault out again: its rule out of the maps, then what
//! no other rule needs any more (classifiers, clsact, shaping, programs).
//! Used by revert, by the roll-back of a failed apply and by adopt's
//! bookkeeping of users' saved root trees.

use std::{collections::BTreeSet, path::PathBuf};

use chaosd_common::{DIR_EGRESS, DIR_INGRESS, DevKey};

use super::NetworkDriver;
use crate::{
    experiment::Experiment,
    net::{
        bpf::{self, AttachKind},
        maps::{self as rulemaps, Placement},
        objects::NetObject,
        rules, shaping, target,
    },
    spec::Fault,
};

impl NetworkDriver {
    pub(super) fn undo(&self, exp: &Experiment, objects: &[NetObject]) -> Vec<String> {
        let mut errors = Vec::new();
        let ns = target::resolve(&exp.target).ok();
        let ns_alive = |netns: u32| ns.as_ref().filter(|t| t.inode == netns);
        // 1. Rules out of the maps.
        for o in objects {
            if let NetObject::Rule { netns, rule, devices, egress, ingress, classid } = o {
                let Fault::Network(fault) = &exp.fault else { continue };
                let compiled = match rules::compile(fault, *classid, 0) {
                    Ok(c) => c,
                    Err(e) => {
                        errors.push(format!("rule {rule}: {e}"));
                        continue;
                    }
                };
                let dirs: Vec<u8> = [(*egress, DIR_EGRESS), (*ingress, DIR_INGRESS)]
                    .into_iter()
                    .filter_map(|(on, d)| on.then_some(d))
                    .collect();
                let ifindexes: Vec<u32> = devices.iter().map(|d| d.0).collect();
                let at = Placement { netns: *netns, ifindexes: &ifindexes, dirs: &dirs };
                errors.extend(rulemaps::remove(&mut self.dp.lock(), *rule, &compiled, &at));
            }
        }
        // 2. Kernel objects in the namespace that no rule needs any more.
        let mut detach: Vec<(String, u8, AttachKind, PathBuf)> = Vec::new();
        let mut clsact: Vec<String> = Vec::new();
        let mut netns_ids = BTreeSet::new();
        {
            let maps = self.dp.lock();
            for o in objects {
                match o {
                    NetObject::Attach { netns, ifindex, ifname, dir, how } => {
                        netns_ids.insert(*netns);
                        let dk = DevKey { netns: *netns, ifindex: *ifindex, dir: *dir as u32 };
                        if !rulemaps::device_in_use(&maps, &dk) {
                            detach.push((ifname.clone(), *dir, *how, self.dp.link_pin(*netns, *ifindex, *dir)));
                        }
                    }
                    NetObject::Clsact { netns, ifindex, ifname } => {
                        let used = [DIR_EGRESS, DIR_INGRESS].iter().any(|d| {
                            rulemaps::device_in_use(&maps, &DevKey { netns: *netns, ifindex: *ifindex, dir: *d as u32 })
                        });
                        if !used {
                            clsact.push(ifname.clone());
                        }
                    }
                    NetObject::Programs { netns } => {
                        netns_ids.insert(*netns);
                    }
                    // Only the experiment that attached a device's classifier
                    // records the Attach, and it may be recovered while others
                    // still use it: so the last rule out of a device and
                    // direction detaches it, whoever attached it.
                    NetObject::Rule { netns, devices, egress, ingress, .. } => {
                        netns_ids.insert(*netns);
                        let how = self.attach_kind();
                        for (ifindex, ifname) in devices {
                            for (on, dir) in [(*egress, DIR_EGRESS), (*ingress, DIR_INGRESS)] {
                                let dk = DevKey { netns: *netns, ifindex: *ifindex, dir: dir as u32 };
                                if on && !rulemaps::device_in_use(&maps, &dk) {
                                    detach.push((ifname.clone(), dir, how, self.dp.link_pin(*netns, *ifindex, dir)));
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        detach.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        detach.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        // TCX links go with their pins, wherever the namespace is.
        for (_, _, how, pin) in &detach {
            if *how == AttachKind::Tcx
                && let Err(e) = bpf::unpin_link(pin)
            {
                errors.push(e.to_string());
            }
        }
        let shaping_objs: Vec<NetObject> = objects
            .iter()
            .filter(|o| {
                matches!(
                    o,
                    NetObject::Htb { .. }
                        | NetObject::Class { .. }
                        | NetObject::Ifb { .. }
                        | NetObject::SavedRoot { .. }
                )
            })
            .cloned()
            .collect();
        let needs_ns =
            !shaping_objs.is_empty() || !clsact.is_empty() || detach.iter().any(|d| d.2 == AttachKind::Clsact);
        // Every object of one experiment lives in the same namespace.
        let ns_inode = objects.first().map(|o| match o {
            NetObject::Rule { netns, .. } | NetObject::Programs { netns } => *netns,
            NetObject::Attach { netns, .. } | NetObject::Clsact { netns, .. } => *netns,
            NetObject::Htb { netns, .. }
            | NetObject::Class { netns, .. }
            | NetObject::Ifb { netns, .. }
            | NetObject::SavedRoot { netns, .. } => *netns,
        });
        if needs_ns && let Some(t) = ns_inode.and_then(ns_alive) {
            let owner = &self.config.owner;
            let res = t.netns.run(move || {
                let mut errs = Vec::new();
                for (ifname, dir, how, _) in &detach {
                    if *how == AttachKind::Clsact
                        && let Err(e) = bpf::detach_filter(ifname, *dir, &owner.label(bpf::prog_name(*dir)))
                    {
                        errs.push(e.to_string());
                    }
                }
                errs.extend(shaping::undo_here(&shaping_objs));
                for ifname in &clsact {
                    if let Err(e) = shaping::remove_clsact_if_empty(ifname) {
                        errs.push(e.to_string());
                    }
                }
                errs
            });
            // An Err: the namespace is gone, and everything in it with it.
            if let Ok(errs) = res {
                errors.extend(errs);
            }
        }
        // 3. The namespace's programs when nothing there has rules left.
        for netns in netns_ids {
            if !rulemaps::netns_in_use(&self.dp.lock(), netns)
                && let Err(e) = self.dp.remove_programs(netns)
            {
                errors.push(e.to_string());
            }
        }
        errors
    }

    /// Drops the saved trees of devices where chaosd's HTB is gone (the
    /// tree was put back), so a later forced fault saves afresh.
    pub(super) fn forget_restored_roots(&self, exp: &Experiment, objs: &[NetObject]) {
        let mut known = self.saved_roots.lock().unwrap_or_else(|p| p.into_inner());
        for o in objs {
            let NetObject::SavedRoot { netns, ifname, .. } = o else { continue };
            let Some(t) = target::resolve(&exp.target).ok().filter(|t| t.inode == *netns) else {
                known.remove(&(*netns, ifname.clone()));
                continue;
            };
            let ifname2 = ifname.clone();
            let still_ours = t
                .netns
                .run(move || {
                    let Ok(devs) = target::inspect_here(true) else { return true };
                    devs.iter().any(|d| {
                        d.name == ifname2
                            && matches!(&d.root_qdisc, Some((k, m)) if k == "htb" && *m == shaping::HTB_MAJOR)
                    })
                })
                .unwrap_or(false);
            if !still_ours {
                known.remove(&(*netns, ifname.clone()));
            }
        }
    }
}
