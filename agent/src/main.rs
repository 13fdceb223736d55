//! husk-agent: PID 1 of a husk micro-VM, serving the agent API (ttrpc) on vsock.
//!
//! Also runs as an ordinary host process (`--listen unix://...`) for tests: see `--help`.

mod cli;
mod cmdline;
mod containers;
mod guest;
mod init;
mod logger;
mod network;
mod power;
mod reaper;
mod restore;
mod service;
mod stdio;

use std::sync::Arc;
use std::time::Duration;

use husk_protocol::agent_ttrpc::create_agent_service;
use tokio::sync::Notify;
use tracing::level_filters::LevelFilter;

use crate::cmdline::KernelOptions;
use crate::containers::{Containers, Mode};
use crate::reaper::Reaper;
use crate::service::Agent;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the agent listens in the guest.
fn default_listen() -> String {
    format!("vsock://-1:{}", husk_protocol::AGENT_VSOCK_PORT)
}

/// Time for the DestroySandbox reply to leave the guest before processes are killed and
/// the VM resets. ttrpc writes the reply from its own task after the handler returns, and
/// the guest kernel then hands it to the VMM's vsock device; the reset would drop it.
const REPLY_FLUSH_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error(transparent)]
    Init(#[from] init::InitError),
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("child reaper stopped: {0}")]
    Reaper(#[source] std::io::Error),
    #[error("stdio listener on {addr}: {source}")]
    StdioListen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

fn main() {
    let pid1 = nix::unistd::getpid().as_raw() == 1;
    let command = cli::parse(std::env::args_os().skip(1));
    if pid1 {
        // Arguments can only come from a misconfigured kernel command line (init=...):
        // a bad one must not stop the guest from coming up.
        let args = match command {
            Ok(cli::Command::Run(args)) => args,
            _ => cli::Args::default(),
        };
        guest_main(args)
    }
    let code = match command {
        Ok(cli::Command::Run(args)) => host_main(args),
        Ok(cli::Command::Help) => {
            print!("{}", cli::USAGE);
            0
        }
        Ok(cli::Command::Version) => {
            println!("husk-agent {VERSION}");
            0
        }
        Err(e) => {
            eprint!("husk-agent: {e}\n\n{}", cli::USAGE);
            2
        }
    };
    std::process::exit(code);
}

/// PID 1 in the guest. Never returns: every way out resets the VM.
fn guest_main(args: cli::Args) -> ! {
    // panic = "abort" in the agent profile: without this hook a panic would kill PID 1
    // and panic the kernel instead of resetting cleanly.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("panic: {info}");
        power::reset()
    }));
    let result = guest_setup(args.log_level).and_then(|(opts, reaper)| {
        let stdio_listen = args
            .stdio_listen
            .unwrap_or_else(|| stdio::default_listen(None));
        let listen = args.listen.unwrap_or_else(default_listen);
        run_server(
            &listen,
            &stdio_listen,
            opts.ready_console,
            reaper,
            Mode::Guest,
        )
    });
    if let Err(e) = result {
        tracing::error!("fatal: {e}");
    }
    power::poweroff()
}

/// Mounts, stdio, logging, boot timer, cgroups. Order matters: /dev first (stdio and
/// /dev/mem live there; until stdio is fixed any open() could land on fd 0-2), then /proc
/// for the command line, then the boot-timer write as early as possible.
fn guest_setup(log_level: Option<LevelFilter>) -> Result<(KernelOptions, Reaper), AgentError> {
    let dev = init::mount_dev();
    let stdio = init::fix_stdio();
    let proc = init::mount_proc();
    let (opts, warnings) = match &proc {
        Ok(()) => match init::read_cmdline() {
            Ok(text) => cmdline::parse(&text),
            Err(e) => (KernelOptions::default(), vec![e.to_string()]),
        },
        Err(_) => (KernelOptions::default(), Vec::new()),
    };
    let timer = opts.boot_timer.map(init::write_boot_timer);

    // Logging only now: its level comes from the kernel command line (an explicit
    // --log-level wins). Earlier failures are
    // reported (or returned) from here on.
    let _ = logger::init(log_level.or(opts.log_level).unwrap_or(LevelFilter::WARN));
    for w in &warnings {
        tracing::warn!("kernel command line: {w}");
    }
    if let Err(e) = stdio {
        tracing::warn!("{e}");
    }
    dev?;
    proc?;
    if let Some(Err(e)) = timer {
        tracing::warn!("{e}");
    }
    init::mount_rest()?;
    if let Err(e) = init::enable_cgroup_controllers() {
        tracing::warn!("cgroup controllers: {e}");
    }
    tracing::debug!("guest set up");
    Ok((opts, Reaper::new()))
}

/// An ordinary host process (tests, debugging). Returns the exit code.
fn host_main(args: cli::Args) -> i32 {
    let _ = logger::init(args.log_level.unwrap_or(LevelFilter::INFO));
    let Some(listen) = args.listen else {
        tracing::error!("not PID 1: host test mode needs --listen unix:///path (see --help)");
        return 2;
    };
    let stdio_listen = args
        .stdio_listen
        .unwrap_or_else(|| stdio::default_listen(Some(&listen)));
    tracing::info!("host test mode (no isolation), listening on {listen}, stdio on {stdio_listen}");
    let result = run_server(&listen, &stdio_listen, false, Reaper::new(), Mode::Host);
    for addr in [&listen, &stdio_listen] {
        if let Some(path) = addr.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
        }
    }
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            1
        }
    }
}

/// Sandbox and container state: a tmpfs directory in the guest; in host test mode one per
/// agent process, so that agents running side by side (tests) do not share it.
fn state_dir(mode: Mode) -> std::path::PathBuf {
    match mode {
        Mode::Guest => containers::GUEST_STATE_DIR.into(),
        Mode::Host => std::env::temp_dir().join(format!("husk-agent-{}", std::process::id())),
    }
}

/// Serves until DestroySandbox (Ok) or a fatal error.
fn run_server(
    listen: &str,
    stdio_listen: &str,
    ready_console: bool,
    reaper: Reaper,
    mode: Mode,
) -> Result<(), AgentError> {
    // current_thread: every thread and every page touched costs ~2 ms at guest boot.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async {
        let listen_err = |source| AgentError::Listen {
            addr: listen.to_owned(),
            source,
        };
        let shutdown = Arc::new(Notify::new());
        let stdio_broker = stdio::StdioBroker::new();
        // The container RPCs register streams with the broker the stdio listener serves.
        let containers =
            Containers::new(mode, state_dir(mode), reaper.clone(), stdio_broker.clone());
        let agent = Arc::new(Agent::new(shutdown.clone(), containers, mode));
        let mut server = ttrpc::r#async::Server::new()
            .bind(listen)
            .map_err(listen_err)?
            .register_service(create_agent_service(agent));
        // Stdio streams (agent/src/stdio): bound before the readiness line, like the API.
        let stdio_listener =
            stdio::bind(stdio_listen).map_err(|source| AgentError::StdioListen {
                addr: stdio_listen.to_owned(),
                source,
            })?;
        let serving = stdio_broker.clone();
        tokio::spawn(async move {
            if let Err(e) = serving.serve(stdio_listener).await {
                tracing::error!("stdio listener stopped: {e}");
            }
        });
        // Bound and listening: clients that connect now wait in the backlog.
        if ready_console && let Err(e) = init::announce_ready_on_console() {
            tracing::warn!("{e}");
        }
        let reaper_task = tokio::spawn(reaper.run());
        server.start().await.map_err(listen_err)?;
        tracing::debug!("serving on {listen}");

        tokio::select! {
            () = shutdown.notified() => {}
            end = reaper_task => {
                let err = match end {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => std::io::Error::other("SIGCHLD stream ended"),
                    Err(e) => std::io::Error::other(e.to_string()),
                };
                return Err(AgentError::Reaper(err));
            }
        }
        tokio::time::sleep(REPLY_FLUSH_DELAY).await;
        Ok(())
    })
}
