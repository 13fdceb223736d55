//! How containerd starts and talks to the shim: the `start` action, the long-lived server,
//! and `-info`.
//!
//! Why not `containerd_shim::asynchronous::run`: release 0.12 of the crate answers `start`
//! with a JSON document announcing task API v3 and serves only `containerd.task.v3.Task`,
//! which needs containerd 2.0. Debian 12 ships containerd 1.6, which reads `start`'s whole
//! output as the socket address and calls `containerd.task.v2.Task`. The two task APIs have
//! the same messages (v3 is a renamed copy of v2), so the server registers the generated
//! service under both names and `start` prints the bare address, which every containerd
//! from 1.6 to 2.x accepts (containerd 2.3's bootstrap protocol is not spoken yet).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use containerd_shim::{ExitSignal, Flags};
use containerd_shim_protos::protobuf::Message;
use containerd_shim_protos::shim_async::{Task, create_task};
use containerd_shim_protos::ttrpc::r#async::Server;
use containerd_shim_protos::types::introspection::RuntimeInfo;
use husk_runtime::bundle;

use crate::RUNTIME_NAME;
use crate::events::Events;
use crate::pod::Role;
use crate::service::Service;

const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";
/// What the server writes on its stdout once it listens; `start` waits for it.
const READY_LINE: &str = "READY";
/// containerd reads this file in the bundle to reconnect to the shim after a restart.
const ADDRESS_FILE: &str = "address";
const TTRPC_ADDRESS_ENV: &str = "TTRPC_ADDRESS";

/// `-info`: describes the runtime (containerd 2.x asks before creating containers).
pub fn print_info() -> Result<()> {
    let info = RuntimeInfo {
        name: RUNTIME_NAME.to_owned(),
        ..Default::default()
    };
    let bytes = info.write_to_bytes().context("encoding RuntimeInfo")?;
    std::io::stdout()
        .write_all(&bytes)
        .context("writing RuntimeInfo")?;
    Ok(())
}

/// `start`: for a container of a pod, prints the address of the pod's shim (the one its
/// sandbox container started: the pod shares that VM); otherwise spawns a server for this
/// container and its VM, waits until it listens, and prints its address.
pub fn start(flags: &Flags) -> Result<()> {
    // containerd writes the runtime options to stdin; this shim takes none. Reading them
    // keeps containerd's writer from failing on a closed pipe.
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }
    if flags.id.is_empty() || flags.namespace.is_empty() {
        bail!("start needs -id and -namespace");
    }
    // containerd runs `start` in the bundle.
    let config = std::fs::read(bundle::CONFIG_FILE)
        .with_context(|| format!("reading the bundle's {}", bundle::CONFIG_FILE))?;
    let role = Role::of_bundle(&config)
        .with_context(|| format!("reading the annotations of {}", bundle::CONFIG_FILE))?;
    if let Role::PodMember { sandbox_id } = &role {
        let address = containerd_shim::socket_address(&flags.address, &flags.namespace, sandbox_id);
        let path = address.trim_start_matches("unix://");
        if !Path::new(path).exists() {
            bail!(
                "container {} belongs to pod {sandbox_id}, but that pod has no husk shim (no socket {path}): was the pod's sandbox started with another runtime?",
                flags.id
            );
        }
        return announce_address(&address);
    }
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &flags.id);
    let exe = std::env::current_exe().context("locating our own executable")?;
    let mut cmd = Command::new(&exe);
    cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
        .args(["-address", &flags.address, "-socket", &address]);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    // Its own process group: signals meant for containerd's group must not reach it.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning the shim server {}", exe.display()))?;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        // End-of-file comes when the server, ready, points its stdout elsewhere (or dies).
        stdout
            .read_to_string(&mut out)
            .context("reading the shim server's start-up report")?;
    }
    if out.trim() != READY_LINE {
        let status = child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "still running".into());
        let _ = child.kill();
        bail!(
            "the shim server did not start ({status}): {}; its log went to containerd's log",
            out.trim()
        );
    }
    announce_address(&address)
}

/// Writes the shim's address in the bundle and prints it: the bare address, as containerd
/// 1.6 takes the whole output as the address.
fn announce_address(address: &str) -> Result<()> {
    std::fs::write(ADDRESS_FILE, address)
        .with_context(|| format!("writing {ADDRESS_FILE} in the bundle"))?;
    print!("{address}");
    std::io::stdout().flush().context("writing the address")?;
    Ok(())
}

/// The server: serves the task API until containerd shuts it down, then exits the process
/// (vCPU threads of the in-process VMM cannot be joined).
pub fn serve(flags: &Flags) -> Result<()> {
    if flags.socket.is_empty() {
        bail!("serving needs -socket (containerd runs the shim with `start` first)");
    }
    crate::logging::init(flags.debug);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(serve_until_shutdown(flags));
    match &result {
        Ok(()) => tracing::info!("shim exiting"),
        Err(e) => {
            tracing::error!("shim server failed: {e:#}");
            // `start` is still reading our stdout if we failed before READY.
            let _ = writeln!(std::io::stdout(), "ERROR {e:#}");
        }
    }
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}

async fn serve_until_shutdown(flags: &Flags) -> Result<()> {
    let ttrpc_address = std::env::var(TTRPC_ADDRESS_ENV)
        .with_context(|| format!("{TTRPC_ADDRESS_ENV} (containerd's ttrpc socket) is not set"))?;
    let events = Events::connect(&ttrpc_address, &flags.namespace).await?;
    let exit = Arc::new(ExitSignal::default());
    let service = Service::new(&flags.id, events, Arc::clone(&exit));
    let task: Arc<dyn Task + Send + Sync> = Arc::new(service);
    let mut services = create_task(Arc::clone(&task));
    if let Some(v3) = create_task(task).remove(TASK_V3) {
        services.insert(TASK_V2.to_owned(), v3);
    }

    let path = flags
        .socket
        .strip_prefix("unix://")
        .unwrap_or(&flags.socket)
        .to_owned();
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the socket folder {}", dir.display()))?;
    }
    // A socket left by a dead shim of the same id would make bind fail.
    let _ = std::fs::remove_file(&path);
    let mut server = Server::new()
        .bind(&format!("unix://{path}"))
        .with_context(|| format!("listening on {path}"))?
        .register_service(services);
    server.start().await.context("starting the ttrpc server")?;
    tracing::info!(socket = %path, "shim serving");
    announce_ready()?;

    exit.wait().await;
    if tokio::time::timeout(Duration::from_secs(3), server.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("ttrpc server did not shut down within 3 s");
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// Tells `start` we listen, then points stdout at stderr (/dev/null) so that `start` reads
/// end-of-file and returns.
fn announce_ready() -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "{READY_LINE}").context("reporting readiness")?;
    out.flush().context("reporting readiness")?;
    nix::unistd::dup2_stdout(std::io::stderr()).context("closing the start-up pipe")?;
    Ok(())
}
