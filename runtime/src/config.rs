//! `/etc/husk/config.toml` (or the file named by `HUSK_CONFIG`): host-wide settings of the
//! `husk` CLI. Every key is optional; unknown keys are refused, naming the key. The keys
//! are documented in docs/config.md.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::state::RootfsMode;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/config.toml";
pub const CONFIG_ENV: &str = "HUSK_CONFIG";
pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 64;
pub const DEFAULT_BOOT_TIMEOUT_SECS: u64 = 120;
/// uid and gid of a jailed VMM: `nobody`/`nogroup` on Debian. Every VMM may share them: each
/// sees only its own jail and PID namespace, and is not dumpable (docs/security.md).
pub const DEFAULT_VMM_ID: u32 = 65534;

/// The file as written.
#[derive(Debug, Default, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub vcpus: Option<u8>,
    pub memory_mib: Option<u64>,
    pub memory_overhead_mib: Option<u64>,
    pub max_vcpus: Option<u8>,
    pub max_memory_mib: Option<u64>,
    pub cpu_template: Option<String>,
    pub rootfs_mode: Option<String>,
    pub virtiofsd: Option<PathBuf>,
    pub log_level: Option<String>,
    pub boot_timeout_secs: Option<u64>,
    pub guest_console: Option<PathBuf>,
    pub kernel_cmdline: Option<String>,
    pub template: Option<String>,
    pub template_dir: Option<PathBuf>,
    pub vmm_seccomp: Option<String>,
    pub vmm_jail: Option<String>,
    pub vmm_uid: Option<u32>,
    pub vmm_gid: Option<u32>,
}

/// The configuration in effect (defaults filled in, values checked).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the settings came from, for messages.
    pub source: String,
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub memory_overhead_mib: u64,
    /// Operator ceilings on a VM's size, whatever the spec or its annotations ask for.
    pub max_vcpus: u8,
    pub max_memory_mib: u64,
    pub cpu_template: String,
    pub rootfs_mode: RootfsMode,
    pub virtiofsd: Option<PathBuf>,
    pub log_level: String,
    pub boot_timeout_secs: u64,
    pub guest_console: Option<PathBuf>,
    pub kernel_cmdline: String,
    /// Restore VMs from a matching template (`husk template create`) or always boot cold.
    pub template: crate::template::TemplateMode,
    /// Where VM templates are kept; `None`: `<state root>/@templates`.
    pub template_dir: Option<PathBuf>,
    /// Seccomp filters on the VMM's vCPU and device threads (docs/security.md).
    pub vmm_seccomp: husk_vmm::seccomp::SeccompMode,
    /// The VMM runs as a jailed process of its own (`husk_jailer`), or unconfined as root.
    pub vmm_jail: bool,
    /// The unprivileged ids a jailed VMM runs as.
    pub vmm_uid: u32,
    pub vmm_gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key} = {value}: {why}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "no guest {what} found: set `{key}` in {source_desc}, or build the guest image with guest-image/build.sh (it caches {what} under {cache})"
    )]
    MissingGuestFile {
        what: &'static str,
        key: &'static str,
        source_desc: String,
        cache: String,
    },
    #[error("guest {what} {path} (from `{key}` in {source_desc}) does not exist")]
    GuestFileMissing {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        source_desc: String,
    },
}

impl Config {
    /// Loads the file named by `HUSK_CONFIG`, else /etc/husk/config.toml; a missing
    /// default file means all defaults, a missing `HUSK_CONFIG` file is an error.
    pub fn load() -> Result<Self, ConfigError> {
        match std::env::var_os(CONFIG_ENV) {
            Some(p) => Self::load_file(Path::new(&p), true),
            None => Self::load_file(Path::new(DEFAULT_CONFIG_PATH), false),
        }
    }

    pub fn load_file(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Self::from_file(FileConfig::default(), path, "defaults (no config file)")
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::from_file(file, path, &path.display().to_string())
    }

    fn from_file(file: FileConfig, path: &Path, source: &str) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, value: String, why: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value,
            why: why.to_owned(),
        };
        let vcpus = file.vcpus.unwrap_or(DEFAULT_VCPUS);
        if vcpus == 0 || u32::from(vcpus) > husk_vmm::config::MAX_VCPUS {
            return Err(invalid(
                "vcpus",
                vcpus.to_string(),
                "must be between 1 and 8",
            ));
        }
        let memory_mib = file.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if !(husk_vmm::config::MIN_MEMORY_MIB..=husk_vmm::config::MAX_MEMORY_MIB)
            .contains(&memory_mib)
        {
            return Err(invalid(
                "memory_mib",
                memory_mib.to_string(),
                &format!(
                    "must be between {} and {}",
                    husk_vmm::config::MIN_MEMORY_MIB,
                    husk_vmm::config::MAX_MEMORY_MIB
                ),
            ));
        }
        let max_vcpus = file.max_vcpus.unwrap_or(husk_vmm::config::MAX_VCPUS as u8);
        if max_vcpus == 0 || u32::from(max_vcpus) > husk_vmm::config::MAX_VCPUS {
            return Err(invalid(
                "max_vcpus",
                max_vcpus.to_string(),
                "must be between 1 and 8",
            ));
        }
        if vcpus > max_vcpus {
            return Err(invalid(
                "vcpus",
                vcpus.to_string(),
                &format!("above max_vcpus = {max_vcpus}"),
            ));
        }
        let max_memory_mib = file
            .max_memory_mib
            .unwrap_or(husk_vmm::config::MAX_MEMORY_MIB);
        if !(husk_vmm::config::MIN_MEMORY_MIB..=husk_vmm::config::MAX_MEMORY_MIB)
            .contains(&max_memory_mib)
        {
            return Err(invalid(
                "max_memory_mib",
                max_memory_mib.to_string(),
                &format!(
                    "must be between {} and {}",
                    husk_vmm::config::MIN_MEMORY_MIB,
                    husk_vmm::config::MAX_MEMORY_MIB
                ),
            ));
        }
        if memory_mib > max_memory_mib {
            return Err(invalid(
                "memory_mib",
                memory_mib.to_string(),
                &format!("above max_memory_mib = {max_memory_mib}"),
            ));
        }
        let cpu_template = file.cpu_template.unwrap_or_else(|| "auto".to_owned());
        cpu_template
            .parse::<husk_vmm::cpu_template::TemplateChoice>()
            .map_err(|why| invalid("cpu_template", cpu_template.clone(), &why))?;
        let rootfs_mode = match file.rootfs_mode {
            Some(m) => m
                .parse::<RootfsMode>()
                .map_err(|why| invalid("rootfs_mode", m.clone(), &why))?,
            None => RootfsMode::default(),
        };
        let log_level = file.log_level.unwrap_or_else(|| "warn".to_owned());
        if !matches!(
            log_level.as_str(),
            "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err(invalid(
                "log_level",
                log_level,
                "expected error, warn, info, debug or trace",
            ));
        }
        let boot_timeout_secs = file.boot_timeout_secs.unwrap_or(DEFAULT_BOOT_TIMEOUT_SECS);
        if boot_timeout_secs == 0 {
            return Err(invalid("boot_timeout_secs", "0".into(), "must be positive"));
        }
        let kernel_cmdline = file.kernel_cmdline.unwrap_or_default();
        if !kernel_cmdline.is_ascii() {
            return Err(invalid(
                "kernel_cmdline",
                kernel_cmdline,
                "only ASCII is allowed",
            ));
        }
        let template = match file.template {
            Some(t) => t
                .parse::<crate::template::TemplateMode>()
                .map_err(|why| invalid("template", t.clone(), &why))?,
            None => crate::template::TemplateMode::default(),
        };
        let vmm_seccomp = match file.vmm_seccomp.as_deref() {
            None | Some("enforce") => husk_vmm::seccomp::SeccompMode::Enforce,
            Some("off") => husk_vmm::seccomp::SeccompMode::Off,
            Some(other) => {
                return Err(invalid(
                    "vmm_seccomp",
                    other.to_owned(),
                    "expected \"enforce\" or \"off\"",
                ));
            }
        };
        let vmm_jail = match file.vmm_jail.as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => {
                return Err(invalid(
                    "vmm_jail",
                    other.to_owned(),
                    "expected \"on\" or \"off\"",
                ));
            }
        };
        let vmm_uid = file.vmm_uid.unwrap_or(DEFAULT_VMM_ID);
        let vmm_gid = file.vmm_gid.unwrap_or(DEFAULT_VMM_ID);
        for (key, id) in [("vmm_uid", vmm_uid), ("vmm_gid", vmm_gid)] {
            if vmm_jail && id == 0 {
                return Err(invalid(
                    key,
                    "0".into(),
                    "a jailed VMM runs unprivileged; set vmm_jail = \"off\" to run it as root",
                ));
            }
        }
        Ok(Config {
            source: source.to_owned(),
            kernel: file.kernel,
            initramfs: file.initramfs,
            vcpus,
            memory_mib,
            memory_overhead_mib: file
                .memory_overhead_mib
                .unwrap_or(DEFAULT_MEMORY_OVERHEAD_MIB),
            max_vcpus,
            max_memory_mib,
            cpu_template,
            rootfs_mode,
            virtiofsd: file.virtiofsd,
            log_level,
            boot_timeout_secs,
            guest_console: file.guest_console,
            kernel_cmdline,
            template,
            template_dir: file.template_dir,
            vmm_seccomp,
            vmm_jail,
            vmm_uid,
            vmm_gid,
        })
    }

    /// The CPU template `cpu_template` resolves to on this host (`auto` picks by host kind).
    pub fn cpu_template_here(&self) -> Result<husk_vmm::cpu_template::CpuTemplate, ConfigError> {
        let choice = self
            .cpu_template
            .parse::<husk_vmm::cpu_template::TemplateChoice>()
            .map_err(|why| ConfigError::Invalid {
                path: PathBuf::from(&self.source),
                key: "cpu_template",
                value: self.cpu_template.clone(),
                why,
            })?;
        Ok(choice.resolve(husk_vmm::host::probe()))
    }

    /// The guest kernel: the configured path, else the newest one in the guest-image cache.
    pub fn kernel_path(&self) -> Result<PathBuf, ConfigError> {
        self.guest_file("kernel", "kernel", self.kernel.as_deref(), "vmlinux")
    }

    /// The initramfs: the configured path, else the newest one in the guest-image cache.
    pub fn initramfs_path(&self) -> Result<PathBuf, ConfigError> {
        self.guest_file(
            "initramfs",
            "initramfs",
            self.initramfs.as_deref(),
            "initramfs.cpio",
        )
    }

    fn guest_file(
        &self,
        what: &'static str,
        key: &'static str,
        configured: Option<&Path>,
        file_name: &str,
    ) -> Result<PathBuf, ConfigError> {
        if let Some(p) = configured {
            if p.is_file() {
                return Ok(p.to_path_buf());
            }
            return Err(ConfigError::GuestFileMissing {
                what,
                key,
                path: p.to_path_buf(),
                source_desc: self.source.clone(),
            });
        }
        let cache = guest_image_cache().join(what);
        newest_in_cache(&cache, file_name).ok_or_else(|| ConfigError::MissingGuestFile {
            what,
            key,
            source_desc: self.source.clone(),
            cache: cache.display().to_string(),
        })
    }

    /// The virtiofsd binary: the configured path, else `virtiofsd` on PATH, in
    /// /usr/libexec or in ~/.cargo/bin (where `cargo install virtiofsd` puts it).
    pub fn virtiofsd_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.virtiofsd {
            return p.is_file().then(|| p.clone());
        }
        let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("virtiofsd"))
                    .collect()
            })
            .unwrap_or_default();
        candidates.push("/usr/libexec/virtiofsd".into());
        candidates.push("/usr/lib/qemu/virtiofsd".into());
        if let Some(home) = std::env::var_os("HOME") {
            candidates.push(Path::new(&home).join(".cargo/bin/virtiofsd"));
        }
        candidates
            .into_iter()
            .find(|p| p.is_file() && trusted_when_root(p))
    }
}

/// Whether a file husk found by searching (not one the configuration names) is safe for a
/// root process to run or boot: as root, the file and every folder above it must belong to
/// root and be writable by nobody else (a sticky folder such as /tmp excepted), or another
/// user could have put it there or swap it. A refused candidate is logged and skipped.
pub fn trusted_when_root(path: &Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return true;
    }
    match untrusted_reason(path) {
        None => true,
        Some(why) => {
            tracing::warn!("not using {}: {why}", path.display());
            false
        }
    }
}

fn untrusted_reason(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) => return Some(format!("cannot resolve it: {e}")),
    };
    let mut at = Some(path.as_path());
    let mut first = true;
    while let Some(p) = at {
        let m = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", p.display())),
        };
        let sticky_dir = !first && m.mode() & libc::S_ISVTX != 0;
        if m.uid() != 0 {
            return Some(format!(
                "{} belongs to uid {}, not root",
                p.display(),
                m.uid()
            ));
        }
        if m.mode() & 0o022 != 0 && !sticky_dir {
            return Some(format!(
                "{} is writable by group or others (mode {:o})",
                p.display(),
                m.mode() & 0o7777
            ));
        }
        first = false;
        at = p.parent();
    }
    None
}

/// `$HUSK_CACHE_DIR/guest-image` or `~/.cache/husk/guest-image`, as guest-image/build.sh.
pub fn guest_image_cache() -> PathBuf {
    let root = match std::env::var_os("HUSK_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/husk"),
    };
    root.join("guest-image")
}

/// The most recently modified `<dir>/<key>/<file_name>` (build.sh keys entries by the hash
/// of their inputs; the newest is the last one built).
fn newest_in_cache(dir: &Path, file_name: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join(file_name))
        .filter(|p| p.is_file() && trusted_when_root(p))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/husk/config.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_mib, 128);
        assert_eq!(c.memory_overhead_mib, 64);
        assert_eq!(c.cpu_template, "auto");
        assert_eq!(c.rootfs_mode, RootfsMode::Virtiofs);
        assert_eq!(c.log_level, "warn");
        assert_eq!(c.boot_timeout_secs, 120);
        assert_eq!(c.template, crate::template::TemplateMode::Auto);
    }

    #[test]
    fn found_files_that_others_could_replace_are_not_trusted_by_root() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: the check applies to root only");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let safe = tmp.path().join("safe");
        std::fs::create_dir(&safe).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = safe.join("virtiofsd");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            untrusted_reason(&bin),
            None,
            "root's file under /tmp (sticky) is fine"
        );
        std::fs::set_permissions(&safe, std::fs::Permissions::from_mode(0o777)).unwrap();
        let why = untrusted_reason(&bin).expect("a world-writable folder");
        assert!(why.contains("writable by group or others"), "{why}");
        std::fs::set_permissions(&safe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(untrusted_reason(&bin).is_some(), "a group-writable binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&bin, Some(1000), None).unwrap();
        let why = untrusted_reason(&bin).expect("another user's binary");
        assert!(why.contains("uid 1000"), "{why}");
    }

    #[test]
    fn every_key_parses() {
        let c = parse(
            r#"
            kernel = "/k"
            initramfs = "/i"
            vcpus = 2
            memory_mib = 512
            memory_overhead_mib = 32
            cpu_template = "none"
            rootfs_mode = "block"
            virtiofsd = "/usr/libexec/virtiofsd"
            log_level = "debug"
            boot_timeout_secs = 30
            guest_console = "/tmp/console.log"
            kernel_cmdline = "husk.agent_log=info"
            template = "off"
            template_dir = "/var/lib/husk/templates"
            vmm_seccomp = "off"
            vmm_jail = "on"
            vmm_uid = 900
            vmm_gid = 901
            "#,
        )
        .unwrap();
        assert_eq!((c.vmm_jail, c.vmm_uid, c.vmm_gid), (true, 900, 901));
        let defaults = parse("").unwrap();
        assert_eq!(
            (defaults.vmm_jail, defaults.vmm_uid, defaults.vmm_gid),
            (true, DEFAULT_VMM_ID, DEFAULT_VMM_ID)
        );
        assert!(!parse("vmm_jail = \"off\"\nvmm_uid = 0").unwrap().vmm_jail);
        assert_eq!(c.kernel, Some("/k".into()));
        assert_eq!((c.vcpus, c.memory_mib, c.memory_overhead_mib), (2, 512, 32));
        assert_eq!(c.rootfs_mode, RootfsMode::Block);
        assert_eq!(c.boot_timeout_secs, 30);
        assert_eq!(c.kernel_cmdline, "husk.agent_log=info");
        assert_eq!(c.template, crate::template::TemplateMode::Off);
        assert_eq!(c.vmm_seccomp, husk_vmm::seccomp::SeccompMode::Off);
        assert_eq!(
            parse("").unwrap().vmm_seccomp,
            husk_vmm::seccomp::SeccompMode::Enforce
        );
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let err = parse("kernal = \"/k\"").unwrap_err().to_string();
        assert!(err.contains("kernal"), "{err}");
        assert!(err.contains("/etc/husk/config.toml"), "{err}");
        let err = parse("vcpus = 0").unwrap_err().to_string();
        assert!(err.contains("vcpus = 0"), "{err}");
        let err = parse("memory_mib = 16").unwrap_err().to_string();
        assert!(err.contains("memory_mib = 16"), "{err}");
        let err = parse("rootfs_mode = \"nfs\"").unwrap_err().to_string();
        assert!(err.contains("rootfs_mode") && err.contains("nfs"), "{err}");
        let err = parse("template = \"on\"").unwrap_err().to_string();
        assert!(
            err.contains("template") && err.contains("auto or off"),
            "{err}"
        );
        let err = parse("vmm_uid = 0").unwrap_err().to_string();
        assert!(
            err.contains("vmm_uid") && err.contains("unprivileged"),
            "{err}"
        );
        let err = parse("vmm_jail = \"yes\"").unwrap_err().to_string();
        assert!(err.contains("vmm_jail") && err.contains("\"on\""), "{err}");
        let err = parse("vmm_seccomp = \"log\"").unwrap_err().to_string();
        assert!(err.contains("vmm_seccomp") && err.contains("log"), "{err}");
        let err = parse("cpu_template = \"fast\"").unwrap_err().to_string();
        assert!(err.contains("cpu_template"), "{err}");
        let err = parse("log_level = \"loud\"").unwrap_err().to_string();
        assert!(err.contains("log_level"), "{err}");
        let err = parse("vcpus = \"two\"").unwrap_err().to_string();
        assert!(err.contains("vcpus"), "{err}");
    }

    #[test]
    fn missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("none.toml");
        assert!(Config::load_file(&p, false).is_ok());
        assert!(
            Config::load_file(&p, true)
                .unwrap_err()
                .to_string()
                .contains("none.toml")
        );
        let c = parse("kernel = \"/nonexistent/vmlinux\"").unwrap();
        let err = c.kernel_path().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn newest_cache_entry_wins() {
        let tmp = tempfile::tempdir().unwrap();
        for (key, age) in [("old", 100), ("new", 0)] {
            let d = tmp.path().join(key);
            std::fs::create_dir(&d).unwrap();
            let f = d.join("vmlinux");
            std::fs::write(&f, key).unwrap();
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
            std::fs::File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        let p = newest_in_cache(tmp.path(), "vmlinux").unwrap();
        assert!(p.ends_with("new/vmlinux"), "{}", p.display());
        assert!(newest_in_cache(&tmp.path().join("missing"), "vmlinux").is_none());
    }
}
