//! `exec`: a new process in a running container. In the foreground this process relays
//! its stdio and exits with the process's code; with `--detach` a re-executed
//! `husk __exec-monitor` does that (its pid goes to `--pid-file`, so callers such as conmon
//! can wait on it).

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use husk_protocol::agent::ExecProcessRequest;
use husk_protocol::client::AgentClient;
use husk_runtime::state::{CONFIG_COPY, ContainerState, StateStore, Status};
use husk_runtime::{console, exit};
use oci_spec::runtime::Process;
use serde_json::{Value, json};

use super::relay::{self, Relay, TerminalHost};
use super::{FAILURE, GlobalOpts, agent, lifecycle, monitor};

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Unix socket that receives the pty master when --tty is set.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Environment variable (KEY=VALUE); repeatable.
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// Allocate a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// UID[:GID] to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Extra groups; repeatable.
    #[arg(short = 'g', long = "additional-gids")]
    pub additional_gids: Vec<u32>,
    /// An OCI process JSON file (replaces the command and every option above).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Return once the process runs.
    #[arg(short, long)]
    pub detach: bool,
    /// File to write the pid of the process that waits for the exec to exit.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Capability to add; repeatable.
    #[arg(short = 'c', long = "cap")]
    pub caps: Vec<String>,
    /// Set no_new_privileges.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Accepted for compatibility; ignored.
    #[arg(long, hide = true)]
    pub process_label: Option<String>,
    /// Accepted for compatibility; ignored.
    #[arg(long, hide = true)]
    pub apparmor: Option<String>,
    /// Not supported (host fds cannot enter the VM); non-zero is refused.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Exec even if the container is paused.
    #[arg(long)]
    pub ignore_paused: bool,
    /// Accepted for compatibility; ignored (the exec joins the container's cgroup).
    #[arg(long, hide = true)]
    pub cgroup: Option<String>,
    pub id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ExecMonitorArgs {
    #[arg(long)]
    pub ready_fd: Option<i32>,
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    #[arg(long)]
    pub exec_id: String,
    #[arg(long)]
    pub process_file: PathBuf,
    pub id: String,
}

fn random_exec_id() -> String {
    let mut b = [0u8; 6];
    if File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b.copy_from_slice(&t.as_nanos().to_le_bytes()[..6]);
    }
    format!(
        "exec-{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// The process JSON of the exec: `--process`, or the container's own process with the
/// command and the options applied (as runc does).
fn process_json(store: &StateStore, st: &ContainerState, a: &ExecArgs) -> Result<Value> {
    let mut p: Value = if let Some(path) = &a.process {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?
    } else {
        if a.command.is_empty() {
            bail!("exec needs a command (or --process)");
        }
        let config_path = store.dir(&st.id)?.join(CONFIG_COPY);
        let base = std::fs::read(&config_path)
            .ok()
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
            .and_then(|v| v.get("process").cloned())
            .unwrap_or_else(|| json!({"user": {"uid": 0, "gid": 0}, "cwd": "/"}));
        let mut p = base;
        p["args"] = json!(a.command);
        p["terminal"] = json!(a.tty);
        if let Some(cwd) = &a.cwd {
            p["cwd"] = json!(cwd);
        }
        if !a.env.is_empty() {
            let mut env: Vec<String> = p["env"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            for kv in &a.env {
                let key = kv.split('=').next().unwrap_or(kv);
                env.retain(|e| e.split('=').next() != Some(key));
                env.push(kv.clone());
            }
            p["env"] = json!(env);
        }
        if let Some(u) = &a.user {
            let (uid, gid) = match u.split_once(':') {
                Some((u, g)) => (u, Some(g)),
                None => (u.as_str(), None),
            };
            let uid: u32 = uid
                .parse()
                .with_context(|| format!("--user {u}: expected UID[:GID] as numbers"))?;
            p["user"]["uid"] = json!(uid);
            if let Some(g) = gid {
                let gid: u32 = g
                    .parse()
                    .with_context(|| format!("--user {u}: expected UID[:GID] as numbers"))?;
                p["user"]["gid"] = json!(gid);
            }
        }
        if !a.additional_gids.is_empty() {
            p["user"]["additionalGids"] = json!(a.additional_gids);
        }
        for cap in &a.caps {
            for set in ["bounding", "effective", "permitted", "ambient"] {
                let list = &mut p["capabilities"][set];
                if !list.is_array() {
                    *list = json!([]);
                }
                if let Some(arr) = list.as_array_mut()
                    && !arr.iter().any(|c| c == cap)
                {
                    arr.push(json!(cap));
                }
            }
        }
        if a.no_new_privs {
            p["noNewPrivileges"] = json!(true);
        }
        p
    };
    let _: Process = serde_path_to_error::deserialize(&p)
        .map_err(|e| anyhow::anyhow!("exec process: field `{}`: {}", e.path(), e.inner()))?;
    if a.process.is_some() && a.tty {
        p["terminal"] = json!(true);
    }
    Ok(p)
}

pub fn exec(g: &GlobalOpts, a: ExecArgs) -> Result<i32> {
    if a.preserve_fds > 0 {
        bail!("--preserve-fds: passing host file descriptors into the VM is not supported");
    }
    let store = StateStore::new(&g.root);
    let st = store.load_unlocked(&a.id)?;
    match st.effective_status() {
        Status::Running => {}
        Status::Paused if a.ignore_paused => {}
        Status::Paused => bail!("cannot exec in a paused container (use --ignore-paused)"),
        other => bail!("cannot exec in a {other} container"),
    }
    let process = process_json(&store, &st, &a)?;
    let terminal = process["terminal"].as_bool().unwrap_or(false);
    if terminal && a.detach && a.console_socket.is_none() {
        bail!("--tty with --detach needs --console-socket");
    }
    let exec_id = random_exec_id();
    if a.detach {
        let file = store.dir(&a.id)?.join(format!("{exec_id}.json"));
        std::fs::write(&file, process.to_string())
            .with_context(|| format!("writing {}", file.display()))?;
        let mut hidden = vec![
            "__exec-monitor".to_owned(),
            "--exec-id".into(),
            exec_id,
            "--process-file".into(),
            file.display().to_string(),
        ];
        if let Some(s) = &a.console_socket {
            hidden.push("--console-socket".into());
            hidden.push(std::path::absolute(s)?.display().to_string());
        }
        hidden.push(a.id.clone());
        let result = lifecycle::spawn_and_wait_ready(g, &hidden);
        let _ = std::fs::remove_file(&file);
        let pid = result?;
        if let Some(p) = &a.pid_file {
            std::fs::write(p, pid.to_string())
                .with_context(|| format!("writing pid file {}", p.display()))?;
        }
        return Ok(0);
    }
    let session = ExecSession::setup(
        &store,
        &st,
        &exec_id,
        &process,
        a.console_socket.as_deref(),
        true,
    )?;
    if let Some(p) = &a.pid_file {
        std::fs::write(p, std::process::id().to_string())
            .with_context(|| format!("writing pid file {}", p.display()))?;
    }
    Ok(session.wait())
}

/// Entry point of `husk __exec-monitor`.
pub fn monitor_main(g: &GlobalOpts, a: ExecMonitorArgs) -> i32 {
    // SAFETY: the exec command passed us its pipe's write end under this number.
    let mut ready = a.ready_fd.map(|fd| unsafe { File::from_raw_fd(fd) });
    if let Some(r) = &ready {
        let _ = nix::fcntl::fcntl(
            r,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    let setup = (|| -> Result<ExecSession> {
        let store = StateStore::new(&g.root);
        let st = store.load_unlocked(&a.id)?;
        let text = std::fs::read(&a.process_file)
            .with_context(|| format!("reading {}", a.process_file.display()))?;
        let process: Value = serde_json::from_slice(&text).context("exec process JSON")?;
        ExecSession::setup(
            &store,
            &st,
            &a.exec_id,
            &process,
            a.console_socket.as_deref(),
            false,
        )
    })();
    match setup {
        Ok(s) => {
            if let Some(r) = ready.as_mut() {
                let _ = r.write_all(b"OK\n");
            }
            drop(ready);
            s.wait()
        }
        Err(e) => {
            if let Some(r) = ready.as_mut() {
                let _ = writeln!(r, "ERR {}", format!("{e:#}").replace('\n', " "));
            }
            FAILURE
        }
    }
}

struct ExecSession {
    rt: tokio::runtime::Runtime,
    client: AgentClient,
    agent_id: String,
    exec_id: String,
    relay: Relay,
}

impl ExecSession {
    fn setup(
        store: &StateStore,
        st: &ContainerState,
        exec_id: &str,
        process: &Value,
        console_socket: Option<&Path>,
        own_tty: bool,
    ) -> Result<Self> {
        let terminal = process["terminal"].as_bool().unwrap_or(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let target = agent::target(store, &st.id)?;
        let client = rt.block_on(agent::connect(store, &st.id))?;
        let ids = relay::stream_ids(exec_id, terminal);
        let mut req = ExecProcessRequest::new();
        req.container_id = st.agent_id.clone();
        req.exec_id = exec_id.to_owned();
        req.process_json = process.to_string().into_bytes();
        req.stdio = Some(ids.clone()).into();
        req.terminal = terminal;
        let started = rt
            .block_on(client.exec_process(&req))
            .with_context(|| format!("exec in {}", st.id))
            .map_err(|e| agent::explain_failed_call(store, st, e))?;
        tracing::debug!(
            steps = %husk_protocol::steps::summary(&started.steps),
            "process started in the VM"
        );
        let host = if terminal {
            match console_socket {
                Some(sock) => {
                    let pty = console::open_pty()?;
                    console::send_fd(sock, &pty.name, &pty.master)?;
                    Some(TerminalHost::PtySlave(pty.slave))
                }
                None if own_tty => Some(TerminalHost::OwnStdio),
                None => bail!("--tty needs --console-socket here"),
            }
        } else {
            None
        };
        let relay = rt.block_on(relay::start(&target, &ids, host))?;
        if let Some((rows, cols)) = relay.winsize_fd.and_then(relay::winsize) {
            let _ =
                rt.block_on(client.tty_win_resize(&st.agent_id, exec_id, rows.into(), cols.into()));
        }
        Ok(Self {
            rt,
            client,
            agent_id: st.agent_id.clone(),
            exec_id: exec_id.to_owned(),
            relay,
        })
    }

    fn wait(self) -> i32 {
        let r = self.rt.block_on(monitor::wait_for_exit(
            &self.client,
            &self.agent_id,
            &self.exec_id,
            std::future::pending(),
            self.relay.winsize_fd,
        ));
        let code = match r {
            Ok(Some(rec)) => exit::code(rec.exit_code, rec.signal),
            Ok(None) => FAILURE,
            Err(e) => {
                tracing::error!("waiting for exec {}: {e:#}", self.exec_id);
                eprintln!("husk: waiting for exec {}: {e:#}", self.exec_id);
                FAILURE
            }
        };
        self.relay.wait_drained(std::time::Duration::from_secs(5));
        code
    }
}
