//! Pausing every vCPU of a running VM and collecting their states (for a snapshot).
//!
//! The main thread raises the request and kicks each vCPU thread; each thread completes its
//! pending exit, saves its own state (only the owning thread may use its vCPU fd while it
//! runs), reports it, and parks until the request is withdrawn.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use super::kick;
use super::persist::VcpuState;

/// What a vCPU thread reports once paused.
type Report = (u8, Result<VcpuState, String>);

/// Shared by the main thread and every vCPU thread of one VM.
pub struct PauseControl {
    requested: AtomicBool,
    reports: Mutex<Option<mpsc::Sender<Report>>>,
    parked: Mutex<bool>,
    resumed: Condvar,
}

/// Error pausing the vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("kicking vCPU {index}: {source}")]
    Kick {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {index} did not pause within {timeout:?} (it may have stopped)")]
    Timeout { index: usize, timeout: Duration },
    #[error("saving vCPU {index}: {message}")]
    Save { index: u8, message: String },
}

impl Default for PauseControl {
    fn default() -> Self {
        Self::new()
    }
}

impl PauseControl {
    pub fn new() -> Self {
        Self {
            requested: AtomicBool::new(false),
            reports: Mutex::new(None),
            parked: Mutex::new(false),
            resumed: Condvar::new(),
        }
    }

    /// Whether the calling vCPU thread should pause now.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Called by a vCPU thread with its saved state; blocks until [`resume`](Self::resume).
    pub fn report_and_park(&self, index: u8, state: Result<VcpuState, String>) {
        if let Ok(guard) = self.reports.lock()
            && let Some(tx) = guard.as_ref()
        {
            let _ = tx.send((index, state));
        }
        let Ok(mut parked) = self.parked.lock() else {
            return;
        };
        while *parked {
            parked = match self.resumed.wait(parked) {
                Ok(p) => p,
                Err(_) => return,
            };
        }
    }

    /// Pauses every vCPU (`threads[i]` runs vCPU `i`) and returns their states in index
    /// order. The vCPUs stay parked until [`resume`](Self::resume).
    pub fn pause_all(
        &self,
        threads: &[libc::pthread_t],
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, PauseError> {
        let (tx, rx) = mpsc::channel();
        if let Ok(mut r) = self.reports.lock() {
            *r = Some(tx);
        }
        if let Ok(mut p) = self.parked.lock() {
            *p = true;
        }
        self.requested.store(true, Ordering::SeqCst);
        for (index, &t) in threads.iter().enumerate() {
            kick::kick(t).map_err(|source| PauseError::Kick { index, source })?;
        }
        let deadline = Instant::now() + timeout;
        let mut states: Vec<Option<VcpuState>> = threads.iter().map(|_| None).collect();
        let mut got = 0;
        while got < threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((index, state)) = rx.recv_timeout(left) else {
                let index = states.iter().position(Option::is_none).unwrap_or(0);
                return Err(PauseError::Timeout { index, timeout });
            };
            let state = state.map_err(|message| PauseError::Save { index, message })?;
            if let Some(slot) = states.get_mut(usize::from(index))
                && slot.is_none()
            {
                *slot = Some(state);
                got += 1;
            }
        }
        Ok(states.into_iter().flatten().collect())
    }

    /// Lets the parked vCPUs run again.
    pub fn resume(&self) {
        self.requested.store(false, Ordering::SeqCst);
        if let Ok(mut r) = self.reports.lock() {
            *r = None;
        }
        if let Ok(mut p) = self.parked.lock() {
            *p = false;
        }
        self.resumed.notify_all();
    }
}
