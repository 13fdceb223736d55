//! The notification relay of a vhost-user device.
//!
//! The backend signals used buffers by writing a per-queue "call" eventfd. On virtio-mmio
//! that cannot go straight to KVM as an irqfd: Linux's virtio_mmio interrupt handler reads
//! InterruptStatus first and ignores the interrupt when the used-buffer bit is clear. So a
//! thread waits on the call eventfds and raises the interrupt through [`Interrupt`], which
//! sets the bit, then injects. The same thread watches the vhost-user socket: when the
//! backend goes away the VM is stopped ([`StopReason::BackendGone`]), since nothing the
//! guest asks of the share can complete any more. That is also how a VM ends at shutdown
//! (virtiofsd is stopped with it), so the hang-up alone is logged at info; only a guest
//! that kicks the share afterwards is an error.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use tracing::{error, info, warn};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::Interrupt;
use super::super::interrupt::INT_VRING;
use super::super::worker::setup_epoll;
use crate::stop::{StopReason, StopSignal};

const TOKEN_KILL: u64 = u64::MAX;
const TOKEN_HANGUP: u64 = u64::MAX - 1;
/// Kick eventfd `i` is watched (after a hang-up only) with token `TOKEN_KICK + i`.
const TOKEN_KICK: u64 = 1 << 32;

/// What the relay saw, handed back when it stops.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RelayEnd {
    /// The backend closed its socket.
    pub hung_up: bool,
    /// Queue kicks by the guest after that (each is an access that will not complete).
    pub kicks_after_hang_up: u64,
}

/// Runs until `kill` is readable. `name` identifies the device in logs; `kicks` are the
/// queues' notify eventfds, which the backend reads while it lives; `stop` (the VM's) is
/// requested when the backend hangs up.
pub(crate) fn run(
    name: String,
    calls: Vec<EventFd>,
    kicks: Vec<EventFd>,
    backend: UnixStream,
    interrupt: Interrupt,
    kill: EventFd,
    stop: Option<StopSignal>,
) -> RelayEnd {
    let mut end = RelayEnd::default();
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
            return end;
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
                return end;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_KILL => return end,
                TOKEN_HANGUP => {
                    end.hung_up = true;
                    info!("{name}: the vhost-user backend closed its connection");
                    if let Some(stop) = &stop {
                        stop.request(StopReason::BackendGone(format!(
                            "{name}: the vhost-user backend closed its connection (virtiofsd exited?)"
                        )));
                    }
                    // Level-triggered: stop watching, or every wait would return at once.
                    let _ = epoll.ctl(
                        ControlOperation::Delete,
                        backend.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    // From now on nobody reads the kicks: watch them ourselves. What is
                    // pending was sent before the backend went and is not a new access.
                    for (i, kick) in kicks.iter().enumerate() {
                        let _ = kick.read();
                        let watched = epoll.ctl(
                            ControlOperation::Add,
                            kick.as_raw_fd(),
                            EpollEvent::new(EventSet::IN, TOKEN_KICK + i as u64),
                        );
                        if let Err(e) = watched {
                            warn!("{name}: cannot watch queue {i} after the hang-up: {e}");
                        }
                    }
                }
                t if t >= TOKEN_KICK => {
                    if let Some(kick) = kicks.get((t - TOKEN_KICK) as usize) {
                        let _ = kick.read();
                    }
                    if end.kicks_after_hang_up == 0 {
                        error!(
                            "{name}: the guest uses the share after its vhost-user backend \
                             exited (virtiofsd gone?); these accesses will not complete"
                        );
                    }
                    end.kicks_after_hang_up += 1;
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

    /// Whether the eventfd has a count, without taking it.
    fn readable(e: &EventFd) -> bool {
        let mut p = libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

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
        let kicks = vec![
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let guest_kick = kicks[0].try_clone().unwrap();
        // A kick the backend never read before it went: not counted as a later access.
        guest_kick.write(1).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let relay_interrupt = interrupt.clone();
        let worker = Worker::spawn("fs-relay-test", move |kill| {
            run(
                "virtio-fs test".into(),
                calls,
                kicks,
                ours,
                relay_interrupt,
                kill,
                None,
            )
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

        // The backend hanging up is noted, and the relay keeps working afterwards.
        drop(theirs);
        backend_side.write(1).unwrap();
        wait_until("interrupt after hang-up", || {
            interrupt.irqfd().read().is_ok()
        });
        assert_eq!(interrupt.status() & INT_VRING, INT_VRING);
        // The stale kick was drained at the hang-up; two new ones are counted.
        wait_until("stale kick drained", || !readable(&guest_kick));
        guest_kick.write(1).unwrap();
        wait_until("kick taken", || !readable(&guest_kick));
        guest_kick.write(1).unwrap();
        wait_until("kick taken", || !readable(&guest_kick));
        let end = worker.stop().expect("relay stops on kill");
        assert!(end.hung_up);
        assert_eq!(end.kicks_after_hang_up, 2);
    }

    /// The usual shutdown: the backend goes, the guest does not touch the share again.
    /// Either way the VM is told to stop, naming the device (a guest whose virtiofsd was
    /// killed would otherwise wait forever on its rootfs).
    #[test]
    fn a_hang_up_alone_is_no_lost_access_and_stops_the_vm() {
        let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let calls = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
        let kicks = vec![EventFd::new(EFD_NONBLOCK).unwrap()];
        let (ours, theirs) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let vm_stop = stop.clone();
        let worker = Worker::spawn("fs-relay-test", move |kill| {
            run(
                "virtio-fs test".into(),
                calls,
                kicks,
                ours,
                interrupt,
                kill,
                Some(vm_stop),
            )
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(stop.reason().is_none(), "no stop while the backend lives");
        drop(theirs);
        wait_until("stop requested", || stop.reason().is_some());
        assert!(readable(stop.eventfd()), "the VM's main loop is woken");
        match stop.reason() {
            Some(StopReason::BackendGone(what)) => {
                assert!(what.contains("virtio-fs test"), "{what}")
            }
            other => panic!("want BackendGone, got {other:?}"),
        }
        let end = worker.stop().expect("relay stops on kill");
        assert_eq!(
            end,
            RelayEnd {
                hung_up: true,
                kicks_after_hang_up: 0
            }
        );
    }
}
