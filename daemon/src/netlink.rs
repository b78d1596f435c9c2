//! A small synchronous rtnetlink client. One socket per namespace thread
//! (see `netns`): requests carry checked sequence numbers, strict checking
//! and extended acks are on, multipart dumps are collected, and errors carry
//! the kernel's errno and its extended-ack message.

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An rtnetlink request that the kernel refused, or a socket failure.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("{op}: {}{}", errno_text(*.errno), ext_ack_suffix(.ext_ack))]
    Kernel { op: String, errno: i32, ext_ack: Option<String> },
    #[error("{op}: netlink socket: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: cannot decode the kernel's answer: {detail}")]
    Decode { op: String, detail: String },
}

impl NetlinkError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn errno_text(errno: i32) -> String {
    format!("{} (errno {errno})", nix::errno::Errno::from_raw(errno).desc())
}

fn ext_ack_suffix(ext_ack: &Option<String>) -> String {
    ext_ack.as_ref().map(|m| format!(": kernel says \"{m}\"")).unwrap_or_default()
}

/// An rtnetlink socket bound in the namespace of the thread that opened it.
pub struct RouteSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl RouteSocket {
    pub fn open() -> Result<Self, NetlinkError> {
        let io = |source| NetlinkError::Io { op: "open rtnetlink socket".into(), source };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        socket.set_ext_ack(true).map_err(io)?;
        // Old kernels lack strict checking; it only tightens validation.
        let _ = socket.set_netlink_get_strict_chk(true);
        Ok(Self { socket, seq: 0, buf: vec![0; 1 << 16] })
    }

    /// Sends a request and waits for the kernel's ack.
    pub fn request(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
        self.exchange(op, msg, NLM_F_REQUEST | NLM_F_ACK | flags).map(|_| ())
    }

    /// Sends a dump request and collects every answer.
    pub fn dump(&mut self, op: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.exchange(op, msg, NLM_F_REQUEST | NLM_F_DUMP)
    }

    fn exchange(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(|source| NetlinkError::Io { op: op.into(), source })?;

        let is_dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answers = Vec::new();
        loop {
            let n = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|source| NetlinkError::Io { op: op.into(), source })?;
            let mut offset = 0;
            while offset < n {
                let bytes = &self.buf[offset..n];
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| NetlinkError::Decode { op: op.into(), detail: e.to_string() })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Decode { op: op.into(), detail: "zero-length message".into() });
                }
                offset += len;
                // Answers to an earlier, abandoned request are not ours.
                if reply.header.sequence_number != seq {
                    continue;
                }
                let reply_flags = reply.header.flags;
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(err) => match err.code {
                        None => return Ok(answers),
                        Some(code) => {
                            return Err(NetlinkError::Kernel {
                                op: op.into(),
                                errno: -code.get(),
                                ext_ack: parse_ext_ack(&err.header, reply_flags),
                            });
                        }
                    },
                    NetlinkPayload::InnerMessage(inner) => {
                        answers.push(inner);
                        if !is_dump {
                            // NLM_F_ECHO-style answers before the ack.
                            continue;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Extracts NLMSGERR_ATTR_MSG from an error message's payload (the echoed
/// request, capped to its header when NLM_F_CAPPED is set, followed by
/// attributes when NLM_F_ACK_TLVS is set). See netlink(7).
fn parse_ext_ack(payload: &[u8], flags: u16) -> Option<String> {
    const NLMSGERR_ATTR_MSG: u16 = 1;
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 16 {
        return None;
    }
    let echoed =
        if flags & NLM_F_CAPPED != 0 { 16 } else { u32::from_ne_bytes(payload[0..4].try_into().ok()?) as usize };
    let mut rest = payload.get(echoed..)?;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &rest[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext_ack_message_is_extracted_from_capped_error() {
        let mut payload = vec![0u8; 16];
        let text = b"Specified qdisc kind is unknown\0";
        let len = (4 + text.len()) as u16;
        payload.extend_from_slice(&len.to_ne_bytes());
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(text);
        let msg = parse_ext_ack(&payload, NLM_F_CAPPED | NLM_F_ACK_TLVS);
        assert_eq!(msg.as_deref(), Some("Specified qdisc kind is unknown"));
        assert_eq!(parse_ext_ack(&payload, NLM_F_CAPPED), None);
    }

    #[test]
    fn kernel_error_names_op_errno_and_ack() {
        let e = NetlinkError::Kernel {
            op: "add netem qdisc on lo".into(),
            errno: libc::ENOENT,
            ext_ack: Some("Specified qdisc kind is unknown".into()),
        };
        let s = e.to_string();
        assert!(s.starts_with("add netem qdisc on lo: "), "{s}");
        assert!(s.contains("errno 2") && s.contains("kernel says"), "{s}");
    }
}
