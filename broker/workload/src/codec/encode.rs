//! Packet encoding for a negotiated protocol version.

use bytes::{BufMut, Bytes, BytesMut};

use super::{Packet, Properties, QoS, Version, reason};

pub fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn put_varint(buf: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        buf.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

pub fn put_str(buf: &mut BytesMut, s: &str) {
    put_bin(buf, s.as_bytes());
}

pub fn put_bin(buf: &mut BytesMut, b: &[u8]) {
    // Callers keep strings under 64 KiB (decoded ones are by construction).
    let len = b.len().min(u16::MAX as usize);
    buf.put_u16(len as u16);
    buf.put_slice(&b[..len]);
}

fn header(buf: &mut BytesMut, first: u8, remaining: usize) {
    buf.put_u8(first);
    put_varint(buf, remaining);
}

fn props_len(v5: bool, p: &Properties) -> usize {
    if v5 { p.encoded_len() } else { 0 }
}

/// Size of a PUBLISH on the wire, to honour the client's maximum packet size.
pub fn publish_size(version: Version, topic: &str, qos: QoS, props: &Properties, payload_len: usize) -> usize {
    let rem = 2
        + topic.len()
        + if qos == QoS::AtMostOnce { 0 } else { 2 }
        + props_len(version == Version::V5, props)
        + payload_len;
    1 + varint_len(rem) + rem
}

/// Writes a PUBLISH without building a `Publish` first (the routing hot path
/// shares one message among all subscribers).
#[expect(clippy::too_many_arguments, reason = "mirrors the PUBLISH header fields one to one")]
pub fn encode_publish_parts(
    buf: &mut BytesMut,
    version: Version,
    dup: bool,
    qos: QoS,
    retain: bool,
    topic: &str,
    pid: u16,
    props: &Properties,
    payload: &Bytes,
) {
    let v5 = version == Version::V5;
    let rem = 2 + topic.len() + if qos == QoS::AtMostOnce { 0 } else { 2 } + props_len(v5, props) + payload.len();
    let first = 0x30 | (u8::from(dup) << 3) | ((qos as u8) << 1) | u8::from(retain);
    buf.reserve(5 + rem);
    header(buf, first, rem);
    put_str(buf, topic);
    if qos != QoS::AtMostOnce {
        buf.put_u16(pid);
    }
    if v5 {
        props.encode(buf);
    }
    buf.put_slice(payload);
}

/// MQTT 3.1.1 CONNACK return code for a v5 reason code.
fn connack_v3(code: u8) -> u8 {
    match code {
        reason::SUCCESS => 0,
        reason::UNSUPPORTED_VERSION => 1,
        reason::CLIENT_ID_INVALID => 2,
        reason::BAD_USER_OR_PASSWORD => 4,
        reason::NOT_AUTHORIZED => 5,
        _ => 3,
    }
}

fn ack(buf: &mut BytesMut, first: u8, v5: bool, a: &super::Ack) {
    if v5 && (a.code != 0 || !a.props.is_empty()) {
        let plen = if a.props.is_empty() { 0 } else { a.props.encoded_len() };
        header(buf, first, 3 + plen);
        buf.put_u16(a.pid);
        buf.put_u8(a.code);
        if plen > 0 {
            a.props.encode(buf);
        }
    } else {
        header(buf, first, 2);
        buf.put_u16(a.pid);
    }
}

pub fn encode(pkt: &Packet, version: Version, buf: &mut BytesMut) {
    let v5 = version == Version::V5;
    match pkt {
        Packet::Connect(c) => {
            let v5 = c.version == Version::V5;
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0b10;
            }
            let mut body = 10 + props_len(v5, &c.props) + 2 + c.client_id.len();
            if let Some(w) = &c.will {
                flags |= 0b100 | ((w.qos as u8) << 3) | if w.retain { 0b10_0000 } else { 0 };
                body += props_len(v5, &w.props) + 4 + w.topic.len() + w.payload.len();
            }
            if let Some(u) = &c.username {
                flags |= 0b1000_0000;
                body += 2 + u.len();
            }
            if let Some(p) = &c.password {
                flags |= 0b100_0000;
                body += 2 + p.len();
            }
            header(buf, 0x10, body);
            put_str(buf, "MQTT");
            buf.put_u8(c.version.level());
            buf.put_u8(flags);
            buf.put_u16(c.keep_alive);
            if v5 {
                c.props.encode(buf);
            }
            put_str(buf, &c.client_id);
            if let Some(w) = &c.will {
                if v5 {
                    w.props.encode(buf);
                }
                put_str(buf, &w.topic);
                put_bin(buf, &w.payload);
            }
            if let Some(u) = &c.username {
                put_str(buf, u);
            }
            if let Some(p) = &c.password {
                put_bin(buf, p);
            }
        }
        Packet::ConnAck(c) => {
            header(buf, 0x20, 2 + props_len(v5, &c.props));
            buf.put_u8(u8::from(c.session_present));
            buf.put_u8(if v5 { c.code } else { connack_v3(c.code) });
            if v5 {
                c.props.encode(buf);
            }
        }
        Packet::Publish(p) => {
            encode_publish_parts(buf, version, p.dup, p.qos, p.retain, &p.topic, p.pid, &p.props, &p.payload)
        }
        Packet::PubAck(a) => ack(buf, 0x40, v5, a),
        Packet::PubRec(a) => ack(buf, 0x50, v5, a),
        Packet::PubRel(a) => ack(buf, 0x62, v5, a),
        Packet::PubComp(a) => ack(buf, 0x70, v5, a),
        Packet::Subscribe(s) => {
            let body = 2 + props_len(v5, &s.props) + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>();
            header(buf, 0x82, body);
            buf.put_u16(s.pid);
            if v5 {
                s.props.encode(buf);
            }
            for (f, o) in &s.filters {
                put_str(buf, f);
                let mut b = o.qos as u8;
                if v5 {
                    b |= u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | o.retain_handling << 4;
                }
                buf.put_u8(b);
            }
        }
        Packet::SubAck(s) => {
            header(buf, 0x90, 2 + props_len(v5, &s.props) + s.codes.len());
            buf.put_u16(s.pid);
            if v5 {
                s.props.encode(buf);
            }
            for c in &s.codes {
                buf.put_u8(if v5 || *c <= 2 { *c } else { 0x80 });
            }
        }
        Packet::Unsubscribe(u) => {
            let body = 2 + props_len(v5, &u.props) + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>();
            header(buf, 0xA2, body);
            buf.put_u16(u.pid);
            if v5 {
                u.props.encode(buf);
            }
            for f in &u.filters {
                put_str(buf, f);
            }
        }
        Packet::UnsubAck(u) => {
            if v5 {
                header(buf, 0xB0, 2 + u.props.encoded_len() + u.codes.len());
                buf.put_u16(u.pid);
                u.props.encode(buf);
                buf.put_slice(&u.codes);
            } else {
                header(buf, 0xB0, 2);
                buf.put_u16(u.pid);
            }
        }
        Packet::PingReq => header(buf, 0xC0, 0),
        Packet::PingResp => header(buf, 0xD0, 0),
        Packet::Disconnect(d) | Packet::Auth(d) => {
            let first = if matches!(pkt, Packet::Auth(_)) { 0xF0 } else { 0xE0 };
            if !v5 {
                header(buf, first, 0);
            } else if d.props.is_empty() {
                if d.code == 0 {
                    header(buf, first, 0);
                } else {
                    header(buf, first, 1);
                    buf.put_u8(d.code);
                }
            } else {
                header(buf, first, 1 + d.props.encoded_len());
                buf.put_u8(d.code);
                d.props.encode(buf);
            }
        }
    }
}
