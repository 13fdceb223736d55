//! The vCPU threads: run the vCPU, dispatch its exits to the port-I/O and MMIO buses,
//! and turn the exits that end the VM into a [`StopReason`]; on request, pause and save
//! their state ([`pause`], [`persist`]).

pub mod kick;
pub mod pause;
pub mod persist;

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::x86_64::page_walk;
use crate::devices::bus::Bus;
use crate::memory::GuestMemory;
use crate::metrics::Metrics;
use crate::stop::{StopReason, StopSignal};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;
/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;

/// What a vCPU needs to run.
pub struct VcpuContext {
    pub index: u8,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemory,
    pub stop: StopSignal,
    pub metrics: Arc<Metrics>,
    pub pause: Arc<pause::PauseControl>,
    /// The MSRs a snapshot saves (KVM's index list, read once per VM).
    pub msr_list: Arc<Vec<u32>>,
    /// Under `--seccomp enforce`: this thread's filters and the spawner its devices'
    /// workers start through (crate::seccomp).
    pub seccomp: Option<(Arc<crate::seccomp::Filters>, crate::seccomp::Spawner)>,
}

/// What to do after one exit (decided while KVM's run structure is borrowed).
enum Next {
    Continue,
    Stop(StopReason),
    InternalError,
}

/// Access sizes a guest may use for port I/O or MMIO; anything else is ignored.
fn valid_access(len: usize) -> bool {
    (1..=8).contains(&len)
}

/// Runs `vcpu` until the VM stops; the reason is posted to the stop signal.
pub fn run(mut vcpu: VcpuFd, ctx: VcpuContext) {
    kick::register(&mut vcpu);
    // `None` unless the VM runs with --profile; without it, profiling costs one check per exit.
    let profile = crate::profile::attach(ctx.index, &mut vcpu);
    // Before the first guest entry: everything from here on handles guest input.
    let _seccomp_context = match &ctx.seccomp {
        Some((filters, spawner)) => {
            if let Err(e) = filters.confine_current(crate::seccomp::ThreadKind::Vcpu) {
                kick::unregister();
                ctx.stop
                    .request(StopReason::VmmError(format!("vCPU {}: {e}", ctx.index)));
                return;
            }
            Some(crate::seccomp::enter(
                Arc::clone(filters),
                Some(spawner.clone()),
            ))
        }
        None => None,
    };
    if ctx.index == 0 {
        ctx.metrics.vcpu_first_entry();
    }
    loop {
        if ctx.pause.requested() {
            pause_here(&mut vcpu, &ctx);
            // Resumed because the VM ended while this vCPU was parked (a snapshot).
            if ctx.stop.reason().is_some() {
                kick::unregister();
                return;
            }
            continue;
        }
        let mut kicked = false;
        let next = match vcpu.run() {
            Ok(exit) => {
                if let Some(p) = &profile {
                    p.count_exit(&exit);
                }
                handle_exit(exit, &ctx)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                kicked = true;
                Next::Continue
            }
            Err(e) => Next::Stop(StopReason::VmmError(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                ctx.index
            ))),
        };
        if kicked {
            vcpu.set_kvm_immediate_exit(0);
            if let Some(p) = &profile {
                p.sample(&vcpu);
            }
            // The VM was stopped elsewhere (another vCPU, a signal, the VMM): end too, so a
            // stopped VM uses no host CPU while its process lives on (a shim, a monitor).
            if !ctx.pause.requested() && ctx.stop.reason().is_some() {
                kick::unregister();
                return;
            }
        }
        match next {
            Next::Continue => {}
            Next::Stop(reason) => {
                kick::unregister();
                ctx.stop.request(reason);
                return;
            }
            Next::InternalError => {
                kick::unregister();
                let msg = describe_internal_error(&mut vcpu, &ctx);
                ctx.stop.request(StopReason::GuestCrash(msg));
                return;
            }
        }
    }
}

/// Completes the last exit's pending I/O without running guest code (KVM_RUN with
/// `immediate_exit` set), saves the vCPU's state, reports it and waits for a resume.
fn pause_here(vcpu: &mut VcpuFd, ctx: &VcpuContext) {
    vcpu.set_kvm_immediate_exit(1);
    match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => tracing::debug!(vcpu = ctx.index, "KVM_RUN before pausing: {e}"),
        Ok(exit) => tracing::debug!(vcpu = ctx.index, "exit before pausing: {exit:?}"),
    }
    vcpu.set_kvm_immediate_exit(0);
    let state = persist::VcpuState::save(vcpu, ctx.index, &ctx.msr_list).map_err(|e| e.to_string());
    ctx.pause.report_and_park(ctx.index, state);
}

fn handle_exit(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Next {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if valid_access(data.len()) {
                data.fill(0);
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Next::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if valid_access(data.len()) {
                // Unclaimed ports (e.g. the 0x80 delay port) are ignored silently.
                ctx.pio.write(u64::from(port), data);
            }
            Next::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if valid_access(data.len()) {
                data.fill(0);
                if !ctx.mmio.read(addr, data) {
                    data.fill(0xff);
                }
            }
            Next::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if valid_access(data.len()) {
                ctx.mmio.write(addr, data);
            }
            Next::Continue
        }
        // Only seen without an in-kernel LAPIC, i.e. with hand-made guests.
        VcpuExit::Hlt => Next::Stop(StopReason::GuestShutdown(format!(
            "vCPU {} halted",
            ctx.index
        ))),
        VcpuExit::Shutdown => Next::Stop(StopReason::GuestCrash(format!(
            "vCPU {}: guest triple fault (KVM_EXIT_SHUTDOWN)",
            ctx.index
        ))),
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => {
                Next::Stop(StopReason::GuestShutdown(format!("system event {kind}")))
            }
            KVM_SYSTEM_EVENT_CRASH => {
                Next::Stop(StopReason::GuestCrash("guest reported a crash".into()))
            }
            other => {
                tracing::debug!(vcpu = ctx.index, "ignoring system event {other}");
                Next::Continue
            }
        },
        VcpuExit::FailEntry(reason, cpu) => Next::Stop(StopReason::GuestCrash(format!(
            "vCPU {}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host \
             CPU {cpu}",
            ctx.index
        ))),
        VcpuExit::InternalError => Next::InternalError,
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => Next::Continue,
        other => {
            tracing::debug!(vcpu = ctx.index, "unexpected vCPU exit {other:?}");
            Next::Continue
        }
    }
}

/// Formats KVM_EXIT_INTERNAL_ERROR with the suberror, RIP and the instruction bytes.
fn describe_internal_error(vcpu: &mut VcpuFd, ctx: &VcpuContext) -> String {
    // SAFETY: KVM filled the `internal` member of the union for this exit reason.
    let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
    let suberror = internal.suberror;
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data = &internal.data[..ndata];
    let what = match suberror {
        1 => "instruction emulation failed",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    };
    let mut msg = format!(
        "vCPU {}: KVM_EXIT_INTERNAL_ERROR suberror {suberror} ({what}), data {data:x?}",
        ctx.index
    );
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(regs), Ok(sregs)) => {
            let paging = sregs.cr0 & CR0_PG != 0 && sregs.efer & EFER_LMA != 0;
            let linear = sregs.cs.base.wrapping_add(regs.rip);
            let cr3 = paging.then_some(sregs.cr3);
            let mut insn = [0u8; MAX_INSN_LEN];
            let n = page_walk::read_virt(&ctx.mem, cr3, linear, &mut insn);
            msg.push_str(&format!(", RIP {:#x}", regs.rip));
            if n == 0 {
                msg.push_str(" (instruction bytes not readable)");
            } else {
                let bytes: Vec<String> = insn[..n].iter().map(|b| format!("{b:02x}")).collect();
                msg.push_str(&format!(", instruction bytes: {}", bytes.join(" ")));
            }
        }
        (Err(e), _) | (_, Err(e)) => msg.push_str(&format!(", registers unavailable: {e}")),
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_sizes() {
        assert!(!valid_access(0));
        assert!(valid_access(1) && valid_access(4) && valid_access(8));
        assert!(!valid_access(9));
    }
}
