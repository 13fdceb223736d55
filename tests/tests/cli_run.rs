//! `husk run` in the foreground, as a shell or conmon uses it: its exit status is the
//! container's (`exit 3` → 3, killed by signal n → 128+n), stdin and stdout are relayed,
//! the pid file names the process that lives as long as the container, and a terminal's
//! pty master arrives over `--console-socket`. A container that writes a lot and exits at
//! once loses no byte of it (`HUSK_STDIO_LINES` lines of `seq`: 500,000, 3.4 MB, by
//! default; nightly 12,500,000, 101 MB). Two VM boots.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::Stdio;
use std::time::Duration;

use husk_tests::GuestImage;
use husk_tests::host::skip_without_kvm;
use husk_tests::husk_cli::{Bundle, Husk, spec};
use serde_json::json;

/// The read-only image mode needs no virtiofsd; cli_virtiofs covers the default mode.
const BLOCK_MODE: &str = "rootfs_mode = \"block\"";

/// One VM at a time: two guests booting side by side on a small host each take several
/// times longer.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn setup(test: &str) -> Option<Husk> {
    if skip_without_kvm(test) {
        return None;
    }
    match GuestImage::locate_or_build() {
        Ok(image) => Some(Husk::new(&Husk::guest_config(&image, BLOCK_MODE)).expect("husk setup")),
        Err(e) => {
            eprintln!("SKIPPED {test}: no guest image: {e:#}");
            None
        }
    }
}

#[test]
fn run_relays_stdio_and_returns_the_exit_code() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(husk) = setup("run_relays_stdio_and_returns_the_exit_code") else {
        return;
    };
    let lines = husk_tests::stdio::lines();
    let mut c = spec(
        &[
            "sh",
            "-c",
            "read x; echo got-$x; seq 1 $LINES; echo to-stderr >&2; exit 3",
        ],
        true,
    );
    c["process"]["env"]
        .as_array_mut()
        .expect("spec env")
        .push(json!(format!("LINES={lines}")));
    let b = Bundle::busybox(husk.dir(), "b", &c).unwrap();
    let pid_file = husk.dir().join("run.pid");
    let mut child = husk
        .command(&[
            "run",
            "--bundle",
            b.path(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "r1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("husk run");
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let out = child.wait_with_output().expect("wait for husk run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    let mut expected = b"got-hello\n".to_vec();
    expected.extend(husk_tests::stdio::seq_output(lines));
    husk_tests::stdio::assert_same_bytes("stdout", &out.stdout, &expected);
    assert!(stderr.contains("to-stderr"), "{stderr}");
    let pid = std::fs::read_to_string(&pid_file).expect("pid file");
    assert!(pid.trim().parse::<u32>().is_ok(), "{pid:?}");
    assert!(
        !husk.root().join("r1").exists(),
        "run without --detach deletes the container"
    );
}

/// Receives one fd over SCM_RIGHTS, like conmon's console socket (plain libc: the
/// harness has no nix).
fn receive_fd(listener: &UnixListener) -> OwnedFd {
    use std::os::fd::AsRawFd;
    let (conn, _) = listener.accept().expect("accept console socket");
    let mut data = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for one cmsghdr carrying one int, 8-byte aligned.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer below outlives the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, 0) };
    assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel filled msg_control; CMSG_FIRSTHDR/CMSG_DATA walk inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        assert!(!cmsg.is_null(), "no control message on the console socket");
        assert_eq!((*cmsg).cmsg_level, libc::SOL_SOCKET);
        assert_eq!((*cmsg).cmsg_type, libc::SCM_RIGHTS);
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
        OwnedFd::from_raw_fd(fd)
    }
}

#[test]
fn console_socket_gets_the_pty_and_a_signal_death_is_128_plus_n() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let Some(husk) = setup("console_socket_gets_the_pty_and_a_signal_death_is_128_plus_n") else {
        return;
    };
    // No pid namespace: sh is not an init there, so it can SIGKILL itself.
    let mut c = spec(&["sh", "-c", "tty; echo tty-hello; kill -9 $$"], false);
    c["process"]["terminal"] = json!(true);
    let b = Bundle::busybox(husk.dir(), "t", &c).unwrap();
    let sock = husk.dir().join("console.sock");
    let listener = UnixListener::bind(&sock).expect("bind console socket");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let master = receive_fd(&listener);
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        // EIO once the slave side is gone.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&out).contains("tty-hello") {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&out).into_owned());
    });
    let out = husk
        .command(&[
            "run",
            "--bundle",
            b.path(),
            "--console-socket",
            sock.to_str().unwrap(),
            "t1",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("husk run");
    assert_eq!(
        out.status.code(),
        Some(128 + 9),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tty_out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("console output arrives");
    // `tty` names the terminal: as with runc, a pty of the container's own devpts (the
    // guest pty's line discipline turns "\n" into "\r\n").
    assert!(
        tty_out.contains("/dev/pts/0\r\n"),
        "the process has the container's first pty: {tty_out:?}"
    );
    assert!(tty_out.contains("tty-hello"), "{tty_out:?}");
}
