//! Host-test-mode integration tests: spawn the real `husk-agent` binary listening on a
//! Unix socket, talk to it with husk-protocol's client, compare with this host's facts.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{AGENT, AgentProcess};
use husk_protocol::agent::ServingStatus;

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn host_mem_total_bytes() -> u64 {
    let meminfo = read("/proc/meminfo");
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .expect("MemTotal line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .expect("MemTotal value")
        .parse()
        .expect("MemTotal number");
    kib * 1024
}

fn host_uptime_ns() -> u64 {
    let text = read("/proc/uptime");
    let secs: f64 = text
        .split_whitespace()
        .next()
        .expect("uptime field")
        .parse()
        .expect("uptime number");
    (secs * 1e9) as u64
}

#[tokio::test]
async fn check_reports_serving_and_crate_version() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let resp = client.check().await.expect("Check");
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));
    assert_eq!(resp.agent_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn guest_details_match_this_host() {
    let agent = AgentProcess::spawn();
    let client = agent.connect().await;
    let before = host_uptime_ns();
    let details = client.get_guest_details().await.expect("GetGuestDetails");
    let after = host_uptime_ns();

    let uname = Command::new("uname").arg("-r").output().expect("uname -r");
    assert!(uname.status.success());
    assert_eq!(
        details.kernel_release,
        String::from_utf8_lossy(&uname.stdout).trim()
    );
    assert_eq!(details.memory_total_bytes, host_mem_total_bytes());
    // SAFETY: sysconf has no preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    assert!(online > 0);
    assert_eq!(i64::from(details.online_cpus), online as i64);
    let boot_id = read("/proc/sys/kernel/random/boot_id");
    assert_eq!(details.boot_id, boot_id.trim());
    assert_eq!(details.boot_id.len(), 36, "{}", details.boot_id);
    assert_eq!(details.agent_version, env!("CARGO_PKG_VERSION"));
    // /proc/uptime has 10 ms resolution.
    let slack = 20_000_000;
    assert!(
        details.uptime_ns + slack >= before && details.uptime_ns <= after + slack,
        "uptime {} ns outside host's [{before}, {after}]",
        details.uptime_ns
    );
}

#[tokio::test]
async fn destroy_sandbox_replies_then_exits_zero() {
    let mut agent = AgentProcess::spawn();
    let client = agent.connect().await;
    client
        .destroy_sandbox()
        .await
        .expect("DestroySandbox reply");
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "agent exited with {status}");
    assert!(!agent.socket.exists(), "socket file left behind");
}

#[tokio::test]
async fn second_destroy_is_refused_while_shutting_down() {
    let mut agent = AgentProcess::spawn();
    let client = agent.connect().await;
    client
        .destroy_sandbox()
        .await
        .expect("first DestroySandbox");
    // The agent stays up for ~100 ms to flush the first reply; a second request in that
    // window is refused as UNAVAILABLE, or the connection is already gone.
    match client.destroy_sandbox().await {
        Ok(_) => panic!("second DestroySandbox accepted"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("DestroySandbox"), "{msg}");
        }
    }
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn help_says_host_mode_is_a_test_aid() {
    let out = Command::new(AGENT)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("HOST TEST MODE"), "{text}");
    assert!(text.contains("isolates nothing"), "{text}");
    assert!(text.contains("vsock://-1:1024"), "{text}");
}

#[test]
fn bad_arguments_exit_2_naming_the_problem() {
    let out = Command::new(AGENT)
        .args(["--listen", "tcp://127.0.0.1:1"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcp://127.0.0.1:1"));

    // Not PID 1 and no --listen: refuses instead of guessing.
    let out = Command::new(AGENT).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

#[test]
fn listen_failure_exits_nonzero_naming_the_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("unix://{}/no/such/dir/agent.sock", dir.path().display());
    let out = Command::new(AGENT)
        .args(["--listen", &addr])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&addr));
}
