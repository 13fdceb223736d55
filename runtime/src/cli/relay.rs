//! Stdio relays between the host side (the monitor's inherited stdin/stdout/stderr, or the
//! pty handed over `--console-socket`) and a process's stdio streams in the guest.
//!
//! Each direction is a thread doing blocking copies: the host fds can be anything a caller
//! passes (pipes, files, /dev/null, a terminal), and regular files cannot be polled.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use husk_protocol::agent::StdioStreams;
use husk_protocol::client::Target;
use nix::sys::termios::{SetArg, Termios, cfmakeraw, tcgetattr, tcsetattr};

/// Stream ids of a process: `<prefix>-stdin` ... or `<prefix>-tty`.
pub fn stream_ids(prefix: &str, terminal: bool) -> StdioStreams {
    let mut s = StdioStreams::new();
    if terminal {
        s.terminal = format!("{prefix}-tty");
    } else {
        s.stdin = format!("{prefix}-stdin");
        s.stdout = format!("{prefix}-stdout");
        s.stderr = format!("{prefix}-stderr");
    }
    s
}

/// Where a terminal's host end is.
pub enum TerminalHost {
    /// The slave of a pty whose master went to the caller over the console socket.
    PtySlave(OwnedFd),
    /// Our own stdin/stdout (a foreground `run -t` or `exec -t`).
    OwnStdio,
}

/// Running relays.
pub struct Relay {
    done: mpsc::Receiver<()>,
    outputs: usize,
    _raw: Option<RawModeGuard>,
    /// The fd whose window size the guest terminal follows.
    pub winsize_fd: Option<RawFd>,
    // Keeps the pty slave open while relays run.
    _slave: Option<OwnedFd>,
}

impl Relay {
    /// Waits until every output stream reached end-of-file (the process and whatever
    /// inherited its stdio closed them), at most `timeout`. Returns whether all did.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for _ in 0..self.outputs {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                return false;
            }
        }
        true
    }
}

fn dup_file(fd: impl AsFd, what: &str) -> Result<File> {
    let owned = nix::unistd::dup(fd).with_context(|| format!("duplicating {what}"))?;
    Ok(File::from(owned))
}

async fn attach(target: &Target, id: &str) -> Result<UnixStream> {
    let stream = husk_protocol::stdio::attach(target, id)
        .await
        .with_context(|| format!("attaching stdio stream {id}"))?;
    let std = stream.into_std().context("converting the stdio stream")?;
    std.set_nonblocking(false)
        .context("making the stdio stream blocking")?;
    Ok(std)
}

/// Bytes moved per read/write of a relay.
const RELAY_BUF: usize = 64 * 1024;

/// Copies `from` to `to` until end-of-file, through a buffer.
///
/// Not `io::copy`: on Linux it uses splice(2) when either side is a pipe, and a splice
/// from a socket into a pipe holds the pipe's lock while it waits for socket data. The
/// pipe's reader (conmon, or anything reading `husk create`'s stdout) then blocks on that
/// lock and cannot read the bytes already moved until more data or end-of-file arrives:
/// a container's early output would show up only when it exits.
fn copy_through_buffer(from: &mut impl Read, to: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; RELAY_BUF];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

fn spawn_copy<W: Write + Send + 'static>(
    name: &str,
    mut from: impl Read + Send + 'static,
    mut to: W,
    on_eof: impl FnOnce(&mut W) + Send + 'static,
    done: Option<mpsc::Sender<()>>,
) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("relay-{name}"))
        .spawn(move || {
            let result = copy_through_buffer(&mut from, &mut to);
            let _ = to.flush();
            if let Err(e) = result {
                tracing::debug!("stdio relay ended: {e}");
            }
            on_eof(&mut to);
            if let Some(done) = done {
                let _ = done.send(());
            }
        })
        .context("starting a relay thread")?;
    Ok(())
}

/// Attaches the streams named in `ids` and relays them to the host side.
pub async fn start(
    target: &Target,
    ids: &StdioStreams,
    terminal: Option<TerminalHost>,
) -> Result<Relay> {
    let (tx, done) = mpsc::channel();
    let mut outputs = 0;
    let mut raw = None;
    let mut winsize_fd = None;
    let mut slave_keep = None;
    match terminal {
        None => {
            if !ids.stdin.is_empty() {
                let stream = attach(target, &ids.stdin).await?;
                let input = dup_file(io::stdin(), "stdin")?;
                spawn_copy(
                    "stdin",
                    input,
                    stream,
                    |s: &mut UnixStream| {
                        // The process sees end-of-file when our stdin ends.
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    },
                    None,
                )?;
            }
            for (id, fd, name) in [(&ids.stdout, 1, "stdout"), (&ids.stderr, 2, "stderr")] {
                if id.is_empty() {
                    continue;
                }
                let stream = attach(target, id).await?;
                let out = if fd == 1 {
                    dup_file(io::stdout(), name)?
                } else {
                    dup_file(io::stderr(), name)?
                };
                spawn_copy(name, stream, out, |_| {}, Some(tx.clone()))?;
                outputs += 1;
            }
        }
        Some(host) => {
            let stream = attach(target, &ids.terminal).await?;
            let back = stream.try_clone().context("cloning the terminal stream")?;
            let (input, output) = match host {
                TerminalHost::PtySlave(slave) => {
                    winsize_fd = Some(slave.as_raw_fd());
                    let i = dup_file(&slave, "pty")?;
                    let o = dup_file(&slave, "pty")?;
                    slave_keep = Some(slave);
                    (i, o)
                }
                TerminalHost::OwnStdio => {
                    let stdin = io::stdin();
                    if nix::unistd::isatty(stdin.as_fd()).unwrap_or(false) {
                        raw = RawModeGuard::new(stdin.as_raw_fd());
                        winsize_fd = Some(stdin.as_raw_fd());
                    }
                    (dup_file(stdin, "stdin")?, dup_file(io::stdout(), "stdout")?)
                }
            };
            // Input ending (e.g. stdin is /dev/null) must not hang up the terminal.
            spawn_copy("tty-in", input, stream, |_| {}, None)?;
            spawn_copy("tty-out", back, output, |_| {}, Some(tx.clone()))?;
            outputs += 1;
        }
    }
    Ok(Relay {
        done,
        outputs,
        _raw: raw,
        winsize_fd,
        _slave: slave_keep,
    })
}

/// Puts a terminal in raw mode and restores it on drop.
pub struct RawModeGuard {
    fd: RawFd,
    saved: Termios,
}

impl RawModeGuard {
    pub fn new(fd: RawFd) -> Option<Self> {
        // SAFETY: fd is our stdin, open for the life of the process.
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let saved = tcgetattr(bfd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(bfd, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { fd, saved })
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        // SAFETY: as in new().
        let bfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        let _ = tcsetattr(bfd, SetArg::TCSANOW, &self.saved);
    }
}

/// The window size (rows, cols) of terminal `fd`.
pub fn winsize(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay from a socket into a pipe (conmon's stdout for `husk create`) hands each
    /// chunk to the pipe's reader while the socket stays open, not only at end-of-file.
    #[test]
    fn output_reaches_a_pipe_reader_before_end_of_file() {
        let (mut guest, host) = UnixStream::pair().unwrap();
        let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        spawn_copy("test-out", host, File::from(pipe_w), |_| {}, Some(done_tx)).unwrap();
        let (got_tx, got_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut pipe = File::from(pipe_r);
            let mut buf = [0u8; 64];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if got_tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });

        guest.write_all(b"early-line\n").unwrap();
        let early = got_rx.recv_timeout(Duration::from_secs(5));
        // End the stream either way, so a relay that holds the bytes lets the reader go.
        guest.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(
            early.as_deref(),
            Ok(&b"early-line\n"[..]),
            "the pipe's reader got the line while the stream was still open"
        );
        done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
