//! Stdio broker throughput: 1 GiB of a process's stdout through the broker to a host
//! reader over a Unix socket (host test mode), in MB/s. Prints figures; asserts nothing
//! about time.
//!
//! `cargo bench -p husk-agent --bench stdio` (HUSK_STDIO_BENCH_MIB=N for another size).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::Instant;

// The agent is a binary crate: compile its stdio module into the bench directly. Its
// unit tests come along under `cfg(test)` (clippy --all-targets) without a harness to
// run them, hence the allowances.
#[allow(dead_code, unused_imports)]
#[path = "../src/stdio/mod.rs"]
mod stdio;

use husk_container::Stdio;
use husk_protocol::stdio::{StdioTarget, attach_to};

const MIB: u64 = 1 << 20;

fn main() {
    let mib: u64 = std::env::var("HUSK_STDIO_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stdio.sock");
    let broker = stdio::StdioBroker::new();

    // The agent side: the broker on a current_thread runtime of its own, as in the agent.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let serving = broker.clone();
    let addr = format!("unix://{}", path.display());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = stdio::bind(&addr).expect("bind");
            ready_tx.send(()).expect("ready");
            let _ = serving.serve(listener).await;
        });
    });
    ready_rx.recv().expect("broker started");

    let bytes = mib * MIB;
    let target = StdioTarget::Unix(path.clone());

    // 1. A writer thread standing in for the process, 1 MiB writes.
    let (id, fd) = prepare_stdout(&broker, "bench-thread");
    let writer = std::thread::spawn(move || {
        let mut out = std::fs::File::from(fd);
        let chunk = vec![0x5a_u8; MIB as usize];
        for _ in 0..mib {
            out.write_all(&chunk).expect("write");
        }
    });
    report("writer thread (1 MiB writes)", &target, &id, bytes);
    writer.join().expect("writer");

    // 2. A real process: dd with 1 MiB blocks.
    let (id, fd) = prepare_stdout(&broker, "bench-dd");
    let mut child = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            "bs=1M",
            &format!("count={mib}"),
            "status=none",
        ])
        .stdout(fd)
        .spawn()
        .expect("spawn dd");
    report("dd bs=1M (process)", &target, &id, bytes);
    let _ = child.wait();

    // 3. head -c, which writes in small blocks.
    let (id, fd) = prepare_stdout(&broker, "bench-head");
    let mut child = std::process::Command::new("head")
        .args(["-c", &format!("{mib}M"), "/dev/zero"])
        .stdout(fd)
        .spawn()
        .expect("spawn head");
    report("head -c (process)", &target, &id, bytes);
    let _ = child.wait();

    // 4. The other direction: the host writes stdin, a thread drains the pipe.
    let prepared = broker
        .prepare(stdio::StdioRequest {
            stdin: Some("bench-stdin".into()),
            ..Default::default()
        })
        .expect("prepare");
    let Stdio::Fds { stdin, .. } = prepared.stdio else {
        unreachable!("no terminal asked for")
    };
    let reader = std::thread::spawn(move || {
        let mut input = std::fs::File::from(stdin);
        let mut buf = vec![0u8; MIB as usize];
        let mut total = 0u64;
        loop {
            match input.read(&mut buf).expect("read stdin pipe") {
                0 => return total,
                n => total += n as u64,
            }
        }
    });
    let start = Instant::now();
    let mut stream = host_stream(&target, "bench-stdin");
    let chunk = vec![0xa5_u8; MIB as usize];
    for _ in 0..mib {
        stream.write_all(&chunk).expect("write stdin stream");
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let total = reader.join().expect("reader");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, bytes, "stdin byte count");
    print_rate("host -> stdin pipe (1 MiB writes)", total, secs);
    drop(dir);
}

fn prepare_stdout(broker: &stdio::StdioBroker, id: &str) -> (String, OwnedFd) {
    let prepared = broker
        .prepare(stdio::StdioRequest {
            stdout: Some(id.into()),
            ..Default::default()
        })
        .expect("prepare");
    match prepared.stdio {
        Stdio::Fds { stdout, .. } => (id.to_owned(), stdout),
        Stdio::Terminal => unreachable!("no terminal asked for"),
    }
}

/// Attaches `id` as the host, reads to end-of-file, prints the rate.
fn report(what: &str, target: &StdioTarget, id: &str, expected: u64) {
    let start = Instant::now();
    let mut stream = host_stream(target, id);
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, expected, "{what}: byte count");
    print_rate(what, total, secs);
}

fn print_rate(what: &str, total: u64, secs: f64) {
    println!(
        "stdio {what}: {} MiB in {secs:.3} s = {:.0} MB/s",
        total / MIB,
        total as f64 / secs / 1e6
    );
}

/// Attaches `id` with the host-side helper and returns a blocking std stream.
fn host_stream(target: &StdioTarget, id: &str) -> std::os::unix::net::UnixStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stream = rt
        .block_on(attach_to(target, id))
        .expect("attach")
        .into_std()
        .expect("std stream");
    stream.set_nonblocking(false).expect("blocking");
    stream
}
