//! Mounts the agent makes in its own mount namespace for containers and the sandbox: the
//! rootfs (a virtio-blk image, an overlay) and sandbox-wide file systems. Each is recorded
//! so removal unmounts exactly what was mounted, innermost first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use husk_protocol::agent::{BlockRootfs, DirectoryRootfs, Rootfs, rootfs};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::error::Failure;

/// Where virtio-blk disks show up; serials are read from `<dir>/vd*/serial`.
pub const SYS_BLOCK: &str = "/sys/block";

/// Longest virtio-blk serial (VIRTIO_BLK_ID_BYTES).
const MAX_SERIAL: usize = 20;

/// How long a rootfs disk may show no medium. A VM restored from a template gets its image
/// in a slot that was empty at the snapshot; the guest kernel learns the new capacity from
/// a config-change interrupt, in a work queue, shortly after the restore (seconds on a
/// host whose KVM emulates the guest kernel).
const MEDIUM_WAIT: Duration = Duration::from_secs(30);

/// Mount points made by the agent, in mount order.
#[derive(Debug, Default)]
pub struct MountSet {
    points: Vec<PathBuf>,
}

impl MountSet {
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: Option<&str>,
    ) -> Result<(), Failure> {
        std::fs::create_dir_all(target)
            .map_err(|e| Failure::os(format!("mkdir {}", target.display()), &e))?;
        mount(Some(source), target, Some(fstype), flags, data).map_err(|e| {
            Failure::os(
                format!("mount {fstype} {source} on {}", target.display()),
                &std::io::Error::from(e),
            )
        })?;
        self.points.push(target.to_owned());
        Ok(())
    }

    /// Unmounts everything, innermost first. A busy mount is detached (it goes once its
    /// last user does). Returns the first failure, after trying all.
    pub fn unmount_all(&mut self) -> Result<(), Failure> {
        let mut first = None;
        while let Some(p) = self.points.pop() {
            let res = match umount2(&p, MntFlags::empty()) {
                Err(nix::errno::Errno::EBUSY) => umount2(&p, MntFlags::MNT_DETACH),
                other => other,
            };
            if let Err(e) = res {
                tracing::warn!(path = %p.display(), "unmount: {e}");
                first.get_or_insert_with(|| {
                    Failure::os(format!("unmount {}", p.display()), &std::io::Error::from(e))
                });
            }
        }
        first.map_or(Ok(()), Err)
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

impl Drop for MountSet {
    fn drop(&mut self) {
        // Failure paths: nothing mounted may outlive its owner.
        let _ = self.unmount_all();
    }
}

/// Sets up the rootfs described by `source` under `bundle`; returns the directory to use
/// as the container's root and the mounts made.
pub fn prepare_rootfs(
    bundle: &Path,
    source: Option<&Rootfs>,
    sys_block: &Path,
) -> Result<(PathBuf, MountSet), Failure> {
    let mut set = MountSet::default();
    let root = match source.and_then(|r| r.source.as_ref()) {
        None => return Err(Failure::invalid("rootfs", "missing (block or directory)")),
        Some(rootfs::Source::Directory(d)) => directory_rootfs(bundle, d, &mut set)?,
        Some(rootfs::Source::Block(b)) => block_rootfs(bundle, b, sys_block, &mut set)?,
        Some(_) => return Err(Failure::invalid("rootfs", "unknown source kind")),
    };
    Ok((root, set))
}

fn directory_rootfs(
    bundle: &Path,
    d: &DirectoryRootfs,
    set: &mut MountSet,
) -> Result<PathBuf, Failure> {
    let what = format!("rootfs directory {:?}", d.path);
    let path = Path::new(&d.path);
    if !path.is_absolute() {
        return Err(Failure::invalid(what, "not an absolute path"));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Failure::invalid(what, "not a directory")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Failure::not_found(what));
        }
        Err(e) => return Err(Failure::os(what, &e)),
    }
    if !d.overlay {
        return Ok(path.to_owned());
    }
    overlay(bundle, path, set)
}

/// A writable layer over `lower`: overlayfs with upper and work dirs on a tmpfs.
fn overlay(bundle: &Path, lower: &Path, set: &mut MountSet) -> Result<PathBuf, Failure> {
    // overlayfs splits its options on ',' and lowerdir on ':'.
    let lower_s = match lower.to_str() {
        Some(s) if !s.contains([',', ':', '\\']) => s,
        _ => {
            return Err(Failure::invalid(
                format!("rootfs {:?}", lower.display()),
                "an overlay lower dir must be UTF-8 without ',', ':' or '\\'",
            ));
        }
    };
    let scratch = bundle.join("scratch");
    set.mount(
        "tmpfs",
        &scratch,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    let upper = scratch.join("upper");
    let work = scratch.join("work");
    for d in [&upper, &work] {
        std::fs::create_dir(d).map_err(|e| Failure::os(format!("mkdir {}", d.display()), &e))?;
    }
    let root = bundle.join("rootfs");
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower_s,
        upper.display(),
        work.display()
    );
    set.mount("overlay", &root, "overlay", MsFlags::empty(), Some(&data))?;
    Ok(root)
}

fn block_rootfs(
    bundle: &Path,
    b: &BlockRootfs,
    sys_block: &Path,
    set: &mut MountSet,
) -> Result<PathBuf, Failure> {
    let what = format!("rootfs disk with serial {:?}", b.serial);
    if b.serial.is_empty()
        || b.serial.len() > MAX_SERIAL
        || !b.serial.bytes().all(|c| c.is_ascii_graphic())
    {
        return Err(Failure::invalid(
            what,
            "serial must be 1-20 printable ASCII bytes",
        ));
    }
    let device = find_disk(sys_block, &b.serial)?.ok_or_else(|| {
        Failure::new(
            ttrpc::Code::NOT_FOUND,
            &what,
            format!("no {}/vd*/serial matches", sys_block.display()),
        )
    })?;
    let fstypes: &[&str] = match b.fstype.as_str() {
        "" => &["ext4", "erofs"],
        "ext4" => &["ext4"],
        "erofs" => &["erofs"],
        other => {
            return Err(Failure::invalid(
                what,
                format!("fstype {other:?}: expected ext4 or erofs"),
            ));
        }
    };
    if let Some(name) = device.file_name() {
        let size = sys_block.join(name).join("size");
        wait_for_medium(&size, Instant::now() + MEDIUM_WAIT)
            .map_err(|why| Failure::new(ttrpc::Code::UNAVAILABLE, &what, why))?;
    }
    let dev = device.to_string_lossy().into_owned();
    let mut last = None;
    for fstype in fstypes {
        // erofs cannot be written: always give it the overlay.
        let read_only = b.read_only || *fstype == "erofs";
        let target = if read_only {
            bundle.join("image")
        } else {
            bundle.join("rootfs")
        };
        let flags = if read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        match set.mount(&dev, &target, fstype, flags, None) {
            Ok(()) if read_only => return overlay(bundle, &target, set),
            Ok(()) => return Ok(target),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| Failure::internal(what, "no file system tried")))
}

/// Waits until the disk whose sysfs `size` file is given has a capacity (a size other than
/// "0"), or `deadline`. A missing or unreadable file is not waited for: the mount says
/// what is wrong.
fn wait_for_medium(size: &Path, deadline: Instant) -> Result<(), String> {
    loop {
        match std::fs::read_to_string(size) {
            Ok(text) if text.trim() == "0" => {}
            _ => return Ok(()),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} still says 0 sectors: the disk has no medium",
                size.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The /dev node of the virtio-blk disk whose serial is `serial`.
pub fn find_disk(sys_block: &Path, serial: &str) -> Result<Option<PathBuf>, Failure> {
    let entries = match std::fs::read_dir(sys_block) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Failure::os(format!("listing {}", sys_block.display()), &e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("vd") {
            continue;
        }
        let Ok(text) = std::fs::read(entry.path().join("serial")) else {
            continue;
        };
        // The kernel pads nothing, but a VMM may NUL-pad the 20-byte id field.
        let text = String::from_utf8_lossy(&text);
        if text.trim_end_matches(['\0', '\n', ' ']) == serial {
            return Ok(Some(Path::new("/dev").join(name)));
        }
    }
    Ok(None)
}

/// Mounts a sandbox-wide file system at `target` with fstab-style options.
pub fn mount_with_options(
    set: &mut MountSet,
    source: &str,
    target: &Path,
    fstype: &str,
    options: &[String],
) -> Result<(), Failure> {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other),
        }
    }
    let data = data.join(",");
    set.mount(
        source,
        target,
        fstype,
        flags,
        (!data.is_empty()).then_some(data.as_str()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_found_by_serial_among_virtio_devices_only() {
        let sys = tempfile::tempdir().expect("tempdir");
        for (dev, serial) in [
            ("vda", "img-1\0\0\0"),
            ("vdb", "other\n"),
            ("loop0", "img-2"),
        ] {
            std::fs::create_dir(sys.path().join(dev)).expect("mkdir");
            std::fs::write(sys.path().join(dev).join("serial"), serial).expect("serial");
        }
        std::fs::create_dir(sys.path().join("vdc")).expect("mkdir"); // no serial file
        let find = |s| find_disk(sys.path(), s).expect("listing");
        assert_eq!(find("img-1"), Some(PathBuf::from("/dev/vda")));
        assert_eq!(find("other"), Some(PathBuf::from("/dev/vdb")));
        assert_eq!(find("img-2"), None, "not a virtio disk");
        assert_eq!(find("img"), None, "prefixes do not match");
        assert_eq!(
            find_disk(&sys.path().join("missing"), "x").expect("no dir"),
            None
        );
    }

    #[test]
    fn a_disk_without_medium_is_waited_for_until_its_capacity_shows() {
        let sys = tempfile::tempdir().expect("tempdir");
        let size = sys.path().join("size");
        assert!(
            wait_for_medium(&size, Instant::now()).is_ok(),
            "no file: no wait"
        );
        std::fs::write(&size, "0\n").expect("size");
        let err = wait_for_medium(&size, Instant::now() + Duration::from_millis(30))
            .expect_err("no medium");
        assert!(err.contains("no medium"), "{err}");
        let later = size.clone();
        let filler = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(later, "8192\n").expect("size");
        });
        let t = Instant::now();
        wait_for_medium(&size, Instant::now() + Duration::from_secs(10)).expect("filled");
        assert!(t.elapsed() >= Duration::from_millis(40));
        filler.join().expect("filler");
    }

    #[test]
    fn block_rootfs_validates_before_touching_anything() {
        let bundle = tempfile::tempdir().expect("tempdir");
        let sys = tempfile::tempdir().expect("tempdir");
        let block = |serial: &str, fstype: &str| {
            let mut b = BlockRootfs::new();
            b.serial = serial.into();
            b.fstype = fstype.into();
            let mut r = Rootfs::new();
            r.set_block(b);
            prepare_rootfs(bundle.path(), Some(&r), sys.path()).map(|(p, _)| p)
        };
        let err = block("", "").expect_err("empty serial");
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT, "{err}");
        let err = block(&"x".repeat(21), "").expect_err("long serial");
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT, "{err}");
        let err = block("disk0", "").expect_err("no such disk");
        assert_eq!(err.code, ttrpc::Code::NOT_FOUND, "{err}");
        assert!(err.message.contains("\"disk0\""), "{err}");
        std::fs::create_dir(sys.path().join("vda")).expect("mkdir");
        std::fs::write(sys.path().join("vda/serial"), "disk0").expect("serial");
        let err = block("disk0", "xfs").expect_err("unsupported fs");
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT, "{err}");
        let err = prepare_rootfs(bundle.path(), None, sys.path()).expect_err("no rootfs");
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT, "{err}");
        assert_eq!(
            std::fs::read_dir(bundle.path()).expect("bundle").count(),
            0,
            "nothing created"
        );
    }
}
