//! A user's own root qdisc tree survives a forced fault: `qdisc_tree`
//! saves it, something else replaces the root (as chaosd's HTB does under
//! `--force`), and restoring it must make `tc` print exactly what it
//! printed before: qdiscs, classes, chains and filters, with and without
//! `-d`. Also the kernel's default roots (noqueue, pfifo_fast, mq), a tree
//! the kernel refuses, and an action index taken while the tree was gone.
//!
//! Each test builds its devices in a network namespace of its own, removed
//! by a guard also when the test fails. This kernel has no fq_codel, netem,
//! prio, matchall or basic, so the leaves are tbf and the fifos and the
//! second classifier is cls_bpf with classic BPF.

mod net_support;

use std::process::Command;

use chaosd::{
    net::qdisc_tree::{self, QdiscTreeError, SavedTree},
    netlink::RouteSocket,
    netns::NetnsRef,
};
use net_support::{require_root, sh};

/// A network namespace with IPv6 off, so nothing the kernel sends on its
/// own (router solicitations) moves a counter tc prints.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Self {
        require_root();
        let ns = Ns(format!("chaosd-qt-{}-{tag}", std::process::id()));
        sh(&format!(
            "ip netns add {0} && ip netns exec {0} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
             net.ipv6.conf.default.disable_ipv6=1",
            ns.0
        ));
        ns
    }

    fn veth(&self, a: &str, b: &str) {
        sh(&format!(
            "ip -n {0} link add {a} type veth peer name {b} && ip -n {0} link set {a} up && ip -n {0} link set {b} up",
            self.0
        ));
    }

    fn ifb(&self, name: &str, queues: u32) {
        sh(&format!("ip -n {0} link add {name} numtxqueues {queues} type ifb && ip -n {0} link set {name} up", self.0));
    }

    /// Runs tc commands (one per line) in the namespace.
    fn tc(&self, script: &str) {
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            sh(&format!("ip netns exec {} tc {line}", self.0));
        }
    }

    /// Output and errors of a command in the namespace, whatever its status.
    fn output(&self, cmd: &str) -> String {
        let out =
            Command::new("sh").arg("-c").arg(format!("ip netns exec {} {cmd} 2>&1", self.0)).output().expect("run sh");
        format!("$ {cmd}\n{}", String::from_utf8_lossy(&out.stdout))
    }

    /// Everything tc shows of a device's tree: qdiscs and classes, then
    /// chains and filters of every qdisc and class, each plain and with -d.
    fn show(&self, dev: &str) -> String {
        let mut out = String::new();
        let qdiscs = self.output(&format!("tc qdisc show dev {dev}"));
        let classes = self.output(&format!("tc class show dev {dev}"));
        for cmd in ["qdisc", "class"] {
            out += &self.output(&format!("tc {cmd} show dev {dev}"));
            out += &self.output(&format!("tc -d {cmd} show dev {dev}"));
        }
        out += &self.output(&format!("tc filter show dev {dev}"));
        let parents = qdiscs
            .lines()
            .chain(classes.lines())
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w.len() > 2 && (w[0] == "qdisc" || w[0] == "class") && w[2] != "0:").then(|| w[2].to_string())
            })
            .collect::<Vec<_>>();
        for p in parents {
            for cmd in ["tc filter show", "tc -d filter show", "tc chain show"] {
                out += &self.output(&format!("{cmd} dev {dev} parent {p}"));
            }
        }
        out
    }

    fn run<T: Send>(&self, dev: &str, f: impl FnOnce(&mut RouteSocket, u32) -> T + Send) -> T {
        let dev = dev.to_string();
        NetnsRef::named(&self.0)
            .run(move || {
                let mut sock = RouteSocket::open().expect("rtnetlink socket");
                let ifindex = nix::net::if_::if_nametoindex(dev.as_str()).expect("device index");
                f(&mut sock, ifindex)
            })
            .expect("run in the test namespace")
    }

    fn save(&self, dev: &str) -> SavedTree {
        let tree = self.run(dev, qdisc_tree::save).unwrap_or_else(|e| panic!("save: {e}"));
        // What the daemon journals, and what it reads back after a crash.
        let json = serde_json::to_string(&tree).unwrap();
        eprintln!("saved tree of {dev}: {} bytes of JSON", json.len());
        serde_json::from_str(&json).unwrap()
    }

    fn restore(&self, dev: &str, tree: &SavedTree) -> Result<(), QdiscTreeError> {
        self.run(dev, |sock, ifindex| qdisc_tree::restore(sock, ifindex, tree))
    }

    fn differences(&self, dev: &str, tree: &SavedTree) -> Vec<String> {
        self.run(dev, |sock, ifindex| qdisc_tree::differences(sock, ifindex, tree)).unwrap()
    }

    /// What chaosd does under --force: its own HTB replaces the root.
    fn replace_root(&self, dev: &str) {
        self.tc(&format!(
            "qdisc replace dev {dev} root handle c4a0: htb default 2
             class add dev {dev} parent c4a0: classid c4a0:2 htb rate 10gbit"
        ));
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// An HTB tree with inner and leaf classes of different rates (enough for
/// the class hash to grow twice), tbf and fifo leaves (two of them in one
/// bucket of the device's qdisc hash), a nested HTB, u32 filters (one with a mirred action, one bound
/// to a shared action, a hash table with a link, one on a class, one on
/// another chain, and u32 ids with a gap left by a deleted filter), two
/// classic-BPF filters and an explicit empty chain.
fn build_user_tree(ns: &Ns, dev: &str, peer: &str) {
    ns.tc(&format!(
        "qdisc add dev {dev} root handle 1: htb default 20 r2q 5
         class add dev {dev} parent 1: classid 1:1 htb rate 100mbit ceil 100mbit
         class add dev {dev} parent 1:1 classid 1:10 htb rate 30mbit ceil 80mbit prio 1
         class add dev {dev} parent 1:1 classid 1:20 htb rate 10mbit ceil 100mbit burst 15k prio 2
         class add dev {dev} parent 1:1 classid 1:30 htb rate 5mbit ceil 20mbit quantum 3000
         class add dev {dev} parent 1: classid 1:5 htb rate 1gbit
         qdisc add dev {dev} parent 1:10 handle 10: tbf rate 20mbit burst 32kbit latency 50ms
         qdisc add dev {dev} parent 1:20 handle 20: pfifo limit 500
         qdisc add dev {dev} parent 1:30 handle 30: bfifo limit 60000
         qdisc add dev {dev} parent 1:5 handle 5: htb default 1
         class add dev {dev} parent 5: classid 5:1 htb rate 500mbit
         qdisc add dev {dev} parent 5:1 handle 51: pfifo_head_drop limit 64
         class add dev {dev} parent 1:1 classid 1:40 htb rate 2mbit ceil 4mbit
         qdisc add dev {dev} parent 1:40 handle 40: pfifo limit 40
         filter add dev {dev} parent 1: protocol ip prio 3 u32 match ip src 10.0.0.0/8 action mirred egress mirror dev {peer}
         filter add dev {dev} parent 1: protocol ip prio 9 u32 match ip dport 9 0xffff flowid 1:20
         filter del dev {dev} parent 1: protocol ip prio 9
         filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip dport 5201 0xffff flowid 1:10
         filter add dev {dev} parent 1: protocol ip prio 5 handle 2: u32 divisor 16
         filter add dev {dev} parent 1: protocol ip prio 5 u32 link 2: hashkey mask 0x000000ff at 16 match ip dst 10.1.0.0/16
         filter add dev {dev} parent 1: protocol ip prio 5 u32 ht 2:a: match ip dst 10.1.1.10/32 flowid 1:30
         filter add dev {dev} parent 1: protocol ip prio 2 bpf bytecode '1,6 0 0 0,' classid 1:20
         filter add dev {dev} parent 1: protocol ip prio 2 bpf bytecode '1,6 0 0 65535,' classid 1:30
         filter add dev {dev} parent 1:1 protocol ip prio 1 u32 match ip sport 80 0xffff flowid 1:10
         chain add dev {dev} parent 1:1 chain 9
         chain add dev {dev} parent 1: chain 7
         filter add dev {dev} parent 1: chain 3 protocol ip prio 1 u32 match ip tos 0x10 0xff flowid 1:20
         actions add action mirred egress mirror dev {peer} index 50
         filter add dev {dev} parent 1: protocol ip prio 4 u32 match ip dport 22 0xffff action mirred index 50
         filter add dev {dev} parent 5: protocol all prio 4 u32 match u32 0 0 flowid 5:1"
    ));
}

#[test]
fn user_tree_is_recreated_exactly_after_a_forced_replacement() {
    let ns = Ns::new("user");
    ns.veth("t0", "t1");
    build_user_tree(&ns, "t0", "t1");
    let before = ns.show("t0");
    // The tree is what the test means it to be.
    for expected in [
        "fh 802::800",
        "fh 2:a:800",
        "link 2:",
        "chain 3",
        "chain chain 7",
        "qdisc pfifo_head_drop 51: parent 5:1",
        "Egress Mirror to device t1",
        "index 50 ref 2 bind 1",
        "bytecode '1,6 0 0 65535'",
        "direct_packets_stat 0",
        // 40: and 5: share a bucket of the qdisc hash: newest first.
        "qdisc pfifo 40: parent 1:40 limit 40p\nqdisc htb 5: parent 1:5",
    ] {
        assert!(before.contains(expected), "{expected:?} not in\n{before}");
    }

    let tree = ns.save("t0");
    assert!(!tree.is_kernel_default());
    assert!(ns.differences("t0", &tree).is_empty(), "{:?}", ns.differences("t0", &tree));

    ns.replace_root("t0");
    assert_ne!(ns.show("t0"), before);
    let diffs = ns.differences("t0", &tree);
    assert!(diffs.iter().any(|d| d.contains("qdisc htb 1: root is missing")), "{diffs:?}");

    ns.restore("t0", &tree).unwrap_or_else(|e| panic!("restore: {e}"));
    assert_eq!(ns.show("t0"), before);
    assert_eq!(ns.differences("t0", &tree), Vec::<String>::new());

    // A second restore (say, after a crash right after the first) is a no-op.
    ns.restore("t0", &tree).unwrap();
    assert_eq!(ns.show("t0"), before);
}

#[test]
fn kernel_default_roots_come_back_when_the_replacement_goes() {
    let ns = Ns::new("default");
    ns.veth("t0", "t1"); // noqueue
    ns.ifb("q1", 1); // pfifo_fast
    ns.ifb("q3", 3); // mq with a pfifo_fast per queue
    for dev in ["t0", "q1", "q3"] {
        let before = ns.show(dev);
        let tree = ns.save(dev);
        assert!(tree.is_kernel_default(), "{dev}: {tree:?}");
        ns.replace_root(dev);
        assert_ne!(ns.show(dev), before);
        ns.restore(dev, &tree).unwrap_or_else(|e| panic!("restore {dev}: {e}"));
        assert_eq!(ns.show(dev), before, "{dev}");
        assert!(ns.differences(dev, &tree).is_empty());
    }

    // A user's mq root: its default children come with it, the user's
    // grafted child must come back.
    ns.ifb("q4", 3);
    ns.tc("qdisc add dev q4 root handle 7: mq
         qdisc replace dev q4 parent 7:2 handle 8005: tbf rate 1mbit burst 10k latency 10ms");
    let before = ns.show("q4");
    assert!(before.contains("qdisc tbf 8005: parent 7:2"), "{before}");
    let tree = ns.save("q4");
    assert!(!tree.is_kernel_default());
    ns.replace_root("q4");
    ns.restore("q4", &tree).unwrap_or_else(|e| panic!("restore q4: {e}"));
    assert_eq!(ns.show("q4"), before);
}

#[test]
fn a_refused_object_is_named_and_the_device_keeps_the_kernel_default() {
    let ns = Ns::new("refused");
    ns.veth("t0", "t1");
    let default_root = ns.output("tc qdisc show dev t0");
    ns.tc("qdisc add dev t0 root handle 1: htb default 10
         class add dev t0 parent 1: classid 1:10 htb rate 30mbit
         qdisc add dev t0 parent 1:10 handle 10: tbf rate 20mbit burst 32kbit latency 50ms
         filter add dev t0 parent 1: protocol ip prio 1 u32 match ip dport 5201 0xffff flowid 1:10");
    let before = ns.show("t0");
    let tree = ns.save("t0");

    // The saved leaf, but of a kind this kernel does not have.
    let mut bad = tree.clone();
    bad.qdiscs.iter_mut().find(|q| q.kind == "tbf").unwrap().kind = "netem".into();
    ns.replace_root("t0");
    let err = ns.restore("t0", &bad).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, QdiscTreeError::Recreate { .. }), "{text}");
    assert!(text.contains("qdisc netem 10: parent 1:10"), "{text}");
    assert!(text.contains("kernel says"), "the kernel's own message: {text}");
    assert!(text.contains("left with the kernel's default root qdisc"), "{text}");
    assert_eq!(ns.output("tc qdisc show dev t0"), default_root, "nothing half-built stays");
    assert!(ns.output("tc filter show dev t0").lines().count() == 1);

    // The real tree still restores from there.
    ns.restore("t0", &tree).unwrap();
    assert_eq!(ns.show("t0"), before);
}

#[test]
fn a_filter_never_binds_to_an_action_that_took_its_index_meanwhile() {
    let ns = Ns::new("actions");
    ns.veth("t0", "t1");
    ns.tc(
        "qdisc add dev t0 root handle 1: htb
         filter add dev t0 parent 1: protocol ip prio 1 u32 match ip src 10.0.0.0/8 action mirred egress mirror dev t1",
    );
    let before = ns.show("t0");
    assert!(before.contains("index 1 ref 1 bind 1"), "{before}");
    let tree = ns.save("t0");
    ns.replace_root("t0");
    // Someone else's action now has index 1 (chaosd's own redirect could),
    // once the kernel has freed the filter's (it does so from a work queue).
    let add = "tc actions add action mirred egress redirect dev t1 index 1";
    let added = (0..100).any(|_| {
        let ok = Command::new("ip").args(["netns", "exec", &ns.0]).args(add.split(' ')).status().unwrap().success();
        if !ok {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ok
    });
    assert!(added, "{add}");

    ns.restore("t0", &tree).unwrap();
    let other = ns.output("tc actions get action mirred index 1");
    assert!(other.contains("ref 1 bind 0"), "the other action is not bound to: {other}");
    let after = ns.show("t0");
    assert!(after.contains("Egress Mirror to device t1"), "{after}");
    assert!(after.contains("index 2 ref 1 bind 1"), "{after}");
    // Not exact, and the daemon can say so.
    let diffs = ns.differences("t0", &tree);
    assert!(diffs.iter().any(|d| d.contains("filter u32 800::800") && d.contains("other parameters")), "{diffs:?}");
}
