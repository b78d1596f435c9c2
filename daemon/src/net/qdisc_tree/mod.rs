//! Saving a device's root qdisc tree (qdiscs, classes, filter chains,
//! filters and the actions bound to them) before a forced fault replaces
//! it, and recreating it exactly afterwards.
//!
//! What is saved is the kernel's own dump of every object, with what the
//! kernel reports but would refuse or ignore on create (statistics, hardware
//! offload state, timestamps, reference counts, padding) taken out, so the
//! same normalization also decides whether a device's tree equals a saved
//! one (`differences`). Options are kept as raw netlink attributes: an option
//! netlink-packet-route does not model survives the round trip unchanged.
//!
//! "Exactly" includes the order in which `tc` lists objects, which is the
//! order of the kernel's hash tables and lists; it depends on the order the
//! objects were created in, so the order of creation is worked out from the
//! order of the dump (see `insertion_order`), and u32's hash-table ids,
//! which the kernel allocates from a cyclic counter per qdisc, are
//! reproduced by allocating them in the same sequence (see `plan_u32`).
//! Which root table belongs to which u32 instance is not in a dump; it is
//! asked for separately (`u32_root`).
//!
//! Not saved, because a dump does not carry them: rate estimators (`tc ...
//! estimator`, only their readings are dumped); whether a chain holding
//! filters was created explicitly (`tc chain add`). Refused at save time
//! (`QdiscTreeError::Unrestorable`), because the dump cannot recreate them:
//! eBPF programs (cls_bpf and act_bpf by id; the program is gone once its
//! filter is), police actions (their rate tables are not dumped), size
//! tables with data. clsact/ingress are never part of the tree: chaosd does
//! not replace them.
//!
//! All functions run on a thread inside the device's network namespace.

mod compare;
mod order;
mod plan;
mod read;
mod restore;
#[cfg(test)]
mod tests;

use compare::*;
use order::*;
use plan::*;
use read::*;
use restore::*;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use netlink_packet_core::{DefaultNla, Emitable, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAction, TcActionAttribute, TcActionMessage, TcActionMessageAttribute, TcAttribute, TcMessage},
};
use rand::{SeedableRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use crate::{
    netlink::{NetlinkError, RouteSocket},
    tc::TCA_OPTIONS,
};

/// Version of `SavedTree`'s layout; a journal entry of another version is
/// refused rather than misread.
pub const FORMAT_VERSION: u32 = 1;

const TC_H_ROOT: u32 = 0xFFFF_FFFF;
const TC_H_INGRESS: u32 = 0xFFFF_FFF1;

const TCA_STAB: u16 = 8;
const TCA_PAD: u16 = 9;
const TCA_EXT_WARN_MSG: u16 = 16;
const TCA_STAB_BASE: u16 = 1;

const NLA_TYPE_MASK: u16 = 0x3fff;

/// Kinds whose `TCA_OPTIONS` netlink-packet-route parses into a list of
/// options; for every other kind it wraps the whole attribute in one
/// `TcOption::Other`.
const CRATE_PARSED_KINDS: &[&str] = &["u32", "matchall", "flower", "ingress", "fq_codel", "bpf"];

/// Classful qdiscs whose classes are created by the user; the classes of
/// every other classful qdisc (mq, tbf, prio, ...) come with the qdisc.
const USER_CLASS_KINDS: &[&str] = &["htb", "hfsc", "drr", "qfq", "cbq"];

/// One qdisc, class, chain or filter as the kernel dumped it, normalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedObject {
    /// `TCA_KIND`; empty for a chain without a template.
    pub kind: String,
    pub parent: u32,
    pub handle: u32,
    /// Filters: priority << 16 | protocol (network byte order), as in
    /// `tcm_info`. Zero for the others (the kernel reports a refcount or a
    /// leaf handle there, neither of which can be set).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub info: u32,
    /// Filters and chains: `TCA_CHAIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<u32>,
    /// The other attributes (`TCA_OPTIONS`, `TCA_STAB`, unknown ones) as
    /// netlink attributes, normalized.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "Vec::is_empty")]
    pub attrs: Vec<u8>,
}

/// An action filters refer to by index that exists on its own in the
/// kernel's action table (`tc actions add`): restoring binds to it instead
/// of creating it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedAction {
    pub kind: String,
    pub index: u32,
}

/// A device's root qdisc tree, in the kernel's dump order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTree {
    pub version: u32,
    /// Every qdisc of the root tree, the root first. Qdiscs with handle 0
    /// are the kernel's (a default root, mq's default children): they are
    /// compared, never created.
    pub qdiscs: Vec<SavedObject>,
    pub classes: Vec<SavedObject>,
    /// Every chain of every qdisc's and class's filter block, as `tc chain
    /// show` lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<SavedObject>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<SavedObject>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_actions: Vec<SharedAction>,
}

impl SavedTree {
    /// The root qdisc, if the device had one the kernel reports.
    pub fn root(&self) -> Option<&SavedObject> {
        self.qdiscs.iter().find(|q| q.parent == TC_H_ROOT)
    }

    /// The device had the kernel's default root (handle 0:, e.g. noqueue,
    /// pfifo_fast or mq): restoring it means removing whatever root is there.
    pub fn is_kernel_default(&self) -> bool {
        self.root().is_none_or(|r| r.handle == 0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QdiscTreeError {
    #[error("read the qdisc tree of ifindex {ifindex}: {source}")]
    Dump {
        ifindex: u32,
        #[source]
        source: NetlinkError,
    },
    #[error("{object} on ifindex {ifindex} cannot be saved: {reason}")]
    Unrestorable { ifindex: u32, object: String, reason: String },
    #[error("remove the root qdisc of ifindex {ifindex} to restore the saved tree: {source}")]
    RemoveRoot {
        ifindex: u32,
        #[source]
        source: NetlinkError,
    },
    /// The kernel refused an object of the saved tree. `source` names the
    /// object; `left` says what the device was left with.
    #[error("restore the qdisc tree of ifindex {ifindex}: {source}; the device was left with {left}")]
    Recreate {
        ifindex: u32,
        object: String,
        #[source]
        source: NetlinkError,
        left: String,
    },
    #[error("saved qdisc tree has format version {0}, this chaosd reads version {FORMAT_VERSION}")]
    Version(u32),
}

/// Saves the root qdisc tree of `ifindex`. Fails with `Unrestorable` when
/// the tree holds something a dump cannot recreate.
pub fn save(sock: &mut RouteSocket, ifindex: u32) -> Result<SavedTree, QdiscTreeError> {
    snapshot(sock, ifindex, true)
}

/// Recreates `tree` on `ifindex`, replacing the root qdisc there (or, when
/// the saved root was the kernel's default, removing the root so the kernel
/// attaches its default again). Does nothing when the device already has
/// the saved tree, so it can be repeated after a crash.
///
/// When the kernel refuses an object, what was recreated so far is removed
/// and the device is left with the kernel's default root qdisc, as it would
/// be with no tree at all: a partial tree (a root without its classes or
/// filters) can hold packets in a class nothing drains or send them where
/// the user never meant to, while the default qdisc only loses the user's
/// shaping. The error names the object and carries the kernel's message.
pub fn restore(sock: &mut RouteSocket, ifindex: u32, tree: &SavedTree) -> Result<(), QdiscTreeError> {
    if tree.version != FORMAT_VERSION {
        return Err(QdiscTreeError::Version(tree.version));
    }
    if differences(sock, ifindex, tree)?.is_empty() {
        return Ok(());
    }
    remove_root(sock, ifindex).map_err(|source| QdiscTreeError::RemoveRoot { ifindex, source })?;
    if tree.is_kernel_default() {
        return Ok(());
    }
    // Only now: removing the root freed the actions its filters owned.
    let tree = remap_taken_actions(sock, tree);
    for op in plan(&tree) {
        if let Err((object, source)) = execute(sock, ifindex, &tree, &op) {
            let left = match remove_root(sock, ifindex) {
                Ok(()) => "the kernel's default root qdisc".to_string(),
                Err(e) => format!("part of the saved tree (removing it failed too: {e})"),
            };
            return Err(QdiscTreeError::Recreate { ifindex, object, source, left });
        }
    }
    Ok(())
}

/// How the device's current tree differs from `tree`, one line each;
/// empty when `tc` would show both the same.
pub fn differences(sock: &mut RouteSocket, ifindex: u32, tree: &SavedTree) -> Result<Vec<String>, QdiscTreeError> {
    let now = snapshot(sock, ifindex, false)?;
    Ok(compare(tree, &now))
}

// ---------------------------------------------------------------------------
// Raw netlink attributes

/// (type with its flags, value) of each attribute; stops at a malformed one.
fn nlas(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]);
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((ty, &rest[4..len]));
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    out
}

fn push_nla(out: &mut Vec<u8>, ty: u16, value: &[u8]) {
    let len = 4 + value.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(out.len() + (len.next_multiple_of(4) - len), 0);
}

/// Rebuilds a list of attributes: `f` gets each one's type (without flags)
/// and value and returns the new value, or None to drop it.
fn map_nlas(buf: &[u8], mut f: impl FnMut(u16, &[u8]) -> Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len());
    for (ty, v) in nlas(buf) {
        if let Some(v) = f(ty & NLA_TYPE_MASK, v) {
            push_nla(&mut out, ty, &v);
        }
    }
    out
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Attributes as a hex string: half the size of a JSON array of numbers.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            text.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 {
            return Err(D::Error::custom("odd number of hex digits"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2).unwrap_or("zz"), 16).map_err(D::Error::custom))
            .collect()
    }
}
