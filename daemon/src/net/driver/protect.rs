//! Synthetic packets on the protected ports, run through the attached
//! classifier before an injection is kept: chaosd never cuts its own API
//! or a `--protect-port` port.

use std::net::IpAddr;

use chaosd_common::{DIR_EGRESS, PROTO_TCP, PROTO_UDP};

use super::NetworkDriver;
use crate::{
    net::{bpf, target::Device},
    spec::{NetworkFault, Protocol},
};

impl NetworkDriver {
    pub(super) fn protected_checks(&self, fault: &NetworkFault, devices: &[Device], dirs: &[u8]) -> Vec<Check> {
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
}

pub(super) struct Check {
    pub(super) ifindex: u32,
    pub(super) ifname: String,
    pub(super) dir: u8,
    pub(super) port: u16,
    pub(super) packet: Vec<u8>,
}
