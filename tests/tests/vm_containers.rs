//! Containers inside a real husk micro-VM: busybox on a read-only virtio-blk ext4 image,
//! stdio over hybrid vsock, cgroup v2 limits, freezing, OOM events and shared namespaces.
//!
//! One VM serves every assertion: a boot costs ~15-20 s on nested-PVM hosts, and each
//! busybox fork in the guest ~0.5 s, so the scripts below fork as little as they can.
//! `HUSK_TEST_CONSOLE=1` keeps the guest console and agent logs (slow) for debugging.
//!
//! ExecProcess and ListProcesses in the VM: `tests/vm_exec.rs` (ignored by default, see there).

use std::time::Duration;

use husk_protocol::agent::{
    BlockRootfs, CreateContainerRequest, Rootfs, StdioStreams, WaitProcessResponse,
};
use husk_protocol::client::AgentClient;
use husk_tests::host::skip_without_kvm;
use husk_tests::{BlockDevice, BusyboxImage, GuestImage, VmOptions, VmProcess};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Generous: container set-up is a handful of guest syscalls at ~0.3 ms each plus forks.
const STEP: Duration = Duration::from_secs(90);
const SERIAL: &str = "rootfs";
const MIB: u64 = 1 << 20;

/// An OCI spec running `args` as root in new pid, mount, uts and ipc namespaces with /proc
/// and tmpfs /dev and /tmp.
fn spec(args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "box",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "args": args,
            "env": ["PATH=/bin"],
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
        },
    })
}

fn add_namespace(spec: &mut Value, ns: Value) {
    if let Some(list) = spec["linux"]["namespaces"].as_array_mut() {
        list.push(ns);
    }
}

fn streams(stdin: &str, stdout: &str, stderr: &str) -> StdioStreams {
    let mut s = StdioStreams::new();
    s.stdin = stdin.to_owned();
    s.stdout = stdout.to_owned();
    s.stderr = stderr.to_owned();
    s
}

/// CreateContainer on the read-only block image (the agent overlays a tmpfs on it).
fn create_request(id: &str, spec: &Value, stdio: StdioStreams) -> CreateContainerRequest {
    let mut block = BlockRootfs::new();
    block.serial = SERIAL.to_owned();
    block.fstype = "ext4".to_owned();
    block.read_only = true;
    let mut rootfs = Rootfs::new();
    rootfs.set_block(block);
    let mut req = CreateContainerRequest::new();
    req.container_id = id.to_owned();
    req.oci_spec_json = spec.to_string().into_bytes();
    req.rootfs = Some(rootfs).into();
    req.stdio = Some(stdio).into();
    req
}

async fn attach(vm: &VmProcess, id: &str) -> UnixStream {
    let target = husk_protocol::client::Target::hybrid_vsock(vm.vsock_uds());
    husk_protocol::stdio::attach(&target, id)
        .await
        .unwrap_or_else(|e| panic!("attaching {id}: {e}{}", vm.diagnostics()))
}

async fn read_to_end(stream: &mut UnixStream, what: &str) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{what}: no end-of-file within {STEP:?}; read {:?}",
                String::from_utf8_lossy(&out)
            )
        })
        .unwrap_or_else(|e| panic!("{what}: reading: {e}"));
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `needle` has been seen `count` times in total in `seen`.
async fn read_until(stream: &mut UnixStream, seen: &mut String, needle: &str, count: usize) {
    let result = tokio::time::timeout(STEP, async {
        let mut buf = [0u8; 4096];
        while seen.matches(needle).count() < count {
            let n = stream.read(&mut buf).await.expect("reading the stream");
            assert!(n > 0, "end-of-file before {count} x {needle:?}: {seen:?}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "{count} x {needle:?} not read within {STEP:?}; read {seen:?}"
    );
}

/// Whatever arrives on `stream` during `window` (the stream must not end).
async fn read_for(stream: &mut UnixStream, window: Duration) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(window, async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.expect("reading the stream");
            assert!(n > 0, "unexpected end-of-file");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

async fn wait(client: &AgentClient, id: &str, exec_id: &str) -> WaitProcessResponse {
    tokio::time::timeout(STEP, client.wait_process(id, exec_id))
        .await
        .unwrap_or_else(|_| panic!("{id}/{exec_id} did not exit within {STEP:?}"))
        .unwrap_or_else(|e| panic!("WaitProcess {id}/{exec_id}: {e}"))
}

#[test]
fn containers_run_in_a_real_vm_with_cgroups_stdio_and_shared_namespaces() {
    if skip_without_kvm("containers_run_in_a_real_vm_with_cgroups_stdio_and_shared_namespaces") {
        return;
    }
    let started = std::time::Instant::now();
    let image = GuestImage::locate_or_build().expect("guest image");
    let rootfs = BusyboxImage::build().expect("busybox rootfs image");
    let console = std::env::var_os("HUSK_TEST_CONSOLE").is_some();
    let opts = VmOptions {
        vcpus: 1,
        memory_mib: 256,
        console,
        cmdline: if console {
            "husk.agent_log=info".to_owned()
        } else {
            String::new()
        },
        blocks: vec![BlockDevice {
            path: rootfs.path(),
            read_only: true,
            serial: SERIAL.to_owned(),
        }],
    };
    let mut vm = VmProcess::boot(&image, &opts).expect("starting husk-vmm");

    let rt = husk_tests::runtime().expect("tokio runtime");
    rt.block_on(async {
        let client = vm
            .agent(BOOT_TIMEOUT)
            .await
            .expect("agent answers over hybrid vsock")
            .with_rpc_timeout(STEP);
        let vm = &vm;
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!("{what}: {e}{}", vm.diagnostics())
        };
        eprintln!("agent up after {:?}", started.elapsed());

        // 1. Output over the stdio port, the guest kernel, a cgroup v2 cgroup, exit code.
        let hello = spec(&[
            "sh",
            "-c",
            "echo hello from $(uname -r); cat /proc/self/cgroup; readlink /proc/self/ns/net; exit 3",
        ]);
        client
            .create_container(&create_request("hello", &hello, streams("", "hello-out", "")))
            .await
            .unwrap_or_else(|e| fail("CreateContainer hello", &e));
        let mut out = attach(vm, "hello-out").await;
        client
            .start_container("hello")
            .await
            .unwrap_or_else(|e| fail("StartContainer hello", &e));
        let text = read_to_end(&mut out, "hello stdout").await;
        let lines: Vec<&str> = text.lines().collect();
        let release = lines
            .first()
            .and_then(|l| l.strip_prefix("hello from "))
            .unwrap_or_else(|| panic!("no greeting in {text:?}"));
        assert!(
            release.starts_with("6.1.") && release.ends_with("-husk"),
            "not the guest kernel: {text:?}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("0::/") && l.len() > 4),
            "no cgroup v2 line of its own cgroup in {text:?}"
        );
        let root_net_ns = lines
            .iter()
            .find(|l| l.starts_with("net:["))
            .unwrap_or_else(|| panic!("no net namespace link in {text:?}"))
            .to_string();
        let exit = wait(&client, "hello", "").await;
        assert_eq!((exit.exit_code, exit.signal), (3, 0));
        client
            .remove_container("hello")
            .await
            .unwrap_or_else(|e| fail("RemoveContainer hello", &e));
        eprintln!("hello done after {:?}", started.elapsed());

        // 2. A second container joins the first one's network namespace by the path of
        // the first one's init (its pid from CreateContainer). Each init prints its own
        // namespace: ExecProcess and ListProcesses are left out, see the module doc.
        let mut first = spec(&["sh", "-c", "readlink /proc/self/ns/net; exec sleep 1000"]);
        add_namespace(&mut first, json!({"type": "network"}));
        let pid1 = client
            .create_container(&create_request("net1", &first, streams("", "net1-out", "")))
            .await
            .unwrap_or_else(|e| fail("CreateContainer net1", &e))
            .pid;
        let mut net1_out = attach(vm, "net1-out").await;
        client
            .start_container("net1")
            .await
            .unwrap_or_else(|e| fail("StartContainer net1", &e));
        // sleep keeps the stream open: read the one line.
        let mut net1 = String::new();
        read_until(&mut net1_out, &mut net1, "]\n", 1).await;
        let mut second = spec(&["readlink", "/proc/self/ns/net"]);
        add_namespace(
            &mut second,
            json!({"type": "network", "path": format!("/proc/{pid1}/ns/net")}),
        );
        client
            .create_container(&create_request("net2", &second, streams("", "net2-out", "")))
            .await
            .unwrap_or_else(|e| fail("CreateContainer net2", &e));
        let mut net2_out = attach(vm, "net2-out").await;
        client
            .start_container("net2")
            .await
            .unwrap_or_else(|e| fail("StartContainer net2", &e));
        let net2 = read_to_end(&mut net2_out, "net2 stdout").await;
        assert_eq!(wait(&client, "net2", "").await.exit_code, 0);
        assert!(net1.starts_with("net:["), "{net1:?}");
        assert_eq!(net1, net2, "the two containers' network namespaces");
        assert_ne!(
            net1.trim_end(),
            root_net_ns,
            "net1 has a network namespace of its own"
        );
        client
            .remove_container("net2")
            .await
            .unwrap_or_else(|e| fail("RemoveContainer net2", &e));
        client
            .remove_container("net1")
            .await
            .unwrap_or_else(|e| fail("RemoveContainer net1", &e));
        eprintln!("namespaces done after {:?}", started.elapsed());

        // 3. cgroup v2 limits and the freezer. pids.max = 5: the shell, its subshell and
        // three sleeps fill it, so the fourth `sleep &` cannot fork and the subshell fails
        // (forks cost ~0.5 s each in this guest: keep the count small). Then a loop of shell
        // builtins only (no forks) ticks; its stdin is a never-attached stream, so
        // `read -t 1` paces it at one tick a second.
        let mut limited = spec(&[
            "sh",
            "-c",
            "(for i in 1 2 3 4 5 6; do sleep 100 & done); \
             while :; do echo tick; read -t 1 x; done",
        ]);
        limited["linux"]["resources"] = json!({
            "memory": {"limit": 64 * MIB},
            "pids": {"limit": 5},
        });
        client
            .create_container(&create_request(
                "limits",
                &limited,
                streams("limits-in", "limits-out", "limits-err"),
            ))
            .await
            .unwrap_or_else(|e| fail("CreateContainer limits", &e));
        let mut ticks = attach(vm, "limits-out").await;
        let mut errors = attach(vm, "limits-err").await;
        client
            .start_container("limits")
            .await
            .unwrap_or_else(|e| fail("StartContainer limits", &e));
        let mut seen = String::new();
        read_until(&mut ticks, &mut seen, "tick", 2).await;
        // The sleeps keep stderr open: read what the failing subshell wrote.
        let mut stderr = String::new();
        read_until(&mut errors, &mut stderr, "fork", 1).await;

        let stats = client
            .stats_container("limits")
            .await
            .unwrap_or_else(|e| fail("StatsContainer limits", &e));
        let memory = stats.memory.as_ref().expect("memory stats");
        assert_eq!(memory.limit_bytes, 64 * MIB, "{stats:?}");
        assert!(memory.usage_bytes > 0, "{stats:?}");
        let pids = stats.pids.as_ref().expect("pids stats");
        assert_eq!(pids.limit, 5, "{stats:?}");
        // The shell and the sleeps that did fork (the subshell is gone).
        assert!((2..=5).contains(&pids.current), "{stats:?}");

        client
            .pause_container("limits")
            .await
            .unwrap_or_else(|e| fail("PauseContainer limits", &e));
        // Let ticks already on their way arrive, then none may come while frozen.
        read_for(&mut ticks, Duration::from_secs(2)).await;
        let frozen = read_for(&mut ticks, Duration::from_secs(4)).await;
        assert_eq!(frozen, "", "the paused container kept ticking");
        client
            .resume_container("limits")
            .await
            .unwrap_or_else(|e| fail("ResumeContainer limits", &e));
        let mut seen = String::new();
        read_until(&mut ticks, &mut seen, "tick", 1).await;
        drop(errors);
        client
            .remove_container("limits")
            .await
            .unwrap_or_else(|e| fail("RemoveContainer limits", &e));
        eprintln!("limits done after {:?}", started.elapsed());

        // 4. An OOM kill. `tail` buffers /dev/zero (no newline ever comes) until the
        // kernel's OOM killer ends it at memory.max; GetOOMEvent, already waiting, names
        // the container, and WaitProcess reports SIGKILL. See `husk_tests::rootfs::HOG`
        // for why busybox runs from a tmpfs copy.
        let oom_client = client.clone();
        let oom_event = tokio::spawn(async move { oom_client.get_oom_event().await });
        let mut hog = spec(&["sh", "-c", husk_tests::rootfs::HOG]);
        hog["linux"]["resources"] = json!({"memory": {"limit": 16 * MIB}});
        client
            .create_container(&create_request("hog", &hog, streams("", "", "")))
            .await
            .unwrap_or_else(|e| fail("CreateContainer hog", &e));
        client
            .start_container("hog")
            .await
            .unwrap_or_else(|e| fail("StartContainer hog", &e));
        let exit = wait(&client, "hog", "").await;
        assert_eq!(
            (exit.exit_code, exit.signal),
            (0, libc::SIGKILL as u32),
            "tail over memory.max: {exit:?}"
        );
        let named = tokio::time::timeout(STEP, oom_event)
            .await
            .unwrap_or_else(|_| panic!("no OOM event within {STEP:?}{}", vm.diagnostics()))
            .expect("the GetOOMEvent task")
            .unwrap_or_else(|e| fail("GetOOMEvent", &e));
        assert_eq!(named, "hog", "the OOM event's container");
        let stats = client
            .stats_container("hog")
            .await
            .unwrap_or_else(|e| fail("StatsContainer hog", &e));
        let memory = stats.memory.as_ref().expect("memory stats");
        assert!(
            memory.oom_kill_events >= 1,
            "memory.events after the kill: {stats:?}"
        );
        client
            .remove_container("hog")
            .await
            .unwrap_or_else(|e| fail("RemoveContainer hog", &e));
        eprintln!("OOM done after {:?}", started.elapsed());

        // 5. Power-off.
        client
            .destroy_sandbox()
            .await
            .unwrap_or_else(|e| fail("DestroySandbox", &e));
    });

    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("husk-vmm exits after DestroySandbox");
    assert!(
        status.success(),
        "husk-vmm exit {status}: {}",
        vm.diagnostics()
    );
    eprintln!("whole test {:?}", started.elapsed());
}
