//! The broker with real processes (`/bin/sh`) and a host on the other end of a Unix
//! socket. The agent's reaper is not running here, so children are started with
//! `std::process::Command`; they are never waited for (a reaper test in this process may
//! collect them), every check goes through their streams.

use std::os::fd::OwnedFd;
use std::time::Duration;

use husk_protocol::stdio::{StdioAttachError, StdioTarget, attach_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;

const DEADLINE: Duration = Duration::from_secs(20);

struct Harness {
    broker: StdioBroker,
    target: StdioTarget,
    _dir: tempfile::TempDir,
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stdio.sock");
    let listener = bind(&format!("unix://{}", path.display())).expect("bind");
    let broker = StdioBroker::new();
    let serving = broker.clone();
    tokio::spawn(async move { serving.serve(listener).await });
    Harness {
        broker,
        target: StdioTarget::Unix(path),
        _dir: dir,
    }
}

impl Harness {
    async fn attach(&self, id: &str) -> UnixStream {
        attach_to(&self.target, id)
            .await
            .unwrap_or_else(|e| panic!("attach {id}: {e}"))
    }

    async fn refused(&self, id: &str) -> String {
        match attach_to(&self.target, id).await {
            Err(StdioAttachError::Refused { reason, .. }) => reason,
            other => panic!("attach {id}: expected a refusal, got {other:?}"),
        }
    }

    /// Sends a raw request line and returns the whole reply.
    async fn raw(&self, request: &[u8]) -> String {
        let mut s = UnixStream::connect(self.target.socket_path())
            .await
            .expect("connect");
        // The agent may close on a bad line before reading all of it.
        let _ = s.write_all(request).await;
        let _ = s.shutdown().await;
        String::from_utf8_lossy(&read_all(&mut s).await).into_owned()
    }
}

fn ids(stdin: Option<&str>, stdout: Option<&str>, stderr: Option<&str>) -> StdioRequest {
    StdioRequest {
        stdin: stdin.map(Into::into),
        stdout: stdout.map(Into::into),
        stderr: stderr.map(Into::into),
        terminal: None,
    }
}

/// Starts `sh -c script` on `stdio`; the parent's copies of the process's fds are closed
/// when this returns (the Command owning them is dropped).
fn spawn(script: &str, stdio: Stdio) {
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c").arg(script);
    match stdio {
        Stdio::Fds {
            stdin,
            stdout,
            stderr,
        } => cmd.stdin(stdin).stdout(stdout).stderr(stderr),
        Stdio::Terminal => panic!("a terminal process: use spawn_on_terminal"),
    };
    // Not waited for: see the module comment. Dropping a Child neither waits nor kills.
    drop(cmd.spawn().expect("spawn /bin/sh"));
}

/// Stands in for a container process that opened a pty (`prepared` is what the broker
/// gave it): hands the master to the broker as `tty`'s stream and runs `sh -c script`
/// on the slave.
fn spawn_on_terminal(broker: &StdioBroker, tty: &str, prepared: Stdio, script: &str) {
    assert!(matches!(prepared, Stdio::Terminal), "{prepared:?}");
    let (master, slave) = fds::pty().expect("pty");
    broker.set_terminal(tty, master).expect("set_terminal");
    let dup = |fd: &OwnedFd| fd.try_clone().expect("dup");
    spawn(
        script,
        Stdio::Fds {
            stdin: dup(&slave),
            stdout: dup(&slave),
            stderr: slave,
        },
    );
}

async fn read_all(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("stream did not end in time")
        .expect("read");
    out
}

/// Reads until the output so far ends with `end`.
async fn read_until(s: &mut UnixStream, end: &str) -> String {
    let mut out = Vec::new();
    let read = async {
        while !out.ends_with(end.as_bytes()) {
            let mut byte = [0u8; 1];
            if s.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            out.push(byte[0]);
        }
    };
    tokio::time::timeout(DEADLINE, read)
        .await
        .unwrap_or_else(|_| panic!("no {end:?} in time"));
    String::from_utf8(out).expect("utf-8 output")
}

async fn read_string(s: &mut UnixStream) -> String {
    String::from_utf8(read_all(s).await).expect("utf-8 output")
}

#[tokio::test]
async fn pipes_carry_output_and_stdin_with_eof_both_ways() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(Some("p1-in"), Some("p1-out"), Some("p1-err")))
        .expect("prepare");
    spawn("echo out; echo err >&2; cat", p.stdio);
    let mut out = h.attach("p1-out").await;
    let mut err = h.attach("p1-err").await;
    let mut input = h.attach("p1-in").await;
    input
        .write_all(b"hello stdin\n")
        .await
        .expect("write stdin");
    // cat ends (and stdout reaches EOF) only once its stdin does.
    input.shutdown().await.expect("shutdown stdin");
    assert_eq!(read_string(&mut out).await, "out\nhello stdin\n");
    assert_eq!(read_string(&mut err).await, "err\n");
    // Finished streams are forgotten.
    assert_eq!(h.refused("p1-out").await, "unknown stream id");
}

#[tokio::test]
async fn stdin_bytes_sent_with_the_attach_line_are_kept() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(Some("p2-in"), Some("p2-out"), None))
        .expect("prepare");
    spawn("cat", p.stdio);
    let mut input = UnixStream::connect(h.target.socket_path())
        .await
        .expect("connect");
    input
        .write_all(b"ATTACH p2-in\npipelined")
        .await
        .expect("write");
    input.shutdown().await.expect("shutdown");
    let mut out = h.attach("p2-out").await;
    assert_eq!(read_string(&mut out).await, "pipelined");
    assert_eq!(read_string(&mut input).await, "OK\n");
}

#[tokio::test]
async fn output_written_before_attach_is_not_lost() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(None, Some("p3-out"), Some("p3-err")))
        .expect("prepare");
    // 100 KB on stderr (fits in the pipe: the process exits before the attach) and ~3 MB
    // on stdout (more than the pipe holds: the process blocks until the host reads).
    spawn(
        "head -c 100000 /dev/zero | tr '\\0' e >&2; seq 1 400000",
        p.stdio,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut err = h.attach("p3-err").await;
    let mut out = h.attach("p3-out").await;
    // Both at once: stderr ends only when seq, which holds it too, has written stdout.
    let (err, out) = tokio::join!(read_all(&mut err), read_string(&mut out));
    assert_eq!(err, vec![b'e'; 100_000]);
    let expected: String = (1..=400_000).map(|i| format!("{i}\n")).collect();
    assert!(expected.len() > 2 * fds::PIPE_SIZE as usize);
    assert!(out == expected, "stdout differs");
}

#[tokio::test]
async fn close_stdin_before_attach_gives_eof_and_refuses_attach() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(Some("p4-in"), Some("p4-out"), None))
        .expect("prepare");
    spawn("cat; echo done", p.stdio);
    h.broker.close_stdin("p4-in").expect("close_stdin");
    h.broker
        .close_stdin("p4-in")
        .expect("close_stdin is idempotent");
    let mut out = h.attach("p4-out").await;
    assert_eq!(read_string(&mut out).await, "done\n");
    assert_eq!(h.refused("p4-in").await, "stdin already closed");
    h.broker.release("p4-in");
    assert_eq!(h.refused("p4-in").await, "unknown stream id");
}

#[tokio::test]
async fn close_stdin_ends_an_attached_stream() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(Some("p5-in"), Some("p5-out"), None))
        .expect("prepare");
    spawn("cat; echo done", p.stdio);
    let mut input = h.attach("p5-in").await;
    let mut out = h.attach("p5-out").await;
    assert!(matches!(
        h.broker.close_stdin("p5-out"),
        Err(StdioError::NotStdin(_))
    ));
    input.write_all(b"x\n").await.expect("write");
    // Let the byte reach cat before closing: close_stdin drops bytes in flight.
    let mut first = [0u8; 2];
    out.read_exact(&mut first).await.expect("echo");
    assert_eq!(&first, b"x\n");
    h.broker.close_stdin("p5-in").expect("close_stdin");
    assert_eq!(read_string(&mut out).await, "done\n");
    // The agent closed its side of the stdin stream too.
    assert_eq!(read_all(&mut input).await, b"");
}

#[tokio::test]
async fn stdin_stream_closes_when_the_process_closes_stdin() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(Some("p6-in"), None, None))
        .expect("prepare");
    spawn("exec 0<&-; sleep 5", p.stdio);
    let mut input = h.attach("p6-in").await;
    // Nothing written: the agent notices the closed pipe on its own.
    assert_eq!(read_all(&mut input).await, b"");
}

#[tokio::test]
async fn streams_left_out_get_dev_null() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(None, Some("p7-out"), None))
        .expect("prepare");
    spawn("cat; echo cat=$?; echo hidden >&2; echo end", p.stdio);
    let mut out = h.attach("p7-out").await;
    assert_eq!(read_string(&mut out).await, "cat=0\nend\n");
}

#[tokio::test]
async fn attach_refusals() {
    let h = harness();
    let p = h
        .broker
        .prepare(ids(None, Some("p8-out"), None))
        .expect("prepare");
    spawn("sleep 1", p.stdio);
    let _first = h.attach("p8-out").await;
    assert_eq!(h.refused("p8-out").await, "already attached");
    assert_eq!(h.refused("nope").await, "unknown stream id");
    let malformed = "ERR malformed request: expected ATTACH <stream-id>\n";
    assert_eq!(h.raw(b"HELLO\n").await, malformed);
    assert_eq!(h.raw(b"ATTACH  p8-out\n").await, "ERR invalid stream id\n");
    assert_eq!(h.raw(b"ATTACH p8/out\n").await, "ERR invalid stream id\n");
    assert_eq!(h.raw(&[b'A'; 4096]).await, "ERR request line too long\n");
    assert_eq!(h.raw(b"ATTACH p8-").await, "");
}

#[tokio::test]
async fn prepare_validates_ids() {
    let b = StdioBroker::new();
    let err = |r: Result<PreparedStdio, StdioError>| r.expect_err("refused");
    assert!(matches!(
        err(b.prepare(ids(Some("a b"), None, None))),
        StdioError::InvalidStreamId(_)
    ));
    assert!(matches!(
        err(b.prepare(ids(None, Some("x"), Some("x")))),
        StdioError::DuplicateStreamId(_)
    ));
    let mut tty = ids(None, Some("o"), None);
    tty.terminal = Some("t".into());
    assert!(matches!(
        err(b.prepare(tty)),
        StdioError::TerminalWithOutput
    ));
    b.prepare(ids(None, Some("taken"), None)).expect("first");
    assert!(matches!(
        err(b.prepare(ids(Some("fresh"), Some("taken"), None))),
        StdioError::StreamIdInUse(_)
    ));
    // Nothing of the failed request was registered, and a released id is free again.
    b.prepare(ids(Some("fresh"), None, None))
        .expect("fresh is free");
    b.release("taken");
    b.prepare(ids(None, Some("taken"), None))
        .expect("taken is free again");
    assert!(matches!(
        b.resize("taken", 1, 1),
        Err(StdioError::NotTerminal(_))
    ));
    assert!(matches!(
        b.close_stdin("missing"),
        Err(StdioError::UnknownStream(_))
    ));
}

fn terminal(tty: &str, stdin: Option<&str>) -> StdioRequest {
    StdioRequest {
        stdin: stdin.map(Into::into),
        terminal: Some(tty.into()),
        ..StdioRequest::default()
    }
}

#[tokio::test]
async fn terminal_stream_is_a_pty_with_window_size() {
    let h = harness();
    let p = h.broker.prepare(terminal("t1", None)).expect("prepare");
    // Until its process has opened the pty, the stream exists but has no terminal.
    assert_eq!(h.refused("t1").await, "terminal not created yet");
    assert!(matches!(
        h.broker.resize("t1", 40, 100),
        Err(StdioError::TerminalPending(_))
    ));
    spawn_on_terminal(
        &h.broker,
        "t1",
        p.stdio,
        "tty; stty size; read x; stty size",
    );
    h.broker
        .resize("t1", 40, 100)
        .expect("resize before attach");
    let mut t = h.attach("t1").await;
    let first = read_until(&mut t, "40 100\r\n").await;
    assert!(first.contains("/dev/pts/"), "{first:?}");
    h.broker
        .resize("t1", 30, 90)
        .expect("resize while attached");
    t.write_all(b"go\n").await.expect("write");
    let rest = read_string(&mut t).await;
    // The pty echoes the input, then the shell prints the new size.
    assert_eq!(rest, "go\r\n30 90\r\n");
}

#[tokio::test]
async fn terminal_close_stdin_sends_eof_through_its_stdin_id() {
    let h = harness();
    let p = h
        .broker
        .prepare(terminal("t2", Some("t2-in")))
        .expect("prepare");
    spawn_on_terminal(&h.broker, "t2", p.stdio, "cat; echo bye");
    let mut t = h.attach("t2").await;
    assert_eq!(
        h.refused("t2-in").await,
        "terminal input goes through the terminal stream"
    );
    h.broker.close_stdin("t2-in").expect("close_stdin");
    let out = read_string(&mut t).await;
    assert!(out.ends_with("bye\r\n"), "{out:?}");
    // The terminal and its stdin id are both forgotten.
    assert!(matches!(
        h.broker.close_stdin("t2-in"),
        Err(StdioError::UnknownStream(_))
    ));
}

#[tokio::test]
async fn terminal_output_before_attach_is_not_lost() {
    let h = harness();
    let p = h.broker.prepare(terminal("t3", None)).expect("prepare");
    spawn_on_terminal(&h.broker, "t3", p.stdio, "echo early");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut t = h.attach("t3").await;
    assert_eq!(read_string(&mut t).await, "early\r\n");
}

#[test]
fn bind_refuses_bad_addresses() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    for bad in ["tcp://x", "unix://", "vsock://3", "vsock://x:1"] {
        assert!(bind(bad).is_err(), "{bad} accepted");
    }
    // A stale socket file is replaced; another file is not.
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("s");
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    assert!(bind(&format!("unix://{}", sock.display())).is_ok());
    let file = dir.path().join("f");
    std::fs::write(&file, b"").expect("file");
    assert!(bind(&format!("unix://{}", file.display())).is_err());
}
