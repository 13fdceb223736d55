//! The pod's DNS settings for the guest. containerd's CRI plugin writes the pod's
//! resolv.conf (the kubelet's DNS config, or a copy of the node's) and binds it at
//! /etc/resolv.conf of the sandbox container, there for VM runtimes to read. The shim
//! parses it into CreateSandbox's dns fields; the agent writes it to the sandbox folder
//! (and the guest's own /etc/resolv.conf), and the pod's containers, whose specs bind the
//! same host file at /etc/resolv.conf, bind `sandbox://resolv.conf` instead: a guest file,
//! one virtio-fs bind fewer per container.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Where CRI binds the pod's resolv.conf in the sandbox spec.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// resolv.conf's `nameserver`, `search` (or `domain`) and `options` entries.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodDns {
    pub servers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

impl PodDns {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.search.is_empty() && self.options.is_empty()
    }
}

/// Parses resolv.conf text as the resolver does: `#`/`;` comments, the last of
/// `search`/`domain` wins, `options` accumulate. Entries the agent would refuse (a
/// nameserver that is not a plain IP address, such as `fe80::1%eth0`) are dropped with a
/// warning rather than failing the pod.
pub fn parse(text: &str) -> PodDns {
    let mut dns = PodDns::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(key) = words.next() else { continue };
        match key {
            "nameserver" => match words.next() {
                Some(s) if s.parse::<IpAddr>().is_ok() => dns.servers.push(s.to_owned()),
                other => tracing::warn!(
                    "resolv.conf: nameserver {other:?} is not an IP address; not passed to the guest"
                ),
            },
            "search" | "domain" => dns.search = words.map(str::to_owned).collect(),
            "options" => dns.options.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    dns
}

/// The pod's DNS and the host file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDns {
    pub source: PathBuf,
    pub dns: PodDns,
}

/// The DNS settings of a sandbox spec: the file bound at /etc/resolv.conf, if any and if
/// it has any settings (else containers keep binding the file itself). Unreadable is an
/// error (the pod's DNS would silently be missing in the guest).
pub fn from_sandbox_spec(spec: &Value) -> anyhow::Result<Option<GuestDns>> {
    let source = spec
        .get("mounts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|m| m.get("destination").and_then(Value::as_str) == Some(RESOLV_CONF))
        .filter_map(|m| m.get("source").and_then(Value::as_str))
        .next_back();
    let Some(source) = source else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(Path::new(source))
        .map_err(|e| anyhow::anyhow!("reading the pod's resolv.conf {source}: {e}"))?;
    let dns = parse(&text);
    Ok((!dns.is_empty()).then(|| GuestDns {
        source: PathBuf::from(source),
        dns,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_what_the_resolver_reads() {
        let dns = parse(
            "# generated\n\
             domain old.example\n\
             nameserver 10.96.0.10\n\
             nameserver fd00::a ; comment\n\
             nameserver fe80::1%eth0\n\
             nameserver not-an-ip\n\
             search default.svc.cluster.local svc.cluster.local\n\
             options ndots:5\n\
             options timeout:2 attempts:3\n\
             sortlist 130.155.160.0/255.255.240.0\n",
        );
        assert_eq!(dns.servers, ["10.96.0.10", "fd00::a"]);
        assert_eq!(
            dns.search,
            ["default.svc.cluster.local", "svc.cluster.local"]
        );
        assert_eq!(dns.options, ["ndots:5", "timeout:2", "attempts:3"]);
        assert!(parse("# nothing\n\n").is_empty());
    }

    #[test]
    fn reads_the_file_bound_at_etc_resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        std::fs::write(&file, "nameserver 1.1.1.1\nsearch pod.local\n").unwrap();
        let spec = json!({"mounts": [
            {"destination": "/dev/shm", "source": "/run/shm", "type": "bind"},
            {"destination": "/etc/resolv.conf", "source": file, "type": "bind"},
        ]});
        let found = from_sandbox_spec(&spec).unwrap().expect("a resolv.conf");
        assert_eq!(found.source, file);
        let dns = found.dns;
        assert_eq!(dns.servers, ["1.1.1.1"]);
        assert_eq!(dns.search, ["pod.local"]);

        assert_eq!(from_sandbox_spec(&json!({"mounts": []})).unwrap(), None);
        std::fs::write(&file, "# no settings\n").unwrap();
        assert_eq!(from_sandbox_spec(&spec).unwrap(), None);
        let missing = json!({"mounts": [
            {"destination": "/etc/resolv.conf", "source": dir.path().join("gone")},
        ]});
        let err = from_sandbox_spec(&missing).unwrap_err().to_string();
        assert!(err.contains("gone"), "{err}");
    }
}
