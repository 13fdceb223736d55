//! The virtio-fs device as the transport sees it: a vhost-user frontend whose queues are
//! served by an external backend (virtiofsd).

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use tracing::{error, info, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config_space::{FsConfigSpace, TagError};
use super::relay;
use super::vhost_user::{Connection, RingSetup, VhostUserError, guest_features};
use crate::devices::virtio::block::read_config_bytes;
use crate::devices::virtio::worker::Worker;
use crate::devices::virtio::{
    ActivateError, ActiveQueue, GuestMemory, Interrupt, VirtioDevice, device_type,
};

/// One request queue is plenty for a container rootfs; the guest driver also wants the
/// high-priority queue (queue 0, for FUSE interrupts and forgets).
pub const NUM_REQUEST_QUEUES: usize = 1;
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
/// Ring size offered to the driver.
pub const QUEUE_SIZE: u16 = 1024;
const QUEUE_SIZES: [u16; NUM_QUEUES] = [QUEUE_SIZE; NUM_QUEUES];

/// How the VM builder describes a share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The vhost-user socket virtiofsd listens on (`--socket-path`).
    pub socket: PathBuf,
    /// What the guest mounts: `mount -t virtiofs TAG /mnt`.
    pub tag: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Tag(#[from] TagError),
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
}

/// A virtio-fs device backed by a vhost-user backend.
pub struct Fs {
    /// How logs name this device.
    name: String,
    tag: String,
    config_space: FsConfigSpace,
    conn: Connection,
    avail_features: u64,
    acked_features: u64,
    relay: Option<Worker<relay::RelayEnd>>,
    /// Rings handed to the backend, to stop on reset.
    started_rings: usize,
    /// The active queues' registers and guest RAM, kept for a snapshot (the backend holds
    /// the ring positions; these say where the rings are).
    active: Option<(GuestMemory, Vec<Queue>)>,
    /// The VM's stop latch, requested when the backend hangs up (see `relay`).
    stop: Option<crate::stop::StopSignal>,
}

impl Fs {
    /// Connects to the backend and negotiates with it; fails if the socket is not there or
    /// the backend cannot serve the device.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        let config_space = FsConfigSpace::new(&config.tag, NUM_REQUEST_QUEUES as u32)?;
        let conn = Connection::connect(&config.socket, NUM_QUEUES)?;
        let avail_features = guest_features(conn.backend_features());
        let name = format!(
            "virtio-fs tag {} (vhost-user socket {})",
            config.tag,
            config.socket.display()
        );
        info!("{name}: connected, offering features {avail_features:#x}");
        Ok(Self {
            name,
            tag: config.tag.clone(),
            config_space,
            conn,
            avail_features,
            acked_features: 0,
            relay: None,
            started_rings: 0,
            active: None,
            stop: None,
        })
    }

    /// Stops the rings the backend serves; returns their bases (the backend's next
    /// available index) when it could say.
    /// Ends the VM through `stop` when the backend hangs up while the device runs.
    pub fn stop_vm_when_backend_exits(&mut self, stop: crate::stop::StopSignal) {
        self.stop = Some(stop);
    }

    fn stop_backend(&mut self) -> Option<Vec<u32>> {
        if self.started_rings == 0 {
            return None;
        }
        let bases = match self.conn.stop(self.started_rings) {
            Ok(b) => Some(b),
            Err(e) => {
                warn!("{}: stopping the rings: {e}", self.name);
                None
            }
        };
        self.started_rings = 0;
        bases
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space.as_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The virtio-fs config space is read-only for the driver.
        warn!(
            "{}: driver write to config offset {offset:#x} ignored",
            self.name
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        if queues.len() != NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got: queues.len(),
            });
        }
        if self.relay.is_some() {
            return Err(ActivateError::Other(format!(
                "{} already active",
                self.name
            )));
        }
        let calls = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Worker)?;
        let watch = self.conn.watch_handle().map_err(ActivateError::Worker)?;
        let rings: Vec<RingSetup<'_>> = queues
            .iter()
            .zip(&calls)
            .map(|(q, call)| RingSetup {
                queue: &q.queue,
                kick: &q.notify,
                call,
            })
            .collect();
        // Counted before starting: a half-done start is undone like a full one.
        self.started_rings = rings.len();
        if let Err(e) = self.conn.start(&mem, self.acked_features, &rings) {
            let why = format!("{}: cannot start the device: {e}", self.name);
            error!("{why}");
            // The share can never serve the guest (most often virtiofsd is gone): end the
            // VM, as a hang-up later would, rather than let its workload (or a template
            // snapshot of it) wait on the share forever.
            if let Some(stop) = &self.stop {
                stop.request(crate::stop::StopReason::BackendGone(why));
            }
            self.stop_backend();
            return Err(ActivateError::Other(format!("{}: {e}", self.name)));
        }
        let kicks = queues
            .iter()
            .map(|q| q.notify.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Worker);
        let kicks = match kicks {
            Ok(k) => k,
            Err(e) => {
                self.stop_backend();
                return Err(e);
            }
        };
        let name = self.name.clone();
        let stop = self.stop.clone();
        let worker = match Worker::spawn("virtio-fs", move |kill| {
            relay::run(name, calls, kicks, watch, interrupt, kill, stop)
        }) {
            Ok(w) => w,
            Err(e) => {
                // Without the relay the guest would never hear back: stop the rings too.
                error!("{}: cannot start the notification relay: {e}", self.name);
                self.stop_backend();
                return Err(ActivateError::Worker(e));
            }
        };
        self.relay = Some(worker);
        info!(
            "{}: running, {} queues, features {:#x}",
            self.name,
            queues.len(),
            self.acked_features
        );
        self.active = Some((mem, queues.into_iter().map(|q| q.queue).collect()));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_backend();
        if let Some(w) = self.relay.take() {
            w.stop();
        }
        self.active = None;
        self.acked_features = 0;
        true
    }

    fn identity(&self) -> Option<String> {
        // The driver read the tag at probe time: a restore must offer the same one.
        Some(format!("virtio-fs tag {}", self.tag))
    }

    /// Only a share the guest never used can move to another backend: once mounted, its
    /// FUSE session (inodes, open files) lives in this virtiofsd. A template VM is
    /// snapshotted before any container mounts its share, so the rings are still empty.
    fn quiesce(&mut self) -> Result<Vec<Queue>, String> {
        let Some((mem, queues)) = &self.active else {
            return Err(format!("{}: not active", self.name));
        };
        for (index, q) in queues.iter().enumerate() {
            let published = q
                .avail_idx(mem, Ordering::Acquire)
                .map_err(|e| format!("{}: queue {index}: {e}", self.name))?;
            if published.0 != 0 {
                return Err(format!(
                    "{}: the guest has used the share (queue {index} carried {} requests); its \
                     FUSE session lives in virtiofsd, so only a VM that never mounted it can be \
                     snapshotted",
                    self.name, published.0
                ));
            }
        }
        let bases = self.stop_backend();
        if let Some(w) = self.relay.take() {
            w.stop();
        }
        let Some((_, mut queues)) = self.active.take() else {
            return Err(format!("{}: not active", self.name));
        };
        if let Some(bases) = bases
            && bases.iter().any(|&b| b != 0)
        {
            return Err(format!(
                "{}: the backend had consumed requests (ring bases {bases:?})",
                self.name
            ));
        }
        for q in &mut queues {
            q.set_next_avail(0);
            q.set_next_used(0);
        }
        Ok(queues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tag_is_refused_before_connecting() {
        let cfg = FsConfig {
            socket: "/nonexistent/vfs.sock".into(),
            tag: "has space".into(),
        };
        let err = Fs::new(&cfg).err().expect("refused");
        assert!(matches!(err, FsError::Tag(_)), "{err}");
    }
}
