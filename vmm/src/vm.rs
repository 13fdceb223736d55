//! Building and running a VM: KVM objects, guest memory, the kernel and its boot
//! structures, the devices, the vCPU threads, and waiting for a reason to stop.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_CAP_HALT_POLL, kvm_enable_cap, kvm_userspace_memory_region};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::api::{self, ApiServer};
use crate::arch::x86_64::boot_params::{BootParamsSpec, build_boot_params};
use crate::arch::x86_64::layout;
use crate::arch::x86_64::{mptable, paging, regs};
use crate::config::{Console, VmConfig};
use crate::cpu_template::CpuTemplate;
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleWriter, SerialDevice};
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::persist::TransportRestoreError;
use crate::devices::virtio::{Interrupt, VirtioDevice, block, fs, net, rng, vsock};
use crate::host;
use crate::loader::{self, CmdlineSpec, LoaderError};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::metrics::Metrics;
use crate::persist::vm_state::VmState;
use crate::persist::{self, MachineState, SnapshotError};
use crate::seccomp::{Filters, SeccompError, SeccompMode, Spawner};
use crate::stop::{StopReason, StopSignal};
use crate::vcpu::pause::PauseControl;
use crate::vcpu::persist::VcpuStateError;
use crate::vcpu::{self, VcpuContext, kick};

const KVM_DEVICE: &str = "/dev/kvm";

/// Error building or starting the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    KvmOpen(#[from] host::KvmOpenError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("writing {what} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("writing the zero page: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error("placing a device: {0}")]
    Bus(#[from] BusError),
    #[error("console {path}: {source}")]
    Console {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics file {path}: {source}")]
    Metrics {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vsock device on {path}: {source}")]
    Vsock {
        path: String,
        #[source]
        source: vsock::VsockError,
    },
    #[error("block device {path}: {source}")]
    Block {
        path: String,
        #[source]
        source: block::BlockError,
    },
    #[error("virtio-fs device tag {tag}: {source}")]
    Fs {
        tag: String,
        #[source]
        source: fs::FsError,
    },
    #[error("virtio-net device: {source}")]
    Net {
        tap: String,
        #[source]
        source: net::TapError,
    },
    #[error("too many virtio devices ({0}); at most {max}", max = layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] api::ApiError),
    #[error("restoring: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("restoring the VM's interrupt controllers and clock: {0}")]
    RestoreVm(#[source] persist::vm_state::VmStateError),
    #[error("restoring: {0}")]
    RestoreVcpu(#[source] VcpuStateError),
    #[error("restoring virtio slot {slot}: {source}")]
    RestoreDevice {
        slot: usize,
        #[source]
        source: TransportRestoreError,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Creates the VM with the in-kernel interrupt controllers and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        // Port 0x61 reads come from KVM instead of exiting to us.
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}

/// Stops KVM from busy-polling for a while when a vCPU halts. Polling trades host CPU for
/// wake-up latency; on a small, shared nested host an idle vCPU polling steals the CPU the
/// busy vCPU (and everything else) needs.
pub fn disable_halt_polling(kvm: &Kvm, vm: &VmFd) {
    if kvm.check_extension_raw(KVM_CAP_HALT_POLL.into()) <= 0 {
        return;
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_HALT_POLL,
        ..Default::default()
    };
    if let Err(e) = vm.enable_cap(&cap) {
        tracing::debug!("KVM_CAP_HALT_POLL: {e}");
    }
}

/// Tells KVM about every region of guest RAM.
pub fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|source| VmError::GuestWrite {
                what: "memory region address",
                source,
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`, which the
        // caller keeps alive (in every vCPU context) for as long as the VM runs.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Creates and configures `count` vCPUs entering at `entry` with page tables at `cr3`.
pub fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    template: CpuTemplate,
    count: u8,
    entry: u64,
    cr3: u64,
) -> Result<Vec<VcpuFd>, VmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(count.into());
    for id in 0..count {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = supported.clone();
        template.apply(cpuid.as_mut_slice(), id, count);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        regs::configure_vcpu(&vcpu, entry, cr3)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Writes the boot GDT and the identity page tables; returns CR3.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<u64, VmError> {
    regs::write_gdt(mem).map_err(|source| VmError::GuestWrite {
        what: "the boot GDT",
        source,
    })?;
    paging::write_identity_tables(mem).map_err(|source| VmError::GuestWrite {
        what: "the boot page tables",
        source,
    })
}

/// What every vCPU thread shares with the VMM.
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: StopSignal,
    pub metrics: Arc<Metrics>,
    pub pause: Arc<PauseControl>,
    pub msr_list: Arc<Vec<u32>>,
    /// Under `--seccomp enforce`: the filters vCPU threads confine themselves with, and
    /// the spawner that starts their devices' workers.
    pub seccomp: Option<(Arc<Filters>, Spawner)>,
}

/// Starts one thread per vCPU; returns their thread ids, for kicking them.
pub fn spawn_vcpus(
    vcpus: Vec<VcpuFd>,
    mem: &GuestMemory,
    shared: &VcpuShared,
) -> Result<Vec<JoinHandle<()>>, VmError> {
    kick::install_handler().map_err(|source| VmError::Io {
        what: "installing the vCPU kick handler",
        source,
    })?;
    let mut threads = Vec::with_capacity(vcpus.len());
    for (i, vcpu) in vcpus.into_iter().enumerate() {
        let ctx = VcpuContext {
            index: i as u8,
            pio: Arc::clone(&shared.pio),
            mmio: Arc::clone(&shared.mmio),
            mem: mem.clone(),
            stop: shared.stop.clone(),
            metrics: Arc::clone(&shared.metrics),
            pause: Arc::clone(&shared.pause),
            msr_list: Arc::clone(&shared.msr_list),
            seccomp: shared.seccomp.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{i}"))
            .spawn(move || vcpu::run(vcpu, ctx))
            .map_err(|source| VmError::Io {
                what: "spawning a vCPU thread",
                source,
            })?;
        // Joined only after a snapshot (they are parked then); otherwise the process
        // exits with them inside KVM_RUN.
        threads.push(handle);
    }
    Ok(threads)
}

/// How long the vCPU threads get to end once the VM has stopped.
const VCPU_END_TIMEOUT: Duration = Duration::from_secs(1);

/// Kicks every vCPU thread out of the guest after the VM's stop was requested (each then
/// ends, see `vcpu::run`) and waits up to `timeout` for them; false if one is still running.
fn end_vcpus(handles: &[JoinHandle<()>], timeout: Duration) -> bool {
    for h in handles.iter().filter(|h| !h.is_finished()) {
        // The thread is not joined, so its pthread_t is still valid.
        if let Err(e) = kick::kick(h.as_pthread_t()) {
            tracing::debug!("kicking a vCPU thread at the VM's stop: {e}");
        }
    }
    let deadline = Instant::now() + timeout;
    while handles.iter().any(|h| !h.is_finished()) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Blocks SIGTERM and SIGINT in this thread (and every thread it starts later), and
/// returns a signalfd that receives them.
fn block_stop_signals() -> std::io::Result<File> {
    // SAFETY: plain libc calls on a local, zero-initialised sigset; results are checked.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(File::from_raw_fd(fd))
    }
}

/// Waits until a vCPU or device asks to stop, or a stop signal arrives.
fn wait_for_stop(
    stop: &StopSignal,
    sigfd: &File,
    api: Option<&ApiServer>,
    machine: &Machine,
) -> StopReason {
    loop {
        if let Some(r) = stop.reason() {
            return r;
        }
        let mut fds = [
            libc::pollfd {
                fd: stop.eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: api.map_or(-1, ApiServer::raw_fd),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of three pollfd for the duration of the call; poll
        // ignores the entry whose fd is negative.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
        if rc < 0 {
            continue; // EINTR
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // SAFETY: reading one signalfd_siginfo into a zeroed struct of that size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let n = unsafe {
                libc::read(
                    sigfd.as_raw_fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n == std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                stop.request(StopReason::Signal(info.ssi_signo as i32));
            }
        }
        if fds[2].revents & libc::POLLIN != 0
            && let Some((client, request)) = api.and_then(ApiServer::accept)
        {
            match request {
                Err(e) => api::reply(client, Err(e)),
                Ok(api::Request::Snapshot { dir }) => {
                    let result = machine.snapshot(&dir);
                    let taken = result.is_ok();
                    match &result {
                        Ok(figures) => {
                            tracing::info!(dir = %dir.display(), %figures, "snapshot taken")
                        }
                        Err(e) => tracing::warn!(dir = %dir.display(), "snapshot failed: {e}"),
                    }
                    let paused = machine.pause.requested();
                    api::reply(client, result);
                    if taken {
                        stop.request(StopReason::Snapshotted(dir.display().to_string()));
                    } else if paused {
                        // Devices may be half stopped: this VM cannot go on.
                        stop.request(StopReason::VmmError(
                            "a snapshot failed after the VM was paused".into(),
                        ));
                    }
                }
            }
        }
    }
}

fn console_writer(console: &Console) -> Result<ConsoleWriter, VmError> {
    Ok(match console {
        Console::Off => Box::new(std::io::sink()),
        // A duplicate of fd 1, unbuffered: the guest's output must not sit in a buffer
        // when the process exits.
        Console::Stdout => Box::new(File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| VmError::Console {
                    path: "stdout".into(),
                    source,
                })?,
        )),
        Console::File(p) => Box::new(File::create(p).map_err(|source| VmError::Console {
            path: p.display().to_string(),
            source,
        })?),
    })
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd, VmError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| VmError::Io {
        what: "creating an irqfd",
        source,
    })?;
    vm.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
    Ok(evt)
}

/// A virtio device of the configuration, before it gets its slot.
struct PlannedDevice {
    device: Box<dyn VirtioDevice>,
    /// Its queue notifications go to KVM ioeventfds rather than through the VMM: for
    /// vhost-user devices, whose backend waits on those eventfds itself.
    ioeventfd: bool,
}

/// The virtio devices of a configuration, in slot order: vsock, block devices, rng, fs,
/// net (appended after the others so adding a share or a NIC moves no other device).
fn virtio_devices(config: &VmConfig, stop: &StopSignal) -> Result<Vec<PlannedDevice>, VmError> {
    let mut devs: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if let Some(v) = &config.vsock {
        let dev = vsock::Vsock::new(v.cid, &v.uds).map_err(|source| VmError::Vsock {
            path: v.uds.display().to_string(),
            source,
        })?;
        devs.push(Box::new(dev));
    }
    for b in &config.blocks {
        let dev = block::Block::new(block::BlockConfig {
            path: b.path.clone(),
            read_only: b.read_only,
            serial: b.serial.clone(),
        })
        .map_err(|source| VmError::Block {
            path: b
                .path
                .as_ref()
                .map_or_else(|| "(empty slot)".to_string(), |p| p.display().to_string()),
            source,
        })?;
        devs.push(Box::new(dev));
    }
    if config.rng {
        devs.push(Box::new(rng::Rng::new()));
    }
    let mut planned: Vec<PlannedDevice> = devs
        .into_iter()
        .map(|device| PlannedDevice {
            device,
            ioeventfd: false,
        })
        .collect();
    let total = planned.len() + config.fs.len() + config.nets.len();
    if total > layout::MAX_VIRTIO_DEVICES {
        return Err(VmError::TooManyDevices(total));
    }
    for f in &config.fs {
        let mut dev = fs::Fs::new(&fs::FsConfig {
            socket: f.socket.clone(),
            tag: f.tag.clone(),
        })
        .map_err(|source| VmError::Fs {
            tag: f.tag.clone(),
            source,
        })?;
        dev.stop_vm_when_backend_exits(stop.clone());
        planned.push(PlannedDevice {
            device: Box::new(dev),
            ioeventfd: true,
        });
    }
    for n in &config.nets {
        let dev = net::Net::new(&net::NetConfig {
            tap: n.tap.clone(),
            mac: n.mac,
            netns: n.netns.clone(),
        })
        .map_err(|source| VmError::Net {
            tap: n.tap.clone(),
            source,
        })?;
        tracing::info!(tap = %n.tap, mac = %n.mac, netns = ?n.netns, "virtio-net device");
        planned.push(PlannedDevice {
            device: Box::new(dev),
            ioeventfd: false,
        });
    }
    Ok(planned)
}

/// One eventfd per queue of a device at `addr`, registered with KVM for writes of the
/// queue's index to QueueNotify.
fn notify_ioeventfds(vm: &VmFd, addr: u64, queues: usize) -> Result<Vec<EventFd>, VmError> {
    (0..queues)
        .map(|i| {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| VmError::Io {
                what: "creating a queue notify eventfd",
                source,
            })?;
            vm.register_ioevent(
                &evt,
                &IoEventAddress::Mmio(addr + QUEUE_NOTIFY_OFFSET),
                i as u32,
            )
            .map_err(kvm_err("KVM_IOEVENTFD"))?;
            Ok(evt)
        })
        .collect()
}

/// What taking a snapshot of the running VM needs.
struct Machine {
    vm: VmFd,
    mem: GuestMemory,
    pause: Arc<PauseControl>,
    threads: Vec<libc::pthread_t>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    cpu_template: String,
    memory_mib: u64,
}

/// How long the vCPUs get to reach a pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Machine {
    /// Pauses the VM and writes its snapshot into `dir`; returns the figures of the run.
    fn snapshot(&self, dir: &Path) -> Result<serde_json::Value, String> {
        let t0 = Instant::now();
        let (state_path, memory_path) = persist::paths(dir);
        if state_path.exists() {
            return Err(format!("{} already holds a snapshot", dir.display()));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let vcpus = self
            .pause
            .pause_all(&self.threads, PAUSE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let paused = t0.elapsed();
        let vm = VmState::save(&self.vm).map_err(|e| e.to_string())?;
        let serial = self
            .serial
            .lock()
            .map_err(|_| "the serial device's lock is poisoned".to_string())?
            .state();
        let mut devices = Vec::with_capacity(self.transports.len());
        for (slot, t) in self.transports.iter().enumerate() {
            let mut t = t
                .lock()
                .map_err(|_| format!("virtio slot {slot}: lock poisoned"))?;
            devices.push(
                t.snapshot()
                    .map_err(|e| format!("virtio slot {slot}: {e}"))?,
            );
        }
        let (memory, memory_written) =
            persist::memory::save(&self.mem, &memory_path).map_err(|e| e.to_string())?;
        let state = MachineState {
            husk_version: env!("CARGO_PKG_VERSION").to_string(),
            vmm_build: crate::BUILD_ID.to_string(),
            cpu_template: self.cpu_template.clone(),
            memory_mib: self.memory_mib,
            vcpus,
            vm,
            serial,
            devices,
            memory,
        };
        let state_bytes = state.write(dir).map_err(|e| e.to_string())?;
        Ok(serde_json::json!({
            "pause_us": paused.as_micros() as u64,
            "total_us": t0.elapsed().as_micros() as u64,
            "memory_bytes": self.mem.iter().map(|r| r.len()).sum::<u64>(),
            "memory_written_bytes": memory_written,
            "state_bytes": state_bytes,
        }))
    }
}

/// Reads the snapshot of `dir` and checks it against the configuration and this host.
fn load_snapshot(
    dir: &Path,
    config: &VmConfig,
    template: CpuTemplate,
    device_count: usize,
) -> Result<MachineState, VmError> {
    let state = MachineState::read(dir)?;
    let mismatch = |m: String| VmError::Snapshot(SnapshotError::Mismatch(m));
    if state.cpu_template != template.name() {
        return Err(mismatch(format!(
            "it was taken with the {} CPU template, this host resolves {}",
            state.cpu_template,
            template.name()
        )));
    }
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(mismatch(format!(
            "it has {} vCPUs, the configuration {}",
            state.vcpus.len(),
            config.vcpus
        )));
    }
    if state.memory_mib != config.memory_mib {
        return Err(mismatch(format!(
            "it has {} MiB of memory, the configuration {}",
            state.memory_mib, config.memory_mib
        )));
    }
    if state.devices.len() != device_count {
        return Err(mismatch(format!(
            "it has {} virtio devices, the configuration {device_count}",
            state.devices.len()
        )));
    }
    Ok(state)
}

/// Builds the VM described by `config` (booting its kernel, or restoring the snapshot it
/// names), runs it, and returns why it stopped.
pub fn run(config: &VmConfig, start: Instant) -> Result<StopReason, VmError> {
    run_with(config, start, || Ok(()))
}

/// [`run`], calling `before_threads` once every file, socket and KVM handle the VM needs is
/// open and before the VM's first thread starts. The jailer gives up its privileges there
/// (uid, capabilities): after it nothing in the VMM opens a host path by itself, except the
/// snapshot files an API request names and the host sockets guest vsock connections reach.
pub fn run_with(
    config: &VmConfig,
    start: Instant,
    before_threads: impl FnOnce() -> std::io::Result<()>,
) -> Result<StopReason, VmError> {
    // Before any thread exists, so that all of them inherit the mask.
    let sigfd = block_stop_signals().map_err(|source| VmError::Io {
        what: "setting up SIGTERM/SIGINT handling",
        source,
    })?;
    let metrics = Arc::new(Metrics::new(start, config.metrics_file.as_deref()).map_err(
        |source| {
            VmError::Metrics {
                path: config
                    .metrics_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                source,
            }
        },
    )?);

    let host = host::probe();
    let template = config.cpu_template.resolve(host);
    let mem_mib = template.memory_mib(config.memory_mib);
    tracing::info!(?host, template = template.name(), mem_mib, "configuring VM");
    if mem_mib != config.memory_mib {
        tracing::info!(
            "guest memory rounded up from {} to {mem_mib} MiB by the {} template",
            config.memory_mib,
            template.name()
        );
    }
    let mem_size = mem_mib << 20;

    // Devices that check user input (socket paths, images) come first, so that a bad
    // path is reported before any heavier setup.
    let kernel_image = match &config.restore {
        Some(_) => None,
        None => Some(loader::KernelImage::open(&config.kernel)?),
    };
    let initramfs = match (&config.restore, &config.initramfs) {
        (None, Some(p)) => Some(loader::InitramfsFile::open(p)?),
        _ => None,
    };
    let stop = StopSignal::new().map_err(|source| VmError::Io {
        what: "creating the stop eventfd",
        source,
    })?;
    let devices = virtio_devices(config, &stop)?;
    let snapshot = match &config.restore {
        Some(dir) => Some(load_snapshot(dir, config, template, devices.len())?),
        None => None,
    };
    let api = match &config.api_socket {
        Some(p) => Some(ApiServer::bind(p)?),
        None => None,
    };
    let kvm = host::open_kvm(KVM_DEVICE)?;
    let vm = create_vm(&kvm)?;
    if host == host::HostKind::NestedPvm {
        disable_halt_polling(&kvm, &vm);
    }
    // vhost-user backends map guest RAM themselves, which private memory does not allow. The
    // memfd costs boot time on hosts without shmem THP (docs/architecture.md), so only then.
    let backing = if config.fs.is_empty() {
        memory::RamBacking::Anonymous
    } else {
        tracing::info!("guest RAM is a shared memfd: a vhost-user-fs backend maps it");
        memory::RamBacking::SharedMemfd
    };
    let mem = match (&snapshot, &config.restore) {
        (Some(state), Some(dir)) => {
            let file = persist::paths(dir).1;
            let mapped = match backing {
                memory::RamBacking::Anonymous => persist::memory::map(&file, &state.memory),
                memory::RamBacking::SharedMemfd => {
                    persist::memory::copy_to_shared_memfd(&file, &state.memory)
                }
            };
            mapped.map_err(|e| VmError::Snapshot(SnapshotError::Mismatch(e.to_string())))?
        }
        _ => memory::create_guest_memory(mem_size, backing)?,
    };
    register_memory(&vm, &mem)?;
    if let Some(state) = &snapshot {
        // Before any device can raise an interrupt into the irqchip.
        state.vm.restore(&vm).map_err(VmError::RestoreVm)?;
    }

    // Where guest RAM sits in the VMM's address space, so that tools measuring the VMM's own
    // memory can leave it out (anonymous mappings are unnamed on most hosts).
    metrics.write(serde_json::json!({
        "event": "guest_ram",
        "backing": match (&snapshot, backing) {
            (Some(_), memory::RamBacking::Anonymous) => "snapshot_private",
            (Some(_), memory::RamBacking::SharedMemfd) => "snapshot_copied_to_shared_memfd",
            (None, memory::RamBacking::Anonymous) => "anonymous",
            (None, memory::RamBacking::SharedMemfd) => "shared_memfd",
        },
        "host_ranges": mem
            .iter()
            .map(|r| [r.as_ptr() as u64, r.len()])
            .collect::<Vec<_>>(),
    }));
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let serial_irq = irqfd(&vm, layout::SERIAL_IRQ)?;
    let serial_out = console_writer(&config.console)?;
    let serial = match &snapshot {
        Some(state) => SerialDevice::from_state(&state.serial, serial_irq, serial_out)
            .map_err(|e| VmError::Snapshot(SnapshotError::Mismatch(e)))?,
        None => SerialDevice::new(serial_irq, serial_out),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(
        Arc::clone(&serial) as Arc<Mutex<dyn BusDevice>>,
        layout::SERIAL_PORT,
        layout::SERIAL_PORT_LEN,
    )?;
    let reset_stop = stop.clone();
    let i8042 = I8042::new(Box::new(move || {
        reset_stop.request(StopReason::GuestShutdown("guest reset via i8042".into()))
    }));
    pio.insert(
        Arc::new(Mutex::new(i8042)),
        layout::I8042_PORT,
        layout::I8042_PORT_LEN,
    )?;
    mmio.insert(
        Arc::new(Mutex::new(BootTimer::new(Arc::clone(&metrics)))),
        layout::BOOT_TIMER_ADDR,
        layout::BOOT_TIMER_SIZE,
    )?;
    // Single-threaded still: a uid change reaches every thread, and later threads would
    // run under a seccomp filter that forbids it.
    before_threads().map_err(|source| VmError::Io {
        what: "confining the VMM",
        source,
    })?;
    // Before any device worker starts (a restore starts them on this thread).
    let (seccomp, _seccomp_context) = match config.seccomp {
        SeccompMode::Enforce => {
            let filters = Filters::new()?;
            let spawner = Spawner::start(Arc::clone(&filters))?;
            let guard = crate::seccomp::enter(Arc::clone(&filters), None);
            (Some((filters, spawner)), Some(guard))
        }
        SeccompMode::Off => {
            tracing::warn!("--seccomp off: vCPU and device threads run without filters");
            (None, None)
        }
    };
    let mut slots = Vec::with_capacity(devices.len());
    let mut transports = Vec::with_capacity(devices.len());
    for (i, planned) in devices.into_iter().enumerate() {
        let (addr, irq) = layout::virtio_slot(i).ok_or(VmError::TooManyDevices(i + 1))?;
        let interrupt = Interrupt::new(irqfd(&vm, irq)?);
        let dev = planned.device;
        let notify = if planned.ioeventfd {
            Some(notify_ioeventfds(&vm, addr, dev.queue_max_sizes().len())?)
        } else {
            None
        };
        let transport = match (&snapshot, notify) {
            (Some(state), notify) => {
                MmioTransport::restore(mem.clone(), dev, interrupt, notify, &state.devices[i])
                    .map_err(|source| VmError::RestoreDevice { slot: i, source })?
            }
            (None, Some(notify)) => {
                MmioTransport::with_notify_eventfds(mem.clone(), dev, interrupt, notify)
            }
            (None, None) => MmioTransport::new(mem.clone(), dev, interrupt),
        };
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(
            Arc::clone(&transport) as Arc<Mutex<dyn BusDevice>>,
            addr,
            layout::VIRTIO_MMIO_SIZE,
        )?;
        transports.push(transport);
        slots.push((addr, irq));
    }

    let msr_list = kvm
        .get_msr_index_list()
        .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    let vcpus = match (&snapshot, kernel_image) {
        (Some(state), _) => {
            let mut vcpus = Vec::with_capacity(state.vcpus.len());
            for (id, saved) in state.vcpus.iter().enumerate() {
                let vcpu = vm
                    .create_vcpu(id as u64)
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?;
                saved.restore(&vcpu).map_err(VmError::RestoreVcpu)?;
                vcpus.push(vcpu);
            }
            for (slot, t) in transports.iter().enumerate() {
                t.lock()
                    .map_err(|_| VmError::Io {
                        what: "starting a restored device",
                        source: std::io::Error::other("lock poisoned"),
                    })?
                    .start_restored()
                    .map_err(|source| VmError::RestoreDevice { slot, source })?;
            }
            metrics.write(serde_json::json!({
                "event": "restored",
                "wall_us": metrics.wall_us(),
            }));
            vcpus
        }
        (None, Some(kernel_image)) => boot_setup(
            config,
            template,
            &kvm,
            &vm,
            &mem,
            mem_size,
            (kernel_image, initramfs),
            &slots,
        )?,
        (None, None) => unreachable!("a boot always has a kernel image"),
    };

    let main_filters = seccomp.as_ref().map(|(filters, _)| Arc::clone(filters));
    let pause = Arc::new(PauseControl::new());
    let shared = VcpuShared {
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        stop: stop.clone(),
        metrics: Arc::clone(&metrics),
        pause: Arc::clone(&pause),
        msr_list: Arc::new(msr_list),
        seccomp,
    };
    // --- guest profiler (vmm/src/profile): before the vCPU threads, which attach to it;
    // it writes its files when dropped at the end of this function.
    let _profiler = crate::profile::start(config)?;
    // --- end guest profiler
    let handles = spawn_vcpus(vcpus, &mem, &shared)?;
    let threads = handles.iter().map(|h| h.as_pthread_t()).collect();
    drop(shared);
    let machine = Machine {
        vm,
        mem,
        pause,
        threads,
        serial,
        transports,
        cpu_template: template.name().to_string(),
        memory_mib: config.memory_mib,
    };
    // Every thread that needs more than this one has started: from here on this thread only
    // serves the API and the stop (threads started earlier do not inherit this filter).
    if let Some(filters) = main_filters
        && let Err(e) = filters.confine_current(crate::seccomp::ThreadKind::Main)
    {
        stop.request(StopReason::VmmError(e.to_string()));
    }
    let reason = wait_for_stop(&stop, &sigfd, api.as_ref(), &machine);
    metrics.write(serde_json::json!({
        "event": "exit",
        "reason": reason.label(),
        "wall_us": metrics.wall_us(),
    }));
    if let Some(p) = &config.api_socket {
        let _ = std::fs::remove_file(p);
    }
    if matches!(reason, StopReason::Snapshotted(_)) {
        // Every vCPU is parked and every device stopped: let the vCPU threads see the stop
        // and end, then release the VM, its memory and the devices' host resources (a tap
        // can be opened once only; a shim builds a template and then restores it).
        machine.pause.resume();
        for h in handles {
            let _ = h.join();
        }
        drop(machine);
        return Ok(reason);
    }
    // vCPUs parked by a snapshot that failed wake up to the stop and end as well.
    machine.pause.resume();
    if end_vcpus(&handles, VCPU_END_TIMEOUT) {
        // Release the devices as well: their host sides close, so a client of the guest
        // agent in a process that outlives the VM (the shim) gets end-of-file at once
        // instead of waiting out its RPC deadline on a VM that no longer runs.
        for h in handles {
            let _ = h.join();
        }
        drop(machine);
    } else {
        tracing::warn!("a vCPU thread did not end within {VCPU_END_TIMEOUT:?} of the VM's stop");
        // The VM and its memory go away with the process; keep them alive until then (a
        // vCPU that did not end may still be inside KVM_RUN).
        std::mem::forget(machine);
        std::mem::forget(handles);
    }
    Ok(reason)
}

/// Loads the kernel and initramfs, writes the boot structures and creates the vCPUs at the
/// kernel's entry point.
#[allow(clippy::too_many_arguments)]
fn boot_setup(
    config: &VmConfig,
    template: CpuTemplate,
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemory,
    mem_size: u64,
    (kernel_image, initramfs): (loader::KernelImage, Option<loader::InitramfsFile>),
    slots: &[(u64, u32)],
) -> Result<Vec<VcpuFd>, VmError> {
    let kernel = kernel_image.load(mem)?;
    let initramfs = match initramfs {
        Some(f) => Some(loader::load_initramfs_file(mem, mem_size, &kernel, f)?),
        None => None,
    };
    let cmdline = loader::build_cmdline(&CmdlineSpec {
        console: config.console != Console::Off,
        template_flags: template.cmdline(),
        virtio_devices: slots,
        extra: &config.extra_cmdline,
    })?;
    let cmdline_len = loader::write_cmdline(mem, &cmdline)?;
    tracing::debug!("kernel command line: {:?}", cmdline.as_cstring().ok());
    let params = build_boot_params(&BootParamsSpec {
        mem_size,
        cmdline_addr: layout::CMDLINE_ADDR,
        cmdline_len,
        initramfs,
        setup_header: kernel.setup_header,
    });
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(VmError::BootParams)?;
    let mp = mptable::build(config.vcpus, layout::MPTABLE_ADDR)?;
    mem.write_slice(&mp, GuestAddress(layout::MPTABLE_ADDR))
        .map_err(|source| VmError::GuestWrite {
            what: "the MP table",
            source,
        })?;
    let cr3 = write_boot_tables(mem)?;
    create_vcpus(kvm, vm, template, config.vcpus, kernel.entry, cr3)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real KVM: enters hand-written 64-bit code through the same boot path as a kernel
    /// (GDT, page tables, sregs, CPUID template) and checks the exits the VMM sees.
    fn run_tiny_guest(code: &[u8]) -> Option<StopReason> {
        let kvm = match host::open_kvm(KVM_DEVICE) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("skipping KVM smoke test: {e}");
                return None;
            }
        };
        let vm = create_vm(&kvm).unwrap();
        let mem = memory::create_guest_memory(64 << 20, memory::RamBacking::Anonymous).unwrap();
        register_memory(&vm, &mem).unwrap();
        let entry = layout::HIMEM_START;
        mem.write_slice(code, GuestAddress(entry)).unwrap();
        let cr3 = write_boot_tables(&mem).unwrap();
        let template = crate::cpu_template::TemplateChoice::Auto.resolve(host::probe());
        let vcpus = create_vcpus(&kvm, &vm, template, 1, entry, cr3).unwrap();
        let stop = StopSignal::new().unwrap();
        let metrics = Arc::new(Metrics::new(Instant::now(), None).unwrap());
        let mut pio = Bus::new();
        let s = stop.clone();
        let i8042 = I8042::new(Box::new(move || {
            s.request(StopReason::GuestShutdown("reset".into()))
        }));
        pio.insert(Arc::new(Mutex::new(i8042)), 0x60, 5).unwrap();
        let shared = VcpuShared {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            stop: stop.clone(),
            metrics,
            pause: Arc::new(PauseControl::new()),
            msr_list: Arc::new(Vec::new()),
            seccomp: None,
        };
        spawn_vcpus(vcpus, &mem, &shared).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(r) = stop.reason() {
                return Some(r);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("tiny guest did not stop in time");
    }

    /// A vCPU spinning in the guest when the VM is stopped from elsewhere (a signal, another
    /// vCPU) is kicked out and its thread ends, instead of burning a host CPU for as long as
    /// the process (a shim, a monitor) lives on.
    #[test]
    fn a_stop_ends_a_vcpu_spinning_in_the_guest() {
        let kvm = match host::open_kvm(KVM_DEVICE) {
            Ok(k) => k,
            Err(e) => {
                eprintln!("skipping KVM smoke test: {e}");
                return;
            }
        };
        let vm = create_vm(&kvm).unwrap();
        let mem = memory::create_guest_memory(64 << 20, memory::RamBacking::Anonymous).unwrap();
        register_memory(&vm, &mem).unwrap();
        let entry = layout::HIMEM_START;
        // hang: jmp hang
        mem.write_slice(&[0xeb, 0xfe], GuestAddress(entry)).unwrap();
        let cr3 = write_boot_tables(&mem).unwrap();
        let template = crate::cpu_template::TemplateChoice::Auto.resolve(host::probe());
        let vcpus = create_vcpus(&kvm, &vm, template, 1, entry, cr3).unwrap();
        let stop = StopSignal::new().unwrap();
        let shared = VcpuShared {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            stop: stop.clone(),
            metrics: Arc::new(Metrics::new(Instant::now(), None).unwrap()),
            pause: Arc::new(PauseControl::new()),
            msr_list: Arc::new(Vec::new()),
            seccomp: None,
        };
        let handles = spawn_vcpus(vcpus, &mem, &shared).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!handles[0].is_finished(), "the guest spins");
        stop.request(StopReason::Signal(libc::SIGTERM));
        assert!(
            end_vcpus(&handles, Duration::from_secs(10)),
            "the spinning vCPU ended after the stop"
        );
    }

    #[test]
    fn missing_tap_is_reported_by_name_before_the_vm_exists() {
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from([
            "husk-vmm",
            "--kernel",
            "/k",
            "--rng",
            "off",
            "--net",
            "tap=husk-nope0",
        ])
        .unwrap();
        let config = cli.into_vm_config().unwrap();
        let Err(err) = virtio_devices(&config, &StopSignal::new().unwrap()) else {
            panic!("a missing tap must fail");
        };
        assert!(
            matches!(err, VmError::Net { ref tap, .. } if tap == "husk-nope0"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("tap device husk-nope0 does not exist"),
            "{err}"
        );
    }

    #[test]
    fn kvm_smoke_long_mode_guest_resets_through_i8042() {
        // out 0x80, al (unclaimed port: ignored); in al, 0x71 (unclaimed: 0xff);
        // cmp al, 0xff; jne hang; mov al, 0xfe; out 0x64, al; hang: jmp hang
        let code = [
            0xe6, 0x80, 0xe4, 0x71, 0x3c, 0xff, 0x75, 0x04, 0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe,
        ];
        if let Some(r) = run_tiny_guest(&code) {
            assert_eq!(r, StopReason::GuestShutdown("reset".into()));
        }
    }

    #[test]
    fn kvm_smoke_bad_instruction_is_a_guest_crash() {
        // int3 with an empty IDT: a triple fault on hardware KVM, an emulation failure
        // under nested PVM. Either way the VM must stop as crashed.
        let code = [0x90, 0xcc, 0xeb, 0xfe];
        if let Some(r) = run_tiny_guest(&code) {
            let StopReason::GuestCrash(msg) = &r else {
                panic!("expected a crash, got {r:?}");
            };
            eprintln!("{msg}");
            if msg.contains("INTERNAL_ERROR") {
                assert!(msg.contains("RIP 0x100001"), "{msg}");
                assert!(msg.contains("instruction bytes: cc eb fe"), "{msg}");
            }
        }
    }
}
