//! chaosd's network fault classifiers: one for egress (`chaosd_tc`) and one
//! for ingress (`chaosd_tc_ingress`), attached once per device and driven
//! entirely by maps (see chaosd-common for the lookup scheme). Each loaded
//! copy serves one network namespace: `NETNS` is set by the loader, because
//! ifindexes repeat across namespaces and tc programs on older kernels (6.1)
//! have no bpf_get_netns_cookie.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use chaosd_common::*;

/// Inode of the network namespace this copy serves (set at load time).
#[unsafe(no_mangle)]
static NETNS: u32 = 0;

#[map]
static CHAOSD_CONTROL: Array<Control> = Array::with_max_entries(1, 0);
#[map]
static CHAOSD_DEVICES: HashMap<DevKey, DevConf> = HashMap::with_max_entries(MAX_DEVICES, 0);
/// BPF_F_NO_PREALLOC: large, sparsely used.
#[map]
static CHAOSD_INDEX: HashMap<IndexKey, Slot> = HashMap::with_max_entries(MAX_INDEX, 1);
#[map]
static CHAOSD_RULES: Array<Rule> = Array::with_max_entries(MAX_RULES, 0);
#[map]
static CHAOSD_PEERS: LpmTrie<PeerKey, u8> = LpmTrie::with_max_entries(MAX_PEERS, 1);
#[map]
static CHAOSD_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(MAX_RULES, 0);
#[map]
static CHAOSD_PROTECTED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_PROTECTED, 0);

const ETH_HLEN: usize = 14;
/// What a packet chaosd leaves alone gets: "no verdict, on to the next".
/// Under TCX that is TCX_NEXT, so programs attached after ours (another
/// chaosd's, a user's) still run; TCX_PASS would end the chain. Under
/// clsact it is TC_ACT_UNSPEC, which goes on to the next filter and, after
/// the last, passes the packet.
const PASS: i32 = TC_ACT_UNSPEC;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// What the parser learned about a packet.
struct Packet {
    proto: u8,
    sport: u16,
    dport: u16,
    /// The other end: destination on egress, source on ingress (IPv4 mapped).
    peer: [u8; 16],
}

#[classifier]
pub fn chaosd_tc(ctx: TcContext) -> i32 {
    classify(&ctx, DIR_EGRESS)
}

#[classifier]
pub fn chaosd_tc_ingress(ctx: TcContext) -> i32 {
    classify(&ctx, DIR_INGRESS)
}

/// Non-direct-action filter in front of the mirred action that moves
/// delayed ingress packets to the device's IFB: matches (-1: default
/// class) what the ingress classifier steered to one of chaosd's HTB
/// classes. A plain bpf_redirect to an IFB is dropped by the 6.1 kernel
/// (ifb_xmit wants skb->redirected, which act_mirred sets and bpf_redirect
/// did not there), so ingress goes through act_mirred on every kernel.
#[classifier]
pub fn chaosd_ifb_sel(ctx: TcContext) -> i32 {
    // SAFETY: reading a field of the kernel-provided __sk_buff.
    let prio = unsafe { (*ctx.skb.skb).priority };
    if prio >> 16 == HTB_MAJOR as u32 { -1 } else { 0 }
}

#[inline(always)]
fn netns() -> u32 {
    // SAFETY: a plain read of a loader-patched .rodata constant; volatile so
    // the compiler does not fold the placeholder value.
    unsafe { core::ptr::read_volatile(&NETNS) }
}

#[inline(always)]
fn classify(ctx: &TcContext, dir: u8) -> i32 {
    // SAFETY: ctx.skb.skb is the __sk_buff the kernel passed in; the verifier
    // checks every field access.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let ns = netns();
    let dev_key = DevKey { netns: ns, ifindex, dir: dir as u32 };
    // SAFETY: the value is copied out at once; updates race only with the
    // daemon replacing the whole value, which is atomic for 8 bytes.
    let dev = match unsafe { CHAOSD_DEVICES.get(&dev_key) } {
        Some(d) => *d,
        None => return PASS,
    };
    let pkt = match parse(ctx, dir) {
        Some(p) => p,
        None => return PASS,
    };
    let (id, rule) = match find_rule(ns, ifindex, dir, dev.mask, &pkt) {
        Some(r) => r,
        None => return PASS,
    };
    // Checked only for a packet that matched: a stale heartbeat makes every
    // rule void, and the most packets match none (no clock read for them).
    if !heartbeat_fresh() || protected(pkt.sport) || protected(pkt.dport) {
        return PASS;
    }
    act(ctx, dir, &dev, id, rule)
}

#[inline(always)]
fn heartbeat_fresh() -> bool {
    let Some(c) = CHAOSD_CONTROL.get(CONTROL_HEARTBEAT) else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    c.heartbeat_ns != 0 && now.saturating_sub(c.heartbeat_ns) <= c.grace_ns
}

#[inline(always)]
fn protected(port: u16) -> bool {
    // SAFETY: presence check only.
    port != 0 && unsafe { CHAOSD_PROTECTED.get(&(port as u32)) }.is_some()
}

/// `N` bytes at `off`: read straight from the packet when they are in its
/// linear part (the common case), through bpf_skb_load_bytes otherwise.
#[inline(always)]
fn header<const N: usize>(ctx: &TcContext, off: usize) -> Option<[u8; N]> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + N <= end {
        // SAFETY: the N bytes lie between data and data_end (checked just
        // above, which is also what the verifier requires).
        Some(unsafe { core::ptr::read_unaligned((start + off) as *const [u8; N]) })
    } else {
        ctx.load(off).ok()
    }
}

#[inline(always)]
fn parse(ctx: &TcContext, dir: u8) -> Option<Packet> {
    // SAFETY: reading a field of the kernel-provided __sk_buff.
    let eth_proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let mut peer = [0u8; 16];
    // One read per header: a helper call costs more than the parsing itself.
    let (proto, l4) = match eth_proto {
        ETH_P_IP => {
            let h: [u8; 20] = header(ctx, ETH_HLEN)?;
            if h[0] >> 4 != 4 {
                return None;
            }
            let ihl = ((h[0] & 0x0f) as usize) * 4;
            let frag = u16::from_be_bytes([h[6], h[7]]);
            let a = if dir == DIR_EGRESS { 16 } else { 12 };
            peer[10] = 0xff;
            peer[11] = 0xff;
            peer[12] = h[a];
            peer[13] = h[a + 1];
            peer[14] = h[a + 2];
            peer[15] = h[a + 3];
            // Later fragments carry no L4 header: match them on protocol and
            // peer only (port 0).
            let l4 = if frag & 0x1fff != 0 { None } else { Some(ETH_HLEN + ihl) };
            (h[9], l4)
        }
        ETH_P_IPV6 => {
            let h: [u8; 40] = header(ctx, ETH_HLEN)?;
            let a = if dir == DIR_EGRESS { 24 } else { 8 };
            let mut i = 0;
            while i < 16 {
                peer[i] = h[a + i];
                i += 1;
            }
            ipv6_transport(ctx, h[6])
        }
        _ => return None,
    };
    let (sport, dport) = match (proto, l4) {
        (PROTO_TCP | PROTO_UDP, Some(off)) => {
            let ports: [u8; 4] = header(ctx, off)?;
            (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]))
        }
        _ => (0, 0),
    };
    Some(Packet { proto, sport, dport, peer })
}

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTS: u8 = 60;

/// The transport protocol and header offset of an IPv6 packet, past up to
/// four extension headers (hop-by-hop, routing, fragment, destination
/// options, AH). A fragment other than the first has no transport header
/// (None, like a later IPv4 fragment); so has a packet whose headers cannot
/// be read or that carries more extension headers than that. Written out
/// step by step, without a loop: the 6.1 verifier refused the loop's
/// back-edge.
#[inline(always)]
fn ipv6_transport(ctx: &TcContext, first: u8) -> (u8, Option<usize>) {
    let (mut next, mut off) = (first, ETH_HLEN + 40);
    macro_rules! step {
        () => {
            if let Some(l4) = ipv6_ext_step(ctx, &mut next, &mut off) {
                return (next, l4);
            }
        };
    }
    step!();
    step!();
    step!();
    step!();
    match next {
        HOP_BY_HOP | ROUTING | DEST_OPTS | AUTH | FRAGMENT => (next, None),
        _ => (next, Some(off)),
    }
}

/// Moves past one extension header; Some(transport offset or None) once
/// the walk is over.
#[inline(always)]
fn ipv6_ext_step(ctx: &TcContext, next: &mut u8, off: &mut usize) -> Option<Option<usize>> {
    let this = *next;
    match this {
        HOP_BY_HOP | ROUTING | DEST_OPTS | AUTH | FRAGMENT => {
            let Some(e) = header::<4>(ctx, *off) else { return Some(None) };
            *next = e[0];
            *off += match this {
                FRAGMENT if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 => return Some(None),
                FRAGMENT => 8,
                AUTH => (e[1] as usize + 2) * 4,
                _ => (e[1] as usize + 1) * 8,
            };
            None
        }
        _ => Some(Some(*off)),
    }
}

/// Looks the packet up in the (at most four) index tables the device
/// uses: its protocol by destination port, by source port, by "any port",
/// and "all protocols, any port".
#[inline(always)]
fn find_rule(ns: u32, ifindex: u32, dir: u8, mask: u32, pkt: &Packet) -> Option<(u32, &'static Rule)> {
    let lookups = [
        (pkt.proto, ROLE_DPORT, pkt.dport, false),
        (pkt.proto, ROLE_SPORT, pkt.sport, false),
        (pkt.proto, ROLE_ANY, 0u16, false),
        (PROTO_ALL, ROLE_ANY, 0u16, true),
    ];
    let mut l = 0;
    while l < 4 {
        let (proto, role, port, all) = lookups[l];
        l += 1;
        if mask & mask_bit(all, role) == 0 || (role != ROLE_ANY && port == 0) {
            continue;
        }
        let key = IndexKey { netns: ns, ifindex, dir, proto, role, _pad: 0, port, _pad2: 0 };
        // SAFETY: the slot is copied out before use.
        let slot = match unsafe { CHAOSD_INDEX.get(&key) } {
            Some(s) => *s,
            None => continue,
        };
        let mut i = 0;
        while i < SLOT_RULES {
            let id = slot.rules[i];
            i += 1;
            if id == 0 {
                continue;
            }
            if let Some(rule) = CHAOSD_RULES.get(id) {
                if rule_matches(id, rule, pkt) {
                    return Some((id, rule));
                }
            }
        }
    }
    None
}

#[inline(always)]
fn in_spans(spans: &[PortSpan; MAX_RANGES], n: u8, port: u16) -> bool {
    let mut i = 0;
    while i < MAX_RANGES {
        if i >= n as usize {
            return false;
        }
        let s = spans[i];
        if port >= s.first && port <= s.last {
            return true;
        }
        i += 1;
    }
    false
}

#[inline(never)]
fn rule_matches(id: u32, rule: &Rule, pkt: &Packet) -> bool {
    if rule.action == ACTION_NONE {
        return false;
    }
    if rule.deadline_ns != 0 {
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_boot_ns() };
        if now >= rule.deadline_ns {
            return false;
        }
    }
    if rule.proto != PROTO_ALL && rule.proto != pkt.proto {
        return false;
    }
    if rule.has_ports != 0 && pkt.sport == 0 && pkt.dport == 0 {
        return false;
    }
    if rule.n_resid != 0 {
        let port = if rule.resid_role == ROLE_SPORT { pkt.sport } else { pkt.dport };
        if !in_spans(&rule.resid, rule.n_resid, port)
            && !(rule.resid_role == ROLE_ANY && in_spans(&rule.resid, rule.n_resid, pkt.sport))
        {
            return false;
        }
    }
    if rule.flags & FLAG_PEERS != 0 {
        let key = Key::new(32 + 128, PeerKey { rule: id.to_ne_bytes(), addr: pkt.peer });
        if CHAOSD_PEERS.get(&key).is_none() {
            return false;
        }
    }
    true
}

/// netem's get_crandom: a random u32 correlated with the previous one.
#[inline(always)]
fn correlated_random(rho: u32, last: &mut u32) -> u32 {
    // SAFETY: helper without arguments.
    let value = unsafe { bpf_get_prandom_u32() };
    if rho == 0 {
        return value;
    }
    let rho = rho as u64 + 1;
    let answer = ((value as u64) * ((1u64 << 32) - rho) + (*last as u64) * rho) >> 32;
    *last = answer as u32;
    answer as u32
}

#[inline(always)]
fn act(ctx: &TcContext, dir: u8, dev: &DevConf, id: u32, rule: &Rule) -> i32 {
    let stats = match CHAOSD_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot of this rule; tc programs run with
        // preemption disabled, so nothing else touches it meanwhile.
        Some(s) => unsafe { &mut *s },
        None => return PASS,
    };
    stats.matched += 1;
    match rule.action {
        ACTION_PARTITION => {
            stats.dropped += 1;
            TC_ACT_SHOT
        }
        ACTION_LOSS => {
            let rnd = correlated_random(rule.correlation, &mut stats.last_random);
            if (rnd as u64) < rule.loss_threshold {
                stats.dropped += 1;
                TC_ACT_SHOT
            } else {
                PASS
            }
        }
        ACTION_CLASSIFY => {
            stats.delayed += 1;
            // SAFETY: priority is writable for tc programs.
            unsafe { (*ctx.skb.skb).priority = rule.classid };
            if dir == DIR_INGRESS && dev.ifb_ifindex != 0 {
                // On to the next filter: chaosd_ifb_sel + mirred to the IFB.
                return TC_ACT_UNSPEC;
            }
            PASS
        }
        _ => PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
