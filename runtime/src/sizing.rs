//! How big a container's VM is: annotations `io.husk.vcpus` / `io.husk.memory_mib` win;
//! otherwise the spec's limits plus an overhead; otherwise the configured defaults. Memory
//! is rounded up to the CPU template's granularity (128 MiB on nested-PVM hosts).

use std::collections::HashMap;

use husk_vmm::config::{MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
use husk_vmm::cpu_template::CpuTemplate;
use oci_spec::runtime::Spec;

use crate::config::Config;

pub const ANNOTATION_VCPUS: &str = "io.husk.vcpus";
pub const ANNOTATION_MEMORY_MIB: &str = "io.husk.memory_mib";
/// What the VM's host processes need beyond guest RAM (VMM, monitor, virtiofsd and its
/// page cache, page tables: about 15 MiB measured, with room to spare). The host cgroup's
/// memory limit is the VM's memory plus this, when the spec sets a memory limit.
pub const HOST_MEMORY_OVERHEAD_MIB: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u8,
    pub memory_mib: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("annotation {key}={value:?}: {why}")]
    Annotation {
        key: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "linux.resources.memory.limit asks for {limit_mib} MiB; with the {overhead_mib} MiB VM overhead that exceeds the VMM's {MAX_MEMORY_MIB} MiB"
    )]
    TooMuchMemory { limit_mib: u64, overhead_mib: u64 },
}

const MIB: i64 = 1 << 20;

/// Sizes the VM of `spec`. `template` rounds the memory.
pub fn vm_size(spec: &Spec, config: &Config, template: CpuTemplate) -> Result<VmSize, SizingError> {
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());

    let vcpus = match annotations.get(ANNOTATION_VCPUS) {
        Some(v) => {
            let n: u32 = v.trim().parse().map_err(|_| SizingError::Annotation {
                key: ANNOTATION_VCPUS,
                value: v.clone(),
                why: "not a number".into(),
            })?;
            if n == 0 || n > MAX_VCPUS {
                return Err(SizingError::Annotation {
                    key: ANNOTATION_VCPUS,
                    value: v.clone(),
                    why: format!("must be between 1 and {MAX_VCPUS}"),
                });
            }
            n as u8
        }
        None => {
            // A CFS quota of q per period p allows ceil(q/p) CPUs' worth of time.
            let cpu = resources.and_then(|r| r.cpu().as_ref());
            match (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period())) {
                (Some(q), Some(p)) if q > 0 && p > 0 => {
                    (q as u64).div_ceil(p).clamp(1, u64::from(MAX_VCPUS)) as u8
                }
                _ => config.vcpus,
            }
        }
    };

    let memory_mib = match annotations.get(ANNOTATION_MEMORY_MIB) {
        Some(v) => {
            let n: u64 = v.trim().parse().map_err(|_| SizingError::Annotation {
                key: ANNOTATION_MEMORY_MIB,
                value: v.clone(),
                why: "not a number".into(),
            })?;
            if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&n) {
                return Err(SizingError::Annotation {
                    key: ANNOTATION_MEMORY_MIB,
                    value: v.clone(),
                    why: format!("must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}"),
                });
            }
            n
        }
        None => match resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
        {
            // Negative limits mean "unlimited" in the OCI spec.
            Some(limit) if limit > 0 => {
                let limit_mib = (limit + MIB - 1) as u64 / MIB as u64;
                let want = limit_mib + config.memory_overhead_mib;
                if want > MAX_MEMORY_MIB {
                    return Err(SizingError::TooMuchMemory {
                        limit_mib,
                        overhead_mib: config.memory_overhead_mib,
                    });
                }
                want.max(MIN_MEMORY_MIB)
            }
            _ => config.memory_mib,
        },
    };
    Ok(VmSize {
        vcpus,
        memory_mib: template.memory_mib(memory_mib).min(MAX_MEMORY_MIB),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::Path;

    fn spec(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    fn config() -> Config {
        Config::parse("", Path::new("/c.toml")).unwrap()
    }

    #[test]
    fn defaults_without_limits() {
        let s = spec(json!({"ociVersion": "1.0.2"}));
        assert_eq!(
            vm_size(&s, &config(), CpuTemplate::None).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 128
            }
        );
    }

    #[test]
    fn limits_plus_overhead_rounded_by_template() {
        let s = spec(json!({"ociVersion": "1.0.2", "linux": {"resources": {
            "memory": {"limit": 100 * 1024 * 1024},
            "cpu": {"quota": 150000, "period": 100000}}}}));
        assert_eq!(
            vm_size(&s, &config(), CpuTemplate::None).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 164
            }
        );
        assert_eq!(
            vm_size(&s, &config(), CpuTemplate::Pvm).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 256
            }
        );
    }

    #[test]
    fn annotations_override_and_are_checked() {
        let s = spec(json!({"ociVersion": "1.0.2",
            "annotations": {"io.husk.vcpus": "4", "io.husk.memory_mib": "300"},
            "linux": {"resources": {"memory": {"limit": 1 << 30}}}}));
        assert_eq!(
            vm_size(&s, &config(), CpuTemplate::None).unwrap(),
            VmSize {
                vcpus: 4,
                memory_mib: 300
            }
        );
        let bad = spec(json!({"ociVersion": "1.0.2", "annotations": {"io.husk.vcpus": "many"}}));
        let err = vm_size(&bad, &config(), CpuTemplate::None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("io.husk.vcpus") && err.contains("many"),
            "{err}"
        );
        let bad = spec(json!({"ociVersion": "1.0.2", "annotations": {"io.husk.memory_mib": "8"}}));
        let err = vm_size(&bad, &config(), CpuTemplate::None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("io.husk.memory_mib"), "{err}");
    }

    #[test]
    fn unlimited_memory_uses_the_default() {
        let s =
            spec(json!({"ociVersion": "1.0.2", "linux": {"resources": {"memory": {"limit": -1}}}}));
        assert_eq!(
            vm_size(&s, &config(), CpuTemplate::None)
                .unwrap()
                .memory_mib,
            128
        );
    }
}
