//! On-disk records. The store's own format (not wire types): a flags byte,
//! fixed-width integers and length-prefixed strings; message properties reuse
//! the MQTT 5 property encoding.

use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::Rd;
use crate::codec::{DecodeError, Properties, QoS, SubOptions};
use crate::message::{Message, Stamp};
use crate::router::subs::Sub;

fn put_str(b: &mut BytesMut, s: &str) {
    b.put_u32(s.len() as u32);
    b.put_slice(s.as_bytes());
}

fn get_str(rd: &mut Rd) -> Result<String, DecodeError> {
    let n = rd.u32()? as usize;
    let raw = rd.take_bytes(n)?;
    String::from_utf8(raw.to_vec()).map_err(|_| DecodeError::Malformed("stored string is not UTF-8"))
}

/// A message queued or in flight for one session.
#[derive(Debug, Clone)]
pub struct Entry {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    /// PUBREC received: only PUBREL/PUBCOMP remain.
    pub released: bool,
    pub sub_ids: Vec<u32>,
}

pub fn encode_message(b: &mut BytesMut, m: &Message) {
    b.put_u8(m.qos as u8 | (u8::from(m.retain) << 2));
    b.put_u64(m.expires_at.unwrap_or(0));
    put_str(b, m.publisher.as_deref().unwrap_or(""));
    put_str(b, &m.topic);
    m.props.encode(b);
    b.put_u32(m.payload.len() as u32);
    b.put_slice(&m.payload);
}

pub(crate) fn decode_message(rd: &mut Rd) -> Result<Message, DecodeError> {
    let flags = rd.u8()?;
    let qos = QoS::from_u8(flags & 3).ok_or(DecodeError::Malformed("stored QoS"))?;
    let expires = rd.u64()?;
    let publisher = get_str(rd)?;
    let topic = get_str(rd)?;
    let props = Properties::decode(rd)?;
    let n = rd.u32()? as usize;
    let payload = rd.take_bytes(n)?;
    Ok(Message {
        topic,
        payload,
        qos,
        retain: flags & 4 != 0,
        props,
        expires_at: (expires != 0).then_some(expires),
        publisher: (!publisher.is_empty()).then(|| Arc::from(publisher)),
        received_at: Instant::now(),
    })
}

/// A retained record: the message, then the stamp of the write.
pub fn encode_retained(m: &Message, stamp: &Stamp) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_message(&mut b, m);
    b.put_u64(stamp.millis);
    put_str(&mut b, &stamp.node);
    b.to_vec()
}

/// The stamp after a retained record's message; records written before
/// stamps end with the message (the oldest stamp).
pub(crate) fn decode_stamp(rd: &mut Rd) -> Result<Stamp, DecodeError> {
    if rd.is_empty() {
        return Ok(Stamp::default());
    }
    let millis = rd.u64()?;
    let node = get_str(rd)?;
    Ok(Stamp { millis, node: Arc::from(node) })
}

pub fn encode_entry(e: &Entry) -> Vec<u8> {
    let mut b = BytesMut::with_capacity(64 + e.msg.topic.len() + e.msg.payload.len());
    b.put_u8(e.qos as u8 | (u8::from(e.retain) << 2) | (u8::from(e.released) << 3));
    b.put_u8(e.sub_ids.len().min(255) as u8);
    for id in e.sub_ids.iter().take(255) {
        b.put_u32(*id);
    }
    encode_message(&mut b, &e.msg);
    b.to_vec()
}

pub fn decode_entry(raw: &[u8]) -> Result<Entry, DecodeError> {
    let mut rd = Rd::new(Bytes::copy_from_slice(raw));
    let flags = rd.u8()?;
    let n = rd.u8()?;
    let mut sub_ids = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        sub_ids.push(rd.u32()?);
    }
    let msg = decode_message(&mut rd)?;
    Ok(Entry {
        msg: Arc::new(msg),
        qos: QoS::from_u8(flags & 3).ok_or(DecodeError::Malformed("stored QoS"))?,
        retain: flags & 4 != 0,
        released: flags & 8 != 0,
        sub_ids,
    })
}

/// What survives of a session besides its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMeta {
    pub expiry: u32,
    pub v5: bool,
    pub subs: Vec<(String, Sub)>,
}

pub fn encode_meta(m: &SessionMeta) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(m.expiry);
    b.put_u8(u8::from(m.v5));
    b.put_u32(m.subs.len() as u32);
    for (f, s) in &m.subs {
        put_str(&mut b, f);
        let o = s.opts;
        b.put_u8(
            o.qos as u8 | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | o.retain_handling << 4,
        );
        b.put_u32(s.id.unwrap_or(0));
    }
    b.to_vec()
}

pub fn decode_meta(raw: &[u8]) -> Result<SessionMeta, DecodeError> {
    let mut rd = Rd::new(Bytes::copy_from_slice(raw));
    let expiry = rd.u32()?;
    let v5 = rd.u8()? != 0;
    let n = rd.u32()?;
    let mut subs = Vec::new();
    for _ in 0..n {
        let f = get_str(&mut rd)?;
        let o = rd.u8()?;
        let id = rd.u32()?;
        let opts = SubOptions {
            qos: QoS::from_u8(o & 3).ok_or(DecodeError::Malformed("stored QoS"))?,
            no_local: o & 4 != 0,
            retain_as_published: o & 8 != 0,
            retain_handling: (o >> 4) & 3,
        };
        subs.push((f, Sub { opts, id: (id != 0).then_some(id) }));
    }
    Ok(SessionMeta { expiry, v5, subs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PropertyValues;

    #[test]
    fn entry_and_meta_roundtrip() {
        let msg = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: true,
            props: PropertyValues {
                content_type: Some("t".into()),
                user: vec![("k".into(), "v".into())],
                ..Default::default()
            }
            .into(),
            expires_at: Some(123),
            publisher: Some(Arc::from("p")),
            received_at: Instant::now(),
        };
        let e = Entry { msg: Arc::new(msg), qos: QoS::AtLeastOnce, retain: false, released: true, sub_ids: vec![7] };
        let d = decode_entry(&encode_entry(&e)).expect("decodes");
        assert_eq!((d.qos, d.retain, d.released, d.sub_ids.clone()), (e.qos, e.retain, e.released, e.sub_ids.clone()));
        assert_eq!((d.msg.topic.as_str(), &d.msg.payload[..], d.msg.expires_at), ("a/b", &b"hello"[..], Some(123)));
        assert_eq!(d.msg.props, e.msg.props);
        assert_eq!(d.msg.publisher.as_deref(), Some("p"));
        let m = SessionMeta {
            expiry: 5,
            v5: true,
            subs: vec![("x/#".into(), Sub { opts: SubOptions::qos(QoS::AtLeastOnce), id: Some(3) })],
        };
        assert_eq!(decode_meta(&encode_meta(&m)).expect("decodes"), m);
        assert!(decode_entry(&[0xff]).is_err());
    }
}
