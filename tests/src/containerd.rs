//! A private containerd for the shim tests: Debian's `containerd` started with its own
//! config, root, state and socket under a temp dir, driven with `ctr`, and an OCI image
//! tarball built from a rootfs directory for `ctr images import` (no registry). The CRI
//! plugin is off unless the caller supplies its configuration (see `cri`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "husk-test";

/// Pids of `shim` processes serving container `id` in ctr namespace `namespace`.
pub fn shims_of(shim: &str, namespace: &str, id: &str) -> Vec<u32> {
    use crate::proc_stats::{command_lines, flag_value};
    command_lines()
        .into_iter()
        .filter(|(_, args)| {
            args.first().is_some_and(|a| a.ends_with(shim))
                && flag_value(args, "-namespace") == Some(namespace)
                && flag_value(args, "-id") == Some(id)
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// `containerd` and `ctr` on PATH, or why not.
pub fn containerd_missing_reason() -> Option<String> {
    for bin in ["containerd", "ctr"] {
        if find_on_path(bin).is_none() {
            return Some(format!(
                "{bin} is not installed (Debian package `containerd`; scripts/install-deps.sh installs it)"
            ));
        }
    }
    None
}

/// Whether `test` must skip for want of containerd or of root (printing why).
pub fn skip_without_containerd(test: &str) -> bool {
    if let Some(reason) = containerd_missing_reason() {
        eprintln!("SKIPPED {test}: {reason}");
        return true;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: containerd and the shim's rootfs mounts need root");
        return true;
    }
    false
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// How to start a private containerd beyond the defaults of `Containerd::start`.
#[derive(Default)]
pub struct ContainerdOptions<'a> {
    /// Folders put first on containerd's PATH (where it finds shims).
    pub extra_path: &'a [&'a Path],
    /// Added to containerd's environment (inherited by the shims).
    pub env: &'a [(&'a str, &'a Path)],
    /// Configuration of the CRI plugin (TOML after the `[grpc]` table, e.g. a
    /// `[plugins."io.containerd.grpc.v1.cri"]` table); `None` disables the plugin.
    pub cri_config: Option<String>,
    /// Run containerd (and so its shims and CNI plugins) in a network namespace of its own,
    /// with only `lo` up: the bridges and veths CNI makes stay out of the host's namespace
    /// and go away with containerd.
    pub own_netns: bool,
    /// The ctr namespace `ctr`/`ctr_timeout` use and `Drop` cleans; `NAMESPACE` if `None`.
    pub namespace: Option<&'static str>,
}

/// A running containerd; stopped (SIGTERM, then SIGKILL) and its folder removed on drop.
pub struct Containerd {
    /// Replaced by [`Containerd::restart`].
    child: std::sync::Mutex<Child>,
    dir: tempfile::TempDir,
    namespace: &'static str,
    /// How to start it (again, for a restart).
    launch: Launch,
    /// With `own_netns`: that namespace, held so that a restarted containerd joins it
    /// (pods' network namespaces and CNI state live on).
    netns: Option<std::fs::File>,
}

/// containerd's command line and environment.
struct Launch {
    path: std::ffi::OsString,
    env: Vec<(String, PathBuf)>,
    own_netns: bool,
}

impl Containerd {
    /// Starts containerd with `extra_path` first on its PATH (where it finds shims) and
    /// `env` in its environment (inherited by the shims); the CRI plugin is disabled.
    pub fn start(extra_path: &[&Path], env: &[(&str, &Path)]) -> Result<Self> {
        Self::start_with(ContainerdOptions {
            extra_path,
            env,
            ..Default::default()
        })
    }

    pub fn start_with(options: ContainerdOptions<'_>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("husk-ctrd-")
            .tempdir()
            .context("creating the containerd test dir")?;
        let d = dir.path();
        let mut config = format!(
            "version = 2\nroot = {:?}\nstate = {:?}\n",
            d.join("root").display().to_string(),
            d.join("state").display().to_string(),
        );
        if options.cri_config.is_none() {
            config.push_str(
                "# The CRI plugin is not needed by ctr (and wants restrict_oom_score_adj here).\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
            );
        }
        config.push_str(&format!(
            "[grpc]\n  address = {:?}\n",
            d.join("containerd.sock").display().to_string(),
        ));
        if let Some(cri) = &options.cri_config {
            config.push_str(cri);
        }
        std::fs::write(d.join("config.toml"), config).context("writing config.toml")?;
        let mut paths: Vec<PathBuf> = options.extra_path.iter().map(|p| p.to_path_buf()).collect();
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        let launch = Launch {
            path: std::env::join_paths(paths).context("PATH")?,
            env: options
                .env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_path_buf()))
                .collect(),
            own_netns: options.own_netns,
        };
        let child = launch.spawn(d, None).context("starting containerd")?;
        let mut c = Self {
            child: std::sync::Mutex::new(child),
            dir,
            namespace: options.namespace.unwrap_or(NAMESPACE),
            launch,
            netns: None,
        };
        c.wait_until_answering()?;
        if c.launch.own_netns {
            // Answering, so past `unshare`.
            let ns = format!("/proc/{}/ns/net", c.pid());
            c.netns = Some(std::fs::File::open(&ns).with_context(|| ns.clone())?);
        }
        Ok(c)
    }
}

impl Launch {
    /// Starts the containerd process of the folder `d` (its log is appended to
    /// containerd.log); with `own_netns`, in a new network namespace, or in `netns` (a
    /// restart).
    fn spawn(&self, d: &Path, netns: Option<&std::fs::File>) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .context("containerd.log")?;
        let mut cmd = if let Some(ns) = netns {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = ns.as_raw_fd();
            let mut c = Command::new("containerd");
            // SAFETY: setns is async-signal-safe; fd stays open in the parent until spawn
            // returns.
            unsafe {
                c.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            c
        } else if self.own_netns {
            // unshare and sh exec in place: the child's pid stays containerd's.
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "--",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
                "containerd",
            ]);
            c
        } else {
            Command::new("containerd")
        };
        cmd.arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", &self.path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        Ok(cmd.spawn()?)
    }
}

impl Containerd {
    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until_answering(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child().try_wait().context("waiting for containerd")? {
                bail!("containerd exited ({status}): {}", self.log_tail(40));
            }
            if self.ctr(&["version"])?.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "containerd did not answer within 30 s: {}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops containerd (SIGTERM, as a service manager restarting it does) and starts it
    /// again on the same root, state, socket and network namespace; shims and their tasks
    /// live on.
    pub fn restart(&self) -> Result<()> {
        let mut child = self.child();
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child
            .try_wait()
            .context("waiting for containerd")?
            .is_none()
        {
            if Instant::now() >= deadline {
                bail!("containerd did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *child = self
            .launch
            .spawn(self.dir.path(), self.netns.as_ref())
            .context("starting containerd again")?;
        drop(child);
        self.wait_until_answering()
    }

    /// containerd's pid (its network namespace is `/proc/<pid>/ns/net`).
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `ctr -a SOCKET -n NAMESPACE ARGS`, unbounded, for a caller that spawns it (stdio is
    /// the caller's to set).
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("-a")
            .arg(self.socket())
            .args(["-n", self.namespace])
            .args(args);
        c
    }

    /// `ctr -a SOCKET -n NAMESPACE ARGS` (the namespace of the options), bounded by `timeout` (coreutils), stdin /dev/null.
    pub fn ctr_timeout(&self, timeout: Duration, args: &[&str]) -> Result<Output> {
        Command::new("timeout")
            .args(["--kill-after=10", &format!("{}", timeout.as_secs())])
            .arg("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running ctr {args:?}"))
    }

    /// `ctr` with a terminal of `rows`×`cols` as its stdin/stdout (util-linux `script`
    /// makes the pty; `ctr run -t` refuses to run without one). Returns what the terminal
    /// showed and ctr's exit status.
    pub fn ctr_on_terminal(
        &self,
        timeout: Duration,
        (rows, cols): (u16, u16),
        args: &[&str],
    ) -> Result<Output> {
        let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
        let mut line = format!(
            "stty rows {rows} cols {cols}; exec ctr -a {} -n {}",
            quote(&self.socket().display().to_string()),
            quote(self.namespace)
        );
        for a in args {
            line.push(' ');
            line.push_str(&quote(a));
        }
        Command::new("timeout")
            .args(["--kill-after=10", &format!("{}", timeout.as_secs())])
            .args([
                "script",
                "--quiet",
                "--return",
                "--command",
                &line,
                "/dev/null",
            ])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running ctr {args:?} on a terminal (script)"))
    }

    pub fn ctr(&self, args: &[&str]) -> Result<Output> {
        self.ctr_timeout(Duration::from_secs(60), args)
    }

    /// The last `lines` lines of containerd's log (shim logs included).
    pub fn log_tail(&self, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Containerd {
    /// Removes every task of the namespace, then stops containerd; its folder stays until
    /// drop. Does nothing once containerd has exited.
    pub fn stop(&mut self) {
        if !matches!(self.child().try_wait(), Ok(None)) {
            return;
        }
        // Shims outlive containerd by design: remove every task first (a failed test may
        // leave one running, with its VM).
        if let Ok(out) = self.ctr(&["tasks", "ls", "-q"]) {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.ctr(&["tasks", "delete", "--force", id]);
            }
        }
        let mut child = self.child();
        if let Ok(None) = child.try_wait() {
            // SAFETY: signalling our own child by its pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builds an OCI image layout tarball (one uncompressed layer holding `rootfs`, an amd64
/// linux config, a manifest and an index naming the image `name`) at `out`, with `tar` and
/// `sha256sum` from coreutils/GNU tar. The image's command is `/bin/sh`.
pub fn build_oci_image(rootfs: &Path, name: &str, work: &Path, out: &Path) -> Result<()> {
    build_oci_image_with_cmd(rootfs, name, &["/bin/sh"], work, out)
}

/// `build_oci_image` with the image's command `cmd`. `work` holds the layout being built:
/// give each image its own.
pub fn build_oci_image_with_cmd(
    rootfs: &Path,
    name: &str,
    cmd: &[&str],
    work: &Path,
    out: &Path,
) -> Result<()> {
    let layout = work.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let layer = work.join("layer.tar");
    run(Command::new("tar")
        .arg("--numeric-owner")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."))?;
    let (layer_digest, layer_size) = add_blob(&blobs, &std::fs::read(&layer)?)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
    });
    let (config_digest, config_size) = add_blob(&blobs, config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_digest}"),
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{layer_digest}"),
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = add_blob(&blobs, manifest.to_string().as_bytes())?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name},
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string())?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(out)
        .arg("."))?;
    Ok(())
}

/// Stores `bytes` as a blob; returns its hex sha256 and size.
fn add_blob(blobs: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let digest = sha256_hex(bytes)?;
    std::fs::write(blobs.join(&digest), bytes)?;
    Ok((digest, bytes.len()))
}

/// The hex sha256 of `bytes`, by coreutils' `sha256sum`.
pub fn sha256_hex(bytes: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child
        .stdin
        .take()
        .context("sha256sum stdin")?
        .write_all(bytes)
        .context("feeding sha256sum")?;
    let out = child.wait_with_output().context("sha256sum")?;
    let digest = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    if digest.len() != 64 {
        bail!(
            "sha256sum printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(digest)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
