//! Standard streams of container processes: /dev/null for streams the host left empty,
//! the stdio broker (`crate::stdio`) for the others.

use std::fs::File;
use std::os::fd::OwnedFd;

use husk_container::Stdio;
use husk_protocol::agent::StdioStreams;

use super::error::Failure;

use crate::stdio::{StdioBroker, StdioError, StdioRequest};

/// The host's stream ids of one process (None: /dev/null).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamIds {
    pub stdin: Option<String>,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub terminal: Option<String>,
}

fn id(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl StreamIds {
    /// Checks the ids against the terminal flag: a terminal process has one pty stream
    /// (and optionally a stdin id for CloseStdin), no stdout/stderr.
    pub fn from_proto(
        what: &str,
        s: Option<&StdioStreams>,
        terminal: bool,
    ) -> Result<Self, Failure> {
        let Some(s) = s else {
            return Ok(Self::default());
        };
        let ids = StreamIds {
            stdin: id(&s.stdin),
            stdout: id(&s.stdout),
            stderr: id(&s.stderr),
            terminal: id(&s.terminal),
        };
        if ids.terminal.is_some() && !terminal {
            return Err(Failure::invalid(
                what,
                "stdio.terminal is set but terminal is false",
            ));
        }
        if terminal && (ids.stdout.is_some() || ids.stderr.is_some()) {
            return Err(Failure::invalid(
                what,
                "a terminal process has no separate stdout/stderr streams",
            ));
        }
        Ok(ids)
    }

    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// fds 0-2 on /dev/null.
pub fn dev_null() -> Result<Stdio, Failure> {
    let open = |write: bool| {
        File::options()
            .read(!write)
            .write(write)
            .open("/dev/null")
            .map_err(|e| Failure::os("opening /dev/null", &e))
    };
    Ok(Stdio::Fds {
        stdin: open(false)?.into(),
        stdout: open(true)?.into(),
        stderr: open(true)?.into(),
    })
}

/// The stdio broker the agent's stdio listener serves.
pub type Broker = StdioBroker;

/// What the process gets for `ids`.
pub fn prepare(
    broker: &Broker,
    what: &str,
    ids: &StreamIds,
    terminal: bool,
) -> Result<Stdio, Failure> {
    if ids.is_empty() && !terminal {
        return dev_null();
    }
    if terminal && ids.terminal.is_none() {
        return Err(Failure::invalid(
            what,
            "terminal is true but stdio.terminal is empty",
        ));
    }
    let req = StdioRequest {
        stdin: ids.stdin.clone(),
        stdout: ids.stdout.clone(),
        stderr: ids.stderr.clone(),
        terminal: ids.terminal.clone(),
    };
    broker
        .prepare(req)
        .map(|p| p.stdio)
        .map_err(|e| prepare_failure(&format!("{what}: stdio"), e))
}

fn prepare_failure(what: &str, e: StdioError) -> Failure {
    match e {
        StdioError::StreamIdInUse(_) => Failure::new(ttrpc::Code::ALREADY_EXISTS, what, e),
        // Out of fds or ptys is RESOURCE_EXHAUSTED, like other OS errors of the agent.
        StdioError::Sys { ref source, .. } => {
            Failure::new(Failure::os(what, source).code, what, &e)
        }
        _ => Failure::invalid(what, e),
    }
}

/// Makes the pty master that a terminal process opened in its container (`master`, from
/// the library) its terminal stream. Nothing to do for a process without a terminal.
pub fn set_terminal(
    broker: &Broker,
    what: &str,
    ids: &StreamIds,
    master: Option<OwnedFd>,
) -> Result<(), Failure> {
    let Some(tty) = ids.terminal.as_deref() else {
        return Ok(());
    };
    let Some(master) = master else {
        return Err(Failure::internal(what, "the process opened no terminal"));
    };
    broker
        .set_terminal(tty, master)
        .map_err(|e| prepare_failure(&format!("{what}: terminal"), e))
}

/// Forgets every stream of a process that is gone or never started: the agent's ends
/// that were never attached are closed (the ids can be reused), an attached stdin ends.
pub fn release(broker: &Broker, ids: &StreamIds) {
    let all = [&ids.terminal, &ids.stdin, &ids.stdout, &ids.stderr];
    for id in all.into_iter().flatten() {
        broker.release(id);
    }
}

pub fn close_stdin(broker: &Broker, what: &str, ids: &StreamIds) -> Result<(), Failure> {
    let Some(stdin) = ids.stdin.as_deref().or(ids.terminal.as_deref()) else {
        return Err(Failure::precondition(what, "has no stdin stream"));
    };
    broker
        .close_stdin(stdin)
        .map_err(|e| Failure::precondition(format!("{what}: stdin"), e))
}

pub fn resize(
    broker: &Broker,
    what: &str,
    ids: &StreamIds,
    rows: u16,
    cols: u16,
) -> Result<(), Failure> {
    let Some(tty) = ids.terminal.as_deref() else {
        return Err(Failure::precondition(what, "has no terminal"));
    };
    broker
        .resize(tty, rows, cols)
        .map_err(|e| Failure::precondition(format!("{what}: resize"), e))
}
