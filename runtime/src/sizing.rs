//! How big a container's VM is: annotations `io.husk.vcpus` / `io.husk.memory_mib` win;
//! otherwise the spec's limits plus an overhead; otherwise the configured defaults. Memory
//! is rounded up to the CPU template's granularity (128 MiB on nested-PVM hosts). The
//! operator's `max_vcpus` / `max_memory_mib` bound every source: a pod author cannot size
//! a VM beyond them.

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
        "linux.resources.memory.limit asks for {limit_mib} MiB; with the {overhead_mib} MiB VM overhead that exceeds the {max_mib} MiB a VM may have here (max_memory_mib in {config})"
    )]
    TooMuchMemory {
        limit_mib: u64,
        overhead_mib: u64,
        max_mib: u64,
        config: String,
    },
    #[error(
        "a VM of {asked_mib} MiB is {rounded_mib} MiB in the CPU template's memory steps, above max_memory_mib = {max_mib} in {config} (make it a multiple of 128 on nested-PVM hosts)"
    )]
    RoundedAboveCeiling {
        asked_mib: u64,
        rounded_mib: u64,
        max_mib: u64,
        config: String,
    },
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
            if n > u32::from(config.max_vcpus) {
                return Err(SizingError::Annotation {
                    key: ANNOTATION_VCPUS,
                    value: v.clone(),
                    why: format!(
                        "above the operator's limit (max_vcpus = {} in {})",
                        config.max_vcpus, config.source
                    ),
                });
            }
            n as u8
        }
        None => {
            // A CFS quota of q per period p allows ceil(q/p) CPUs' worth of time.
            let cpu = resources.and_then(|r| r.cpu().as_ref());
            match (cpu.and_then(|c| c.quota()), cpu.and_then(|c| c.period())) {
                // A quota only caps CPU time: fewer vCPUs still honour it, so clamp.
                (Some(q), Some(p)) if q > 0 && p > 0 => {
                    (q as u64).div_ceil(p).clamp(1, u64::from(config.max_vcpus)) as u8
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
            if n > config.max_memory_mib {
                return Err(SizingError::Annotation {
                    key: ANNOTATION_MEMORY_MIB,
                    value: v.clone(),
                    why: format!(
                        "above the operator's limit (max_memory_mib = {} in {})",
                        config.max_memory_mib, config.source
                    ),
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
                if want > config.max_memory_mib {
                    return Err(SizingError::TooMuchMemory {
                        limit_mib,
                        overhead_mib: config.memory_overhead_mib,
                        max_mib: config.max_memory_mib,
                        config: config.source.clone(),
                    });
                }
                want.max(MIN_MEMORY_MIB)
            }
            _ => config.memory_mib,
        },
    };
    let rounded = template.memory_mib(memory_mib);
    if rounded > config.max_memory_mib {
        return Err(SizingError::RoundedAboveCeiling {
            asked_mib: memory_mib,
            rounded_mib: rounded,
            max_mib: config.max_memory_mib,
            config: config.source.clone(),
        });
    }
    Ok(VmSize {
        vcpus,
        memory_mib: rounded,
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

    /// A pod author's annotations and limits cannot go beyond the operator's ceilings.
    #[test]
    fn operator_ceilings_bound_every_source() {
        let capped = Config::parse(
            "max_vcpus = 2\nmax_memory_mib = 512\n",
            Path::new("/etc/husk/config.toml"),
        )
        .unwrap();
        let ask = |a: serde_json::Value| {
            vm_size(
                &spec(json!({"ociVersion": "1.0.2", "annotations": a})),
                &capped,
                CpuTemplate::None,
            )
        };
        let err = ask(json!({"io.husk.vcpus": "3"})).unwrap_err().to_string();
        assert!(
            err.contains("io.husk.vcpus=\"3\"")
                && err.contains("max_vcpus = 2 in /etc/husk/config.toml"),
            "{err}"
        );
        let err = ask(json!({"io.husk.memory_mib": "1024"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_memory_mib = 512"), "{err}");
        assert_eq!(
            ask(json!({"io.husk.vcpus": "2", "io.husk.memory_mib": "512"})).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 512
            }
        );
        let limited = |memory: i64, quota: i64| {
            vm_size(
                &spec(json!({"ociVersion": "1.0.2", "linux": {"resources": {
                    "memory": {"limit": memory},
                    "cpu": {"quota": quota, "period": 100000}}}})),
                &capped,
                CpuTemplate::None,
            )
        };
        // A CPU quota of 6 CPUs fits in 2 vCPUs: a quota only caps time.
        assert_eq!(limited(100 << 20, 600000).unwrap().vcpus, 2);
        let err = limited(1 << 30, 100000).unwrap_err().to_string();
        assert!(
            err.contains("1024 MiB") && err.contains("max_memory_mib"),
            "{err}"
        );
        // A 448 MiB limit + 64 MiB overhead is exactly the ceiling.
        assert_eq!(limited(448 << 20, 100000).unwrap().memory_mib, 512);
        // The PVM template's 128 MiB steps may not pass the ceiling either.
        let odd = Config::parse("max_memory_mib = 500\n", Path::new("/c.toml")).unwrap();
        let s = spec(json!({"ociVersion": "1.0.2", "annotations": {"io.husk.memory_mib": "450"}}));
        assert_eq!(
            vm_size(&s, &odd, CpuTemplate::None).unwrap().memory_mib,
            450
        );
        let err = vm_size(&s, &odd, CpuTemplate::Pvm).unwrap_err().to_string();
        assert!(
            err.contains("512 MiB") && err.contains("max_memory_mib = 500"),
            "{err}"
        );
    }

    #[test]
    fn ceilings_in_the_config_are_checked() {
        let err = Config::parse("max_vcpus = 9\n", Path::new("/c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_vcpus = 9"), "{err}");
        let err = Config::parse("vcpus = 4\nmax_vcpus = 2\n", Path::new("/c.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vcpus = 4") && err.contains("max_vcpus = 2"),
            "{err}"
        );
        let err = Config::parse(
            "memory_mib = 1024\nmax_memory_mib = 512\n",
            Path::new("/c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("above max_memory_mib = 512"), "{err}");
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
