//! What this host can run.

use std::fs::OpenOptions;

/// Why VMs cannot boot here, or `None` when `/dev/kvm` is usable.
pub fn kvm_unavailable_reason() -> Option<String> {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened read-write: {e}")),
    }
}

/// Skips the calling test, saying why, when this host cannot boot VMs.
/// Returns true when the test should return early.
pub fn skip_without_kvm(test: &str) -> bool {
    match kvm_unavailable_reason() {
        Some(reason) => {
            eprintln!("SKIPPED {test}: {reason}; this test boots a real micro-VM");
            true
        }
        None => false,
    }
}

/// The folders of cgroup `rel` (a path below the hierarchies' roots) that exist, one per
/// mounted cgroup hierarchy (v1 controllers or the v2 tree).
pub fn cgroup_folders(rel: &str) -> Vec<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split(' ').next()?;
            let fields: Vec<&str> = left.split(' ').collect();
            let point = fields.get(4)?;
            (matches!(fstype, "cgroup" | "cgroup2") && fields.get(3) == Some(&"/"))
                .then(|| std::path::Path::new(point).join(rel.trim_start_matches('/')))
        })
        .filter(|p| p.is_dir())
        .collect()
}

/// The first of `files` found in any of `folders`, trimmed: a limit is in whichever
/// hierarchy has its controller.
pub fn cgroup_value(folders: &[std::path::PathBuf], files: &[&str]) -> Option<String> {
    folders.iter().find_map(|d| {
        files
            .iter()
            .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
            .map(|v| v.trim().to_owned())
    })
}
