//! Command line and JSON configuration of `husk-vmm`, validated into a [`VmConfig`].
//!
//! `--config FILE` reads a JSON object with the same fields as the flags (snake_case or
//! kebab-case keys); any flag given on the command line overrides the file.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use clap::Parser;
use serde::Deserialize;

use crate::cpu_template::TemplateChoice;
use crate::devices::virtio::net::MacAddr;
use crate::devices::virtio::net::tap::validate_ifname;

pub const DEFAULT_MEMORY_MIB: u64 = 128;
pub const MIN_MEMORY_MIB: u64 = 64;
/// Keeps the guest physical address space well inside what KVM and the layout handle.
pub const MAX_MEMORY_MIB: u64 = 256 << 10;
pub const MAX_VCPUS: u32 = 8;
pub const DEFAULT_VSOCK_CID: u64 = 3;

/// husk's virtual machine monitor: boots a Linux kernel directly on KVM.
#[derive(Parser, Debug, Default, Clone)]
#[command(name = "husk-vmm", version, about)]
pub struct Cli {
    /// JSON file with the same fields as these flags; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Kernel image: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (uncompressed newc cpio), placed at the top of low RAM.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended after husk's own.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Guest memory in MiB [default: 128; minimum 64; rounded up to 128 MiB on PVM hosts].
    #[arg(long, value_name = "N")]
    pub memory_mib: Option<u64>,
    /// Number of vCPUs, 1 to 8 [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Host Unix socket of the virtio-vsock device (no vsock device without it).
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,
    /// Guest CID of the vsock device [default: 3].
    #[arg(long, value_name = "N")]
    pub vsock_cid: Option<u64>,
    /// virtio-blk device: path=PATH[,ro=on|off][,serial=ID]. Repeatable.
    #[arg(long = "block", value_name = "SPEC")]
    pub block: Vec<String>,
    /// virtio-fs device served by a vhost-user backend (virtiofsd): socket=PATH,tag=TAG.
    /// Repeatable. Guest RAM becomes a shared memfd (see docs/architecture.md).
    #[arg(long = "fs", value_name = "SPEC")]
    pub fs: Vec<String>,
    /// virtio-net device on an existing host tap:
    /// tap=NAME[,mac=AA:BB:CC:DD:EE:FF][,netns=PATH]. Repeatable. Without mac= the
    /// address is derived from the tap name (locally administered, the same on every
    /// run). netns= opens the tap in that network namespace (e.g. /var/run/netns/NAME,
    /// a pod's) while the VMM stays in its own.
    #[arg(long = "net", value_name = "SPEC")]
    pub net: Vec<String>,
    /// virtio-rng device: on|off [default: on].
    #[arg(long, value_name = "on|off")]
    pub rng: Option<String>,
    /// Guest console on COM1: off|stdout|file:PATH [default: off].
    #[arg(long, value_name = "MODE")]
    pub console: Option<String>,
    /// CPU template: auto|pvm|none [default: auto].
    #[arg(long, value_name = "NAME")]
    pub cpu_template: Option<String>,
    /// Append JSON-lines boot metrics to this file.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,
    /// Log filter for stderr (error, warn, info, debug, trace or a tracing directive)
    /// [default: warn].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Control socket (created, mode 0600) that takes snapshot requests (see docs/snapshots.md).
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Restore the VM from the snapshot folder DIR instead of booting a kernel. The devices,
    /// vCPUs and memory given must be those the snapshot was taken with; their host sides
    /// (sockets, images, taps) may differ.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
    /// Sample the guest's instruction pointer on every vCPU and count KVM exits; at exit write
    /// FILE (folded stacks, "kernel;symbol count" / "user;0xADDR count", for inferno's
    /// flamegraph) and FILE.exits.txt (exit counts). `husk-profile-report FILE` prints the
    /// top symbols.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Samples per second and vCPU with --profile, 1 to 10000 [default: 199]. Each sample
    /// is a KVM exit (~0.1 ms of guest time on nested-PVM hosts).
    #[arg(long, value_name = "N")]
    pub profile_hz: Option<u32>,
    /// The guest kernel's System.map for --profile [default: System.map next to --kernel].
    #[arg(long, value_name = "PATH")]
    pub profile_symbols: Option<PathBuf>,
    /// Seccomp filters on the vCPU and device threads (docs/security.md) [default: enforce].
    #[arg(long, value_enum, value_name = "MODE")]
    pub seccomp: Option<crate::seccomp::SeccompMode>,
}

/// The JSON form of [`Cli`].
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub cmdline: Option<String>,
    #[serde(alias = "memory-mib")]
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u32>,
    #[serde(alias = "vsock-uds")]
    pub vsock_uds: Option<PathBuf>,
    #[serde(alias = "vsock-cid")]
    pub vsock_cid: Option<u64>,
    #[serde(default)]
    pub block: Vec<String>,
    #[serde(default)]
    pub fs: Vec<String>,
    #[serde(default)]
    pub net: Vec<String>,
    pub rng: Option<Switch>,
    pub console: Option<String>,
    #[serde(alias = "cpu-template")]
    pub cpu_template: Option<String>,
    #[serde(alias = "metrics-file")]
    pub metrics_file: Option<PathBuf>,
    #[serde(alias = "log-level")]
    pub log_level: Option<String>,
    #[serde(alias = "api-socket")]
    pub api_socket: Option<PathBuf>,
    pub restore: Option<PathBuf>,
    pub profile: Option<PathBuf>,
    #[serde(alias = "profile-hz")]
    pub profile_hz: Option<u32>,
    #[serde(alias = "profile-symbols")]
    pub profile_symbols: Option<PathBuf>,
    pub seccomp: Option<crate::seccomp::SeccompMode>,
}

/// `rng` in JSON may be a boolean or "on"/"off".
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Switch {
    Bool(bool),
    Text(String),
}

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Console {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

impl FromStr for Console {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "off" => Ok(Self::Off),
            "stdout" => Ok(Self::Stdout),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(ConfigError::Console(s.to_string())),
            },
        }
    }
}

/// One `--block` device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    /// `None` (`empty=on`): a slot without a medium, of capacity 0, that a template VM is
    /// booted with; a restore of that template fills it with the image its `path` names.
    pub path: Option<PathBuf>,
    pub read_only: bool,
    pub serial: Option<String>,
}

/// virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES).
const BLOCK_SERIAL_MAX: usize = 20;

impl FromStr for BlockSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Block {
            spec: s.to_string(),
            why: why.to_string(),
        };
        let (mut path, mut read_only, mut serial, mut empty) = (None, false, None, false);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("'{part}' is not key=value")))?;
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "path" => return Err(bad("empty path")),
                "ro" => {
                    read_only = parse_switch(value)
                        .ok_or_else(|| bad(&format!("ro={value}: expected on or off")))?
                }
                "empty" => {
                    empty = parse_switch(value)
                        .ok_or_else(|| bad(&format!("empty={value}: expected on or off")))?
                }
                "serial" => {
                    if value.len() > BLOCK_SERIAL_MAX || !value.is_ascii() {
                        return Err(bad("serial must be at most 20 ASCII characters"));
                    }
                    serial = Some(value.to_string());
                }
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        let path = match (path, empty) {
            (Some(_), true) => return Err(bad("path= and empty=on exclude each other")),
            (None, false) => {
                return Err(bad(
                    "missing path= (or empty=on for a slot a restore fills)",
                ));
            }
            (path, _) => path,
        };
        Ok(BlockSpec {
            path,
            read_only,
            serial,
        })
    }
}

/// One `--fs` device: a vhost-user-fs backend's socket and the tag the guest mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSpec {
    pub socket: PathBuf,
    pub tag: String,
}

impl FromStr for FsSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Fs {
            spec: s.to_string(),
            why: why.to_string(),
        };
        let (mut socket, mut tag) = (None, None);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("'{part}' is not key=value")))?;
            match key {
                "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
                "socket" => return Err(bad("empty socket path")),
                "tag" => {
                    crate::devices::virtio::fs::config_space::validate_tag(value)
                        .map_err(|e| bad(&e.to_string()))?;
                    tag = Some(value.to_string());
                }
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        Ok(FsSpec {
            socket: socket.ok_or_else(|| bad("missing socket="))?,
            tag: tag.ok_or_else(|| bad("missing tag="))?,
        })
    }
}

/// One `--net` device: the host tap, the guest's MAC address (given or derived) and the
/// network namespace the tap is in (`None`: the VMM's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    pub tap: String,
    pub mac: MacAddr,
    pub netns: Option<PathBuf>,
}

impl FromStr for NetSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Net {
            spec: s.to_string(),
            why: why.to_string(),
        };
        let (mut tap, mut mac, mut netns) = (None, None, None);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(&format!("'{part}' is not key=value")))?;
            match key {
                "tap" => {
                    validate_ifname(value)
                        .map_err(|why| bad(&format!("tap name {value:?}: {why}")))?;
                    tap = Some(value.to_string());
                }
                "mac" => mac = Some(value.parse::<MacAddr>().map_err(|e| bad(&e.to_string()))?),
                "netns" => {
                    if !value.starts_with('/') {
                        return Err(bad(&format!(
                            "netns {value:?}: must be an absolute path to a namespace file"
                        )));
                    }
                    netns = Some(PathBuf::from(value));
                }
                other => return Err(bad(&format!("unknown key '{other}'"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("missing tap="))?;
        let mac = mac.unwrap_or_else(|| MacAddr::derived(&tap));
        Ok(NetSpec { tap, mac, netns })
    }
}

fn parse_switch(s: &str) -> Option<bool> {
    match s {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// The vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockSpec {
    pub cid: u64,
    pub uds: PathBuf,
}

/// `--profile`: where the guest profile goes, how often to sample, and the kernel's symbols.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSpec {
    pub path: PathBuf,
    pub hz: u32,
    /// `None`: System.map next to the kernel image.
    pub symbols: Option<PathBuf>,
}

/// A prime, so that sampling does not beat with the guest's periodic timers. Each sample costs
/// the guest a KVM exit, ~0.1 ms on nested-PVM hosts: 997 Hz slowed a boot by 10-20 % there,
/// 199 Hz by less than the host's noise (docs/performance.md).
pub const DEFAULT_PROFILE_HZ: u32 = 199;
pub const MAX_PROFILE_HZ: u32 = 10_000;

/// A validated VM configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub extra_cmdline: String,
    /// As requested; the CPU template may round it up.
    pub memory_mib: u64,
    pub vcpus: u8,
    pub vsock: Option<VsockSpec>,
    pub blocks: Vec<BlockSpec>,
    /// vhost-user-fs devices, after the block devices and rng in slot order.
    pub fs: Vec<FsSpec>,
    /// virtio-net devices, after every other device in slot order (guest eth0, eth1, ...).
    pub nets: Vec<NetSpec>,
    pub rng: bool,
    pub console: Console,
    pub cpu_template: TemplateChoice,
    pub metrics_file: Option<PathBuf>,
    pub log_level: String,
    pub api_socket: Option<PathBuf>,
    /// Snapshot folder to restore from; the kernel, initramfs and command line are then
    /// the snapshot's and `kernel` is empty.
    pub restore: Option<PathBuf>,
    /// `--profile`: sample the guest and count exits (see [`crate::profile`]).
    pub profile: Option<ProfileSpec>,
    /// `--seccomp`: whether vCPU and device threads run under their filters.
    pub seccomp: crate::seccomp::SeccompMode,
}

/// A configuration problem, named so the user can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no kernel given (--kernel PATH, or --restore DIR)")]
    NoKernel,
    #[error(
        "--kernel, --initramfs and --cmdline exclude --restore: a restored VM runs the snapshot's kernel"
    )]
    KernelWithRestore,
    #[error("--memory-mib {0}: at least {MIN_MEMORY_MIB} MiB are needed")]
    MemoryTooSmall(u64),
    #[error("--memory-mib {0}: at most {MAX_MEMORY_MIB} MiB are supported")]
    MemoryTooLarge(u64),
    #[error("--vcpus {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("--vsock-cid {0}: guest CIDs 0-2 are reserved and CIDs must fit in 32 bits")]
    VsockCid(u64),
    #[error("--vsock-cid given without --vsock-uds")]
    VsockCidWithoutUds,
    #[error("--block {spec}: {why}")]
    Block { spec: String, why: String },
    #[error("--fs {spec}: {why}")]
    Fs { spec: String, why: String },
    #[error("--fs: tag {0:?} is used twice; the guest could not tell the shares apart")]
    FsDuplicateTag(String),
    #[error("--net {spec}: {why}")]
    Net { spec: String, why: String },
    #[error("--net: tap {0} is used twice; a tap serves one NIC")]
    NetDuplicateTap(String),
    #[error("--net: MAC address {0} is used twice")]
    NetDuplicateMac(MacAddr),
    #[error("--rng {0}: expected on or off")]
    Rng(String),
    #[error("--console {0}: expected off, stdout or file:PATH")]
    Console(String),
    #[error("--cpu-template: {0}")]
    CpuTemplate(String),
    #[error("--cmdline: {0}")]
    Cmdline(String),
    #[error("--profile-hz {0}: must be between 1 and {MAX_PROFILE_HZ}")]
    ProfileHz(u32),
    #[error("--profile-hz and --profile-symbols need --profile FILE")]
    ProfileOptionWithoutFile,
}

/// Reads and parses a JSON config file.
pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file_config(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_path_buf(),
        source,
    })
}

pub fn parse_file_config(text: &str) -> Result<FileConfig, serde_json::Error> {
    serde_json::from_str(text)
}

impl Cli {
    /// Merges the JSON file (if any) under the flags and validates the result.
    pub fn into_vm_config(self) -> Result<VmConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => read_file_config(p)?,
            None => FileConfig::default(),
        };
        merge(self, file)
    }
}

/// Flags win over the file; then every value is checked.
pub fn merge(cli: Cli, file: FileConfig) -> Result<VmConfig, ConfigError> {
    let restore = cli.restore.or(file.restore);
    let kernel = match (cli.kernel.or(file.kernel), &restore) {
        (Some(k), None) => k,
        (None, Some(_)) => PathBuf::new(),
        (None, None) => return Err(ConfigError::NoKernel),
        (Some(_), Some(_)) => return Err(ConfigError::KernelWithRestore),
    };
    let memory_mib = cli
        .memory_mib
        .or(file.memory_mib)
        .unwrap_or(DEFAULT_MEMORY_MIB);
    if memory_mib < MIN_MEMORY_MIB {
        return Err(ConfigError::MemoryTooSmall(memory_mib));
    }
    if memory_mib > MAX_MEMORY_MIB {
        return Err(ConfigError::MemoryTooLarge(memory_mib));
    }
    let vcpus = cli.vcpus.or(file.vcpus).unwrap_or(1);
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(ConfigError::Vcpus(vcpus));
    }
    let cid = cli.vsock_cid.or(file.vsock_cid);
    let vsock = match (cli.vsock_uds.or(file.vsock_uds), cid) {
        (Some(uds), cid) => {
            let cid = cid.unwrap_or(DEFAULT_VSOCK_CID);
            if cid < 3 || cid >= u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(cid));
            }
            Some(VsockSpec { cid, uds })
        }
        (None, Some(_)) => return Err(ConfigError::VsockCidWithoutUds),
        (None, None) => None,
    };
    let block_specs = if cli.block.is_empty() {
        file.block
    } else {
        cli.block
    };
    let blocks = block_specs
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<BlockSpec>, _>>()?;
    let fs_specs = if cli.fs.is_empty() { file.fs } else { cli.fs };
    let fs = fs_specs
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<FsSpec>, _>>()?;
    let mut tags = std::collections::HashSet::new();
    if let Some(dup) = fs.iter().find(|f| !tags.insert(f.tag.as_str())) {
        return Err(ConfigError::FsDuplicateTag(dup.tag.clone()));
    }
    let net_specs = if cli.net.is_empty() {
        file.net
    } else {
        cli.net
    };
    let nets = net_specs
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<NetSpec>, _>>()?;
    // Tap names are per network namespace.
    let mut taps = std::collections::HashSet::new();
    if let Some(dup) = nets
        .iter()
        .find(|n| !taps.insert((n.netns.as_deref(), n.tap.as_str())))
    {
        return Err(ConfigError::NetDuplicateTap(dup.tap.clone()));
    }
    let mut macs = std::collections::HashSet::new();
    if let Some(dup) = nets.iter().find(|n| !macs.insert(n.mac)) {
        return Err(ConfigError::NetDuplicateMac(dup.mac));
    }
    let rng = match (cli.rng, file.rng) {
        (Some(s), _) | (None, Some(Switch::Text(s))) => {
            parse_switch(&s).ok_or(ConfigError::Rng(s))?
        }
        (None, Some(Switch::Bool(b))) => b,
        (None, None) => true,
    };
    let console = match cli.console.or(file.console) {
        Some(s) => s.parse()?,
        None => Console::Off,
    };
    let cpu_template = match cli.cpu_template.or(file.cpu_template) {
        Some(s) => s.parse().map_err(ConfigError::CpuTemplate)?,
        None => TemplateChoice::Auto,
    };
    let extra_cmdline = cli.cmdline.or(file.cmdline).unwrap_or_default();
    if !extra_cmdline.is_ascii() || extra_cmdline.contains('\0') {
        return Err(ConfigError::Cmdline(
            "only printable ASCII is allowed".to_string(),
        ));
    }
    let initramfs = cli.initramfs.or(file.initramfs);
    if restore.is_some() && (initramfs.is_some() || !extra_cmdline.trim().is_empty()) {
        return Err(ConfigError::KernelWithRestore);
    }
    let profile_hz = cli.profile_hz.or(file.profile_hz);
    let profile_symbols = cli.profile_symbols.or(file.profile_symbols);
    let profile = match cli.profile.or(file.profile) {
        Some(path) => {
            let hz = profile_hz.unwrap_or(DEFAULT_PROFILE_HZ);
            if hz == 0 || hz > MAX_PROFILE_HZ {
                return Err(ConfigError::ProfileHz(hz));
            }
            Some(ProfileSpec {
                path,
                hz,
                symbols: profile_symbols,
            })
        }
        None if profile_hz.is_some() || profile_symbols.is_some() => {
            return Err(ConfigError::ProfileOptionWithoutFile);
        }
        None => None,
    };
    Ok(VmConfig {
        kernel,
        initramfs,
        extra_cmdline: extra_cmdline.trim().to_string(),
        memory_mib,
        vcpus: vcpus as u8,
        vsock,
        blocks,
        fs,
        nets,
        rng,
        console,
        cpu_template,
        metrics_file: cli.metrics_file.or(file.metrics_file),
        log_level: cli
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| "warn".to_string()),
        api_socket: cli.api_socket.or(file.api_socket),
        restore,
        profile,
        seccomp: cli.seccomp.or(file.seccomp).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, ConfigError> {
        let mut argv = vec!["husk-vmm"];
        argv.extend_from_slice(args);
        merge(Cli::try_parse_from(argv).unwrap(), FileConfig::default())
    }

    #[test]
    fn defaults() {
        let c = parse(&["--kernel", "/k"]).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!((c.memory_mib, c.vcpus, c.rng), (128, 1, true));
        assert_eq!(c.console, Console::Off);
        assert_eq!(c.cpu_template, TemplateChoice::Auto);
        assert_eq!(c.vsock, None);
        assert_eq!(c.log_level, "warn");
    }

    #[test]
    fn all_flags() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--cmdline",
            "-- init.arg=1",
            "--memory-mib",
            "512",
            "--vcpus",
            "2",
            "--vsock-uds",
            "/tmp/v.sock",
            "--vsock-cid",
            "42",
            "--block",
            "path=/a.img,ro=on,serial=root",
            "--block",
            "path=/b.img",
            "--block",
            "empty=on,ro=on,serial=slot",
            "--rng",
            "off",
            "--console",
            "file:/tmp/con",
            "--cpu-template",
            "none",
            "--metrics-file",
            "/m",
            "--log-level",
            "debug",
        ])
        .unwrap();
        assert_eq!(c.extra_cmdline, "-- init.arg=1");
        assert_eq!((c.memory_mib, c.vcpus, c.rng), (512, 2, false));
        assert_eq!(
            c.vsock,
            Some(VsockSpec {
                cid: 42,
                uds: "/tmp/v.sock".into()
            })
        );
        assert_eq!(
            c.blocks,
            vec![
                BlockSpec {
                    path: Some("/a.img".into()),
                    read_only: true,
                    serial: Some("root".into())
                },
                BlockSpec {
                    path: Some("/b.img".into()),
                    read_only: false,
                    serial: None
                },
                BlockSpec {
                    path: None,
                    read_only: true,
                    serial: Some("slot".into())
                },
            ]
        );
        assert_eq!(c.console, Console::File("/tmp/con".into()));
        assert_eq!(c.cpu_template, TemplateChoice::None);
        assert_eq!(c.metrics_file, Some("/m".into()));
    }

    #[test]
    fn bad_values_name_the_problem() {
        let msg = |a: &[&str]| parse(a).unwrap_err().to_string();
        assert_eq!(
            msg(&[]),
            "no kernel given (--kernel PATH, or --restore DIR)"
        );
        for clash in [
            &["--kernel", "k", "--restore", "/s"][..],
            &["--restore", "/s", "--initramfs", "i"],
            &["--restore", "/s", "--cmdline", "quiet"],
        ] {
            assert!(msg(clash).contains("exclude --restore"), "{clash:?}");
        }
        let restored = parse(&["--restore", "/s", "--api-socket", "/a"]).unwrap();
        assert_eq!(restored.restore, Some("/s".into()));
        assert_eq!(restored.api_socket, Some("/a".into()));
        assert!(msg(&["--kernel", "k", "--memory-mib", "32"]).contains("at least 64 MiB"));
        assert!(msg(&["--kernel", "k", "--vcpus", "0"]).contains("--vcpus 0"));
        assert!(msg(&["--kernel", "k", "--vcpus", "9"]).contains("between 1 and 8"));
        assert!(
            msg(&["--kernel", "k", "--vsock-uds", "/s", "--vsock-cid", "2"]).contains("reserved")
        );
        assert!(msg(&["--kernel", "k", "--vsock-cid", "5"]).contains("without --vsock-uds"));
        assert!(msg(&["--kernel", "k", "--block", "ro=on"]).contains("missing path="));
        assert!(
            msg(&["--kernel", "k", "--block", "path=/x,empty=on"]).contains("exclude each other")
        );
        assert!(msg(&["--kernel", "k", "--block", "empty=maybe"]).contains("empty=maybe"));
        assert!(msg(&["--kernel", "k", "--block", "path=/x,ro=maybe"]).contains("ro=maybe"));
        assert!(msg(&["--kernel", "k", "--block", "path=/x,foo=1"]).contains("unknown key 'foo'"));
        assert!(msg(&["--kernel", "k", "--block", "/x"]).contains("not key=value"));
        assert!(msg(&["--kernel", "k", "--rng", "maybe"]).contains("--rng maybe"));
        assert!(msg(&["--kernel", "k", "--console", "tty"]).contains("--console tty"));
        assert!(msg(&["--kernel", "k", "--console", "file:"]).contains("file:PATH"));
        assert!(msg(&["--kernel", "k", "--cpu-template", "x"]).contains("unknown CPU template"));
        assert!(msg(&["--kernel", "k", "--cmdline", "a\u{e9}"]).contains("ASCII"));
        assert!(
            msg(&[
                "--kernel",
                "k",
                "--block",
                "path=/x,serial=012345678901234567890"
            ])
            .contains("20 ASCII")
        );
    }

    #[test]
    fn json_file_is_overridden_by_flags() {
        let file = parse_file_config(
            r#"{"kernel": "/fk", "memory-mib": 256, "vcpus": 2, "rng": false,
                "block": ["path=/f.img,ro=on"], "console": "stdout",
                "vsock_uds": "/f.sock", "cmdline": "fromfile"}"#,
        )
        .unwrap();
        let cli = Cli::try_parse_from(["husk-vmm", "--vcpus", "4", "--cmdline", "x=1"]).unwrap();
        let c = merge(cli, file).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/fk"));
        assert_eq!((c.memory_mib, c.vcpus, c.rng), (256, 4, false));
        assert_eq!(c.extra_cmdline, "x=1");
        assert_eq!(c.console, Console::Stdout);
        assert_eq!(c.blocks.len(), 1);
        assert_eq!(
            c.vsock,
            Some(VsockSpec {
                cid: 3,
                uds: "/f.sock".into()
            })
        );
    }

    #[test]
    fn fs_devices_from_flags_and_file() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--fs",
            "socket=/run/vfs.sock,tag=rootfs",
            "--fs",
            "tag=data,socket=/run/d.sock",
        ])
        .unwrap();
        assert_eq!(
            c.fs,
            vec![
                FsSpec {
                    socket: "/run/vfs.sock".into(),
                    tag: "rootfs".into()
                },
                FsSpec {
                    socket: "/run/d.sock".into(),
                    tag: "data".into()
                },
            ]
        );
        assert!(parse(&["--kernel", "/k"]).unwrap().fs.is_empty());
        let file =
            parse_file_config(r#"{"kernel": "/k", "fs": ["socket=/f.sock,tag=t"]}"#).unwrap();
        let c = merge(Cli::try_parse_from(["husk-vmm"]).unwrap(), file).unwrap();
        assert_eq!(c.fs.len(), 1);
        assert_eq!(c.fs[0].socket, PathBuf::from("/f.sock"));
    }

    #[test]
    fn bad_fs_specs_name_the_problem() {
        let msg = |spec: &str| {
            parse(&["--kernel", "k", "--fs", spec])
                .unwrap_err()
                .to_string()
        };
        assert!(msg("tag=x").contains("--fs tag=x: missing socket="));
        assert!(msg("socket=/s").contains("missing tag="));
        assert!(msg("socket=,tag=x").contains("empty socket path"));
        assert!(msg("socket=/s,tag=").contains("empty tag"));
        assert!(msg("socket=/s,tag=a b").contains("printable ASCII"));
        let long = format!("socket=/s,tag={}", "t".repeat(37));
        assert!(msg(&long).contains("longer than 36 bytes"));
        assert!(msg("socket=/s,tag=x,cache=auto").contains("unknown key 'cache'"));
        assert!(msg("/s").contains("not key=value"));
        let dup = parse(&[
            "--kernel",
            "k",
            "--fs",
            "socket=/a,tag=x",
            "--fs",
            "socket=/b,tag=x",
        ])
        .unwrap_err()
        .to_string();
        assert!(dup.contains("tag \"x\" is used twice"), "{dup}");
    }

    #[test]
    fn net_devices_from_flags_and_file() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0,mac=02:AA:bb:00:00:01",
            "--net",
            "tap=tap1",
        ])
        .unwrap();
        assert_eq!(c.nets.len(), 2);
        assert_eq!(c.nets[0].tap, "tap0");
        assert_eq!(c.nets[0].mac.to_string(), "02:aa:bb:00:00:01");
        assert_eq!(c.nets[1].tap, "tap1");
        assert_eq!(c.nets[1].mac, MacAddr::derived("tap1"), "default MAC");
        assert_eq!(c.nets[1].mac.octets()[0] & 0x03, 0x02, "local unicast");
        assert!(parse(&["--kernel", "/k"]).unwrap().nets.is_empty());
        let file = parse_file_config(r#"{"kernel": "/k", "net": ["tap=t9"]}"#).unwrap();
        let c = merge(Cli::try_parse_from(["husk-vmm"]).unwrap(), file).unwrap();
        assert_eq!(
            c.nets,
            vec![NetSpec {
                tap: "t9".into(),
                mac: MacAddr::derived("t9"),
                netns: None,
            }]
        );
    }

    #[test]
    fn net_device_in_another_network_namespace() {
        let c = parse(&[
            "--kernel",
            "/k",
            "--net",
            "tap=tap0_husk,mac=02:00:00:00:00:07,netns=/var/run/netns/cni-1",
            "--net",
            "netns=/proc/42/ns/net,tap=tap0_husk",
        ])
        .unwrap();
        assert_eq!(
            c.nets[0],
            NetSpec {
                tap: "tap0_husk".into(),
                mac: "02:00:00:00:00:07".parse().unwrap(),
                netns: Some("/var/run/netns/cni-1".into()),
            }
        );
        assert_eq!(c.nets[1].netns, Some(PathBuf::from("/proc/42/ns/net")));
        assert_eq!(c.nets[1].mac, MacAddr::derived("tap0_husk"));
    }

    #[test]
    fn bad_net_specs_name_the_problem() {
        let msg = |specs: &[&str]| {
            let mut args = vec!["--kernel", "k"];
            for s in specs {
                args.extend_from_slice(&["--net", s]);
            }
            parse(&args).unwrap_err().to_string()
        };
        assert!(
            msg(&["mac=02:00:00:00:00:01"]).contains("--net mac=02:00:00:00:00:01: missing tap=")
        );
        assert!(msg(&["tap0"]).contains("not key=value"));
        assert!(msg(&["tap="]).contains("tap name \"\": empty"));
        assert!(msg(&["tap=a-name-of-16-chr"]).contains("longer than 15 bytes"));
        assert!(msg(&["tap=a/b"]).contains("'/'"));
        assert!(
            msg(&["tap=t,mac=zz:00:00:00:00:01"]).contains("\"zz:00:00:00:00:01\" is not a MAC")
        );
        assert!(msg(&["tap=t,mac=03:00:00:00:00:01"]).contains("multicast"));
        assert!(msg(&["tap=t,mac=00:00:00:00:00:00"]).contains("not a usable NIC address"));
        assert!(msg(&["tap=t,queues=2"]).contains("unknown key 'queues'"));
        assert!(msg(&["tap=t", "tap=t"]).contains("tap t is used twice"));
        assert!(
            msg(&["tap=t,netns=/n/a", "tap=t,netns=/n/a,mac=02:00:00:00:00:09"])
                .contains("tap t is used twice")
        );
        assert!(msg(&["tap=t,netns=netns/a"]).contains("must be an absolute path"));
        assert!(
            msg(&["tap=a,mac=02:00:00:00:00:01", "tap=b,mac=02:00:00:00:00:01"])
                .contains("MAC address 02:00:00:00:00:01 is used twice")
        );
    }

    #[test]
    fn profile_options() {
        assert_eq!(parse(&["--kernel", "/k"]).unwrap().profile, None);
        let c = parse(&["--kernel", "/k", "--profile", "/tmp/p.folded"]).unwrap();
        assert_eq!(
            c.profile,
            Some(ProfileSpec {
                path: "/tmp/p.folded".into(),
                hz: DEFAULT_PROFILE_HZ,
                symbols: None
            })
        );
        let c = parse(&[
            "--kernel",
            "/k",
            "--profile",
            "/p",
            "--profile-hz",
            "250",
            "--profile-symbols",
            "/s/System.map",
        ])
        .unwrap();
        let p = c.profile.unwrap();
        assert_eq!((p.hz, p.symbols), (250, Some("/s/System.map".into())));
        let file =
            parse_file_config(r#"{"kernel": "/k", "profile": "/f", "profile-hz": 100}"#).unwrap();
        let c = merge(Cli::try_parse_from(["husk-vmm"]).unwrap(), file).unwrap();
        assert_eq!(c.profile.map(|p| (p.path, p.hz)), Some(("/f".into(), 100)));
        let msg = |a: &[&str]| parse(a).unwrap_err().to_string();
        assert!(
            msg(&["--kernel", "k", "--profile", "/p", "--profile-hz", "0"]).contains("between 1")
        );
        assert!(
            msg(&["--kernel", "k", "--profile", "/p", "--profile-hz", "20000"]).contains("10000")
        );
        assert!(msg(&["--kernel", "k", "--profile-hz", "100"]).contains("need --profile FILE"));
        assert!(msg(&["--kernel", "k", "--profile-symbols", "/s"]).contains("need --profile FILE"));
    }

    #[test]
    fn json_errors_are_reported() {
        assert!(
            parse_file_config(r#"{"kernal": "/k"}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field `kernal`")
        );
        assert!(parse_file_config(r#"{"vcpus": "two"}"#).is_err());
        let err = read_file_config(Path::new("/nonexistent/husk.json")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/husk.json"));
    }
}
