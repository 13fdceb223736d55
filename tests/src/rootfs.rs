//! Container root file systems for the VM tests: an ext4 disk image of a static busybox.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where Debian's busybox-static installs its binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Busybox applets linked into the image's /bin.
pub const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "ls", "sleep", "readlink", "seq", "uname", "true", "false", "id",
    "hostname", "head", "grep", "wc", "ps", "touch", "tail", "chmod",
];

/// A shell command that outgrows any memory limit: `tail` keeps all of /dev/zero (it
/// never sees a newline) until the OOM killer ends it. It runs from a copy of busybox on
/// the container's /dev tmpfs: run from the rootfs (disk or virtio-fs), its code pages are
/// reclaimable page cache, and memcg reclaim evicting and refaulting them counts as
/// progress, which put the OOM kill minutes late on a slow guest kernel (seen: 2.5 min at
/// 16 MiB on nested PVM). Without swap, tmpfs pages cannot be reclaimed, so the kill comes
/// as soon as the limit is reached.
pub const HOG: &str = "cat /bin/busybox > /dev/busybox && chmod 755 /dev/busybox && \
     exec /dev/busybox tail /dev/zero";

/// Image size: busybox is ~2 MB; the rest is room for ext4's metadata.
const IMAGE_MIB: u64 = 8;

/// An ext4 image holding a busybox rootfs, built with `mkfs.ext4 -d` (e2fsprogs) from a
/// staging directory; both live in a temp dir removed on drop.
pub struct BusyboxImage {
    dir: tempfile::TempDir,
}

impl BusyboxImage {
    /// Builds the image from the host's static busybox.
    pub fn build() -> Result<Self> {
        Self::build_with(&[])
    }

    /// Builds the image with extra host files copied in: `(host file, path in the image)`.
    pub fn build_with(extra: &[(&Path, &str)]) -> Result<Self> {
        let busybox = Path::new(HOST_BUSYBOX);
        if !busybox.is_file() {
            bail!("{HOST_BUSYBOX} missing: install busybox-static (scripts/install-deps.sh)");
        }
        let dir = tempfile::Builder::new()
            .prefix("husk-rootfs-")
            .tempdir()
            .context("creating the rootfs temp dir")?;
        let root = dir.path().join("rootfs");
        for d in ["bin", "etc", "proc", "dev", "sys", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        }
        std::fs::copy(busybox, root.join("bin/busybox"))
            .with_context(|| format!("copying {HOST_BUSYBOX} into the rootfs"))?;
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
                .with_context(|| format!("linking applet {applet}"))?;
        }
        std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")
            .context("writing /etc/passwd")?;
        std::fs::write(root.join("etc/group"), "root:x:0:\n").context("writing /etc/group")?;

        for (src, dest) in extra {
            let to = root.join(dest.trim_start_matches('/'));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::copy(src, &to)
                .with_context(|| format!("copying {} to {}", src.display(), to.display()))?;
        }
        let image = dir.path().join("rootfs.ext4");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "rootfs", "-d"])
            .arg(&root)
            .arg(&image)
            .arg(format!("{IMAGE_MIB}M"))
            .output()
            .context("running mkfs.ext4 (e2fsprogs; scripts/install-deps.sh installs it)")?;
        if !out.status.success() {
            bail!(
                "mkfs.ext4 -d {} failed ({}): {}",
                root.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self { dir })
    }

    /// The staging directory the image was made from (a busybox rootfs for host-mode
    /// agents and bundles).
    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// The ext4 image file.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs.ext4")
    }
}
