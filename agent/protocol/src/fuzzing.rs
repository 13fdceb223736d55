//! Fuzzing harness for what the host reads from a guest: the VMM's hybrid-vsock handshake
//! reply, the agent's ttrpc replies decoded into each RPC's response type, and the stdio
//! listener's `ATTACH` reply. The real client code runs against a fake peer on a real Unix
//! socket that plays back the fuzzer's bytes, then closes.
//!
//! A harness accepts every input. It panics only for a host bug: a panic in the client or
//! in what decodes the reply, or a call that does not return although the peer has closed
//! (every call here runs with a 1 s timeout of its own, so one still pending after
//! [`HANG`] is waiting on nothing).
//!
//! # Input format
//!
//! - `mode: u8` — bit 0: through the VMM (the peer reads `CONNECT <port>\n` and answers
//!   with the handshake bytes), else straight to the agent's socket; bit 1: a stdio
//!   `ATTACH` instead of an RPC; bit 2: the reply bytes are the raw byte stream the agent
//!   sends (ttrpc frames as the fuzzer wrote them), else they are the payload of one
//!   well-formed ttrpc response frame;
//! - `method: u8` — which RPC ([`METHODS`], modulo its length);
//! - `code: u8` — the framed response's status code (0: OK, which carries the payload);
//! - `handshake_len: u8` and that many bytes: the VMM's handshake reply;
//! - the rest: the agent's reply bytes.
//!
//! The cargo-fuzz target is in `runtime/fuzz/` (it also turns decoded stats into the
//! shim's metrics); `cargo test -p husk-protocol --test fuzz_corpus` replays its corpus.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use protobuf::Message;

use crate::agent::{CreateContainerRequest, ExecProcessRequest};
use crate::agent::{StatsContainerResponse, Step};
use crate::client::{self, AgentClient, Target};
use crate::stdio::{self, StdioTarget};
use crate::steps;

/// The RPCs the harness can call, by the index `method` selects.
pub const METHODS: &[&str] = &[
    "Check",
    "GetGuestDetails",
    "Restored",
    "CreateContainer",
    "StartContainer",
    "ExecProcess",
    "WaitProcess",
    "ListProcesses",
    "StatsContainer",
    "GetOOMEvent",
    "DestroySandbox",
    "SignalProcess",
];

/// The timeout of each call the harness makes.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// A call still pending this long after it started waits on nothing: the peer is gone.
pub const HANG: Duration = Duration::from_secs(5);

/// Bits of the mode byte.
pub const MODE_HYBRID: u8 = 1;
pub const MODE_ATTACH: u8 = 2;
pub const MODE_RAW: u8 = 4;

/// What one input decodes to.
#[derive(Debug, Default)]
pub struct Outcome {
    /// A decoded `StatsContainer` reply, for the target to turn into metrics.
    pub stats: Option<StatsContainerResponse>,
}

/// Runs one input (see the module documentation).
pub fn agent(data: &[u8]) -> Outcome {
    let get = |i: usize| data.get(i).copied().unwrap_or(0);
    let (mode, method, code) = (get(0), usize::from(get(1)), get(2));
    let hs_len = usize::from(get(3));
    let rest = data.get(4..).unwrap_or_default();
    let (handshake, reply) = rest.split_at(hs_len.min(rest.len()));
    let hybrid = mode & MODE_HYBRID != 0;
    let attach = mode & MODE_ATTACH != 0;

    let reply = if attach || mode & MODE_RAW != 0 {
        reply.to_vec()
    } else {
        framed_response(code, reply)
    };
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("binding the fake peer's socket");
    let peer = {
        let handshake = hybrid.then(|| handshake.to_vec());
        std::thread::spawn(move || play_peer(listener, handshake, attach, &reply))
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let method = METHODS[method % METHODS.len()];
    let outcome = rt.block_on(async {
        let call = async {
            if attach {
                let target = if hybrid {
                    StdioTarget::HybridVsock { uds: path.clone() }
                } else {
                    StdioTarget::Unix(path.clone())
                };
                let _ = stdio::attach_within(&target, "c1:stdout", CALL_TIMEOUT).await;
                Outcome::default()
            } else {
                let target = if hybrid {
                    Target::hybrid_vsock(path.clone())
                } else {
                    Target::unix(path.clone())
                };
                match tokio::time::timeout(CALL_TIMEOUT, client::connect(&target)).await {
                    Ok(Ok(c)) => call(&c.with_rpc_timeout(CALL_TIMEOUT), method).await,
                    _ => Outcome::default(),
                }
            }
        };
        tokio::time::timeout(HANG, call).await.unwrap_or_else(|_| {
            panic!("{method} (mode {mode:#x}) still pending {HANG:?} after the peer closed")
        })
    });
    drop(rt);
    // The peer only reads what the client wrote and writes the input: it cannot block once
    // the client is gone.
    let _ = peer.join();
    outcome
}

/// Calls `method` and uses what the host uses of its reply.
async fn call(c: &AgentClient, method: &str) -> Outcome {
    let mut out = Outcome::default();
    let show_steps = |s: &[Step]| {
        let _ = steps::summary(s);
    };
    match method {
        "Check" => {
            let _ = c.check().await;
        }
        "GetGuestDetails" => {
            let _ = c.get_guest_details().await;
        }
        "Restored" => {
            let _ = c.restored(vec![0; 32], 1).await;
        }
        "CreateContainer" => {
            if let Ok(r) = c.create_container(&CreateContainerRequest::new()).await {
                show_steps(&r.steps);
            }
        }
        "StartContainer" => {
            if let Ok(s) = c.start_container("c1").await {
                show_steps(&s);
            }
        }
        "ExecProcess" => {
            if let Ok(r) = c.exec_process(&ExecProcessRequest::new()).await {
                show_steps(&r.steps);
            }
        }
        "WaitProcess" => {
            let _ = c.wait_process("c1", "").await;
        }
        "ListProcesses" => {
            let _ = c.list_processes("c1").await;
        }
        "StatsContainer" => {
            out.stats = c.stats_container("c1").await.ok();
        }
        "GetOOMEvent" => {
            let _ = c.get_oom_event().await;
        }
        "DestroySandbox" => {
            let _ = c.destroy_sandbox().await;
        }
        _ => {
            let _ = c.signal_process("c1", "", 15, false).await;
        }
    }
    out
}

/// One ttrpc response frame for stream 1 (the client's first request): status `code`,
/// and `payload` when the code is OK.
fn framed_response(code: u8, payload: &[u8]) -> Vec<u8> {
    let mut resp = ttrpc::Response::new();
    if code != 0 {
        let mut status = ttrpc::Status::new();
        status.code = protobuf::EnumOrUnknown::from_i32(i32::from(code));
        status.message = "fuzz".into();
        resp.status = Some(status).into();
    } else {
        resp.payload = payload.to_vec();
    }
    let body = resp.write_to_bytes().expect("encoding a response");
    let mut frame = Vec::from(ttrpc::MessageHeader::new_response(1, body.len() as u32));
    frame.extend_from_slice(&body);
    frame
}

/// The fake VMM and agent: accepts one connection, reads the handshake line (when
/// `handshake` is given) and answers it, reads the client's request (a ttrpc frame, or the
/// `ATTACH` line), writes `reply` and closes.
fn play_peer(listener: UnixListener, handshake: Option<Vec<u8>>, attach: bool, reply: &[u8]) {
    let Ok((stream, _)) = listener.accept() else {
        return;
    };
    let _ = stream.set_read_timeout(Some(HANG));
    let _ = stream.set_write_timeout(Some(HANG));
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    let mut line = Vec::new();
    if let Some(h) = handshake {
        if reader.read_until(b'\n', &mut line).is_err() || writer.write_all(&h).is_err() {
            return;
        }
        if !h.contains(&b'\n') {
            // The client waits for the rest of the line, which only the close ends.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    if attach {
        line.clear();
        if reader.read_until(b'\n', &mut line).is_err() {
            return;
        }
    } else {
        let mut header = [0u8; ttrpc::proto::MESSAGE_HEADER_LENGTH];
        if reader.read_exact(&mut header).is_err() {
            return;
        }
        let len = ttrpc::MessageHeader::from(header).length;
        let mut body = vec![0u8; len.min(1 << 20) as usize];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
    }
    let _ = writer.write_all(reply);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// One socket path per process, in a folder of its own.
fn socket_path() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("husk-protocol-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    });
    Path::new(dir).join(format!("peer-{:?}.sock", std::thread::current().id()))
}

/// Seeds: `(name, input)`, one or more per kind of answer (good replies of several RPCs,
/// an error status, a raw frame for another stream, bad handshakes, stdio answers).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use crate::agent::{
        CheckResponse, CpuStats, IoDeviceStats, MemoryStats, StartContainerResponse,
    };
    let method = |name: &str| METHODS.iter().position(|m| *m == name).expect("method") as u8;
    let input = |mode: u8, method: u8, code: u8, handshake: &[u8], reply: &[u8]| {
        let mut v = vec![mode, method, code, handshake.len() as u8];
        v.extend_from_slice(handshake);
        v.extend_from_slice(reply);
        v
    };
    let ok_port = b"OK 1073741824\n";
    let mut check = CheckResponse::new();
    check.agent_version = "0.1.0".into();
    let check = check.write_to_bytes().expect("encoding");
    let mut stats = StatsContainerResponse::new();
    let mut cpu = CpuStats::new();
    cpu.usage_usec = 1234;
    stats.cpu = Some(cpu).into();
    let mut mem = MemoryStats::new();
    mem.usage_bytes = 4096;
    mem.stat.insert("anon".into(), 1024);
    stats.memory = Some(mem).into();
    let mut io = IoDeviceStats::new();
    io.major = 254;
    io.read_bytes = 512;
    stats.io.push(io);
    let stats = stats.write_to_bytes().expect("encoding");
    let mut start = StartContainerResponse::new();
    let mut step = Step::new();
    step.name = "execve".into();
    step.micros = 250;
    start.steps.push(step);
    let start = start.write_to_bytes().expect("encoding");

    vec![
        (
            "check-hybrid",
            input(MODE_HYBRID, method("Check"), 0, ok_port, &check),
        ),
        (
            "stats-hybrid",
            input(MODE_HYBRID, method("StatsContainer"), 0, ok_port, &stats),
        ),
        (
            "start-unix",
            input(0, method("StartContainer"), 0, b"", &start),
        ),
        (
            "error-status",
            input(MODE_HYBRID, method("ExecProcess"), 5, ok_port, b""),
        ),
        (
            "raw-frame-other-stream",
            input(MODE_HYBRID | MODE_RAW, method("Check"), 0, ok_port, &{
                let mut f = framed_response(0, &check);
                f[4..8].copy_from_slice(&3u32.to_be_bytes());
                f
            }),
        ),
        (
            "handshake-not-a-port",
            input(MODE_HYBRID, method("Check"), 0, b"OK 12ab\n", &check),
        ),
        (
            "handshake-no-newline",
            input(MODE_HYBRID, method("Check"), 0, b"OK 1", b""),
        ),
        (
            "attach-ok",
            input(
                MODE_HYBRID | MODE_ATTACH,
                0,
                0,
                ok_port,
                b"OK\nstream bytes",
            ),
        ),
        (
            "attach-refused",
            input(MODE_ATTACH, 0, 0, b"", b"ERR no such stream\n"),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_reach_the_decoders() {
        for (name, data) in seeds() {
            let start = std::time::Instant::now();
            let out = agent(&data);
            eprintln!("{name}: {:?}", start.elapsed());
            if name == "stats-hybrid" {
                let stats = out.stats.expect("the stats seed decodes");
                assert_eq!(stats.cpu.usage_usec, 1234);
                assert_eq!(stats.io.len(), 1);
            }
        }
    }
}
