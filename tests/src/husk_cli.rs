//! Driving the `husk` CLI as runc's callers do: a private state root, a config file naming
//! the guest image (`HUSK_CONFIG`), and busybox bundles.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::rootfs::{APPLETS, HOST_BUSYBOX};
use crate::{GuestImage, workspace};

/// A `husk` binary with its own `--root` and config file, in a temp dir removed on drop
/// (after a forced delete of every container left).
pub struct Husk {
    pub bin: PathBuf,
    dir: tempfile::TempDir,
}

impl Husk {
    /// `config` is the TOML text of the config file (see [`Husk::guest_config`]).
    pub fn new(config: &str) -> Result<Self> {
        let bin = workspace::binary("husk")?;
        let dir = tempfile::Builder::new()
            .prefix("husk-cli-")
            .tempdir()
            .context("creating the CLI test dir")?;
        std::fs::write(dir.path().join("config.toml"), config).context("writing config.toml")?;
        Ok(Self { bin, dir })
    }

    /// Config text for a real guest image.
    pub fn guest_config(image: &GuestImage, extra: &str) -> String {
        format!(
            "kernel = {:?}\ninitramfs = {:?}\nboot_timeout_secs = 300\n{extra}\n",
            image.kernel.display().to_string(),
            image.initramfs.display().to_string()
        )
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `husk --root <root> <args>` with the config in the environment. Stdio is the
    /// caller's to set.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("HUSK_CONFIG", self.dir.path().join("config.toml"))
            .arg("--root")
            .arg(self.root())
            .args(args);
        c
    }

    /// Runs a command that starts no monitor (its stdout and stderr are captured).
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running husk {args:?}"))
    }

    /// Runs a command that may leave a monitor behind (create, run -d, exec -d): its
    /// stdout and stderr go to files named `<name>.out` / `<name>.err` in the test dir,
    /// because the monitor inherits them and would hold captured pipes open.
    pub fn spawn_to_files(&self, name: &str, args: &[&str]) -> Result<FileOutput> {
        let out = self.dir.path().join(format!("{name}.out"));
        let err = self.dir.path().join(format!("{name}.err"));
        let status = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .status()
            .with_context(|| format!("running husk {args:?}"))?;
        Ok(FileOutput {
            code: status.code(),
            out,
            err,
        })
    }

    /// Like [`Husk::spawn_to_files`], but stdout is a pipe (as conmon passes it), read as
    /// bytes arrive by a thread until every holder of its write end (the monitor) is gone.
    pub fn spawn_stdout_to_pipe(&self, name: &str, args: &[&str]) -> Result<PipedOutput> {
        let err = self.dir.path().join(format!("{name}.err"));
        let mut child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("running husk {args:?}"))?;
        let mut pipe = child.stdout.take().context("husk's stdout pipe")?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut pipe, &mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let status = child
            .wait()
            .with_context(|| format!("waiting for husk {args:?}"))?;
        Ok(PipedOutput {
            code: status.code(),
            stdout,
            err,
        })
    }

    /// `husk state <id>` parsed.
    pub fn state(&self, id: &str) -> Result<Value> {
        let o = self.output(&["state", id])?;
        if !o.status.success() {
            bail!(
                "husk state {id} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        serde_json::from_slice(&o.stdout).context("husk state printed no JSON")
    }

    /// Polls `state` until its status is `want` or `timeout` passes.
    pub fn wait_status(&self, id: &str, want: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.state(id)?;
            if st["status"] == want {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("{id} still {} after {timeout:?}, want {want}", st["status"]);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The monitor log of `id` (for failure messages).
    pub fn monitor_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.root().join(id).join("monitor.log")).unwrap_or_default()
    }
}

impl Drop for Husk {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.root()) {
            for e in entries.flatten() {
                if let Some(id) = e.file_name().to_str() {
                    let _ = self.output(&["delete", "--force", id]);
                }
            }
        }
    }
}

/// Exit code and output files of [`Husk::spawn_to_files`].
pub struct FileOutput {
    pub code: Option<i32>,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl FileOutput {
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

/// Exit code, stdout read so far and stderr file of [`Husk::spawn_stdout_to_pipe`].
pub struct PipedOutput {
    pub code: Option<i32>,
    stdout: Arc<Mutex<Vec<u8>>>,
    pub err: PathBuf,
}

impl PipedOutput {
    /// What arrived on the pipe so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
}

/// What a virtio-fs CLI test needs: the guest image and the config lines of the virtio-fs
/// rootfs mode with the installed virtiofsd. `None` (after saying why `test` skips) without
/// KVM, virtiofsd or the guest image.
pub fn virtiofs_setup(test: &str) -> Option<(GuestImage, String)> {
    if crate::host::skip_without_kvm(test) {
        return None;
    }
    let Some(virtiofsd) = crate::podman::find_virtiofsd() else {
        eprintln!("SKIPPED {test}: virtiofsd not installed (scripts/install-deps.sh)");
        return None;
    };
    let image = match GuestImage::locate_or_build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED {test}: no guest image: {e:#}");
            return None;
        }
    };
    let extra = format!(
        "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\n",
        virtiofsd.display().to_string()
    );
    Some((image, extra))
}

/// A bundle directory: a busybox rootfs and a config.json.
pub struct Bundle {
    pub dir: PathBuf,
}

impl Bundle {
    /// Makes `<parent>/<name>` with a busybox rootfs and `config` as config.json.
    pub fn busybox(parent: &Path, name: &str, config: &Value) -> Result<Self> {
        let dir = parent.join(name);
        let root = dir.join("rootfs");
        for d in ["bin", "etc", "proc", "dev", "sys", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy(HOST_BUSYBOX, root.join("bin/busybox")).with_context(|| {
            format!("copying {HOST_BUSYBOX} (install busybox-static: scripts/install-deps.sh)")
        })?;
        for applet in APPLETS.iter().chain(&["kill", "tty", "stty"]) {
            let link = root.join("bin").join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", link)?;
            }
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
        let b = Self { dir };
        b.write_config(config)?;
        Ok(b)
    }

    pub fn write_config(&self, config: &Value) -> Result<()> {
        std::fs::write(
            self.dir.join("config.json"),
            serde_json::to_vec_pretty(config)?,
        )
        .context("writing config.json")
    }

    pub fn path(&self) -> &str {
        self.dir.to_str().unwrap_or_default()
    }
}

/// A config.json running `args` as root with /proc, /dev and /tmp, in new pid (optional),
/// mount, uts and ipc namespaces.
pub fn spec(args: &[&str], pid_namespace: bool) -> Value {
    let mut namespaces = vec![
        json!({"type": "mount"}),
        json!({"type": "uts"}),
        json!({"type": "ipc"}),
    ];
    if pid_namespace {
        namespaces.push(json!({"type": "pid"}));
    }
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "hostname": "box",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "cwd": "/",
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["mode=1777"]},
        ],
        "linux": {"namespaces": namespaces},
    })
}

/// Live (non-zombie) processes whose command line contains `needle`, with that line.
pub fn processes_mentioning(needle: &str) -> Vec<(i64, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && pid_alive(pid) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().chars().next())
        })
        .flatten()
        .is_some_and(|state| state != 'Z')
}
