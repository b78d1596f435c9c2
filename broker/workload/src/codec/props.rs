//! MQTT 5.0 properties (section 2.2.2.2). One struct for every packet type:
//! each property is optional and the encoder writes only what is set.

use bytes::{BufMut, Bytes, BytesMut};

use super::decode::{DecodeError, Rd};
use super::encode::{put_bin, put_str, put_varint, varint_len};

/// The properties of one packet. Most packets carry none (every MQTT 3.1.1
/// packet, most 5.0 PUBLISHes and acks), so the values sit behind a pointer
/// that stays null until one is set: `Packet` is 72 bytes instead of over
/// 344 (the values alone), and a decoded packet is moved several times on its way
/// from the decoder through the reader to the router (about 280
/// instructions of `memcpy` per packet, callgrind, QoS 1 fan-out).
/// Reads go through `Deref` (an empty set when null); a mutable borrow
/// allocates the values.
#[derive(Clone, Default)]
pub struct Properties(Option<Box<PropertyValues>>);

impl std::ops::Deref for Properties {
    type Target = PropertyValues;
    fn deref(&self) -> &PropertyValues {
        self.0.as_deref().unwrap_or(&NONE)
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut PropertyValues {
        self.0.get_or_insert_with(Box::default)
    }
}

impl PartialEq for Properties {
    fn eq(&self, other: &Properties) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl From<PropertyValues> for Properties {
    fn from(v: PropertyValues) -> Properties {
        if v == NONE { Properties(None) } else { Properties(Some(Box::new(v))) }
    }
}

static NONE: PropertyValues = PropertyValues {
    payload_format: None,
    message_expiry: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    subscription_ids: Vec::new(),
    session_expiry: None,
    assigned_client_id: None,
    server_keep_alive: None,
    auth_method: None,
    auth_data: None,
    request_problem_info: None,
    will_delay: None,
    request_response_info: None,
    response_info: None,
    server_reference: None,
    reason_string: None,
    receive_maximum: None,
    topic_alias_maximum: None,
    topic_alias: None,
    maximum_qos: None,
    retain_available: None,
    user: Vec::new(),
    maximum_packet_size: None,
    wildcard_sub_available: None,
    sub_id_available: None,
    shared_sub_available: None,
};

/// Every property MQTT 5.0 defines, each optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PropertyValues {
    pub payload_format: Option<u8>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub subscription_ids: Vec<u32>,
    pub session_expiry: Option<u32>,
    pub assigned_client_id: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub auth_method: Option<String>,
    pub auth_data: Option<Bytes>,
    pub request_problem_info: Option<u8>,
    pub will_delay: Option<u32>,
    pub request_response_info: Option<u8>,
    pub response_info: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_sub_available: Option<u8>,
    pub sub_id_available: Option<u8>,
    pub shared_sub_available: Option<u8>,
}

fn set<T>(slot: &mut Option<T>, v: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property included twice"));
    }
    *slot = Some(v);
    Ok(())
}

fn flag(rd: &mut Rd) -> Result<u8, DecodeError> {
    let v = rd.u8()?;
    if v > 1 {
        return Err(DecodeError::Protocol("boolean property not 0 or 1"));
    }
    Ok(v)
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        self.0.as_deref().is_none_or(|v| *v == NONE)
    }

    /// Encoded size including the variable byte integer length prefix.
    pub fn encoded_len(&self) -> usize {
        self.0.as_deref().map_or(1, PropertyValues::encoded_len)
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        match self.0.as_deref() {
            Some(v) => v.encode(buf),
            None => buf.put_u8(0),
        }
    }

    pub fn decode(rd: &mut Rd) -> Result<Properties, DecodeError> {
        let len = rd.varint()? as usize;
        if len == 0 {
            return Ok(Properties(None));
        }
        let mut sub = rd.take(len)?;
        let mut p = PropertyValues::default();
        while !sub.is_empty() {
            let id = sub.varint()?;
            match id {
                0x01 => set(&mut p.payload_format, flag(&mut sub)?)?,
                0x02 => set(&mut p.message_expiry, sub.u32()?)?,
                0x03 => set(&mut p.content_type, sub.string()?)?,
                0x08 => set(&mut p.response_topic, sub.string()?)?,
                0x09 => set(&mut p.correlation_data, sub.binary()?)?,
                0x0B => {
                    let v = sub.varint()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("subscription identifier 0"));
                    }
                    p.subscription_ids.push(v);
                }
                0x11 => set(&mut p.session_expiry, sub.u32()?)?,
                0x12 => set(&mut p.assigned_client_id, sub.string()?)?,
                0x13 => set(&mut p.server_keep_alive, sub.u16()?)?,
                0x15 => set(&mut p.auth_method, sub.string()?)?,
                0x16 => set(&mut p.auth_data, sub.binary()?)?,
                0x17 => set(&mut p.request_problem_info, flag(&mut sub)?)?,
                0x18 => set(&mut p.will_delay, sub.u32()?)?,
                0x19 => set(&mut p.request_response_info, flag(&mut sub)?)?,
                0x1A => set(&mut p.response_info, sub.string()?)?,
                0x1C => set(&mut p.server_reference, sub.string()?)?,
                0x1F => set(&mut p.reason_string, sub.string()?)?,
                0x21 => {
                    let v = sub.u16()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("receive maximum 0"));
                    }
                    set(&mut p.receive_maximum, v)?
                }
                0x22 => set(&mut p.topic_alias_maximum, sub.u16()?)?,
                0x23 => set(&mut p.topic_alias, sub.u16()?)?,
                0x24 => set(&mut p.maximum_qos, flag(&mut sub)?)?,
                0x25 => set(&mut p.retain_available, flag(&mut sub)?)?,
                0x26 => {
                    let k = sub.string()?;
                    let v = sub.string()?;
                    p.user.push((k, v));
                }
                0x27 => {
                    let v = sub.u32()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("maximum packet size 0"));
                    }
                    set(&mut p.maximum_packet_size, v)?
                }
                0x28 => set(&mut p.wildcard_sub_available, flag(&mut sub)?)?,
                0x29 => set(&mut p.sub_id_available, flag(&mut sub)?)?,
                0x2A => set(&mut p.shared_sub_available, flag(&mut sub)?)?,
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            }
        }
        Ok(p.into())
    }
}

impl PropertyValues {
    /// Length of the encoded properties, without the length prefix.
    pub fn body_len(&self) -> usize {
        let s = |o: &Option<String>| o.as_ref().map_or(0, |v| 3 + v.len());
        let b = |o: &Option<Bytes>| o.as_ref().map_or(0, |v| 3 + v.len());
        let n = |present: bool, size: usize| if present { 1 + size } else { 0 };
        n(self.payload_format.is_some(), 1)
            + n(self.message_expiry.is_some(), 4)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self.subscription_ids.iter().map(|v| 1 + varint_len(*v as usize)).sum::<usize>()
            + n(self.session_expiry.is_some(), 4)
            + s(&self.assigned_client_id)
            + n(self.server_keep_alive.is_some(), 2)
            + s(&self.auth_method)
            + b(&self.auth_data)
            + n(self.request_problem_info.is_some(), 1)
            + n(self.will_delay.is_some(), 4)
            + n(self.request_response_info.is_some(), 1)
            + s(&self.response_info)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + n(self.receive_maximum.is_some(), 2)
            + n(self.topic_alias_maximum.is_some(), 2)
            + n(self.topic_alias.is_some(), 2)
            + n(self.maximum_qos.is_some(), 1)
            + n(self.retain_available.is_some(), 1)
            + self.user.iter().map(|(k, v)| 5 + k.len() + v.len()).sum::<usize>()
            + n(self.maximum_packet_size.is_some(), 4)
            + n(self.wildcard_sub_available.is_some(), 1)
            + n(self.sub_id_available.is_some(), 1)
            + n(self.shared_sub_available.is_some(), 1)
    }

    /// Encoded size including the variable byte integer length prefix.
    pub fn encoded_len(&self) -> usize {
        let l = self.body_len();
        varint_len(l) + l
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        put_varint(buf, self.body_len());
        let u8p = |buf: &mut BytesMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u8(v);
            }
        };
        let u16p = |buf: &mut BytesMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u16(v);
            }
        };
        let u32p = |buf: &mut BytesMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                buf.put_u8(id);
                buf.put_u32(v);
            }
        };
        let strp = |buf: &mut BytesMut, id: u8, v: &Option<String>| {
            if let Some(v) = v {
                buf.put_u8(id);
                put_str(buf, v);
            }
        };
        let binp = |buf: &mut BytesMut, id: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                buf.put_u8(id);
                put_bin(buf, v);
            }
        };
        u8p(buf, 0x01, self.payload_format);
        u32p(buf, 0x02, self.message_expiry);
        strp(buf, 0x03, &self.content_type);
        strp(buf, 0x08, &self.response_topic);
        binp(buf, 0x09, &self.correlation_data);
        for id in &self.subscription_ids {
            buf.put_u8(0x0B);
            put_varint(buf, *id as usize);
        }
        u32p(buf, 0x11, self.session_expiry);
        strp(buf, 0x12, &self.assigned_client_id);
        u16p(buf, 0x13, self.server_keep_alive);
        strp(buf, 0x15, &self.auth_method);
        binp(buf, 0x16, &self.auth_data);
        u8p(buf, 0x17, self.request_problem_info);
        u32p(buf, 0x18, self.will_delay);
        u8p(buf, 0x19, self.request_response_info);
        strp(buf, 0x1A, &self.response_info);
        strp(buf, 0x1C, &self.server_reference);
        strp(buf, 0x1F, &self.reason_string);
        u16p(buf, 0x21, self.receive_maximum);
        u16p(buf, 0x22, self.topic_alias_maximum);
        u16p(buf, 0x23, self.topic_alias);
        u8p(buf, 0x24, self.maximum_qos);
        u8p(buf, 0x25, self.retain_available);
        for (k, v) in &self.user {
            buf.put_u8(0x26);
            put_str(buf, k);
            put_str(buf, v);
        }
        u32p(buf, 0x27, self.maximum_packet_size);
        u8p(buf, 0x28, self.wildcard_sub_available);
        u8p(buf, 0x29, self.sub_id_available);
        u8p(buf, 0x2A, self.shared_sub_available);
    }
}
