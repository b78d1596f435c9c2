//! What is checked before anything is taken: what the host can do, the
//! devices the selector names in the live namespace, other faults acting on
//! the same packets, and roots or IFBs that are the user's or another
//! daemon's.

use super::NetworkDriver;
use crate::{
    error::ApiError,
    experiment::Experiment,
    net::{
        rules, shaping,
        target::{self, Device, TargetNs},
    },
    owner::Whose,
    spec::{Fault, NetAction, NetworkFault},
};

impl NetworkDriver {
    pub(super) fn check_host(&self, action: &NetAction, ingress: bool) -> Result<(), ApiError> {
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

    pub(super) fn validate(
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
        let netns_of = self.netns_of.lock().unwrap_or_else(|p| p.into_inner());
        for other in active {
            if other.id == exp.id {
                continue;
            }
            let Fault::Network(of) = &other.fault else { continue };
            if netns_of.get(&other.id) != Some(&ns.inode) {
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
    pub(super) fn check_not_anothers(
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
}
