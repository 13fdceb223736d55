//! Host bind mounts (`podman run -v`, a spec's `bind`/`rbind` mounts of host paths) reach
//! the container through virtio-fs, with the spec's options: a folder read and written
//! through, a file, a read-only folder that stays read-only below its submounts, and
//! propagation and `nosuid` honoured in the guest. In block mode, so virtiofsd serves the
//! binds alone. One VM boot; a missing source and a host IPC namespace path fail the
//! create before any boot.

use std::process::Stdio;

use husk_tests::GuestImage;
use husk_tests::host::skip_without_kvm;
use husk_tests::husk_cli::{Bundle, Husk, spec};
use serde_json::json;

/// A tmpfs mounted at a path for the test's length.
struct Tmpfs(std::path::PathBuf);
impl Tmpfs {
    fn mount(at: &std::path::Path) -> Self {
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(at)
            .status()
            .expect("running mount");
        assert!(status.success(), "mount -t tmpfs at {}", at.display());
        Self(at.to_path_buf())
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn host_binds_reach_the_container_with_their_options() {
    let test = "host_binds_reach_the_container_with_their_options";
    if skip_without_kvm(test) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: the submount below the read-only volume needs root");
        return;
    }
    let image = match GuestImage::locate_or_build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED {test}: no guest image: {e:#}");
            return;
        }
    };
    let husk = Husk::new(&Husk::guest_config(&image, "rootfs_mode = \"block\"")).unwrap();

    let vol = husk.dir().join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("hello.txt"), "hello from the host\n").unwrap();
    let ro = husk.dir().join("ro");
    std::fs::create_dir_all(ro.join("sub")).unwrap();
    std::fs::write(ro.join("keep"), "kept\n").unwrap();
    // A writable file system mounted below the read-only volume.
    let _sub = Tmpfs::mount(&ro.join("sub"));
    let file = husk.dir().join("volfile");
    std::fs::write(&file, "a single file\n").unwrap();

    let script = "cat /mnt/vol/hello.txt; echo from-guest > /mnt/vol/out; cat /etc/volfile; \
        cat /mnt/ro/keep; \
        touch /mnt/ro/x 2>/dev/null && echo ro-writable; \
        touch /mnt/ro/sub/x 2>/dev/null && echo ro-sub-writable; \
        grep ' /mnt/shared ' /proc/self/mountinfo | grep -q 'shared:' && echo shared-ok; \
        grep ' /mnt/vol ' /proc/self/mountinfo | grep -q 'shared:' && echo private-is-shared; \
        grep ' /mnt/vol ' /proc/self/mountinfo | grep -q nosuid && echo nosuid-ok; \
        exit 0";
    let mut config = spec(&["sh", "-c", script], true);
    let mounts = config["mounts"].as_array_mut().unwrap();
    mounts.push(
        json!({"destination": "/mnt/vol", "type": "bind", "source": vol,
        "options": ["rbind", "rprivate", "nosuid"]}),
    );
    mounts.push(
        json!({"destination": "/mnt/ro", "type": "bind", "source": ro,
        "options": ["rbind", "ro"]}),
    );
    mounts.push(
        json!({"destination": "/mnt/shared", "type": "bind", "source": vol,
        "options": ["rbind", "rshared"]}),
    );
    mounts.push(json!({"destination": "/etc/volfile", "source": file, "options": ["bind", "ro"]}));
    let b = Bundle::busybox(husk.dir(), "b", &config).unwrap();

    let out = husk
        .command(&["run", "--bundle", b.path(), "vol1"])
        .stdin(Stdio::null())
        .output()
        .expect("husk run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(
        stdout, "hello from the host\na single file\nkept\nshared-ok\nnosuid-ok\n",
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("skipped"), "a mount was dropped: {stderr}");
    assert_eq!(
        std::fs::read_to_string(vol.join("out")).expect("the guest's write is on the host"),
        "from-guest\n"
    );
    assert!(!ro.join("x").exists() && !ro.join("sub/x").exists());
    // Nothing of the share is left mounted on the host, and the state is gone.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(&*husk.root().to_string_lossy()),
        "{mountinfo}"
    );
    assert!(!husk.root().join("vol1").exists(), "state removed");

    // `husk run` of `config` fails before any boot and leaves no state; its stderr.
    let refused = |config: &serde_json::Value, id: &str| -> String {
        b.write_config(config).unwrap();
        let out = husk
            .command(&["run", "--bundle", b.path(), id])
            .stdin(Stdio::null())
            .output()
            .expect("husk run");
        assert_ne!(out.status.code(), Some(0));
        assert!(!husk.root().join(id).exists(), "state removed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    // A bind of a missing host path fails the create at once, naming it.
    let mut config = spec(&["true"], true);
    config["mounts"].as_array_mut().unwrap().push(
        json!({"destination": "/data", "type": "bind", "source": "/nonexistent/husk-volume"}),
    );
    let stderr = refused(&config, "vol2");
    assert!(
        stderr.contains("/data") && stderr.contains("/nonexistent/husk-volume"),
        "{stderr}"
    );

    // A host namespace other than the network's cannot be joined from a VM: an error
    // naming the entry, not a container quietly given a namespace of its own.
    let mut config = spec(&["true"], true);
    config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "ipc", "path": "/proc/1/ns/ipc"}));
    let stderr = refused(&config, "vol3");
    assert!(
        stderr.contains("ipc namespace path /proc/1/ns/ipc: a host ipc namespace cannot be joined"),
        "{stderr}"
    );
}
