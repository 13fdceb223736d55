//! `<exe> __vmm`: the VMM process the runtime starts (its own binary again, so there is no
//! second binary to find). `husk` and `containerd-shim-husk-v2` call [`main`] first thing
//! when their first argument is [`SUBCOMMAND`].
//!
//! `<exe> __vmm [--jail SPEC_JSON] [--result-fd N] [--log-json] -- <husk-vmm arguments>`
//! (`--log-json`: log lines as JSON objects, for a launcher whose log is JSON).

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Instant;

use husk_vmm::error_chain;
use husk_vmm::stop::StopReason;
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

use crate::spec::JailSpec;

pub const SUBCOMMAND: &str = "__vmm";

/// What the VMM process reports on its result pipe before it exits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Stopped(StopReason),
    /// The VM could not be built or run (or the jail not entered); the message says why.
    Failed(String),
}

struct Args {
    jail: Option<JailSpec>,
    result_fd: Option<RawFd>,
    log_json: bool,
    vmm: Vec<OsString>,
}

fn parse(args: &[OsString]) -> Result<Args, String> {
    let mut it = args.iter();
    let mut out = Args {
        jail: None,
        result_fd: None,
        log_json: false,
        vmm: vec!["husk-vmm".into()],
    };
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--jail") => {
                let v = it
                    .next()
                    .and_then(|v| v.to_str())
                    .ok_or("--jail needs a value")?;
                out.jail = Some(serde_json::from_str(v).map_err(|e| format!("--jail: {e}"))?);
            }
            Some("--result-fd") => {
                let v = it
                    .next()
                    .and_then(|v| v.to_str())
                    .ok_or("--result-fd needs a value")?;
                out.result_fd = Some(v.parse().map_err(|e| format!("--result-fd {v}: {e}"))?);
            }
            Some("--log-json") => out.log_json = true,
            Some("--") => {
                out.vmm.extend(it.cloned());
                return Ok(out);
            }
            _ => return Err(format!("unexpected argument {a:?} (the VMM's follow --)")),
        }
    }
    Err("missing -- before the VMM's arguments".into())
}

/// Runs the VMM process; never returns (exiting without unwinding: vCPU threads may still
/// be inside KVM_RUN).
pub fn main(args: &[OsString]) -> ! {
    let start = Instant::now();
    let parsed = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("husk {SUBCOMMAND}: {e}");
            std::process::exit(1);
        }
    };
    // SAFETY: the launcher passed this descriptor for us alone.
    let mut result = parsed
        .result_fd
        .map(|fd| unsafe { std::fs::File::from_raw_fd(fd) });
    let outcome = run(&parsed, start);
    let code = match &outcome {
        Outcome::Stopped(r) => r.exit_code(),
        Outcome::Failed(msg) => {
            eprintln!("husk-vmm: {msg}");
            1
        }
    };
    if let Some(f) = result.as_mut()
        && let Ok(line) = serde_json::to_string(&outcome)
    {
        let _ = writeln!(f, "{line}");
    }
    std::process::exit(code)
}

fn run(args: &Args, start: Instant) -> Outcome {
    let cli = match <husk_vmm::config::Cli as clap::Parser>::try_parse_from(&args.vmm) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string().trim().to_owned()),
    };
    let config = match cli.into_vm_config() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    match EnvFilter::try_new(&config.log_level) {
        Ok(filter) => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_target(false);
            if args.log_json {
                builder.json().flatten_event(true).init();
            } else {
                builder.init();
            }
        }
        Err(e) => return Outcome::Failed(format!("--log-level {}: {e}", config.log_level)),
    }
    // Needs /sys and /proc, which the jail has not.
    let host = husk_vmm::host::probe();
    let result = match &args.jail {
        Some(spec) => {
            let close = args.result_fd.into_iter().collect::<Vec<_>>();
            let jailed = match crate::enter::enter(spec, &close) {
                Ok(j) => j,
                Err(e) => {
                    return Outcome::Failed(format!(
                        "entering the VMM's jail: {}",
                        error_chain(&e)
                    ));
                }
            };
            tracing::debug!(?host, uid = spec.uid, gid = spec.gid, root = %spec.root.display(), "VMM jailed");
            husk_vmm::vm::run_with(&config, start, || jailed.drop_privileges())
        }
        None => husk_vmm::vm::run(&config, start),
    };
    match result {
        Ok(reason) => Outcome::Stopped(reason),
        Err(e) => Outcome::Failed(format!("the VM could not run: {}", error_chain(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_split_at_the_double_dash_and_bad_ones_are_named() {
        let a = parse(&os(&["--result-fd", "7", "--", "--kernel", "/k"])).unwrap();
        assert_eq!(a.result_fd, Some(7));
        assert!(!a.log_json);
        assert!(
            parse(&os(&["--log-json", "--", "--kernel", "/k"]))
                .unwrap()
                .log_json
        );
        assert!(a.jail.is_none());
        assert_eq!(a.vmm, os(&["husk-vmm", "--kernel", "/k"]));
        let e = parse(&os(&["--kernel", "/k"])).err().unwrap();
        assert!(e.contains("\"--kernel\""), "{e}");
        let e = parse(&os(&["--jail", "{", "--"])).err().unwrap();
        assert!(e.starts_with("--jail:"), "{e}");
        assert!(parse(&os(&["--result-fd", "x", "--"])).is_err());
        assert!(parse(&os(&[])).err().unwrap().contains("missing --"));
    }

    #[test]
    fn outcomes_survive_the_pipe() {
        for o in [
            Outcome::Stopped(StopReason::Snapshotted("/t/s".into())),
            Outcome::Stopped(StopReason::Signal(15)),
            Outcome::Failed("no kernel".into()),
        ] {
            let line = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<Outcome>(&line).unwrap(), o);
        }
    }
}
