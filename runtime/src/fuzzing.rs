//! Fuzzing harness for a bundle's config.json as the runtime reads it: parsing (with the
//! JSON path of a bad field), the guest spec (host binds and namespace paths mapped, hooks
//! dropped) and the VM's size (annotations, CPU quota, memory limit) under operator
//! ceilings. A pod author writes this file (through CRI) or any caller of the OCI CLI does.
//!
//! # Input format
//!
//! `vcpus: u8, memory_mib: u16, max_vcpus: u8, max_memory_mib: u16` (the configuration:
//! one the runtime refuses falls back to the defaults), `mapping: u8` (what the host
//! mapping answers: bits 0-1 for a namespace path, bits 2-3 for a bind), then the
//! config.json text.
//!
//! Besides panics, the harness fails when the guest spec keeps `hooks` (they run on the
//! host, never in the guest), or a VM size is outside the operator's ceilings or below the
//! minimum.
//!
//! The cargo-fuzz target is in `runtime/fuzz/`; `cargo test -p husk-runtime --test
//! fuzz_corpus` replays its corpus.

use std::path::Path;

use husk_vmm::config::MIN_MEMORY_MIB;
use husk_vmm::cpu_template::CpuTemplate;
use serde_json::Value;

use crate::bundle::{self, HostMapping, NamespaceMapping};
use crate::config::Config;
use crate::sizing;

/// Answers of the host mapping, chosen by the input.
struct Mapping(u8);

impl HostMapping for Mapping {
    fn namespace(&mut self, kind: &str, path: &str) -> NamespaceMapping {
        match self.0 & 3 {
            0 => NamespaceMapping::Join(format!("/proc/1/ns/{kind}")),
            1 => NamespaceMapping::New,
            2 => NamespaceMapping::Inherit,
            _ => NamespaceMapping::Refuse(format!("{path} refused")),
        }
    }

    fn bind(
        &mut self,
        destination: &str,
        source: &str,
        _options: &[String],
    ) -> Result<Option<String>, String> {
        match (self.0 >> 2) & 3 {
            0 => Ok(Some(format!("/run/husk/shared/{}", destination.len()))),
            1 => Ok(None),
            2 => Err(format!("{source} refused")),
            _ => Ok(Some(source.to_owned())),
        }
    }
}

/// Runs one input (see the module documentation).
pub fn spec(data: &[u8]) {
    let get = |i: usize| data.get(i).copied().unwrap_or(0);
    let u16_at = |i: usize| u16::from_le_bytes([get(i), get(i + 1)]);
    let (vcpus, memory, max_vcpus, max_memory) = (get(0), u16_at(1), get(3), u16_at(4));
    let mapping = get(6);
    let text = data.get(7..).unwrap_or_default();

    let path = Path::new("config.json");
    let toml = format!(
        "vcpus = {vcpus}\nmemory_mib = {memory}\nmax_vcpus = {max_vcpus}\nmax_memory_mib = {max_memory}\n"
    );
    let config = Config::parse(&toml, path)
        .or_else(|_| Config::parse("", path))
        .expect("the default configuration");

    let Ok((spec, raw)) = bundle::parse_spec(text, path) else {
        return;
    };
    if let Ok((guest, _warnings)) = bundle::guest_spec(&raw, &mut Mapping(mapping)) {
        assert!(guest.get("hooks").is_none(), "hooks reached the guest spec");
        if let Some(ns) = guest
            .get("linux")
            .and_then(|l| l.get("namespaces"))
            .and_then(Value::as_array)
        {
            // A host namespace path never reaches the guest: the mapping's answer does.
            for p in ns.iter().filter_map(|n| n.get("path")?.as_str()) {
                assert!(
                    mapping & 3 == 0 && p.starts_with("/proc/1/ns/"),
                    "namespace path {p:?} reached the guest spec (mapping {mapping:#x})"
                );
            }
        }
    }
    for template in [CpuTemplate::Pvm, CpuTemplate::None] {
        if let Ok(size) = sizing::vm_size(&spec, &config, template) {
            assert!(
                size.vcpus >= 1 && size.vcpus <= config.max_vcpus,
                "{} vCPUs outside 1..={} ({template:?})",
                size.vcpus,
                config.max_vcpus
            );
            assert!(
                size.memory_mib >= MIN_MEMORY_MIB && size.memory_mib <= config.max_memory_mib,
                "{} MiB outside {MIN_MEMORY_MIB}..={} ({template:?})",
                size.memory_mib,
                config.max_memory_mib
            );
        }
    }
}

/// Seeds: `(name, input)`, configurations with the default spec and with specs that reach
/// each branch (annotations, CPU quota, memory limit, host namespaces and binds, hooks).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let input = |config: [u8; 7], spec: &Value| {
        let mut v = config.to_vec();
        v.extend_from_slice(spec.to_string().as_bytes());
        v
    };
    let defaults = [0u8; 7];
    let mut default_spec = crate::spec_default::default_spec();
    let mut out = vec![("default-spec", input(defaults, &default_spec))];
    let obj = default_spec
        .as_object_mut()
        .expect("the default spec is an object");
    obj.insert(
        "annotations".into(),
        serde_json::json!({"io.husk.vcpus": "2", "io.husk.memory_mib": "300"}),
    );
    // 2 vCPUs, 256 MiB, ceilings 4 vCPUs and 1024 MiB.
    let sized = [2, 0, 1, 4, 0, 4, 0];
    out.push(("annotations", input(sized, &default_spec)));
    let mut limits = crate::spec_default::default_spec();
    limits["linux"]["resources"] = serde_json::json!({
        "cpu": {"quota": 250000, "period": 100000},
        "memory": {"limit": 536870912}
    });
    out.push(("cpu-quota-memory-limit", input(sized, &limits)));
    let mut host = crate::spec_default::default_spec();
    host["linux"]["namespaces"] = serde_json::json!([
        {"type": "pid"},
        {"type": "network", "path": "/run/netns/cni-1"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "mount", "path": ""}
    ]);
    host["mounts"] = serde_json::json!([
        {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "source": "/var/lib/x/hosts", "options": ["bind"]},
        {"destination": "/proc", "type": "proc", "source": "proc"}
    ]);
    host["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/true"}]});
    for (name, mapping) in [
        ("host-paths-joined", 0u8),
        ("host-paths-new", 1),
        ("host-paths-refused", 3 | 8),
    ] {
        let mut config = defaults;
        config[6] = mapping;
        out.push((name, input(config, &host)));
    }
    out
}
