//! Container stdio as raw byte streams, one connection per stream, no RPC per chunk.
//!
//! # Wire protocol
//!
//! The agent listens for stdio connections on **vsock port 1025** in the guest
//! (`husk_protocol::STDIO_VSOCK_PORT`; the host reaches it through the VMM's hybrid-vsock
//! socket with `CONNECT 1025\n`) and, in host test mode, on a Unix socket
//! (`--stdio-listen unix:///path`, default: the `--listen` path plus `.stdio`). In the guest
//! only connections from the host (CID 2) are accepted.
//!
//! 1. The host names each stream of a process in its create/exec request: stdin, stdout,
//!    stderr, or for a terminal one bidirectional stream (plus optionally a stdin id that
//!    only serves CloseStdin). An id is 1 to 128 characters of `[A-Za-z0-9._:-]`; ids should
//!    be unguessable (e.g. contain a random part) since any host-side client of the VMM
//!    socket can attach.
//! 2. The host connects and sends one line: `ATTACH <stream-id>\n`. The line is at most
//!    136 bytes; exactly one space; no `\r`. It must arrive within 10 s.
//! 3. The agent answers `OK\n`, or `ERR <reason>\n` and closes (it shuts down its write
//!    side, then discards up to 1 MiB / 1 s of whatever the host sent after the request,
//!    so that the close does not reset the connection before the host has read the
//!    reason). Reasons: `unknown stream id`, `already attached`, `stdin already closed`,
//!    `terminal input goes through the terminal stream`, `terminal not created yet`,
//!    `malformed request: expected
//!    ATTACH <stream-id>`, `invalid stream id`, `request line too long`. A connection
//!    closed before a complete line gets no answer. At most 64 connections may be in
//!    this handshake at once; more are closed unanswered.
//! 4. Then the connection carries raw bytes: stdin host→guest, stdout/stderr guest→host,
//!    a terminal both ways. Bytes the host sends right after the ATTACH line (before `OK`)
//!    belong to the stream.
//!
//! # Semantics
//!
//! - Each stream attaches once. A stream can be attached before the process starts or
//!   after it has exited; a terminal stream once the create/exec request naming it has
//!   returned (the process opens its pty in the container's devpts during its setup).
//! - Output is not lost before the host attaches: the agent does not read a pipe or pty
//!   until then; the pipe (1 MiB where the kernel allows) and then the process's blocking
//!   write hold it.
//! - End-of-file, both ways. The host shutting down its write side of a stdin stream
//!   closes the process's stdin. The process closing stdout/stderr (or exiting) makes the
//!   agent shut down the stream's write side, so the host reads end-of-file; a terminal
//!   stream ends when the last fd of the pty's slave side closes.
//! - `close_stdin` closes the process's stdin whether or not the stream is attached
//!   (bytes still in flight on an attached stream are dropped: a host that wants them
//!   delivered shuts down its write side instead). For a terminal it writes the
//!   terminal's EOF character (^D), which a canonical-mode reader at the start of a line
//!   reads as end-of-file.
//! - A stream whose process side is gone is closed: a stdin stream when the process has
//!   closed its stdin (the host's writes then fail), an output stream after its last
//!   byte. If the host goes away from an output stream, the agent closes the pipe and
//!   the process gets EPIPE/SIGPIPE on its next write.
//! - A stream that ends is forgotten (a later ATTACH gets `unknown stream id`); one never
//!   attached stays registered, holding its pipe, until [`StdioBroker::release`].

mod fds;
mod line;
mod pump;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use husk_container::Stdio;
use husk_protocol::stdio::is_valid_stream_id;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Semaphore, oneshot};

use self::fds::SharedFd;
use self::line::{LineBuf, LineError};

/// Time a connection has to send its ATTACH line.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections allowed to be in the handshake at once; more are closed at once. Bounds
/// what idle connections can hold.
const MAX_HANDSHAKES: usize = 64;

/// How much a refused connection's unread bytes are drained, and for how long.
const REFUSED_DRAIN_MAX: usize = 1 << 20;
const REFUSED_DRAIN_TIME: Duration = Duration::from_secs(1);

/// Pause after a failed accept (e.g. out of fds) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// The stream ids of one process. `None`: /dev/null for that fd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioRequest {
    pub stdin: Option<String>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    /// A pty: the process opens it in its container and gets the slave as fds 0-2 (see
    /// [`husk_container::Stdio::Terminal`]); the master, handed to
    /// [`StdioBroker::set_terminal`], becomes this stream. `stdout`/`stderr` must then be
    /// `None`; `stdin`, if set, names the terminal's input for
    /// [`StdioBroker::close_stdin`] only.
    pub terminal: Option<String>,
}

/// What the process gets.
#[derive(Debug)]
pub struct PreparedStdio {
    pub stdio: Stdio,
}

/// Where the broker accepts attach connections.
pub enum StdioListener {
    Vsock(tokio_vsock::VsockListener),
    Unix(tokio::net::UnixListener),
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("invalid stream id {0:?}: expected 1 to 128 characters of [A-Za-z0-9._:-]")]
    InvalidStreamId(String),
    #[error("stream id {0:?} is used twice in one request")]
    DuplicateStreamId(String),
    #[error("stream id {0:?} is already registered")]
    StreamIdInUse(String),
    #[error("a terminal process has no separate stdout/stderr streams")]
    TerminalWithOutput,
    #[error("unknown stream id {0:?}")]
    UnknownStream(String),
    #[error("stream {0:?} is not a stdin stream")]
    NotStdin(String),
    #[error("stream {0:?} is not a terminal")]
    NotTerminal(String),
    #[error("the terminal of stream {0:?} does not exist yet (its process is being set up)")]
    TerminalPending(String),
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> StdioError {
    move |source| StdioError::Sys {
        what: what.into(),
        source,
    }
}

/// One registered stream.
enum Entry {
    Stdin {
        token: u64,
        state: StdinState,
    },
    /// stdout or stderr: the pipe's read end until attached.
    Output {
        token: u64,
        pipe: Option<OwnedFd>,
    },
    /// A pty; `master` is `None` until the process has opened it.
    Terminal {
        token: u64,
        master: Option<SharedFd>,
        attached: bool,
        stdin_alias: Option<String>,
    },
    /// The stdin id of a terminal process: CloseStdin goes to the terminal `tty`.
    TerminalStdin {
        tty: String,
    },
}

enum StdinState {
    Pending(OwnedFd),
    /// Firing (or dropping) the sender closes the process's stdin.
    Attached(Option<oneshot::Sender<()>>),
    Closed,
}

/// What a connection got by attaching.
enum Attachment {
    Stdin(OwnedFd, oneshot::Receiver<()>),
    Output(OwnedFd),
    Terminal(SharedFd),
}

/// Why an ATTACH was refused; the text goes back as `ERR <text>\n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Refusal {
    #[error("unknown stream id")]
    Unknown,
    #[error("already attached")]
    AlreadyAttached,
    #[error("stdin already closed")]
    StdinClosed,
    #[error("terminal input goes through the terminal stream")]
    TerminalStdin,
    #[error("terminal not created yet")]
    TerminalPending,
}

struct Inner {
    streams: Mutex<HashMap<String, Entry>>,
    next_token: AtomicU64,
    handshakes: Arc<Semaphore>,
}

/// The agent side of all stdio streams. Cheap to clone.
#[derive(Clone)]
pub struct StdioBroker {
    inner: Arc<Inner>,
}

impl Default for StdioBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl StdioBroker {
    pub fn new() -> Self {
        StdioBroker {
            inner: Arc::new(Inner {
                streams: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(1),
                handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Every change to the map is a single insert/remove/replace: a poisoned map is
        // still consistent.
        self.inner.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn token(&self) -> u64 {
        self.inner.next_token.fetch_add(1, Ordering::Relaxed)
    }

    /// Pipes for one process, or the promise of a pty it opens itself; registers the
    /// agent-side ends under the host's stream ids (the host attaches them later on the
    /// stdio port; a terminal once [`set_terminal`](Self::set_terminal) gave its master);
    /// returns what the process gets. Nothing is registered if this fails.
    pub fn prepare(&self, req: StdioRequest) -> Result<PreparedStdio, StdioError> {
        let ids = [&req.stdin, &req.stdout, &req.stderr, &req.terminal];
        let ids: Vec<&String> = ids.into_iter().flatten().collect();
        for (i, id) in ids.iter().enumerate() {
            if !is_valid_stream_id(id) {
                return Err(StdioError::InvalidStreamId((*id).clone()));
            }
            if ids[..i].contains(id) {
                return Err(StdioError::DuplicateStreamId((*id).clone()));
            }
        }

        let mut entries: Vec<(String, Entry)> = Vec::with_capacity(ids.len());
        let stdio = if let Some(tty) = &req.terminal {
            if req.stdout.is_some() || req.stderr.is_some() {
                return Err(StdioError::TerminalWithOutput);
            }
            entries.push((
                tty.clone(),
                Entry::Terminal {
                    token: self.token(),
                    master: None,
                    attached: false,
                    stdin_alias: req.stdin.clone(),
                },
            ));
            if let Some(stdin) = &req.stdin {
                entries.push((stdin.clone(), Entry::TerminalStdin { tty: tty.clone() }));
            }
            Stdio::Terminal
        } else {
            let stdin = match &req.stdin {
                None => fds::dev_null(false).map_err(sys("opening /dev/null"))?,
                Some(id) => {
                    let (r, w) = fds::pipe().map_err(sys("creating the stdin pipe"))?;
                    fds::set_nonblocking(&w).map_err(sys("setting up the stdin pipe"))?;
                    let state = StdinState::Pending(w);
                    entries.push((
                        id.clone(),
                        Entry::Stdin {
                            token: self.token(),
                            state,
                        },
                    ));
                    r
                }
            };
            let mut output = |id: &Option<String>, what: &str| match id {
                None => fds::dev_null(true).map_err(sys("opening /dev/null")),
                Some(id) => {
                    let (r, w) = fds::pipe().map_err(sys(format!("creating the {what} pipe")))?;
                    fds::set_nonblocking(&r).map_err(sys(format!("setting up the {what} pipe")))?;
                    let pipe = Some(r);
                    entries.push((
                        id.clone(),
                        Entry::Output {
                            token: self.token(),
                            pipe,
                        },
                    ));
                    Ok(w)
                }
            };
            let stdout = output(&req.stdout, "stdout")?;
            let stderr = output(&req.stderr, "stderr")?;
            Stdio::Fds {
                stdin,
                stdout,
                stderr,
            }
        };

        let mut streams = self.lock();
        if let Some((id, _)) = entries.iter().find(|(id, _)| streams.contains_key(id)) {
            return Err(StdioError::StreamIdInUse(id.clone()));
        }
        streams.extend(entries);
        Ok(PreparedStdio { stdio })
    }

    /// Gives terminal stream `tty_stream_id` the pty master its process opened. Fails,
    /// closing `master`, if the stream is gone (released meanwhile) or already has one.
    pub fn set_terminal(&self, tty_stream_id: &str, master: OwnedFd) -> Result<(), StdioError> {
        fds::set_nonblocking(&master).map_err(sys("setting up the terminal"))?;
        let mut streams = self.lock();
        match streams.get_mut(tty_stream_id) {
            Some(Entry::Terminal { master: slot, .. }) if slot.is_none() => {
                *slot = Some(SharedFd(Arc::new(master)));
                Ok(())
            }
            Some(Entry::Terminal { .. }) => {
                Err(StdioError::StreamIdInUse(tty_stream_id.to_owned()))
            }
            Some(_) => Err(StdioError::NotTerminal(tty_stream_id.to_owned())),
            None => Err(StdioError::UnknownStream(tty_stream_id.to_owned())),
        }
    }

    /// Closes the process's stdin: at once if the stream is not attached (a later ATTACH
    /// is refused), else by ending the attached stream. For a terminal (its stream id or
    /// its stdin id), writes the terminal's EOF character. Idempotent while the stream is
    /// registered.
    pub fn close_stdin(&self, stream_id: &str) -> Result<(), StdioError> {
        let mut streams = self.lock();
        let tty_id = match streams.get_mut(stream_id) {
            None => return Err(StdioError::UnknownStream(stream_id.to_owned())),
            Some(Entry::Output { .. }) => return Err(StdioError::NotStdin(stream_id.to_owned())),
            Some(Entry::Stdin { state, .. }) => {
                match state {
                    StdinState::Attached(close) => {
                        if let Some(close) = close.take() {
                            // The connection may have ended already: nothing left to close.
                            let _ = close.send(());
                        }
                    }
                    StdinState::Pending(_) | StdinState::Closed => *state = StdinState::Closed,
                }
                return Ok(());
            }
            Some(Entry::Terminal { .. }) => stream_id.to_owned(),
            Some(Entry::TerminalStdin { tty }) => tty.clone(),
        };
        let Some(Entry::Terminal { master, .. }) = streams.get(&tty_id) else {
            return Err(StdioError::UnknownStream(tty_id));
        };
        let Some(master) = master else {
            return Err(StdioError::TerminalPending(tty_id));
        };
        fds::send_terminal_eof(&master.0).map_err(sys(format!(
            "writing end-of-file to the terminal of stream {tty_id:?}"
        )))
    }

    /// Sets the window size of terminal stream `tty_stream_id`.
    pub fn resize(&self, tty_stream_id: &str, rows: u16, cols: u16) -> Result<(), StdioError> {
        let streams = self.lock();
        match streams.get(tty_stream_id) {
            None => Err(StdioError::UnknownStream(tty_stream_id.to_owned())),
            Some(Entry::Terminal {
                master: Some(master),
                ..
            }) => fds::set_window_size(&master.0, rows, cols).map_err(sys(format!(
                "setting the window size of terminal stream {tty_stream_id:?}"
            ))),
            Some(Entry::Terminal { master: None, .. }) => {
                Err(StdioError::TerminalPending(tty_stream_id.to_owned()))
            }
            Some(_) => Err(StdioError::NotTerminal(tty_stream_id.to_owned())),
        }
    }

    /// Forgets a stream (and a terminal's stdin id with its terminal), closing the
    /// agent's end if it was never attached; an attached stdin stream is closed, other
    /// attached streams run until their process side ends. For when a process is deleted
    /// or could not be started. Unknown ids are ignored.
    pub fn release(&self, stream_id: &str) {
        let mut streams = self.lock();
        match streams.remove(stream_id) {
            Some(Entry::Terminal {
                stdin_alias: Some(alias),
                ..
            }) => {
                streams.remove(&alias);
            }
            Some(Entry::TerminalStdin { tty }) => {
                // Keep the terminal; only drop the alias from it.
                if let Some(Entry::Terminal { stdin_alias, .. }) = streams.get_mut(&tty) {
                    *stdin_alias = None;
                }
            }
            _ => {}
        }
    }

    /// Takes the agent's end of `id` for a connection.
    fn attach(&self, id: &str) -> Result<(u64, Attachment), Refusal> {
        let mut streams = self.lock();
        match streams.get_mut(id) {
            None => Err(Refusal::Unknown),
            Some(Entry::Stdin { token, state }) => {
                match std::mem::replace(state, StdinState::Closed) {
                    StdinState::Pending(pipe) => {
                        let (tx, rx) = oneshot::channel();
                        *state = StdinState::Attached(Some(tx));
                        Ok((*token, Attachment::Stdin(pipe, rx)))
                    }
                    attached @ StdinState::Attached(_) => {
                        *state = attached;
                        Err(Refusal::AlreadyAttached)
                    }
                    StdinState::Closed => Err(Refusal::StdinClosed),
                }
            }
            Some(Entry::Output { token, pipe }) => match pipe.take() {
                Some(pipe) => Ok((*token, Attachment::Output(pipe))),
                None => Err(Refusal::AlreadyAttached),
            },
            Some(Entry::Terminal {
                token,
                master,
                attached,
                ..
            }) => {
                if *attached {
                    return Err(Refusal::AlreadyAttached);
                }
                let Some(master) = master else {
                    return Err(Refusal::TerminalPending);
                };
                *attached = true;
                Ok((*token, Attachment::Terminal(master.clone())))
            }
            Some(Entry::TerminalStdin { .. }) => Err(Refusal::TerminalStdin),
        }
    }

    /// A connection's stream ended: forget it, unless the id was released and reused.
    fn finish(&self, id: &str, done: u64) {
        let mut streams = self.lock();
        let token = match streams.get(id) {
            Some(Entry::Stdin { token, .. })
            | Some(Entry::Output { token, .. })
            | Some(Entry::Terminal { token, .. }) => *token,
            _ => return,
        };
        if token == done
            && let Some(Entry::Terminal {
                stdin_alias: Some(alias),
                ..
            }) = streams.remove(id)
        {
            streams.remove(&alias);
        }
    }

    /// Accept loop: serves attach requests on `listener` until the agent stops. Each
    /// connection runs as a task of its own. Returns only if accepting fails for good.
    pub async fn serve(&self, listener: StdioListener) -> io::Result<()> {
        loop {
            let conn = match accept(&listener).await {
                Ok(Some(conn)) => conn,
                Ok(None) => continue,
                Err(e) if is_fatal_accept_error(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!("stdio: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = self.inner.handshakes.clone().try_acquire_owned() else {
                tracing::warn!("stdio: too many connections in the handshake, closing one");
                continue;
            };
            let broker = self.clone();
            tokio::spawn(async move { broker.connection(conn, permit).await });
        }
    }

    async fn connection(self, conn: OwnedFd, permit: tokio::sync::OwnedSemaphorePermit) {
        let socket = match fds::set_nonblocking(&conn).and_then(|()| fds::register(conn)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("stdio: registering a connection: {e}");
                return;
            }
        };
        let id = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_request(&socket)).await {
            Ok(Ok(id)) => id,
            Ok(Err(RequestError::Line(e))) => {
                tracing::debug!("stdio: refused request: {e}");
                if e != LineError::Eof {
                    refuse(&socket, &e.to_string()).await;
                }
                return;
            }
            Ok(Err(RequestError::Io(e))) => {
                tracing::debug!("stdio: reading a request: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("stdio: no request within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        let (token, attachment) = match self.attach(&id) {
            Ok(a) => a,
            Err(refusal) => {
                tracing::debug!(stream = %id, "stdio: attach refused: {refusal}");
                refuse(&socket, &refusal.to_string()).await;
                return;
            }
        };
        drop(permit);
        tracing::debug!(stream = %id, "stdio: attached");
        // If the host has gone already this fails, and so does the pump's first transfer.
        if let Err(e) = reply(&socket, "OK\n").await {
            tracing::debug!(stream = %id, "stdio: replying OK: {e}");
        }
        let registered = |fd| fds::register(fd).map_err(|e| tracing::warn!("stdio: {e}"));
        match attachment {
            Attachment::Stdin(pipe, close) => {
                if let Ok(pipe) = registered(pipe) {
                    pump::input(&socket, pipe, close).await;
                }
            }
            Attachment::Output(pipe) => {
                if let Ok(pipe) = registered(pipe) {
                    pump::output(pipe, &socket).await;
                }
            }
            Attachment::Terminal(master) => match fds::register(master) {
                Ok(master) => pump::terminal(master, &socket).await,
                Err(e) => tracing::warn!("stdio: {e}"),
            },
        }
        tracing::debug!(stream = %id, "stdio: stream ended");
        self.finish(&id, token);
    }
}

/// Accepts one connection; `None` for one that is turned away (not from the host).
async fn accept(listener: &StdioListener) -> io::Result<Option<OwnedFd>> {
    match listener {
        StdioListener::Unix(l) => {
            let (stream, _) = l.accept().await?;
            Ok(Some(stream.into_std()?.into()))
        }
        StdioListener::Vsock(l) => {
            let (stream, peer) = l.accept().await?;
            // Only the host may attach: not a process in this guest (local CID).
            if peer.cid() != tokio_vsock::VMADDR_CID_HOST {
                tracing::warn!("stdio: refused a connection from vsock CID {}", peer.cid());
                return Ok(None);
            }
            Ok(Some(stream.into()))
        }
    }
}

fn is_fatal_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP)
    )
}

/// The stdio address when `--stdio-listen` is not given: next to a `unix://` API socket
/// (its path plus `.stdio`), else vsock port 1025 on any CID.
pub fn default_listen(api_listen: Option<&str>) -> String {
    match api_listen {
        Some(api) if api.starts_with("unix://") => {
            format!("{api}{}", husk_protocol::stdio::HOST_MODE_STDIO_SUFFIX)
        }
        _ => format!("vsock://-1:{}", husk_protocol::STDIO_VSOCK_PORT),
    }
}

/// Binds the stdio listener at `unix:///path` (a stale socket file there is replaced) or
/// `vsock://CID:PORT` (CID -1: any). Must run inside the tokio runtime.
pub fn bind(addr: &str) -> io::Result<StdioListener> {
    let invalid =
        |why: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr:?}: {why}"));
    if let Some(path) = addr.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(invalid("empty socket path"));
        }
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path)?;
        }
        return Ok(StdioListener::Unix(tokio::net::UnixListener::bind(path)?));
    }
    if let Some(rest) = addr.strip_prefix("vsock://") {
        let (cid, port) = rest
            .split_once(':')
            .ok_or_else(|| invalid("expected vsock://CID:PORT"))?;
        let cid = match cid {
            "-1" => tokio_vsock::VMADDR_CID_ANY,
            c => c
                .parse()
                .map_err(|_| invalid("CID must be -1 or a number"))?,
        };
        let port = port.parse().map_err(|_| invalid("port must be a number"))?;
        let addr = tokio_vsock::VsockAddr::new(cid, port);
        return Ok(StdioListener::Vsock(tokio_vsock::VsockListener::bind(
            addr,
        )?));
    }
    Err(invalid("expected unix://PATH or vsock://CID:PORT"))
}

enum RequestError {
    Line(LineError),
    Io(io::Error),
}

/// Reads `ATTACH <id>\n` one byte at a time: stdin bytes may follow the newline.
async fn read_request(socket: &AsyncFd<OwnedFd>) -> Result<String, RequestError> {
    let mut line = LineBuf::default();
    loop {
        let mut byte = [0u8; 1];
        let mut guard = socket.readable().await.map_err(RequestError::Io)?;
        let n = match guard.try_io(|fd| fds::read(fd.get_ref().as_fd(), &mut byte)) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(RequestError::Io(e)),
            Err(_would_block) => continue,
        };
        if n == 0 {
            return Err(RequestError::Line(LineError::Eof));
        }
        if line.push(byte[0]).map_err(RequestError::Line)? {
            return line::parse_attach(line.line())
                .map(str::to_owned)
                .map_err(RequestError::Line);
        }
    }
}

/// Sends `ERR <reason>\n` and ends the connection. The host may have sent stream bytes
/// after its request: they are drained (bounded) before the close, because closing a
/// socket with unread data resets it and the host would lose the reason.
async fn refuse(socket: &AsyncFd<OwnedFd>, reason: &str) {
    if reply(socket, &format!("ERR {reason}\n")).await.is_err() {
        return;
    }
    fds::shutdown(socket.get_ref().as_fd(), nix::sys::socket::Shutdown::Write);
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut left = REFUSED_DRAIN_MAX;
        while left > 0 {
            let Ok(mut guard) = socket.readable().await else {
                return;
            };
            match guard.try_io(|fd| fds::read(fd.get_ref().as_fd(), &mut buf)) {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => left = left.saturating_sub(n),
                Err(_would_block) => {}
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_DRAIN_TIME, drain).await;
}

/// Writes a short reply line.
async fn reply(socket: &AsyncFd<OwnedFd>, text: &str) -> io::Result<()> {
    let mut rest = text.as_bytes();
    while !rest.is_empty() {
        let mut guard = socket.writable().await?;
        match guard.try_io(|fd| fds::write(fd.get_ref().as_fd(), rest)) {
            Ok(Ok(n)) => rest = &rest[n..],
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}
