//! Helpers shared by the agent's integration tests (host mode now, the VM tests later):
//! a busybox rootfs, OCI specs for it, and a host-mode agent process.
#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::agent::{
    CreateContainerRequest, DirectoryRootfs, ExecProcessRequest, Rootfs, StdioStreams,
};
use husk_protocol::client::{AgentClient, Target, connect_with_retry};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

pub const AGENT: &str = env!("CARGO_BIN_EXE_husk-agent");

/// Busybox applets linked into the rootfs.
pub const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "sleep", "ps", "readlink", "tr", "grep", "test", "true", "touch",
    "id", "hostname", "head", "wc", "mount", "seq", "stty", "tty",
];

/// A rootfs made of the host's static busybox (Debian's busybox-static: /bin/busybox).
pub struct BusyboxRootfs {
    dir: tempfile::TempDir,
}

impl BusyboxRootfs {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        for d in ["bin", "etc", "proc", "dev", "tmp", "out", "sys"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir in rootfs");
        }
        std::fs::copy(busybox(), root.join("bin/busybox")).expect("copy busybox");
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).expect("applet link");
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").expect("passwd");
        std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("group");
        BusyboxRootfs { dir }
    }

    /// The rootfs directory.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// A scratch directory next to the rootfs (for bind mounts into the container).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir scratch");
        p
    }
}

/// The static busybox to copy; panics with a hint if it is missing.
pub fn busybox() -> &'static Path {
    let p = Path::new("/bin/busybox");
    assert!(
        p.exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
    p
}

/// An OCI spec running `args` as root with new pid, mount, uts, ipc namespaces, /proc,
/// a tmpfs /dev and /tmp.
pub fn spec(args: &[&str]) -> Value {
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

/// `sh -c script`.
pub fn sh(script: &str) -> Value {
    spec(&["sh", "-c", script])
}

/// Adds a bind mount of the host directory `source` at `destination`.
pub fn with_bind(mut spec: Value, source: &Path, destination: &str) -> Value {
    if let Some(m) = spec["mounts"].as_array_mut() {
        m.push(json!({
            "destination": destination, "type": "bind",
            "source": source.to_string_lossy(), "options": ["rbind"],
        }));
    }
    spec
}

/// A CreateContainer request for a directory rootfs.
pub fn create_request(
    id: &str,
    spec: &Value,
    rootfs: &Path,
    overlay: bool,
) -> CreateContainerRequest {
    let mut dir = DirectoryRootfs::new();
    dir.path = rootfs.to_string_lossy().into_owned();
    dir.overlay = overlay;
    let mut r = Rootfs::new();
    r.set_directory(dir);
    let mut req = CreateContainerRequest::new();
    req.container_id = id.to_owned();
    req.oci_spec_json = spec.to_string().into_bytes();
    req.rootfs = Some(r).into();
    req
}

/// An ExecProcess request running `args`.
pub fn exec_request(container: &str, exec_id: &str, args: &[&str]) -> ExecProcessRequest {
    let process = json!({
        "user": {"uid": 0, "gid": 0},
        "cwd": "/",
        "args": args,
        "env": ["PATH=/bin"],
    });
    let mut req = ExecProcessRequest::new();
    req.container_id = container.to_owned();
    req.exec_id = exec_id.to_owned();
    req.process_json = process.to_string().into_bytes();
    req
}

/// Stream ids for a create/exec request; empty strings leave a stream on /dev/null.
pub fn streams(stdin: &str, stdout: &str, stderr: &str, terminal: &str) -> StdioStreams {
    let mut s = StdioStreams::new();
    s.stdin = stdin.to_owned();
    s.stdout = stdout.to_owned();
    s.stderr = stderr.to_owned();
    s.terminal = terminal.to_owned();
    s
}

/// Reads `stream` to end-of-file, failing after `timeout` (a stream that never ends is a
/// leaked fd somewhere).
pub async fn read_to_end(stream: &mut UnixStream, timeout: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(timeout, stream.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| {
            let tail = &out[out.len().saturating_sub(200)..];
            panic!(
                "no end-of-file within {timeout:?}; read {} bytes, ending {:?}",
                out.len(),
                String::from_utf8_lossy(tail)
            )
        })
        .expect("reading the stream");
    out
}

/// Reads from `stream` into `seen` until `seen` contains `needle`.
pub async fn read_until(
    stream: &mut UnixStream,
    seen: &mut Vec<u8>,
    needle: &str,
    timeout: Duration,
) {
    let found = |b: &[u8]| String::from_utf8_lossy(b).contains(needle);
    let result = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 4096];
        while !found(seen) {
            let n = stream.read(&mut buf).await.expect("reading the stream");
            assert!(n > 0, "end-of-file before {needle:?}");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "{needle:?} not read within {timeout:?}; read: {:?}",
        String::from_utf8_lossy(seen)
    );
}

/// A host-mode agent (`husk-agent --listen unix://...`), killed on drop if still alive.
pub struct AgentProcess {
    pub child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    pub fn spawn() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("agent.sock");
        let child = Command::new(AGENT)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn husk-agent");
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where this agent keeps container state in host mode.
    pub fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("husk-agent-{}", self.pid()))
    }

    /// The agent's mount table.
    pub fn mountinfo(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).expect("mountinfo")
    }

    /// Attaches stream `id` through the agent's default stdio socket (`<socket>.stdio`).
    pub async fn try_attach(
        &self,
        id: &str,
    ) -> Result<UnixStream, husk_protocol::stdio::StdioAttachError> {
        husk_protocol::stdio::attach(&Target::unix(&self.socket), id).await
    }

    /// Like [`Self::try_attach`], for streams that must attach.
    pub async fn attach(&self, id: &str) -> UnixStream {
        self.try_attach(id)
            .await
            .unwrap_or_else(|e| panic!("attach {id}: {e}"))
    }

    pub async fn connect(&self) -> AgentClient {
        connect_with_retry(
            &Target::unix(&self.socket),
            Instant::now() + Duration::from_secs(10),
        )
        .await
        .expect("agent reachable")
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // A killed agent cannot clean up; its containers are removed by the tests first.
        let _ = std::fs::remove_dir_all(self.state_dir());
    }
}

/// Waits until `path` exists and is non-empty; returns its content.
pub fn wait_for_file(path: &Path, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.is_empty()
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} not written within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True while /proc/<pid> exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
