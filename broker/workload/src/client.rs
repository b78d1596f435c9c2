//! A small MQTT client on the project's own codec: packet in, packet out.
//! The load client and the tests drive the protocol with it explicitly.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::codec::{self, ConnAck, Connect, DecodeError, Packet, Properties, Version};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("socket error")]
    Io(#[from] std::io::Error),
    #[error("broker sent a bad packet")]
    Decode(#[from] DecodeError),
    #[error("connection closed by the broker")]
    Closed,
    #[error("timed out waiting for the broker")]
    Timeout,
    #[error("expected CONNACK, got {0}")]
    NotConnAck(&'static str),
}

pub fn connect_packet(version: Version, client_id: &str, clean: bool, keep_alive: u16) -> Connect {
    Connect {
        version,
        clean_start: clean,
        keep_alive,
        props: Properties::default(),
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
    }
}

pub struct ReadHalf {
    rd: OwnedReadHalf,
    buf: BytesMut,
    pub version: Version,
}

pub struct WriteHalf {
    wr: OwnedWriteHalf,
    out: BytesMut,
    pub version: Version,
}

impl ReadHalf {
    /// The next packet; `Closed` on EOF.
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            if let Some(p) = codec::decode(&mut self.buf, self.version, 256 << 20)? {
                return Ok(p);
            }
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// A packet already buffered, without reading the socket.
    pub fn try_next(&mut self) -> Result<Option<Packet>, ClientError> {
        Ok(codec::decode(&mut self.buf, self.version, 256 << 20)?)
    }

    pub async fn recv_timeout(&mut self, d: Duration) -> Result<Packet, ClientError> {
        tokio::time::timeout(d, self.recv()).await.map_err(|_| ClientError::Timeout)?
    }
}

impl WriteHalf {
    pub async fn send(&mut self, p: &Packet) -> Result<(), ClientError> {
        self.queue(p);
        self.flush().await
    }

    /// Encodes without writing; `flush` writes everything queued.
    pub fn queue(&mut self, p: &Packet) {
        codec::encode(p, self.version, &mut self.out);
    }

    pub fn queued(&self) -> usize {
        self.out.len()
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.wr.write_all(bytes).await?;
        Ok(())
    }
}

pub struct Client {
    pub rd: ReadHalf,
    pub wr: WriteHalf,
}

impl Client {
    /// Opens TCP only (for tests that send bytes by hand).
    pub async fn tcp(addr: SocketAddr, version: Version) -> Result<Client, ClientError> {
        let s = TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
        let _ = s.set_nodelay(true);
        let (rd, wr) = s.into_split();
        Ok(Client {
            rd: ReadHalf { rd, buf: BytesMut::with_capacity(64 * 1024), version },
            wr: WriteHalf { wr, out: BytesMut::with_capacity(64 * 1024), version },
        })
    }

    /// Connects and waits for CONNACK (any reason code).
    pub async fn connect(addr: SocketAddr, c: Connect) -> Result<(Client, ConnAck), ClientError> {
        let mut cl = Client::tcp(addr, c.version).await?;
        cl.wr.send(&Packet::Connect(Box::new(c))).await?;
        match cl.rd.recv_timeout(Duration::from_secs(10)).await? {
            Packet::ConnAck(a) => Ok((cl, a)),
            other => Err(ClientError::NotConnAck(other.name())),
        }
    }

    pub async fn send(&mut self, p: &Packet) -> Result<(), ClientError> {
        self.wr.send(p).await
    }

    pub async fn recv(&mut self, d: Duration) -> Result<Packet, ClientError> {
        self.rd.recv_timeout(d).await
    }
}

/// Convenience for tests and the load client.
pub fn publish(topic: &str, qos: codec::QoS, pid: u16, payload: impl Into<Bytes>) -> Packet {
    Packet::Publish(codec::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_owned(),
        pid,
        props: Properties::default(),
        payload: payload.into(),
    })
}
