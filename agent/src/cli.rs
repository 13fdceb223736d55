//! Command-line arguments. Hand-rolled: the agent takes two options, and an argument
//! parser crate would add size to a binary the guest unpacks under emulation.

use std::ffi::OsString;

use tracing::level_filters::LevelFilter;

pub const USAGE: &str = "\
husk-agent: the husk guest agent (PID 1 of a husk micro-VM; ttrpc API on vsock)

USAGE:
    husk-agent [--listen ADDR] [--stdio-listen ADDR] [--log-level LEVEL]

Run as PID 1 of the guest (the normal case) it takes no arguments: it mounts the guest's
pseudo file systems, reaps orphans, listens on vsock://-1:1024 and powers the VM off on
DestroySandbox or on a fatal error.

Run as any other process it is in HOST TEST MODE: no mounts, no reboot, and
DestroySandbox makes it exit 0. Host test mode is a test and debugging aid only. It
isolates nothing: do not use it to run workloads.

OPTIONS:
    --listen ADDR        unix:///path/agent.sock (host test mode) or vsock://CID:PORT
                         (default in the guest: vsock://-1:1024, -1 meaning any CID)
    --stdio-listen ADDR  where the host attaches container stdio streams, same forms
                         (default: the --listen path plus .stdio for unix://, else
                         vsock://-1:1025)
    --log-level LEVEL    off, error, warn, info, debug or trace (default: warn as PID 1,
                         info otherwise; in the guest also husk.agent_log=LEVEL on the
                         kernel command line)
    -h, --help           print this help
    -V, --version        print the version
";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Args {
    pub listen: Option<String>,
    pub stdio_listen: Option<String>,
    pub log_level: Option<LevelFilter>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Args),
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unknown argument {0:?}")]
    Unknown(String),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("{option}: invalid value {value:?}: {why}")]
    Invalid {
        option: &'static str,
        value: String,
        why: &'static str,
    },
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, CliError> {
    let mut parsed = Args::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg
            .into_string()
            .map_err(|raw| CliError::Unknown(raw.to_string_lossy().into_owned()))?;
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |option: &'static str| -> Result<String, CliError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => args
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or(CliError::MissingValue(option)),
            }
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--listen" => parsed.listen = Some(validate_listen("--listen", value("--listen")?)?),
            "--stdio-listen" => {
                let addr = value("--stdio-listen")?;
                parsed.stdio_listen = Some(validate_listen("--stdio-listen", addr)?);
            }
            "--log-level" => {
                let v = value("--log-level")?;
                let level = crate::cmdline::parse_level(&v).ok_or(CliError::Invalid {
                    option: "--log-level",
                    value: v,
                    why: "expected off, error, warn, info, debug or trace",
                })?;
                parsed.log_level = Some(level);
            }
            _ => return Err(CliError::Unknown(arg)),
        }
    }
    Ok(Command::Run(parsed))
}

fn validate_listen(option: &'static str, addr: String) -> Result<String, CliError> {
    let invalid = |why| CliError::Invalid {
        option,
        value: addr.clone(),
        why,
    };
    if let Some(path) = addr.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(invalid("empty socket path"));
        }
    } else if let Some(rest) = addr.strip_prefix("vsock://") {
        let (cid, port) = rest
            .split_once(':')
            .ok_or(invalid("expected vsock://CID:PORT"))?;
        if cid != "-1" && cid.parse::<u32>().is_err() {
            return Err(invalid("CID must be -1 or a number"));
        }
        if port.parse::<u32>().is_err() {
            return Err(invalid("port must be a number"));
        }
    } else {
        return Err(invalid("expected unix://PATH or vsock://CID:PORT"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Command, CliError> {
        parse(args.iter().map(OsString::from))
    }

    #[test]
    fn no_arguments_is_the_guest_default() {
        assert_eq!(run(&[]), Ok(Command::Run(Args::default())));
    }

    #[test]
    fn listen_and_level_both_spellings() {
        let expected = Command::Run(Args {
            listen: Some("unix:///tmp/a.sock".into()),
            log_level: Some(LevelFilter::DEBUG),
            ..Args::default()
        });
        assert_eq!(
            run(&["--listen", "unix:///tmp/a.sock", "--log-level", "debug"]),
            Ok(expected)
        );
        assert_eq!(
            run(&["--listen=vsock://-1:1024"]),
            Ok(Command::Run(Args {
                listen: Some("vsock://-1:1024".into()),
                ..Args::default()
            }))
        );
        assert_eq!(
            run(&["--stdio-listen=unix:///tmp/s", "--listen", "unix:///tmp/a"]),
            Ok(Command::Run(Args {
                listen: Some("unix:///tmp/a".into()),
                stdio_listen: Some("unix:///tmp/s".into()),
                ..Args::default()
            }))
        );
        assert_eq!(run(&["--help"]), Ok(Command::Help));
        assert_eq!(run(&["-V"]), Ok(Command::Version));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(run(&["--listen"]), Err(CliError::MissingValue("--listen")));
        assert!(run(&["--listen", "tcp://1.2.3.4:5"]).is_err());
        assert!(run(&["--listen", "unix://"]).is_err());
        assert!(run(&["--listen", "vsock://3"]).is_err());
        assert!(run(&["--listen", "vsock://x:1024"]).is_err());
        assert!(run(&["--log-level", "loud"]).is_err());
        assert_eq!(
            run(&["--stdio-listen"]),
            Err(CliError::MissingValue("--stdio-listen"))
        );
        assert!(matches!(
            run(&["--stdio-listen", "tcp://x"]),
            Err(CliError::Invalid {
                option: "--stdio-listen",
                ..
            })
        ));
        assert_eq!(run(&["extra"]), Err(CliError::Unknown("extra".into())));
    }
}
