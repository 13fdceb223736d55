//! Resolving a path as the container will see it, without ever leaving the rootfs.
//!
//! A mount destination such as `/var/run` may be a symlink inside the image. Following it
//! with the host's resolver would interpret absolute links against the host's `/` and let
//! `..` climb out of the rootfs, so an image could make the runtime mount over host
//! files. Here symlinks are followed one component at a time with the rootfs as `/`;
//! absolute link targets restart at the rootfs, and any `..` that would climb above the
//! rootfs is refused rather than clamped (an image that tries it is hostile).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use crate::error::{Error, Result, SysContext};

/// Symlinks followed per resolution before giving up (the kernel's limit is 40 too).
const MAX_SYMLINKS: usize = 40;

/// Resolves `path` (absolute or relative, as seen inside the container) to a host path
/// under `root`. Components that do not exist yet are kept literally. `root` must be
/// canonical (no symlinks in it).
pub fn resolve(root: &Path, path: &Path) -> Result<PathBuf> {
    let escape = || Error::PathEscape {
        root: root.to_owned(),
        path: path.to_owned(),
    };
    let mut pending: VecDeque<OsString> = components(path).collect();
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            if done.pop().is_none() {
                return Err(escape());
            }
            continue;
        }
        let candidate = joined(root, &done).join(&name);
        match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::invalid(
                        format!("{path:?}"),
                        "too many levels of symbolic links",
                    ));
                }
                let target = std::fs::read_link(&candidate)
                    .sys(|| format!("reading symlink {candidate:?}"))?;
                if target.is_absolute() {
                    done.clear();
                }
                for (i, c) in components(&target).enumerate() {
                    pending.insert(i, c);
                }
            }
            // Existing non-link, or missing (created later): take it literally.
            _ => done.push(name),
        }
    }
    Ok(joined(root, &done))
}

/// Path components as plain names, dropping `/` and `.` (`..` kept for the caller).
fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

fn joined(root: &Path, names: &[OsString]) -> PathBuf {
    let mut p = root.to_owned();
    p.extend(names.iter().map(|n| n as &OsStr));
    p
}

/// What to create at a mount point that does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Resolves `path` under `root`, creates it (and missing parents) if absent, and opens
/// it with O_PATH|O_NOFOLLOW. The open fd pins the object that was checked, so mounting
/// onto `/proc/self/fd/<fd>` cannot be redirected by a symlink swapped in afterwards.
pub fn open_mountpoint(root: &Path, path: &Path, kind: Kind) -> Result<(PathBuf, OwnedFd)> {
    let resolved = resolve(root, path)?;
    if std::fs::symlink_metadata(&resolved).is_err() {
        let parent = resolved.parent().unwrap_or(root);
        mkdir_all(root, parent)?;
        match kind {
            Kind::Dir => std::fs::create_dir(&resolved)
                .or_else(ignore_exists)
                .sys(|| format!("creating mount point {resolved:?}"))?,
            Kind::File => std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&resolved)
                .map(drop)
                .sys(|| format!("creating mount point {resolved:?}"))?,
        }
    }
    let fd = open(
        &resolved,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .sys(|| format!("opening mount point {resolved:?}"))?;
    // The object really is under root (nothing swapped a parent for a link since resolve).
    let real = std::fs::read_link(fd_path(&fd)).sys(|| format!("checking {resolved:?}"))?;
    if !real.starts_with(root) {
        return Err(Error::PathEscape {
            root: root.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok((resolved, fd))
}

fn ignore_exists(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        Ok(())
    } else {
        Err(e)
    }
}

/// Creates `dir` and its missing parents, each checked not to be a symlink (resolve
/// already followed every existing link, so a link here appeared since: refuse).
fn mkdir_all(root: &Path, dir: &Path) -> Result<()> {
    let rel = dir.strip_prefix(root).map_err(|_| Error::PathEscape {
        root: root.to_owned(),
        path: dir.to_owned(),
    })?;
    let mut cur = root.to_owned();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::invalid(
                    format!("{cur:?}"),
                    "not a directory (cannot hold a mount point)",
                ));
            }
            Err(_) => std::fs::create_dir(&cur)
                .or_else(ignore_exists)
                .sys(|| format!("creating directory {cur:?}"))?,
        }
    }
    Ok(())
}

/// `/proc/self/fd/N`: a path the kernel resolves to exactly the open object.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        (dir, root)
    }

    #[test]
    fn links_resolve_inside_the_root() {
        let (_d, root) = root();
        symlink("/usr/lib", root.join("lib")).unwrap();
        symlink("../etc", root.join("usr/etc")).unwrap();
        symlink("/etc", root.join("hostetc")).unwrap();
        assert_eq!(
            resolve(&root, Path::new("/lib/x")).unwrap(),
            root.join("usr/lib/x")
        );
        assert_eq!(
            resolve(&root, Path::new("/usr/etc/y")).unwrap(),
            root.join("etc/y")
        );
        // An absolute link means the container's /etc, never the host's.
        assert_eq!(
            resolve(&root, Path::new("/hostetc")).unwrap(),
            root.join("etc")
        );
        assert_eq!(
            resolve(&root, Path::new("/a/./b/../c")).unwrap(),
            root.join("a/c")
        );
    }

    #[test]
    fn climbing_out_is_refused() {
        let (_d, root) = root();
        symlink("../../../../../tmp", root.join("up")).unwrap();
        symlink("/..", root.join("rootup")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        for p in ["/up/x", "/rootup", "/../etc", "/etc/../../x"] {
            let err = resolve(&root, Path::new(p)).unwrap_err();
            assert!(matches!(err, Error::PathEscape { .. }), "{p}: {err}");
        }
        assert!(resolve(&root, Path::new("/loop")).is_err());
    }

    #[test]
    fn mountpoints_are_created_under_the_root() {
        let (_d, root) = root();
        let (p, _fd) = open_mountpoint(&root, Path::new("/new/dir"), Kind::Dir).unwrap();
        assert!(p.is_dir() && p.starts_with(&root));
        let (p, _fd) = open_mountpoint(&root, Path::new("/etc/file"), Kind::File).unwrap();
        assert!(p.is_file());
    }
}
