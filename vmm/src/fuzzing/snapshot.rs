//! The snapshot harness: what a restore reads from a snapshot folder, which whoever can
//! write the template store controls, and whose device part the guest shaped (queue
//! addresses and positions, status, features are the driver's values, saved as they were).
//!
//! `form: u8` (modulo 4) picks one of:
//! - 0, the state file: the rest is written as the file and read back through
//!   [`file::read`] (header, version, length, checksum);
//! - 1, the state itself: the rest is the file's JSON payload, parsed as a
//!   [`MachineState`]; what parses goes where a restore sends it (the UART's registers, the
//!   memory layout against a small memory file, each transport onto a device);
//! - 2, the memory layout: `pages: u8` (the memory file's size, at most
//!   [`MEMORY_FILE_PAGES`]), then `flags: u8` (bit 0 keeps addresses, lengths and offsets
//!   small, in pages) and `n: u8` (at most 8) regions of `guest_addr: u64, len: u64,
//!   file_offset: u64`, mapped over the memory file;
//! - 3, one transport: `device: u8` (as in [`super::mmio`]) and a [`TransportState`]
//!   decoded field by field ([`read_transport`]), restored onto that device and started on
//!   its saved queues; then register accesses and guest memory as in [`super::mmio`], and a
//!   final reset, which must stop the device's worker.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress};

use super::{
    Input, MEM_SIZE, eventfd, guest_memory, interrupt, mmio_device, read_ops, run_accesses,
};
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::{QueueState, TransportState};
use crate::devices::virtio::{GuestMemory, VirtioDevice};
use crate::persist::memory::{self, MemoryRegionState};
use crate::persist::vm_state::VmState;
use crate::persist::{FORMAT_VERSION, MachineState, file};

/// Pages of the memory file the layout forms map.
pub const MEMORY_FILE_PAGES: u64 = 16;
const PAGE: u64 = memory::PAGE as u64;
/// Regions a layout may list.
const MAX_REGIONS: usize = 8;

/// Runs one input (see the module documentation).
pub fn snapshot(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 4 {
        0 => {
            let path = scratch_file("state", input.bytes(usize::MAX));
            let _ = file::read(&path, FORMAT_VERSION);
        }
        1 => state_payload(input.bytes(usize::MAX)),
        2 => {
            let pages = u64::from(input.u8()) % (MEMORY_FILE_PAGES + 1);
            let layout = read_layout(&mut input);
            let _ = memory::map(&memory_file(pages), &layout);
        }
        _ => {
            let (dev, backing) = mmio_device(input.u8());
            let state = read_transport(&mut input, dev.as_ref());
            let ops = read_ops(&mut input);
            let mem = guest_memory();
            let _ = mem.write_slice(input.bytes(MEM_SIZE), GuestAddress(0));
            run_restored(mem, dev, &state, ops);
            drop(backing);
        }
    }
}

/// A parsed state goes where a restore sends each of its parts.
fn state_payload(payload: &[u8]) {
    let Ok(state) = serde_json::from_slice::<MachineState>(payload) else {
        return;
    };
    let _ = SerialDevice::from_state(&state.serial, eventfd(), Box::new(std::io::sink()));
    if state.memory.len() <= MAX_REGIONS {
        // A file of the size the layout claims (when small), so the mapping is reached.
        let claimed = state
            .memory
            .iter()
            .fold(0u64, |n, r| n.saturating_add(r.len))
            / PAGE;
        let _ = memory::map(&memory_file(claimed.min(MEMORY_FILE_PAGES)), &state.memory);
    }
    for (i, saved) in state.devices.iter().take(4).enumerate() {
        let (dev, backing) = mmio_device(i as u8);
        run_restored(guest_memory(), dev, saved, Vec::new());
        drop(backing);
    }
}

/// Restores `dev` from `state` as a restore does (refusals are fine), starts it on its
/// saved queues and runs `ops` and the final reset on it.
fn run_restored(
    mem: GuestMemory,
    dev: Box<dyn VirtioDevice>,
    state: &TransportState,
    ops: Vec<super::Access>,
) {
    if let Ok(mut t) = MmioTransport::restore(mem, dev, interrupt(), None, state) {
        let _ = t.start_restored();
        run_accesses(&mut t, ops);
    }
}

/// `flags: u8`, `n: u8`, then `n` (at most [`MAX_REGIONS`]) regions.
fn read_layout(input: &mut Input<'_>) -> Vec<MemoryRegionState> {
    let small = input.u8() & 1 != 0;
    let n = usize::from(input.u8()) % (MAX_REGIONS + 1);
    let value = |input: &mut Input<'_>| {
        let v = input.u64();
        if small {
            (v % (2 * MEMORY_FILE_PAGES + 1)) * PAGE
        } else {
            v
        }
    };
    (0..n)
        .map(|_| MemoryRegionState {
            guest_addr: value(input),
            len: value(input),
            file_offset: value(input),
        })
        .collect()
}

/// A transport's saved registers. `flags: u8` first; each set bit takes a field group from
/// `dev` so that most inputs pass the restore's first checks and reach the queues: bit 0
/// the device type, bit 1 the identity, bit 2 the queue count and maximum sizes, bit 3
/// features within those offered, bit 4 ring addresses inside guest memory, bit 5 the
/// configuration space. Then `device_type: u32, device_features_sel: u32,
/// driver_features_sel: u32, acked_features: u64, queue_sel: u32, status: u32,
/// config_generation: u32, activated: u8, interrupt_status: u32, needs_reset: u8,
/// nqueues: u8` (modulo 5), per queue `max_size: u16, size: u16, ready: u8, desc: u64,
/// driver: u64, device: u64, next_avail: u16, next_used: u16`, and `config_len: u8` and
/// that many bytes.
fn read_transport(input: &mut Input<'_>, dev: &dyn VirtioDevice) -> TransportState {
    let flags = input.u8();
    let has = |bit: u8| flags & (1 << bit) != 0;
    let device_type = input.u32();
    let device_features_sel = input.u32();
    let driver_features_sel = input.u32();
    let mut acked_features = input.u64();
    if has(3) {
        acked_features &= dev.avail_features();
    }
    let queue_sel = input.u32();
    let status = input.u32();
    let config_generation = input.u32();
    let activated = input.u8() & 1 != 0;
    let interrupt_status = input.u32();
    let needs_reset = input.u8() & 1 != 0;
    let max_sizes = dev.queue_max_sizes().to_vec();
    let nqueues = if has(2) {
        max_sizes.len()
    } else {
        usize::from(input.u8() % 5)
    };
    let addr = |input: &mut Input<'_>| {
        let v = input.u64();
        if has(4) { v % MEM_SIZE as u64 } else { v }
    };
    let queues = (0..nqueues)
        .map(|i| {
            let max_size = input.u16();
            QueueState {
                max_size: if has(2) { max_sizes[i] } else { max_size },
                size: input.u16(),
                ready: input.u8() & 1 != 0,
                desc: addr(input),
                driver: addr(input),
                device: addr(input),
                next_avail: input.u16(),
                next_used: input.u16(),
            }
        })
        .collect();
    let config_len = usize::from(input.u8());
    let config = input.bytes(config_len).to_vec();
    TransportState {
        device_type: if has(0) {
            dev.device_type()
        } else {
            device_type
        },
        device_features_sel,
        driver_features_sel,
        acked_features,
        queue_sel,
        status,
        config_generation,
        activated,
        interrupt_status,
        needs_reset,
        queues,
        identity: if has(1) { dev.identity() } else { None },
        config: if has(5) { dev.config_space() } else { config },
    }
}

/// The harness's scratch folder (one per process).
fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-fuzz-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

/// `bytes` as the file `name` of this thread in the scratch folder.
fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(format!("{name}-{:?}", std::thread::current().id()));
    let mut f = std::fs::File::create(&path).expect("scratch file");
    f.write_all(bytes).expect("writing the scratch file");
    path
}

/// This thread's memory file, `pages` pages long.
fn memory_file(pages: u64) -> PathBuf {
    let path = scratch_file("memory", &[]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("memory file");
    f.set_len(pages * PAGE).expect("sizing the memory file");
    path
}

/// Seeds for the snapshot target: a state file, a state payload, layouts and transports.
pub(super) fn seeds(out: &mut super::Seeds) {
    use super::Encoder;
    // A complete state as a snapshot writes it: no vCPUs, one page-aligned RAM region and
    // the saved transport of an rng device.
    let mut rng = MmioTransport::new(
        guest_memory(),
        Box::new(crate::devices::virtio::rng::Rng::new()),
        interrupt(),
    );
    let state = MachineState {
        husk_version: env!("CARGO_PKG_VERSION").into(),
        // Not BUILD_ID: the committed seed must not change with every build.
        vmm_build: "seed".into(),
        cpu_template: "pvm".into(),
        memory_mib: 128,
        vcpus: Vec::new(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: Default::default(),
        devices: rng.snapshot().into_iter().collect(),
        memory: vec![MemoryRegionState {
            guest_addr: 0,
            len: 2 * PAGE,
            file_offset: 0,
        }],
    };
    let payload = serde_json::to_vec(&state).expect("seed JSON");
    let mut framed = b"HUSKSNAP".to_vec();
    framed.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    framed.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    framed.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    framed.extend_from_slice(&payload);
    out.push((
        "snapshot",
        "state-file",
        Encoder::new().u8(0).raw(&framed).finish(),
    ));
    out.push((
        "snapshot",
        "state-payload",
        Encoder::new().u8(1).raw(&payload).finish(),
    ));
    // Two adjacent regions in pages, and one that overlaps them.
    let mut layout = Encoder::new();
    layout.u8(2).u8(16).u8(1).u8(3);
    for (addr, len, off) in [(0u64, 4u64, 0u64), (4, 4, 4), (2, 8, 8)] {
        layout.u64(addr).u64(len).u64(off);
    }
    out.push(("snapshot", "layout", layout.finish()));
    // An active rng transport with a sane queue, then a queue notify and a status read.
    let mut t = Encoder::new();
    t.u8(3).u8(0).u8(0b11_1111);
    t.u32(0)
        .u32(0)
        .u32(0)
        .u64(1 << 32)
        .u32(0)
        .u32(0xf)
        .u32(0)
        .u8(1)
        .u32(0)
        .u8(0);
    t.u16(0)
        .u16(16)
        .u8(1)
        .u64(0x1000)
        .u64(0x1400)
        .u64(0x1800)
        .u16(0)
        .u16(0);
    t.u8(0);
    t.u8(2)
        .raw(&[5, 0x50, 0, 0, 0, 0, 0])
        .raw(&[4, 0x70, 0, 0, 0, 0, 0]);
    out.push(("snapshot", "rng-transport", t.finish()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        seeds(&mut out);
        out.into_iter()
            .find(|(_, n, _)| *n == name)
            .map(|(_, _, data)| data)
            .expect("seed exists")
    }

    #[test]
    fn the_seeds_reach_past_the_first_checks() {
        // The state file's framing and payload parse.
        let framed = seed("state-file");
        let path = scratch_file("test-state", &framed[1..]);
        let payload = file::read(&path, FORMAT_VERSION).expect("framed state reads");
        assert_eq!(payload, &seed("state-payload")[1..]);
        let state: MachineState = serde_json::from_slice(&payload).expect("state parses");
        memory::map(&memory_file(2), &state.memory).expect("seed layout maps");

        // The transport decodes to a state the rng device accepts and runs.
        let data = seed("rng-transport");
        let mut input = Input::new(&data[1..]);
        let (dev, _backing) = mmio_device(input.u8());
        let transport = read_transport(&mut input, dev.as_ref());
        let mut t = MmioTransport::restore(guest_memory(), dev, interrupt(), None, &transport)
            .expect("seed transport restores");
        t.start_restored().expect("restored rng starts");
        assert!(t.is_activated());
        run_accesses(&mut t, read_ops(&mut input));
    }
}
