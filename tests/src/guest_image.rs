//! The guest kernel and initramfs built by `guest-image/build.sh`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::workspace;

/// Paths of a built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// `HUSK_KERNEL` and `HUSK_INITRAMFS` when both are set (scripts/test.sh sets them),
    /// otherwise the output of `guest-image/build.sh`, which is instant when its cache is warm
    /// and builds the kernel (minutes) when it is not.
    pub fn locate_or_build() -> Result<Self> {
        if let (Some(k), Some(i)) = (
            std::env::var_os("HUSK_KERNEL"),
            std::env::var_os("HUSK_INITRAMFS"),
        ) {
            let image = Self {
                kernel: k.into(),
                initramfs: i.into(),
            };
            return image.checked();
        }
        let script = workspace::root().join("guest-image/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("all")
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        if !out.status.success() {
            bail!("{} failed ({})", script.display(), out.status);
        }
        Self::parse_build_output(&String::from_utf8_lossy(&out.stdout))?.checked()
    }

    /// For a VM test: the image, or `None` after printing why `test` skips (no usable
    /// /dev/kvm, or no guest image).
    pub fn or_skip(test: &str) -> Option<Self> {
        if crate::host::skip_without_kvm(test) {
            return None;
        }
        match Self::locate_or_build() {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!(
                    "SKIPPED {test}: no guest image ({e:#}); build it with guest-image/build.sh"
                );
                None
            }
        }
    }

    /// Reads the `HUSK_KERNEL=` and `HUSK_INITRAMFS=` lines build.sh prints on stdout.
    pub fn parse_build_output(stdout: &str) -> Result<Self> {
        let value = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(|v| PathBuf::from(v.trim()))
                .with_context(|| format!("guest-image/build.sh printed no {key}= line"))
        };
        Ok(Self {
            kernel: value("HUSK_KERNEL")?,
            initramfs: value("HUSK_INITRAMFS")?,
        })
    }

    fn checked(self) -> Result<Self> {
        for p in [&self.kernel, &self.initramfs] {
            if !p.is_file() {
                bail!("guest image file {} does not exist", p.display());
            }
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_build_script_output() {
        let img =
            GuestImage::parse_build_output("HUSK_KERNEL=/c/k/vmlinux\nHUSK_INITRAMFS=/c/i.cpio\n")
                .unwrap();
        assert_eq!(img.kernel, PathBuf::from("/c/k/vmlinux"));
        assert_eq!(img.initramfs, PathBuf::from("/c/i.cpio"));
        let err = GuestImage::parse_build_output("HUSK_KERNEL=/k\n").unwrap_err();
        assert!(err.to_string().contains("HUSK_INITRAMFS"), "{err}");
    }
}
