//! Task API errors and the ttrpc status codes containerd turns into its errdefs
//! (NotFound, AlreadyExists, FailedPrecondition, NotImplemented, ...).

use containerd_shim_protos::ttrpc::{self, Code};
use husk_protocol::client::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    /// A failed agent call; the agent's status code is kept.
    #[error("{what}: {source}")]
    Agent {
        what: String,
        #[source]
        source: ClientError,
    },
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ShimError {
    pub fn agent(what: impl Into<String>) -> impl FnOnce(ClientError) -> ShimError {
        let what = what.into();
        move |source| ShimError::Agent { what, source }
    }

    fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Agent { source, .. } => source.rpc_code().unwrap_or(Code::UNAVAILABLE),
            ShimError::Internal(_) => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        // The full chain: the agent's own "<what>: <why>" is the useful part.
        let msg = husk_vmm::error_chain(&e);
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), msg))
    }
}

pub type ShimResult<T> = Result<T, ShimError>;
