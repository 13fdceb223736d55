//! Parallel load through the CLI: `HUSK_PARALLEL` (default 8) concurrent `husk run`, each
//! its own VM restored from one template (cold boots would take minutes on a two-core
//! nested host), all succeed with their own output and leave nothing behind; a second
//! container with the id of a running one is refused and the first keeps running. One VM
//! boot (the template); skips without KVM, the guest image or virtiofsd.

use std::process::Stdio;
use std::time::Duration;

use husk_tests::husk_cli::{Bundle, Husk, pid_alive, processes_mentioning, spec, virtiofs_setup};

fn parallel() -> usize {
    std::env::var("HUSK_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

#[test]
fn concurrent_runs_and_a_duplicate_id() {
    let Some((image, extra)) = virtiofs_setup("concurrent_runs_and_a_duplicate_id") else {
        return;
    };
    let husk = Husk::new(&Husk::guest_config(&image, &extra)).expect("husk setup");
    let o = husk.output(&["template", "create"]).unwrap();
    assert!(
        o.status.success(),
        "template create: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let mut children = Vec::new();
    for n in 0..parallel() {
        let name = format!("p{n}");
        let b = Bundle::busybox(husk.dir(), &name, &spec(&["cat", "/me"], true)).unwrap();
        std::fs::write(b.dir.join("rootfs/me"), format!("container {n}\n")).unwrap();
        let child: std::process::Child = husk
            .command(&["run", "--bundle", b.path(), &name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push((n, child));
    }
    let mut failures = Vec::new();
    for (n, child) in children {
        let o = child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if !o.status.success() || out != format!("container {n}\n") {
            failures.push(format!(
                "p{n}: {} stdout {out:?} stderr {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "concurrent runs failed: {failures:#?}");
    let left: Vec<String> = std::fs::read_dir(husk.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "@templates")
        .collect();
    assert!(left.is_empty(), "state left by the runs: {left:?}");
    let monitors = processes_mentioning(&husk.root().to_string_lossy());
    assert!(monitors.is_empty(), "processes left: {monitors:#?}");

    // The same id twice: refused by name, and the first container is untouched.
    let b = Bundle::busybox(husk.dir(), "dup", &spec(&["sleep", "1000"], true)).unwrap();
    let first = husk
        .spawn_to_files("dup1", &["run", "--detach", "--bundle", b.path(), "dup"])
        .unwrap();
    assert_eq!(first.code, Some(0), "run -d: {}", first.stderr());
    let before = husk.state("dup").unwrap();
    let second = husk
        .spawn_to_files("dup2", &["create", "--bundle", b.path(), "dup"])
        .unwrap();
    assert_ne!(second.code, Some(0), "a second container with the same id");
    assert!(
        second.stderr().contains("dup") && second.stderr().contains("exists"),
        "{}",
        second.stderr()
    );
    let after = husk
        .wait_status("dup", "running", Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        before["pid"], after["pid"],
        "the first container's monitor is the same"
    );
    assert!(pid_alive(after["pid"].as_i64().unwrap_or(0)));
    let o = husk.output(&["delete", "--force", "dup"]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
