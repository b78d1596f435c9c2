//! The CONNECT exchange up to the point where the router takes over.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::Shared;
use crate::codec::{self, ConnAck, Connect, DecodeError, Packet, Properties, Version, reason};
use crate::metrics::CloseReason;

pub struct Accepted {
    pub connect: Connect,
    pub client_id: String,
    pub keep_alive: u16,
    /// Filled in by the router (session present) and sent by it.
    pub connack: ConnAck,
}

async fn refuse(wr: &mut OwnedWriteHalf, version: Version, code: u8) {
    let mut out = BytesMut::new();
    codec::encode(
        &Packet::ConnAck(ConnAck { session_present: false, code, props: Properties::default() }),
        version,
        &mut out,
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.write_all(&out)).await;
    let _ = wr.shutdown().await;
}

pub async fn accept(
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    sh: &Arc<Shared>,
    id: u64,
    peer: SocketAddr,
) -> Result<Accepted, CloseReason> {
    let max = sh.cfg.max_packet_size as usize;
    let read = async {
        loop {
            match codec::decode_connect(buf, max) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => {}
                Err(e) => return Err(Some(e)),
            }
            match rd.read_buf(buf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) => {}
            }
        }
    };
    let c = match tokio::time::timeout(Duration::from_millis(sh.cfg.connect_timeout_ms), read).await {
        Err(_) => {
            tracing::warn!(%peer, reason = "connect_timeout", "closing connection: no CONNECT within {} ms", sh.cfg.connect_timeout_ms);
            return Err(CloseReason::ConnectTimeout);
        }
        Ok(Err(None)) => return Err(CloseReason::Eof),
        Ok(Err(Some(e))) => {
            let reason = match &e {
                DecodeError::UnsupportedVersion { .. } => {
                    // A 3.1.1-format CONNACK is what older clients understand.
                    refuse(wr, Version::V311, reason::UNSUPPORTED_VERSION).await;
                    CloseReason::UnsupportedVersion
                }
                DecodeError::TooLarge { .. } => CloseReason::PacketTooLarge,
                DecodeError::Protocol(_) => CloseReason::ProtocolError,
                DecodeError::Malformed(_) => CloseReason::Malformed,
            };
            tracing::warn!(%peer, reason = reason.label(), "closing connection: {e}");
            return Err(reason);
        }
        Ok(Ok(c)) => c,
    };
    let v5 = c.version == Version::V5;
    let mut props = Properties::default();
    let mut client_id = c.client_id.clone();
    if client_id.is_empty() {
        if !v5 && !c.clean_start {
            refuse(wr, c.version, reason::CLIENT_ID_INVALID).await;
            tracing::warn!(%peer, reason = "client_id_invalid", "closing connection: empty client id with a persistent session");
            return Err(CloseReason::ClientIdInvalid);
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        client_id = format!("auto-{}-{id}-{nanos:08x}", sh.cfg.node_name);
        props.assigned_client_id = Some(client_id.clone());
    }
    if v5 && let Some(m) = &c.props.auth_method {
        // Enhanced authentication (AUTH exchanges) is not supported.
        refuse(wr, c.version, reason::BAD_AUTH_METHOD).await;
        tracing::warn!(%peer, client = %client_id, reason = "not_authorized", "closing connection: unsupported authentication method {m:?}");
        return Err(CloseReason::NotAuthorized);
    }
    if let Some(auth) = &sh.auth
        && !auth.check(c.username.as_deref(), c.password.as_deref())
    {
        refuse(wr, c.version, reason::BAD_USER_OR_PASSWORD).await;
        tracing::warn!(%peer, client = %client_id, reason = "not_authorized", "closing connection: bad user name or password");
        return Err(CloseReason::NotAuthorized);
    }
    if let Some(w) = &c.will
        && !crate::topic::valid_name(&w.topic)
    {
        refuse(wr, c.version, reason::TOPIC_NAME_INVALID).await;
        tracing::warn!(%peer, client = %client_id, reason = "topic_name_invalid", "closing connection: invalid will topic {:?}", w.topic);
        return Err(CloseReason::TopicNameInvalid);
    }
    let mut keep_alive = c.keep_alive;
    let cap = sh.cfg.max_keep_alive;
    if cap > 0 && (keep_alive == 0 || keep_alive > cap) {
        keep_alive = cap;
        props.server_keep_alive = Some(cap);
    }
    if v5 {
        props.receive_maximum = Some(sh.cfg.receive_maximum);
        props.maximum_packet_size = Some(sh.cfg.max_packet_size);
        props.topic_alias_maximum = Some(sh.cfg.topic_alias_maximum);
        props.retain_available = Some(1);
        props.wildcard_sub_available = Some(1);
        props.sub_id_available = Some(1);
        props.shared_sub_available = Some(1);
        if c.props.request_response_info == Some(1) {
            props.response_info = Some(format!("response/{client_id}"));
        }
    } else {
        props = Properties::default();
    }
    let mut c = c;
    c.client_id = client_id.clone();
    Ok(Accepted {
        connect: c,
        client_id,
        keep_alive,
        connack: ConnAck { session_present: false, code: reason::SUCCESS, props },
    })
}
