//! Whether an active network fault is still in force: its rule in the
//! maps, its devices, the classifier on each of them, and its shaping
//! objects. The engine asks about once a second, so that `list` never shows
//! as active a fault whose objects someone (a user's `tc`, a deleted
//! device, another tool) took away.

use chaosd_common::{ACTION_NONE, DIR_EGRESS, DIR_INGRESS, DevKey};
use netlink_packet_route::RouteNetlinkMessage;

use super::{
    bpf::{self, Datapath},
    objects::NetObject,
    shaping, target,
};
use crate::{experiment::Experiment, netlink::RouteSocket, owner::Owner, tc};

pub(super) fn verify(dp: &Datapath, owner: &Owner, exp: &Experiment, objects: &[NetObject]) -> Result<(), String> {
    let Some(NetObject::Rule { netns, rule, devices, egress, ingress, .. }) =
        objects.iter().find(|o| matches!(o, NetObject::Rule { .. }))
    else {
        return Err("no rule was recorded for it".into());
    };
    let dirs: Vec<u8> =
        [(*egress, DIR_EGRESS), (*ingress, DIR_INGRESS)].into_iter().filter_map(|(on, d)| on.then_some(d)).collect();
    {
        let maps = dp.lock();
        let in_map = maps.rules.get(rule, 0).map(|r| r.action != ACTION_NONE).unwrap_or(false);
        if !in_map {
            return Err(format!("rule {rule} is no longer in the kernel's rule map"));
        }
        for (ifindex, name) in devices {
            for &dir in &dirs {
                if maps.devices.get(&DevKey { netns: *netns, ifindex: *ifindex, dir: dir as u32 }, 0).is_err() {
                    return Err(format!("device {name} ({}) has no rules in the kernel's maps", side(dir)));
                }
            }
        }
    }
    let Ok(t) = target::resolve(&exp.target) else { return Ok(()) };
    if t.inode != *netns {
        // The target is gone or is another namespace now: liveness says so.
        return Ok(());
    }
    let shaping_objs: Vec<NetObject> =
        objects.iter().filter(|o| matches!(o, NetObject::Class { .. } | NetObject::Ifb { .. })).cloned().collect();
    let tcx = dp.tcx;
    let links: Vec<(String, u8, std::path::PathBuf)> = devices
        .iter()
        .flat_map(|(ifindex, name)| dirs.iter().map(move |&d| (name.clone(), d, dp.link_pin(*netns, *ifindex, d))))
        .collect();
    let here = || -> Result<(), String> {
        let present = target::inspect_here(false).map_err(|e| e.to_string())?;
        let mut sock = RouteSocket::open().map_err(|e| e.to_string())?;
        for (ifindex, name) in devices {
            if !present.iter().any(|d| d.ifindex == *ifindex && d.name == *name) {
                return Err(format!("device {name} is gone from the namespace"));
            }
        }
        for (name, dir, pin) in &links {
            let attached = if tcx {
                pin.exists()
            } else {
                let label = owner.label(bpf::prog_name(*dir));
                classifier_filter_present(&mut sock, name, *dir, &label)?
            };
            if !attached {
                return Err(format!("chaosd's classifier is no longer attached to {name} ({})", side(*dir)));
            }
        }
        shaping::verify_here(&shaping_objs).map_err(|e| e.to_string())
    };
    match t.netns.run(here) {
        Ok(r) => r,
        // The namespace went away meanwhile: liveness reports that.
        Err(_) => Ok(()),
    }
}

fn side(dir: u8) -> &'static str {
    if dir == DIR_EGRESS { "egress" } else { "ingress" }
}

fn classifier_filter_present(sock: &mut RouteSocket, ifname: &str, dir: u8, label: &str) -> Result<bool, String> {
    let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(|e| format!("device {ifname}: {e}"))?;
    let parent = if dir == DIR_EGRESS { tc::CLSACT_EGRESS } else { tc::CLSACT_INGRESS };
    let req = tc::tc_message(ifindex, parent, tc::NO_HANDLE);
    let filters = match sock.dump("dump filters", RouteNetlinkMessage::GetTrafficFilter(req)) {
        Ok(f) => f,
        // No clsact on the device at all.
        Err(e) if matches!(e.errno(), Some(libc::EINVAL) | Some(libc::ENOENT)) => return Ok(false),
        Err(e) => return Err(e.to_string()),
    };
    Ok(filters.iter().any(|m| {
        matches!(m, RouteNetlinkMessage::NewTrafficFilter(f)
            if f.header.index as u32 == ifindex && shaping::bpf_filter_name(f).as_deref() == Some(label))
    }))
}
