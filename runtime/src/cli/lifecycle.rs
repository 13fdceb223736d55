//! create, start, state, kill, delete, run.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use husk_runtime::bundle::{Bundle, CONFIG_FILE};
use husk_runtime::config::Config;
use husk_runtime::process::ProcessIdentity;
use husk_runtime::state::{
    CONFIG_COPY, ContainerLock, ContainerState, RootfsMode, StateError, StateStore, Status,
    VM_SOCKET,
};
use husk_runtime::{hooks, host_cgroup, id, signal, sizing};
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::signal::Signal;

use super::monitor::{Monitor, MonitorOptions, update};
use super::{CreateOpts, GlobalOpts, LogFormat, agent, oci_state};

/// How long `delete` waits for an orderly VM power-off before killing the monitor.
const DESTROY_WAIT: Duration = Duration::from_secs(10);
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Checks everything that can be checked before a VM boots, and records the new
/// container (status `creating`).
fn prepare(g: &GlobalOpts, opts: &CreateOpts, id: &str, own_tty: bool) -> Result<ContainerState> {
    id::validate(id)?;
    if opts.preserve_fds > 0 {
        bail!(
            "--preserve-fds {}: passing host file descriptors into the container's VM is not supported",
            opts.preserve_fds
        );
    }
    let config = Config::load()?;
    let bundle = Bundle::load(&opts.bundle)?;
    config.kernel_path()?;
    config.initramfs_path()?;
    if config.rootfs_mode == RootfsMode::Virtiofs && config.virtiofsd_path().is_none() {
        bail!(
            "rootfs_mode = \"virtiofs\" ({}) needs virtiofsd: install it (`cargo install virtiofsd`) or set `virtiofsd`",
            config.source
        );
    }
    let template = config.cpu_template_here()?;
    let size = sizing::vm_size(&bundle.spec, &config, template)?;
    let terminal = bundle
        .spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal && opts.console_socket.is_none() && !own_tty {
        bail!(
            "process.terminal is set: --console-socket is required (husk cannot detach from a terminal without one)"
        );
    }
    let store = StateStore::new(&g.root);
    store.socket_path(id, VM_SOCKET)?;
    let lock = store.create(id)?;
    let st = ContainerState {
        id: id.to_owned(),
        agent_id: id::agent_id(id),
        bundle: bundle.dir.clone(),
        rootfs: bundle.rootfs.clone(),
        status: Status::Creating,
        monitor: None,
        virtiofsd: None,
        created: husk_runtime::time::rfc3339(SystemTime::now()),
        owner: owner(),
        annotations: bundle
            .spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        rootfs_mode: config.rootfs_mode,
        vcpus: size.vcpus,
        memory_mib: size.memory_mib,
        terminal,
        guest_pid: None,
        exit: None,
        host_cgroup: Vec::new(),
    };
    let saved = (|| -> Result<()> {
        std::fs::copy(bundle.dir.join(CONFIG_FILE), lock.dir().join(CONFIG_COPY))
            .context("copying config.json into the state directory")?;
        store.save(&lock, &st)?;
        Ok(())
    })();
    if let Err(e) = saved {
        let _ = store.remove(lock);
        return Err(e);
    }
    Ok(st)
}

fn owner() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    // Written whole then renamed, so a reader never sees a partial pid.
    let tmp = path.with_extension("husk-tmp");
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing pid file {}", path.display()))
}

/// Global flags for a re-executed husk.
fn global_args(g: &GlobalOpts) -> Vec<String> {
    let mut a = vec!["--root".to_owned(), g.root.display().to_string()];
    if let Some(l) = &g.log {
        a.push("--log".into());
        a.push(l.display().to_string());
    }
    if g.log_format == LogFormat::Json {
        a.push("--log-format".into());
        a.push("json".into());
    }
    if g.debug {
        a.push("--debug".into());
    }
    a
}

/// Starts a re-executed `husk <args>` that reports readiness on a pipe, and waits for its
/// report. Returns the child's pid once it said OK.
pub fn spawn_and_wait_ready(g: &GlobalOpts, hidden: &[String]) -> Result<i32> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    // The child inherits the write end under the same number.
    fcntl(&write, FcntlArg::F_SETFD(FdFlag::empty())).context("fcntl on the ready pipe")?;
    let mut args = global_args(g);
    args.push(hidden[0].clone());
    args.push("--ready-fd".into());
    args.push(write.as_raw_fd().to_string());
    args.extend_from_slice(&hidden[1..]);
    let exe = std::env::current_exe().context("locating the husk binary")?;
    let mut child = Command::new(&exe)
        .args(&args)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    drop::<OwnedFd>(write);
    // One line: "OK" or "ERR <message>"; end-of-file without it means the child died.
    let mut report = String::new();
    let mut reader = std::io::BufReader::new(std::fs::File::from(read));
    let _ = std::io::BufRead::read_line(&mut reader, &mut report);
    if report.starts_with("OK") {
        return Ok(child.id() as i32);
    }
    // Failed: make sure it is gone before the caller cleans up.
    let _ = child.kill();
    let status = child.wait().ok();
    match report.strip_prefix("ERR ") {
        Some(msg) => bail!("{}", msg.trim()),
        None => bail!(
            "the monitor exited ({}) without reporting; see its log",
            status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown status".into())
        ),
    }
}

pub fn create(g: &GlobalOpts, opts: &CreateOpts, id: &str) -> Result<()> {
    prepare(g, opts, id, false)?;
    let mut hidden = vec!["__monitor".to_owned()];
    if let Some(s) = &opts.console_socket {
        hidden.push("--console-socket".into());
        hidden.push(absolute(s)?.display().to_string());
    }
    hidden.push(id.to_owned());
    match spawn_and_wait_ready(g, &hidden) {
        Ok(pid) => {
            if let Some(p) = &opts.pid_file {
                write_pid_file(p, pid)?;
            }
            Ok(())
        }
        Err(e) => {
            // Nothing of a failed create stays behind.
            let store = StateStore::new(&g.root);
            if let Ok(lock) = store.lock(id) {
                if let Ok(st) = store.load(&lock) {
                    teardown(&store, &st);
                }
                let _ = store.remove(lock);
            }
            Err(e)
        }
    }
}

fn absolute(p: &Path) -> Result<std::path::PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("reading the current directory")?
            .join(p))
    }
}

fn load_locked(store: &StateStore, id: &str) -> Result<(ContainerLock, ContainerState)> {
    let lock = store.lock(id)?;
    let st = store.load(&lock)?;
    Ok((lock, st))
}

pub fn start(g: &GlobalOpts, id: &str) -> Result<()> {
    let store = StateStore::new(&g.root);
    let (lock, mut st) = load_locked(&store, id)?;
    match st.effective_status() {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        other => bail!("cannot start a container in the {other} state"),
    }
    let steps = agent::block_on(async {
        let client = agent::connect(&store, id).await?;
        client
            .start_container(&st.agent_id)
            .await
            .with_context(|| format!("starting {id}"))
    })?
    .map_err(|e| agent::explain_failed_call(&store, &st, e))?;
    tracing::debug!(
        steps = %husk_protocol::steps::summary(&steps),
        "container started in the VM"
    );
    st.status = Status::Running;
    store.save(&lock, &st)?;
    drop(lock);
    run_spec_hooks(&store, &st, HookPoint::Poststart);
    Ok(())
}

pub fn state(g: &GlobalOpts, id: &str) -> Result<()> {
    let store = StateStore::new(&g.root);
    let st = store.load_unlocked(id)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&oci_state::document(&st))?
    );
    Ok(())
}

pub fn kill(g: &GlobalOpts, id: &str, sig: &str, all: bool) -> Result<()> {
    let signo = signal::parse(sig)?;
    let store = StateStore::new(&g.root);
    let st = store.load_unlocked(id)?;
    match st.effective_status() {
        Status::Created | Status::Running | Status::Paused => {}
        Status::Creating => bail!("container {id:?} is still being created"),
        Status::Stopped => bail!("container not running"),
    }
    agent::block_on(async {
        let client = agent::connect(&store, id).await?;
        client
            .signal_process(&st.agent_id, "", signo, all)
            .await
            .with_context(|| format!("sending {} to container {id:?}", signal::name(signo)))
    })??;
    Ok(())
}

pub fn delete(g: &GlobalOpts, id: &str, force: bool) -> Result<()> {
    id::validate(id)?;
    let store = StateStore::new(&g.root);
    let lock = match store.lock(id) {
        Ok(l) => l,
        Err(StateError::NotFound(_)) if force => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let st = match store.load(&lock) {
        Ok(st) => st,
        // A create that died before writing its state: nothing recorded to stop.
        Err(StateError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            store.remove(lock)?;
            return Ok(());
        }
        Err(e) if force => {
            tracing::warn!("{e}; removing the state directory anyway");
            store.remove(lock)?;
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let status = st.effective_status();
    if !force && matches!(status, Status::Running | Status::Paused | Status::Creating) {
        bail!("cannot delete container {id:?} that is not stopped: {status}");
    }
    teardown(&store, &st);
    run_spec_hooks(&store, &st, HookPoint::Poststop);
    store.remove(lock)?;
    Ok(())
}

/// Stops whatever of the container still runs on the host: asks the agent to power the VM
/// off, then kills the monitor (and with it the in-process VMM) and virtiofsd by their
/// recorded pid and start time. Safe to call on a container whose processes are gone.
pub fn teardown(store: &StateStore, st: &ContainerState) {
    if let Some(m) = st.monitor.filter(ProcessIdentity::is_alive)
        && m.pid != std::process::id() as i32
    {
        let destroyed = agent::block_on(async {
            let client = tokio::time::timeout(
                Duration::from_secs(3),
                husk_protocol::client::connect(&agent::target(store, &st.id)?),
            )
            .await??
            .with_rpc_timeout(Duration::from_secs(5));
            client.destroy_sandbox().await?;
            anyhow::Ok(())
        });
        if let Ok(Err(e)) | Err(e) = destroyed {
            tracing::debug!("orderly VM power-off of {:?} failed: {e:#}", st.id);
        }
        if !m.wait_gone(DESTROY_WAIT) && !m.kill_and_wait(KILL_WAIT) {
            tracing::warn!("monitor pid {} of {:?} survived SIGKILL", m.pid, st.id);
        }
    }
    if let Some(v) = st.virtiofsd {
        v.signal(Signal::SIGKILL);
        v.wait_gone(KILL_WAIT);
    }
    // A monitor that exited in order removed its cgroup itself; a SIGKILLed one did not.
    for e in host_cgroup::remove_paths_after_crash(&st.host_cgroup) {
        tracing::warn!("{e}");
        eprintln!("husk: {e}");
    }
}

#[derive(Clone, Copy)]
enum HookPoint {
    Poststart,
    Poststop,
}

/// Runs poststart or poststop hooks from the config.json copied at create; their failures
/// are logged, not fatal (runtime spec).
fn run_spec_hooks(store: &StateStore, st: &ContainerState, point: HookPoint) {
    let Ok(dir) = store.dir(&st.id) else { return };
    let Ok(text) = std::fs::read(dir.join(CONFIG_COPY)) else {
        return;
    };
    let Ok((spec, _)) = husk_runtime::bundle::parse_spec(&text, &dir.join(CONFIG_COPY)) else {
        return;
    };
    let Some(h) = spec.hooks() else { return };
    let mut doc = oci_state::document(st);
    let (kind, list) = match point {
        HookPoint::Poststart => {
            if h.start_container().as_ref().is_some_and(|l| !l.is_empty()) {
                tracing::warn!(
                    "startContainer hooks are not run: they would have to run inside the VM"
                );
            }
            ("poststart", h.poststart())
        }
        HookPoint::Poststop => {
            doc["status"] = "stopped".into();
            doc["pid"] = 0.into();
            ("poststop", h.poststop())
        }
    };
    if let Some(list) = list {
        let json = doc.to_string().into_bytes();
        if let Err(e) = hooks::run(kind, list, &json) {
            tracing::warn!("{e}");
        }
    }
}

/// `run`: create + start; in the foreground the monitor is this very process, so the
/// caller waits on it and it exits with the container's code.
pub fn run(g: &GlobalOpts, opts: &CreateOpts, id: &str, detach: bool, keep: bool) -> Result<i32> {
    if detach {
        create(g, opts, id)?;
        if let Err(e) = start(g, id) {
            let _ = delete(g, id, true);
            return Err(e);
        }
        return Ok(0);
    }
    prepare(g, opts, id, true)?;
    let store = StateStore::new(&g.root);
    let mopts = MonitorOptions {
        console_socket: opts.console_socket.as_deref().map(absolute).transpose()?,
        terminal_on_own_stdio: true,
    };
    let monitor = match Monitor::setup(g, id, &mopts) {
        Ok(m) => m,
        Err(e) => {
            remove_own(&store, id);
            return Err(e);
        }
    };
    if let Some(p) = &opts.pid_file {
        write_pid_file(p, std::process::id() as i32)?;
    }
    if let Err(e) = monitor.start() {
        remove_own(&store, id);
        return Err(e);
    }
    if let Ok(st) = store.load_unlocked(id) {
        run_spec_hooks(&store, &st, HookPoint::Poststart);
    }
    let code = monitor.wait();
    if !keep {
        remove_own(&store, id);
    }
    Ok(code)
}

/// Deletes a container whose monitor is this process (foreground `run`).
fn remove_own(store: &StateStore, id: &str) {
    let Ok(lock) = store.lock(id) else { return };
    if let Ok(st) = store.load(&lock) {
        if let Some(v) = st.virtiofsd {
            v.signal(Signal::SIGKILL);
        }
        run_spec_hooks(store, &st, HookPoint::Poststop);
    }
    let _ = store.remove(lock);
}

/// Marks a container paused or running after the agent froze or thawed it.
pub fn set_status(store: &StateStore, id: &str, status: Status) -> Result<()> {
    update(store, id, |st| st.status = status).map(drop)
}
