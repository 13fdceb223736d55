//! `husk features`: what this runtime supports, in the JSON shape of `runc features`
//! (runtime-spec features.md).

use serde_json::{Value, json};

use crate::sizing::{ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS};

/// The features document.
pub fn features() -> Value {
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        // Hooks husk runs (on the host); createContainer/startContainer are accepted but
        // skipped (see docs/cli.md).
        "hooks": ["prestart", "createRuntime", "poststart", "poststop"],
        "mountOptions": [
            "async", "atime", "bind", "defaults", "dev", "diratime", "exec", "mand",
            "noatime", "nodev", "nodiratime", "noexec", "nomand", "norelatime",
            "nostrictatime", "nosuid", "private", "rbind", "relatime", "remount", "ro",
            "rprivate", "rshared", "rslave", "runbindable", "rw", "shared", "slave",
            "strictatime", "suid", "sync", "unbindable"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": capabilities(),
            "cgroup": {
                "v1": false,
                "v2": true,
                "systemd": false,
                "systemdUser": false,
                "rdma": false
            },
            "seccomp": {
                "enabled": true,
                "actions": [
                    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                    "SCMP_ACT_TRAP", "SCMP_ACT_TRACE"
                ],
                "operators": [
                    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                    "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"
                ],
                "archs": ["SCMP_ARCH_X86_64"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false}
        },
        "annotations": {
            "io.husk.runtime": "micro-VM per container (KVM)",
            "io.husk.version": env!("CARGO_PKG_VERSION"),
            ANNOTATION_VCPUS: "vCPUs of the container's VM (1-8)",
            ANNOTATION_MEMORY_MIB: "memory of the container's VM in MiB"
        }
    })
}

fn capabilities() -> Vec<&'static str> {
    vec![
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_matches_runc_features() {
        let f = features();
        assert_eq!(f["ociVersionMin"], "1.0.0");
        assert!(f["hooks"].as_array().unwrap().contains(&json!("poststop")));
        assert_eq!(f["linux"]["cgroup"]["v2"], true);
        assert_eq!(f["linux"]["cgroup"]["systemd"], false);
        assert!(f["linux"]["capabilities"].as_array().unwrap().len() >= 41);
        assert!(f["annotations"]["io.husk.vcpus"].is_string());
    }
}
