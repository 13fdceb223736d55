//! The failure type of the container RPCs: a ttrpc status code and a "<what>: <why>" message,
//! as agent.proto's error convention asks.

use husk_container::Error as LibError;
use husk_container::cgroup::CgroupError;
use nix::errno::Errno;
use ttrpc::Code;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, what: impl std::fmt::Display, why: impl std::fmt::Display) -> Self {
        Failure {
            code,
            message: format!("{what}: {why}"),
        }
    }

    pub fn invalid(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Self {
        Self::new(Code::INVALID_ARGUMENT, what, why)
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(Code::NOT_FOUND, what, "not found")
    }

    pub fn exists(what: impl std::fmt::Display) -> Self {
        Self::new(Code::ALREADY_EXISTS, what, "already exists")
    }

    pub fn precondition(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Self {
        Self::new(Code::FAILED_PRECONDITION, what, why)
    }

    pub fn internal(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Self {
        Self::new(Code::INTERNAL, what, why)
    }

    /// An OS error: exhaustion errnos map to RESOURCE_EXHAUSTED, the rest to INTERNAL.
    pub fn os(what: impl std::fmt::Display, err: &std::io::Error) -> Self {
        let code = match err.raw_os_error().map(Errno::from_raw) {
            Some(e) => errno_code(e),
            None => Code::INTERNAL,
        };
        Self::new(code, what, err)
    }

    /// A container library error about `what` (e.g. "container c1").
    pub fn lib(what: impl std::fmt::Display, err: LibError) -> Self {
        let code = match &err {
            LibError::SpecSyntax { .. }
            | LibError::InvalidSpec { .. }
            | LibError::InvalidId { .. }
            | LibError::PathEscape { .. }
            | LibError::Seccomp(_) => Code::INVALID_ARGUMENT,
            LibError::State { .. } => Code::FAILED_PRECONDITION,
            LibError::Sys { source, .. } => errno_code(*source),
            // The child reports a path escape as text (it cannot send the typed error).
            LibError::Setup(why) if why.contains("escapes the container rootfs") => {
                Code::INVALID_ARGUMENT
            }
            _ => Code::INTERNAL,
        };
        Self::new(code, what, err)
    }

    pub fn cgroup(what: impl std::fmt::Display, err: CgroupError) -> Self {
        let code = match &err {
            CgroupError::ControllerMissing { .. } => Code::FAILED_PRECONDITION,
            CgroupError::InvalidResource(_) | CgroupError::InvalidPath { .. } => {
                Code::INVALID_ARGUMENT
            }
            _ => Code::INTERNAL,
        };
        Self::new(code, what, err)
    }

    pub fn to_status(&self) -> ttrpc::Error {
        ttrpc::error::get_rpc_status(self.code, self.message.clone())
    }
}

fn errno_code(e: Errno) -> Code {
    match e {
        Errno::ENOMEM | Errno::EAGAIN | Errno::EMFILE | Errno::ENFILE | Errno::ENOSPC => {
            Code::RESOURCE_EXHAUSTED
        }
        _ => Code::INTERNAL,
    }
}
