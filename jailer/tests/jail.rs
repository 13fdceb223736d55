//! Enters a real jail. The jail must be entered by a process of its own (its supervisor
//! exits with the jailed process), so the test runs this test binary again with only the
//! ignored `probe_inside_the_jail` selected; that probe enters the jail the test describes
//! and reports each check on stdout.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use husk_jailer::{Bind, BindKind, JailSpec};

const SPEC_ENV: &str = "HUSK_JAIL_PROBE_SPEC";
/// The name of an abstract Unix socket the test listens on in the host's namespaces.
const ABSTRACT_ENV: &str = "HUSK_JAIL_PROBE_ABSTRACT";
const UID: u32 = 64_000;
const GID: u32 = 64_001;

fn spec_for(dir: &Path) -> JailSpec {
    let bind = |name: &str, kind| Bind {
        path: dir.join(name),
        kind,
    };
    JailSpec {
        root: dir.join("jail"),
        uid: UID,
        gid: GID,
        binds: vec![
            bind("out.log", BindKind::Output),
            bind("ro.txt", BindKind::ReadOnly),
            bind("rw", BindKind::Writable),
            bind("snap", BindKind::VmmOwned),
        ],
        devices: vec![PathBuf::from("/dev/null")],
        max_open_files: 64,
    }
}

#[test]
fn the_jail_shows_only_its_binds_and_the_vmm_cannot_regain_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: entering namespaces and dropping to another uid needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("ro.txt"), "read me").unwrap();
    std::fs::write(dir.join("out.log"), "").unwrap();
    std::fs::create_dir(dir.join("rw")).unwrap();
    std::fs::set_permissions(dir.join("rw"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::create_dir(dir.join("snap")).unwrap();
    std::os::unix::fs::chown(dir.join("snap"), Some(UID), Some(GID)).unwrap();
    std::fs::create_dir(dir.join("jail")).unwrap();
    std::fs::write(dir.join("secret"), "host only").unwrap();
    let spec = spec_for(dir);
    // A host service on an abstract Unix socket: the jail must not reach it.
    use std::os::linux::net::SocketAddrExt;
    let name = format!("husk-jail-test-{}", std::process::id());
    let host_service = std::os::unix::net::UnixListener::bind_addr(
        &std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap(),
    )
    .unwrap();
    assert!(
        std::os::unix::net::UnixStream::connect_addr(
            &std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap()
        )
        .is_ok(),
        "the host itself reaches it"
    );

    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "probe_inside_the_jail",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SPEC_ENV, serde_json::to_string(&spec).unwrap())
        .env(ABSTRACT_ENV, &name)
        .output()
        .unwrap();
    drop(host_service);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "probe failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for check in [
        "pid 1",
        "host files invisible",
        "no /proc",
        "host abstract sockets unreachable",
        "read-only bind readable",
        "read-only bind refuses writes",
        "root refuses new files",
        "writable bind takes files as root",
        "device node usable",
        "uid and gid dropped",
        "root's folder closed after the drop",
        "own folder writable after the drop",
        "output file writable after the drop",
        "root not regained",
        "no capabilities",
        "open files bounded",
    ] {
        assert!(
            stdout.contains(&format!("ok: {check}\n")),
            "missing check {check:?}:\n{stdout}\n{stderr}"
        );
    }
    // What the jailed process wrote is where the host expects it, and nothing leaked out.
    assert_eq!(
        std::fs::read_to_string(dir.join("rw/made-by-root")).unwrap(),
        "x"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("snap/state")).unwrap(),
        "snapshot"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("out.log")).unwrap(),
        "log line\n"
    );
    assert_eq!(std::fs::read_dir(dir.join("jail")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_to_string(dir.join("secret")).unwrap(),
        "host only"
    );
}

/// Not a test of its own: the jailed side of the test above.
#[test]
#[ignore = "run by the_jail_shows_only_its_binds_and_the_vmm_cannot_regain_root"]
fn probe_inside_the_jail() {
    let Ok(json) = std::env::var(SPEC_ENV) else {
        panic!("{SPEC_ENV} is not set: this probe is run by another test");
    };
    let spec: JailSpec = serde_json::from_str(&json).unwrap();
    let dir = spec.root.parent().unwrap().to_path_buf();
    let jailed = husk_jailer::enter::enter(&spec, &[]).unwrap();
    let mut failed = false;
    let mut check = |name: &str, ok: bool| {
        if ok {
            println!("ok: {name}");
        } else {
            println!("FAILED: {name}");
            failed = true;
        }
    };
    let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
    check("pid 1", std::process::id() == 1);
    check(
        "host files invisible",
        !Path::new("/etc/passwd").exists() && !dir.join("secret").exists(),
    );
    check("no /proc", !Path::new("/proc/self").exists());
    {
        use std::os::linux::net::SocketAddrExt;
        let name = std::env::var(ABSTRACT_ENV).unwrap();
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        check(
            "host abstract sockets unreachable",
            std::os::unix::net::UnixStream::connect_addr(&addr)
                .err()
                .and_then(|e| e.raw_os_error())
                == Some(libc::ECONNREFUSED),
        );
    }
    check(
        "read-only bind readable",
        std::fs::read_to_string(dir.join("ro.txt")).is_ok_and(|s| s == "read me"),
    );
    check(
        "read-only bind refuses writes",
        errno(std::fs::write(dir.join("ro.txt"), "changed")) == Some(libc::EROFS),
    );
    check(
        "root refuses new files",
        errno(std::fs::write("/new-file", "x")) == Some(libc::EROFS),
    );
    check(
        "writable bind takes files as root",
        std::fs::write(dir.join("rw/made-by-root"), "x").is_ok(),
    );
    check(
        "device node usable",
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .is_ok(),
    );
    // Output files are opened before the drop, as the VMM opens its console and metrics.
    let mut out_log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("out.log"))
        .unwrap();
    jailed.drop_privileges().unwrap();
    check(
        "uid and gid dropped",
        nix::unistd::getuid().as_raw() == UID
            && nix::unistd::geteuid().as_raw() == UID
            && nix::unistd::getgid().as_raw() == GID
            && nix::unistd::getgroups().is_ok_and(|g| g.is_empty()),
    );
    check(
        "root's folder closed after the drop",
        errno(std::fs::write(dir.join("rw/by-vmm"), "x")) == Some(libc::EACCES),
    );
    check(
        "own folder writable after the drop",
        std::fs::write(dir.join("snap/state"), "snapshot").is_ok(),
    );
    check(
        "output file writable after the drop",
        std::io::Write::write_all(&mut out_log, b"log line\n").is_ok()
            && errno(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(dir.join("out.log"))
                    .map(drop),
            ) == Some(libc::EACCES),
    );
    check(
        "root not regained",
        nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_err(),
    );
    // CAP_MKNOD and CAP_CHOWN were root's: both are gone.
    check(
        "no capabilities",
        nix::sys::stat::mknod(
            &dir.join("snap/dev"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(1, 3),
        ) == Err(nix::errno::Errno::EPERM)
            && std::os::unix::fs::chown(dir.join("snap/state"), Some(0), Some(0)).is_err(),
    );
    check(
        "open files bounded",
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .is_ok_and(|l| l == (64, 64)),
    );
    std::process::exit(if failed { 1 } else { 0 });
}
