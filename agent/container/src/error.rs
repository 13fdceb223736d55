//! The library's error type. Every variant names what was being done or which spec field
//! was wrong, so a message can go to the user as it is.

use std::path::PathBuf;

use nix::errno::Errno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    ReadSpec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// config.json is not valid JSON or does not match the runtime-spec schema.
    #[error("config.json: {field}: {message}")]
    SpecSyntax { field: String, message: String },
    /// config.json parses but asks for something invalid or unsupported.
    #[error("spec field {field}: {reason}")]
    InvalidSpec { field: String, reason: String },
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },
    /// A path inside the rootfs resolves (through `..` or symlinks) to somewhere outside it.
    #[error("{path:?} escapes the container rootfs {root:?}")]
    PathEscape { root: PathBuf, path: PathBuf },
    /// A system call failed in the calling (agent) process.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: Errno,
    },
    /// Setting up the container process failed inside the child; the message names the step.
    #[error("container setup: {0}")]
    Setup(String),
    /// The operation does not fit the container's current state.
    #[error("container {id}: {reason}")]
    State { id: String, reason: String },
    /// Reported by the cgroup integration (see [`crate::container::CgroupHandle`]).
    #[error("cgroup: {0}")]
    Cgroup(String),
    /// Reported by the seccomp integration.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidSpec {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Attaches "what was being done" to a failed system call.
pub(crate) trait SysContext<T> {
    fn sys(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> SysContext<T> for nix::Result<T> {
    fn sys(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            what: what(),
            source,
        })
    }
}

impl<T> SysContext<T> for std::io::Result<T> {
    fn sys(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Sys {
            what: what(),
            source: e
                .raw_os_error()
                .map(Errno::from_raw)
                .unwrap_or(Errno::UnknownErrno),
        })
    }
}
