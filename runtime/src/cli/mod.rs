//! Command line of `husk`: runc's commands and flags, dispatched to one module per idea.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

mod agent;
mod check;
mod exec;
mod info;
mod lifecycle;
mod logging;
mod monitor;
mod oci_state;
mod relay;
mod template;

/// Exit code when husk itself fails (unknown id, bad input, VM trouble).
const FAILURE: i32 = husk_runtime::exit::FAILURE;

#[derive(Parser, Debug)]
#[command(
    name = "husk",
    version,
    about = "OCI runtime that runs every container in its own KVM micro-VM (runc-compatible CLI)"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalOpts {
    /// Directory holding the containers' state.
    #[arg(long, global = true, default_value = husk_runtime::state::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// Log file (default: stderr).
    #[arg(long, global = true, value_name = "PATH")]
    pub log: Option<PathBuf>,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Debug logging.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Accepted for compatibility; husk does not manage host cgroups through systemd (limits
    /// apply inside the VM, with cgroup v2).
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,
    /// Accepted for compatibility and ignored (runc's criu path).
    #[arg(long, global = true, hide = true)]
    pub criu: Option<String>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug, Clone, Default)]
pub struct CreateOpts {
    /// Bundle directory (holding config.json).
    #[arg(short = 'b', long, default_value = ".")]
    pub bundle: PathBuf,
    /// Unix socket that receives the pty master (SCM_RIGHTS) when process.terminal is set.
    #[arg(long, value_name = "PATH")]
    pub console_socket: Option<PathBuf>,
    /// File to write the monitor's pid to (the host process that lives as long as the
    /// container).
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// Accepted; the guest agent sets up the rootfs.
    #[arg(long)]
    pub no_pivot: bool,
    /// Accepted; keyrings are the guest kernel's.
    #[arg(long)]
    pub no_new_keyring: bool,
    /// Number of extra fds to pass to the container: not supported (host fds cannot enter
    /// the VM); a non-zero value is refused.
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for compatibility (sd_notify socket); ignored.
    #[arg(long, hide = true)]
    pub notify_socket: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a container (its VM boots; the init is held until `start`).
    Create {
        #[command(flatten)]
        opts: CreateOpts,
        id: String,
    },
    /// Start a created container.
    Start { id: String },
    /// Print the OCI state of a container.
    State { id: String },
    /// Send a signal to a container's init (or every process with --all).
    Kill {
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
        id: String,
        /// Signal name or number [default: TERM].
        signal: Option<String>,
    },
    /// Delete a container and everything it left on the host.
    Delete {
        /// Kill the container if it still runs; succeed if it does not exist.
        #[arg(short, long)]
        force: bool,
        id: String,
    },
    /// Create and start a container; without --detach wait for it and delete it.
    Run {
        #[command(flatten)]
        opts: CreateOpts,
        /// Return once the container runs.
        #[arg(short, long)]
        detach: bool,
        /// Keep the container's state after it exits (no automatic delete).
        #[arg(long)]
        keep: bool,
        id: String,
    },
    /// Run a new process in a running container.
    Exec(exec::ExecArgs),
    /// List the processes of a container (pids in the guest).
    Ps {
        #[arg(short, long, default_value = "table")]
        format: String,
        id: String,
        /// `ps` options (ignored: the processes live in the VM).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        ps_args: Vec<String>,
    },
    /// List containers.
    List {
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Only ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Container statistics and OOM events as JSON lines.
    Events {
        /// Print statistics once and exit.
        #[arg(long)]
        stats: bool,
        /// Statistics interval (e.g. 5s, 500ms, 1m).
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    /// Change a running container's resource limits.
    Update(info::UpdateArgs),
    /// Print the features this runtime supports (JSON).
    Features,
    /// Write a default config.json.
    Spec {
        #[arg(short = 'b', long, default_value = ".")]
        bundle: PathBuf,
        /// Accepted; the default spec is the same.
        #[arg(long)]
        rootless: bool,
    },
    /// Check whether this host can run husk and what to fix.
    Check,
    /// Manage VM templates (snapshots restored instead of booting; docs/snapshots.md).
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Internal: the per-container monitor started by `create`.
    #[command(name = "__monitor", hide = true)]
    Monitor(monitor::MonitorArgs),
    /// Internal: the monitor of a detached exec.
    #[command(name = "__exec-monitor", hide = true)]
    ExecMonitor(exec::ExecMonitorArgs),
}

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { FAILURE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    // The monitors outlive the command that started them: they must not keep the caller's
    // other descriptors (pipes a caller waits on for EOF) open.
    match &cli.command {
        Command::Monitor(a) => close_inherited_fds(a.ready_fd),
        Command::ExecMonitor(a) => close_inherited_fds(a.ready_fd),
        _ => {}
    }
    let log = match logging::init(&cli.global, &cli.command) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("husk: {e:#}");
            return FAILURE;
        }
    };
    if cli.global.systemd_cgroup {
        tracing::warn!(
            "--systemd-cgroup has no effect of its own: a linux.cgroupsPath of the form slice:prefix:name is placed as systemd would place it, by making the folder directly (no transient unit)"
        );
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            log.error(&format!("{e:#}"));
            FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<i32> {
    let g = cli.global;
    match cli.command {
        Command::Create { opts, id } => lifecycle::create(&g, &opts, &id).map(|()| 0),
        Command::Start { id } => lifecycle::start(&g, &id).map(|()| 0),
        Command::State { id } => lifecycle::state(&g, &id).map(|()| 0),
        Command::Kill { all, id, signal } => {
            lifecycle::kill(&g, &id, signal.as_deref().unwrap_or("TERM"), all).map(|()| 0)
        }
        Command::Delete { force, id } => lifecycle::delete(&g, &id, force).map(|()| 0),
        Command::Run {
            opts,
            detach,
            keep,
            id,
        } => lifecycle::run(&g, &opts, &id, detach, keep),
        Command::Exec(args) => exec::exec(&g, args),
        Command::Ps {
            format,
            id,
            ps_args,
        } => info::ps(&g, &id, &format, &ps_args).map(|()| 0),
        Command::List { format, quiet } => info::list(&g, &format, quiet).map(|()| 0),
        Command::Pause { id } => info::pause(&g, &id).map(|()| 0),
        Command::Resume { id } => info::resume(&g, &id).map(|()| 0),
        Command::Events {
            stats,
            interval,
            id,
        } => info::events(&g, &id, stats, &interval).map(|()| 0),
        Command::Update(args) => info::update(&g, args).map(|()| 0),
        Command::Features => {
            println!(
                "{}",
                serde_json::to_string_pretty(&husk_runtime::features::features())?
            );
            Ok(0)
        }
        Command::Spec {
            bundle,
            rootless: _,
        } => info::spec(&bundle).map(|()| 0),
        Command::Check => check::check(),
        Command::Template(cmd) => template::run(&g, cmd),
        Command::Monitor(args) => Ok(monitor::main(&g, args)),
        Command::ExecMonitor(args) => Ok(exec::monitor_main(&g, args)),
    }
}

/// Closes every descriptor above stderr except `keep`.
fn close_inherited_fds(keep: Option<i32>) {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        if fd > 2 && Some(fd) != keep {
            // SAFETY: nothing in this process owns these descriptors yet (called before
            // any other set-up); the one read_dir used is already closed and fails EBADF.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn runc_style_invocations_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        assert!(matches!(
            parse(&[
                "husk",
                "--root",
                "/r",
                "--log",
                "/l",
                "--log-format",
                "json",
                "create",
                "--bundle",
                "/b",
                "--pid-file",
                "/p",
                "--console-socket",
                "/s",
                "--no-pivot",
                "c1"
            ]),
            Ok(Command::Create { .. })
        ));
        assert!(matches!(
            parse(&["husk", "kill", "--all", "c1", "KILL"]),
            Ok(Command::Kill { all: true, .. })
        ));
        assert!(matches!(
            parse(&[
                "husk",
                "exec",
                "-t",
                "--env",
                "A=1",
                "c1",
                "sh",
                "-c",
                "echo -n x"
            ]),
            Ok(Command::Exec(_))
        ));
        assert!(matches!(
            parse(&["husk", "delete", "-f", "c1"]),
            Ok(Command::Delete { force: true, .. })
        ));
        assert!(matches!(
            parse(&["husk", "--systemd-cgroup", "state", "c1"]),
            Ok(Command::State { .. })
        ));
        assert!(matches!(
            parse(&["husk", "spec", "--rootless"]),
            Ok(Command::Spec { .. })
        ));
        assert!(parse(&["husk", "frobnicate"]).is_err());
    }
}
