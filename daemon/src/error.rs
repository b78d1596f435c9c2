//! The daemon's request errors and their one mapping to gRPC status codes.

/// Why a request was refused or failed. Messages are meant for the person
/// at the terminal: what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request itself is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// An experiment id, namespace, pid, cgroup or device that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The host or the experiment is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another experiment already acts on the same thing.
    #[error("{0}")]
    AlreadyExists(String),
    /// The daemon is shutting down or a kernel facility is missing.
    #[error("{0}")]
    Unavailable(String),
    /// A kernel operation failed for a reason the request could not prevent.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The request was turned down for what it asked, not because something
    /// failed while carrying it out.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, ApiError::Internal(_))
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        use tonic::Code;
        let code = match &e {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
