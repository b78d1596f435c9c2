//! What the network driver records in the journal, one JSON object per
//! kernel object, written before the object is created. Shared objects
//! (programs, attachments, clsact, HTB root, IFB) are recorded by every
//! experiment that needs them and removed only when no rule uses them any
//! more, judged from the kernel's state (the pinned maps and qdiscs), so
//! that the order in which experiments are reverted or adopted does not
//! matter.

use serde::{Deserialize, Serialize};

use super::bpf::AttachKind;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NetObject {
    /// The rule in the maps: RULES[rule], its peers, its index entries on
    /// `devices` for the directions, and its share of the devices' DevConf.
    Rule { netns: u32, rule: u32, devices: Vec<(u32, String)>, egress: bool, ingress: bool, classid: u32 },
    /// The namespace's pinned classifiers.
    Programs { netns: u32 },
    /// A classifier attached to a device in one direction.
    Attach { netns: u32, ifindex: u32, ifname: String, dir: u8, how: AttachKind },
    /// A clsact qdisc chaosd created on a device (older kernels).
    Clsact { netns: u32, ifindex: u32, ifname: String },
    /// chaosd's HTB root on a device (or IFB).
    Htb { netns: u32, ifname: String },
    /// An HTB class (and its netem leaf) for one rule.
    Class { netns: u32, ifname: String, classid: u32 },
    /// An IFB device for ingress shaping of `for_ifname`.
    Ifb { netns: u32, name: String, for_ifname: String },
    /// The user's root qdisc tree of `ifname`, saved before a forced fault
    /// replaced it with chaosd's HTB; whoever removes that HTB puts it back.
    /// Every experiment sharing the HTB records it.
    SavedRoot { netns: u32, ifname: String, tree: super::qdisc_tree::SavedTree },
}

impl NetObject {
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("NetObject serializes")
    }
}
