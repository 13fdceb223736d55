//! Checks, from the host, that a VM's VMM runs in its jail (`husk_jailer`): what its
//! process looks like in /proc is what a guest that took over the VMM would have.

use std::path::Path;

use crate::proc_stats::{command_lines, process_tree};

/// The jailed VMM processes below `ancestor` (a monitor or a shim): `__vmm` processes that
/// are PID 1 of their own PID namespace (their supervisor, outside it, is not).
pub fn jailed_vmms_below(ancestor: u32) -> Vec<u32> {
    let tree = process_tree(ancestor);
    command_lines()
        .into_iter()
        .filter(|(pid, args)| {
            tree.contains(pid) && args.get(1).is_some_and(|a| a == husk_jailer::SUBCOMMAND)
        })
        .map(|(pid, _)| pid)
        .filter(|pid| {
            let st = status(*pid);
            let ids: Vec<&str> = field(&st, "NSpid").split_whitespace().collect();
            ids.len() == 2 && ids[1] == "1"
        })
        .collect()
}

fn status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .unwrap_or("")
}

/// Asserts that `pid` is a jailed VMM: uid/gid 65534 (the default), no capabilities,
/// no_new_privs, its vCPU threads under seccomp, namespaces of its own, a root that holds
/// no host file (`/etc/passwd`) but `/dev/kvm`, and no core files. Returns its root's
/// top-level entries, for the log.
pub fn assert_jailed(pid: u32) -> Vec<String> {
    let st = status(pid);
    assert_eq!(field(&st, "Uid"), "65534\t65534\t65534\t65534", "{st}");
    assert_eq!(field(&st, "Gid"), "65534\t65534\t65534\t65534", "{st}");
    assert_eq!(field(&st, "Groups"), "", "{st}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(field(&st, caps), "0000000000000000", "{caps}: {st}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1", "{st}");
    // The vCPU threads (named vcpuN) run under their seccomp filter.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    let mut vcpus = 0;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            vcpus += 1;
            let ts = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            assert_eq!(field(&ts, "Seccomp"), "2", "{comm}: {ts}");
        }
    }
    assert!(vcpus > 0, "no vCPU thread in VMM {pid}");
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns link");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns link");
        assert_ne!(theirs, ours, "VMM {pid} shares the host's {ns} namespace");
    }
    let root = Path::new("/proc").join(pid.to_string()).join("root");
    assert!(
        !root.join("etc/passwd").exists() && !root.join("proc/self").exists(),
        "VMM {pid} sees host files"
    );
    assert!(
        root.join("dev/kvm").exists(),
        "no /dev/kvm in VMM {pid}'s root"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_default();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    let mut entries: Vec<String> = std::fs::read_dir(&root)
        .expect("the VMM's root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    entries
}
