//! Attaching the classifiers to devices (TCX links, pinned; or cls_bpf
//! filters under clsact) and running them on synthetic packets
//! (`BPF_PROG_TEST_RUN`), on a thread inside the target namespace.

use super::*;

/// Which attach mechanism an attachment used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AttachKind {
    Tcx,
    Clsact,
}

fn attach_type(dir: u8) -> TcAttachType {
    if dir == DIR_EGRESS { TcAttachType::Egress } else { TcAttachType::Ingress }
}

/// Attaches the namespace's pinned classifier to `ifname`. Must run on a
/// thread inside the namespace. TCX links are pinned at `link_pin`; a
/// cls_bpf filter under clsact carries `label` as its name (its owner).
pub fn attach(
    prog_pin: &Path,
    link_pin: &Path,
    ifname: &str,
    dir: u8,
    kind: AttachKind,
    label: &str,
) -> Result<(), BpfError> {
    let mut prog = SchedClassifier::from_pin(prog_pin)
        .map_err(|source| BpfError::Program { what: format!("open pinned program {}", prog_pin.display()), source })?;
    let what = format!("attach chaosd's classifier to {ifname} {:?}", attach_type(dir));
    match kind {
        AttachKind::Tcx => {
            let id = prog
                .attach_with_options(ifname, attach_type(dir), TcAttachOptions::TcxOrder(LinkOrder::first()))
                .map_err(|source| BpfError::Program { what: what.clone(), source })?;
            let link = prog.take_link(id).map_err(|source| BpfError::Program { what: what.clone(), source })?;
            let fd: FdLink = link.try_into().map_err(|e| BpfError::Other(format!("{what}: {e}")))?;
            let _ = fs::remove_file(link_pin);
            fd.pin(link_pin).map_err(|e| BpfError::Other(format!("pin link at {}: {e}", link_pin.display())))?;
        }
        AttachKind::Clsact => {
            use std::os::fd::{AsFd, AsRawFd};
            // Our own netlink request rather than aya's, which names the
            // filter after the program: the name is where the owner goes.
            let fd = prog.fd().map_err(|source| BpfError::Program { what: what.clone(), source })?;
            let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(|e| BpfError::Other(format!("{what}: {e}")))?;
            let mut sock = crate::netlink::RouteSocket::open().map_err(|e| BpfError::Other(format!("{what}: {e}")))?;
            let parent = if dir == DIR_EGRESS { crate::tc::CLSACT_EGRESS } else { crate::tc::CLSACT_INGRESS };
            crate::tc::bpf_filter_add(
                &mut sock,
                ifindex,
                &crate::tc::BpfFilter {
                    parent,
                    priority: FILTER_PRIORITY,
                    chain: None,
                    prog_fd: fd.as_fd().as_raw_fd(),
                    name: label,
                    direct_action: true,
                    actions: None,
                },
            )
            .map_err(|e| BpfError::Other(format!("{what}: {e}")))?;
        }
    }
    Ok(())
}

/// Removes a pinned TCX link (detaching it); a missing pin is not an error.
pub fn unpin_link(link_pin: &Path) -> Result<(), BpfError> {
    match PinnedLink::from_pin(link_pin) {
        Ok(link) => {
            let fd = link.unpin().map_err(io(format!("unpin {}", link_pin.display())))?;
            drop(fd);
            Ok(())
        }
        Err(_) if !link_pin.exists() => Ok(()),
        // A link whose device is gone still has a pin file: remove it.
        Err(_) => fs::remove_file(link_pin).map_err(io(format!("remove {}", link_pin.display()))),
    }
}

/// Removes chaosd's cls_bpf filter named `label` from `ifname` (namespace
/// thread). A filter that is not there is not an error.
pub fn detach_filter(ifname: &str, dir: u8, label: &str) -> Result<(), BpfError> {
    match aya::programs::tc::qdisc_detach_program(ifname, attach_type(dir), label) {
        Ok(()) => Ok(()),
        Err(aya::programs::tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BpfError::Other(format!("detach chaosd's filter from {ifname}: {e}"))),
    }
}

/// The name chaosd gives its classifier filter of a direction.
pub fn prog_name(dir: u8) -> &'static str {
    if dir == DIR_EGRESS { PROG_EGRESS } else { PROG_INGRESS }
}

/// Opens a pinned classifier (for `test_run`).
pub fn open_pinned(prog_pin: &Path) -> Result<SchedClassifier, BpfError> {
    SchedClassifier::from_pin(prog_pin)
        .map_err(|source| BpfError::Program { what: format!("open pinned program {}", prog_pin.display()), source })
}

/// Runs a classifier `repeat` times on `packet` as if on device `ifindex`
/// (BPF_PROG_TEST_RUN; namespace thread, since the ifindex is resolved in
/// the caller's namespace). Returns the verdict and the time per run.
pub fn test_run(prog: &SchedClassifier, ifindex: u32, packet: &[u8], repeat: u32) -> Result<(u32, Duration), BpfError> {
    use aya::programs::{TestRun, TestRunOptions};
    // struct __sk_buff up to and including ifindex (offset 40).
    let mut ctx = vec![0u8; 192];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; packet.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    opts.repeat = repeat;
    let r = prog.test_run(opts).map_err(|source| BpfError::Program { what: "BPF_PROG_TEST_RUN".into(), source })?;
    Ok((r.return_value, r.duration))
}

/// A minimal Ethernet + IP + TCP/UDP packet for `test_run`.
pub fn synth_packet(src: std::net::IpAddr, dst: std::net::IpAddr, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    let l4_len = if proto == PROTO_TCP { 20 } else { 8 };
    let mut l4 = vec![0u8; l4_len];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == PROTO_TCP {
        l4[12] = 5 << 4;
        l4[13] = 0x02; // SYN
    } else {
        l4[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    match (src, dst) {
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            p.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            p.extend_from_slice(&h);
        }
        (s, d) => {
            let (s, d) = (to_v4(s), to_v4(d));
            p.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            p.extend_from_slice(&h);
        }
    }
    p.extend_from_slice(&l4);
    p
}

fn to_v4(a: std::net::IpAddr) -> std::net::Ipv4Addr {
    match a {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
    }
}

/// A peer-trie key.
pub fn peer_key(id: u32, len: u32, addr: [u8; 16]) -> Key<PeerKey> {
    Key::new(32 + len, PeerKey { rule: id.to_ne_bytes(), addr })
}
