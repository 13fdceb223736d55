//! Tap-backed virtio-net device (virtio 1.2, section 5.1): one RX and one TX queue, the MAC
//! in the configuration space, link always up, no control queue and no offloads.
//!
//! - [`mac`]: MAC addresses (parsing, the deterministic default).
//! - [`tap`]: attaching an existing host tap with a virtio-net header and offloads off.
//! - `backend`: moving frames between the queues and the tap, with counters.
//! - `device`: the [`VirtioDevice`](super::VirtioDevice) and its worker thread.
//!
//! Frames cross unchanged; only the 12-byte `virtio_net_hdr_v1` in front of each is
//! rewritten by the device (zeroed, as no offload was negotiated, with `num_buffers` = 1
//! towards the guest), so neither side can smuggle offload requests to the other.

mod backend;
mod device;
pub mod mac;
pub mod tap;

pub use backend::NetStats;
pub use device::{Net, NetConfig};
pub use mac::{MacAddr, MacError};
pub use tap::{Tap, TapError};

/// Length of `struct virtio_net_hdr_v1`, which precedes every frame on both queues and
/// on the tap (TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = 12;
/// Ethernet header: destination, source, EtherType.
pub const ETH_HLEN: usize = 14;
/// Largest frame carried either way: a 64 KiB IP packet behind an Ethernet header with
/// one VLAN tag (what a tap with the largest MTU can produce). Bigger ones are dropped.
pub const MAX_FRAME_LEN: usize = ETH_HLEN + 4 + 65535;

#[cfg(test)]
mod tests;
