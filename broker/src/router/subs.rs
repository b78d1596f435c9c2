//! Subscription table: a trie over topic levels, owned by the router.
//!
//! Subscribers are named by session (client id) or, for the routes of
//! other nodes, by `cluster::REMOTE_PREFIX` + node name: a node is one
//! member of a shared group however many members it has there.

use std::sync::Arc;

use foldhash::HashMap;

use crate::codec::SubOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sub {
    pub opts: SubOptions,
    pub id: Option<u32>,
}

struct Shared {
    /// The group's topic filter (without `$share/group/`), for `Placement`.
    filter: Box<str>,
    members: Vec<(Arc<str>, Sub)>,
    next: usize,
}

/// How `SubTable::matches` places a message in the shared groups it matches.
pub trait Placement {
    /// Whether this message goes to a member of group `group` of `filter`
    /// at all.
    fn group(&self, filter: &str, group: &str) -> bool;
    /// Whether `member` may be chosen.
    fn eligible(&self, member: &str) -> bool;
    /// Whether `member` is preferred (connected, or its node up).
    fn online(&self, member: &str) -> bool;
}

/// Every group, every member, all online: a plain round robin.
pub struct Everyone;

impl Placement for Everyone {
    fn group(&self, _: &str, _: &str) -> bool {
        true
    }
    fn eligible(&self, _: &str) -> bool {
        true
    }
    fn online(&self, _: &str) -> bool {
        true
    }
}

/// What `matches` reports: a subscriber, and for a shared group's chosen
/// member the group's (filter, group).
pub type Out<'a> = dyn FnMut(&Arc<str>, &Sub, Option<(&str, &str)>) + 'a;

#[derive(Default)]
struct Leaf {
    subs: HashMap<Arc<str>, Sub>,
    shared: HashMap<String, Shared>,
}

impl Leaf {
    fn is_empty(&self) -> bool {
        self.subs.is_empty() && self.shared.is_empty()
    }
}

#[derive(Default)]
struct Node {
    children: HashMap<String, Node>,
    plus: Option<Box<Node>>,
    hash: Leaf,
    here: Leaf,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.here.is_empty()
    }
}

#[derive(Default)]
pub struct SubTable {
    root: Node,
    count: usize,
}

fn leaf_mut<'a>(mut node: &'a mut Node, filter: &str) -> &'a mut Leaf {
    for level in filter.split('/') {
        node = match level {
            "#" => return &mut node.hash,
            "+" => node.plus.get_or_insert_with(Box::default),
            l => node.children.entry(l.to_owned()).or_default(),
        };
    }
    &mut node.here
}

/// Removes from the leaf of `filter` with `f`; prunes empty nodes. Returns
/// whether something was removed.
fn remove_in(node: &mut Node, levels: &[&str], f: &mut dyn FnMut(&mut Leaf) -> bool) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return f(&mut node.here);
    };
    match *first {
        "#" => f(&mut node.hash),
        "+" => {
            let Some(child) = node.plus.as_mut() else {
                return false;
            };
            let removed = remove_in(child, rest, f);
            if child.is_empty() {
                node.plus = None;
            }
            removed
        }
        l => {
            let Some(child) = node.children.get_mut(l) else {
                return false;
            };
            let removed = remove_in(child, rest, f);
            if child.is_empty() {
                node.children.remove(l);
            }
            removed
        }
    }
}

impl SubTable {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces; returns true when the subscription is new.
    pub fn insert(&mut self, client: &Arc<str>, share: Option<&str>, filter: &str, sub: Sub) -> bool {
        let leaf = leaf_mut(&mut self.root, filter);
        let new = match share {
            None => leaf.subs.insert(client.clone(), sub).is_none(),
            Some(g) => {
                let group = leaf.shared.entry(g.to_owned()).or_insert_with(|| Shared {
                    filter: filter.into(),
                    members: Vec::new(),
                    next: 0,
                });
                match group.members.iter_mut().find(|(c, _)| c == client) {
                    Some(m) => {
                        m.1 = sub;
                        false
                    }
                    None => {
                        group.members.push((client.clone(), sub));
                        true
                    }
                }
            }
        };
        if new {
            self.count += 1;
        }
        new
    }

    pub fn remove(&mut self, client: &str, share: Option<&str>, filter: &str) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_in(&mut self.root, &levels, &mut |leaf| match share {
            None => leaf.subs.remove(client).is_some(),
            Some(g) => {
                let Some(group) = leaf.shared.get_mut(g) else {
                    return false;
                };
                let before = group.members.len();
                group.members.retain(|(c, _)| &**c != client);
                let removed = group.members.len() != before;
                if group.members.is_empty() {
                    leaf.shared.remove(g);
                }
                removed
            }
        });
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Calls `out` for every subscription matching `topic`. For each shared
    /// group that `place` takes, one eligible member is chosen, round robin,
    /// preferring online ones.
    pub fn matches(&mut self, topic: &str, place: &dyn Placement, out: &mut Out) {
        let dollar = topic.starts_with('$');
        // Topics of up to 16 levels are split on the stack: no allocation
        // per publish.
        let mut on_stack = [""; 16];
        let mut n = 0;
        for level in topic.split('/') {
            if n == on_stack.len() {
                let levels: Vec<&str> = topic.split('/').collect();
                return walk(&mut self.root, &levels, 0, dollar, place, out);
            }
            on_stack[n] = level;
            n += 1;
        }
        walk(&mut self.root, &on_stack[..n], 0, dollar, place, out);
    }
}

fn visit(leaf: &mut Leaf, place: &dyn Placement, out: &mut Out) {
    for (c, s) in &leaf.subs {
        out(c, s, None);
    }
    for (name, group) in leaf.shared.iter_mut() {
        let n = group.members.len();
        if n == 0 || !place.group(&group.filter, name) {
            continue;
        }
        let start = group.next % n;
        let order = || (0..n).map(|i| (start + i) % n).filter(|&i| place.eligible(&group.members[i].0));
        let Some(pick) = order().find(|&i| place.online(&group.members[i].0)).or_else(|| order().next()) else {
            continue;
        };
        group.next = pick + 1;
        let (c, s) = &group.members[pick];
        out(c, s, Some((&group.filter, name)));
    }
}

fn walk(node: &mut Node, levels: &[&str], idx: usize, dollar: bool, place: &dyn Placement, out: &mut Out) {
    let wild_ok = !(idx == 0 && dollar);
    if wild_ok {
        visit(&mut node.hash, place, out);
    }
    let Some(level) = levels.get(idx) else {
        visit(&mut node.here, place, out);
        return;
    };
    if let Some(child) = node.children.get_mut(*level) {
        walk(child, levels, idx + 1, dollar, place, out);
    }
    if wild_ok && let Some(child) = node.plus.as_mut() {
        walk(child, levels, idx + 1, dollar, place, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;

    fn collect(t: &mut SubTable, topic: &str) -> Vec<String> {
        let mut v = Vec::new();
        t.matches(topic, &Everyone, &mut |c, _, _| v.push(c.to_string()));
        v.sort();
        v
    }

    #[test]
    fn trie_matches_like_the_reference() {
        let filters = ["a/b", "a/+", "a/#", "#", "+/b", "+", "$SYS/#", "a/+/c", "/a", "+/+"];
        let topics = ["a/b", "a", "a/b/c", "$SYS/x", "b", "/a", "a/", "x/b"];
        let mut t = SubTable::default();
        let sub = Sub { opts: SubOptions::qos(QoS::AtMostOnce), id: None };
        for (i, f) in filters.iter().enumerate() {
            t.insert(&Arc::from(format!("c{i}")), None, f, sub);
        }
        for topic in topics {
            let mut want: Vec<String> = filters
                .iter()
                .enumerate()
                .filter(|(_, f)| crate::topic::matches(f, topic))
                .map(|(i, _)| format!("c{i}"))
                .collect();
            want.sort();
            assert_eq!(collect(&mut t, topic), want, "topic {topic}");
        }
        for (i, f) in filters.iter().enumerate() {
            assert!(t.remove(&format!("c{i}"), None, f));
        }
        assert!(t.root.is_empty());
        assert_eq!(t.len(), 0);
    }

    /// Topics deeper than the 16 levels split on the stack match the same.
    #[test]
    fn deep_topics_match() {
        let mut t = SubTable::default();
        let sub = Sub { opts: SubOptions::qos(QoS::AtMostOnce), id: None };
        let deep: Vec<String> = (0..20).map(|i| format!("l{i}")).collect();
        let topic = deep.join("/");
        t.insert(&Arc::from("exact"), None, &topic, sub);
        t.insert(&Arc::from("hash"), None, "l0/l1/#", sub);
        t.insert(&Arc::from("plus"), None, &format!("{}/+", deep[..19].join("/")), sub);
        t.insert(&Arc::from("short"), None, "l0/l1", sub);
        assert_eq!(collect(&mut t, &topic), ["exact", "hash", "plus"]);
    }

    #[test]
    fn shared_round_robin() {
        let mut t = SubTable::default();
        let sub = Sub { opts: SubOptions::qos(QoS::AtMostOnce), id: None };
        t.insert(&Arc::from("x"), Some("g"), "s/#", sub);
        t.insert(&Arc::from("y"), Some("g"), "s/#", sub);
        let a = collect(&mut t, "s/1");
        let b = collect(&mut t, "s/1");
        assert_eq!(a.len(), 1);
        assert_ne!(a, b);
    }
}
