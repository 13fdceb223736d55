//! Why the VM stops, and how a vCPU thread or a device tells the main thread.
//!
//! The first reason wins; the main thread waits on the eventfd (together with a signalfd
//! for SIGTERM/SIGINT) and then exits the whole process, which stops every vCPU at once.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    /// The guest asked to reset or power off (i8042 reset, KVM system event): the normal
    /// way a husk guest ends.
    GuestShutdown(String),
    /// The guest can no longer run: triple fault, emulation failure, failed entry.
    GuestCrash(String),
    /// A vCPU ioctl failed in a way the VMM cannot recover from.
    VmmError(String),
    /// The VMM received SIGTERM or SIGINT.
    Signal(i32),
    /// A snapshot was taken (into the folder named); the VM ends with it.
    Snapshotted(String),
    /// The host process serving a device (virtiofsd behind virtio-fs) went away while the
    /// guest ran: the guest's accesses to that device could never complete, so the VM
    /// ends instead of hanging its workload.
    BackendGone(String),
}

impl StopReason {
    /// Process exit status for this reason; see the crate docs for the table.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::GuestShutdown(_) | StopReason::Snapshotted(_) => 0,
            StopReason::VmmError(_) => 1,
            StopReason::GuestCrash(_) => 2,
            StopReason::BackendGone(_) => 3,
            StopReason::Signal(signo) => 128 + signo,
        }
    }

    /// Short label for logs and the metrics file.
    pub fn label(&self) -> String {
        match self {
            StopReason::GuestShutdown(s) => format!("guest_shutdown: {s}"),
            StopReason::GuestCrash(s) => format!("guest_crash: {s}"),
            StopReason::VmmError(s) => format!("vmm_error: {s}"),
            StopReason::Signal(n) => format!("signal {n}"),
            StopReason::Snapshotted(dir) => format!("snapshot taken into {dir}"),
            StopReason::BackendGone(device) => format!("backend_gone: {device}"),
        }
    }
}

/// Shared "stop the VM" latch.
#[derive(Clone)]
pub struct StopSignal {
    inner: Arc<Inner>,
}

struct Inner {
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
}

impl StopSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                reason: Mutex::new(None),
                evt: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Records `reason` unless another one came first, and wakes the main thread.
    pub fn request(&self, reason: StopReason) {
        let mut slot = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            // Cannot fail short of the counter overflowing, which one write never does.
            let _ = self.inner.evt.write(1);
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        self.inner
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd the main thread polls.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes_the_eventfd() {
        let s = StopSignal::new().unwrap();
        assert!(s.eventfd().read().is_err(), "nothing yet (EAGAIN)");
        s.request(StopReason::GuestShutdown("reset".into()));
        s.clone().request(StopReason::Signal(15));
        assert_eq!(s.reason(), Some(StopReason::GuestShutdown("reset".into())));
        assert_eq!(s.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn exit_codes() {
        assert_eq!(StopReason::GuestShutdown(String::new()).exit_code(), 0);
        assert_eq!(StopReason::VmmError(String::new()).exit_code(), 1);
        assert_eq!(StopReason::GuestCrash(String::new()).exit_code(), 2);
        assert_eq!(StopReason::Signal(15).exit_code(), 143);
    }
}
