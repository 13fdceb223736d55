//! Our side (the frontend) of a vhost-user connection to a virtio-fs backend such as
//! virtiofsd: the handshake when the VM is built, and starting and stopping the rings when
//! the guest driver activates or resets the device.
//!
//! The backend processes the virtqueues itself, reading guest RAM through the memfd
//! regions we send it (SET_MEM_TABLE); the VMM only relays notifications.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::debug;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::super::GuestMemory;
use super::super::mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit in the feature word, not a virtio one.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// virtio features we pass through from the backend to the guest. Everything the rings
/// need is the backend's business; the transport only builds split rings, so
/// VIRTIO_F_RING_PACKED and friends stay off.
pub const GUEST_FEATURE_MASK: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// Protocol features we use when the backend offers them: MQ to ask how many queues it
/// serves, REPLY_ACK so every message is answered and a failure shows at the step that
/// caused it.
pub const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::MQ.union(VhostUserProtocolFeatures::REPLY_ACK);

/// How long one request may wait for the backend's answer. The requests run on a vCPU
/// thread (the guest's status write), so a stuck backend must not stall it forever.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error(
        "cannot connect to the vhost-user socket {socket}: {source} (is virtiofsd running with \
         --socket-path {socket}?)"
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vhost-user {step}: {source}")]
    Request {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the backend does not offer VIRTIO_F_VERSION_1 (features {0:#x})")]
    NoVersion1(u64),
    #[error("the backend serves {have} queues, the device needs {need}")]
    TooFewQueues { have: u64, need: usize },
    #[error(
        "guest RAM is not shared memory, so the backend cannot map it (the VMM backs guest RAM \
         with a memfd when a vhost-user device is configured)"
    )]
    PrivateMemory,
    #[error("queue {index}: {what} {addr:#x} is not in guest RAM")]
    RingAddress {
        index: usize,
        what: &'static str,
        addr: u64,
    },
    #[error("socket setup: {0}")]
    Socket(#[source] std::io::Error),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Request { step, source }
}

/// The guest-visible features for what the backend offers.
pub fn guest_features(backend_features: u64) -> u64 {
    backend_features & GUEST_FEATURE_MASK
}

/// One queue as handed to the backend.
pub struct RingSetup<'a> {
    pub queue: &'a Queue,
    /// Written by the guest's QueueNotify (through KVM or the transport).
    pub kick: &'a EventFd,
    /// Written by the backend when it used buffers.
    pub call: &'a EventFd,
}

/// An open connection to a vhost-user backend, after feature negotiation.
pub struct Connection {
    frontend: Frontend,
    socket: PathBuf,
    backend_features: u64,
    protocol: bool,
    /// A second handle on the socket, only watched for hang-ups (never read).
    watch: UnixStream,
}

impl Connection {
    /// Connects to `socket`, negotiates protocol features and claims the backend
    /// (SET_OWNER). `queues` is how many queues the device will set up.
    pub fn connect(socket: &Path, queues: usize) -> Result<Self, VhostUserError> {
        let stream = UnixStream::connect(socket).map_err(|source| VhostUserError::Connect {
            socket: socket.to_path_buf(),
            source,
        })?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(VhostUserError::Socket)?;
        let watch = stream.try_clone().map_err(VhostUserError::Socket)?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);

        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::NoVersion1(backend_features));
        }
        let protocol = backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            let acked = offered & WANTED_PROTOCOL_FEATURES;
            frontend
                .set_protocol_features(acked)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let have = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                if have < queues as u64 {
                    return Err(VhostUserError::TooFewQueues { have, need: queues });
                }
            }
            debug!(
                socket = %socket.display(),
                "vhost-user protocol features offered {:#x}, acked {:#x}",
                offered.bits(),
                acked.bits()
            );
        }
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        debug!(
            socket = %socket.display(),
            "vhost-user backend features {backend_features:#x}"
        );
        Ok(Self {
            frontend,
            socket: socket.to_path_buf(),
            backend_features,
            protocol,
            watch,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// A handle on the socket to watch for the backend hanging up.
    pub fn watch_handle(&self) -> std::io::Result<UnixStream> {
        self.watch.try_clone()
    }

    /// Hands guest RAM and the rings to the backend and enables them: the vhost-user
    /// equivalent of DRIVER_OK.
    pub fn start(
        &mut self,
        mem: &GuestMemory,
        acked_features: u64,
        rings: &[RingSetup<'_>],
    ) -> Result<(), VhostUserError> {
        let mut features = acked_features & self.backend_features;
        if self.protocol {
            // With it, rings start disabled until SET_VRING_ENABLE (vhost-user spec, "Ring
            // states").
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))?;

        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| VhostUserError::PrivateMemory)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;

        for (index, ring) in rings.iter().enumerate() {
            let q = ring.queue;
            // vhost-user ring addresses are the frontend's virtual addresses; the backend
            // translates them through the memory table.
            let host = |what: &'static str, addr: u64| {
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::RingAddress { index, what, addr })
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host("descriptor table", q.desc_table())?,
                used_ring_addr: host("used ring", q.used_ring())?,
                avail_ring_addr: host("available ring", q.avail_ring())?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(index, q.size())
                .map_err(step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(index, &config)
                .map_err(step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(index, q.next_avail())
                .map_err(step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(index, ring.call)
                .map_err(step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(index, ring.kick)
                .map_err(step("SET_VRING_KICK"))?;
        }
        if self.protocol {
            for index in 0..rings.len() {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the first `count` rings (driver reset): disables them and asks for their
    /// base, which makes the backend stop processing them (vhost-user spec, GET_VRING_BASE).
    /// Returns each ring's base: the backend's next available index.
    pub fn stop(&mut self, count: usize) -> Result<Vec<u32>, VhostUserError> {
        let mut first = None;
        let mut bases = Vec::with_capacity(count);
        for index in 0..count {
            if self.protocol
                && let Err(e) = self.frontend.set_vring_enable(index, false)
            {
                first.get_or_insert(step("SET_VRING_ENABLE")(e));
            }
            match self.frontend.get_vring_base(index) {
                Ok(b) => bases.push(b),
                Err(e) => {
                    first.get_or_insert(step("GET_VRING_BASE")(e));
                }
            }
        }
        first.map_or(Ok(bases), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_sees_only_ring_features_the_transport_supports() {
        let packed = 1u64 << 34;
        let notification = 1u64; // VIRTIO_FS_F_NOTIFICATION
        let backend = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VHOST_USER_F_PROTOCOL_FEATURES
            | packed
            | notification;
        assert_eq!(
            guest_features(backend),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
        );
        assert_eq!(guest_features(VIRTIO_F_VERSION_1), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn missing_socket_is_named() {
        let err = match Connection::connect(Path::new("/nonexistent/husk-vfs.sock"), 2) {
            Err(e) => e,
            Ok(_) => panic!("connected to a missing socket"),
        };
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/husk-vfs.sock"), "{msg}");
        assert!(msg.contains("virtiofsd"), "{msg}");
    }
}
