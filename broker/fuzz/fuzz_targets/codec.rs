//! Fuzzes the MQTT codec: decoding arbitrary bytes must never panic, and
//! every client-to-broker packet that decodes must encode back to itself.
#![no_main]

// The codec only needs `bytes` and `thiserror`; compiling it on its own keeps
// the fuzz build small (no tokio, redb, ...).
#[path = "../../workload/src/codec/mod.rs"]
#[expect(dead_code, reason = "the fuzz target uses only part of the codec API")]
mod codec;

use bytes::BytesMut;
use codec::{Packet, Version, decode, decode_connect, encode};
use libfuzzer_sys::fuzz_target;

fn server_bound(p: &Packet) -> bool {
    matches!(
        p,
        Packet::Connect(_)
            | Packet::Publish(_)
            | Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq
            | Packet::Disconnect(_)
    )
}

fuzz_target!(|data: &[u8]| {
    for v in [Version::V311, Version::V5] {
        let mut buf = BytesMut::from(data);
        let mut n = 0;
        while let Ok(Some(p)) = decode(&mut buf, v, 1 << 16) {
            n += 1;
            if server_bound(&p) {
                let ver = match &p {
                    Packet::Connect(c) => c.version,
                    _ => v,
                };
                let mut out = BytesMut::new();
                encode(&p, ver, &mut out);
                let again = decode(&mut out, ver, 1 << 20).expect("re-encoded packet decodes").expect("complete");
                assert_eq!(again, p, "roundtrip changed the packet");
            }
            if n > 64 {
                break;
            }
        }
    }
    let mut buf = BytesMut::from(data);
    let _ = decode_connect(&mut buf, 1 << 16);
});
