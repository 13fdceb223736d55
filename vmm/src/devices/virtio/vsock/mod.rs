//! virtio-vsock device (virtio 1.2, section 5.10) with a Firecracker-compatible "hybrid"
//! host side: guest streams are bridged to Unix sockets instead of host AF_VSOCK (this
//! host has no vhost-vsock).
//!
//! - [`packet`]: the packet header.
//! - `connection`: one stream's state machine and credit-based flow control.
//! - [`muxer`]: routing between guest packets and host sockets, the `CONNECT` handshake.
//! - `device`: the [`VirtioDevice`](super::VirtioDevice) and its worker thread.

mod connection;
mod device;
pub mod muxer;
pub mod packet;

use std::path::PathBuf;

pub use connection::CONN_BUF_SIZE;
pub use device::Vsock;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("invalid guest CID {0}: must be between 3 and 2^32-2")]
    InvalidCid(u64),
    #[error("vsock socket path {0} is in use by a listening process or is not a socket")]
    PathInUse(PathBuf),
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock epoll setup failed: {0}")]
    Epoll(#[source] std::io::Error),
}

#[cfg(test)]
mod tests;
