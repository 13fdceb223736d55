//! VM templates: a snapshot of a VM booted to its agent, restored instead of booting a guest
//! kernel for every container (docs/snapshots.md).
//!
//! A template is keyed by everything that makes one VM differ from another: the VMM's
//! build ([`husk_vmm::BUILD_ID`], the same in the CLI and the shim), the guest kernel and
//! initramfs (by file identity: path, size, inode, mtime and
//! ctime, so a rebuilt file is a new template), vCPUs, memory, CPU template, command line,
//! console and device slots. The key names the folder; the manifest keeps the inputs
//! themselves and a lookup compares them whole, so a template whose inputs changed is never
//! used, whatever its key.
//!
//! Layout under the state root: `@templates/<key>/{manifest.json,state,memory}`. A template
//! is built in `@templates/.building-<key>-<pid>/` and renamed into place once complete, so
//! a reader never sees half of one; `@templates/.lock` serialises builds and removals.

use std::fs::{DirBuilder, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::sizing::VmSize;
use crate::state::RootfsMode;

/// Folder of the templates under the state root: not a valid container id, so no
/// container's state folder can take its name.
pub const TEMPLATES_DIR: &str = "@templates";
pub const MANIFEST_FILE: &str = "manifest.json";
/// The snapshot files inside a template folder (written by husk-vmm).
pub const SNAPSHOT_FILES: [&str; 2] = ["state", "memory"];
const LOCK_FILE: &str = ".lock";
const BUILDING_PREFIX: &str = ".building-";

/// `template` in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemplateMode {
    /// Restore from a matching template when one exists; boot cold otherwise.
    #[default]
    Auto,
    /// Always boot cold.
    Off,
}

impl std::str::FromStr for TemplateMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            _ => Err("expected auto or off".into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no template {0} (see `husk template list`)")]
    NotFound(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file as a template depends on it: any rewrite changes size, mtime or ctime (ctime
/// cannot be set back by a user), a replacement changes the inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> Result<Self, TemplateError> {
        let path = std::fs::canonicalize(path).map_err(io(path))?;
        let m = std::fs::metadata(&path).map_err(io(&path))?;
        Ok(Self {
            size: m.size(),
            dev: m.dev(),
            ino: m.ino(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            path,
        })
    }
}

/// Everything that makes a template's VM what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateInputs {
    pub husk_version: String,
    /// The VMM build that writes and reads the snapshot.
    pub vmm_build: String,
    pub kernel: FileIdentity,
    pub initramfs: FileIdentity,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The resolved CPU template (`pvm`, `none`).
    pub cpu_template: String,
    pub kernel_cmdline: String,
    pub guest_console: Option<PathBuf>,
    /// The virtio devices the VM has besides vsock, in slot order (`blk:<serial>,ro`,
    /// `fs:<tag>`, `net`).
    pub slots: Vec<String>,
}

/// The `net` slot of a pod VM's NIC.
pub const NET_SLOT: &str = "net";

/// The device slots a container's VM needs, in slot order (block, share, NIC). In block mode the rootfs is a `blk` slot, empty in the
/// template, and the share exists only for host binds; a pod VM (`has_nic`) has its NIC
/// last.
pub fn slots_for(mode: RootfsMode, has_binds: bool, share_tag: &str, has_nic: bool) -> Vec<String> {
    let mut slots = Vec::new();
    match mode {
        RootfsMode::Virtiofs => slots.push(format!("fs:{share_tag}")),
        RootfsMode::Block => {
            // The rootfs image, read-only, found by its serial.
            slots.push(format!("blk:{},ro", crate::vm_config::ROOTFS_SERIAL));
            if has_binds {
                slots.push(format!("fs:{share_tag}"));
            }
        }
    }
    if has_nic {
        slots.push(NET_SLOT.into());
    }
    slots
}

impl TemplateInputs {
    /// The inputs of a VM of `size` with `slots` under `config` on this host.
    pub fn new(config: &Config, size: VmSize, slots: Vec<String>) -> Result<Self, TemplateError> {
        Ok(Self {
            husk_version: env!("CARGO_PKG_VERSION").to_owned(),
            vmm_build: husk_vmm::BUILD_ID.to_owned(),
            kernel: FileIdentity::of(&config.kernel_path()?)?,
            initramfs: FileIdentity::of(&config.initramfs_path()?)?,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            cpu_template: config.cpu_template_here()?.name().to_owned(),
            kernel_cmdline: config.kernel_cmdline.clone(),
            guest_console: config.guest_console.clone(),
            slots,
        })
    }

    /// The folder name: 16 hex digits over the canonical JSON of the inputs.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        // Two CRC-32s (of the bytes and of them reversed) make a 64-bit name; the manifest
        // comparison, not the name, decides whether a template fits.
        let forward = crc32fast::hash(&json);
        let reversed: Vec<u8> = json.iter().rev().copied().collect();
        let backward = crc32fast::hash(&reversed);
        format!("{forward:08x}{backward:08x}")
    }

    /// A one-line summary for logs and `list`.
    pub fn summary(&self) -> String {
        format!(
            "{} vCPU, {} MiB, {} CPU template, slots [{}]",
            self.vcpus,
            self.memory_mib,
            self.cpu_template,
            self.slots.join(", ")
        )
    }
}

/// What a template folder says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub inputs: TemplateInputs,
    /// RFC 3339.
    pub created: String,
    /// Boot to a responding agent, in milliseconds.
    pub boot_ms: u64,
    /// What husk-vmm reported for the snapshot (pause, bytes written...).
    pub snapshot: serde_json::Value,
    /// The MAC of each `net` slot's NIC as the template's guest knows it: a restored VM's
    /// agent finds its NIC by it and gives it the pod's (ConfigureNetwork `current_mac`).
    #[serde(default)]
    pub nic_macs: Vec<String>,
}

/// One template found in the store.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Template {
    /// Makes a VM just restored from this template unique (host entropy, host clock:
    /// AgentClient::restored_from_host) before anything else runs in it, and logs the
    /// restore with the time since `started`.
    pub async fn make_restored_vm_unique(
        &self,
        client: &husk_protocol::client::AgentClient,
        started: std::time::Instant,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        client
            .restored_from_host()
            .await
            .context("making the restored VM unique (Restored: reseed and set the clock)")?;
        tracing::info!(
            template = self.manifest.key,
            ms = started.elapsed().as_millis() as u64,
            "VM restored from its template"
        );
        Ok(())
    }
}

/// The outcome of looking up a VM's template.
#[derive(Debug)]
pub enum Lookup {
    Found(Box<Template>),
    /// No template with these inputs: the key it would have.
    Missing(String),
}

/// The templates under one state root.
pub struct TemplateStore {
    dir: PathBuf,
}

/// Held while a template is built or removed.
pub struct StoreLock {
    _lock: nix::fcntl::Flock<File>,
}

impl TemplateStore {
    pub fn new(state_root: &Path) -> Self {
        Self {
            dir: state_root.join(TEMPLATES_DIR),
        }
    }

    /// The store in `dir` itself.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// The store `config` names (`template_dir`), else the one under `state_root`.
    pub fn for_config(config: &Config, state_root: &Path) -> Self {
        match &config.template_dir {
            Some(dir) => Self { dir: dir.clone() },
            None => Self::new(state_root),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ensure_dir(&self) -> Result<(), TemplateError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io(&self.dir))
    }

    /// An exclusive lock on the store (blocks until free).
    pub fn lock(&self) -> Result<StoreLock, TemplateError> {
        self.ensure_dir()?;
        let path = self.dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, e)| TemplateError::Io {
                path: path.clone(),
                source: e.into(),
            },
        )?;
        Ok(StoreLock { _lock: lock })
    }

    /// The template whose inputs are exactly `inputs`, if one is complete.
    pub fn find(&self, inputs: &TemplateInputs) -> Result<Lookup, TemplateError> {
        let key = inputs.key();
        let dir = self.dir.join(&key);
        if !dir.join(MANIFEST_FILE).exists() {
            return Ok(Lookup::Missing(key));
        }
        let manifest = read_manifest(&dir)?;
        if &manifest.inputs != inputs || SNAPSHOT_FILES.iter().any(|f| !dir.join(f).is_file()) {
            return Ok(Lookup::Missing(key));
        }
        Ok(Lookup::Found(Box::new(Template { dir, manifest })))
    }

    /// Every template folder with a readable manifest (others are reported as errors).
    pub fn list(&self) -> Result<Vec<Result<Template, TemplateError>>, TemplateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || !entry.path().is_dir() {
                continue;
            }
            let dir = entry.path();
            out.push(read_manifest(&dir).map(|manifest| Template { dir, manifest }));
        }
        out.sort_by(|a, b| match (a, b) {
            (Ok(a), Ok(b)) => a.manifest.created.cmp(&b.manifest.created),
            _ => std::cmp::Ordering::Equal,
        });
        Ok(out)
    }

    /// The names of the template folders (readable manifest or not).
    pub fn keys(&self) -> Result<Vec<String>, TemplateError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        Ok(entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect())
    }

    /// A fresh build folder for `key` (under the lock).
    pub fn begin(&self, _lock: &StoreLock, key: &str) -> Result<PathBuf, TemplateError> {
        self.ensure_dir()?;
        let dir = self
            .dir
            .join(format!("{BUILDING_PREFIX}{key}-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(dir)
    }

    /// Writes the manifest into the build folder `build`, keeps only the snapshot files
    /// and the manifest, and renames it into place.
    pub fn commit(
        &self,
        _lock: &StoreLock,
        build: &Path,
        snapshot_dir: &Path,
        manifest: &Manifest,
    ) -> Result<Template, TemplateError> {
        let target = self.dir.join(&manifest.key);
        let staged = self.dir.join(format!(
            "{BUILDING_PREFIX}{}-{}.done",
            manifest.key,
            std::process::id()
        ));
        DirBuilder::new()
            .mode(0o700)
            .create(&staged)
            .map_err(io(&staged))?;
        for f in SNAPSHOT_FILES {
            let from = snapshot_dir.join(f);
            std::fs::rename(&from, staged.join(f)).map_err(io(&from))?;
        }
        let path = staged.join(MANIFEST_FILE);
        let json =
            serde_json::to_vec_pretty(manifest).map_err(|source| TemplateError::Manifest {
                path: path.clone(),
                source,
            })?;
        std::fs::write(&path, json).map_err(io(&path))?;
        if target.exists() {
            self.remove_dir(&target)?;
        }
        std::fs::rename(&staged, &target).map_err(io(&staged))?;
        let _ = std::fs::remove_dir_all(build);
        Ok(Template {
            dir: target,
            manifest: manifest.clone(),
        })
    }

    /// Removes the template `key` (under the lock).
    pub fn remove(&self, _lock: &StoreLock, key: &str) -> Result<(), TemplateError> {
        if key.is_empty() || key.starts_with('.') || key.contains('/') {
            return Err(TemplateError::NotFound(key.to_owned()));
        }
        let dir = self.dir.join(key);
        if !dir.is_dir() {
            return Err(TemplateError::NotFound(key.to_owned()));
        }
        self.remove_dir(&dir)
    }

    /// Removes leftovers of builds that died (their folders stay `.building-*`).
    pub fn remove_stale_builds(&self, _lock: &StoreLock) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(BUILDING_PREFIX) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Renames first, so a concurrent lookup sees the template whole or not at all; VMs
    /// restored from it keep their private mappings of the removed files.
    fn remove_dir(&self, dir: &Path) -> Result<(), TemplateError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let doomed = self
            .dir
            .join(format!("{BUILDING_PREFIX}rm-{name}-{}", std::process::id()));
        std::fs::rename(dir, &doomed).map_err(io(dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io(&doomed))
    }
}

/// Asks a VMM's API socket (`husk-vmm --api-socket`) for a snapshot into `dir`; returns the
/// VMM's figures. Blocking.
pub fn request_snapshot(api_socket: &Path, dir: &Path) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, BufReader, Write};
    let mut conn = std::os::unix::net::UnixStream::connect(api_socket).map_err(|e| {
        format!(
            "connecting to the VMM's API socket {}: {e}",
            api_socket.display()
        )
    })?;
    conn.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .map_err(|e| format!("API socket timeout: {e}"))?;
    let request = serde_json::json!({ "action": "snapshot", "dir": dir });
    writeln!(conn, "{request}").map_err(|e| format!("sending the snapshot request: {e}"))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("reading the snapshot reply: {e}"))?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("snapshot reply {line:?}: {e}"))?;
    if reply["ok"] != true {
        return Err(format!(
            "the VMM refused the snapshot: {}",
            reply["error"].as_str().unwrap_or(line.trim())
        ));
    }
    Ok(reply)
}

impl TemplateStore {
    /// Removes the templates that nothing can restore any more: taken by another VMM build
    /// or of a kernel or initramfs file that changed or is gone. Returns their keys.
    pub fn remove_unrestorable(&self, lock: &StoreLock) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(all) = self.list() else {
            return removed;
        };
        for t in all.into_iter().flatten() {
            let i = &t.manifest.inputs;
            let current = |f: &FileIdentity| FileIdentity::of(&f.path).is_ok_and(|now| now == *f);
            if i.vmm_build != husk_vmm::BUILD_ID || !current(&i.kernel) || !current(&i.initramfs) {
                let key = t.dir.file_name().map(|n| n.to_string_lossy().into_owned());
                if let Some(key) = key
                    && self.remove(lock, &key).is_ok()
                {
                    removed.push(key);
                }
            }
        }
        removed
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest, TemplateError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&path).map_err(io(&path))?;
    serde_json::from_slice(&text).map_err(|source| TemplateError::Manifest { path, source })
}

/// Bytes the template's files take on disk (the memory file is sparse).
pub fn disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> TemplateInputs {
        let kernel = dir.join("vmlinux");
        let initramfs = dir.join("initramfs.cpio");
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&initramfs, b"initramfs").unwrap();
        let config = Config::parse(
            &format!(
                "kernel = \"{}\"\ninitramfs = \"{}\"\n",
                kernel.display(),
                initramfs.display()
            ),
            Path::new("test.toml"),
        )
        .unwrap();
        TemplateInputs::new(
            &config,
            VmSize {
                vcpus: 1,
                memory_mib: 128,
            },
            slots_for(RootfsMode::Virtiofs, false, "shared", false),
        )
        .unwrap()
    }

    fn fake_build(store: &TemplateStore, inputs: &TemplateInputs) -> Template {
        let lock = store.lock().unwrap();
        let build = store.begin(&lock, &inputs.key()).unwrap();
        let snap = build.join("snapshot");
        std::fs::create_dir(&snap).unwrap();
        for f in SNAPSHOT_FILES {
            std::fs::write(snap.join(f), f).unwrap();
        }
        let manifest = Manifest {
            key: inputs.key(),
            inputs: inputs.clone(),
            created: "2026-12-03T00:00:00Z".into(),
            boot_ms: 1,
            snapshot: serde_json::json!({}),
            nic_macs: Vec::new(),
        };
        store.commit(&lock, &build, &snap, &manifest).unwrap()
    }

    #[test]
    fn a_template_is_found_only_for_exactly_its_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(&tmp.path().join("root"));
        let a = inputs(tmp.path());
        assert!(matches!(store.find(&a).unwrap(), Lookup::Missing(k) if k == a.key()));
        let t = fake_build(&store, &a);
        assert_eq!(t.dir, store.dir().join(a.key()));
        assert!(matches!(store.find(&a).unwrap(), Lookup::Found(_)));
        // Nothing of the build is left beside it.
        let names: Vec<String> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n == ".lock" || *n == a.key()),
            "{names:?}"
        );

        let mut bigger = a.clone();
        bigger.memory_mib = 256;
        assert_ne!(bigger.key(), a.key());
        assert!(matches!(store.find(&bigger).unwrap(), Lookup::Missing(_)));
        let mut other_slots = a.clone();
        other_slots.slots = vec!["fs:other".into()];
        assert!(matches!(
            store.find(&other_slots).unwrap(),
            Lookup::Missing(_)
        ));
    }

    #[test]
    fn a_rebuilt_kernel_is_a_new_template() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(&tmp.path().join("root"));
        let a = inputs(tmp.path());
        fake_build(&store, &a);
        // Rewritten in place: same path, new size and ctime.
        std::fs::write(tmp.path().join("vmlinux"), b"kernel, rebuilt").unwrap();
        let b = inputs(tmp.path());
        assert_ne!(a.kernel, b.kernel);
        assert!(matches!(store.find(&b).unwrap(), Lookup::Missing(_)));
    }

    #[test]
    fn a_manifest_whose_inputs_differ_from_its_key_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(&tmp.path().join("root"));
        let a = inputs(tmp.path());
        let t = fake_build(&store, &a);
        // Someone edits the manifest: the folder name no longer matches what it holds.
        let mut m = t.manifest.clone();
        m.inputs.vcpus = 2;
        std::fs::write(t.dir.join(MANIFEST_FILE), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(store.find(&a).unwrap(), Lookup::Missing(_)));
        // A missing memory file also makes it unusable.
        let t = fake_build(&store, &a);
        std::fs::remove_file(t.dir.join("memory")).unwrap();
        assert!(matches!(store.find(&a).unwrap(), Lookup::Missing(_)));
    }

    #[test]
    fn templates_of_a_changed_kernel_or_another_vmm_build_are_pruned() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(&tmp.path().join("root"));
        let a = inputs(tmp.path());
        fake_build(&store, &a);
        let mut other_build = a.clone();
        other_build.vmm_build = "0000000000000000".into();
        fake_build(&store, &other_build);
        let lock = store.lock().unwrap();
        assert_eq!(store.remove_unrestorable(&lock), vec![other_build.key()]);
        drop(lock);
        assert!(matches!(store.find(&a).unwrap(), Lookup::Found(_)));
        std::fs::write(tmp.path().join("vmlinux"), b"kernel, rebuilt").unwrap();
        let lock = store.lock().unwrap();
        assert_eq!(store.remove_unrestorable(&lock), vec![a.key()]);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn list_and_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(&tmp.path().join("root"));
        assert!(
            store.list().unwrap().is_empty(),
            "no folder yet is no template"
        );
        let a = inputs(tmp.path());
        fake_build(&store, &a);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].as_ref().unwrap().manifest.key, a.key());
        let lock = store.lock().unwrap();
        let e = store.remove(&lock, "nope").unwrap_err();
        assert!(e.to_string().contains("no template nope"), "{e}");
        assert!(store.remove(&lock, "../x").is_err());
        store.remove(&lock, &a.key()).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn block_mode_has_a_rootfs_slot_and_a_share_only_for_binds() {
        assert_eq!(
            slots_for(RootfsMode::Virtiofs, true, "shared", false),
            vec!["fs:shared".to_string()]
        );
        assert_eq!(
            slots_for(RootfsMode::Block, false, "shared", false),
            vec!["blk:rootfs,ro".to_string()]
        );
        assert_eq!(
            slots_for(RootfsMode::Block, true, "shared", true),
            vec![
                "blk:rootfs,ro".to_string(),
                "fs:shared".to_string(),
                "net".to_string()
            ]
        );
    }

    #[test]
    fn the_templates_folder_cannot_be_a_container_id() {
        assert!(crate::id::validate(TEMPLATES_DIR).is_err());
    }

    #[test]
    fn a_pod_with_a_nic_has_a_net_slot_after_its_share() {
        assert_eq!(
            slots_for(RootfsMode::Virtiofs, false, "shared", false),
            vec!["fs:shared".to_string()]
        );
        assert_eq!(
            slots_for(RootfsMode::Virtiofs, false, "shared", true),
            vec!["fs:shared".to_string(), "net".to_string()]
        );
    }

    #[test]
    fn template_mode_parses() {
        assert_eq!("auto".parse::<TemplateMode>().unwrap(), TemplateMode::Auto);
        assert_eq!("off".parse::<TemplateMode>().unwrap(), TemplateMode::Off);
        assert!("on".parse::<TemplateMode>().is_err());
    }
}
