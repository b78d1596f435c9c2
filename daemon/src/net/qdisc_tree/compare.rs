//! Comparing a device's tree with a saved one, in tc's words.

use super::*;

pub(super) fn compare(want: &SavedTree, have: &SavedTree) -> Vec<String> {
    let mut out = Vec::new();
    compare_lists(Role::Qdisc, &want.qdiscs, &have.qdiscs, &mut out);
    compare_lists(Role::Class, &want.classes, &have.classes, &mut out);
    compare_lists(Role::Chain, &want.chains, &have.chains, &mut out);
    compare_lists(Role::Filter, &want.filters, &have.filters, &mut out);
    out
}

pub(super) fn compare_lists(role: Role, want: &[SavedObject], have: &[SavedObject], out: &mut Vec<String>) {
    if want == have {
        return;
    }
    let identity = |o: &SavedObject| (o.kind.clone(), o.parent, o.handle, o.info, o.chain);
    let before = out.len();
    for w in want.iter().filter(|w| !have.contains(w)) {
        if have.iter().any(|h| identity(h) == identity(w)) {
            out.push(format!("{} has other parameters", describe(role, w)));
        } else {
            out.push(format!("{} is missing", describe(role, w)));
        }
    }
    for h in have.iter().filter(|h| !want.contains(h) && !want.iter().any(|w| identity(w) == identity(h))) {
        out.push(format!("{} is not in the saved tree", describe(role, h)));
    }
    if out.len() == before {
        let what = match role {
            Role::Qdisc => "qdiscs",
            Role::Class => "classes",
            Role::Chain => "chains",
            Role::Filter => "filters",
        };
        out.push(format!("the kernel lists the {what} in another order"));
    }
}

// ---------------------------------------------------------------------------
// Naming objects the way tc does

/// `1:`, `1:10`, `:1`, `root`.
pub fn handle_text(h: u32) -> String {
    match h {
        TC_H_ROOT => "root".to_string(),
        _ if h & 0xffff == 0 => format!("{:x}:", h >> 16),
        _ if h >> 16 == 0 => format!(":{:x}", h & 0xffff),
        _ => format!("{:x}:{:x}", h >> 16, h & 0xffff),
    }
}

/// u32's `800:` (a hash table) and `800::800` / `2:a:1` (a key node).
pub(super) fn u32_handle_text(h: u32) -> String {
    let (htid, hash, node) = (h >> 20, (h >> 12) & 0xff, h & 0xfff);
    let mut s = format!("{htid:x}:");
    if hash != 0 || node != 0 {
        if hash != 0 {
            s.push_str(&format!("{hash:x}"));
        }
        s.push(':');
        if node != 0 {
            s.push_str(&format!("{node:x}"));
        }
    }
    s
}

pub(super) fn describe(role: Role, o: &SavedObject) -> String {
    let parent = if o.parent == TC_H_ROOT { "root".to_string() } else { format!("parent {}", handle_text(o.parent)) };
    match role {
        Role::Qdisc => format!("qdisc {} {} {parent}", o.kind, handle_text(o.handle)),
        Role::Class => format!("class {} {} {parent}", o.kind, handle_text(o.handle)),
        Role::Chain => {
            let template = if o.kind.is_empty() { String::new() } else { format!(" (template {})", o.kind) };
            format!("chain {} {parent}{template}", o.chain.unwrap_or(0))
        }
        Role::Filter => {
            let handle = match (o.handle, o.kind.as_str()) {
                (0, _) => String::new(),
                (h, "u32") if is_bare(o) => format!(" (root table {})", u32_handle_text(h)),
                (h, "u32") => format!(" {}", u32_handle_text(h)),
                (h, _) => format!(" handle {h:#x}"),
            };
            let protocol = u16::from_be_bytes(((o.info & 0xffff) as u16).to_ne_bytes());
            format!(
                "filter {}{handle} {parent} chain {} pref {} protocol {protocol:#06x}",
                o.kind,
                o.chain.unwrap_or(0),
                o.info >> 16
            )
        }
    }
}
