//! `husk check`: can this host run husk, and what to do about each problem.

use std::path::Path;

use anyhow::Result;
use husk_runtime::config::Config;

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: &str) {
        println!("[ok]   {what}: {detail}");
    }
    fn fail(&mut self, what: &str, detail: &str, fix: &str) {
        self.failures += 1;
        println!("[FAIL] {what}: {detail}\n       fix: {fix}");
    }
    fn warn(&self, what: &str, detail: &str) {
        println!("[warn] {what}: {detail}");
    }
}

pub fn check() -> Result<i32> {
    let mut r = Report { failures: 0 };
    match husk_vmm::host::open_kvm("/dev/kvm") {
        Ok(_) => {
            let kind = match husk_vmm::host::probe() {
                husk_vmm::host::HostKind::Kvm => "hardware KVM (VMX/SVM)",
                husk_vmm::host::HostKind::NestedPvm => {
                    "nested PVM (kvm_pvm): the guest kernel runs in KVM's instruction emulator; VMs boot in ~15-20 s"
                }
            };
            r.ok("KVM", kind);
        }
        Err(e) => r.fail(
            "KVM",
            &e.to_string(),
            "load kvm_intel/kvm_amd (or kvm_pvm), and run husk as root or in the kvm group",
        ),
    }
    r.ok(
        "vsock",
        "husk's VMM emulates virtio-vsock in user space (hybrid vsock over a Unix socket); no vhost-vsock needed",
    );
    let config = match Config::load() {
        Ok(c) => {
            r.ok("config", &c.source);
            Some(c)
        }
        Err(e) => {
            r.fail(
                "config",
                &e.to_string(),
                "fix the named key (docs/config.md)",
            );
            None
        }
    };
    if let Some(c) = &config {
        for (what, p) in [
            ("guest kernel", c.kernel_path()),
            ("guest initramfs", c.initramfs_path()),
        ] {
            match p {
                Ok(p) => r.ok(what, &p.display().to_string()),
                Err(e) => r.fail(
                    what,
                    &e.to_string(),
                    "run guest-image/build.sh, or set the path in the config",
                ),
            }
        }
        match c.virtiofsd_path() {
            Some(p) => r.ok("virtiofsd", &p.display().to_string()),
            None if c.rootfs_mode == husk_runtime::state::RootfsMode::Virtiofs => r.fail(
                "virtiofsd",
                "not found, and rootfs_mode is virtiofs",
                "cargo install virtiofsd (needs libseccomp-dev, libcap-ng-dev), or set `virtiofsd` in the config",
            ),
            None => r.warn("virtiofsd", "not found (only needed for rootfs_mode = \"virtiofs\")"),
        }
    }
    if let Some(c) = &config {
        match (c.vmm_seccomp, husk_vmm::seccomp::probe()) {
            (husk_vmm::seccomp::SeccompMode::Enforce, Ok(())) => r.ok(
                "VMM seccomp",
                "filters on every vCPU and device thread (vmm_seccomp = \"enforce\", docs/security.md)",
            ),
            (husk_vmm::seccomp::SeccompMode::Enforce, Err(e)) => r.fail(
                "VMM seccomp",
                &e.to_string(),
                "use a kernel with CONFIG_SECCOMP_FILTER, or set vmm_seccomp = \"off\" (unconfined)",
            ),
            (husk_vmm::seccomp::SeccompMode::Off, _) => r.warn(
                "VMM seccomp",
                "none: vmm_seccomp = \"off\", vCPU and device threads run unfiltered",
            ),
        }
        let namespaces = ["mnt", "pid", "ipc", "uts"];
        let missing: Vec<&str> = namespaces
            .into_iter()
            .filter(|ns| !Path::new(&format!("/proc/self/ns/{ns}")).exists())
            .collect();
        match (
            c.vmm_jail,
            nix::unistd::geteuid().is_root(),
            missing.is_empty(),
        ) {
            (true, true, true) => r.ok(
                "VMM jail",
                &format!(
                    "each VMM is a process of its own: mount, PID, IPC and UTS namespaces, its \
                     VM's files only under a per-VM root, uid {} gid {}, no capabilities, \
                     no_new_privs (vmm_jail = \"on\", docs/security.md)",
                    c.vmm_uid, c.vmm_gid
                ),
            ),
            (true, false, _) => r.fail(
                "VMM jail",
                "entering a jail needs root",
                "run husk as root (it starts VMs), or set vmm_jail = \"off\"",
            ),
            (true, true, false) => r.fail(
                "VMM jail",
                &format!("this kernel lacks {} namespaces", missing.join(", ")),
                "use a kernel with CONFIG_NAMESPACES, or set vmm_jail = \"off\"",
            ),
            (false, _, _) => r.warn(
                "VMM jail",
                "none: vmm_jail = \"off\", the VMM runs as root with the host's files in view",
            ),
        }
    }
    match which("mkfs.ext4") {
        true => r.ok("mkfs.ext4", "found (rootfs_mode = \"block\")"),
        false => r.fail("mkfs.ext4", "not found", "apt-get install e2fsprogs"),
    }
    let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "host has cgroup v2"
    } else {
        "host has cgroup v1 (fine: container limits apply inside the VM, with cgroup v2)"
    };
    r.ok("cgroups", cgroup);
    if r.failures == 0 {
        println!("husk can run on this host");
        Ok(0)
    } else {
        println!("{} problem(s) found", r.failures);
        Ok(1)
    }
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
        || ["/sbin", "/usr/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}
