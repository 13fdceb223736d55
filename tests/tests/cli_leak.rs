//! Leak test: create/start/kill/delete cycles, every third one with the monitor SIGKILLed
//! midway; afterwards no husk process, socket or state of these containers remains.
//!
//! Each cycle boots a VM (about 21 s on the nested-PVM development host: 20 cycles take
//! 7 minutes there, seconds on hardware KVM). `HUSK_LEAK_CYCLES` sets the number of cycles
//! (default 20).

use std::time::{Duration, Instant};

use husk_tests::GuestImage;
use husk_tests::host::skip_without_kvm;
use husk_tests::husk_cli::{Bundle, Husk, pid_alive, processes_mentioning, spec};

const STEP: Duration = Duration::from_secs(120);

#[test]
fn cycles_leave_nothing_behind() {
    let test = "cycles_leave_nothing_behind";
    if skip_without_kvm(test) {
        return;
    }
    let image = match GuestImage::locate_or_build() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("SKIPPED {test}: no guest image: {e:#}");
            return;
        }
    };
    let cycles: usize = std::env::var("HUSK_LEAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let husk = Husk::new(&Husk::guest_config(&image, "log_level = \"info\"")).unwrap();
    // Odd cycles use virtiofs (when virtiofsd is installed), so a virtiofsd left behind by a
    // SIGKILLed monitor would show up too.
    let virtiofsd = ["/usr/bin/virtiofsd", "/usr/libexec/virtiofsd"]
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo/bin/virtiofsd")),
        )
        .find(|p| p.is_file());
    let b = Bundle::busybox(husk.dir(), "b", &spec(&["sleep", "1000"], true)).unwrap();
    let root = husk.root().to_string_lossy().into_owned();
    for i in 0..cycles {
        let id = format!("leak{i}");
        let started = Instant::now();
        let mode = match &virtiofsd {
            Some(v) if i % 2 == 1 => format!(
                "rootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}",
                v.display().to_string()
            ),
            _ => "rootfs_mode = \"block\"".to_owned(),
        } + "\nlog_level = \"info\"";
        std::fs::write(
            husk.dir().join("config.toml"),
            Husk::guest_config(&image, &mode),
        )
        .unwrap();
        let r = husk
            .spawn_to_files(&id, &["run", "--detach", "--bundle", b.path(), &id])
            .unwrap();
        assert_eq!(
            r.code,
            Some(0),
            "cycle {i}: run -d: {}\n{}",
            r.stderr(),
            husk.monitor_log(&id)
        );
        let pid = husk.state(&id).unwrap()["pid"].as_i64().unwrap();
        if i % 3 == 2 {
            // SAFETY: kill(2) of the monitor this cycle started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        } else {
            let o = husk.output(&["kill", &id, "KILL"]).unwrap();
            assert!(
                o.status.success(),
                "cycle {i}: kill: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        if let Err(e) = husk.wait_status(&id, "stopped", STEP) {
            panic!(
                "cycle {i}: {e:#}\n--- monitor log ---\n{}",
                husk.monitor_log(&id)
            );
        }
        let o = husk.output(&["delete", &id]).unwrap();
        assert!(
            o.status.success(),
            "cycle {i}: delete: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let deadline = Instant::now() + STEP;
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "cycle {i}: monitor {pid} still alive");
        eprintln!("cycle {i} done in {:?}", started.elapsed());
    }
    let left = processes_mentioning(&root);
    assert!(left.is_empty(), "processes left: {left:?}");
    let entries: Vec<_> = std::fs::read_dir(husk.root())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "state left under the root: {entries:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&root), "mounts left: {mounts}");
}
