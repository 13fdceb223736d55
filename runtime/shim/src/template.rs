//! VM templates in the shim (`template = "auto"`, docs/snapshots.md): a pod's or container's
//! VM restores the template of its shape, and a missing one is made first from a boot of
//! this sandbox's own devices (its share, its NIC), so that every later VM of that shape
//! restores. The templates are the CLI's (`template_dir`, default
//! `/run/husk/@templates`): `husk template list` shows them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use husk_protocol::client::{Target, connect_with_retry};
use husk_runtime::config::Config;
use husk_runtime::sizing::VmSize;
use husk_runtime::template::{
    Lookup, Manifest, Template, TemplateInputs, TemplateMode, TemplateStore, request_snapshot,
};
use husk_runtime::vm_config::{path_arg, vm_config};
use tokio::sync::watch;

use crate::sandbox::{Virtiofsd, VmmJob, run_vm};

/// The state root whose `@templates` the shim uses without `template_dir`: the CLI's
/// default, so both share templates.
const DEFAULT_STATE_ROOT: &str = husk_runtime::state::DEFAULT_ROOT;

/// What the shim wants of a template for one VM.
pub struct TemplateRequest {
    pub slots: Vec<String>,
    /// The MAC the VM's NIC gets (a `net` slot), recorded in a template built now.
    pub nic_mac: Option<String>,
}

/// The template for a VM of `size` with `devices` (its husk-vmm device arguments), built
/// from a boot of those devices if missing. `None`: boot cold (the reason is logged).
pub async fn find_or_build(
    config: &Config,
    size: VmSize,
    run_dir: &Path,
    devices: &[String],
    virtiofsd: Option<&Virtiofsd>,
    request: TemplateRequest,
) -> Option<Template> {
    if config.template == TemplateMode::Off {
        return None;
    }
    let inputs = match TemplateInputs::new(config, size, request.slots) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("booting cold: the template inputs cannot be read: {e}");
            return None;
        }
    };
    let store = TemplateStore::for_config(config, Path::new(DEFAULT_STATE_ROOT));
    match store.find(&inputs) {
        Ok(Lookup::Found(t)) if usable(&t) => return Some(*t),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!("booting cold: looking up the template: {e}");
            return None;
        }
    }
    let key = inputs.key();
    let summary = inputs.summary();
    let t = Instant::now();
    let built = build(
        config,
        size,
        run_dir,
        devices,
        virtiofsd,
        &store,
        inputs,
        request.nic_mac,
    )
    .await;
    match built {
        Ok(template) => {
            tracing::info!(
                template = key,
                ms = t.elapsed().as_millis() as u64,
                "template built ({summary})"
            );
            Some(template)
        }
        Err(e) => {
            tracing::warn!("booting cold: building template {key} ({summary}): {e:#}");
            None
        }
    }
}

/// Whether the template's state file passes its checks (version, build, checksum).
fn usable(t: &Template) -> bool {
    match husk_vmm::persist::MachineState::read(&t.dir) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(
                "template {} is unusable ({e}): building it again",
                t.manifest.key
            );
            false
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn build(
    config: &Config,
    size: VmSize,
    run_dir: &Path,
    devices: &[String],
    virtiofsd: Option<&Virtiofsd>,
    store: &TemplateStore,
    inputs: TemplateInputs,
    nic_mac: Option<String>,
) -> Result<Template> {
    // Builds of one shape queue here; the second finds the first's template.
    let store_dir = store.dir().to_path_buf();
    let lock = tokio::task::spawn_blocking(move || TemplateStore::at(&store_dir).lock())
        .await
        .map_err(|e| anyhow!("template lock: {e}"))??;
    if let Lookup::Found(t) = store.find(&inputs)?
        && usable(&t)
    {
        return Ok(*t);
    }
    store.remove_stale_builds(&lock);
    for key in store.remove_unrestorable(&lock) {
        tracing::info!(template = key, "removed a template nothing can restore");
    }
    let key = inputs.key();
    let build = store.begin(&lock, &key)?;
    let result = boot_and_snapshot(config, size, run_dir, devices, virtiofsd, &build).await;
    let (boot, figures) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&build);
            return Err(e);
        }
    };
    let manifest = Manifest {
        key,
        inputs,
        created: husk_runtime::time::rfc3339(SystemTime::now()),
        boot_ms: boot.as_millis() as u64,
        snapshot: figures,
        nic_macs: nic_mac.into_iter().collect(),
    };
    Ok(store.commit(&lock, &build, &build.join("snapshot"), &manifest)?)
}

/// Boots a VM of this sandbox's devices with an API socket, waits for its agent and
/// snapshots it into `build/snapshot`.
async fn boot_and_snapshot(
    config: &Config,
    size: VmSize,
    run_dir: &Path,
    devices: &[String],
    virtiofsd: Option<&Virtiofsd>,
    build: &Path,
) -> Result<(Duration, serde_json::Value)> {
    let vm_socket: PathBuf = run_dir.join("template-vm.sock");
    let api_socket = run_dir.join("template-api.sock");
    let _ = std::fs::remove_file(&vm_socket);
    let _ = std::fs::remove_file(&api_socket);
    let mut args = devices.to_vec();
    args.push("--api-socket".into());
    args.push(path_arg(&api_socket)?);
    let dir = build.join("snapshot");
    let job = VmmJob {
        launch: vm_config(config, size, &vm_socket, args)?,
        runtime: config.clone(),
        jail_root: run_dir.join("template-jail"),
        snapshot_dirs: vec![dir.clone()],
    };
    let fs = virtiofsd.cloned();
    let (tx, mut stopped) = watch::channel(None);
    let started = Instant::now();
    std::thread::Builder::new()
        .name("vmm-template".into())
        .spawn(move || {
            let reason = run_vm(job, fs);
            let _ = tx.send(Some(reason));
        })
        .context("starting the template VM's thread")?;
    let target = Target::hybrid_vsock(&vm_socket);
    let deadline = Instant::now() + Duration::from_secs(config.boot_timeout_secs);
    let client = tokio::select! {
        c = connect_with_retry(&target, deadline) => c.context("waiting for the template VM's agent")?,
        r = stopped.wait_for(Option::is_some) => {
            let why = r.ok().and_then(|v| v.clone()).unwrap_or_default();
            bail!("the template VM stopped before its agent answered: {why}");
        }
    };
    client
        .check()
        .await
        .context("health check of the template VM's agent")?;
    drop(client);
    let boot = started.elapsed();
    let figures = tokio::task::spawn_blocking(move || request_snapshot(&api_socket, &dir))
        .await
        .map_err(|e| anyhow!("snapshot request: {e}"))?
        .map_err(|e| anyhow!(e))?;
    let ended = tokio::time::timeout(Duration::from_secs(30), stopped.wait_for(Option::is_some))
        .await
        .map_err(|_| anyhow!("the template VM did not end within 30 s of its snapshot"))?
        .map_err(|_| anyhow!("the template VM's thread vanished"))?
        .clone()
        .unwrap_or_default();
    if !ended.starts_with("snapshot") {
        bail!("the template VM did not end with its snapshot: {ended}");
    }
    let _ = std::fs::remove_file(&vm_socket);
    Ok((boot, figures))
}
