//! Host side of the stdio streams: attaching to a container process's stdin, stdout,
//! stderr or terminal.
//!
//! Stdio does not travel in RPCs. The host names each stream of a process with an id of its
//! choosing in the create/exec request; the agent keeps the agent-side end of each stream
//! under that id until the host attaches it on the stdio port:
//!
//! 1. connect: through the VMM's hybrid-vsock socket with `CONNECT 1025\n`
//!    ([`crate::STDIO_VSOCK_PORT`]), or to the agent's stdio Unix socket in host test mode;
//! 2. send `ATTACH <stream-id>\n`, where the id is 1 to [`MAX_STREAM_ID_LEN`] characters of
//!    `[A-Za-z0-9._:-]`;
//! 3. read `OK\n`, or `ERR <reason>\n` after which the agent closes the connection;
//! 4. from then on the connection carries the stream's raw bytes: stdin host to guest,
//!    stdout/stderr guest to host, a terminal both ways. Shutting down the host's write
//!    side gives the process end-of-file on stdin; when the process closes its output the
//!    host reads end-of-file.
//!
//! Bytes sent right after the `ATTACH` line (before `OK` arrives) are not lost: the agent
//! reads the line byte by byte and leaves the rest for the stream.
//!
//! [`StdioTarget`] says where the stdio listener is. Behind a VMM it is the same
//! hybrid-vsock socket as the agent API; in host test mode the agent listens on a separate
//! Unix socket, by default the API socket's path plus [`HOST_MODE_STDIO_SUFFIX`].

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::STDIO_VSOCK_PORT;
use crate::client::{HandshakeError, Target, hybrid_vsock_handshake};

/// Longest stream id.
pub const MAX_STREAM_ID_LEN: usize = 128;

/// Longest `ATTACH` line, newline included.
pub const MAX_ATTACH_LINE: usize = "ATTACH ".len() + MAX_STREAM_ID_LEN + 1;

/// Longest reply line accepted from the agent, newline included. The agent's reasons are
/// short fixed phrases.
pub const MAX_REPLY_LINE: usize = 256;

/// In host test mode the agent's stdio socket defaults to the API socket's path plus this.
pub const HOST_MODE_STDIO_SUFFIX: &str = ".stdio";

/// Whether `id` is a valid stream id: 1..=128 characters of `[A-Za-z0-9._:-]`.
pub fn is_valid_stream_id(id: &str) -> bool {
    (1..=MAX_STREAM_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The default stdio socket of an agent in host test mode listening on `api_socket`.
pub fn host_mode_stdio_path(api_socket: &Path) -> PathBuf {
    let mut path = OsString::from(api_socket.as_os_str());
    path.push(HOST_MODE_STDIO_SUFFIX);
    path.into()
}

/// Where the agent's stdio listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdioTarget {
    /// The VMM's hybrid-vsock socket; the stream goes to guest port [`STDIO_VSOCK_PORT`].
    HybridVsock { uds: PathBuf },
    /// The agent's stdio Unix socket (host test mode).
    Unix(PathBuf),
}

impl StdioTarget {
    /// The stdio listener of the agent at `target`: the same VMM socket, or for an agent in
    /// host test mode its default stdio socket (see [`host_mode_stdio_path`]).
    pub fn for_agent(target: &Target) -> Self {
        match target {
            Target::HybridVsock { uds, .. } => StdioTarget::HybridVsock { uds: uds.clone() },
            Target::Unix(path) => StdioTarget::Unix(host_mode_stdio_path(path)),
        }
    }

    /// The Unix socket this target dials.
    pub fn socket_path(&self) -> &Path {
        match self {
            StdioTarget::HybridVsock { uds } => uds,
            StdioTarget::Unix(path) => path,
        }
    }
}

impl From<&Target> for StdioTarget {
    fn from(target: &Target) -> Self {
        StdioTarget::for_agent(target)
    }
}

impl fmt::Display for StdioTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StdioTarget::HybridVsock { uds } => {
                write!(f, "hvsock://{}:{STDIO_VSOCK_PORT}", uds.display())
            }
            StdioTarget::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Why attaching a stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StdioAttachError {
    #[error("invalid stream id {id:?}: expected 1 to 128 characters of [A-Za-z0-9._:-]")]
    InvalidStreamId { id: String },
    #[error("connecting to the stdio listener at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("hybrid vsock handshake with {target} (CONNECT {STDIO_VSOCK_PORT}): {source}")]
    Handshake {
        target: String,
        #[source]
        source: HandshakeError,
    },
    #[error("attaching stream {id:?} at {target}: I/O error: {source}")]
    Io {
        id: String,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("attaching stream {id:?} at {target}: the agent refused: {reason}")]
    Refused {
        id: String,
        target: String,
        reason: String,
    },
    #[error(
        "attaching stream {id:?} at {target}: no answer within {waited:?} (the VM's agent accepted the connection but never replied)"
    )]
    Timeout {
        id: String,
        target: String,
        waited: std::time::Duration,
    },
    #[error("attaching stream {id:?} at {target}: unexpected reply {received:?}")]
    BadReply {
        id: String,
        target: String,
        received: String,
    },
}

/// Attaches stream `stream_id` of the agent at `target` (see [`StdioTarget::for_agent`]
/// for where that is) and returns the connected stream, positioned at the first byte of
/// the stream's data.
pub async fn attach(target: &Target, stream_id: &str) -> Result<UnixStream, StdioAttachError> {
    attach_to(&StdioTarget::for_agent(target), stream_id).await
}

/// How long the handshake and the agent's answer to `ATTACH` may take: the guest is
/// hostile and a host task must not wait on it forever (a slow nested guest answers in
/// well under a second).
pub const ATTACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// [`attach`] with an explicit stdio listener (e.g. an agent started with
/// `--stdio-listen`).
pub async fn attach_to(
    target: &StdioTarget,
    stream_id: &str,
) -> Result<UnixStream, StdioAttachError> {
    attach_within(target, stream_id, ATTACH_TIMEOUT).await
}

/// [`attach_to`], failing with [`StdioAttachError::Timeout`] when the VMM's handshake and
/// the agent's reply take longer than `timeout`.
pub async fn attach_within(
    target: &StdioTarget,
    stream_id: &str,
    timeout: std::time::Duration,
) -> Result<UnixStream, StdioAttachError> {
    match tokio::time::timeout(timeout, attach_unbounded(target, stream_id)).await {
        Ok(r) => r,
        Err(_) => Err(StdioAttachError::Timeout {
            id: stream_id.to_owned(),
            target: target.to_string(),
            waited: timeout,
        }),
    }
}

async fn attach_unbounded(
    target: &StdioTarget,
    stream_id: &str,
) -> Result<UnixStream, StdioAttachError> {
    if !is_valid_stream_id(stream_id) {
        return Err(StdioAttachError::InvalidStreamId {
            id: stream_id.to_owned(),
        });
    }
    let mut stream = UnixStream::connect(target.socket_path())
        .await
        .map_err(|source| StdioAttachError::Connect {
            target: target.to_string(),
            source,
        })?;
    if let StdioTarget::HybridVsock { .. } = target {
        hybrid_vsock_handshake(&mut stream, STDIO_VSOCK_PORT)
            .await
            .map_err(|source| StdioAttachError::Handshake {
                target: target.to_string(),
                source,
            })?;
    }
    let io_err = |source| StdioAttachError::Io {
        id: stream_id.to_owned(),
        target: target.to_string(),
        source,
    };
    stream
        .write_all(format!("ATTACH {stream_id}\n").as_bytes())
        .await
        .map_err(io_err)?;
    let line = read_reply_line(&mut stream).await.map_err(io_err)?;
    match parse_reply(&line) {
        Reply::Ok => Ok(stream),
        Reply::Err(reason) => Err(StdioAttachError::Refused {
            id: stream_id.to_owned(),
            target: target.to_string(),
            reason,
        }),
        Reply::Bad => Err(StdioAttachError::BadReply {
            id: stream_id.to_owned(),
            target: target.to_string(),
            received: String::from_utf8_lossy(&line).into_owned(),
        }),
    }
}

/// Reads one reply line (newline stripped) byte by byte, so that stream data after it
/// stays in the socket. End-of-file or an over-long line is returned as read, for
/// [`parse_reply`] to reject.
async fn read_reply_line(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(16);
    while line.len() < MAX_REPLY_LINE {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 || byte[0] == b'\n' {
            return Ok(line);
        }
        line.push(byte[0]);
    }
    Ok(line)
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok,
    Err(String),
    Bad,
}

fn parse_reply(line: &[u8]) -> Reply {
    match line {
        b"OK" => Reply::Ok,
        _ => match line.strip_prefix(b"ERR ") {
            Some(reason) if !reason.is_empty() && line.len() < MAX_REPLY_LINE => {
                Reply::Err(String::from_utf8_lossy(reason).into_owned())
            }
            _ => Reply::Bad,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn stream_id_validation() {
        for good in [
            "a",
            "ctr-1:stdout",
            "A.b_c-9",
            &"x".repeat(MAX_STREAM_ID_LEN),
        ] {
            assert!(is_valid_stream_id(good), "{good:?} refused");
        }
        for bad in [
            "",
            "a b",
            "a\n",
            "é",
            "a/b",
            &"x".repeat(MAX_STREAM_ID_LEN + 1),
        ] {
            assert!(!is_valid_stream_id(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn reply_parsing() {
        assert_eq!(parse_reply(b"OK"), Reply::Ok);
        assert_eq!(
            parse_reply(b"ERR unknown stream id"),
            Reply::Err("unknown stream id".into())
        );
        for bad in [&b""[..], b"OK ", b"ok", b"ERR ", b"ERR", b"HELLO"] {
            assert_eq!(parse_reply(bad), Reply::Bad, "{bad:?}");
        }
        assert_eq!(parse_reply(&[b'E'; MAX_REPLY_LINE]), Reply::Bad);
    }

    #[test]
    fn targets() {
        let t = StdioTarget::for_agent(&Target::unix("/run/a.sock"));
        assert_eq!(t, StdioTarget::Unix("/run/a.sock.stdio".into()));
        assert_eq!(t.to_string(), "unix:///run/a.sock.stdio");
        let t = StdioTarget::for_agent(&Target::hybrid_vsock("/run/vm.sock"));
        assert_eq!(t.socket_path(), Path::new("/run/vm.sock"));
        assert_eq!(t.to_string(), "hvsock:///run/vm.sock:1025");
    }

    /// A fake VMM + agent: checks the CONNECT and ATTACH lines, replies, then sends data.
    fn fake_agent(
        path: &Path,
        hybrid: bool,
        reply: &'static [u8],
    ) -> std::thread::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream);
            let mut lines = Vec::new();
            let mut line = String::new();
            if hybrid {
                reader.read_line(&mut line).expect("CONNECT line");
                lines.push(std::mem::take(&mut line));
                reader.get_mut().write_all(b"OK 99\n").expect("OK 99");
            }
            reader.read_line(&mut line).expect("ATTACH line");
            lines.push(line);
            let mut stream = reader.into_inner();
            let _ = stream.write_all(reply);
            lines
        })
    }

    #[tokio::test]
    async fn attach_through_hybrid_vsock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.sock");
        let agent = fake_agent(&path, true, b"OK\nstream-bytes");
        let mut stream = attach(&Target::hybrid_vsock(&path), "c1:stdout")
            .await
            .expect("attached");
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.expect("read");
        assert_eq!(rest, "stream-bytes");
        let lines = agent.join().expect("fake agent");
        assert_eq!(lines, ["CONNECT 1025\n", "ATTACH c1:stdout\n"]);
    }

    /// A guest that accepts the stream but never answers ATTACH cannot hold the host.
    #[tokio::test]
    async fn attach_gives_up_on_an_agent_that_never_replies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let silent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).expect("CONNECT line");
            reader.get_mut().write_all(b"OK 99\n").expect("OK 99");
            line.clear();
            reader.read_line(&mut line).expect("ATTACH line");
            // Holds the connection open without a reply.
            std::thread::sleep(std::time::Duration::from_secs(2));
        });
        let target = StdioTarget::for_agent(&Target::hybrid_vsock(&path));
        let err = attach_within(&target, "c1:stdout", std::time::Duration::from_millis(300))
            .await
            .expect_err("no reply is a timeout");
        assert!(matches!(err, StdioAttachError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("never replied"), "{err}");
        silent.join().expect("silent agent");
    }

    #[tokio::test]
    async fn attach_host_mode_uses_stdio_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = dir.path().join("agent.sock");
        let agent = fake_agent(&host_mode_stdio_path(&api), false, b"OK\n");
        attach(&Target::unix(&api), "s").await.expect("attached");
        assert_eq!(agent.join().expect("fake agent"), ["ATTACH s\n"]);
    }

    #[tokio::test]
    async fn attach_reports_refusal_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s1");
        let agent = fake_agent(&path, false, b"ERR unknown stream id\n");
        let err = attach_to(&StdioTarget::Unix(path.clone()), "nope")
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, StdioAttachError::Refused { reason, .. } if reason == "unknown stream id"),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"nope\""), "{err}");
        agent.join().expect("fake agent");

        let path = dir.path().join("s2");
        let agent = fake_agent(&path, false, b"HELLO\n");
        let err = attach_to(&StdioTarget::Unix(path), "x")
            .await
            .expect_err("garbage");
        assert!(matches!(err, StdioAttachError::BadReply { .. }), "{err:?}");
        agent.join().expect("fake agent");
    }

    #[tokio::test]
    async fn attach_refuses_bad_id_without_connecting() {
        let err = attach_to(&StdioTarget::Unix("/nonexistent".into()), "a b")
            .await
            .expect_err("bad id");
        assert!(
            matches!(err, StdioAttachError::InvalidStreamId { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn reply_reader_stops_at_newline() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("pair");
        b.write_all(b"OK\nDATA").expect("write");
        drop(b.shutdown(std::net::Shutdown::Write));
        rt.block_on(async {
            a.set_nonblocking(true).expect("nonblocking");
            let mut a = UnixStream::from_std(a).expect("tokio stream");
            assert_eq!(read_reply_line(&mut a).await.expect("line"), b"OK");
            let mut rest = Vec::new();
            a.read_to_end(&mut rest).await.expect("rest");
            assert_eq!(rest, b"DATA");
        });
    }
}
