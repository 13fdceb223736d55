//! `rootfs_mode = "virtiofs"`: the bundle's rootfs is shared through virtiofsd, so what the
//! container writes lands in the bundle on the host (as with runc), and delete leaves no
//! virtiofsd behind. One VM boot; skips without KVM, the guest image or virtiofsd.

use std::io::Write;
use std::process::Stdio;

use husk_tests::GuestImage;
use husk_tests::host::skip_without_kvm;
use husk_tests::husk_cli::{Bundle, Husk, spec};

fn virtiofsd() -> Option<std::path::PathBuf> {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(std::path::Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

#[test]
fn container_writes_land_in_the_bundle() {
    let test = "container_writes_land_in_the_bundle";
    if skip_without_kvm(test) {
        return;
    }
    let Some(virtiofsd) = virtiofsd() else {
        eprintln!("SKIPPED {test}: virtiofsd not installed (scripts/install-deps.sh)");
        return;
    };
    let image = match GuestImage::locate_or_build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED {test}: no guest image: {e:#}");
            return;
        }
    };
    let extra = format!(
        "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\n",
        virtiofsd.display().to_string()
    );
    let husk = Husk::new(&Husk::guest_config(&image, &extra)).expect("husk setup");
    let b = Bundle::busybox(
        husk.dir(),
        "b",
        &spec(
            &[
                "sh",
                "-c",
                "read x; echo $x > /written-in-guest; cat /etc/passwd",
            ],
            true,
        ),
    )
    .unwrap();
    let mut child = husk
        .command(&["run", "--bundle", b.path(), "v1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("husk run");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from-guest\n")
        .unwrap();
    let out = child.wait_with_output().expect("husk run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("root:x:0:0"),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let written = std::fs::read_to_string(b.dir.join("rootfs/written-in-guest"))
        .expect("the container's write is in the bundle's rootfs");
    assert_eq!(written, "from-guest\n");
    assert!(!husk.root().join("v1").exists(), "state removed");
    let socket = husk.root().join("v1/fs.sock");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&*socket.to_string_lossy()),
            "virtiofsd left running: {cmdline}"
        );
    }
}
