use bytes::{Bytes, BytesMut};

use super::*;

fn roundtrip(p: Packet, v: Version) {
    let mut buf = BytesMut::new();
    encode(&p, v, &mut buf);
    let mut rd = buf.clone();
    let got = decode(&mut rd, v, 1 << 20).expect("decodes").expect("complete");
    assert_eq!(got, p, "roundtrip {v:?} of {}", p.name());
    assert!(rd.is_empty());
    // Every strict prefix is incomplete, never an error or a packet.
    for n in 0..buf.len() {
        let mut part = BytesMut::from(&buf[..n]);
        assert_eq!(decode(&mut part, v, 1 << 20), Ok(None), "prefix {n} of {}", p.name());
    }
}

fn full_props() -> Properties {
    PropertyValues {
        payload_format: Some(1),
        message_expiry: Some(30),
        content_type: Some("text/plain".into()),
        response_topic: Some("r/t".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        subscription_ids: vec![1, 300_000],
        user: vec![("k".into(), "v".into()), ("k".into(), "v2".into())],
        ..PropertyValues::default()
    }
    .into()
}

#[test]
fn roundtrip_all_packets_both_versions() {
    for v in [Version::V311, Version::V5] {
        let v5 = v == Version::V5;
        let props = if v5 { full_props() } else { Properties::default() };
        roundtrip(
            Packet::Connect(Box::new(Connect {
                version: v,
                clean_start: true,
                keep_alive: 60,
                props: if v5 {
                    PropertyValues { session_expiry: Some(10), receive_maximum: Some(5), ..Default::default() }.into()
                } else {
                    Properties::default()
                },
                client_id: "c1".into(),
                will: Some(Will {
                    topic: "w".into(),
                    payload: Bytes::from_static(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    props: if v5 {
                        PropertyValues { will_delay: Some(5), ..Default::default() }.into()
                    } else {
                        Properties::default()
                    },
                }),
                username: Some("u".into()),
                password: Some(Bytes::from_static(b"p")),
            })),
            v,
        );
        roundtrip(Packet::ConnAck(ConnAck { session_present: true, code: 0, props: Properties::default() }), v);
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            roundtrip(
                Packet::Publish(Publish {
                    dup: qos != QoS::AtMostOnce,
                    qos,
                    retain: true,
                    topic: "a/b".into(),
                    pid: if qos == QoS::AtMostOnce { 0 } else { 7 },
                    props: props.clone(),
                    payload: Bytes::from(vec![9u8; 300]),
                }),
                v,
            );
        }
        let code = if v5 { 0x10 } else { 0 };
        roundtrip(Packet::PubAck(Ack::new(1, code)), v);
        roundtrip(Packet::PubRec(Ack::new(2, 0)), v);
        roundtrip(Packet::PubRel(Ack::new(3, 0)), v);
        roundtrip(Packet::PubComp(Ack::new(65535, 0)), v);
        roundtrip(
            Packet::Subscribe(Subscribe {
                pid: 4,
                props: if v5 {
                    PropertyValues { subscription_ids: vec![3], ..Default::default() }.into()
                } else {
                    Properties::default()
                },
                filters: vec![
                    ("a/+".into(), SubOptions::qos(QoS::ExactlyOnce)),
                    (
                        "#".into(),
                        SubOptions {
                            qos: QoS::AtLeastOnce,
                            no_local: v5,
                            retain_as_published: v5,
                            retain_handling: if v5 { 2 } else { 0 },
                        },
                    ),
                ],
            }),
            v,
        );
        roundtrip(Packet::SubAck(SubAck { pid: 4, props: Properties::default(), codes: vec![0, 1, 2, 0x80] }), v);
        roundtrip(
            Packet::Unsubscribe(Unsubscribe { pid: 5, props: Properties::default(), filters: vec!["x".into()] }),
            v,
        );
        roundtrip(
            Packet::UnsubAck(UnsubAck {
                pid: 5,
                props: Properties::default(),
                codes: if v5 { vec![0, 0x11] } else { vec![] },
            }),
            v,
        );
        roundtrip(Packet::PingReq, v);
        roundtrip(Packet::PingResp, v);
        roundtrip(Packet::Disconnect(Disconnect { code: if v5 { 0x04 } else { 0 }, props: Properties::default() }), v);
    }
}

fn err(bytes: &[u8], v: Version) -> DecodeError {
    let mut b = BytesMut::from(bytes);
    decode(&mut b, v, 1 << 20).expect_err("must be rejected")
}

#[test]
fn rejects_malformed_input() {
    use Version::*;
    // QoS 3 publish.
    assert_eq!(err(&[0x36, 5, 0, 1, b'a', 0, 1], V311).reason_code(), reason::MALFORMED);
    // Reserved packet type 0.
    assert_eq!(err(&[0x00, 0], V5).reason_code(), reason::MALFORMED);
    // SUBSCRIBE with wrong fixed header flags.
    assert_eq!(err(&[0x80, 6, 0, 1, 0, 1, b'a', 0], V311).reason_code(), reason::MALFORMED);
    // Invalid UTF-8 topic.
    assert_eq!(err(&[0x30, 4, 0, 2, 0xff, 0xfe], V311).reason_code(), reason::MALFORMED);
    // Remaining length of five bytes.
    assert_eq!(err(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], V5).reason_code(), reason::MALFORMED);
    // Packet id 0 on PUBACK.
    assert_eq!(err(&[0x40, 2, 0, 0], V311).reason_code(), reason::MALFORMED);
    // Duplicate property.
    assert_eq!(err(&[0x30, 10, 0, 1, b'a', 4, 0x01, 0, 0x01, 1, b'x', b'y'], V5).reason_code(), reason::PROTOCOL_ERROR);
    // PINGREQ with body.
    assert_eq!(err(&[0xC0, 1, 0], V5).reason_code(), reason::MALFORMED);
    // Too large, detected from the header alone.
    let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x03][..]);
    assert!(matches!(decode(&mut b, V5, 1024), Err(DecodeError::TooLarge { .. })));
    // CONNECT not first.
    let mut b = BytesMut::from(&[0xC0u8, 0][..]);
    assert!(matches!(decode_connect(&mut b, 1024), Err(DecodeError::Protocol(_))));
    // Unsupported protocol level.
    let mut b = BytesMut::from(&[0x10u8, 10, 0, 4, b'M', b'Q', b'T', b'T', 3, 2, 0, 60, 0, 0][..]);
    assert!(matches!(decode_connect(&mut b, 1024), Err(DecodeError::UnsupportedVersion { .. })));
}

#[test]
fn random_bytes_never_panic() {
    // A small deterministic fuzz loop; the cargo-fuzz target does the real work.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        let mut bytes = Vec::new();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 64) as usize;
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.push(x as u8);
        }
        for v in [Version::V311, Version::V5] {
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut b, v, 1 << 16) {}
            let mut b = BytesMut::from(&bytes[..]);
            let _ = decode_connect(&mut b, 1 << 16);
        }
    }
}

/// A decoded packet is moved from the decoder to the reader and on to the
/// router. With the properties inline (344 bytes) each move was a `memcpy`
/// call; it is 72 bytes now.
#[test]
fn packets_stay_small() {
    let size = std::mem::size_of::<Packet>();
    assert!(size <= 96, "Packet is {size} bytes: box what grew (Properties already is)");
}
