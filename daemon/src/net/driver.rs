//! `NetworkDriver`: the `Driver` for network faults. Validates against the
//! live namespace, enters the rule in the maps, sets up shaping for the
//! delay family and bandwidth, attaches the classifiers where a device had
//! none, checks that protected ports still pass, and undoes all of it on
//! failure, revert or sweep.

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use chaosd_common::{DIR_EGRESS, DIR_INGRESS, DevKey, PROTO_TCP, PROTO_UDP};
use serde_json::Value;

use super::{
    bpf::{self, AttachKind, Datapath},
    maps::{self as rulemaps, Placement},
    objects::NetObject,
    rules, shaping,
    target::{self, Device, TargetNs},
};
use crate::{
    driver::{ApplyContext, Driver, Liveness, Recorder},
    error::ApiError,
    experiment::{Counters, Experiment},
    netns::NetnsError,
    owner::{Owner, Whose},
    probe::HostProbe,
    spec::{Fault, NetAction, NetworkFault, Protocol, Target},
};

/// Configuration of the network driver.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Dead man's switch: rules are ignored once the heartbeat is older.
    pub grace: Duration,
    /// Ports never matched (22 by default, plus the API's TCP port if any).
    pub protected_ports: Vec<u16>,
    /// The API's unix socket (its traffic never crosses a tc hook; kept to
    /// name it in errors).
    pub api_socket: PathBuf,
    /// chaosd's directory on bpffs (e.g. /sys/fs/bpf/chaosd); bpffs is
    /// mounted on its parent when absent.
    pub bpffs: PathBuf,
    /// Whose objects this daemon's are (labels in the kernel, see `owner`).
    pub owner: Owner,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            protected_ports: vec![22],
            api_socket: PathBuf::from("/run/chaosd/chaosd.sock"),
            bpffs: PathBuf::from("/sys/fs/bpf/chaosd"),
            owner: Owner::new("/var/lib/chaosd"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("network driver: {0}")]
pub struct NetInitError(#[from] pub bpf::BpfError);

/// What the host can do, from the probe.
#[derive(Clone, Debug)]
struct Caps {
    netem: Result<(), String>,
    htb: Result<(), String>,
    ifb: Result<(), String>,
}

pub struct NetworkDriver {
    dp: Datapath,
    config: NetConfig,
    caps: Caps,
    /// Users' root qdisc trees that forced faults replaced, by (namespace,
    /// device), while chaosd's HTB is there: a later fault sharing that HTB
    /// records the same tree, so whichever fault removes the HTB last puts
    /// the user's tree back. Refilled from the journal at adopt.
    saved_roots: std::sync::Mutex<std::collections::HashMap<(u32, String), super::qdisc_tree::SavedTree>>,
}

fn api_internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

impl NetworkDriver {
    pub fn new(probe: &HostProbe, config: NetConfig) -> Result<Self, NetInitError> {
        let dp = Datapath::open(&config.bpffs, config.grace, &config.protected_ports, probe.tcx.available)?;
        let avail = |p: &crate::probe::Probe| if p.available { Ok(()) } else { Err(p.detail.clone()) };
        let caps = Caps { netem: avail(&probe.netem), htb: avail(&probe.htb), ifb: avail(&probe.ifb) };
        Ok(Self { dp, config, caps, saved_roots: Default::default() })
    }

    /// The datapath (benchmarks and tests read counters and pins from it).
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    fn attach_kind(&self) -> AttachKind {
        if self.dp.tcx { AttachKind::Tcx } else { AttachKind::Clsact }
    }

    fn check_host(&self, action: &NetAction, ingress: bool) -> Result<(), ApiError> {
        if action.needs_netem()
            && let Err(why) = &self.caps.netem
        {
            return Err(ApiError::FailedPrecondition(format!(
                "{} needs the kernel's netem qdisc (sch_netem), which this host lacks ({why}); \
                     loss, partition and bandwidth still work; nothing was changed",
                action.name()
            )));
        }
        let shaping = action.shapes();
        if shaping {
            if let Err(why) = &self.caps.htb {
                return Err(ApiError::FailedPrecondition(format!(
                    "{} needs the HTB qdisc, which this host lacks ({why}); loss and partition still work",
                    action.name()
                )));
            }
            if ingress && let Err(why) = &self.caps.ifb {
                return Err(ApiError::FailedPrecondition(format!(
                    "ingress {} needs IFB devices, which this host lacks ({why}); use --direction egress, \
                         or loss/partition which work on ingress",
                    action.name()
                )));
            }
        }
        Ok(())
    }

    fn validate(
        &self,
        exp: &Experiment,
        fault: &NetworkFault,
        ns: &TargetNs,
        devices: &[Device],
        active: &[Experiment],
    ) -> Result<Vec<Device>, ApiError> {
        let sel = &fault.selector;
        let selected: Vec<Device> =
            target::select(devices, &sel.devices, ns.netns.label())?.into_iter().cloned().collect();
        // Peers of a family no selected device speaks can never match.
        let has_v4 = selected.iter().any(|d| d.v4);
        let has_v6 = selected.iter().any(|d| d.v6);
        let names = || selected.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ");
        for p in &sel.peers {
            match p {
                ipnet::IpNet::V4(_) if !has_v4 => {
                    return Err(ApiError::InvalidArgument(format!(
                        "peer {p} is IPv4 but device(s) {} have no IPv4 address; give an IPv6 peer or another device",
                        names()
                    )));
                }
                ipnet::IpNet::V6(_) if !has_v6 && !has_v4 => {
                    return Err(ApiError::InvalidArgument(format!(
                        "peer {p} is IPv6 but device(s) {} have no IP address",
                        names()
                    )));
                }
                _ => {}
            }
        }
        if rules::only_protected(sel, &self.config.protected_ports) {
            return Err(ApiError::InvalidArgument(format!(
                "the only ports selected are protected ({:?}): chaosd never touches them (its API on {} \
                 and --protect-port ports); select other ports",
                self.config.protected_ports,
                self.config.api_socket.display()
            )));
        }
        // Conflicts: another fault on the same namespace acting on the same packets.
        let mine: Vec<String> = selected.iter().map(|d| d.name.clone()).collect();
        for other in active {
            if other.id == exp.id {
                continue;
            }
            let Fault::Network(of) = &other.fault else { continue };
            let Ok(ons) = target::resolve(&other.target) else { continue };
            if ons.inode != ns.inode {
                continue;
            }
            let Ok(odevs) = target::select(devices, &of.selector.devices, ns.netns.label()) else { continue };
            let theirs: Vec<String> = odevs.iter().map(|d| d.name.clone()).collect();
            if rules::overlaps(sel, &mine, &of.selector, &theirs) {
                return Err(ApiError::AlreadyExists(format!(
                    "experiment {} ({} on {}) already acts on the same packets; recover it first or narrow the \
                     selector (ports, peers, direction, device)",
                    other.id,
                    of.action.name(),
                    other.target
                )));
            }
        }
        // Shaping replaces the root qdisc: never clobber the user's own,
        // nor another chaosd's (whose classes would collide with ours).
        let shaping = fault.action.shapes();
        if shaping {
            self.check_not_anothers(&selected, devices, sel.direction)?;
        }
        if shaping && sel.direction.egress() && !exp.forced {
            for d in &selected {
                let ours = matches!(&d.root_qdisc, Some((k, m)) if k == "htb" && *m == shaping::HTB_MAJOR);
                if !ours && !d.root_is_default() {
                    let (k, m) = d.root_qdisc.clone().unwrap_or_default();
                    return Err(ApiError::FailedPrecondition(format!(
                        "device {} has its own root qdisc ({k} {m:x}:), which {} would replace; remove it, \
                         use loss/partition (no qdisc needed), or --force to replace it",
                        d.name,
                        fault.action.name()
                    )));
                }
            }
        }
        Ok(selected)
    }

    /// Refuses shaping where another chaosd's HTB root or IFB is: they are
    /// shared per device, and two daemons' class ids would collide.
    fn check_not_anothers(
        &self,
        selected: &[Device],
        all: &[Device],
        dir: crate::spec::Direction,
    ) -> Result<(), ApiError> {
        let owner = &self.config.owner;
        // Another daemon's, named for the message; None when it is ours.
        let other = |label: Option<&str>| match label.map_or(Whose::Unlabelled, |l| owner.whose(l)) {
            Whose::Mine => None,
            Whose::Live(o) => Some(format!("the chaosd running with --state-dir {o}")),
            Whose::Dead(o) => Some(format!("a chaosd (--state-dir {o}) that is no longer running")),
            Whose::Unlabelled => Some("an older chaosd".to_string()),
        };
        let refuse = |what: String, who: String| {
            Err(ApiError::FailedPrecondition(format!(
                "{what} belongs to {who}; recover its faults there (or restart it, which removes what a dead one \
                 left) before shaping this device from here; nothing was changed"
            )))
        };
        for d in selected {
            if dir.egress()
                && matches!(&d.root_qdisc, Some((k, m)) if k == "htb" && *m == shaping::HTB_MAJOR)
                && let Some(who) = other(d.htb_mark.as_deref())
            {
                return refuse(format!("the HTB root {:x}: on {}", shaping::HTB_MAJOR, d.name), who);
            }
            if dir.ingress() {
                let ifb = shaping::ifb_name(d.ifindex);
                if let Some(i) = all.iter().find(|i| i.name == ifb)
                    && let Some(who) = other(i.alias.as_deref())
                {
                    return refuse(format!("the IFB device {ifb} that shapes {}'s ingress", d.name), who);
                }
            }
        }
        Ok(())
    }

    fn record(&self, rec: &mut dyn Recorder, done: &mut Vec<NetObject>, obj: NetObject) -> Result<(), ApiError> {
        rec.record(obj.to_value())?;
        done.push(obj);
        Ok(())
    }

    fn apply_inner(
        &self,
        exp: &Experiment,
        fault: &NetworkFault,
        ctx: &ApplyContext<'_>,
        rec: &mut dyn Recorder,
        done: &mut Vec<NetObject>,
    ) -> Result<(), ApiError> {
        let ns = target::resolve(&exp.target)?;
        // The whole injection runs on one thread inside the namespace: each
        // hand-off between threads costs tens of microseconds.
        match ns.netns.run(|| self.apply_here(exp, fault, ctx, rec, done, &ns)) {
            Ok(applied) => applied?,
            Err(NetnsError::Panicked(_)) => {
                return Err(ApiError::Internal(format!(
                    "injecting into network namespace {} failed (see the daemon's log)",
                    ns.netns.label()
                )));
            }
            Err(e) => return Err(ApiError::NotFound(format!("cannot enter the target's network namespace: {e}"))),
        }
        // A pid that exited meanwhile leaves a namespace nobody uses.
        if let Target::Pid(pid) = exp.target {
            let still = target::resolve(&exp.target).map(|t| t.inode == ns.inode).unwrap_or(false);
            if !still {
                return Err(ApiError::NotFound(format!(
                    "pid {pid} exited during injection; nothing was left in place"
                )));
            }
        }
        Ok(())
    }

    /// `apply_inner` on a thread inside the target namespace.
    fn apply_here(
        &self,
        exp: &Experiment,
        fault: &NetworkFault,
        ctx: &ApplyContext<'_>,
        rec: &mut dyn Recorder,
        done: &mut Vec<NetObject>,
        ns: &TargetNs,
    ) -> Result<(), ApiError> {
        let devices = target::inspect_here(fault.action.shapes()).map_err(|e| {
            ApiError::Internal(format!("reading devices of network namespace {}: {e}", ns.netns.label()))
        })?;
        let selected = self.validate(exp, fault, ns, &devices, ctx.active)?;
        let sel = &fault.selector;
        let dirs: Vec<u8> = [(sel.direction.egress(), DIR_EGRESS), (sel.direction.ingress(), DIR_INGRESS)]
            .into_iter()
            .filter_map(|(on, d)| on.then_some(d))
            .collect();
        // The request was compiled once already when it was converted, so
        // this cannot fail for what the user asked. The deadline is set when
        // the rule goes in (below).
        let mut compiled = rules::compile(fault, 0, 0)
            .map_err(|e| ApiError::Internal(format!("a validated rule did not compile: {e}")))?;
        let id = rulemaps::alloc_id(&mut self.dp.lock())
            .ok_or_else(|| ApiError::Unavailable("all rule slots are in use; recover some faults first".into()))?;
        let shaping = fault.action.shapes();
        let classid = if shaping { shaping::classid(id) } else { 0 };
        compiled.rule.classid = classid;
        let rule_obj = NetObject::Rule {
            netns: ns.inode,
            rule: id,
            devices: selected.iter().map(|d| (d.ifindex, d.name.clone())).collect(),
            egress: sel.direction.egress(),
            ingress: sel.direction.ingress(),
            classid,
        };
        // Everything known before the kernel is touched goes to the journal
        // in one commit: the rule, the user's root trees a forced fault
        // replaces, the shaping objects, the programs.
        let plan = shaping.then(|| shaping::Plan::new(id, &fault.action, sel.direction, &selected));
        let saved =
            if shaping && sel.direction.egress() { self.save_roots(exp, &selected, ns.inode) } else { Ok(vec![]) };
        let saved = match saved {
            Ok(s) => s,
            Err(e) => {
                self.dp.lock().used_ids.remove(&id);
                return Err(e);
            }
        };
        let mut upfront = vec![rule_obj];
        upfront.extend(saved);
        upfront.extend(plan.iter().flat_map(|p| p.objects(ns.inode)));
        upfront.push(NetObject::Programs { netns: ns.inode });
        if let Err(e) = rec.record_all(upfront.iter().map(NetObject::to_value).collect()) {
            self.dp.lock().used_ids.remove(&id);
            return Err(e);
        }
        done.extend(upfront);

        // Shaping first, so the classes exist before packets are steered.
        if let Some(plan) = &plan {
            let sel_fd = self.dp.ifb_sel_fd().map_err(api_internal)?;
            let ifbs = shaping::apply_here(plan, sel_fd, &self.config.owner).map_err(api_internal)?;
            let mut maps = self.dp.lock();
            for (dev_ifindex, ifb_ifindex) in ifbs {
                rulemaps::set_ifb(
                    &mut maps,
                    DevKey { netns: ns.inode, ifindex: dev_ifindex, dir: DIR_INGRESS as u32 },
                    ifb_ifindex,
                )
                .map_err(api_internal)?;
            }
        }

        self.dp.ensure_programs(ns.inode).map_err(api_internal)?;

        let ifindexes: Vec<u32> = selected.iter().map(|d| d.ifindex).collect();
        let at = Placement { netns: ns.inode, ifindexes: &ifindexes, dirs: &dirs };
        // The rule's kernel-side deadline starts when the rule goes in, after
        // the slow steps (loading the programs takes seconds on a slow host),
        // so the fault lasts its whole duration.
        compiled.rule.deadline_ns = ctx.duration.map_or(0, |d| bpf::boot_ns() + d.as_nanos() as u64);
        let fresh = {
            let mut maps = self.dp.lock();
            match rulemaps::install(&mut maps, id, &compiled, &at).map_err(api_internal)? {
                Ok(fresh) => fresh,
                Err(full) => {
                    let dev = selected.iter().find(|d| d.ifindex == full.key.ifindex).map(|d| d.name.clone());
                    return Err(ApiError::FailedPrecondition(format!(
                        "{} faults already select port {} on device {} ({}); recover one of them first",
                        full.rules.len(),
                        full.key.port,
                        dev.unwrap_or_default(),
                        if full.key.dir == DIR_EGRESS { "egress" } else { "ingress" }
                    )));
                }
            }
        };
        let how = self.attach_kind();
        let mut attach = Vec::new();
        for dk in &fresh {
            let name = selected.iter().find(|d| d.ifindex == dk.ifindex).map(|d| d.name.clone()).unwrap_or_default();
            if how == AttachKind::Clsact {
                self.record(
                    rec,
                    done,
                    NetObject::Clsact { netns: ns.inode, ifindex: dk.ifindex, ifname: name.clone() },
                )?;
            }
            let obj = NetObject::Attach { netns: ns.inode, ifindex: dk.ifindex, ifname: name, dir: dk.dir as u8, how };
            self.record(rec, done, obj.clone())?;
            attach.push(obj);
        }
        let checks = self.protected_checks(fault, &selected, &dirs);
        let pins: Vec<_> = [DIR_EGRESS, DIR_INGRESS].iter().map(|d| self.dp.prog_pin(ns.inode, *d)).collect();
        let kernel = || -> Result<(), String> {
            for o in &attach {
                let NetObject::Attach { ifindex, ifname, dir, how, .. } = o else { continue };
                let link = self.dp.link_pin(ns.inode, *ifindex, *dir);
                if *how == AttachKind::Clsact {
                    shaping::ensure_clsact(ifname).map_err(|e| e.to_string())?;
                }
                let label = self.config.owner.label(bpf::prog_name(*dir));
                bpf::attach(&pins[*dir as usize], &link, ifname, *dir, *how, &label).map_err(|e| e.to_string())?;
            }
            let mut progs = [None, None];
            for c in &checks {
                let prog = match &mut progs[c.dir as usize] {
                    Some(p) => p,
                    empty => empty.insert(bpf::open_pinned(&pins[c.dir as usize]).map_err(|e| e.to_string())?),
                };
                let (verdict, _) = bpf::test_run(prog, c.ifindex, &c.packet, 1).map_err(|e| e.to_string())?;
                // Pass is "no verdict" (TC_ACT_UNSPEC, TCX_NEXT): chaosd
                // leaves the packet to whatever comes after it.
                if verdict != bpf::VERDICT_PASS {
                    return Err(format!(
                        "protected port {} would not pass on {} (verdict {verdict})",
                        c.port, c.ifname
                    ));
                }
            }
            Ok(())
        };
        kernel().map_err(|e| ApiError::Internal(format!("injecting into network namespace {}: {e}", ns.netns.label())))
    }

    /// The user's root qdisc trees this fault will replace (forced) or
    /// already replaced by an earlier fault sharing chaosd's HTB. A tree
    /// that could not be put back exactly is a refusal: chaosd never edits
    /// what it cannot restore. Runs on the namespace thread.
    fn save_roots(&self, exp: &Experiment, selected: &[Device], netns: u32) -> Result<Vec<NetObject>, ApiError> {
        let mut out = Vec::new();
        let mut known = self.saved_roots.lock().unwrap_or_else(|p| p.into_inner());
        for d in selected {
            let ours = matches!(&d.root_qdisc, Some((k, m)) if k == "htb" && *m == shaping::HTB_MAJOR);
            let key = (netns, d.name.clone());
            let tree = if ours {
                match known.get(&key) {
                    Some(t) => t.clone(),
                    None => continue,
                }
            } else if exp.forced && !d.root_is_default() {
                let mut sock = crate::netlink::RouteSocket::open().map_err(api_internal)?;
                let tree = super::qdisc_tree::save(&mut sock, d.ifindex).map_err(|e| {
                    ApiError::FailedPrecondition(format!(
                        "device {}'s own root qdisc tree cannot be saved to be restored exactly afterwards ({e}); \
                         chaosd does not replace what it cannot put back: remove that tree yourself or use \
                         loss/partition (no qdisc needed); nothing was changed",
                        d.name
                    ))
                })?;
                known.insert(key, tree.clone());
                tree
            } else {
                continue;
            };
            out.push(NetObject::SavedRoot { netns, ifname: d.name.clone(), tree });
        }
        Ok(out)
    }

    /// Synthetic packets on protected ports that must pass after injection.
    fn protected_checks(&self, fault: &NetworkFault, devices: &[Device], dirs: &[u8]) -> Vec<Check> {
        let sel = &fault.selector;
        let proto = match sel.protocol {
            Protocol::Udp => PROTO_UDP,
            Protocol::Icmp => return vec![],
            _ => PROTO_TCP,
        };
        // A port the rule would otherwise match, so that only protection
        // can make the packet pass.
        let other = [&sel.destination_ports, &sel.source_ports, &sel.ports]
            .iter()
            .find_map(|l| l.first().map(|r| r.first))
            .unwrap_or(40000);
        let peer4: IpAddr =
            sel.peers.iter().find(|p| p.addr().is_ipv4()).map(|p| p.addr()).unwrap_or(IpAddr::from([192, 0, 2, 1]));
        let peer6: IpAddr =
            sel.peers.iter().find(|p| p.addr().is_ipv6()).map(|p| p.addr()).unwrap_or("2001:db8::1".parse().unwrap());
        let mut out = Vec::new();
        for d in devices {
            for &dir in dirs {
                for &port in &self.config.protected_ports {
                    for (me, peer) in [(IpAddr::from([192, 0, 2, 2]), peer4), ("2001:db8::2".parse().unwrap(), peer6)] {
                        let (src, dst) = if dir == DIR_EGRESS { (me, peer) } else { (peer, me) };
                        // Protected as destination, the rule's port as source
                        // and the other way round.
                        for (sp, dp) in [(other, port), (port, other)] {
                            out.push(Check {
                                ifindex: d.ifindex,
                                ifname: d.name.clone(),
                                dir,
                                port,
                                packet: bpf::synth_packet(src, dst, proto, sp, dp),
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// Undoes `objects` (any subset, any order); collects every error.
    fn undo(&self, exp: &Experiment, objects: &[NetObject]) -> Vec<String> {
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
}

impl NetworkDriver {
    /// Drops the saved trees of devices where chaosd's HTB is gone (the
    /// tree was put back), so a later forced fault saves afresh.
    fn forget_restored_roots(&self, exp: &Experiment, objs: &[NetObject]) {
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

struct Check {
    ifindex: u32,
    ifname: String,
    dir: u8,
    port: u16,
    packet: Vec<u8>,
}

fn parse_objects(objects: &[Value]) -> Vec<NetObject> {
    objects.iter().filter_map(NetObject::from_value).collect()
}

impl Driver for NetworkDriver {
    fn apply(&self, exp: &Experiment, ctx: &ApplyContext<'_>, rec: &mut dyn Recorder) -> Result<(), ApiError> {
        let Fault::Network(fault) = &exp.fault else {
            return Err(ApiError::InvalidArgument(format!(
                "the network driver cannot apply a {} fault",
                exp.fault.name()
            )));
        };
        self.check_host(&fault.action, fault.selector.direction.ingress())?;
        let mut done = Vec::new();
        let result = self.apply_inner(exp, fault, ctx, rec, &mut done);
        if result.is_err() {
            // All-or-nothing: whatever was created goes again. Errors of the
            // roll-back are secondary to the one that caused it.
            let _ = self.undo(exp, &done);
        }
        result
    }

    fn revert(&self, exp: &Experiment, objects: &[Value]) -> Result<(), Vec<String>> {
        let objs = parse_objects(objects);
        let errors = self.undo(exp, &objs);
        self.forget_restored_roots(exp, &objs);
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    fn counters(&self, _exp: &Experiment, objects: &[Value]) -> Counters {
        let mut c = Counters::default();
        for o in parse_objects(objects) {
            if let NetObject::Rule { rule, .. } = o {
                let s = self.dp.rule_stats(rule);
                c.packets_matched += s.matched;
                c.packets_dropped += s.dropped;
                c.packets_delayed += s.delayed;
            }
        }
        c
    }

    fn liveness(&self, exp: &Experiment, objects: &[Value]) -> Liveness {
        let recorded = parse_objects(objects).iter().find_map(|o| match o {
            NetObject::Rule { netns, .. } => Some(*netns),
            _ => None,
        });
        match (target::resolve(&exp.target), recorded) {
            (Ok(t), Some(n)) if t.inode == n => Liveness::Alive,
            (Ok(_), None) => Liveness::Alive,
            _ => Liveness::Gone,
        }
    }

    fn adopt(&self, exp: &Experiment, objects: &[Value]) -> Result<(), ApiError> {
        if self.dp.stale_at_start {
            return Err(ApiError::FailedPrecondition(format!(
                "chaosd was down longer than the grace period ({:?}): the kernel had already stopped every \
                 network fault, so {} is not resumed",
                self.config.grace, exp.id
            )));
        }
        let objs = parse_objects(objects);
        {
            let mut known = self.saved_roots.lock().unwrap_or_else(|p| p.into_inner());
            for o in &objs {
                if let NetObject::SavedRoot { netns, ifname, tree } = o {
                    known.entry((*netns, ifname.clone())).or_insert_with(|| tree.clone());
                }
            }
        }
        let Some(NetObject::Rule { netns, rule, .. }) =
            objs.iter().find(|o| matches!(o, NetObject::Rule { .. })).cloned()
        else {
            return Err(ApiError::FailedPrecondition(format!("{}: no rule recorded, nothing to resume", exp.id)));
        };
        let t = target::resolve(&exp.target)?;
        if t.inode != netns {
            return Err(ApiError::NotFound(format!("the target of {} is a different network namespace now", exp.id)));
        }
        let mut maps = self.dp.lock();
        let live = maps.rules.get(&rule, 0).map(|r| r.action != chaosd_common::ACTION_NONE).unwrap_or(false);
        if !live {
            return Err(ApiError::FailedPrecondition(format!("{}: rule {rule} is no longer in the kernel", exp.id)));
        }
        maps.used_ids.insert(rule);
        Ok(())
    }

    fn sweep(&self, known: &[(Experiment, Vec<Value>)]) -> Vec<String> {
        super::sweep::sweep(&self.dp, &self.config.owner, known)
    }

    fn shutdown(&self) -> Result<(), Vec<String>> {
        match self.dp.remove_pins_if_idle() {
            Ok(true) => Ok(()),
            Ok(false) => Err(vec![format!("classifiers are still pinned under {}", self.dp.dir().display())]),
            Err(e) => Err(vec![e.to_string()]),
        }
    }

    fn ended_by_kernel(&self, active: &[Experiment]) -> Vec<(String, String)> {
        // Once the heartbeat is older than the grace period every rule is
        // inert in the kernel; the next heartbeat would bring them all back.
        // So they end here, before `tick` writes that heartbeat.
        let gap = self.dp.since_last_beat();
        if gap <= self.dp.grace() || active.is_empty() {
            return Vec::new();
        }
        let reason = format!(
            "chaosd could not run for {:.1} s (stopped or stalled), longer than the grace period ({:?}): the \
             kernel's dead man's switch had already ended the fault, so it was not re-armed",
            gap.as_secs_f64(),
            self.dp.grace()
        );
        active.iter().map(|e| (e.id.clone(), reason.clone())).collect()
    }

    fn verify(&self, exp: &Experiment, objects: &[Value]) -> Result<(), String> {
        super::verify::verify(&self.dp, &self.config.owner, exp, &parse_objects(objects))
    }

    fn tick(&self) -> Vec<(String, String)> {
        // A failed refresh lets the dead man's switch fire, which is the
        // safe direction; nothing else to do here.
        let _ = self.dp.heartbeat();
        Vec::new()
    }
}
