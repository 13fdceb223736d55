//! Host-side client for the guest agent.
//!
//! Two ways to reach an agent:
//! - [`Target::HybridVsock`]: the VMM's Unix socket (Firecracker-compatible hybrid vsock).
//!   The client connects, sends `CONNECT <port>\n`, expects `OK <host-port>\n`, and from
//!   then on the Unix stream is the raw byte stream of a vsock connection to the guest.
//! - [`Target::Unix`]: a plain Unix socket, for an agent started in host test mode
//!   (`husk-agent --listen unix:///path`).
//!
//! The VMM's socket exists as soon as the VMM starts but the guest listens only after it
//! has booted; until then the VMM answers a `CONNECT` by closing the stream.
//! [`connect_with_retry`] keeps trying until a deadline.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use ttrpc::context::{self, Context};

use crate::AGENT_VSOCK_PORT;
use crate::agent::{
    CheckRequest, CheckResponse, CloseStdinRequest, CloseStdinResponse, ConfigureNetworkRequest,
    ConfigureNetworkResponse, CreateContainerRequest, CreateContainerResponse,
    CreateSandboxRequest, CreateSandboxResponse, DestroySandboxRequest, DestroySandboxResponse,
    ExecProcessRequest, ExecProcessResponse, GetGuestDetailsRequest, GetGuestDetailsResponse,
    GetOOMEventRequest, GetOOMEventResponse, ListProcessesRequest, ListProcessesResponse,
    PauseContainerRequest, PauseContainerResponse, RemoveContainerRequest, RemoveContainerResponse,
    RestoredRequest, RestoredResponse, ResumeContainerRequest, ResumeContainerResponse,
    SignalProcessRequest, SignalProcessResponse, StartContainerRequest, StartContainerResponse,
    StatsContainerRequest, StatsContainerResponse, TtyWinResizeRequest, TtyWinResizeResponse,
    UpdateContainerRequest, UpdateContainerResponse, WaitProcessRequest, WaitProcessResponse,
};
/// The agent's ttrpc service (`package husk.agent.v1; service AgentService`).
const AGENT_SERVICE: &str = "husk.agent.v1.AgentService";

/// Longest handshake reply accepted, newline included. `OK 4294967295\n` is 14 bytes;
/// the slack tolerates a VMM that adds a few spaces, nothing more.
pub const MAX_HANDSHAKE_LINE: usize = 32;

/// Default timeout for one RPC made through [`AgentClient`].
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// Retry pauses: start short (the guest may be a few ms from listening), grow to a cap so a
/// slow boot is not hammered with connections, each of which costs the guest work.
const BACKOFF_START: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Where the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The VMM's hybrid-vsock Unix socket and the guest vsock port behind it.
    HybridVsock { uds: PathBuf, port: u32 },
    /// A Unix socket the agent listens on directly (host test mode).
    Unix(PathBuf),
}

impl Target {
    /// The agent's port behind a VMM's hybrid-vsock socket.
    pub fn hybrid_vsock(uds: impl Into<PathBuf>) -> Self {
        Target::HybridVsock {
            uds: uds.into(),
            port: AGENT_VSOCK_PORT,
        }
    }

    /// An agent listening on a plain Unix socket (host test mode).
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Target::Unix(path.into())
    }

    /// The Unix socket path this target dials.
    pub fn socket_path(&self) -> &Path {
        match self {
            Target::HybridVsock { uds, .. } => uds,
            Target::Unix(path) => path,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::HybridVsock { uds, port } => {
                write!(f, "hvsock://{}:{port}", uds.display())
            }
            Target::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// Parses `unix://PATH` or `hvsock://PATH[:PORT]` (port defaults to
/// [`AGENT_VSOCK_PORT`]; a trailing `:<digits>` is always taken as the port).
impl FromStr for Target {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| ClientError::InvalidTarget {
            target: s.to_owned(),
            why: why.to_owned(),
        };
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(Target::unix(path));
        }
        if let Some(rest) = s.strip_prefix("hvsock://") {
            let (path, port) = match rest.rsplit_once(':') {
                Some((path, port))
                    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    let port = port
                        .parse::<u32>()
                        .map_err(|_| invalid("vsock port out of range"))?;
                    (path, port)
                }
                _ => (rest, AGENT_VSOCK_PORT),
            };
            if path.is_empty() {
                return Err(invalid("empty socket path"));
            }
            return Ok(Target::HybridVsock {
                uds: path.into(),
                port,
            });
        }
        Err(invalid("expected unix://PATH or hvsock://PATH[:PORT]"))
    }
}

/// Why the hybrid-vsock `CONNECT` handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O error during handshake: {0}")]
    Io(#[source] io::Error),
    /// The VMM closed the stream; it does so while nothing listens on the guest port yet.
    #[error("connection closed before a complete reply (received {received:?})")]
    Eof { received: String },
    #[error("unexpected reply {received:?}, expected \"OK <host-port>\"")]
    Unexpected { received: String },
    #[error("reply longer than {max} bytes without a newline (received {received:?})")]
    TooLong { received: String, max: usize },
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
}

/// How long the VMM may take to answer a `CONNECT` (it answers once the guest accepted or
/// refused, and expires connects the guest leaves pending; this bounds a VMM that does not).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading host entropy from /dev/urandom: {0}")]
    HostEntropy(#[source] io::Error),
    #[error("invalid agent target {target:?}: {why}")]
    InvalidTarget { target: String, why: String },
    #[error("connecting to {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("hybrid vsock handshake with {target} (CONNECT {port}): {source}")]
    Handshake {
        target: String,
        port: u32,
        #[source]
        source: HandshakeError,
    },
    #[error(
        "gave up connecting to the agent at {target} after {waited:?} ({attempts} attempts); last error: {last}"
    )]
    Timeout {
        target: String,
        waited: Duration,
        attempts: u32,
        last: Box<ClientError>,
    },
    /// A failed RPC. Shown as the agent's own "<what>: <why>" when the agent answered (its
    /// status is not chained as a source as well: callers print chains, and it would show
    /// twice), otherwise with the method and target.
    #[error("{}", describe_rpc_failure(method, target, error))]
    Rpc {
        method: &'static str,
        target: String,
        error: ttrpc::Error,
    },
}

fn describe_rpc_failure(method: &str, target: &str, error: &ttrpc::Error) -> String {
    match error {
        ttrpc::Error::RpcStatus(status) if !status.message.is_empty() => status.message.clone(),
        ttrpc::Error::RpcStatus(status) => {
            let code = status.code.enum_value_or_default();
            format!("{method} on agent {target} failed with status {code:?}")
        }
        other => format!("{method} on agent {target}: {other}"),
    }
}

impl ClientError {
    /// The status code of a failed RPC (None for connection-level failures).
    pub fn rpc_code(&self) -> Option<ttrpc::Code> {
        match self {
            ClientError::Rpc {
                error: ttrpc::Error::RpcStatus(status),
                ..
            } => status.code.enum_value().ok(),
            _ => None,
        }
    }

    /// The agent's message of a failed RPC ("<what>: <why>").
    pub fn rpc_message(&self) -> Option<&str> {
        match self {
            ClientError::Rpc {
                error: ttrpc::Error::RpcStatus(status),
                ..
            } => Some(status.message.as_str()),
            _ => None,
        }
    }
}

/// Runs the hybrid-vsock handshake on a connected stream to a VMM socket and returns the
/// host-side port the VMM assigned. Reads byte by byte so that nothing after the reply's
/// newline (guest data) is consumed.
pub async fn hybrid_vsock_handshake(
    stream: &mut UnixStream,
    port: u32,
) -> Result<u32, HandshakeError> {
    hybrid_vsock_handshake_within(stream, port, HANDSHAKE_TIMEOUT).await
}

/// [`hybrid_vsock_handshake`], failing with [`HandshakeError::Timeout`] after `timeout`.
pub async fn hybrid_vsock_handshake_within(
    stream: &mut UnixStream,
    port: u32,
    timeout: Duration,
) -> Result<u32, HandshakeError> {
    tokio::time::timeout(timeout, handshake_unbounded(stream, port))
        .await
        .unwrap_or(Err(HandshakeError::Timeout(timeout)))
}

async fn handshake_unbounded(stream: &mut UnixStream, port: u32) -> Result<u32, HandshakeError> {
    let request = format!("CONNECT {port}\n");
    match stream.write_all(request.as_bytes()).await {
        Ok(()) => {}
        // The VMM may close an unanswerable connection before our request is out.
        Err(e) if is_closed(&e) => {
            return Err(HandshakeError::Eof {
                received: String::new(),
            });
        }
        Err(e) => return Err(HandshakeError::Io(e)),
    }

    let mut line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
    let lossy = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    loop {
        if line.len() >= MAX_HANDSHAKE_LINE {
            return Err(HandshakeError::TooLong {
                received: lossy(&line),
                max: MAX_HANDSHAKE_LINE,
            });
        }
        let mut byte = [0u8; 1];
        let n = match stream.read(&mut byte).await {
            Ok(n) => n,
            // A reset is how some VMMs refuse; report it as what it is, an early close.
            Err(e) if is_closed(&e) => 0,
            Err(e) => return Err(HandshakeError::Io(e)),
        };
        if n == 0 {
            return Err(HandshakeError::Eof {
                received: lossy(&line),
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    parse_ok_line(&line).ok_or_else(|| HandshakeError::Unexpected {
        received: lossy(&line),
    })
}

fn is_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// `OK <u32>` (the newline already stripped), nothing else.
fn parse_ok_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("OK ")?.trim();
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Opens a byte stream to the agent: a Unix connect, plus the handshake for hybrid vsock.
pub async fn connect_stream(target: &Target) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(target.socket_path())
        .await
        .map_err(|source| ClientError::Connect {
            target: target.to_string(),
            source,
        })?;
    if let Target::HybridVsock { port, .. } = target {
        hybrid_vsock_handshake(&mut stream, *port)
            .await
            .map_err(|source| ClientError::Handshake {
                target: target.to_string(),
                port: *port,
                source,
            })?;
    }
    Ok(stream)
}

/// Connects once (no retry). Must run inside a tokio runtime: the ttrpc client spawns
/// its connection task.
pub async fn connect(target: &Target) -> Result<AgentClient, ClientError> {
    let stream = connect_stream(target).await?;
    let socket = ttrpc::r#async::transport::Socket::new(stream);
    let client = ttrpc::r#async::Client::new(socket);
    Ok(AgentClient {
        rpc: client,
        target: target.clone(),
        rpc_timeout: DEFAULT_RPC_TIMEOUT,
    })
}

/// Connects, retrying any failure with a short backoff until `deadline`, e.g. while the
/// VM boots. On timeout the error names the target and the last failure (that of the
/// attempt before, if the deadline cut the last one short).
pub async fn connect_with_retry(
    target: &Target,
    deadline: Instant,
) -> Result<AgentClient, ClientError> {
    let start = Instant::now();
    let mut backoff = BACKOFF_START;
    let mut attempts = 0u32;
    let mut previous: Option<ClientError> = None;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        // Bound each attempt too: a VMM may hold the CONNECT open while the guest is slow.
        let last = match tokio::time::timeout(remaining, connect(target)).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => e,
            // An attempt cut short by the deadline says less than the failure of the
            // attempt before it (if any): report that one.
            Err(_) => previous.take().unwrap_or_else(|| ClientError::Connect {
                target: target.to_string(),
                source: io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no handshake reply before the deadline",
                ),
            }),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(ClientError::Timeout {
                target: target.to_string(),
                waited: now.duration_since(start),
                attempts,
                last: Box::new(last),
            });
        }
        tracing::trace!(%target, attempts, error = %last, "agent not reachable yet");
        previous = Some(last);
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A connected agent client. Typed wrappers map failures to [`ClientError::Rpc`] naming
/// the method and the target. Replies are bounded before they are decoded
/// ([`crate::reply_bound`]), which the generated client cannot do: calls go through
/// [`AgentClient::call`].
#[derive(Clone)]
pub struct AgentClient {
    rpc: ttrpc::r#async::Client,
    target: Target,
    rpc_timeout: Duration,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("target", &self.target)
            .field("rpc_timeout", &self.rpc_timeout)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// The target this client was connected to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sets the timeout applied to each RPC made through the typed wrappers.
    pub fn with_rpc_timeout(mut self, timeout: Duration) -> Self {
        self.rpc_timeout = timeout;
        self
    }

    fn ctx(&self) -> Context {
        context::with_duration(self.rpc_timeout)
    }

    /// One RPC of the agent's service: the request encoded, the reply's field count
    /// checked against [`crate::reply_bound::MAX_REPLY_FIELDS`], then decoded.
    async fn call<Req: protobuf::Message, Resp: protobuf::Message>(
        &self,
        method: &'static str,
        ctx: Context,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        let fail = |e: String| self.rpc_error(method)(ttrpc::Error::Others(e));
        let payload = req
            .write_to_bytes()
            .map_err(|e| fail(format!("encoding the request: {e}")))?;
        let mut request = ttrpc::Request::new();
        request.service = AGENT_SERVICE.to_owned();
        request.method = method.to_owned();
        request.timeout_nano = ctx.timeout_nano;
        request.metadata = context::to_pb(ctx.metadata);
        request.payload = payload;
        let reply = self
            .rpc
            .request(request)
            .await
            .map_err(self.rpc_error(method))?;
        crate::reply_bound::check(&reply.payload).map_err(|e| fail(e.to_string()))?;
        Resp::parse_from_bytes(&reply.payload).map_err(|e| fail(format!("decoding the reply: {e}")))
    }

    fn rpc_error(&self, method: &'static str) -> impl FnOnce(ttrpc::Error) -> ClientError + '_ {
        move |error| ClientError::Rpc {
            method,
            target: self.target.to_string(),
            error,
        }
    }

    /// `Check`: health and agent version.
    pub async fn check(&self) -> Result<CheckResponse, ClientError> {
        self.call::<_, CheckResponse>("Check", self.ctx(), &CheckRequest::new())
            .await
    }

    /// `GetGuestDetails`: kernel, memory, CPUs, boot id, uptime.
    pub async fn get_guest_details(&self) -> Result<GetGuestDetailsResponse, ClientError> {
        self.call::<_, GetGuestDetailsResponse>(
            "GetGuestDetails",
            self.ctx(),
            &GetGuestDetailsRequest::new(),
        )
        .await
    }

    /// [`restored`](Self::restored) with 64 bytes of the host's entropy and the host's
    /// clock: what every clone of a snapshot needs before anything else runs in it (clones
    /// share the snapshot's CRNG state and a clock that stood still).
    pub async fn restored_from_host(&self) -> Result<i64, ClientError> {
        let mut entropy = vec![0u8; 64];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut entropy))
            .map_err(ClientError::HostEntropy)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default();
        self.restored(entropy, now).await
    }

    /// `Restored`: reseeds the guest's CRNG with `entropy` and sets its wall clock to
    /// `realtime_ns`; returns the guest's wall clock right after.
    pub async fn restored(&self, entropy: Vec<u8>, realtime_ns: i64) -> Result<i64, ClientError> {
        let mut req = RestoredRequest::new();
        req.entropy = entropy;
        req.realtime_ns = realtime_ns;
        self.call::<_, RestoredResponse>("Restored", self.ctx(), &req)
            .await
            .map(|r| r.realtime_ns)
    }

    /// `CreateSandbox`: hostname, DNS, shared mounts, sysctls; returns the sandbox dir.
    pub async fn create_sandbox(
        &self,
        req: &CreateSandboxRequest,
    ) -> Result<CreateSandboxResponse, ClientError> {
        self.call::<_, CreateSandboxResponse>("CreateSandbox", self.ctx(), req)
            .await
    }

    /// `CreateContainer`: the init is created and held; returns its pid.
    pub async fn create_container(
        &self,
        req: &CreateContainerRequest,
    ) -> Result<CreateContainerResponse, ClientError> {
        self.call::<_, CreateContainerResponse>("CreateContainer", self.ctx(), req)
            .await
    }

    /// `StartContainer`: runs the user's program of a created container; returns the steps
    /// the agent took ([`crate::steps`]).
    pub async fn start_container(
        &self,
        container_id: &str,
    ) -> Result<Vec<crate::agent::Step>, ClientError> {
        let mut req = StartContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.call::<_, StartContainerResponse>("StartContainer", self.ctx(), &req)
            .await
            .map(|r| r.steps)
    }

    /// `ExecProcess`: a new process in a running container; returns its pid.
    pub async fn exec_process(
        &self,
        req: &ExecProcessRequest,
    ) -> Result<ExecProcessResponse, ClientError> {
        self.call::<_, ExecProcessResponse>("ExecProcess", self.ctx(), req)
            .await
    }

    /// `SignalProcess`: `exec_id` empty for the init; `all` for every process.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        let mut req = SignalProcessRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        // Negative numbers become huge and the agent rejects them as not a signal.
        req.signal = signal as u32;
        req.all = all;
        self.call::<_, SignalProcessResponse>("SignalProcess", self.ctx(), &req)
            .await
            .map(drop)
    }

    /// `WaitProcess`: waits for the exit with no RPC deadline (processes run for as long
    /// as they like); wrap it in a timeout to bound it.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, ClientError> {
        let mut req = WaitProcessRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.call::<_, WaitProcessResponse>("WaitProcess", Context::default(), &req)
            .await
    }

    /// `RemoveContainer`: kills what runs, removes mounts, cgroup and state.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        let mut req = RemoveContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.call::<_, RemoveContainerResponse>("RemoveContainer", self.ctx(), &req)
            .await
            .map(drop)
    }

    /// `ListProcesses`: guest pids of every process of the container, sorted.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        let mut req = ListProcessesRequest::new();
        req.container_id = container_id.to_owned();
        self.call::<_, ListProcessesResponse>("ListProcesses", self.ctx(), &req)
            .await
            .map(|r| r.pids)
    }

    /// `PauseContainer`: freezes the container's cgroup.
    pub async fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        let mut req = PauseContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.call::<_, PauseContainerResponse>("PauseContainer", self.ctx(), &req)
            .await
            .map(drop)
    }

    /// `ResumeContainer`: thaws the container's cgroup.
    pub async fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        let mut req = ResumeContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.call::<_, ResumeContainerResponse>("ResumeContainer", self.ctx(), &req)
            .await
            .map(drop)
    }

    /// `UpdateContainer`: `resources_json` is an OCI `linux.resources` object.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<UpdateContainerResponse, ClientError> {
        let mut req = UpdateContainerRequest::new();
        req.container_id = container_id.to_owned();
        req.resources_json = resources_json;
        self.call::<_, UpdateContainerResponse>("UpdateContainer", self.ctx(), &req)
            .await
    }

    /// `StatsContainer`: cgroup statistics.
    pub async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError> {
        let mut req = StatsContainerRequest::new();
        req.container_id = container_id.to_owned();
        self.call::<_, StatsContainerResponse>("StatsContainer", self.ctx(), &req)
            .await
    }

    /// `GetOOMEvent`: waits (no RPC deadline) for the next OOM kill; returns the
    /// container id.
    pub async fn get_oom_event(&self) -> Result<String, ClientError> {
        self.call::<_, GetOOMEventResponse>(
            "GetOOMEvent",
            Context::default(),
            &GetOOMEventRequest::new(),
        )
        .await
        .map(|r| r.container_id)
    }

    /// `TtyWinResize` of a process started with a terminal.
    pub async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        let mut req = TtyWinResizeRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        req.rows = rows;
        req.cols = cols;
        self.call::<_, TtyWinResizeResponse>("TtyWinResize", self.ctx(), &req)
            .await
            .map(drop)
    }

    /// `CloseStdin`: the process reads EOF.
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        let mut req = CloseStdinRequest::new();
        req.container_id = container_id.to_owned();
        req.exec_id = exec_id.to_owned();
        self.call::<_, CloseStdinResponse>("CloseStdin", self.ctx(), &req)
            .await
            .map(drop)
    }

    /// `ConfigureNetwork`: the guest's interfaces (found by MAC) and routes.
    pub async fn configure_network(
        &self,
        req: &ConfigureNetworkRequest,
    ) -> Result<(), ClientError> {
        self.call::<_, ConfigureNetworkResponse>("ConfigureNetwork", self.ctx(), req)
            .await
            .map(drop)
    }

    /// `DestroySandbox`: the agent replies, then powers the VM off.
    pub async fn destroy_sandbox(&self) -> Result<DestroySandboxResponse, ClientError> {
        self.call::<_, DestroySandboxResponse>(
            "DestroySandbox",
            self.ctx(),
            &DestroySandboxRequest::new(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    #[test]
    fn a_failed_rpc_shows_the_agent_message_once() {
        let status = ttrpc::get_status(
            ttrpc::Code::INTERNAL,
            "exec e1 in c1: executable \"/nope\" not found in the container (PATH /bin)",
        );
        let e = ClientError::Rpc {
            method: "ExecProcess",
            target: "hvsock:///run/x/vm.sock:1024".into(),
            error: ttrpc::Error::RpcStatus(status),
        };
        let shown = format!("{:#}", anyhow::Error::new(e).context("exec in c1"));
        assert_eq!(
            shown,
            "exec in c1: exec e1 in c1: executable \"/nope\" not found in the container (PATH /bin)"
        );
        // Without an agent answer, the method and the target say what failed.
        let e = ClientError::Rpc {
            method: "StartContainer",
            target: "hvsock:///run/x/vm.sock:1024".into(),
            error: ttrpc::Error::Others("connection reset".into()),
        };
        let shown = e.to_string();
        assert!(
            shown.starts_with("StartContainer on agent hvsock:///run/x/vm.sock:1024: "),
            "{shown}"
        );
    }

    /// A fake VMM socket: for each entry of `replies`, accept one connection, check the
    /// CONNECT line, write the reply and close (a `None` reply closes without writing).
    fn fake_vmm(path: &Path, replies: Vec<Option<Vec<u8>>>) -> JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).expect("bind fake VMM socket");
        std::thread::spawn(move || {
            let mut requests = Vec::new();
            for reply in replies {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).expect("read CONNECT line");
                requests.push(line);
                let mut stream = reader.into_inner();
                if let Some(reply) = reply {
                    // The client may hang up first on an over-long reply; that is fine.
                    let _ = stream.write_all(&reply);
                }
            }
            requests
        })
    }

    async fn handshake_with(reply: &[u8]) -> (Result<u32, HandshakeError>, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.sock");
        let server = fake_vmm(&path, vec![Some(reply.to_vec())]);
        let mut stream = UnixStream::connect(&path).await.expect("connect");
        let result = hybrid_vsock_handshake(&mut stream, 1024).await;
        drop(stream);
        let requests = server.join().expect("fake VMM thread");
        (result, requests)
    }

    #[tokio::test]
    async fn handshake_accepts_ok_reply() {
        let (result, requests) = handshake_with(b"OK 1073741824\n").await;
        assert_eq!(requests, vec!["CONNECT 1024\n".to_owned()]);
        assert_eq!(result.expect("OK accepted"), 1_073_741_824);
    }

    /// A VMM that takes the CONNECT and never answers cannot hold the host.
    #[tokio::test]
    async fn handshake_gives_up_on_a_silent_vmm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let silent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_secs(2));
            drop(stream);
        });
        let mut stream = UnixStream::connect(&path).await.expect("connect");
        let err = hybrid_vsock_handshake_within(&mut stream, 1024, Duration::from_millis(300))
            .await
            .expect_err("silence is a timeout");
        assert!(matches!(err, HandshakeError::Timeout(_)), "{err:?}");
        silent.join().expect("silent VMM");
    }

    #[tokio::test]
    async fn handshake_rejects_garbage() {
        let (result, _) = handshake_with(b"HELLO there\n").await;
        let err = result.expect_err("garbage rejected");
        assert!(matches!(err, HandshakeError::Unexpected { .. }), "{err:?}");
        assert!(err.to_string().contains("HELLO there"), "{err}");
    }

    #[tokio::test]
    async fn handshake_rejects_err_reply() {
        let (result, _) = handshake_with(b"ERR no listener\n").await;
        let err = result.expect_err("ERR rejected");
        assert!(matches!(err, HandshakeError::Unexpected { .. }), "{err:?}");
        assert!(err.to_string().contains("ERR no listener"), "{err}");
    }

    #[tokio::test]
    async fn handshake_rejects_ok_without_number() {
        let (result, _) = handshake_with(b"OK abc\n").await;
        let err = result.expect_err("non-numeric port rejected");
        assert!(err.to_string().contains("OK abc"), "{err}");
    }

    #[tokio::test]
    async fn handshake_rejects_eof() {
        let (result, _) = handshake_with(b"OK 12").await;
        let err = result.expect_err("EOF rejected");
        assert!(matches!(err, HandshakeError::Eof { .. }), "{err:?}");
        assert!(err.to_string().contains("\"OK 12\""), "{err}");

        let (result, _) = handshake_with(b"").await;
        let err = result.expect_err("immediate close rejected");
        assert!(matches!(err, HandshakeError::Eof { .. }), "{err:?}");
        assert!(err.to_string().contains("received \"\""), "{err}");
    }

    #[tokio::test]
    async fn handshake_rejects_overlong_line() {
        let reply = vec![b'A'; 200];
        let (result, _) = handshake_with(&reply).await;
        let err = result.expect_err("over-long reply rejected");
        assert!(matches!(err, HandshakeError::TooLong { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&"A".repeat(MAX_HANDSHAKE_LINE)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn handshake_leaves_guest_bytes_unread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.sock");
        let server = fake_vmm(&path, vec![Some(b"OK 7\nguest-bytes".to_vec())]);
        let mut stream = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(
            hybrid_vsock_handshake(&mut stream, 1024).await.expect("OK"),
            7
        );
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.expect("read rest");
        assert_eq!(rest, "guest-bytes");
        server.join().expect("fake VMM thread");
    }

    #[tokio::test]
    async fn retry_gives_up_at_deadline_naming_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = Target::hybrid_vsock(dir.path().join("missing.sock"));
        let start = Instant::now();
        let err = connect_with_retry(&target, start + Duration::from_millis(300))
            .await
            .expect_err("nothing listens");
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        let msg = err.to_string();
        assert!(msg.contains(&target.to_string()), "{msg}");
        assert!(msg.contains("missing.sock"), "{msg}");
        match err {
            ClientError::Timeout { attempts, last, .. } => {
                assert!(attempts > 1, "retried only {attempts} times");
                assert!(matches!(*last, ClientError::Connect { .. }), "{last:?}");
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn retry_reports_last_handshake_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.sock");
        // A VMM whose guest never listens: every CONNECT is read, then closed unanswered.
        // Reading it first keeps the close from racing the client's write (which would
        // fail with EPIPE/ECONNRESET instead of reaching the reply).
        let listener = UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
            }
        });
        let target = Target::hybrid_vsock(&path);
        let err = connect_with_retry(&target, Instant::now() + Duration::from_millis(200))
            .await
            .expect_err("guest never listens");
        let msg = err.to_string();
        assert!(msg.contains("CONNECT 1024"), "{msg}");
        assert!(msg.contains("closed before a complete reply"), "{msg}");
    }

    #[tokio::test]
    async fn retry_succeeds_once_guest_listens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.sock");
        // Two refusals (guest still booting), then an accepted connection.
        let server = fake_vmm(&path, vec![None, None, Some(b"OK 1073741825\n".to_vec())]);
        let target = Target::hybrid_vsock(&path);
        let client = connect_with_retry(&target, Instant::now() + Duration::from_secs(5))
            .await
            .expect("third attempt succeeds");
        assert_eq!(client.target(), &target);
        let requests = server.join().expect("fake VMM thread");
        assert_eq!(requests.len(), 3);
        assert!(
            requests.iter().all(|r| r == "CONNECT 1024\n"),
            "{requests:?}"
        );
    }

    #[test]
    fn target_parsing() {
        assert_eq!(
            "unix:///run/a.sock".parse::<Target>().expect("unix"),
            Target::unix("/run/a.sock")
        );
        assert_eq!(
            "hvsock:///run/v.sock".parse::<Target>().expect("hvsock"),
            Target::hybrid_vsock("/run/v.sock")
        );
        assert_eq!(
            "hvsock:///run/v.sock:2000"
                .parse::<Target>()
                .expect("hvsock port"),
            Target::HybridVsock {
                uds: "/run/v.sock".into(),
                port: 2000
            }
        );
        for bad in ["unix://", "hvsock://", "tcp://x", "hvsock:///a:99999999999"] {
            assert!(bad.parse::<Target>().is_err(), "{bad} accepted");
        }
        assert_eq!(
            Target::hybrid_vsock("/v.sock").to_string(),
            "hvsock:///v.sock:1024"
        );
    }

    /// An agent that answers StatsContainer with 500,000 empty IoDeviceStats (1 MB on the
    /// wire, a struct each once decoded), and ListProcesses honestly.
    struct HostileAgent;

    #[async_trait::async_trait]
    impl crate::agent_ttrpc::AgentService for HostileAgent {
        async fn stats_container(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: StatsContainerRequest,
        ) -> ttrpc::Result<StatsContainerResponse> {
            let mut r = StatsContainerResponse::new();
            r.io = vec![crate::agent::IoDeviceStats::new(); 500_000];
            Ok(r)
        }

        async fn list_processes(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: ListProcessesRequest,
        ) -> ttrpc::Result<ListProcessesResponse> {
            let mut r = ListProcessesResponse::new();
            r.pids = vec![1, 7, 42];
            Ok(r)
        }
    }

    #[tokio::test]
    async fn a_reply_with_too_many_fields_is_refused_undecoded() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", socket.display()))
            .unwrap()
            .register_service(crate::agent_ttrpc::create_agent_service(
                std::sync::Arc::new(HostileAgent),
            ));
        server.start().await.unwrap();
        let client = connect(&Target::unix(&socket)).await.unwrap();
        // A normal reply through the same path.
        assert_eq!(client.list_processes("c").await.unwrap(), [1, 7, 42]);
        let err = client.stats_container("c").await.unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("StatsContainer") && shown.contains("refused undecoded"),
            "{shown}"
        );
        server.shutdown().await.unwrap();
    }
}
