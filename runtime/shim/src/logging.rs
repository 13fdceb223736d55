//! Logs go to containerd's log pipe: the FIFO `log` in the bundle (the shim's working
//! directory), which containerd copies into its own log. Run by hand (no FIFO), to stderr.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use tracing_subscriber::EnvFilter;

/// `HUSK_LOG` (a tracing filter) wins; else `debug` with containerd's `-debug`, else `info`.
pub fn init(debug: bool) {
    let text = std::env::var("HUSK_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| if debug { "debug" } else { "info" }.to_owned());
    // The VMM processes the shim starts write to the same log (fd 2, below) at its level.
    husk_runtime::vm_config::set_vmm_logging(husk_runtime::vm_config::VmmLogging {
        filter: text.clone(),
        file: None,
        json: false,
    });
    let filter = EnvFilter::new(&text);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    match open_log_fifo() {
        Some(fifo) => {
            // What bypasses tracing (a panic message, the VMM's seccomp trap report, see
            // husk_vmm::seccomp::sigsys) goes to fd 2: let it reach containerd's log too.
            // SAFETY: dup2 onto fd 2 of an fd this function owns.
            unsafe { libc::dup2(fifo.as_raw_fd(), libc::STDERR_FILENO) };
            builder.with_writer(Mutex::new(fifo)).init()
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
}

/// containerd opens the read side before it starts us. Opening non-blocking fails at once
/// (ENXIO) when no one reads, instead of hanging; writes then block as usual, so no line is
/// dropped.
fn open_log_fifo() -> Option<File> {
    let fifo = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("log")
        .ok()?;
    let flags = OFlag::from_bits_truncate(fcntl(&fifo, FcntlArg::F_GETFL).ok()?);
    fcntl(&fifo, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).ok()?;
    Some(fifo)
}
