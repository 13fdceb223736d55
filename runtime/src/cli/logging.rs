//! Logging: tracing to stderr or the `--log` file, as text or JSON. stdout carries only
//! OCI output (state, list, ps, features, spec, events).
//!
//! The monitors' stderr is the container's stderr, so without `--log` they log to
//! `monitor.log` in the container's state directory instead.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use tracing_subscriber::EnvFilter;

use super::{Command, GlobalOpts, LogFormat};
use husk_runtime::state::MONITOR_LOG;

/// Where the final error of a failed command goes besides stderr.
pub struct LogHandle {
    file: Option<PathBuf>,
    format: LogFormat,
}

impl LogHandle {
    /// Reports a failure: on stderr, and in the log file in runc's shape (conmon and
    /// podman read `{"level":"error","msg":...}` lines from the `--log` file).
    pub fn error(&self, msg: &str) {
        eprintln!("husk: {msg}");
        let Some(path) = &self.file else { return };
        let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) else {
            return;
        };
        let time = husk_runtime::time::rfc3339(std::time::SystemTime::now());
        let line = match self.format {
            LogFormat::Json => {
                serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
            }
            LogFormat::Text => format!("time={time:?} level=error msg={msg:?}"),
        };
        let _ = writeln!(f, "{line}");
    }
}

fn level(global: &GlobalOpts) -> String {
    if global.debug {
        return "debug".into();
    }
    husk_runtime::config::Config::load()
        .map(|c| c.log_level)
        .unwrap_or_else(|_| "warn".into())
}

/// Sets up the global subscriber.
pub fn init(global: &GlobalOpts, command: &Command) -> Result<LogHandle> {
    let monitor_id = match command {
        Command::Monitor(a) => Some(a.id.as_str()),
        Command::ExecMonitor(a) => Some(a.id.as_str()),
        _ => None,
    };
    let file = match (&global.log, monitor_id) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(id)) => Some(global.root.join(id).join(MONITOR_LOG)),
        (None, None) => None,
    };
    let text = std::env::var("HUSK_LOG")
        .ok()
        .filter(|f| EnvFilter::try_new(f).is_ok())
        .unwrap_or_else(|| level(global));
    let filter = EnvFilter::try_new(&text).context("log filter")?;
    // A monitor's VMM process writes to the same log at the same level (not to the
    // monitor's stderr, which is the container's).
    husk_runtime::vm_config::set_vmm_logging(husk_runtime::vm_config::VmmLogging {
        filter: text.clone(),
        file: file.clone(),
        json: matches!(global.log_format, LogFormat::Json),
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match &file {
        Some(path) => {
            let f = open_log(path)?;
            let writer = Mutex::new(f);
            match global.log_format {
                LogFormat::Json => builder
                    .json()
                    .flatten_event(true)
                    .with_writer(writer)
                    .try_init(),
                LogFormat::Text => builder.with_ansi(false).with_writer(writer).try_init(),
            }
        }
        None => match global.log_format {
            LogFormat::Json => builder
                .json()
                .flatten_event(true)
                .with_writer(std::io::stderr)
                .try_init(),
            LogFormat::Text => builder.with_writer(std::io::stderr).try_init(),
        },
    }
    .map_err(|e| anyhow::anyhow!("setting up logging: {e}"))?;
    Ok(LogHandle {
        file,
        format: global.log_format,
    })
}

fn open_log(path: &Path) -> Result<File> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating log directory {}", parent.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log file {}", path.display()))
}
