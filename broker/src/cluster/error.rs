//! Cluster errors, and their one conversion to gRPC status codes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "node name {name:?} is already taken by a live member at {existing_addr} (this node: {addr}); give each node its own --node-name"
    )]
    NameTaken { name: String, existing_addr: String, addr: String },
    /// What a seed or member answered this node's join.
    #[error("joining through {seed} refused: {reason}")]
    JoinRefused { seed: String, reason: String },
    #[error("unknown peer {0:?}: it must join first")]
    UnknownPeer(String),
    #[error("peer {name:?} speaks protocol revision {theirs} of broker.v1; this node speaks {ours}")]
    Protocol { name: String, theirs: u32, ours: u32 },
    #[error("invalid request from {from:?}: {what}")]
    Invalid { from: String, what: String },
    #[error("the router is gone: the node is shutting down")]
    Stopped,
}

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Status {
        let code = match &e {
            ClusterError::NameTaken { .. } => Code::AlreadyExists,
            ClusterError::UnknownPeer(_) => Code::FailedPrecondition,
            ClusterError::Protocol { .. } => Code::FailedPrecondition,
            ClusterError::Invalid { .. } => Code::InvalidArgument,
            ClusterError::Stopped => Code::Unavailable,
            ClusterError::JoinRefused { .. } => Code::FailedPrecondition,
        };
        Status::new(code, e.to_string())
    }
}

/// A peer's answer that names our request as coming from a stranger: it
/// restarted, or dropped us; we join again.
pub fn is_unknown_peer(s: &Status) -> bool {
    s.code() == Code::FailedPrecondition && s.message().starts_with("unknown peer")
}
