//! The thread that starts device workers on behalf of confined vCPU threads.
//!
//! A vCPU thread's filter has no `clone`: a DRIVER_OK write asks this thread, which is
//! confined as a [`ThreadKind::Spawner`] (what workers need, plus thread start-up), to
//! start the worker; the worker confines itself before it runs its body and the vCPU waits
//! for that. The spawner ends when every handle to it is gone (the VM's vCPU threads ended).

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use super::{Filters, ThreadKind};

type Body = Box<dyn FnOnce() + Send + 'static>;

struct Request {
    name: String,
    body: Body,
    reply: SyncSender<io::Result<JoinHandle<()>>>,
}

/// A handle to a VM's spawner thread.
#[derive(Clone)]
pub struct Spawner {
    requests: SyncSender<Request>,
}

impl Spawner {
    /// Starts the spawner thread; it confines itself before taking requests.
    pub fn start(filters: Arc<Filters>) -> Result<Self, super::SeccompError> {
        let (requests, incoming) = sync_channel::<Request>(0);
        let theirs = Arc::clone(&filters);
        start_confined(
            "vmm-spawner",
            filters,
            ThreadKind::Spawner,
            Box::new(move || serve(&theirs, incoming)),
        )
        .map_err(super::SeccompError::Spawner)?;
        Ok(Self { requests })
    }

    /// Starts a confined device worker running `body` and returns once it is confined.
    pub(super) fn spawn(&self, name: &str, body: Body) -> io::Result<JoinHandle<()>> {
        let (reply, answer) = sync_channel(1);
        self.requests
            .send(Request {
                name: name.to_string(),
                body,
                reply,
            })
            .map_err(|_| io::Error::other("the VMM's spawner thread has ended"))?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the VMM's spawner thread ended mid-request"))?
    }
}

fn serve(filters: &Arc<Filters>, incoming: Receiver<Request>) {
    for req in incoming {
        let started = start_confined(
            &req.name,
            Arc::clone(filters),
            ThreadKind::DeviceWorker,
            req.body,
        );
        let _ = req.reply.send(started);
    }
}

/// Starts a thread that confines itself as `kind` and then runs `body`; returns once the
/// filter is in place (or with the error that kept it from being installed, `body` not run).
pub(super) fn start_confined(
    name: &str,
    filters: Arc<Filters>,
    kind: ThreadKind,
    body: Body,
) -> io::Result<JoinHandle<()>> {
    let (ready_tx, ready) = sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let confined = filters.confine_current(kind);
            let ok = confined.is_ok();
            let _ = ready_tx.send(confined);
            if ok {
                body();
            }
        })?;
    match ready.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(io::Error::other(e.to_string()))
        }
        Err(_) => {
            let _ = handle.join();
            Err(io::Error::other(format!(
                "thread {name} ended before confining itself"
            )))
        }
    }
}
