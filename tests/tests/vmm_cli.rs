//! `husk-vmm` refuses bad input with a non-zero exit and a message that names the problem,
//! before any guest runs.

use std::os::unix::net::UnixListener;
use std::process::Command;

use husk_tests::workspace;

/// Runs husk-vmm with `args`; returns its exit code and stderr.
fn run(args: &[&str]) -> (i32, String) {
    let vmm = workspace::binary("husk-vmm").expect("husk-vmm binary");
    let out = Command::new(vmm)
        .args(args)
        .output()
        .expect("running husk-vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(args: &[&str], needles: &[&str]) {
    let (code, stderr) = run(args);
    assert_ne!(code, 0, "husk-vmm {args:?} succeeded; stderr: {stderr}");
    for n in needles {
        assert!(
            stderr.contains(n),
            "husk-vmm {args:?}: stderr does not name {n:?}: {stderr}"
        );
    }
}

/// A file that is neither an ELF nor a bzImage, standing in for a kernel where only the
/// kernel's presence matters.
fn fake_kernel(dir: &tempfile::TempDir) -> String {
    let p = dir.path().join("not-a-kernel");
    std::fs::write(&p, vec![0x5a; 8192]).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn missing_kernel_is_named() {
    assert_refused(
        &["--kernel", "/nonexistent/vmlinux"],
        &["/nonexistent/vmlinux", "No such file"],
    );
}

#[test]
fn non_kernel_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_kernel(&dir);
    assert_refused(
        &["--kernel", &k],
        &[&k, "neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn too_little_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_kernel(&dir);
    assert_refused(
        &["--kernel", &k, "--memory-mib", "32"],
        &["--memory-mib 32", "64 MiB"],
    );
}

#[test]
fn vcpu_count_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = fake_kernel(&dir);
    assert_refused(&["--kernel", &k, "--vcpus", "0"], &["--vcpus 0"]);
    assert_refused(&["--kernel", &k, "--vcpus", "9"], &["--vcpus 9"]);
}

#[test]
fn missing_initramfs_and_block_image_are_named() {
    // A real kernel, so that the VMM gets past the kernel check to the file in question.
    let image = husk_tests::GuestImage::locate_or_build().expect("guest image");
    let k = image.kernel.to_string_lossy();
    let k = k.as_ref();
    assert_refused(
        &["--kernel", k, "--initramfs", "/nonexistent/initrd"],
        &["/nonexistent/initrd"],
    );
    assert_refused(
        &["--kernel", k, "--block", "path=/nonexistent/disk.img"],
        &["/nonexistent/disk.img"],
    );
}

#[test]
fn unknown_config_file_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/k", "memroy_mib": 128}"#).unwrap();
    assert_refused(
        &["--config", cfg.to_str().unwrap()],
        &["unknown field `memroy_mib`"],
    );
}

#[test]
fn occupied_vsock_socket_path_is_refused_and_kept() {
    if husk_tests::host::skip_without_kvm("occupied_vsock_socket_path_is_refused_and_kept") {
        // Without KVM the VMM stops at /dev/kvm before it reaches the socket.
        return;
    }
    let image = husk_tests::GuestImage::locate_or_build().expect("guest image");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("busy.sock");
    let _listener = UnixListener::bind(&sock).unwrap();
    let s = sock.to_string_lossy();
    assert_refused(
        &[
            "--kernel",
            image.kernel.to_str().unwrap(),
            "--vsock-uds",
            &s,
        ],
        &[&s, "in use"],
    );
    assert!(
        sock.exists(),
        "the other process's socket must not be removed"
    );
}
