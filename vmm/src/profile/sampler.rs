//! The sampling timer: a thread that kicks every live vCPU thread out of KVM_RUN `hz` times a
//! second (the kick signal of [`crate::vcpu::kick`]), and what a kicked vCPU thread records:
//! its own RIP and privilege level, read from its own vCPU fd.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};

use super::Registry;
use super::folded::Mode;

const CR0_PE: u64 = 1;

/// The privilege level and linear address of the instruction a vCPU was about to run.
///
/// CPL is the low bits of the CS selector once protected mode is on; real mode (an AP's
/// start-up trampoline) counts as kernel, its address being CS base + IP.
pub fn classify(regs: &kvm_regs, sregs: &kvm_sregs) -> (Mode, u64) {
    let addr = if sregs.cs.l == 1 {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip)
    };
    if sregs.cr0 & CR0_PE != 0 && sregs.cs.selector & 3 == 3 {
        (Mode::User, addr)
    } else {
        (Mode::Kernel, addr)
    }
}

/// What the timer thread did.
#[derive(Debug, Default, Clone, Copy)]
pub struct TimerStats {
    pub ticks: u64,
    /// Ticks skipped because the thread woke too late for them (a loaded host).
    pub missed: u64,
    pub kicks: u64,
    pub kick_errors: u64,
}

/// The running timer thread.
pub struct Sampler {
    handle: Option<JoinHandle<TimerStats>>,
    stop: Arc<(Mutex<bool>, Condvar)>,
}

impl Sampler {
    pub fn start(hz: u32, registry: Arc<Registry>) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = Arc::clone(&stop);
        let period = Duration::from_nanos(1_000_000_000 / u64::from(hz.max(1)));
        let handle = std::thread::Builder::new()
            .name("profiler".into())
            .spawn(move || run(period, &registry, &thread_stop))?;
        Ok(Self {
            handle: Some(handle),
            stop,
        })
    }

    /// Stops the thread and returns what it did.
    pub fn stop(&mut self) -> TimerStats {
        let (lock, cv) = &*self.stop;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        cv.notify_all();
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.stop();
        }
    }
}

fn run(period: Duration, registry: &Registry, stop: &(Mutex<bool>, Condvar)) -> TimerStats {
    let (lock, cv) = stop;
    let mut stats = TimerStats::default();
    let mut next = Instant::now() + period;
    let Ok(mut stopped) = lock.lock() else {
        return stats;
    };
    loop {
        // Sleep until the next tick, or until asked to stop.
        loop {
            if *stopped {
                return stats;
            }
            let now = Instant::now();
            if now >= next {
                break;
            }
            stopped = match cv.wait_timeout(stopped, next - now) {
                Ok((guard, _)) => guard,
                Err(_) => return stats,
            };
        }
        stats.ticks += 1;
        let (kicks, errors) = registry.kick_all();
        stats.kicks += kicks;
        stats.kick_errors += errors;
        next += period;
        let now = Instant::now();
        if next < now {
            // Behind by more than a period: drop the lost ticks rather than burst.
            let behind = now - next;
            let lost = behind.as_nanos() / period.as_nanos().max(1) + 1;
            stats.missed += lost as u64;
            next += period * lost as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;

    fn state(rip: u64, cs: kvm_segment, cr0: u64) -> (kvm_regs, kvm_sregs) {
        let regs = kvm_regs {
            rip,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            cs,
            cr0,
            ..Default::default()
        };
        (regs, sregs)
    }

    #[test]
    fn classifies_kernel_user_and_real_mode() {
        let kernel_cs = kvm_segment {
            selector: 0x10,
            l: 1,
            ..Default::default()
        };
        let user_cs = kvm_segment {
            selector: 0x33,
            l: 1,
            ..Default::default()
        };
        let (r, s) = state(0xffff_ffff_8100_1234, kernel_cs, 0x8000_0011);
        assert_eq!(classify(&r, &s), (Mode::Kernel, 0xffff_ffff_8100_1234));
        let (r, s) = state(0x40_1000, user_cs, 0x8000_0011);
        assert_eq!(classify(&r, &s), (Mode::User, 0x40_1000));
        // Real mode: selector bits are not a privilege level; the address is base + IP.
        let real_cs = kvm_segment {
            selector: 0x9b,
            base: 0x9b0,
            ..Default::default()
        };
        let (r, s) = state(0x10, real_cs, 0x10);
        assert_eq!(classify(&r, &s), (Mode::Kernel, 0x9c0));
    }

    #[test]
    fn timer_ticks_at_about_its_rate_and_stops_promptly() {
        let registry = Arc::new(Registry::default());
        let mut sampler = Sampler::start(1000, Arc::clone(&registry)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        let stats = sampler.stop();
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "stop took too long"
        );
        // A loaded host may delay the thread; ticks plus missed ones cover the time.
        assert!(stats.ticks + stats.missed >= 50, "{stats:?}");
        assert!(stats.ticks <= 150, "{stats:?}");
        assert_eq!(stats.kicks, 0, "no vCPU registered");
    }
}
