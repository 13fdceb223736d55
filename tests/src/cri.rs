//! A private containerd with its CRI plugin on, for the Kubernetes-pod tests and benches:
//! Debian's containerd 1.6 (own config, root, state, socket in a temp dir, see
//! `containerd`), two runtime handlers (`runc` and `husk`), a CNI bridge network on a
//! random private /24, a pause image and a busybox image imported from OCI tarballs (there
//! is no registry, and nothing is pulled), and a CRI client (k8s-cri over the unix socket).
//!
//! containerd runs in a network namespace of its own (`ContainerdOptions::own_netns`): the
//! bridge, the host ends of the pods' veths and all pod traffic stay there and vanish with
//! containerd. Pod network namespaces are mounted under containerd's state dir
//! (`netns_mounts_under_state_dir`), host-local keeps its leases in the test dir, and pods
//! get cgroup parents under one test cgroup, so dropping the harness removes everything.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{
    Containerd, ContainerdOptions, build_oci_image_with_cmd, containerd_missing_reason,
    find_on_path, sha256_hex,
};

/// The containerd namespace of the CRI plugin.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The image of the pods' containers: the busybox rootfs, command `/bin/sh`.
pub const BUSYBOX_IMAGE: &str = "docker.io/husk/busybox:test";
/// The sandbox ("pause") image: the busybox rootfs whose command sleeps forever.
pub const PAUSE_IMAGE: &str = "docker.io/husk/pause:test";
/// Runtime handlers in the CRI config.
pub const RUNC_HANDLER: &str = "runc";
pub const HUSK_HANDLER: &str = "husk";
/// The shim binaries of the handlers.
pub const RUNC_SHIM: &str = "containerd-shim-runc-v2";
pub const HUSK_SHIM: &str = "containerd-shim-husk-v2";
/// Debian's containernetworking-plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The CNI plugins the network uses (loopback for containerd's own `lo` network).
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback"];
/// A husk pod boots a VM (15-60 s on a loaded nested-PVM host): CRI calls get long.
const CALL_TIMEOUT: Duration = Duration::from_secs(600);

/// Why the CRI harness cannot run here, or `None`.
pub fn cri_missing_reason() -> Option<String> {
    if let Some(reason) = containerd_missing_reason() {
        return Some(reason);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "containerd's CRI plugin needs root (network namespaces, mounts, cgroups)".into(),
        );
    }
    for plugin in CNI_PLUGINS {
        let p = Path::new(CNI_BIN_DIR).join(plugin);
        if !p.is_file() {
            return Some(format!(
                "{} is missing (Debian package containernetworking-plugins; \
                 scripts/install-deps.sh installs it)",
                p.display()
            ));
        }
    }
    for (bin, package) in [("unshare", "util-linux"), ("ip", "iproute2")] {
        if find_on_path(bin).is_none() {
            return Some(format!("{bin} is not installed (Debian package {package})"));
        }
    }
    None
}

/// Four random bytes as hex, for names that must not collide with a concurrent run.
fn random_hex() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The CNI bridge network of the test: one conflist in its own conf dir.
pub struct CniNetwork {
    /// The network name (also the prefix of libcni's cache files).
    pub name: String,
    /// The Linux bridge, in containerd's network namespace.
    pub bridge: String,
    /// `10.N.0.0/24`.
    pub subnet: String,
    pub conf_dir: PathBuf,
}

impl CniNetwork {
    /// Writes the conflist: a bridge with the gateway address on it, no masquerading (the
    /// pods only reach each other), and host-local leases kept in `dir`.
    fn create(dir: &Path, tag: &str, octet: u8) -> Result<Self> {
        let name = format!("husk-cri-{tag}");
        let bridge = format!("husk-cni0-{}", &tag[..4]);
        let subnet = format!("10.{octet}.0.0/24");
        let conf_dir = dir.join("cni-conf");
        std::fs::create_dir_all(&conf_dir).context("creating the CNI conf dir")?;
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "dataDir": dir.join("cni-ipam").display().to_string(),
                },
            }],
        });
        std::fs::write(
            conf_dir.join("10-husk-cri.conflist"),
            serde_json::to_string_pretty(&conflist)?,
        )
        .context("writing the CNI conflist")?;
        Ok(Self {
            name,
            bridge,
            subnet,
            conf_dir,
        })
    }
}

/// The CRI plugin's configuration (the TOML after containerd's `[grpc]` table).
fn cri_config(network: &CniNetwork) -> String {
    let p = "plugins.\"io.containerd.grpc.v1.cri\"";
    format!(
        "[{p}]\n\
         \x20 sandbox_image = {PAUSE_IMAGE:?}\n\
         \x20 # root cannot lower oom_score_adj on these hosts\n\
         \x20 restrict_oom_score_adj = true\n\
         \x20 netns_mounts_under_state_dir = true\n\
         [{p}.containerd]\n\
         \x20 default_runtime_name = {RUNC_HANDLER:?}\n\
         \x20 snapshotter = \"overlayfs\"\n\
         [{p}.containerd.runtimes.{RUNC_HANDLER}]\n\
         \x20 runtime_type = \"io.containerd.runc.v2\"\n\
         [{p}.containerd.runtimes.{HUSK_HANDLER}]\n\
         \x20 runtime_type = \"io.containerd.husk.v2\"\n\
         \x20 pod_annotations = [\"io.husk.*\"]\n\
         [{p}.cni]\n\
         \x20 bin_dir = {CNI_BIN_DIR:?}\n\
         \x20 conf_dir = {:?}\n\
         \x20 max_conf_num = 1\n",
        network.conf_dir.display().to_string(),
    )
}

/// A CRI client on a unix socket; every call blocks on a private runtime, bounded by
/// `CALL_TIMEOUT`.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl Cri {
    pub fn connect(socket: &Path) -> Result<Self> {
        let rt = crate::runtime().context("creating the CRI client's runtime")?;
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(
                // The URI is required by tonic but unused: the connector dials the socket.
                Endpoint::try_from("http://[::]:0")?.connect_with_connector(tower::service_fn(
                    move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    },
                )),
            )
            .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    fn call<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        // The timer must be created inside the runtime.
        match self
            .rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, fut).await })
        {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => bail!("CRI {what}: {:?}: {}", status.code(), status.message()),
            Err(_) => bail!("CRI {what}: no answer within {CALL_TIMEOUT:?}"),
        }
    }

    /// `Version`: the runtime's name and version.
    pub fn version(&self) -> Result<cri::VersionResponse> {
        let mut c = self.runtime.clone();
        self.call("Version", async move {
            c.version(cri::VersionRequest::default()).await
        })
    }

    /// `ImageStatus`: whether the CRI plugin knows `image` locally.
    pub fn image_present(&self, image: &str) -> Result<bool> {
        let mut c = self.images.clone();
        let req = cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            verbose: false,
        };
        let r = self.call("ImageStatus", async move { c.image_status(req).await })?;
        Ok(r.image.is_some())
    }

    /// `ListImages`: every repo tag the CRI plugin knows.
    pub fn list_image_tags(&self) -> Result<Vec<String>> {
        let mut c = self.images.clone();
        let r = self.call("ListImages", async move {
            c.list_images(cri::ListImagesRequest::default()).await
        })?;
        let mut tags: Vec<String> = r.images.into_iter().flat_map(|i| i.repo_tags).collect();
        tags.sort();
        Ok(tags)
    }

    pub fn run_pod_sandbox(&self, config: &cri::PodSandboxConfig, handler: &str) -> Result<String> {
        let mut c = self.runtime.clone();
        let req = cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_owned(),
        };
        let r = self.call("RunPodSandbox", async move { c.run_pod_sandbox(req).await })?;
        Ok(r.pod_sandbox_id)
    }

    /// `PodSandboxStatus`, verbose (its `info` holds containerd's view as JSON).
    pub fn pod_sandbox_status(&self, id: &str) -> Result<cri::PodSandboxStatusResponse> {
        let mut c = self.runtime.clone();
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: true,
        };
        self.call("PodSandboxStatus", async move {
            c.pod_sandbox_status(req).await
        })
    }

    pub fn list_pod_sandboxes(&self) -> Result<Vec<cri::PodSandbox>> {
        let mut c = self.runtime.clone();
        let r = self.call("ListPodSandbox", async move {
            c.list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
        })?;
        Ok(r.items)
    }

    /// `ListContainers`: every container the CRI plugin knows, in any state.
    pub fn list_containers(&self) -> Result<Vec<cri::Container>> {
        let mut c = self.runtime.clone();
        let r = self.call("ListContainers", async move {
            c.list_containers(cri::ListContainersRequest::default())
                .await
        })?;
        Ok(r.containers)
    }

    pub fn stop_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let req = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        self.call(
            "StopPodSandbox",
            async move { c.stop_pod_sandbox(req).await },
        )?;
        Ok(())
    }

    pub fn remove_pod_sandbox(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let req = cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        };
        self.call("RemovePodSandbox", async move {
            c.remove_pod_sandbox(req).await
        })?;
        Ok(())
    }

    pub fn create_container(
        &self,
        pod_id: &str,
        config: &cri::ContainerConfig,
        sandbox_config: &cri::PodSandboxConfig,
    ) -> Result<String> {
        let mut c = self.runtime.clone();
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let r = self.call(
            "CreateContainer",
            async move { c.create_container(req).await },
        )?;
        Ok(r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let req = cri::StartContainerRequest {
            container_id: id.to_owned(),
        };
        self.call(
            "StartContainer",
            async move { c.start_container(req).await },
        )?;
        Ok(())
    }

    /// `StopContainer`: the stop signal, then SIGKILL after `timeout_secs`.
    pub fn stop_container(&self, id: &str, timeout_secs: i64) -> Result<()> {
        let mut c = self.runtime.clone();
        let req = cri::StopContainerRequest {
            container_id: id.to_owned(),
            timeout: timeout_secs,
        };
        self.call("StopContainer", async move { c.stop_container(req).await })?;
        Ok(())
    }

    pub fn remove_container(&self, id: &str) -> Result<()> {
        let mut c = self.runtime.clone();
        let req = cri::RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        self.call(
            "RemoveContainer",
            async move { c.remove_container(req).await },
        )?;
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let mut c = self.runtime.clone();
        let req = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        let r = self.call(
            "ContainerStatus",
            async move { c.container_status(req).await },
        )?;
        r.status
            .with_context(|| format!("ContainerStatus of {id} has no status"))
    }

    /// `UpdateContainerResources` of container `id` to `resources`.
    pub fn update_container_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<()> {
        let mut c = self.runtime.clone();
        let req = cri::UpdateContainerResourcesRequest {
            container_id: id.to_owned(),
            linux: Some(resources),
            ..Default::default()
        };
        self.call("UpdateContainerResources", async move {
            c.update_container_resources(req).await
        })?;
        Ok(())
    }

    /// `ExecSync` of `cmd` in container `id`, bounded by `timeout_secs` on containerd's side.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout_secs: i64,
    ) -> Result<cri::ExecSyncResponse> {
        let mut c = self.runtime.clone();
        let req = cri::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_secs,
        };
        self.call("ExecSync", async move { c.exec_sync(req).await })
    }
}

/// The DNS settings of `pod_config(name)`: a documentation-range nameserver (nothing
/// answers there; the tests only read resolv.conf), a search domain naming the pod and an
/// option.
pub fn pod_dns(name: &str) -> cri::DnsConfig {
    cri::DnsConfig {
        servers: vec!["192.0.2.53".into()],
        searches: vec![format!("{name}.husk.test")],
        options: vec!["ndots:3".into()],
    }
}

/// A pod the harness started: its id and the config it was created with (CreateContainer
/// needs it again).
pub struct Pod {
    pub id: String,
    pub name: String,
    pub config: cri::PodSandboxConfig,
    /// The pod's `log_directory`; container logs are `<log_dir>/<container name>.log`.
    pub log_dir: PathBuf,
}

impl Pod {
    /// Where the CRI plugin writes the log of this pod's container `name`.
    pub fn log_path(&self, container: &str) -> PathBuf {
        self.log_dir.join(format!("{container}.log"))
    }
}

/// A process of a shim, found by its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimProcess {
    pub pid: u32,
    /// The `-id` containerd started it with (the first task of its pod).
    pub id: String,
}

/// containerd with the CRI plugin, its network, images and client; see the module doc.
/// Dropping it removes every pod through CRI, stops containerd and removes what is left
/// (mounts, cgroups, CNI cache files, leftover shims of this containerd).
pub struct CriHarness {
    cri: Cri,
    containerd: Option<Containerd>,
    network: CniNetwork,
    work: tempfile::TempDir,
    /// Parent cgroup (relative to each hierarchy's root) of every pod's cgroup parent.
    cgroup_root: String,
    pods: RefCell<Vec<String>>,
    containers: RefCell<Vec<String>>,
    host_taps: Vec<String>,
    /// Entries of /sys/fs/cgroup at start (see `cgroup_base_entries`).
    cgroup_base: Vec<PathBuf>,
}

impl CriHarness {
    /// Starts containerd with the CRI plugin (`shim_dirs` first on its PATH, `env` in its
    /// environment) and imports the pause and busybox images built from `rootfs`.
    pub fn start(shim_dirs: &[&Path], env: &[(&str, &Path)], rootfs: &Path) -> Result<Self> {
        let work = tempfile::Builder::new()
            .prefix("husk-cri-")
            .tempdir()
            .context("creating the CRI test dir")?;
        let tag = random_hex()?;
        // A second octet from the tag: concurrent runs rarely share a subnet, and if they
        // do, each network lives in its own containerd's namespace anyway.
        let octet = 64 + u8::from_str_radix(&tag[..2], 16).unwrap_or(0) % 190;
        let network = CniNetwork::create(work.path(), &tag, octet)?;
        let host_taps = tap_devices(None);
        let containerd = Containerd::start_with(ContainerdOptions {
            extra_path: shim_dirs,
            env,
            cri_config: Some(cri_config(&network)),
            own_netns: true,
            namespace: Some(CRI_NAMESPACE),
        })?;
        let cri = Cri::connect(&containerd.socket())?;
        let harness = Self {
            cri,
            containerd: Some(containerd),
            network,
            work,
            cgroup_root: format!("husk-cri-{tag}"),
            pods: RefCell::new(Vec::new()),
            containers: RefCell::new(Vec::new()),
            host_taps,
            cgroup_base: cgroup_base_entries(),
        };
        harness.wait_for_cri(Duration::from_secs(30), "")?;
        harness.import_images(rootfs)?;
        Ok(harness)
    }

    fn containerd(&self) -> &Containerd {
        // Only `Drop` takes it.
        self.containerd.as_ref().expect("containerd is running")
    }

    /// The CRI plugin starts after containerd's API answers; its socket is the same.
    fn wait_for_cri(&self, timeout: Duration, after: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.cri.version() {
                Ok(_) => return Ok(()),
                Err(e) if std::time::Instant::now() >= deadline => {
                    bail!(
                        "the CRI plugin did not answer within {timeout:?}{after} ({e:#}): {}",
                        self.log_tail(40)
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Builds the two images from `rootfs` and imports them into the CRI namespace; the
    /// CRI plugin must then know both (it pulls nothing that exists locally).
    fn import_images(&self, rootfs: &Path) -> Result<()> {
        for (name, cmd, dir) in [
            (BUSYBOX_IMAGE, &["/bin/sh"][..], "image-busybox"),
            (PAUSE_IMAGE, &["sleep", "2147483647"][..], "image-pause"),
        ] {
            let work = self.work.path().join(dir);
            std::fs::create_dir_all(&work)?;
            let tarball = work.join("image.tar");
            build_oci_image_with_cmd(rootfs, name, cmd, &work, &tarball)?;
            let tarball = tarball.to_str().context("temp path is not UTF-8")?;
            let out = self.containerd().ctr(&["images", "import", tarball])?;
            if !out.status.success() {
                bail!(
                    "ctr -n {CRI_NAMESPACE} images import {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        // The CRI plugin learns of imported images from containerd's events.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for image in [BUSYBOX_IMAGE, PAUSE_IMAGE] {
            while !self.cri.image_present(image)? {
                if std::time::Instant::now() >= deadline {
                    bail!("the CRI plugin does not list the imported image {image}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    pub fn cri(&self) -> &Cri {
        &self.cri
    }

    /// Restarts containerd (see [`Containerd::restart`]) and waits for its CRI plugin; the
    /// client reconnects on its next call.
    pub fn restart_containerd(&self) -> Result<()> {
        self.containerd().restart()?;
        self.wait_for_cri(Duration::from_secs(60), " of the restart")
    }

    pub fn network(&self) -> &CniNetwork {
        &self.network
    }

    /// The test's temp dir (pod logs, CNI config and leases, image layouts).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    pub fn containerd_dir(&self) -> &Path {
        self.containerd().dir()
    }

    /// containerd's pid; its network namespace holds the CNI bridge.
    pub fn containerd_pid(&self) -> u32 {
        self.containerd().pid()
    }

    /// The last `lines` lines of containerd's log (shims log there too).
    pub fn log_tail(&self, lines: usize) -> String {
        self.containerd
            .as_ref()
            .map(|c| c.log_tail(lines))
            .unwrap_or_default()
    }

    /// containerd's whole log.
    pub fn log(&self) -> String {
        self.containerd
            .as_ref()
            .and_then(|c| std::fs::read_to_string(c.dir().join("containerd.log")).ok())
            .unwrap_or_default()
    }

    /// Fails a test: `what` and `detail`, then the tail of containerd's log (with the
    /// shims') and of the guest consoles file `console` (written with HUSK_TEST_CONSOLE=1).
    pub fn fail_with_logs(&self, what: &str, detail: &str, console: &Path) -> ! {
        panic!(
            "{what}: {detail}\n--- containerd log (with the shims') ---\n{}\n\
             --- guest consoles (HUSK_TEST_CONSOLE=1) ---\n{}",
            self.log_tail(150),
            file_tail(console, 60)
        )
    }

    /// A pod config: metadata, hostname, a log directory in the test dir, a cgroup parent
    /// under the test's cgroup, the default Linux security context (pod network, IPC
    /// namespaces; a PID namespace per container) and DNS settings (`pod_dns(name)`).
    pub fn pod_config(&self, name: &str) -> Result<cri::PodSandboxConfig> {
        let log_dir = self.work.path().join("pod-logs").join(name);
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("creating {}", log_dir.display()))?;
        Ok(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.to_owned(),
                uid: format!("{name}-{}", random_hex()?),
                namespace: "husk-test".into(),
                attempt: 0,
            }),
            hostname: name.to_owned(),
            log_directory: log_dir.display().to_string(),
            dns_config: Some(pod_dns(name)),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/{name}", self.cgroup_root),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// `RunPodSandbox` with `handler` and `pod_config(name)`.
    pub fn run_pod(&self, name: &str, handler: &str) -> Result<Pod> {
        let config = self.pod_config(name)?;
        let id = self.cri.run_pod_sandbox(&config, handler)?;
        self.pods.borrow_mut().push(id.clone());
        let log_dir = PathBuf::from(&config.log_directory);
        Ok(Pod {
            id,
            name: name.to_owned(),
            config,
            log_dir,
        })
    }

    /// A busybox container config running `command`, logging to `<name>.log`.
    pub fn container_config(name: &str, command: &[&str]) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: BUSYBOX_IMAGE.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `CreateContainer` of `container_config(name, command)` in `pod`; returns its id.
    pub fn create_container(&self, pod: &Pod, name: &str, command: &[&str]) -> Result<String> {
        let id = self.cri.create_container(
            &pod.id,
            &Self::container_config(name, command),
            &pod.config,
        )?;
        self.containers.borrow_mut().push(id.clone());
        Ok(id)
    }

    /// The pod's IP from `PodSandboxStatus`.
    pub fn pod_ip(&self, pod: &Pod) -> Result<String> {
        let status = self.cri.pod_sandbox_status(&pod.id)?;
        let ip = status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        if ip.is_empty() {
            bail!("PodSandboxStatus of {} reports no IP", pod.id);
        }
        Ok(ip)
    }

    /// Running processes of `shim` (the binary name) started by this containerd (their
    /// `-address` is its socket).
    pub fn shims(&self, shim: &str) -> Vec<ShimProcess> {
        shims_with_address(shim, &self.containerd().socket().display().to_string())
    }

    /// The shim process serving `pod` (started with the pod's id, as shims group a pod's
    /// containers under its sandbox's id).
    pub fn pod_shim(&self, shim: &str, pod: &Pod) -> Option<u32> {
        self.shims(shim)
            .into_iter()
            .find(|s| s.id == pod.id)
            .map(|s| s.pid)
    }

    /// Everything a removed pod must not leave behind, described; empty when clean:
    /// processes of `shim` started by this containerd, mounts under containerd's or the
    /// test's dirs (rootfs, shm, netns), pod network namespaces, cgroups below the pods'
    /// cgroup parents, tap devices (in the host's namespace beyond those present at start,
    /// and in containerd's), libcni cache files of the test network.
    pub fn leftovers(&self, shim: &str) -> Vec<String> {
        let mut left = Vec::new();
        for s in self.shims(shim) {
            left.push(format!("{shim} pid {} (-id {})", s.pid, s.id));
        }
        for dir in [self.containerd().dir(), self.work.path()] {
            for m in mounts_under(dir) {
                left.push(format!("mount {m}"));
            }
        }
        for n in self.netns_files() {
            left.push(format!("network namespace {}", n.display()));
        }
        for c in self.pod_cgroups() {
            left.push(format!("cgroup {}", c.display()));
        }
        for e in cgroup_base_entries() {
            if !self.cgroup_base.contains(&e) && !e.ends_with(&self.cgroup_root) {
                left.push(format!("new file in the cgroup tmpfs: {}", e.display()));
            }
        }
        for t in tap_devices(None) {
            if !self.host_taps.contains(&t) {
                left.push(format!("tap {t} in the host's network namespace"));
            }
        }
        let ns = PathBuf::from(format!("/proc/{}/ns/net", self.containerd_pid()));
        for t in tap_devices(Some(&ns)) {
            left.push(format!("tap {t} in containerd's network namespace"));
        }
        for f in self.cni_cache_files() {
            left.push(format!("CNI cache {}", f.display()));
        }
        for (id, socket) in self.shim_sockets() {
            left.push(format!("shim socket {} (-id {id})", socket.display()));
        }
        left
    }

    /// Pod network namespaces (files under the CRI plugin's state dir).
    pub fn netns_files(&self) -> Vec<PathBuf> {
        let dir = self
            .containerd()
            .dir()
            .join("state/io.containerd.grpc.v1.cri/netns");
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    /// Cgroups of sandboxes and containers: directories below a pod's cgroup parent, in
    /// every hierarchy (the parents themselves are the kubelet's to make and remove; here
    /// the runtime creates them on the way and `Drop` removes them).
    pub fn pod_cgroups(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for root in cgroup_hierarchies() {
            let test_root = root.join(&self.cgroup_root);
            for pod in subdirs(&test_root) {
                walk_dirs(&pod, &mut found);
            }
        }
        found
    }

    /// libcni's cached results for the test network (`/var/lib/cni/results/<net>-<id>-<if>`)
    /// and for containerd's loopback network of this run's pods.
    pub fn cni_cache_files(&self) -> Vec<PathBuf> {
        let pods = self.pods.borrow();
        std::fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with(&format!("{}-", self.network.name))
                    || (n.starts_with("cni-loopback-") && pods.iter().any(|p| n.contains(p)))
            })
            .map(|e| e.path())
            .collect()
    }

    /// Shim sockets left for this run's pods and containers: a shim listens on
    /// `/run/containerd/s/<sha256 of "<containerd socket>/<namespace>/<id>">` (the address
    /// containerd and the shim crates derive), which a killed shim leaves behind.
    pub fn shim_sockets(&self) -> Vec<(String, PathBuf)> {
        let Some(containerd) = self.containerd.as_ref() else {
            return Vec::new();
        };
        let socket = containerd.socket();
        let ids: Vec<String> = self
            .pods
            .borrow()
            .iter()
            .chain(self.containers.borrow().iter())
            .cloned()
            .collect();
        ids.into_iter()
            .filter_map(|id| {
                let key = format!("{}/{CRI_NAMESPACE}/{id}", socket.display());
                let path = Path::new("/run/containerd/s").join(sha256_hex(key.as_bytes()).ok()?);
                path.exists().then_some((id, path))
            })
            .collect()
    }

    /// Best-effort removal of every pod through CRI.
    fn remove_all_pods(&self) {
        let Ok(pods) = self.cri.list_pod_sandboxes() else {
            return;
        };
        for p in pods {
            let _ = self.cri.stop_pod_sandbox(&p.id);
            let _ = self.cri.remove_pod_sandbox(&p.id);
        }
    }
}

impl Drop for CriHarness {
    fn drop(&mut self) {
        self.remove_all_pods();
        let sockets = self.shim_sockets();
        let Some(mut containerd) = self.containerd.take() else {
            return;
        };
        let ns = format!("--net=/proc/{}/ns/net", containerd.pid());
        let _ = Command::new("nsenter")
            .args([&ns, "ip", "link", "del", &self.network.bridge])
            .output();
        containerd.stop();
        // Shims outlive containerd; any of this containerd's still running (a pod CRI could
        // not remove) holds a VM or a container: kill it by pid.
        let socket = containerd.socket().display().to_string();
        for shim in [HUSK_SHIM, RUNC_SHIM] {
            for s in shims_with_address(shim, &socket) {
                // SAFETY: SIGKILL to a shim process this harness's containerd started.
                unsafe { libc::kill(s.pid as i32, libc::SIGKILL) };
            }
        }
        for (_, socket) in sockets {
            let _ = std::fs::remove_file(socket);
        }
        for dir in [containerd.dir(), self.work.path()] {
            let mut mounts = mounts_under(dir);
            // Deepest first.
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mounts {
                let _ = Command::new("umount").args(["-l", &m]).output();
            }
        }
        for root in cgroup_hierarchies() {
            let test_root = root.join(&self.cgroup_root);
            if !is_cgroup_fs(&root) {
                // Not a cgroup file system (the tmpfs holding v1 hierarchies): a runtime
                // that took it for cgroup v2 made plain folders and files there.
                let _ = std::fs::remove_dir_all(&test_root);
                continue;
            }
            let mut dirs = Vec::new();
            walk_dirs(&test_root, &mut dirs);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in dirs {
                let _ = std::fs::remove_dir(d);
            }
            let _ = std::fs::remove_dir(test_root);
        }
        for f in self.cni_cache_files() {
            let _ = std::fs::remove_file(f);
        }
        drop(containerd);
    }
}

fn shims_with_address(shim: &str, socket: &str) -> Vec<ShimProcess> {
    crate::proc_stats::command_lines()
        .into_iter()
        .filter(|(_, args)| {
            args.first().is_some_and(|a| a.ends_with(shim))
                && crate::proc_stats::flag_value(args, "-address") == Some(socket)
        })
        .map(|(pid, args)| ShimProcess {
            pid,
            id: crate::proc_stats::flag_value(&args, "-id")
                .unwrap_or_default()
                .to_owned(),
        })
        .collect()
}

fn namespace_options() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// Mount points under `dir` (from /proc/self/mounts).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let prefix = dir.display().to_string();
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Names of the tap devices in the network namespace at `netns` (the caller's if `None`),
/// from `ip -o -d link`.
pub fn tap_devices(netns: Option<&Path>) -> Vec<String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("ip");
            c
        }
        None => Command::new("ip"),
    };
    let Ok(out) = cmd.args(["-o", "-d", "link", "show"]).output() else {
        return Vec::new();
    };
    parse_tap_devices(&String::from_utf8_lossy(&out.stdout))
}

/// Tap devices in `ip -o -d link show` output (`<n>: <name>[@peer]: ... tun type tap ...`).
fn parse_tap_devices(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains(" tun type tap "))
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next()?.to_owned())
        })
        .collect()
}

/// Roots of the mounted cgroup hierarchies: each v1 controller folder and the v2 one
/// (`/sys/fs/cgroup` itself on a pure v2 host). Symlinked aliases (`cpu` for
/// `cpu,cpuacct`) are skipped.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut roots = vec![base.to_path_buf()];
    for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            roots.push(entry.path());
        }
    }
    roots
}

/// Entries of /sys/fs/cgroup when it is not itself a cgroup file system (the tmpfs that
/// holds the v1 hierarchies): a runtime that takes it for cgroup v2 writes files there.
fn cgroup_base_entries() -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    if is_cgroup_fs(base) {
        return Vec::new();
    }
    std::fs::read_dir(base)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Whether `path` is on a cgroup (v1 or v2) file system.
fn is_cgroup_fs(path: &Path) -> bool {
    const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    matches!(st.f_type as i64, CGROUP_SUPER_MAGIC | CGROUP2_SUPER_MAGIC)
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

/// Every directory below `dir` (not `dir` itself), depth first.
fn walk_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    for d in subdirs(dir) {
        walk_dirs(&d, out);
        out.push(d);
    }
}

/// The tail of a text file (a guest console, a log), for failure messages.
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The husk config of a CRI test in `work`: the guest image plus `extra`, and with
/// `HUSK_TEST_CONSOLE` set the guests' consoles and agent logs appended to `console`.
/// Writes `work/husk.toml`; returns its path and the folder of the (built) husk shim.
pub fn husk_shim_setup(
    work: &Path,
    image: &crate::GuestImage,
    extra: &str,
    console: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let mut extra = extra.to_owned();
    if std::env::var_os("HUSK_TEST_CONSOLE").is_some() {
        extra.push_str(&format!(
            "guest_console = {:?}\nkernel_cmdline = \"husk.agent_log=info\"\n",
            console.display().to_string()
        ));
    }
    let config = work.join("husk.toml");
    std::fs::write(&config, crate::husk_cli::Husk::guest_config(image, &extra))
        .with_context(|| format!("writing {}", config.display()))?;
    let shim = crate::workspace::binary(HUSK_SHIM).context("building the shim")?;
    let shim_dir = shim.parent().context("the shim's folder")?.to_path_buf();
    Ok((config, shim_dir))
}

/// Parses a CRI container log (`<RFC 3339 time> <stdout|stderr> <F|P> <text>` per line)
/// into (stream, text) pairs of full lines; partial (`P`) chunks are joined to the line
/// they belong to.
pub fn parse_cri_log(text: &str) -> Result<Vec<(String, String)>> {
    let mut lines = Vec::new();
    let mut partial: HashMap<String, String> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let mut parts = line.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("log line {n} is not in the CRI format: {line:?}");
        };
        let content = parts.next().unwrap_or("");
        if !time.contains('T') || !(stream == "stdout" || stream == "stderr") {
            bail!("log line {n} is not in the CRI format: {line:?}");
        }
        let buffered = partial.entry(stream.to_owned()).or_default();
        buffered.push_str(content);
        match tag {
            "F" => lines.push((stream.to_owned(), std::mem::take(buffered))),
            "P" => {}
            _ => bail!("log line {n} has tag {tag:?}, expected F or P: {line:?}"),
        }
    }
    Ok(lines)
}

/// Whether `ip` is a local address in /proc/net/fib_trie: a `|-- <ip>` line followed by a
/// `/32 host LOCAL` line.
pub fn fib_trie_has_local(fib_trie: &str, ip: &str) -> bool {
    let lines: Vec<&str> = fib_trie.lines().collect();
    lines.windows(2).any(|w| {
        w[0].trim_start().strip_prefix("|-- ") == Some(ip) && w[1].contains("/32 host LOCAL")
    })
}

/// A pod that [`CriHarness::run_pods_concurrently`] started, with its container and what
/// each CRI call took.
pub struct StartedPod {
    pub pod: Pod,
    pub container: String,
    /// When its thread sent RunPodSandbox, and when StartContainer returned.
    pub began: std::time::Instant,
    pub ended: std::time::Instant,
    pub run_pod: Duration,
    pub create: Duration,
    pub start: Duration,
}

/// What one thread of `run_pods_concurrently` created (tracked even when a later call
/// failed) and how it ended.
struct ThreadOutcome {
    pod_id: Option<String>,
    container_id: Option<String>,
    result: Result<StartedPod>,
}

impl CriHarness {
    /// Another CRI client on this containerd. The harness is not `Sync` (it records the ids
    /// it started), so threads that call CRI at the same time each use their own.
    pub fn connect_client(&self) -> Result<Cri> {
        Cri::connect(&self.containerd().socket())
    }

    /// Starts one pod per name at the same moment, each from its own thread with its own
    /// CRI client (as a kubelet's pod workers do): RunPodSandbox with `handler` and
    /// `pod_config(name)`, CreateContainer of `container_config(container, command(name))`,
    /// StartContainer. Returns each pod's outcome in the order of `names` (an error names
    /// the pod and the call); every pod and container created is tracked as `run_pod` and
    /// `create_container` do, so `leftovers` and `Drop` cover them.
    pub fn run_pods_concurrently(
        &self,
        names: &[String],
        handler: &str,
        container: &str,
        command: &(dyn Fn(&str) -> Vec<String> + Sync),
    ) -> Result<Vec<Result<StartedPod>>> {
        let mut prepared = Vec::new();
        for name in names {
            prepared.push((
                name.as_str(),
                self.pod_config(name)?,
                self.connect_client()?,
            ));
        }
        // The clients are connected first: the calls start together.
        let barrier = std::sync::Barrier::new(prepared.len());
        let outcomes: Vec<ThreadOutcome> = std::thread::scope(|s| {
            let threads: Vec<_> = prepared
                .into_iter()
                .map(|(name, config, client)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        start_pod_on(&client, name, config, handler, container, command)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| ThreadOutcome {
                        pod_id: None,
                        container_id: None,
                        result: Err(anyhow::anyhow!("the pod's thread panicked")),
                    })
                })
                .collect()
        });
        Ok(outcomes
            .into_iter()
            .map(|o| {
                self.pods.borrow_mut().extend(o.pod_id);
                self.containers.borrow_mut().extend(o.container_id);
                o.result
            })
            .collect())
    }
}

/// One pod of `run_pods_concurrently`, on `client`.
fn start_pod_on(
    client: &Cri,
    name: &str,
    config: cri::PodSandboxConfig,
    handler: &str,
    container: &str,
    command: &(dyn Fn(&str) -> Vec<String> + Sync),
) -> ThreadOutcome {
    let (mut pod_id, mut container_id) = (None, None);
    let mut start = || -> Result<StartedPod> {
        let began = std::time::Instant::now();
        let id = client
            .run_pod_sandbox(&config, handler)
            .with_context(|| format!("pod {name}: RunPodSandbox"))?;
        pod_id = Some(id.clone());
        let run_pod = began.elapsed();
        let args = command(name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t = std::time::Instant::now();
        let cid = client
            .create_container(
                &id,
                &CriHarness::container_config(container, &args),
                &config,
            )
            .with_context(|| format!("pod {name} ({id}): CreateContainer"))?;
        container_id = Some(cid.clone());
        let create = t.elapsed();
        let t = std::time::Instant::now();
        client
            .start_container(&cid)
            .with_context(|| format!("pod {name} ({id}): StartContainer {cid}"))?;
        let start = t.elapsed();
        let log_dir = PathBuf::from(&config.log_directory);
        Ok(StartedPod {
            pod: Pod {
                id,
                name: name.to_owned(),
                config: config.clone(),
                log_dir,
            },
            container: cid,
            began,
            ended: std::time::Instant::now(),
            run_pod,
            create,
            start,
        })
    };
    let result = start();
    ThreadOutcome {
        pod_id,
        container_id,
        result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cri_log_lines() {
        let log = "2026-01-02T03:04:05.123456789Z stdout F hello world\n\
                   2026-01-02T03:04:05.2Z stderr P par\n\
                   2026-01-02T03:04:05.3Z stdout F \n\
                   2026-01-02T03:04:05.4Z stderr F tial\n";
        let lines = parse_cri_log(log).unwrap();
        assert_eq!(
            lines,
            vec![
                ("stdout".into(), "hello world".into()),
                ("stdout".into(), "".into()),
                ("stderr".into(), "partial".into()),
            ]
        );
    }

    #[test]
    fn rejects_non_cri_log_lines() {
        assert!(parse_cri_log("hello world\n").is_err());
        assert!(parse_cri_log("2026-01-02T03:04:05Z stdout X text\n").is_err());
    }

    #[test]
    fn finds_tap_devices() {
        let text = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN \\    link/loopback 00:00:00:00:00:00\n\
                    7: husk-tap0: <BROADCAST,MULTICAST> mtu 1500 \\    link/ether 02:00:00:00:00:01 brd ff:ff:ff:ff:ff:ff promiscuity 0 \\    tun type tap pi off vnet_hdr on persist off \n\
                    8: eth0@if9: <BROADCAST,MULTICAST,UP> mtu 1500 \\    link/ether 02:00:00:00:00:02 veth \n";
        assert_eq!(parse_tap_devices(text), vec!["husk-tap0".to_string()]);
    }

    #[test]
    fn cri_config_names_both_handlers_and_the_network() {
        let dir = tempfile::tempdir().unwrap();
        let net = CniNetwork::create(dir.path(), "a1b2c3d4", 77).unwrap();
        assert_eq!(net.bridge, "husk-cni0-a1b2");
        assert!(
            net.bridge.len() <= 15,
            "Linux interface names are at most 15 bytes"
        );
        let conf: serde_json::Value = serde_json::from_slice(
            &std::fs::read(net.conf_dir.join("10-husk-cri.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            conf["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.77.0.0/24"
        );
        assert_eq!(conf["plugins"][0]["ipMasq"], false);
        let toml = cri_config(&net);
        assert!(toml.contains("runtime_type = \"io.containerd.husk.v2\""));
        assert!(toml.contains("pod_annotations = [\"io.husk.*\"]"));
        assert!(toml.contains("restrict_oom_score_adj = true"));
        assert!(toml.contains(&format!("sandbox_image = {PAUSE_IMAGE:?}")));
    }

    #[test]
    fn fib_trie_local_addresses() {
        let fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.7.0.23\n        /32 host LOCAL\n\
                   Local:\n  +-- 10.7.0.0/24 2 0 2\n     |-- 10.7.0.2\n        /24 link UNICAST\n";
        assert!(fib_trie_has_local(fib, "10.7.0.23"));
        assert!(!fib_trie_has_local(fib, "10.7.0.2"));
        assert!(!fib_trie_has_local(fib, "10.7.0.3"));
    }
}
