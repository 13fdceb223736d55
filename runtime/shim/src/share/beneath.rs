//! Path work inside a tree the guest can write (the virtio-fs shared folder). The guest
//! writes that tree through virtiofsd while this root process creates folders, files and
//! mounts in it, so a plain path walk would follow whatever the guest planted: a symlink
//! `c2/rootfs -> /etc` would put a container's rootfs over the host's /etc, a symlink
//! `c2/binds -> /etc` would create and cover files there. Every step here is made relative
//! to a directory fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a planted
//! symlink (or `..`) is refused, never followed, and a folder renamed by the guest after it
//! was opened cannot redirect the work, as the fd stays on the folder that was checked.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat, mknodat};
use nix::unistd::{UnlinkatFlags, unlinkat};

/// How deep a removal follows folders: a guest can make them arbitrarily deep, and each
/// level holds one fd and one stack frame of this process.
const MAX_DEPTH: usize = 256;

/// Stays below the directory fd, follows no symlink (nor magic link), crosses no mount.
fn strict() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

/// Why `name` cannot be used, in words a log reader understands.
fn refused(name: &str, e: Errno) -> String {
    match e {
        Errno::ELOOP => {
            format!("{name} is a symlink (planted through the share?): not following it")
        }
        Errno::EXDEV => format!("{name} is a mount point or leaves the shared folder"),
        Errno::ENOTDIR => format!("{name} is not a folder"),
        e => format!("{name}: {e}"),
    }
}

/// A single path component: no separator, not `.` or `..`.
fn component(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        bail!("{name:?} is not a single path component");
    }
    Ok(())
}

/// Opens the trusted folder `path` (a path of the host that the guest cannot change) as
/// the anchor of later fd-relative work.
pub fn open_root(path: &Path) -> Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC);
    openat2(nix::fcntl::AT_FDCWD, path, how).with_context(|| format!("opening {}", path.display()))
}

/// The folder `name` in `parent`, created (mode 0755) if missing; a symlink, a file or a
/// mount point there is refused.
pub fn ensure_dir(parent: BorrowedFd<'_>, name: &str) -> Result<OwnedFd> {
    component(name)?;
    match mkdirat(parent, name, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e).with_context(|| format!("creating the folder {name}")),
    }
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(strict());
    openat2(parent, name, how).map_err(|e| anyhow::anyhow!(refused(name, e)))
}

/// The regular file `name` in `parent`, created empty (mode 0600) if missing, as an
/// `O_PATH` fd (it is a mount point to be, never opened for reading or writing: a FIFO or
/// device the guest planted is refused, not opened).
pub fn ensure_file(parent: BorrowedFd<'_>, name: &str) -> Result<OwnedFd> {
    component(name)?;
    match mknodat(
        parent,
        name,
        SFlag::S_IFREG,
        Mode::from_bits_truncate(0o600),
        0,
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e).with_context(|| format!("creating the file {name}")),
    }
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(strict());
    let fd = openat2(parent, name, how).map_err(|e| anyhow::anyhow!(refused(name, e)))?;
    let st = fstat(&fd).with_context(|| format!("stat of {name}"))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        bail!("{name} exists and is not a regular file");
    }
    Ok(fd)
}

/// `rel` below `dir`, as an `O_PATH` fd, following no symlink and never leaving `dir`;
/// mounts on the way are entered (the fd of a mount point is the mount's root).
pub fn open_beneath(dir: BorrowedFd<'_>, rel: &Path) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    openat2(dir, rel, how)
}

/// Lazily unmounts the mount whose root `fd` is (from [`open_beneath`] of its mount
/// point): through the fd's /proc link, so no path the guest can change is walked again.
pub fn unmount(fd: &OwnedFd) -> Result<(), Errno> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::mount::umount2(link.as_str(), nix::mount::MntFlags::MNT_DETACH)
}

/// Deletes everything in the folder `dir` (itself not a symlink), staying on its own
/// mount: a mount point inside (a live bind of a user's files) stops the delete with an
/// error rather than being deleted through; symlinks are removed, never followed.
pub fn remove_contents(dir: &Path) -> Result<()> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC);
    let fd = openat2(nix::fcntl::AT_FDCWD, dir, how)
        .with_context(|| format!("opening {}", dir.display()))?;
    remove_contents_at(fd, 0)
}

fn remove_contents_at(dir: OwnedFd, depth: usize) -> Result<()> {
    if depth >= MAX_DEPTH {
        bail!("folders nested deeper than {MAX_DEPTH} levels: not deleting further");
    }
    let mut listing = nix::dir::Dir::from_fd(dir).context("listing a folder")?;
    let names: Vec<CString> = listing
        .iter()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    let fd = listing.as_fd();
    for name in names {
        let shown = name.to_string_lossy().into_owned();
        match unlinkat(fd, name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => continue,
            Err(Errno::EISDIR) => {}
            Err(Errno::EBUSY) => bail!("{shown} is a mount point: not deleting through it"),
            Err(e) => return Err(e).with_context(|| format!("removing {shown}")),
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(strict());
        let sub = match openat2(fd, name.as_c_str(), how) {
            Ok(sub) => sub,
            Err(Errno::ENOENT) => continue,
            Err(e) => bail!(refused(&shown, e)),
        };
        remove_contents_at(sub, depth + 1).with_context(|| format!("in {shown}"))?;
        match unlinkat(fd, name.as_c_str(), UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("removing the folder {shown}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_one_component_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = open_root(tmp.path()).unwrap();
        for bad in ["", ".", "..", "a/b", "/etc"] {
            assert!(ensure_dir(root.as_fd(), bad).is_err(), "{bad:?}");
            assert!(ensure_file(root.as_fd(), bad).is_err(), "{bad:?}");
        }
        ensure_dir(root.as_fd(), "d").unwrap();
        ensure_dir(root.as_fd(), "d").unwrap();
        ensure_file(root.as_fd(), "f").unwrap();
        assert!(tmp.path().join("d").is_dir() && tmp.path().join("f").is_file());
        let err = ensure_dir(root.as_fd(), "f").unwrap_err();
        assert!(format!("{err:#}").contains("not a folder"), "{err:#}");
        let err = ensure_file(root.as_fd(), "d").unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        // `..` inside a longer path does not leave the anchor either.
        assert_eq!(
            open_beneath(root.as_fd(), Path::new("d/../../x")).unwrap_err(),
            Errno::EXDEV
        );
    }

    #[test]
    fn removal_removes_symlinks_and_stops_at_the_depth_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).unwrap();
        std::fs::write(tree.join("a/b/f"), "y").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).unwrap();
        remove_contents(&tree).unwrap();
        assert!(std::fs::read_dir(&tree).unwrap().next().is_none());
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "x");

        let mut deep = tree.clone();
        for _ in 0..MAX_DEPTH + 2 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).unwrap();
        let err = remove_contents(&tree).unwrap_err();
        assert!(format!("{err:#}").contains("deeper than"), "{err:#}");
    }

    #[test]
    fn removal_does_not_delete_through_a_mount() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        let mnt = tree.join("sub/mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mnt,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::write(mnt.join("user-file"), "data").unwrap();
        let err = remove_contents(&tree).unwrap_err();
        let shown = format!("{err:#}");
        assert_eq!(
            std::fs::read_to_string(mnt.join("user-file")).unwrap(),
            "data"
        );
        nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(shown.contains("mount point"), "{shown}");
    }
}
