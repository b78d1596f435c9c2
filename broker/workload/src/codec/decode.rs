//! Packet decoding. Every read is bounds-checked through `Rd`; no indexing,
//! no arithmetic that can overflow on attacker-chosen lengths.

use bytes::{Buf, Bytes, BytesMut};

use super::{
    Ack, ConnAck, Connect, Disconnect, Packet, Properties, Publish, QoS, SubAck, SubOptions, Subscribe, UnsubAck,
    Unsubscribe, Version, Will, reason,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    TooLarge { size: usize, max: usize },
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedVersion { name: String, level: u8 },
}

impl DecodeError {
    /// The v5 reason code that goes into the DISCONNECT (or CONNACK).
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedVersion { .. } => reason::UNSUPPORTED_VERSION,
        }
    }

    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Protocol(_) => "protocol_error",
            DecodeError::TooLarge { .. } => "packet_too_large",
            DecodeError::UnsupportedVersion { .. } => "unsupported_version",
        }
    }
}

/// A bounds-checked reader over one packet.
pub struct Rd {
    buf: Bytes,
}

impl Rd {
    pub fn new(buf: Bytes) -> Rd {
        Rd { buf }
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n { Err(DecodeError::Malformed("packet shorter than its fields")) } else { Ok(()) }
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    pub fn take_bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    pub fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed("variable byte integer longer than 4 bytes"))
    }
    pub fn take(&mut self, n: usize) -> Result<Rd, DecodeError> {
        self.need(n)?;
        Ok(Rd { buf: self.buf.split_to(n) })
    }
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.binary()?;
        let s = std::str::from_utf8(&b).map_err(|_| DecodeError::Malformed("string is not valid UTF-8"))?;
        // MQTT 1.5.4: U+0000 is not allowed in any string.
        if s.contains('\0') {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(s.to_owned())
    }
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
}

/// Parses the fixed header at the start of `buf`: (first byte, header length,
/// remaining length). `None` when more bytes are needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((first, 2 + i, len)));
        }
    }
    Err(DecodeError::Malformed("remaining length longer than 4 bytes"))
}

/// Takes one packet off the front of `buf`. `Ok(None)`: not enough bytes yet.
/// `max_size` bounds the whole packet (fixed header included), checked before
/// the body is buffered so a huge length cannot make us allocate.
pub fn decode(buf: &mut BytesMut, version: Version, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    let Some((first, hlen, rlen)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let total = hlen + rlen;
    if total > max_size {
        return Err(DecodeError::TooLarge { size: total, max: max_size });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(hlen);
    decode_body(first, Rd::new(frame), version).map(Some)
}

/// Decodes the first packet of a connection, which must be CONNECT; the
/// protocol version comes from it.
pub fn decode_connect(buf: &mut BytesMut, max_size: usize) -> Result<Option<Connect>, DecodeError> {
    let Some((first, _, _)) = fixed_header(buf)? else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(DecodeError::Protocol("first packet is not CONNECT"));
    }
    match decode(buf, Version::V5, max_size)? {
        Some(Packet::Connect(c)) => Ok(Some(*c)),
        Some(_) => Err(DecodeError::Protocol("first packet is not CONNECT")),
        None => Ok(None),
    }
}

fn expect_flags(first: u8, want: u8) -> Result<(), DecodeError> {
    if first & 0x0f != want { Err(DecodeError::Malformed("reserved fixed header flags")) } else { Ok(()) }
}

fn decode_body(first: u8, mut rd: Rd, v: Version) -> Result<Packet, DecodeError> {
    let v5 = v == Version::V5;
    let kind = first >> 4;
    let pkt = match kind {
        1 => {
            expect_flags(first, 0)?;
            Packet::Connect(Box::new(connect(&mut rd)?))
        }
        2 => {
            expect_flags(first, 0)?;
            let flags = rd.u8()?;
            if flags & 0xfe != 0 {
                return Err(DecodeError::Malformed("CONNACK reserved flags"));
            }
            let code = rd.u8()?;
            let props = if v5 { Properties::decode(&mut rd)? } else { Properties::default() };
            Packet::ConnAck(ConnAck { session_present: flags & 1 == 1, code, props })
        }
        3 => Packet::Publish(publish(first, &mut rd, v5)?),
        4..=7 => {
            expect_flags(first, if kind == 6 { 0b0010 } else { 0 })?;
            let pid = rd.u16()?;
            if pid == 0 {
                return Err(DecodeError::Malformed("packet identifier 0"));
            }
            let mut ack = Ack::new(pid, 0);
            if v5 && !rd.is_empty() {
                ack.code = rd.u8()?;
                if !rd.is_empty() {
                    ack.props = Properties::decode(&mut rd)?;
                }
            }
            match kind {
                4 => Packet::PubAck(ack),
                5 => Packet::PubRec(ack),
                6 => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
        }
        8 => {
            expect_flags(first, 0b0010)?;
            let pid = nonzero_pid(&mut rd)?;
            let props = if v5 { Properties::decode(&mut rd)? } else { Properties::default() };
            let mut filters = Vec::new();
            while !rd.is_empty() {
                let f = rd.string()?;
                let o = rd.u8()?;
                let qos = QoS::from_u8(o & 3).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
                if (v5 && o & 0xc0 != 0) || (!v5 && o & 0xfc != 0) {
                    return Err(DecodeError::Malformed("subscription options reserved bits"));
                }
                let retain_handling = (o >> 4) & 3;
                if retain_handling == 3 {
                    return Err(DecodeError::Protocol("retain handling 3"));
                }
                filters.push((
                    f,
                    SubOptions { qos, no_local: o & 4 != 0, retain_as_published: o & 8 != 0, retain_handling },
                ));
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
            }
            Packet::Subscribe(Subscribe { pid, props, filters })
        }
        9 => {
            expect_flags(first, 0)?;
            let pid = nonzero_pid(&mut rd)?;
            let props = if v5 { Properties::decode(&mut rd)? } else { Properties::default() };
            let codes = rd.rest().to_vec();
            Packet::SubAck(SubAck { pid, props, codes })
        }
        10 => {
            expect_flags(first, 0b0010)?;
            let pid = nonzero_pid(&mut rd)?;
            let props = if v5 { Properties::decode(&mut rd)? } else { Properties::default() };
            let mut filters = Vec::new();
            while !rd.is_empty() {
                filters.push(rd.string()?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
            }
            Packet::Unsubscribe(Unsubscribe { pid, props, filters })
        }
        11 => {
            expect_flags(first, 0)?;
            let pid = nonzero_pid(&mut rd)?;
            let props = if v5 { Properties::decode(&mut rd)? } else { Properties::default() };
            let codes = rd.rest().to_vec();
            Packet::UnsubAck(UnsubAck { pid, props, codes })
        }
        12 | 13 => {
            expect_flags(first, 0)?;
            if !rd.is_empty() {
                return Err(DecodeError::Malformed("PINGREQ/PINGRESP with a body"));
            }
            if kind == 12 { Packet::PingReq } else { Packet::PingResp }
        }
        14 | 15 => {
            expect_flags(first, 0)?;
            if kind == 15 && !v5 {
                return Err(DecodeError::Malformed("AUTH in MQTT 3.1.1"));
            }
            let mut d = Disconnect { code: 0, props: Properties::default() };
            if v5 && !rd.is_empty() {
                d.code = rd.u8()?;
                if !rd.is_empty() {
                    d.props = Properties::decode(&mut rd)?;
                }
            }
            if kind == 14 { Packet::Disconnect(d) } else { Packet::Auth(d) }
        }
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    };
    if !rd.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes after packet"));
    }
    Ok(pkt)
}

fn nonzero_pid(rd: &mut Rd) -> Result<u16, DecodeError> {
    let pid = rd.u16()?;
    if pid == 0 { Err(DecodeError::Malformed("packet identifier 0")) } else { Ok(pid) }
}

fn publish(first: u8, rd: &mut Rd, v5: bool) -> Result<Publish, DecodeError> {
    let dup = first & 0b1000 != 0;
    let qos = QoS::from_u8((first >> 1) & 3).ok_or(DecodeError::Malformed("PUBLISH with QoS 3"))?;
    let retain = first & 1 != 0;
    if qos == QoS::AtMostOnce && dup {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = rd.string()?;
    let pid = if qos == QoS::AtMostOnce { 0 } else { nonzero_pid(rd)? };
    let props = if v5 { Properties::decode(rd)? } else { Properties::default() };
    Ok(Publish { dup, qos, retain, topic, pid, props, payload: rd.rest() })
}

fn connect(rd: &mut Rd) -> Result<Connect, DecodeError> {
    let name = rd.string()?;
    let level = rd.u8()?;
    let version = match (name.as_str(), level) {
        ("MQTT", 4) => Version::V311,
        ("MQTT", 5) => Version::V5,
        _ => return Err(DecodeError::UnsupportedVersion { name, level }),
    };
    let v5 = version == Version::V5;
    let flags = rd.u8()?;
    if flags & 1 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0b10 != 0;
    let will_flag = flags & 0b100 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0b10_0000 != 0;
    let has_password = flags & 0b100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed("will QoS/retain without will flag"));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if !v5 && has_password && !has_username {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = rd.u16()?;
    let props = if v5 { Properties::decode(rd)? } else { Properties::default() };
    let client_id = rd.string()?;
    let will = if will_flag {
        let wprops = if v5 { Properties::decode(rd)? } else { Properties::default() };
        let topic = rd.string()?;
        let payload = rd.binary()?;
        Some(Will { topic, payload, qos: will_qos, retain: will_retain, props: wprops })
    } else {
        None
    };
    let username = if has_username { Some(rd.string()?) } else { None };
    let password = if has_password { Some(rd.binary()?) } else { None };
    Ok(Connect { version, clean_start, keep_alive, props, client_id, will, username, password })
}
