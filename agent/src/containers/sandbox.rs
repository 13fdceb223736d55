//! CreateSandbox: the per-VM setup shared by all containers (hostname, DNS, shared mounts,
//! sysctls) and the sandbox directory that `sandbox://` mount sources resolve under.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use husk_protocol::agent::CreateSandboxRequest;

use super::Mode;
use super::error::Failure;
use super::mounts::{MountSet, mount_with_options};

/// The URL-like prefix of spec mount sources that name sandbox files.
pub const SANDBOX_SCHEME: &str = "sandbox://";

#[derive(Debug)]
pub struct Sandbox {
    pub dir: PathBuf,
    mounts: MountSet,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A sysctl key: dot-separated names of `[a-z0-9_-]`, mapped to /proc/sys/a/b/c.
fn sysctl_path(key: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = key.split('.').collect();
    let ok = parts.iter().all(|p| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    });
    ok.then(|| {
        parts
            .iter()
            .fold(PathBuf::from("/proc/sys"), |acc, p| acc.join(p))
    })
}

fn line_safe(what: &str, value: &str) -> Result<(), Failure> {
    if value.is_empty() || value.contains(['\n', '\r', '\0']) || value.len() > 255 {
        return Err(Failure::invalid(
            what,
            format!("{value:?}: empty, longer than 255 bytes, or has a newline or NUL"),
        ));
    }
    Ok(())
}

impl Sandbox {
    /// Validates the whole request first, then applies it; on failure what was mounted is
    /// unmounted again.
    pub fn create(dir: PathBuf, mode: Mode, req: &CreateSandboxRequest) -> Result<Self, Failure> {
        if !req.hostname.is_empty() {
            let h = &req.hostname;
            if h.len() > 64
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            {
                return Err(Failure::invalid(
                    format!("hostname {h:?}"),
                    "must be 1-64 bytes of letters, digits, '-' and '.'",
                ));
            }
        }
        for s in &req.dns_servers {
            line_safe("dns_servers", s)?;
            if s.parse::<std::net::IpAddr>().is_err() {
                return Err(Failure::invalid(
                    format!("dns server {s:?}"),
                    "not an IP address",
                ));
            }
        }
        for s in req.dns_search.iter().chain(&req.dns_options) {
            line_safe("dns search/options", s)?;
            if s.contains(char::is_whitespace) {
                return Err(Failure::invalid(
                    format!("dns entry {s:?}"),
                    "contains whitespace",
                ));
            }
        }
        let mut sysctls = Vec::new();
        for (k, v) in &req.sysctls {
            let path = sysctl_path(k)
                .ok_or_else(|| Failure::invalid(format!("sysctl {k:?}"), "malformed key"))?;
            if v.contains(['\n', '\0']) {
                return Err(Failure::invalid(
                    format!("sysctl {k}"),
                    "value has a newline or NUL",
                ));
            }
            sysctls.push((k.clone(), path, v.clone()));
        }
        if !sysctls.is_empty() && mode == Mode::Host {
            return Err(Failure::precondition(
                "sysctls",
                "not applied in host test mode (they would change the host's)",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for m in &req.mounts {
            if !valid_name(&m.name) {
                return Err(Failure::invalid(
                    format!("sandbox mount {:?}", m.name),
                    "name must be one path component of [A-Za-z0-9_.-]",
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(Failure::exists(format!("sandbox mount {:?}", m.name)));
            }
            if m.fstype.is_empty() {
                return Err(Failure::invalid(
                    format!("sandbox mount {:?}", m.name),
                    "empty fstype",
                ));
            }
        }

        std::fs::create_dir_all(&dir)
            .map_err(|e| Failure::os(format!("mkdir {}", dir.display()), &e))?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text)
                .map_err(|e| Failure::os(format!("writing {}", p.display()), &e))
        };
        if !req.hostname.is_empty() {
            write("hostname", &format!("{}\n", req.hostname))?;
            if mode == Mode::Guest {
                nix::unistd::sethostname(&req.hostname)
                    .map_err(|e| Failure::os("sethostname", &std::io::Error::from(e)))?;
            }
        }
        if !(req.dns_servers.is_empty() && req.dns_search.is_empty() && req.dns_options.is_empty())
        {
            let mut text = String::new();
            for s in &req.dns_servers {
                let _ = writeln!(text, "nameserver {s}");
            }
            if !req.dns_search.is_empty() {
                let _ = writeln!(text, "search {}", req.dns_search.join(" "));
            }
            if !req.dns_options.is_empty() {
                let _ = writeln!(text, "options {}", req.dns_options.join(" "));
            }
            write("resolv.conf", &text)?;
            // The guest's own resolver (tools run in the agent's namespaces) uses the pod's
            // DNS too; containers bind the sandbox copy.
            if mode == Mode::Guest
                && let Err(e) = std::fs::create_dir_all("/etc")
                    .and_then(|()| std::fs::write("/etc/resolv.conf", &text))
            {
                tracing::warn!("writing the guest's /etc/resolv.conf: {e}");
            }
        }
        for (k, path, v) in &sysctls {
            std::fs::write(path, v).map_err(|e| Failure::os(format!("sysctl {k}"), &e))?;
        }
        let mut mounts = MountSet::default();
        for m in &req.mounts {
            let target = dir.join("mounts").join(&m.name);
            mount_with_options(&mut mounts, &m.source, &target, &m.fstype, &m.options)?;
        }
        Ok(Sandbox { dir, mounts })
    }

    /// Resolves `sandbox://<relative path>` to a file or directory that exists in the
    /// sandbox dir; `..` and absolute paths are refused.
    pub fn resolve(&self, source: &str) -> Result<PathBuf, Failure> {
        let rel = source.strip_prefix(SANDBOX_SCHEME).unwrap_or(source);
        let what = format!("mount source {source:?}");
        let rel_path = Path::new(rel);
        if rel.is_empty()
            || !rel_path
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(Failure::invalid(
                what,
                "must be a relative path without '..'",
            ));
        }
        let path = self.dir.join(rel_path);
        // symlink_metadata: the agent made every file here; a symlink is not one of them.
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_symlink() => Ok(path),
            Ok(_) => Err(Failure::invalid(what, "is a symlink")),
            Err(_) => Err(Failure::not_found(what)),
        }
    }

    /// Unmounts the sandbox mounts and removes the directory.
    pub fn destroy(mut self) -> Result<(), Failure> {
        self.mounts.unmount_all()?;
        std::fs::remove_dir_all(&self.dir)
            .map_err(|e| Failure::os(format!("removing {}", self.dir.display()), &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sysctl_keys() {
        assert!(valid_name("shm") && valid_name("a.b-c_1"));
        for bad in ["", ".", "..", "a/b", "a b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert_eq!(
            sysctl_path("net.ipv4.ip_forward"),
            Some(PathBuf::from("/proc/sys/net/ipv4/ip_forward"))
        );
        for bad in ["", "net..x", "net/ipv4", "../x", "net.ipv4."] {
            assert_eq!(sysctl_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn host_mode_writes_files_only_and_resolves_inside() {
        let state = tempfile::tempdir().expect("tempdir");
        let mut req = CreateSandboxRequest::new();
        req.hostname = "pod-1".into();
        req.dns_servers = vec!["1.1.1.1".into(), "fd00::1".into()];
        req.dns_options = vec!["ndots:2".into()];
        let sb = Sandbox::create(state.path().join("sb"), Mode::Host, &req).expect("create");
        let read = |f: &str| std::fs::read_to_string(sb.dir.join(f)).expect("file");
        assert_eq!(read("hostname"), "pod-1\n");
        assert_eq!(
            read("resolv.conf"),
            "nameserver 1.1.1.1\nnameserver fd00::1\noptions ndots:2\n"
        );
        assert_eq!(
            sb.resolve("sandbox://resolv.conf").expect("resolve"),
            sb.dir.join("resolv.conf")
        );
        for bad in ["sandbox://../x", "sandbox:///etc", "sandbox://"] {
            assert_eq!(
                sb.resolve(bad).expect_err(bad).code,
                ttrpc::Code::INVALID_ARGUMENT
            );
        }
        assert_eq!(
            sb.resolve("sandbox://nope").expect_err("missing").code,
            ttrpc::Code::NOT_FOUND
        );
        let dir = sb.dir.clone();
        sb.destroy().expect("destroy");
        assert!(!dir.exists());

        let mut bad = CreateSandboxRequest::new();
        bad.dns_servers = vec!["1.1.1.1\nnameserver 6.6.6.6".into()];
        assert!(Sandbox::create(state.path().join("b"), Mode::Host, &bad).is_err());
        assert!(!state.path().join("b").exists(), "validated before writing");
    }
}
