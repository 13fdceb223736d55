//! `husk template create | list | rm`: VM templates under the state root
//! (`husk_runtime::template`). `create` boots a VM with the device slots a container needs
//! (a virtio-fs share served by a virtiofsd on an empty folder; in block mode an empty
//! read-only disk), waits for its agent and snapshots it; `husk create`/`run` then restore
//! it (with `template = "auto"`).

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use husk_protocol::client::{Target, connect_with_retry};
use husk_runtime::config::Config;
use husk_runtime::sizing::VmSize;
use husk_runtime::state::RootfsMode;
use husk_runtime::template::{
    Lookup, Manifest, Template, TemplateInputs, TemplateStore, disk_usage, request_snapshot,
    slots_for,
};
use husk_runtime::vm_config::{path_arg, rootfs_block_arg, vm_config};
use husk_runtime::volumes::{SHARE_TAG, SharedFolder};
use husk_vmm::stop::StopReason;

use super::GlobalOpts;
use super::monitor::{JAIL_DIR, describe_stop, spawn_virtiofsd, spawn_vmm};

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// Boot a VM to its agent and keep its snapshot as the template of VMs of that size.
    Create {
        /// vCPUs [default: `vcpus` of the configuration].
        #[arg(long)]
        vcpus: Option<u8>,
        /// Guest memory in MiB, before the CPU template's rounding [default: `memory_mib`].
        #[arg(long)]
        memory_mib: Option<u64>,
        /// The rootfs mode of the containers it serves: `virtiofs` (a share slot) or `block`
        /// (an empty read-only disk slot each restore fills with its image) [default:
        /// `rootfs_mode` of the configuration].
        #[arg(long)]
        rootfs_mode: Option<String>,
        /// With `--rootfs-mode block`: a share slot too, for containers with host volumes.
        #[arg(long)]
        volumes: bool,
        /// Build it again even if a template with the same inputs exists.
        #[arg(long)]
        force: bool,
    },
    /// List the templates (key, size, slots, whether the current configuration uses it).
    List {
        /// `table` or `json`.
        #[arg(short, long, default_value = "table")]
        format: String,
    },
    /// Remove templates by key (VMs restored from one keep running).
    Rm {
        /// Remove every template.
        #[arg(long)]
        all: bool,
        keys: Vec<String>,
    },
}

pub fn run(g: &GlobalOpts, cmd: TemplateCommand) -> Result<i32> {
    match cmd {
        TemplateCommand::Create {
            vcpus,
            memory_mib,
            rootfs_mode,
            volumes,
            force,
        } => create(
            g,
            Shape {
                vcpus,
                memory_mib,
                rootfs_mode,
                volumes,
            },
            force,
        ),
        TemplateCommand::List { format } => list(g, &format),
        TemplateCommand::Rm { all, keys } => rm(g, all, &keys),
    }
}

/// What `template create` was asked to build.
struct Shape {
    vcpus: Option<u8>,
    memory_mib: Option<u64>,
    rootfs_mode: Option<String>,
    volumes: bool,
}

fn create(g: &GlobalOpts, shape: Shape, force: bool) -> Result<i32> {
    let config = Config::load()?;
    let cpu = config.cpu_template_here()?;
    let mode = match &shape.rootfs_mode {
        Some(m) => m
            .parse::<RootfsMode>()
            .map_err(|why| anyhow!("--rootfs-mode {m}: {why}"))?,
        None => config.rootfs_mode,
    };
    if shape.volumes && mode != RootfsMode::Block {
        bail!(
            "--volumes is for --rootfs-mode block: a virtiofs template's share holds the volumes"
        );
    }
    let vcpus = shape.vcpus.unwrap_or(config.vcpus);
    let memory_mib = shape.memory_mib;
    if vcpus == 0 || vcpus > config.max_vcpus {
        bail!(
            "--vcpus {vcpus}: must be between 1 and max_vcpus = {} ({})",
            config.max_vcpus,
            config.source
        );
    }
    let asked = memory_mib.unwrap_or(config.memory_mib);
    let memory_mib = cpu.memory_mib(asked);
    if asked < husk_vmm::config::MIN_MEMORY_MIB || memory_mib > config.max_memory_mib {
        bail!(
            "--memory-mib {asked} ({memory_mib} MiB after the {} CPU template's rounding): must be between {} and max_memory_mib = {} ({})",
            cpu.name(),
            husk_vmm::config::MIN_MEMORY_MIB,
            config.max_memory_mib,
            config.source
        );
    }
    let size = VmSize { vcpus, memory_mib };
    let slots = slots_for(mode, shape.volumes, SHARE_TAG, false);
    let inputs = TemplateInputs::new(&config, size, slots)?;
    let key = inputs.key();
    let store = TemplateStore::for_config(&config, &g.root);
    let lock = store.lock()?;
    store.remove_stale_builds(&lock);
    for key in store.remove_unrestorable(&lock) {
        eprintln!("husk: removed template {key}: its VMM build, kernel or initramfs is gone");
    }
    if let Lookup::Found(t) = store.find(&inputs)?
        && !force
    {
        eprintln!(
            "husk: template {key} ({}) already exists in {}",
            inputs.summary(),
            t.dir.display()
        );
        println!("{key}");
        return Ok(0);
    }
    let build = store.begin(&lock, &key)?;
    let result = boot_and_snapshot(&config, size, mode, shape.volumes, &build);
    let (boot, figures) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&build);
            return Err(e.context(format!("building template {key} ({})", inputs.summary())));
        }
    };
    let manifest = Manifest {
        key: key.clone(),
        inputs,
        created: husk_runtime::time::rfc3339(SystemTime::now()),
        boot_ms: boot.as_millis() as u64,
        snapshot: figures,
        nic_macs: Vec::new(),
    };
    let t = store.commit(&lock, &build, &build.join("snapshot"), &manifest)?;
    tracing::info!(key, dir = %t.dir.display(), boot_ms = manifest.boot_ms, "template created");
    eprintln!(
        "husk: template {key} ({}): booted in {:.1} s, {} MiB on disk",
        manifest.inputs.summary(),
        boot.as_secs_f64(),
        disk_usage(&t.dir) >> 20
    );
    println!("{key}");
    Ok(0)
}

/// Boots the template VM in `build`, waits for its agent and snapshots it into
/// `build/snapshot`; returns the boot time and the VMM's snapshot figures.
fn boot_and_snapshot(
    config: &Config,
    size: VmSize,
    mode: RootfsMode,
    volumes: bool,
    build: &Path,
) -> Result<(Duration, serde_json::Value)> {
    // The sockets in a folder of their own: the VMM's jail binds the folders of its sockets,
    // and the snapshot's folder beside them must stay reachable once the VMM is unprivileged.
    let sockets = build.join("run");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&sockets)
        .with_context(|| format!("creating {}", sockets.display()))?;
    let vm_socket = sockets.join("vm.sock");
    let api_socket = sockets.join("api.sock");
    // Slots in the order the monitor gives them (slots_for): the rootfs disk, empty here,
    // filled by each restore with its container's image; then the share.
    let mut devices = Vec::new();
    if mode == RootfsMode::Block {
        devices.push("--block".to_owned());
        devices.push(rootfs_block_arg(None)?);
    }
    // The share slot: served now by a virtiofsd on an empty folder, later by each
    // container's own. The guest probes the device at boot but never mounts it here.
    let mut virtiofsd = None;
    if mode == RootfsMode::Virtiofs || volumes {
        let folder = SharedFolder::prepare(&build.join(SHARE_TAG), None, &[])?;
        let fs_socket = sockets.join("fs.sock");
        virtiofsd = Some(spawn_virtiofsd(config, &folder, &fs_socket)?);
        devices.push("--fs".into());
        devices.push(format!("socket={},tag={SHARE_TAG}", path_arg(&fs_socket)?));
    }
    devices.push("--api-socket".into());
    devices.push(path_arg(&api_socket)?);
    let vmm = vm_config(config, size, &vm_socket, devices)?;
    let snapshot = build.join("snapshot");
    let started = Instant::now();
    let outcome = (|| {
        let mut vmm_done = spawn_vmm(vmm, config, build.join(JAIL_DIR), vec![snapshot.clone()])?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let target = Target::hybrid_vsock(&vm_socket);
        let deadline = Instant::now() + Duration::from_secs(config.boot_timeout_secs);
        rt.block_on(async {
            let client = tokio::select! {
                c = connect_with_retry(&target, deadline) => c.context("waiting for the template VM's agent")?,
                r = &mut vmm_done => bail!("the template VM stopped before its agent answered: {}", describe_stop(r)),
            };
            client
                .check()
                .await
                .context("health check of the template VM's agent")?;
            anyhow::Ok(())
        })?;
        let boot = started.elapsed();
        let figures = request_snapshot(&api_socket, &snapshot).map_err(|e| anyhow!(e))?;
        let stopped = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), &mut vmm_done).await });
        match stopped {
            Ok(Ok(Ok(StopReason::Snapshotted(_)))) => {}
            Ok(r) => bail!(
                "the template VM did not end with its snapshot: {}",
                describe_stop(r)
            ),
            Err(_) => bail!("the template VM did not end within 30 s of its snapshot"),
        }
        Ok((boot, figures))
    })();
    if let Some(mut v) = virtiofsd {
        let _ = v.kill();
        let _ = v.wait();
    }
    outcome
}

/// Whether `t` is what a container VM of its size would restore under `config` now.
fn usable(config: &Config, t: &Template) -> bool {
    let size = VmSize {
        vcpus: t.manifest.inputs.vcpus,
        memory_mib: t.manifest.inputs.memory_mib,
    };
    TemplateInputs::new(config, size, t.manifest.inputs.slots.clone())
        .is_ok_and(|now| now == t.manifest.inputs)
}

fn list(g: &GlobalOpts, format: &str) -> Result<i32> {
    let config = Config::load()?;
    let store = TemplateStore::for_config(&config, &g.root);
    let templates = store.list()?;
    match format {
        "json" => {
            let docs: Vec<serde_json::Value> = templates
                .iter()
                .filter_map(|t| t.as_ref().ok())
                .map(|t| {
                    serde_json::json!({
                        "key": t.manifest.key,
                        "dir": t.dir,
                        "vcpus": t.manifest.inputs.vcpus,
                        "memory_mib": t.manifest.inputs.memory_mib,
                        "cpu_template": t.manifest.inputs.cpu_template,
                        "slots": t.manifest.inputs.slots,
                        "created": t.manifest.created,
                        "boot_ms": t.manifest.boot_ms,
                        "disk_bytes": disk_usage(&t.dir),
                        "usable": usable(&config, t),
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(docs));
        }
        "table" => {
            println!(
                "{:<16}  {:>5}  {:>7}  {:<5}  {:<12}  {:>7}  {:<6}  CREATED",
                "KEY", "VCPUS", "MEMORY", "CPU", "SLOTS", "DISK", "USABLE"
            );
            for t in &templates {
                match t {
                    Ok(t) => println!(
                        "{:<16}  {:>5}  {:>4}MiB  {:<5}  {:<12}  {:>4}MiB  {:<6}  {}",
                        t.manifest.key,
                        t.manifest.inputs.vcpus,
                        t.manifest.inputs.memory_mib,
                        t.manifest.inputs.cpu_template,
                        t.manifest.inputs.slots.join(","),
                        disk_usage(&t.dir) >> 20,
                        if usable(&config, t) { "yes" } else { "stale" },
                        t.manifest.created
                    ),
                    Err(e) => eprintln!("husk: unreadable template: {e}"),
                }
            }
        }
        other => bail!("--format {other}: expected table or json"),
    }
    Ok(0)
}

fn rm(g: &GlobalOpts, all: bool, keys: &[String]) -> Result<i32> {
    if all != keys.is_empty() {
        bail!("name the templates to remove, or give --all (not both)");
    }
    let config = Config::load()?;
    let store = TemplateStore::for_config(&config, &g.root);
    let lock = store.lock()?;
    let keys: Vec<String> = if all { store.keys()? } else { keys.to_vec() };
    let mut failed = false;
    for key in keys {
        if let Err(e) = store.remove(&lock, &key) {
            eprintln!("husk: {e}");
            failed = true;
        }
    }
    if all {
        store.remove_stale_builds(&lock);
    }
    Ok(if failed { super::FAILURE } else { 0 })
}
