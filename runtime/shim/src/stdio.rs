//! A process's stdio: containerd's FIFOs (paths in `Create`/`Exec`) joined to the agent's
//! raw vsock streams (`husk_protocol::stdio`, guest port 1025) by plain byte copies (no RPC
//! per chunk), one task per direction.
//!
//! The stdin FIFO is opened non-blocking, as runc's shim does: the open succeeds at once,
//! so whoever writes stdin (ctr, the CRI plugin) never waits for us, and on Linux a FIFO
//! reports end-of-file only after a writer has come and gone. Output FIFOs already have
//! their reader (containerd opens it before `Create`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use husk_protocol::agent::StdioStreams;
use husk_protocol::client::Target;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

/// The FIFO paths containerd gave for a process (empty: none).
#[derive(Debug, Clone, Default)]
pub struct IoPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Stream ids for a process: unguessable, because any client of the VM's socket may
/// attach a stream id it knows.
pub fn stream_ids(io: &IoPaths) -> StdioStreams {
    let tag = random_tag();
    let id = |name: &str, path: &str| {
        if path.is_empty() {
            String::new()
        } else {
            format!("{tag}-{name}")
        }
    };
    let mut s = StdioStreams::new();
    s.stdin = id("stdin", &io.stdin);
    if io.terminal {
        // One stream for the pty; the stdin id only serves CloseStdin.
        s.terminal = format!("{tag}-tty");
    } else {
        s.stdout = id("stdout", &io.stdout);
        s.stderr = id("stderr", &io.stderr);
    }
    s
}

/// Running relays of one process.
#[derive(Default)]
pub struct Relays {
    outputs: Vec<oneshot::Receiver<()>>,
}

impl Relays {
    /// Waits until every output reached end-of-file (the process and whatever inherited
    /// its stdio closed it), at most `timeout`. Returns whether all did.
    pub async fn drained(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        for rx in self.outputs {
            let left = deadline.saturating_duration_since(Instant::now());
            if !matches!(tokio::time::timeout(left, rx).await, Ok(Ok(()))) {
                return false;
            }
        }
        true
    }
}

/// Attaches the process's streams and starts copying between them and the FIFOs.
pub async fn start(target: &Target, io: &IoPaths, ids: &StdioStreams) -> Result<Relays> {
    let mut relays = Relays::default();
    if io.terminal {
        let (from_guest, to_guest) = attach(target, &ids.terminal).await?.into_split();
        if !io.stdin.is_empty() {
            // A terminal's input is never "closed" by end-of-file: CloseIO does that.
            copy_in(open_input(&io.stdin)?, to_guest, false);
        }
        if !io.stdout.is_empty() {
            relays.outputs.push(copy_out(io.stdout.clone(), from_guest));
        }
        return Ok(relays);
    }
    if !ids.stdin.is_empty() {
        let stream = attach(target, &ids.stdin).await?;
        copy_in(open_input(&io.stdin)?, stream, true);
    }
    for (id, path) in [(&ids.stdout, &io.stdout), (&ids.stderr, &io.stderr)] {
        if !id.is_empty() {
            let stream = attach(target, id).await?;
            relays.outputs.push(copy_out(path.clone(), stream));
        }
    }
    Ok(relays)
}

async fn attach(target: &Target, id: &str) -> Result<UnixStream> {
    husk_protocol::stdio::attach(target, id)
        .await
        .with_context(|| format!("attaching stdio stream {id}"))
}

fn open_input(fifo: &str) -> Result<pipe::Receiver> {
    pipe::OpenOptions::new()
        .open_receiver(fifo)
        .with_context(|| format!("opening stdin FIFO {fifo}"))
}

/// An output FIFO; waits for its reader if there is none yet (non-blocking opens for
/// writing fail with ENXIO then).
async fn open_output(fifo: &str) -> Result<pipe::Sender> {
    match pipe::OpenOptions::new().open_sender(fifo) {
        Ok(s) => Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
            let path = Path::new(fifo).to_path_buf();
            let file = tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new().write(true).open(path)
            })
            .await
            .context("waiting for the FIFO's reader")?
            .with_context(|| format!("opening output FIFO {fifo}"))?;
            pipe::Sender::from_file(file).with_context(|| format!("output FIFO {fifo}"))
        }
        Err(e) => Err(e).with_context(|| format!("opening output FIFO {fifo}")),
    }
}

/// FIFO → guest. `close_after`: shut our write side down at end-of-input, which gives the
/// process end-of-file on stdin.
fn copy_in<W>(mut input: pipe::Receiver, mut to_guest: W, close_after: bool)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut input, &mut to_guest).await {
            tracing::warn!("stdin relay: {e}");
        }
        if close_after {
            let _ = to_guest.shutdown().await;
        }
    });
}

/// Guest → FIFO; the receiver completes at end-of-file (or on failure).
fn copy_out<R>(fifo: String, mut from_guest: R) -> oneshot::Receiver<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let result = async {
            let mut out = open_output(&fifo).await?;
            tokio::io::copy(&mut from_guest, &mut out)
                .await
                .with_context(|| format!("copying the guest's output to {fifo}"))?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("output relay: {e:#}");
        }
        let _ = tx.send(());
    });
    rx
}

fn random_tag() -> String {
    let mut bytes = [0u8; 12];
    // SAFETY: getrandom writes at most `len` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Not expected on Linux ≥ 3.17; fall back to something unique, if guessable.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        return format!("{:x}-{nanos:x}", std::process::id());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_follow_the_paths() {
        let io = IoPaths {
            stdin: String::new(),
            stdout: "/f/out".into(),
            stderr: "/f/err".into(),
            terminal: false,
        };
        let ids = stream_ids(&io);
        assert!(ids.stdin.is_empty());
        assert!(ids.stdout.ends_with("-stdout") && ids.stderr.ends_with("-stderr"));
        assert!(ids.terminal.is_empty());
        for id in [&ids.stdout, &ids.stderr] {
            assert!(husk_protocol::stdio::is_valid_stream_id(id), "{id}");
        }
        assert_ne!(stream_ids(&io).stdout, ids.stdout, "ids are random");

        let tty = IoPaths {
            stdin: "/f/in".into(),
            stdout: "/f/out".into(),
            stderr: String::new(),
            terminal: true,
        };
        let ids = stream_ids(&tty);
        assert!(ids.terminal.ends_with("-tty") && ids.stdin.ends_with("-stdin"));
        assert!(ids.stdout.is_empty() && ids.stderr.is_empty());
    }
}
