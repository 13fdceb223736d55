//! A `husk-vmm` process booting a guest image, as the integration tests and benchmarks use it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{GuestImage, workspace};

/// How to boot the VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub memory_mib: u32,
    pub vcpus: u8,
    /// Extra guest kernel command-line arguments.
    pub cmdline: String,
    /// Keep the guest's serial console in a file (slow on nested-PVM hosts: ~100 µs per char).
    pub console: bool,
    /// virtio-blk disks, in guest order.
    pub blocks: Vec<BlockDevice>,
}

/// A virtio-blk disk backed by a host file (`--block path=..,ro=..,serial=..`).
#[derive(Debug, Clone)]
pub struct BlockDevice {
    pub path: PathBuf,
    pub read_only: bool,
    /// The virtio-blk serial the agent finds the disk by (up to 20 bytes).
    pub serial: String,
}

impl BlockDevice {
    /// The `--block` argument of husk-vmm. The VMM's spec is comma separated, so a path
    /// with a comma cannot be passed.
    fn arg(&self) -> Result<String> {
        let path = self
            .path
            .to_str()
            .with_context(|| format!("block image path {} is not UTF-8", self.path.display()))?;
        if path.contains(',') || self.serial.contains(',') {
            bail!(
                "block image path {path:?} or serial {:?} contains a comma",
                self.serial
            );
        }
        let ro = if self.read_only { "on" } else { "off" };
        let mut arg = format!("path={path},ro={ro}");
        if !self.serial.is_empty() {
            arg.push_str(&format!(",serial={}", self.serial));
        }
        Ok(arg)
    }
}

/// A virtio-fs share served by a vhost-user backend (`--fs socket=..,tag=..`).
#[derive(Debug, Clone)]
pub struct FsShare {
    /// The backend's (virtiofsd's) listening socket.
    pub socket: PathBuf,
    /// What the guest mounts (`-t virtiofs TAG`).
    pub tag: String,
}

impl FsShare {
    /// The `--fs` argument of husk-vmm (comma separated, like `--block`).
    fn arg(&self) -> Result<String> {
        let socket = self
            .socket
            .to_str()
            .with_context(|| format!("fs socket path {} is not UTF-8", self.socket.display()))?;
        if socket.contains(',') || self.tag.contains(',') {
            bail!(
                "fs socket {socket:?} or tag {:?} contains a comma",
                self.tag
            );
        }
        Ok(format!("socket={socket},tag={}", self.tag))
    }
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mib: 128,
            vcpus: 1,
            cmdline: String::new(),
            console: false,
            blocks: Vec::new(),
        }
    }
}

/// How a VMM process starts its guest.
enum Launch<'a> {
    Boot(&'a GuestImage),
    Restore(&'a Path),
}

/// A running `husk-vmm`; killed and reaped on drop, its files removed with its temp dir.
pub struct VmProcess {
    child: Child,
    started: Instant,
    dir: tempfile::TempDir,
    exit: Option<ExitStatus>,
}

impl VmProcess {
    /// Starts `husk-vmm` on `image`. Returns as soon as the process runs; the guest boots on.
    pub fn boot(image: &GuestImage, opts: &VmOptions) -> Result<Self> {
        Self::boot_with_fs(image, opts, &[])
    }

    /// [`boot`](Self::boot) with virtio-fs shares, whose backends must already listen.
    /// (A separate call rather than a `VmOptions` field, so that struct literals of
    /// `VmOptions` elsewhere keep compiling.)
    pub fn boot_with_fs(image: &GuestImage, opts: &VmOptions, fs: &[FsShare]) -> Result<Self> {
        Self::spawn(Launch::Boot(image), opts, fs, &[])
    }

    /// [`boot`](Self::boot) with extra `husk-vmm` arguments (e.g. `--profile FILE`).
    pub fn boot_with_args(image: &GuestImage, opts: &VmOptions, args: &[OsString]) -> Result<Self> {
        Self::spawn(Launch::Boot(image), opts, &[], args)
    }

    /// Starts `husk-vmm --restore` from a snapshot folder, with the devices of `opts` (which
    /// must be those the snapshot was taken with).
    pub fn restore(snapshot: &Path, opts: &VmOptions) -> Result<Self> {
        Self::spawn(Launch::Restore(snapshot), opts, &[], &[])
    }

    fn spawn(
        launch: Launch<'_>,
        opts: &VmOptions,
        fs: &[FsShare],
        extra: &[OsString],
    ) -> Result<Self> {
        let vmm = workspace::binary("husk-vmm")?;
        let dir = tempfile::Builder::new()
            .prefix("husk-vm-")
            .tempdir()
            .context("creating the VM's temp dir")?;
        let mut cmd = Command::new(&vmm);
        match launch {
            Launch::Boot(image) => {
                cmd.arg("--kernel")
                    .arg(&image.kernel)
                    .arg("--initramfs")
                    .arg(&image.initramfs);
                if !opts.cmdline.is_empty() {
                    cmd.arg("--cmdline").arg(&opts.cmdline);
                }
            }
            Launch::Restore(snapshot) => {
                cmd.arg("--restore").arg(snapshot);
            }
        }
        cmd.arg("--memory-mib")
            .arg(opts.memory_mib.to_string())
            .arg("--vcpus")
            .arg(opts.vcpus.to_string())
            .arg("--vsock-uds")
            .arg(dir.path().join("vsock.sock"))
            .arg("--api-socket")
            .arg(dir.path().join("api.sock"))
            .arg("--metrics-file")
            .arg(dir.path().join("metrics.jsonl"))
            // HUSK_TEST_VMM_LOG=info|debug for a more talkative vmm.log in diagnostics.
            .arg("--log-level")
            .arg(std::env::var("HUSK_TEST_VMM_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("vmm.log"))
                    .context("creating the VMM log file")?,
            ));
        if opts.console {
            cmd.arg("--console")
                .arg(format!("file:{}", dir.path().join("console.log").display()));
        }
        for block in &opts.blocks {
            cmd.arg("--block").arg(block.arg()?);
        }
        for share in fs {
            cmd.arg("--fs").arg(share.arg()?);
        }
        cmd.args(extra);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", vmm.display()))?;
        Ok(Self {
            child,
            started,
            dir,
            exit: None,
        })
    }

    /// Asks the VMM for a snapshot into `dir` over its API socket; returns its reply (the
    /// figures) once the VMM has exited, as it does after a snapshot.
    pub fn snapshot(&mut self, dir: &Path) -> Result<Value> {
        use std::io::{BufRead, BufReader, Write};
        let api = self.dir.path().join("api.sock");
        let mut conn = std::os::unix::net::UnixStream::connect(&api)
            .with_context(|| format!("connecting to {}", api.display()))?;
        let request = serde_json::json!({ "action": "snapshot", "dir": dir });
        writeln!(conn, "{request}").context("sending the snapshot request")?;
        let mut line = String::new();
        BufReader::new(conn)
            .read_line(&mut line)
            .context("reading the snapshot reply")?;
        let reply: Value = serde_json::from_str(&line)
            .with_context(|| format!("snapshot reply {line:?}: {}", self.diagnostics()))?;
        if reply["ok"] != true {
            bail!("snapshot refused: {reply}{}", self.diagnostics());
        }
        let status = self.wait_exit(Duration::from_secs(30))?;
        if !status.success() {
            bail!(
                "husk-vmm exited {status} after the snapshot{}",
                self.diagnostics()
            );
        }
        Ok(reply)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the process was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The hybrid-vsock Unix socket of the VM.
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    /// Connects to the guest agent, retrying while the guest boots.
    pub async fn agent(&self, timeout: Duration) -> Result<husk_protocol::client::AgentClient> {
        let target = husk_protocol::client::Target::HybridVsock {
            uds: self.vsock_uds(),
            port: husk_protocol::AGENT_VSOCK_PORT,
        };
        husk_protocol::client::connect_with_retry(&target, Instant::now() + timeout)
            .await
            .with_context(|| {
                format!(
                    "connecting to the agent of VM pid {}: {}",
                    self.pid(),
                    self.diagnostics()
                )
            })
    }

    /// Waits for the VMM to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for husk-vmm")? {
                self.exit = Some(status);
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "husk-vmm (pid {}) still running after {timeout:?}: {}",
                    self.pid(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON-lines events the VMM wrote to its metrics file.
    pub fn metrics(&self) -> Result<Vec<Value>> {
        let path = self.dir.path().join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("bad metrics line {l:?}")))
            .collect()
    }

    /// The first metrics event named `name`.
    pub fn metric(&self, name: &str) -> Result<Value> {
        self.metrics()?
            .into_iter()
            .find(|e| e["event"] == name)
            .with_context(|| format!("no {name:?} event in the VMM's metrics file"))
    }

    /// Where guest RAM is mapped in the VMM (host address, length), from its metrics file.
    pub fn guest_ram_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let event = self.metric("guest_ram")?;
        event["host_ranges"]
            .as_array()
            .context("guest_ram event without host_ranges")?
            .iter()
            .map(|r| {
                Ok((
                    r[0].as_u64().context("guest_ram range start")?,
                    r[1].as_u64().context("guest_ram range length")?,
                ))
            })
            .collect()
    }

    /// The VMM's stderr so far.
    pub fn vmm_log(&self) -> String {
        read_lossy(&self.dir.path().join("vmm.log"))
    }

    /// The guest console so far (empty unless booted with `console`).
    pub fn console(&self) -> String {
        read_lossy(&self.dir.path().join("console.log"))
    }

    /// What a failing test should print about this VM.
    pub fn diagnostics(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "\n--- husk-vmm stderr (tail) ---\n{}\n--- guest console (tail) ---\n{}\n",
            tail(self.vmm_log()),
            tail(self.console())
        )
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_argument() {
        let mut b = BlockDevice {
            path: "/img/root.ext4".into(),
            read_only: true,
            serial: "rootfs".into(),
        };
        assert_eq!(b.arg().unwrap(), "path=/img/root.ext4,ro=on,serial=rootfs");
        b.read_only = false;
        b.serial.clear();
        assert_eq!(b.arg().unwrap(), "path=/img/root.ext4,ro=off");
        b.path = "/a,b".into();
        assert!(b.arg().is_err());
    }

    #[test]
    fn fs_argument() {
        let mut f = FsShare {
            socket: "/run/vfs.sock".into(),
            tag: "rootfs".into(),
        };
        assert_eq!(f.arg().unwrap(), "socket=/run/vfs.sock,tag=rootfs");
        f.tag = "a,b".into();
        assert!(f.arg().is_err());
    }
}
