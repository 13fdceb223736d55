//! The `block` rootfs mode: a read-only ext4 image of the bundle's rootfs, made with
//! `mkfs.ext4 -d` (e2fsprogs), which copies a directory tree into a new file system
//! without mounting anything.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("measuring rootfs {path}: {source}")]
    Walk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running mkfs.ext4 (install e2fsprogs): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("mkfs.ext4 -d {rootfs} failed ({status}): {stderr}")]
    Mkfs {
        rootfs: PathBuf,
        status: String,
        stderr: String,
    },
}

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Bytes the tree at `root` needs: file sizes rounded to 4 KiB blocks plus a block per
/// directory, symlink and special file. Does not follow symlinks.
pub fn tree_size(root: &Path) -> Result<(u64, u64), ImageError> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| ImageError::Walk {
            path: dir.clone(),
            source,
        })?;
        bytes += BLOCK;
        inodes += 1;
        for e in entries {
            let e = e.map_err(|source| ImageError::Walk {
                path: dir.clone(),
                source,
            })?;
            let meta = e
                .path()
                .symlink_metadata()
                .map_err(|source| ImageError::Walk {
                    path: e.path(),
                    source,
                })?;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                inodes += 1;
                bytes += meta.len().div_ceil(BLOCK).max(1) * BLOCK;
            }
        }
    }
    Ok((bytes, inodes))
}

/// Image size for a tree of `bytes` and `inodes`: room for ext4's metadata (inode tables,
/// journal-less but with group descriptors) and slack, at least 16 MiB.
pub fn image_size_mib(bytes: u64, inodes: u64) -> u64 {
    let need = bytes + inodes * 256 + bytes / 10 + 8 * MIB;
    need.div_ceil(MIB).max(16)
}

/// Writes an ext4 image of `rootfs` to `image` (replacing it).
pub fn build(rootfs: &Path, image: &Path) -> Result<(), ImageError> {
    let (bytes, inodes) = tree_size(rootfs)?;
    let size = image_size_mib(bytes, inodes);
    let inode_count = (inodes * 2).max(1024);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-O", "^has_journal", "-N"])
        .arg(inode_count.to_string())
        .arg("-d")
        .arg(rootfs)
        .arg(image)
        .arg(format!("{size}M"))
        .output()
        .map_err(ImageError::Spawn)?;
    if !out.status.success() {
        return Err(ImageError::Mkfs {
            rootfs: rootfs.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_grow_with_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/big"), vec![0u8; 3 * MIB as usize]).unwrap();
        std::os::unix::fs::symlink("big", dir.path().join("bin/link")).unwrap();
        let (bytes, inodes) = tree_size(dir.path()).unwrap();
        assert_eq!(inodes, 4);
        assert!(bytes >= 3 * MIB, "{bytes}");
        assert!(image_size_mib(bytes, inodes) >= 16);
        assert!(image_size_mib(100 * MIB, 10) > 110);
    }

    #[test]
    fn builds_an_image_when_mkfs_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "x\n").unwrap();
        let image = dir.path().join("img.ext4");
        match build(&root, &image) {
            Ok(()) => assert!(image.metadata().unwrap().len() >= 16 * MIB),
            Err(ImageError::Spawn(e)) => eprintln!("skipping: mkfs.ext4 not available: {e}"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn missing_rootfs_is_named() {
        let err = build(Path::new("/nonexistent/rootfs"), Path::new("/tmp/x.img"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/rootfs"), "{err}");
    }
}
