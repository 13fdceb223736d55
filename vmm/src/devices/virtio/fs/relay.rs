//! The notification relay of a vhost-user device.
//!
//! The backend signals used buffers by writing a per-queue "call" eventfd. On virtio-mmio
//! that cannot go straight to KVM as an irqfd: Linux's virtio_mmio interrupt handler reads
//! InterruptStatus first and ignores the interrupt when the used-buffer bit is clear. So a
//! thread waits on the call eventfds and raises the interrupt through [`Interrupt`], which
//! sets the bit, then injects. The same thread watches the vhost-user socket and logs an
//! error naming the device when the backend goes away.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use tracing::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::Interrupt;
use super::super::interrupt::INT_VRING;
use super::super::worker::setup_epoll;

const TOKEN_KILL: u64 = u64::MAX;
const TOKEN_HANGUP: u64 = u64::MAX - 1;

/// Runs until `kill` is readable. `name` identifies the device in logs.
pub(crate) fn run(
    name: String,
    calls: Vec<EventFd>,
    backend: UnixStream,
    interrupt: Interrupt,
    kill: EventFd,
) {
    let mut fds: Vec<(i32, u64)> = calls
        .iter()
        .enumerate()
        .map(|(i, e)| (e.as_raw_fd(), i as u64))
        .collect();
    fds.push((kill.as_raw_fd(), TOKEN_KILL));
    let epoll = match setup_epoll(&fds) {
        Ok(e) => e,
        Err(e) => {
            error!("{name}: notification relay cannot start (epoll: {e}); the share will hang");
            return;
        }
    };
    // Hang-ups only: the socket's data belongs to the request/reply exchange on the vCPU
    // thread, so this thread never reads it.
    let watch = epoll.ctl(
        ControlOperation::Add,
        backend.as_raw_fd(),
        EpollEvent::new(EventSet::READ_HANG_UP | EventSet::HANG_UP, TOKEN_HANGUP),
    );
    if let Err(e) = watch {
        warn!("{name}: cannot watch the vhost-user socket for hang-ups: {e}");
    }
    // The backend may have used buffers between activation and our first wait.
    let mut pending = true;
    let mut events = [EpollEvent::default(); 8];
    loop {
        if pending {
            pending = false;
            if let Err(e) = interrupt.trigger(INT_VRING) {
                warn!("{name}: cannot raise interrupt: {e}");
            }
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("{name}: notification relay stopped (epoll_wait: {e}); the share will hang");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => return,
                TOKEN_HANGUP => {
                    error!(
                        "{name}: the vhost-user backend hung up (virtiofsd exited?); guest \
                         accesses to this share will not complete"
                    );
                    // Level-triggered: stop watching, or every wait would return at once.
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        backend.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
                i => {
                    if let Some(call) = calls.get(i as usize) {
                        // Read before raising, so a call during the raise is not lost.
                        let _ = call.read();
                        pending = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::worker::Worker;
    use std::time::{Duration, Instant};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_call_sets_the_used_buffer_bit_and_injects() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Interrupt::new(irq);
        let calls = vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let backend_side = calls[1].try_clone().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let relay_interrupt = interrupt.clone();
        let worker = Worker::spawn("fs-relay-test", move |kill| {
            run("virtio-fs test".into(), calls, ours, relay_interrupt, kill)
        })
        .unwrap();
        // The start-up interrupt.
        wait_until("start-up interrupt", || interrupt.irqfd().read().is_ok());
        interrupt.ack(INT_VRING);
        assert_eq!(interrupt.status(), 0);

        backend_side.write(1).unwrap();
        wait_until("interrupt after a call", || {
            interrupt.irqfd().read().is_ok()
        });
        assert_eq!(interrupt.status() & INT_VRING, INT_VRING);
        interrupt.ack(INT_VRING);

        // The backend hanging up is logged, and the relay keeps working afterwards.
        drop(theirs);
        backend_side.write(1).unwrap();
        wait_until("interrupt after hang-up", || {
            interrupt.irqfd().read().is_ok()
        });
        assert_eq!(interrupt.status() & INT_VRING, INT_VRING);
        assert!(worker.stop().is_some(), "relay stops on kill");
    }
}
