//! File-backed virtio-blk device (virtio 1.2, section 5.2).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::PathBuf;

use tracing::debug;

use super::guest_log::guest_warn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use super::worker::{QueueHandler, Worker, run_single_queue};
use super::{ActivateError, ActiveQueue, GuestMemory, Interrupt, VirtioDevice, device_type};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Request header: type (u32), reserved (u32), sector (u64).
const HEADER_LEN: u32 = 16;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// How the VM builder describes a disk.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// `None`: no medium (capacity 0) until a restore builds the slot with an image.
    pub path: Option<PathBuf>,
    pub read_only: bool,
    /// Returned by GET_ID (at most 20 bytes; longer serials are cut).
    pub serial: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The request-processing half of the device; owned by the worker while the device runs.
pub(crate) struct BlockBackend {
    /// `None` for an empty slot: its capacity is 0, so no read or write reaches it.
    file: Option<File>,
    /// Capacity in bytes (whole sectors only).
    capacity: u64,
    read_only: bool,
    id: [u8; ID_LEN],
}

/// A request the chain describes, or why it is malformed.
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Descriptor>,
    status: GuestAddress,
}

impl BlockBackend {
    /// Checks the shape of a chain; `None` means it must be discarded.
    fn parse(mem: &GuestMemory, descs: &[Descriptor]) -> Option<Request> {
        let (head, rest) = descs.split_first()?;
        let (status, data) = rest.split_last()?;
        // A chain whose last descriptor still points on was cut short (a loop, or a
        // descriptor outside the table).
        if status.has_next() || !status.is_write_only() || status.len() < 1 {
            return None;
        }
        if head.is_write_only() || head.len() < HEADER_LEN {
            return None;
        }
        // Device-readable descriptors must all come before device-writable ones.
        if let Some(first_w) = data.iter().position(|d| d.is_write_only())
            && data[first_w..].iter().any(|d| !d.is_write_only())
        {
            return None;
        }
        if !mem.check_range(status.addr(), 1) {
            return None;
        }
        for d in data {
            if !mem.check_range(d.addr(), d.len() as usize) {
                return None;
            }
        }
        let kind: u32 = mem.read_obj(head.addr()).ok()?;
        let sector: u64 = mem.read_obj(head.addr().checked_add(8)?).ok()?;
        Some(Request {
            kind: u32::from_le(kind),
            sector: u64::from_le(sector),
            data: data.to_vec(),
            status: status.addr(),
        })
    }

    /// Executes a well-formed request; returns the status and the bytes written to the
    /// guest (status byte excluded).
    fn execute(&mut self, mem: &GuestMemory, req: &Request) -> (u8, u32) {
        match req.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = req.kind == VIRTIO_BLK_T_OUT;
                if req.data.iter().any(|d| d.is_write_only() == write) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                if write && self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let total: u64 = req.data.iter().map(|d| u64::from(d.len())).sum();
                let Some(start) = req.sector.checked_mul(SECTOR_SIZE) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                if start
                    .checked_add(total)
                    .is_none_or(|end| end > self.capacity)
                {
                    debug!(
                        "virtio-blk: request at sector {} len {total} beyond capacity",
                        req.sector
                    );
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                match self.transfer(mem, &req.data, start, write) {
                    Ok(()) if write => (VIRTIO_BLK_S_OK, 0),
                    // `total` fits: the chain's bytes are capped at u32 by virtio-queue.
                    Ok(()) => (VIRTIO_BLK_S_OK, u32::try_from(total).unwrap_or(u32::MAX)),
                    Err(e) => {
                        guest_warn!("virtio-blk: I/O error at byte {start}: {e}");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            // Nothing was written to a read-only image: a guest's flush must not make the
            // host fsync a file shared by other VMs.
            VIRTIO_BLK_T_FLUSH if self.read_only => (VIRTIO_BLK_S_OK, 0),
            VIRTIO_BLK_T_FLUSH => match self.file.as_ref().map_or(Ok(()), File::sync_data) {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    guest_warn!("virtio-blk: flush failed: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            VIRTIO_BLK_T_GET_ID => {
                let Some(d) = req.data.first().filter(|d| d.is_write_only()) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let n = ID_LEN.min(d.len() as usize);
                match mem.write_slice(&self.id[..n], d.addr()) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            other => {
                debug!("virtio-blk: unsupported request type {other}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }

    fn transfer(
        &mut self,
        mem: &GuestMemory,
        data: &[Descriptor],
        start: u64,
        write: bool,
    ) -> Result<(), String> {
        let file = self.file.as_mut().ok_or("no medium")?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| e.to_string())?;
        // Guest buffers go straight to and from the file; the file offset advances with
        // each descriptor.
        for d in data {
            let len = d.len() as usize;
            let r = if write {
                mem.write_all_volatile_to(d.addr(), file, len)
            } else {
                mem.read_exact_volatile_from(d.addr(), file, len)
            };
            r.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Handles one chain and returns the used length to report.
    fn handle_chain(&mut self, mem: &GuestMemory, descs: &[Descriptor]) -> u32 {
        let Some(req) = Self::parse(mem, descs) else {
            guest_warn!("virtio-blk: malformed request chain discarded");
            return 0;
        };
        let (status, written) = self.execute(mem, &req);
        if mem.write_obj(status, req.status).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }
}

impl QueueHandler for BlockBackend {
    fn process(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        let mut pass = crate::devices::virtio::chain::Pass::new(queue);
        while let Some(chain) = pass.pop(queue, mem) {
            let head = chain.head_index();
            // The chain iterator stops after `queue size` descriptors (`chain::Pass::pop` refuses
            // indirect tables, which would allow 65,535), bounding this.
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.handle_chain(mem, &descs);
            if let Err(e) = queue.add_used(mem, head, len) {
                guest_warn!("virtio-blk: cannot add used entry: {e}");
            }
            used = true;
        }
        used
    }
}

/// A virtio-blk device backed by a file or a host block device.
pub struct Block {
    backend: Option<BlockBackend>,
    worker: Option<Worker<(BlockBackend, Queue)>>,
    avail_features: u64,
    acked_features: u64,
    /// Config space: capacity (u64), size_max (u32), seg_max (u32).
    config: [u8; 16],
}

impl Block {
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        let (file, size) = match &config.path {
            Some(path) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(!config.read_only)
                    .open(path)
                    .map_err(|source| BlockError::Open {
                        path: path.clone(),
                        source,
                    })?;
                // Seeking to the end also works for block devices, whose metadata length
                // is zero.
                let size = (&file)
                    .seek(SeekFrom::End(0))
                    .map_err(|source| BlockError::Size {
                        path: path.clone(),
                        source,
                    })?;
                (Some(file), size)
            }
            None => (None, 0),
        };
        let sectors = size / SECTOR_SIZE;
        let mut id = [0u8; ID_LEN];
        if let Some(serial) = &config.serial {
            let b = serial.as_bytes();
            let n = b.len().min(ID_LEN);
            id[..n].copy_from_slice(&b[..n]);
        }
        let mut avail_features =
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_SEG_MAX;
        if config.read_only {
            avail_features |= VIRTIO_BLK_F_RO;
        } else {
            avail_features |= VIRTIO_BLK_F_FLUSH;
        }
        let mut cfg = [0u8; 16];
        cfg[0..8].copy_from_slice(&sectors.to_le_bytes());
        // Header and status take two descriptors of each chain.
        cfg[12..16].copy_from_slice(&(u32::from(QUEUE_SIZE) - 2).to_le_bytes());
        Ok(Block {
            backend: Some(BlockBackend {
                file,
                capacity: sectors * SECTOR_SIZE,
                read_only: config.read_only,
                id,
            }),
            worker: None,
            avail_features,
            acked_features: 0,
            config: cfg,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config[0..8]);
        u64::from_le_bytes(b)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn config_space(&self) -> Vec<u8> {
        self.config.to_vec()
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<ActiveQueue>,
        interrupt: Interrupt,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([q]) = <[ActiveQueue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        let backend = self
            .backend
            .take()
            .ok_or_else(|| ActivateError::Other("virtio-blk already active".into()))?;
        let worker = Worker::spawn("virtio-blk", move |kill| {
            run_single_queue(backend, mem, q.queue, q.notify, interrupt, kill)
        })
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        if let Some(w) = self.worker.take() {
            self.backend = w.stop().map(|(backend, _)| backend);
        }
        self.acked_features = 0;
        self.backend.is_some()
    }

    fn quiesce(&mut self) -> Result<Vec<Queue>, String> {
        let worker = self.worker.take().ok_or("virtio-blk is not active")?;
        let (backend, queue) = worker.stop().ok_or("virtio-blk worker did not stop")?;
        self.backend = Some(backend);
        Ok(vec![queue])
    }
}

/// Copies `data.len()` bytes of `config` at `offset`; out-of-range bytes read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 0x20_0000;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x1f_0000;

    struct Fixture {
        mem: GuestMemory,
        _dir: vmm_sys_util::tempdir::TempDir,
        path: PathBuf,
    }

    fn fixture(sectors: u64) -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/husk-blk").unwrap();
        let path = dir.as_path().join("disk.img");
        let mut f = File::create(&path).unwrap();
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i % 251) as u8)
            .collect();
        f.write_all(&content).unwrap();
        Fixture {
            mem,
            _dir: dir,
            path,
        }
    }

    fn backend(fx: &Fixture, read_only: bool) -> BlockBackend {
        Block::new(BlockConfig {
            path: Some(fx.path.clone()),
            read_only,
            serial: Some("husk-serial".into()),
        })
        .unwrap()
        .backend
        .unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, 0))
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain through the backend; returns (used len, status byte).
    fn run(b: &mut BlockBackend, mem: &GuestMemory, descs: &[RawDescriptor]) -> (u32, u8) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(b.process(mem, &mut q));
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(vq.used().idx().load(), 1, "exactly one used entry");
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        (used.len(), status)
    }

    fn std_chain(kind_flags: u32, len: u32) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, 0),
            desc(DATA, len, kind_flags),
            desc(STATUS, 1, VRING_DESC_F_WRITE),
        ]
    }

    #[test]
    fn read_sectors() {
        let fx = fixture(8);
        let mut b = backend(&fx, false);
        header(&fx.mem, VIRTIO_BLK_T_IN, 2);
        let (len, status) = run(&mut b, &fx.mem, &std_chain(VRING_DESC_F_WRITE, 1024));
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 1024];
        fx.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let want: Vec<u8> = (1024..2048u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn write_then_flush() {
        let fx = fixture(8);
        let mut b = backend(&fx, false);
        fx.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA))
            .unwrap();
        header(&fx.mem, VIRTIO_BLK_T_OUT, 7);
        let (len, status) = run(&mut b, &fx.mem, &std_chain(0, 512));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_OK));
        let mut on_disk = vec![0u8; 512];
        File::open(&fx.path)
            .unwrap()
            .read_exact_at(&mut on_disk, 7 * 512)
            .unwrap();
        assert_eq!(on_disk, vec![0xab; 512]);

        header(&fx.mem, VIRTIO_BLK_T_FLUSH, 0);
        let chain = [desc(HDR, 16, 0), desc(STATUS, 1, VRING_DESC_F_WRITE)];
        assert_eq!(run(&mut b, &fx.mem, &chain), (1, VIRTIO_BLK_S_OK));
    }

    #[test]
    fn get_id_is_zero_padded_serial() {
        let fx = fixture(1);
        let mut b = backend(&fx, false);
        fx.mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
        header(&fx.mem, VIRTIO_BLK_T_GET_ID, 0);
        let (len, status) = run(&mut b, &fx.mem, &std_chain(VRING_DESC_F_WRITE, 32));
        assert_eq!((len, status), (21, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 32];
        fx.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..11], b"husk-serial");
        assert_eq!(&id[11..20], &[0u8; 9]);
        assert_eq!(&id[20..], &[0xee; 12], "nothing past 20 bytes written");
    }

    #[test]
    fn an_empty_slot_has_no_capacity_but_answers_its_serial() {
        let fx = fixture(1);
        let blk = Block::new(BlockConfig {
            path: None,
            read_only: true,
            serial: Some("rootfs".into()),
        })
        .unwrap();
        assert_eq!(blk.sectors(), 0);
        assert_ne!(blk.avail_features() & VIRTIO_BLK_F_RO, 0);
        let mut b = blk.backend.unwrap();
        header(&fx.mem, VIRTIO_BLK_T_IN, 0);
        let (len, status) = run(&mut b, &fx.mem, &std_chain(VRING_DESC_F_WRITE, 512));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR), "nothing to read");
        header(&fx.mem, VIRTIO_BLK_T_GET_ID, 0);
        let (_, status) = run(&mut b, &fx.mem, &std_chain(VRING_DESC_F_WRITE, 20));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let mut id = [0u8; 6];
        fx.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"rootfs");
        header(&fx.mem, VIRTIO_BLK_T_FLUSH, 0);
        let chain = [desc(HDR, 16, 0), desc(STATUS, 1, VRING_DESC_F_WRITE)];
        assert_eq!(run(&mut b, &fx.mem, &chain), (1, VIRTIO_BLK_S_OK));
    }

    #[test]
    fn out_of_range_and_unsupported() {
        let fx = fixture(4);
        let mut b = backend(&fx, false);
        header(&fx.mem, VIRTIO_BLK_T_IN, 3);
        // Sector 3 + 2 sectors crosses the end of a 4-sector disk.
        let (len, status) = run(&mut b, &fx.mem, &std_chain(VRING_DESC_F_WRITE, 1024));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
        header(&fx.mem, VIRTIO_BLK_T_IN, u64::MAX / 2);
        let (_, status) = run(&mut b, &fx.mem, &std_chain(VRING_DESC_F_WRITE, 512));
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "sector overflow");
        header(&fx.mem, 0x42, 0);
        let (len, status) = run(&mut b, &fx.mem, &std_chain(VRING_DESC_F_WRITE, 512));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_UNSUPP));
        // Data direction contradicting the request type.
        header(&fx.mem, VIRTIO_BLK_T_IN, 0);
        let (_, status) = run(&mut b, &fx.mem, &std_chain(0, 512));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn read_only_rejects_writes_and_cannot_modify() {
        let fx = fixture(2);
        let blk = Block::new(BlockConfig {
            path: Some(fx.path.clone()),
            read_only: true,
            serial: None,
        })
        .unwrap();
        assert_ne!(blk.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_eq!(
            blk.avail_features() & VIRTIO_BLK_F_FLUSH,
            0,
            "no flush offered for an image that cannot be written"
        );
        assert_eq!(blk.sectors(), 2);
        let mut b = blk.backend.unwrap();
        fx.mem
            .write_slice(&[0x11; 512], GuestAddress(DATA))
            .unwrap();
        header(&fx.mem, VIRTIO_BLK_T_OUT, 0);
        let (len, status) = run(&mut b, &fx.mem, &std_chain(0, 512));
        assert_eq!((len, status), (1, VIRTIO_BLK_S_IOERR));
        // The file itself was opened without write access.
        assert!(b.file.as_ref().unwrap().write_all(b"x").is_err());
        // A flush sent anyway succeeds without touching the host file.
        header(&fx.mem, VIRTIO_BLK_T_FLUSH, 0);
        let (_, status) = run(&mut b, &fx.mem, &std_chain(0, 512));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        let mut first = [0u8; 4];
        File::open(&fx.path)
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        assert_eq!(first, [0, 1, 2, 3]);
    }

    #[test]
    fn malformed_chains_are_discarded() {
        let fx = fixture(4);
        let mut b = backend(&fx, false);
        let w = VRING_DESC_F_WRITE;
        let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
            ("no status", vec![desc(HDR, 16, 0), desc(DATA, 512, 0)]),
            ("header only", vec![desc(HDR, 16, 0)]),
            (
                "short header",
                vec![desc(HDR, 8, 0), desc(DATA, 512, w), desc(STATUS, 1, w)],
            ),
            (
                "writable header",
                vec![desc(HDR, 16, w), desc(DATA, 512, w), desc(STATUS, 1, w)],
            ),
            (
                "read-only status",
                vec![desc(HDR, 16, 0), desc(DATA, 512, w), desc(STATUS, 1, 0)],
            ),
            (
                "empty status",
                vec![desc(HDR, 16, 0), desc(DATA, 512, w), desc(STATUS, 0, w)],
            ),
            (
                "readable after writable",
                vec![
                    desc(HDR, 16, 0),
                    desc(DATA, 512, w),
                    desc(DATA + 512, 512, 0),
                    desc(STATUS, 1, w),
                ],
            ),
            (
                "data outside memory",
                vec![
                    desc(HDR, 16, 0),
                    desc(MEM_SIZE as u64 - 256, 512, w),
                    desc(STATUS, 1, w),
                ],
            ),
            (
                "header outside memory",
                vec![
                    desc(u64::MAX - 8, 16, 0),
                    desc(DATA, 512, w),
                    desc(STATUS, 1, w),
                ],
            ),
        ];
        for (name, chain) in cases {
            header(&fx.mem, VIRTIO_BLK_T_IN, 0);
            let (len, status) = run(&mut b, &fx.mem, &chain);
            assert_eq!(len, 0, "{name}: used length");
            assert_eq!(status, 0xff, "{name}: status must be untouched");
        }
    }

    #[test]
    fn looping_chain_is_bounded() {
        let fx = fixture(4);
        let mut b = backend(&fx, false);
        let vq = MockSplitQueue::new(&fx.mem, 4);
        // Descriptors 0 -> 1 -> 0 -> ...: longer than the queue.
        let f = VRING_DESC_F_NEXT as u16;
        vq.desc_table()
            .store(0, RawDescriptor::from(Descriptor::new(HDR, 16, f, 1)))
            .unwrap();
        vq.desc_table()
            .store(1, RawDescriptor::from(Descriptor::new(DATA, 16, f, 0)))
            .unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        header(&fx.mem, VIRTIO_BLK_T_IN, 0);
        assert!(b.process(&fx.mem, &mut q));
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }

    #[test]
    fn config_space_and_features() {
        let fx = fixture(8);
        let blk = Block::new(BlockConfig {
            path: Some(fx.path.clone()),
            read_only: false,
            serial: None,
        })
        .unwrap();
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let mut past = [0xffu8; 4];
        blk.read_config(0x200, &mut past);
        assert_eq!(past, [0; 4]);
        let f = blk.avail_features();
        assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(f & VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    }

    #[test]
    fn missing_image_names_path() {
        let err = Block::new(BlockConfig {
            path: Some("/nonexistent/husk.img".into()),
            read_only: true,
            serial: None,
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/husk.img"), "{err}");
    }
}
