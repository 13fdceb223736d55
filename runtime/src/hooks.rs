//! OCI hooks, run on the host with the container's state JSON on stdin.
//!
//! Which hooks run where (see docs/cli.md): `prestart` and `createRuntime` run in the
//! monitor once the container is created in the guest, before `create` returns;
//! `poststart` after `start`; `poststop` at `delete`. `createContainer` and
//! `startContainer` must run inside the container's namespaces, which live in the guest,
//! where host binaries are not available: husk skips them with a warning.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{kind} hook {path}: cannot start: {source}")]
    Spawn {
        kind: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} hook {path}: {status}{stderr}")]
    Failed {
        kind: &'static str,
        path: String,
        status: String,
        stderr: String,
    },
    #[error("{kind} hook {path}: timed out after {timeout:?}; killed")]
    Timeout {
        kind: &'static str,
        path: String,
        timeout: Duration,
    },
}

/// Runs `hooks` in order with `state_json` on stdin; stops at the first failure.
pub fn run(kind: &'static str, hooks: &[Hook], state_json: &[u8]) -> Result<(), HookError> {
    for hook in hooks {
        run_one(kind, hook, state_json)?;
    }
    Ok(())
}

fn run_one(kind: &'static str, hook: &Hook, state_json: &[u8]) -> Result<(), HookError> {
    let path = hook.path().display().to_string();
    let mut cmd = Command::new(hook.path());
    // args[0] is argv[0], as in execve.
    if let Some(args) = hook.args()
        && let Some((first, rest)) = args.split_first()
    {
        std::os::unix::process::CommandExt::arg0(&mut cmd, first);
        cmd.args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HookError::Spawn {
            kind,
            path: path.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: ignore EPIPE.
        let _ = stdin.write_all(state_json);
    }
    let timeout = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t as u64));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                return Err(HookError::Spawn { kind, path, source });
            }
        }
        if let Some(t) = timeout
            && start.elapsed() >= t
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::Timeout {
                kind,
                path,
                timeout: t,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
    }
    let stderr = stderr.trim();
    Err(HookError::Failed {
        kind,
        path,
        status: status.to_string(),
        stderr: if stderr.is_empty() {
            String::new()
        } else {
            format!(": {stderr}")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::HookBuilder;

    fn hook(args: &[&str], timeout: Option<i64>) -> Hook {
        let mut b = HookBuilder::default()
            .path("/bin/sh")
            .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .env(vec!["HOOK_VAR=42".to_string()]);
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b.build().unwrap()
    }

    #[test]
    fn hook_gets_state_on_stdin_args_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "cat > {}; echo \"$0 $1 $HOOK_VAR\" >> {}",
            out.display(),
            out.display()
        );
        run(
            "poststart",
            &[hook(&["myhook", "-c", &script, "arg1"], None)],
            br#"{"id":"c1"}"#,
        )
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        // sh -c SCRIPT arg1: $0 is arg1, $1 is empty.
        assert_eq!(text, "{\"id\":\"c1\"}arg1  42\n");
    }

    #[test]
    fn failing_hook_reports_status_and_stderr() {
        let err = run(
            "prestart",
            &[hook(&["sh", "-c", "echo nope >&2; exit 4"], None)],
            b"{}",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("prestart hook /bin/sh"), "{err}");
        assert!(err.contains("4"), "{err}");
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn slow_hook_times_out() {
        let err = run(
            "poststop",
            &[hook(&["sh", "-c", "sleep 30"], Some(1))],
            b"{}",
        )
        .unwrap_err();
        assert!(matches!(err, HookError::Timeout { .. }), "{err}");
    }

    #[test]
    fn missing_hook_binary() {
        let h = HookBuilder::default()
            .path("/nonexistent/hook")
            .build()
            .unwrap();
        let err = run("poststart", &[h], b"{}").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/hook"), "{err}");
    }
}
