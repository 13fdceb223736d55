//! Container figures, printed (no timed asserts):
//! - create+start+wait+remove of `/bin/true` through the agent, in host test mode (agent
//!   on a Unix socket, directory rootfs) and inside a husk VM (virtio-blk rootfs with a
//!   tmpfs overlay, agent over hybrid vsock), with the agent's own per-step timings of
//!   CreateContainer and StartContainer (p50 of each step);
//! - in the VM, ExecProcess + wait of `/bin/true` in a running container, with the
//!   agent's steps;
//! - stdio throughput from a container's stdout to the host over vsock in the VM (the
//!   host-mode figure is `cargo bench -p husk-agent --bench stdio`).
//!
//! `cargo bench -p husk-tests --bench containers`. Knobs: `HUSK_BENCH_RUNS` (default 10),
//! `HUSK_BENCH_VM_STDIO_MIB` (default 64), `HUSK_BENCH_SKIP_VM=1`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::agent::{
    BlockRootfs, CreateContainerRequest, DirectoryRootfs, ExecProcessRequest, Rootfs, StdioStreams,
    Step,
};
use husk_protocol::client::{AgentClient, Target, connect_with_retry};
use husk_tests::{BlockDevice, BusyboxImage, GuestImage, VmOptions, VmProcess, workspace};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const MIB: u64 = 1 << 20;
const STEP: Duration = Duration::from_secs(120);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"user": {"uid": 0, "gid": 0}, "cwd": "/", "args": args, "env": ["PATH=/bin"]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]},
    })
}

fn request(id: &str, spec: &Value, rootfs: Rootfs, stdout: &str) -> CreateContainerRequest {
    let mut stdio = StdioStreams::new();
    stdio.stdout = stdout.to_owned();
    let mut req = CreateContainerRequest::new();
    req.container_id = id.to_owned();
    req.oci_spec_json = spec.to_string().into_bytes();
    req.rootfs = Some(rootfs).into();
    req.stdio = Some(stdio).into();
    req
}

fn directory_rootfs(path: &Path) -> Rootfs {
    let mut dir = DirectoryRootfs::new();
    dir.path = path.to_string_lossy().into_owned();
    dir.overlay = true;
    let mut r = Rootfs::new();
    r.set_directory(dir);
    r
}

fn block_rootfs() -> Rootfs {
    let mut block = BlockRootfs::new();
    block.serial = "rootfs".to_owned();
    block.fstype = "ext4".to_owned();
    block.read_only = true;
    let mut r = Rootfs::new();
    r.set_block(block);
    r
}

/// What a series of runs took: wall times, and the agent's steps of each call.
#[derive(Default)]
struct Runs {
    times: Vec<Duration>,
    create_steps: Vec<Vec<Step>>,
    start_steps: Vec<Vec<Step>>,
}

/// create + start + wait + remove of `/bin/true`, `runs` times.
async fn lifecycle(client: &AgentClient, rootfs: impl Fn() -> Rootfs, runs: u64) -> Runs {
    let spec = spec(&["true"]);
    let mut out = Runs::default();
    for i in 0..runs {
        let id = format!("true{i}");
        let t = Instant::now();
        let created = client
            .create_container(&request(&id, &spec, rootfs(), ""))
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e}"));
        out.create_steps.push(created.steps);
        let started = client
            .start_container(&id)
            .await
            .unwrap_or_else(|e| panic!("start {id}: {e}"));
        out.start_steps.push(started);
        let exit = tokio::time::timeout(STEP, client.wait_process(&id, ""))
            .await
            .unwrap_or_else(|_| panic!("{id} did not exit"))
            .unwrap_or_else(|e| panic!("wait {id}: {e}"));
        assert_eq!(exit.exit_code, 0, "{id}: {exit:?}");
        client
            .remove_container(&id)
            .await
            .unwrap_or_else(|e| panic!("remove {id}: {e}"));
        out.times.push(t.elapsed());
    }
    out
}

/// ExecProcess + wait of `/bin/true` in the running container `id`, `runs` times; returns
/// the wall times and the agent's steps of each ExecProcess.
async fn execs(client: &AgentClient, id: &str, runs: u64) -> (Vec<Duration>, Vec<Vec<Step>>) {
    let process =
        json!({"user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["true"], "env": ["PATH=/bin"]});
    let (mut times, mut steps) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let exec_id = format!("e{i}");
        let mut req = ExecProcessRequest::new();
        req.container_id = id.to_owned();
        req.exec_id = exec_id.clone();
        req.process_json = process.to_string().into_bytes();
        req.stdio = Some(StdioStreams::new()).into();
        let t = Instant::now();
        let started = client
            .exec_process(&req)
            .await
            .unwrap_or_else(|e| panic!("exec {exec_id}: {e}"));
        let exit = tokio::time::timeout(STEP, client.wait_process(id, &exec_id))
            .await
            .unwrap_or_else(|_| panic!("{exec_id} did not exit"))
            .unwrap_or_else(|e| panic!("wait {exec_id}: {e}"));
        assert_eq!(exit.exit_code, 0, "{exec_id}: {exit:?}");
        times.push(t.elapsed());
        steps.push(started.steps);
    }
    (times, steps)
}

/// The p50 of each step over `runs` (steps in the order of the first run), and of their
/// total.
fn step_table(what: &str, runs: &[Vec<Step>]) {
    let Some(first) = runs.first() else { return };
    let p50 = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64 / 1000.0
    };
    let totals: Vec<u64> = runs
        .iter()
        .map(|r| r.iter().map(|s| s.micros).sum())
        .collect();
    println!(
        "{what}, in the agent: p50 {:.1} ms ({} runs)",
        p50(totals),
        runs.len()
    );
    for (i, step) in first.iter().enumerate() {
        let values: Vec<u64> = runs
            .iter()
            .filter_map(|r| r.get(i).filter(|s| s.name == step.name).map(|s| s.micros))
            .collect();
        if !values.is_empty() {
            println!("    {:<48} p50 {:>9.1} ms", step.name, p50(values));
        }
    }
}

fn summary(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: p50 {:.1} ms  min {:.1} ms  max {:.1} ms  ({} runs)",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
        times.len()
    );
}

struct HostAgent {
    child: Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host_agent() -> HostAgent {
    let agent = workspace::binary("husk-agent").expect("husk-agent binary");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let child = Command::new(agent)
        .arg("--listen")
        .arg(format!("unix://{}", socket.display()))
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawning husk-agent in host mode");
    HostAgent {
        child,
        _dir: dir,
        socket,
    }
}

fn main() {
    let runs = env_u64("HUSK_BENCH_RUNS", 10).max(1);
    let image = BusyboxImage::build().expect("busybox rootfs");
    let rt = husk_tests::runtime().expect("tokio runtime");

    // Host test mode.
    let agent = host_agent();
    rt.block_on(async {
        let client = connect_with_retry(
            &Target::unix(&agent.socket),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .expect("host-mode agent reachable");
        let root = image.root_dir();
        let r = lifecycle(&client, || directory_rootfs(&root), runs).await;
        summary("host mode: create+start+wait+remove /bin/true", r.times);
        step_table("host mode: CreateContainer", &r.create_steps);
        step_table("host mode: StartContainer", &r.start_steps);
    });
    drop(agent);

    if std::env::var_os("HUSK_BENCH_SKIP_VM").is_some() {
        println!("VM figures skipped (HUSK_BENCH_SKIP_VM set)");
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        println!("VM figures skipped: /dev/kvm is missing");
        return;
    }
    let guest = GuestImage::locate_or_build().expect("guest image");
    let opts = VmOptions {
        vcpus: 1,
        memory_mib: 256,
        blocks: vec![BlockDevice {
            path: image.path(),
            read_only: true,
            serial: "rootfs".to_owned(),
        }],
        ..VmOptions::default()
    };
    let mut vm = VmProcess::boot(&guest, &opts).expect("booting a VM");
    rt.block_on(async {
        let client = vm
            .agent(Duration::from_secs(180))
            .await
            .expect("agent in the VM")
            .with_rpc_timeout(STEP);
        let r = lifecycle(&client, block_rootfs, runs).await;
        summary("VM: create+start+wait+remove /bin/true", r.times);
        step_table("VM: CreateContainer", &r.create_steps);
        step_table("VM: StartContainer", &r.start_steps);

        // Execs of /bin/true in a running container.
        client
            .create_container(&request(
                "sleeper",
                &spec(&["sleep", "100000"]),
                block_rootfs(),
                "",
            ))
            .await
            .expect("create sleeper");
        client
            .start_container("sleeper")
            .await
            .expect("start sleeper");
        let (times, steps) = execs(&client, "sleeper", runs).await;
        summary("VM: ExecProcess+wait /bin/true", times);
        step_table("VM: ExecProcess", &steps);
        client
            .signal_process("sleeper", "", 9, false)
            .await
            .expect("kill sleeper");
        let _ = tokio::time::timeout(STEP, client.wait_process("sleeper", "")).await;
        client
            .remove_container("sleeper")
            .await
            .expect("remove sleeper");

        // stdout throughput over vsock: the container writes zeros as fast as it can.
        let mib = env_u64("HUSK_BENCH_VM_STDIO_MIB", 64);
        let script = format!("head -c {} /dev/zero", mib * MIB);
        client
            .create_container(&request(
                "stdio",
                &spec(&["sh", "-c", &script]),
                block_rootfs(),
                "stdio-out",
            ))
            .await
            .expect("create stdio");
        let target = Target::hybrid_vsock(vm.vsock_uds());
        let mut out = husk_protocol::stdio::attach(&target, "stdio-out")
            .await
            .expect("attach stdio-out");
        let t = Instant::now();
        client.start_container("stdio").await.expect("start stdio");
        let mut buf = vec![0u8; MIB as usize];
        let mut total = 0u64;
        loop {
            let n = out.read(&mut buf).await.expect("reading stdout");
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(total, mib * MIB, "bytes received");
        println!(
            "VM: container stdout -> host over vsock: {mib} MiB in {secs:.2} s = {:.1} MB/s",
            total as f64 / secs / 1e6
        );
        client
            .remove_container("stdio")
            .await
            .expect("remove stdio");
        client.destroy_sandbox().await.expect("DestroySandbox");
    });
    let _ = vm.wait_exit(Duration::from_secs(60));
}
