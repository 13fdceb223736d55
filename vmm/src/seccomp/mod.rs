//! Seccomp confinement of the VMM's threads that touch guest-controlled data.
//!
//! Each vCPU thread (MMIO and port handlers, device activation) and each device worker
//! (descriptor chains, vsock packets, block requests) installs a deny-by-default filter of
//! its own kind ([`filters`]) before it handles anything from the guest; a syscall outside
//! it ends the process ([`sigsys`]). None of them may open a file (the spawner's opens
//! fail with EACCES, see [`filters::spawner_open_refusal`]), create a non-Unix
//! socket, exec, mount, signal, or change credentials; vCPU ioctls are limited to running
//! the vCPU and reading its state.
//!
//! Filters are inherited by threads a thread starts, and a device's worker starts when the
//! guest writes DRIVER_OK, on a vCPU thread. So that a worker is not bound by the vCPU's
//! filter (nor the vCPU filter widened to a worker's), vCPU threads hand worker starts to a
//! spawner thread ([`spawner`]) whose filter covers what workers need; the worker then adds
//! its own.
//!
//! The thread that calls [`crate::vm::run`] sets the VM up unconfined (it opens the
//! kernel, images, sockets and /dev/kvm), then confines itself as [`ThreadKind::Main`]
//! once every vCPU runs, before it waits for the VM's stop, serves the API socket and
//! writes snapshots. `run` must therefore be the only work of its process: `husk-vmm`, or
//! the runtime's jailed `__vmm` entry.

mod filters;
pub mod sigsys;
mod spawner;

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

pub use spawner::Spawner;

/// `--seccomp`: whether VMM threads confine themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Every vCPU and device thread runs under its filter [default].
    #[default]
    Enforce,
    /// No filters (debugging a filter, or a kernel without seccomp).
    Off,
}

/// The confined thread kinds, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    DeviceWorker,
    Spawner,
    /// The thread that set the VM up, once every other thread runs.
    Main,
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker => "device worker",
            ThreadKind::Spawner => "spawner",
            ThreadKind::Main => "main",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the seccomp filter of {} threads: {source}", .kind.name())]
    Compile {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("installing the seccomp filter of a {} thread: {source}", .kind.name())]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
    #[error("starting the VMM's spawner thread: {0}")]
    Spawner(#[source] io::Error),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] io::Error),
}

/// The compiled filters of one VM.
#[derive(Debug)]
pub struct Filters {
    vcpu: BpfProgram,
    worker: BpfProgram,
    spawner: BpfProgram,
    main: BpfProgram,
    spawner_open_refusal: BpfProgram,
}

impl Filters {
    /// Compiles every kind's filter and installs the SIGSYS handler.
    pub fn new() -> Result<Arc<Self>, SeccompError> {
        let compile = |kind| -> Result<BpfProgram, SeccompError> {
            filters::filter(kind)
                .and_then(BpfProgram::try_from)
                .map_err(|source| SeccompError::Compile { kind, source })
        };
        let filters = Self {
            vcpu: compile(ThreadKind::Vcpu)?,
            worker: compile(ThreadKind::DeviceWorker)?,
            spawner: compile(ThreadKind::Spawner)?,
            main: compile(ThreadKind::Main)?,
            spawner_open_refusal: filters::spawner_open_refusal()
                .and_then(BpfProgram::try_from)
                .map_err(|source| SeccompError::Compile {
                    kind: ThreadKind::Spawner,
                    source,
                })?,
        };
        sigsys::install().map_err(SeccompError::Handler)?;
        Ok(Arc::new(filters))
    }

    fn program(&self, kind: ThreadKind) -> &BpfProgram {
        match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::DeviceWorker => &self.worker,
            ThreadKind::Spawner => &self.spawner,
            ThreadKind::Main => &self.main,
        }
    }

    /// Confines the calling thread (and threads it starts later) as `kind`; there is no way
    /// back.
    pub fn confine_current(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        sigsys::remember_thread_name();
        let install = |program| {
            seccompiler::apply_filter(program)
                .map_err(|source| SeccompError::Install { kind, source })
        };
        install(self.program(kind))?;
        if kind == ThreadKind::Spawner {
            install(&self.spawner_open_refusal)?;
        }
        Ok(())
    }
}

/// Whether this host can confine VMM threads: compiles every filter and installs the vCPU
/// filter on a throw-away thread (`husk check`).
pub fn probe() -> Result<(), SeccompError> {
    let filters = Filters::new()?;
    std::thread::Builder::new()
        .name("seccomp-probe".into())
        .spawn(move || filters.confine_current(ThreadKind::Vcpu))
        .map_err(SeccompError::Spawner)?
        .join()
        .unwrap_or_else(|_| {
            Err(SeccompError::Spawner(io::Error::other(
                "the probe thread panicked",
            )))
        })
}

/// How threads started from the current thread are confined.
#[derive(Clone)]
struct ThreadContext {
    filters: Arc<Filters>,
    /// Set on confined threads that must not start threads themselves.
    spawner: Option<Spawner>,
}

thread_local! {
    static CONTEXT: RefCell<Option<ThreadContext>> = const { RefCell::new(None) };
}

/// Sets how device workers started from this thread are confined, until the guard drops.
#[must_use]
pub struct ContextGuard(());

impl Drop for ContextGuard {
    fn drop(&mut self) {
        CONTEXT.with(|c| c.borrow_mut().take());
    }
}

/// Workers started from this thread confine themselves with `filters`, through `spawner`
/// when given.
pub fn enter(filters: Arc<Filters>, spawner: Option<Spawner>) -> ContextGuard {
    CONTEXT.with(|c| *c.borrow_mut() = Some(ThreadContext { filters, spawner }));
    ContextGuard(())
}

/// Starts a device worker thread: confined as a [`ThreadKind::DeviceWorker`] before `body`
/// runs when the current thread has a context ([`enter`]), plain otherwise (unit tests,
/// `--seccomp off`). An error means the thread did not run `body`.
pub fn spawn_worker<F>(name: &str, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    match CONTEXT.with(|c| c.borrow().clone()) {
        None => std::thread::Builder::new()
            .name(name.to_string())
            .spawn(body),
        Some(ThreadContext {
            filters,
            spawner: None,
        }) => spawner::start_confined(name, filters, ThreadKind::DeviceWorker, Box::new(body)),
        Some(ThreadContext {
            spawner: Some(spawner),
            ..
        }) => spawner.spawn(name, Box::new(body)),
    }
}

#[cfg(test)]
mod tests;
