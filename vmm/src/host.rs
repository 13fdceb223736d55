//! What kind of KVM host this is, and opening /dev/kvm with an error that says why not.

use std::path::Path;

use kvm_ioctls::Kvm;

/// The KVM flavour the VMM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualisation (VMX/SVM) visible to this kernel.
    Kvm,
    /// Nested PVM (`kvm_pvm` module, no VMX/SVM): the guest kernel runs in KVM's
    /// instruction emulator and needs the `pvm` CPU template.
    NestedPvm,
}

/// Decides the host kind from whether `/sys/module/kvm_pvm` exists and the text of
/// /proc/cpuinfo. Pure, so it can be tested with made-up inputs.
pub fn detect(kvm_pvm_loaded: bool, cpuinfo: &str) -> HostKind {
    let has_hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if kvm_pvm_loaded && !has_hw_virt {
        HostKind::NestedPvm
    } else {
        HostKind::Kvm
    }
}

/// Probes this machine, once per process: a jailed VMM probes before its root becomes a
/// folder without /sys and /proc.
pub fn probe() -> HostKind {
    static KIND: std::sync::OnceLock<HostKind> = std::sync::OnceLock::new();
    *KIND.get_or_init(probe_now)
}

fn probe_now() -> HostKind {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    // Unreadable cpuinfo counts as "no VMX/SVM": only matters when kvm_pvm is loaded.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    detect(pvm, &cpuinfo)
}

/// Error opening the KVM device.
#[derive(Debug, thiserror::Error)]
pub enum KvmOpenError {
    #[error("cannot open {path}: {source} (is KVM available and do you have access to it?)")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: unsupported KVM API version {version} (need 12)")]
    ApiVersion { path: String, version: i32 },
}

/// Opens `path` (normally /dev/kvm) and checks the API version.
pub fn open_kvm(path: &str) -> Result<Kvm, KvmOpenError> {
    let c_path = std::ffi::CString::new(path).map_err(|_| KvmOpenError::Open {
        path: path.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let kvm = Kvm::new_with_path(&c_path).map_err(|e| KvmOpenError::Open {
        path: path.to_string(),
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmOpenError::ApiVersion {
            path: path.to_string(),
            version,
        });
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\nbugs\t\t: spectre\n";
    const SVM: &str = "flags\t\t: fpu svm lm\n";
    const NONE: &str = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor vmxe\n\
                        processor\t: 1\nflags\t\t: fpu vme\n";

    #[test]
    fn pvm_needs_the_module_and_no_hardware_flags() {
        assert_eq!(detect(true, NONE), HostKind::NestedPvm);
        assert_eq!(detect(true, VMX), HostKind::Kvm);
        assert_eq!(detect(true, SVM), HostKind::Kvm);
        assert_eq!(detect(false, NONE), HostKind::Kvm);
        assert_eq!(detect(true, ""), HostKind::NestedPvm);
        // "vmx" must be a whole flag, not a substring of another one.
        assert_eq!(
            detect(true, "flags : vmxe avx512_vmx\n"),
            HostKind::NestedPvm
        );
    }

    #[test]
    fn missing_device_is_named_with_its_errno() {
        let err = open_kvm("/nonexistent/kvm").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/kvm"), "{err}");
        assert!(err.contains("No such file or directory"), "{err}");
    }
}
