//! Applying a network fault, on one thread inside the target namespace:
//! the journal first (rule, saved user trees, shaping objects, programs in
//! one commit), then shaping, programs, the rule in the maps, the
//! classifiers, and the protected-port check. Everything taken is held by
//! a `Taken` guard that gives it back unless the injection is kept.

use chaosd_common::{DIR_EGRESS, DIR_INGRESS, DevKey};

use super::{NetworkDriver, api_internal};
use crate::{
    driver::{ApplyContext, Recorder},
    error::ApiError,
    experiment::Experiment,
    net::{
        bpf::{self, AttachKind},
        maps::{self as rulemaps, Placement},
        objects::NetObject,
        rules, shaping,
        target::{self, Device, TargetNs},
    },
    netns::NetnsError,
    spec::{NetworkFault, Target},
};

/// What an injection has taken so far: the objects recorded in the journal
/// (created or about to be) and a rule slot not recorded yet. Dropped
/// without `keep`, it removes them again.
pub(super) struct Taken<'a> {
    driver: &'a NetworkDriver,
    exp: &'a Experiment,
    objects: Vec<NetObject>,
    rule: Option<u32>,
    kept: bool,
}

impl<'a> Taken<'a> {
    pub(super) fn new(driver: &'a NetworkDriver, exp: &'a Experiment) -> Self {
        Self { driver, exp, objects: Vec::new(), rule: None, kept: false }
    }

    /// The injection succeeded: nothing is given back.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Some(id) = self.rule.take() {
            self.driver.dp.lock().used_ids.remove(&id);
        }
        // Errors of the roll-back are secondary to the one that caused it.
        let _ = self.driver.undo(self.exp, &self.objects);
    }
}

impl NetworkDriver {
    fn record(&self, rec: &mut dyn Recorder, taken: &mut Taken<'_>, obj: NetObject) -> Result<(), ApiError> {
        rec.record(obj.to_value())?;
        taken.objects.push(obj);
        Ok(())
    }

    pub(super) fn apply_inner(
        &self,
        exp: &Experiment,
        fault: &NetworkFault,
        ctx: &ApplyContext<'_>,
        rec: &mut dyn Recorder,
        taken: &mut Taken<'_>,
    ) -> Result<(), ApiError> {
        let ns = target::resolve(&exp.target)?;
        // The whole injection runs on one thread inside the namespace: each
        // hand-off between threads costs tens of microseconds.
        match ns.netns.run(|| self.apply_here(exp, fault, ctx, rec, taken, &ns)) {
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
        self.netns_of.lock().unwrap_or_else(|p| p.into_inner()).insert(exp.id.clone(), ns.inode);
        Ok(())
    }

    /// `apply_inner` on a thread inside the target namespace.
    fn apply_here(
        &self,
        exp: &Experiment,
        fault: &NetworkFault,
        ctx: &ApplyContext<'_>,
        rec: &mut dyn Recorder,
        taken: &mut Taken<'_>,
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
        taken.rule = Some(id);
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
        let plan = shaping.then(|| {
            shaping::Plan::new(id, &fault.action, sel.direction, selected.iter().map(|d| (d.name.as_str(), d.ifindex)))
        });
        let saved = if shaping && sel.direction.egress() { self.save_roots(exp, &selected, ns.inode)? } else { vec![] };
        let mut upfront = vec![rule_obj];
        upfront.extend(saved);
        upfront.extend(plan.iter().flat_map(|p| p.objects(ns.inode)));
        upfront.push(NetObject::Programs { netns: ns.inode });
        rec.record_all(upfront.iter().map(NetObject::to_value).collect())?;
        // From here the recorded rule frees its slot when undone.
        taken.rule = None;
        taken.objects.extend(upfront);

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
                    taken,
                    NetObject::Clsact { netns: ns.inode, ifindex: dk.ifindex, ifname: name.clone() },
                )?;
            }
            let obj = NetObject::Attach { netns: ns.inode, ifindex: dk.ifindex, ifname: name, dir: dk.dir as u8, how };
            self.record(rec, taken, obj.clone())?;
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
                let tree = crate::net::qdisc_tree::save(&mut sock, d.ifindex).map_err(|e| {
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
}
