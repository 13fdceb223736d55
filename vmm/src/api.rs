//! The VMM's control socket (`--api-socket PATH`): a Unix stream socket, owner-only, that
//! takes one JSON request per connection and answers with one JSON line.
//!
//! ```text
//! {"action":"snapshot","dir":"/path/to/folder"}
//!   -> {"ok":true, "pause_ms":..., "save_ms":..., "memory_bytes":..., "memory_written_bytes":..., "state_bytes":...}
//!   -> {"ok":false, "error":"..."}
//! ```
//! A snapshot ends the VM (the process exits 0 once the files are written), as a template
//! is taken from a VM that has booted to its agent and is not used afterwards.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A request longer than this is refused unread.
const MAX_REQUEST: u64 = 64 * 1024;
/// A client that connects and sends nothing must not hold the VMM's main thread.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a client may ask.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Pause, write the state and memory files into `dir` (created if missing, must not
    /// hold a snapshot already), then end the VM.
    Snapshot { dir: PathBuf },
}

/// The listening socket.
pub struct ApiServer {
    listener: UnixListener,
}

/// Error binding the socket.
#[derive(Debug, thiserror::Error)]
#[error("API socket {path}: {source}")]
pub struct ApiError {
    path: String,
    #[source]
    source: std::io::Error,
}

impl ApiServer {
    /// Binds `path` (which must not exist) with mode 0600.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let err = |source| ApiError {
            path: path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Self { listener })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts one pending connection and reads its request.
    pub fn accept(&self) -> Option<(UnixStream, Result<Request, String>)> {
        let (stream, _) = self.listener.accept().ok()?;
        let request = read_request(&stream);
        Some((stream, request))
    }
}

fn read_request(stream: &UnixStream) -> Result<Request, String> {
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(READ_TIMEOUT)))
        .map_err(|e| format!("setting up the connection: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| format!("reading the request: {e}"))?;
    if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request {:?}: {e}", line.trim()))
}

/// Sends the reply line; a client that went away is only logged.
pub fn reply(mut stream: UnixStream, result: Result<serde_json::Value, String>) {
    let body = match result {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.insert("ok".into(), true.into());
            serde_json::Value::Object(fields)
        }
        Ok(_) => serde_json::json!({ "ok": true }),
        Err(error) => serde_json::json!({ "ok": false, "error": error }),
    };
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    if let Err(e) = writeln!(stream, "{body}") {
        tracing::info!("API client went away before its reply: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ask(path: &Path, text: &[u8]) -> UnixStream {
        let mut c = UnixStream::connect(path).unwrap();
        c.write_all(text).unwrap();
        c
    }

    #[test]
    fn requests_parse_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let server = ApiServer::bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(server.accept().is_none(), "nothing pending");

        let c = ask(&path, b"{\"action\":\"snapshot\",\"dir\":\"/tmp/x\"}\n");
        let (s, req) = server.accept().unwrap();
        assert_eq!(
            req,
            Ok(Request::Snapshot {
                dir: PathBuf::from("/tmp/x")
            })
        );
        reply(s, Ok(serde_json::json!({ "pause_ms": 1 })));
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            (v["ok"].as_bool(), v["pause_ms"].as_u64()),
            (Some(true), Some(1))
        );

        let _c = ask(&path, b"{\"action\":\"explode\"}\n");
        let (_, req) = server.accept().unwrap();
        assert!(req.unwrap_err().contains("explode"));
        let _c = ask(
            &path,
            b"{\"action\":\"snapshot\",\"dir\":\"/x\",\"extra\":1}\n",
        );
        let (_, req) = server.accept().unwrap();
        assert!(req.unwrap_err().contains("extra"));
    }
}
