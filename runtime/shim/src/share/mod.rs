//! The host folder a VM's virtiofsd shares with the guest: `<run dir>/shared/`. Every
//! container of the VM gets `<shared>/<container id>/rootfs`, a bind of its rootfs, and
//! `<shared>/<container id>/binds/<n>`, binds of the host files and folders its spec mounts
//! (CRI's hosts, resolv.conf and hostname files, volumes). The guest mounts the share once,
//! at boot, and sees containers come and go under it (Kata's shared-folder model).
//!
//! The folder is a mount of its own in a peer group of its own (shared): virtiofsd, in the
//! mount namespace of its sandbox (a slave copy made at its start), sees every bind made
//! here later, and nothing made below it leaks into the host's other mounts. Each bind is
//! built as a detached tree and made read-only (all the way down) before it is attached,
//! because a later read-only remount would not reach virtiofsd's copy. Removal unmounts
//! everything below first and refuses to delete while anything is still mounted there: a
//! recursive delete through a live bind would delete the user's files.
//!
//! The guest writes this folder (through virtiofsd) while the pod lives, so everything done
//! in it after the VM started is done relative to directory fds, refusing symlinks and never
//! leaving the share (`beneath`): a symlink the guest planted where the next container's
//! folders go is an error, not a way onto a host path.

mod beneath;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Guest-side name of the share (virtio-fs tag and sandbox mount name).
pub const SHARE_TAG: &str = "shared";
const ROOTFS: &str = "rootfs";
const BINDS: &str = "binds";

/// The shared folder on the host and where the guest mounts it.
pub struct SharedDir {
    root: PathBuf,
    /// `root` opened once it is a mount: every later step in the share (which the guest
    /// writes) is made relative to it, never by path (see `beneath`).
    root_fd: OwnedFd,
    /// The share's path in the guest (`<sandbox dir>/mounts/shared`), once the sandbox exists.
    guest_root: std::sync::OnceLock<String>,
}

impl SharedDir {
    /// Creates `root` as a mount point (a bind of itself) in a new peer group.
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating the shared folder {}", root.display()))?;
        mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting the shared folder {}", root.display()))?;
        // Private first, to leave the parent's peer group; then shared: a group of its own
        // that virtiofsd's namespace copy follows.
        for flag in [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
            if let Err(e) = mount(None::<&str>, root, None::<&str>, flag, None::<&str>) {
                let _ = umount2(root, MntFlags::MNT_DETACH);
                return Err(e)
                    .with_context(|| format!("setting the propagation of {}", root.display()));
            }
        }
        let root_fd = match beneath::open_root(root) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = umount2(root, MntFlags::MNT_DETACH);
                return Err(e);
            }
        };
        Ok(Self {
            root: root.to_path_buf(),
            root_fd,
            guest_root: std::sync::OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Records where the guest mounted the share.
    pub fn set_guest_root(&self, guest_root: String) {
        let _ = self.guest_root.set(guest_root);
    }

    fn guest_root(&self) -> Result<&str> {
        self.guest_root
            .get()
            .map(String::as_str)
            .context("the shared folder is not mounted in the guest yet")
    }

    /// Container `id`'s folder in the share, created if missing.
    fn container_dir(&self, id: &str) -> Result<OwnedFd> {
        check_id(id)?;
        beneath::ensure_dir(self.root_fd.as_fd(), id)
            .with_context(|| format!("in the shared folder {}", self.root.display()))
    }

    /// Binds container `id`'s rootfs into the share; returns its path in the guest.
    pub fn add_rootfs(&self, id: &str, rootfs: &Path) -> Result<String> {
        let guest = format!("{}/{id}/{ROOTFS}", self.guest_root()?);
        let shown = self.root.join(id).join(ROOTFS);
        let target = beneath::ensure_dir(self.container_dir(id)?.as_fd(), ROOTFS)
            .with_context(|| format!("in {}", self.root.join(id).display()))?;
        bind(rootfs, target.as_fd(), &shown, false)?;
        Ok(guest)
    }

    /// Binds host path `source` (a file or a folder) into the share as container `id`'s
    /// bind number `n`, read-only on the host too when `read_only` (a hostile guest must
    /// not write through a read-only volume). Returns the `sandbox://` source the guest
    /// binds in the container.
    pub fn add_bind(&self, id: &str, n: usize, source: &Path, read_only: bool) -> Result<String> {
        let meta = std::fs::metadata(source)
            .with_context(|| format!("bind source {}", source.display()))?;
        let in_container = || format!("in {}", self.root.join(id).display());
        let binds = beneath::ensure_dir(self.container_dir(id)?.as_fd(), BINDS)
            .with_context(in_container)?;
        let name = n.to_string();
        let shown = self.root.join(id).join(BINDS).join(&name);
        let target = if meta.is_dir() {
            beneath::ensure_dir(binds.as_fd(), &name)
        } else {
            beneath::ensure_file(binds.as_fd(), &name)
        }
        .with_context(|| format!("the bind target {}", shown.display()))?;
        bind(source, target.as_fd(), &shown, read_only)?;
        Ok(format!("sandbox://mounts/{SHARE_TAG}/{id}/{BINDS}/{n}"))
    }

    /// Unmounts and removes container `id`'s part of the share. Idempotent.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        check_id(id)?;
        remove_tree(&self.root.join(id))
    }

    /// Unmounts and removes the whole share. Idempotent.
    pub fn remove(&self) -> Result<()> {
        remove_tree(&self.root)
    }
}

/// containerd's ids are [A-Za-z0-9_.-]; anything else must not make a path.
fn check_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.starts_with('.')
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        bail!("container id {id:?} cannot name a shared folder");
    }
    Ok(())
}

/// open_tree(2) and move_mount(2) flags (not in the libc crate).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// Binds `source` (recursively) onto the folder or file `target` (an fd, `shown` names it).
/// The copy is made as a detached tree and, when `read_only`, made read-only with every
/// mount below it before it is attached: attached first, it would propagate writable to
/// virtiofsd's namespace, and a read-only remount afterwards does not propagate. It is
/// attached through the fd, so the guest cannot redirect it by renaming the share's folders.
fn bind(source: &Path, target: BorrowedFd<'_>, shown: &Path, read_only: bool) -> Result<()> {
    let what = || format!("binding {} at {}", source.display(), shown.display());
    let src = std::ffi::CString::new(source.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)
        .with_context(what)?;
    // SAFETY: a valid C string; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(what);
    }
    // SAFETY: open_tree returned a new fd that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if read_only {
        husk_runtime::volumes::make_tree_read_only(tree.as_fd())
            .with_context(|| format!("making the bind of {} read-only", source.display()))?;
    }
    // SAFETY: valid fds and empty C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).with_context(what);
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `dir` (lazily: a straggler in the guest's share must not
/// block the delete), then deletes `dir` — only once nothing is mounted there any more, and
/// without crossing into a mount or following a symlink (the guest writes the share).
pub fn remove_tree(dir: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        // Something planted in the folder's place: remove the entry, follow nothing.
        return std::fs::remove_file(dir).with_context(|| format!("removing {}", dir.display()));
    }
    // Stacked mounts on one point need one unmount each.
    for _ in 0..8 {
        let mounts = mounts_below(dir)?;
        if mounts.is_empty() {
            break;
        }
        // Afresh each round: `dir` itself may have been a mount, detached last round.
        let anchor = beneath::open_root(dir)?;
        for m in mounts {
            let r = match m.strip_prefix(dir) {
                Ok(rel) if rel.as_os_str().is_empty() => {
                    umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW)
                }
                // Opened beneath `dir` without symlinks, then unmounted through the fd: a
                // path the guest swapped meanwhile is skipped here, and goes with `dir`'s
                // own mount (a lazy unmount detaches everything below it) or stays and
                // stops the delete below.
                Ok(rel) => match beneath::open_beneath(anchor.as_fd(), rel) {
                    Ok(fd) => beneath::unmount(&fd),
                    Err(e) => {
                        tracing::warn!("not unmounting {}: {e}", m.display());
                        continue;
                    }
                },
                Err(_) => continue,
            };
            if let Err(e) = r
                && e != nix::errno::Errno::EINVAL
                && e != nix::errno::Errno::ENOENT
            {
                return Err(e).with_context(|| format!("unmounting {}", m.display()));
            }
        }
    }
    let left = mounts_below(dir)?;
    if let Some(m) = left.first() {
        bail!(
            "{} is still mounted; not deleting {} (it would delete through the mount)",
            m.display(),
            dir.display()
        );
    }
    beneath::remove_contents(dir).with_context(|| format!("removing {}", dir.display()))?;
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// A rootfs folder and a hosts file in `dir`, the sources the tests bind.
    fn rootfs_and_hosts(dir: &Path) -> (PathBuf, PathBuf) {
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        (rootfs, hosts)
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\04"), r"/end\04");
    }

    #[test]
    fn ids_that_cannot_name_a_folder_are_refused() {
        for bad in ["", "..", ".x", "a/b", "a b"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_id("pod-1_a.b").is_ok());
    }

    /// A guest that escaped its container owns the share (it writes it through virtiofsd)
    /// and plants symlinks where the next containers' folders will be made; this root
    /// process must follow none of them onto the host.
    #[test]
    fn symlinks_the_guest_plants_in_the_share_are_refused_not_followed() {
        if !is_root() {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let (rootfs, hosts) = rootfs_and_hosts(tmp.path());
        // A host folder outside the share: what the guest aims at (/etc in real life).
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("0"), "precious").unwrap();
        std::fs::create_dir(victim.join("rootfs")).unwrap();

        let share = SharedDir::create(&tmp.path().join("shared")).unwrap();
        share.set_guest_root("/run/sb/mounts/shared".into());
        let s = share.path();
        symlink(&victim, s.join("c1")).unwrap();
        std::fs::create_dir(s.join("c2")).unwrap();
        symlink(victim.join("rootfs"), s.join("c2/rootfs")).unwrap();
        std::fs::create_dir(s.join("c3")).unwrap();
        symlink(&victim, s.join("c3/binds")).unwrap();
        std::fs::create_dir_all(s.join("c4/binds")).unwrap();
        symlink(victim.join("0"), s.join("c4/binds/0")).unwrap();
        symlink("../../..", s.join("c4/binds/1")).unwrap();
        std::fs::create_dir_all(s.join("c5/binds")).unwrap();
        nix::unistd::mkfifo(&s.join("c5/binds/0"), nix::sys::stat::Mode::S_IRWXU).unwrap();

        let attempts: Vec<(&str, Result<String>)> = vec![
            ("c1 rootfs", share.add_rootfs("c1", &rootfs)),
            ("c2 rootfs", share.add_rootfs("c2", &rootfs)),
            ("c3 file bind", share.add_bind("c3", 0, &hosts, false)),
            ("c4 file bind", share.add_bind("c4", 0, &hosts, false)),
            ("c4 folder bind", share.add_bind("c4", 1, &rootfs, false)),
            (
                "c5 file bind over a FIFO",
                share.add_bind("c5", 0, &hosts, true),
            ),
        ];
        for (what, r) in attempts {
            let err = format!("{:#}", r.expect_err(what));
            let expected = if what.contains("FIFO") {
                "not a regular file"
            } else {
                "symlink"
            };
            assert!(err.contains(expected), "{what}: {err}");
        }
        // The host folder is as it was: nothing mounted on it, nothing created or truncated.
        assert!(mounts_below(&victim).unwrap().is_empty());
        assert_eq!(
            std::fs::read_to_string(victim.join("0")).unwrap(),
            "precious"
        );
        let mut names: Vec<_> = std::fs::read_dir(&victim)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["0", "rootfs"]);
        assert!(
            std::fs::read_dir(victim.join("rootfs"))
                .unwrap()
                .next()
                .is_none()
        );

        // Removal follows none of them either.
        for id in ["c1", "c2", "c3", "c4", "c5"] {
            share.remove_container(id).unwrap();
            assert!(std::fs::symlink_metadata(s.join(id)).is_err(), "{id} left");
        }
        share.remove().unwrap();
        assert_eq!(
            std::fs::read_to_string(victim.join("0")).unwrap(),
            "precious"
        );
        assert!(victim.join("rootfs").is_dir());
        assert!(!tmp.path().join("shared").exists());
    }

    #[test]
    fn binds_are_shared_read_only_and_removed_without_touching_the_sources() {
        if !is_root() {
            eprintln!("skipped: bind mounts need root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let (rootfs, hosts) = rootfs_and_hosts(tmp.path());
        let volume = tmp.path().join("volume");
        std::fs::create_dir(&volume).unwrap();
        std::fs::write(volume.join("keep"), "data").unwrap();

        let share = SharedDir::create(&tmp.path().join("shared")).unwrap();
        share.set_guest_root("/run/sb/mounts/shared".into());
        assert_eq!(
            share.add_rootfs("c1", &rootfs).unwrap(),
            "/run/sb/mounts/shared/c1/rootfs"
        );
        assert!(share.path().join("c1/rootfs/bin").is_dir());
        assert_eq!(
            share.add_bind("c1", 0, &hosts, true).unwrap(),
            "sandbox://mounts/shared/c1/binds/0"
        );
        assert_eq!(
            std::fs::read_to_string(share.path().join("c1/binds/0")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        let err = std::fs::write(share.path().join("c1/binds/0"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        share.add_bind("c1", 1, &volume, false).unwrap();
        std::fs::write(share.path().join("c1/binds/1/new"), "w").unwrap();
        assert_eq!(std::fs::read_to_string(volume.join("new")).unwrap(), "w");
        let err = share
            .add_bind("c1", 2, &tmp.path().join("missing"), false)
            .unwrap_err();
        assert!(format!("{err:#}").contains("missing"), "{err:#}");
        // A read-only volume with a writable mount below it: read-only all the way down.
        let sub = volume.join("sub");
        std::fs::create_dir(&sub).unwrap();
        mount(
            Some("tmpfs"),
            &sub,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        // A namespace made like virtiofsd's sandbox (a slave copy) before the bind exists.
        let mut ns = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c"])
            .arg(format!(
                "read go; touch {0}/c1/binds/3/x {0}/c1/binds/3/sub/x 2>&1; ls {0}/c1/binds/3",
                share.path().display()
            ))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        share.add_bind("c1", 3, &volume, true).unwrap();
        let err = std::fs::write(share.path().join("c1/binds/3/sub/x"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        use std::io::Write;
        ns.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let out = ns.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        // The copy arrived (its files are listed) and is read-only there too, below as well.
        assert!(out.contains("keep") && out.contains("sub"), "{out}");
        assert_eq!(out.matches("Read-only file system").count(), 2, "{out}");
        std::fs::write(sub.join("x"), "host").unwrap();
        umount2(&sub, MntFlags::MNT_DETACH).unwrap();

        share.remove_container("c1").unwrap();
        share.remove_container("c1").unwrap();
        share.remove().unwrap();
        share.remove().unwrap();
        assert!(!tmp.path().join("shared").exists());
        // The sources are intact.
        assert_eq!(
            std::fs::read_to_string(volume.join("keep")).unwrap(),
            "data"
        );
        assert!(rootfs.join("bin").is_dir());
        assert!(hosts.is_file());
        assert!(mounts_below(tmp.path()).unwrap().is_empty());
    }
}
