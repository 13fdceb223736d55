//! A host directory shared into a real husk VM through virtio-fs: virtiofsd serves it over
//! vhost-user, the agent mounts the tag as a sandbox mount, and a busybox container runs
//! with its rootfs on the share (as `husk` runs OCI bundles). The container reads a file
//! the host wrote and writes one the host then reads.
//!
//! Skips when virtiofsd is not installed (`scripts/install-deps.sh` installs it) or KVM is
//! missing. `HUSK_TEST_CONSOLE=1` keeps the guest console and agent logs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, DirectoryRootfs, Rootfs, SandboxMount,
    StdioStreams,
};
use husk_tests::host::skip_without_kvm;
use husk_tests::rootfs::{APPLETS, HOST_BUSYBOX};
use husk_tests::{FsShare, GuestImage, VmOptions, VmProcess};
use serde_json::json;
use tokio::io::AsyncReadExt;

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const STEP: Duration = Duration::from_secs(90);
const TAG: &str = "husk-share";
const HOST_TEXT: &str = "written on the host\n";
const GUEST_TEXT: &str = "written in the guest";

/// `virtiofsd` on PATH (cargo installs it in ~/.cargo/bin).
fn find_virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

/// virtiofsd, killed and reaped on drop unless it already exited.
struct Virtiofsd {
    child: Child,
    log: PathBuf,
}

impl Virtiofsd {
    fn start(bin: &Path, socket: &Path, shared: &Path, log: PathBuf) -> Self {
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared)
            // The test shares a throwaway directory; no sandbox keeps the daemon's setup
            // independent of the host's namespace support.
            .args(["--sandbox", "none", "--cache", "never"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&log).expect("creating the virtiofsd log"),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut d = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("virtiofsd exited early ({status}): {}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "virtiofsd made no socket at {} within 20 s: {}",
                socket.display(),
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the daemon to exit by itself (it does when its frontend disconnects).
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for virtiofsd") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "virtiofsd still running {timeout:?} after the VM stopped: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A busybox rootfs directory (an OCI bundle's `rootfs`) under `root`.
fn busybox_rootfs(root: &Path) {
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dirs");
    }
    std::fs::copy(HOST_BUSYBOX, root.join("bin/busybox"))
        .unwrap_or_else(|e| panic!("copying {HOST_BUSYBOX} (busybox-static): {e}"));
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
    std::fs::write(root.join("hello.txt"), HOST_TEXT).expect("hello.txt");
}

#[test]
fn a_container_reads_and_writes_a_host_directory_over_virtio_fs() {
    const NAME: &str = "a_container_reads_and_writes_a_host_directory_over_virtio_fs";
    if skip_without_kvm(NAME) {
        return;
    }
    let Some(virtiofsd) = find_virtiofsd() else {
        eprintln!(
            "SKIPPED {NAME}: virtiofsd is not installed (not on PATH); \
             scripts/install-deps.sh installs it with `cargo install virtiofsd`"
        );
        return;
    };
    let started = Instant::now();
    let image = GuestImage::locate_or_build().expect("guest image");
    let dir = tempfile::Builder::new()
        .prefix("husk-virtiofs-")
        .tempdir()
        .expect("temp dir");
    let shared = dir.path().join("shared");
    let rootfs = shared.join("rootfs");
    busybox_rootfs(&rootfs);
    let socket = dir.path().join("virtiofsd.sock");
    let mut daemon = Virtiofsd::start(
        &virtiofsd,
        &socket,
        &shared,
        dir.path().join("virtiofsd.log"),
    );

    let console = std::env::var_os("HUSK_TEST_CONSOLE").is_some();
    let opts = VmOptions {
        memory_mib: 256,
        console,
        cmdline: if console {
            "husk.agent_log=info".to_owned()
        } else {
            String::new()
        },
        ..VmOptions::default()
    };
    let share = FsShare {
        socket: socket.clone(),
        tag: TAG.to_owned(),
    };
    let mut vm = VmProcess::boot_with_fs(&image, &opts, &[share]).expect("starting husk-vmm");

    let rt = husk_tests::runtime().expect("tokio runtime");
    rt.block_on(async {
        let vm = &vm;
        let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
            panic!(
                "{what}: {e}{}\n--- virtiofsd log ---\n{}",
                vm.diagnostics(),
                daemon.log_text()
            )
        };
        let client = vm
            .agent(BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| fail("agent over hybrid vsock", &e))
            .with_rpc_timeout(STEP);
        eprintln!("agent up after {:?}", started.elapsed());

        // The share, mounted once for the sandbox by its tag.
        let mut mount = SandboxMount::new();
        mount.name = "share".to_owned();
        mount.source = TAG.to_owned();
        mount.fstype = "virtiofs".to_owned();
        let mut req = CreateSandboxRequest::new();
        req.mounts = vec![mount];
        let sandbox_dir = client
            .create_sandbox(&req)
            .await
            .unwrap_or_else(|e| fail("CreateSandbox with a virtiofs mount", &e))
            .sandbox_dir;

        // A container whose rootfs is the bundle's rootfs directory on the share.
        let spec = json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {
                "user": {"uid": 0, "gid": 0},
                "cwd": "/",
                "args": ["sh", "-c", format!("exec 2>&1; cat /hello.txt && echo {GUEST_TEXT} > /written.txt")],
                "env": ["PATH=/bin"],
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            ],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]},
        });
        let mut dir_rootfs = DirectoryRootfs::new();
        dir_rootfs.path = format!("{sandbox_dir}/mounts/share/rootfs");
        let mut rootfs_src = Rootfs::new();
        rootfs_src.set_directory(dir_rootfs);
        let mut stdio = StdioStreams::new();
        stdio.stdout = "fs-out".to_owned();
        let mut create = CreateContainerRequest::new();
        create.container_id = "fs".to_owned();
        create.oci_spec_json = spec.to_string().into_bytes();
        create.rootfs = Some(rootfs_src).into();
        create.stdio = Some(stdio).into();
        client
            .create_container(&create)
            .await
            .unwrap_or_else(|e| fail("CreateContainer on the virtiofs rootfs", &e));
        let target = husk_protocol::client::Target::hybrid_vsock(vm.vsock_uds());
        let mut out = husk_protocol::stdio::attach(&target, "fs-out")
            .await
            .unwrap_or_else(|e| fail("attaching fs-out", &e));
        client
            .start_container("fs")
            .await
            .unwrap_or_else(|e| fail("StartContainer fs", &e));
        let mut bytes = Vec::new();
        tokio::time::timeout(STEP, out.read_to_end(&mut bytes))
            .await
            .unwrap_or_else(|_| fail("container output", &"no end-of-file in time"))
            .unwrap_or_else(|e| fail("reading container output", &e));
        let text = String::from_utf8_lossy(&bytes);
        assert_eq!(text, HOST_TEXT, "the guest read the host's file");
        let exit = tokio::time::timeout(STEP, client.wait_process("fs", ""))
            .await
            .unwrap_or_else(|_| fail("WaitProcess fs", &"no exit in time"))
            .unwrap_or_else(|e| fail("WaitProcess fs", &e));
        assert_eq!((exit.exit_code, exit.signal), (0, 0), "output {text:?}");
        // With --cache never every write went to virtiofsd before the process exited.
        let written = std::fs::read_to_string(rootfs.join("written.txt"))
            .unwrap_or_else(|e| fail("the guest's file on the host", &e));
        assert_eq!(written, format!("{GUEST_TEXT}\n"));

        client
            .remove_container("fs")
            .await
            .unwrap_or_else(|e| fail("RemoveContainer fs", &e));
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
    let ram = vm.metric("guest_ram").expect("guest_ram metrics event");
    assert_eq!(ram["backing"], "shared_memfd", "{ram}");
    let daemon_status = daemon.wait_exit(Duration::from_secs(30));
    eprintln!(
        "virtiofsd exited ({daemon_status}); whole test {:?}",
        started.elapsed()
    );
}
