//! Between the router's `Message` and the wire's `Publish`, at the edge.

use std::sync::Arc;
use std::time::Instant;

use chaos_proto::broker::v1 as pb;

use crate::codec::{Properties, QoS};
use crate::message::{Message, Stamp, unix_now};

pub fn to_wire(m: &Message) -> pb::Publish {
    let p = &m.props;
    pb::Publish {
        topic: m.topic.clone(),
        payload: m.payload.to_vec(),
        qos: m.qos as u32,
        retain: m.retain,
        user_properties: p.user.iter().map(|(k, v)| pb::UserProperty { key: k.clone(), value: v.clone() }).collect(),
        content_type: p.content_type.clone().unwrap_or_default(),
        response_topic: p.response_topic.clone().unwrap_or_default(),
        correlation_data: p.correlation_data.as_ref().map(|b| b.to_vec()).unwrap_or_default(),
        message_expiry_seconds: m.remaining(unix_now()).unwrap_or(0),
        payload_format: p.payload_format.map_or(0, |f| u32::from(f) + 1),
        publisher: m.publisher.as_deref().unwrap_or_default().to_owned(),
    }
}

/// A retained write as sent to a peer; a clear is a publish with the topic
/// and nothing else.
pub fn retained_to_wire((topic, stamp, msg): &super::retained::Write) -> pb::RetainedEntry {
    let publish = match msg {
        Some(m) => to_wire(m),
        None => pb::Publish { topic: topic.clone(), retain: true, ..Default::default() },
    };
    pb::RetainedEntry {
        publish: Some(publish),
        stamp: Some(pb::RetainStamp { millis: stamp.millis, node: stamp.node.to_string() }),
    }
}

/// A retained write from a peer: (topic, stamp, message or None when
/// cleared); `Err` says what is wrong with it.
pub fn retained_from_wire(e: pb::RetainedEntry) -> Result<(String, Stamp, Option<Message>), String> {
    let stamp = e.stamp.ok_or("retained entry without stamp")?;
    let m = from_wire(e.publish.ok_or("retained entry without publish")?)?;
    let stamp = Stamp { millis: stamp.millis, node: Arc::from(stamp.node.as_str()) };
    let topic = m.topic.clone();
    Ok((topic, stamp, (!m.payload.is_empty()).then_some(Message { retain: true, ..m })))
}

/// A session leaving this node, in the store's encodings.
pub fn session_to_wire(m: &crate::inbox::MovedSession) -> pb::SessionState {
    use crate::store::record::{encode_entry, encode_meta};
    pb::SessionState {
        meta: m.meta.as_ref().map(encode_meta).unwrap_or_default(),
        entries: m
            .entries
            .iter()
            .map(|(seq, e, sent)| pb::SessionEntry { seq: *seq, entry: encode_entry(e), sent: *sent })
            .collect(),
        incoming_qos2: m.incoming_qos2.iter().map(|p| u32::from(*p)).collect(),
        next_seq: m.next_seq,
    }
}

/// A session handed over by a peer; `Err` says what is wrong with it.
pub fn session_from_wire(s: pb::SessionState) -> Result<crate::inbox::MovedSession, String> {
    use crate::store::record::{decode_entry, decode_meta};
    let meta = decode_meta(&s.meta).map_err(|e| format!("session meta: {e}"))?;
    let mut entries = Vec::with_capacity(s.entries.len());
    for e in s.entries {
        entries.push((e.seq, decode_entry(&e.entry).map_err(|err| format!("session entry {}: {err}", e.seq))?, e.sent));
    }
    let incoming_qos2 = s
        .incoming_qos2
        .into_iter()
        .map(|p| u16::try_from(p).map_err(|_| format!("packet id {p}")))
        .collect::<Result<_, _>>()?;
    Ok(crate::inbox::MovedSession { meta: Some(meta), entries, incoming_qos2, next_seq: s.next_seq })
}

/// A forwarded publish as a local message; `Err` says what is wrong with it.
pub fn from_wire(p: pb::Publish) -> Result<Message, String> {
    let qos = u8::try_from(p.qos).ok().and_then(QoS::from_u8).ok_or_else(|| format!("qos {}", p.qos))?;
    if !crate::topic::valid_name(&p.topic) {
        return Err(format!("topic name {:?}", p.topic));
    }
    let mut props = Properties::default();
    if !p.user_properties.is_empty() {
        props.user = p.user_properties.into_iter().map(|u| (u.key, u.value)).collect();
    }
    if !p.content_type.is_empty() {
        props.content_type = Some(p.content_type);
    }
    if !p.response_topic.is_empty() {
        props.response_topic = Some(p.response_topic);
    }
    if !p.correlation_data.is_empty() {
        props.correlation_data = Some(p.correlation_data.into());
    }
    if p.payload_format > 0 {
        props.payload_format = Some(u8::try_from(p.payload_format - 1).map_err(|_| "payload format".to_owned())?);
    }
    let expiry = (p.message_expiry_seconds > 0).then_some(p.message_expiry_seconds);
    props.message_expiry = expiry;
    Ok(Message {
        topic: p.topic,
        payload: p.payload.into(),
        qos,
        retain: p.retain,
        props,
        expires_at: expiry.map(|e| unix_now() + u64::from(e)),
        publisher: (!p.publisher.is_empty()).then(|| Arc::from(p.publisher.as_str())),
        received_at: Instant::now(),
    })
}
