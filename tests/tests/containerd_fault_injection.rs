//! kill -9 anywhere, through containerd: each round runs `ctr run -d`, `ctr task exec`,
//! `ctr task kill` and `ctr task delete` of one container on the husk runtime and SIGKILLs
//! one process at a random moment of one step: `ctr` itself, the container's shim (which
//! runs the VMM in-process) or its virtiofsd. The interrupted `ctr` must return (no hang);
//! then the cleanup a containerd user does (`ctr task delete --force`, `ctr container
//! delete`) must leave no shim, virtiofsd, run folder, mount, task or container, and the
//! next round reuses the id.
//!
//! Round `i` faults step `i % 4` with the target rotated by the seed, so 4 rounds cover
//! every step and 12 every (step, target) pair; the moment is random within the step's
//! last measured duration. Every fourth round boots cold, the others restore the shim's
//! VM template. `HUSK_FAULT_ROUNDS` (default 4; nightly 12), `HUSK_FAULT_SEED` replays a
//! run. Skips without KVM, root, containerd, virtiofsd or the guest image.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_tests::containerd::{
    Containerd, NAMESPACE, build_oci_image, shims_of, skip_without_containerd,
};
use husk_tests::cri::mounts_under;
use husk_tests::fault::{self, Durations, Rng, env_number};
use husk_tests::husk_cli::processes_mentioning;
use husk_tests::podman::find_virtiofsd;
use husk_tests::{BusyboxImage, GuestImage, workspace};

const IMAGE: &str = "docker.io/husk/busybox:fault";
const RUNTIME: &str = "io.containerd.husk.v2";
const SHIM: &str = "containerd-shim-husk-v2";
const ID: &str = "fault";
/// How long an interrupted `ctr` may take to return before it counts as hung.
const RETURN_BOUND: Duration = Duration::from_secs(240);
/// How long the cleanup's effects (shims exiting) may take to show.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Run,
    Exec,
    Kill,
    Delete,
}

const STEPS: [Step; 4] = [Step::Run, Step::Exec, Step::Kill, Step::Delete];

#[derive(Clone, Copy, Debug)]
enum Target {
    Ctr,
    /// The container's shim, with its VMM.
    Shim,
    Virtiofsd,
}

const TARGETS: [Target; 3] = [Target::Ctr, Target::Shim, Target::Virtiofsd];

impl Step {
    fn args(self) -> Vec<&'static str> {
        match self {
            Step::Run => vec![
                "run",
                "-d",
                "--runtime",
                RUNTIME,
                IMAGE,
                ID,
                "sleep",
                "1000",
            ],
            Step::Exec => vec![
                "task",
                "exec",
                "--exec-id",
                "e1",
                ID,
                "sh",
                "-c",
                "echo exec; sleep 2",
            ],
            Step::Kill => vec!["task", "kill", "-s", "KILL", ID],
            Step::Delete => vec!["task", "delete", "--force", ID],
        }
    }

    /// Where the fault lands before the step ran once unfaulted: about its duration on
    /// the nested-PVM development host.
    fn default_window(self, cold: bool) -> Duration {
        Duration::from_millis(match self {
            Step::Run if cold => 25_000,
            Step::Run => 10_000,
            Step::Exec => 4_000,
            Step::Kill => 500,
            Step::Delete => 3_000,
        })
    }
}

/// The run folder the shim of `id` recorded in its bundle, if it did yet.
fn run_dir(ctrd: &Containerd, id: &str) -> Option<PathBuf> {
    let marker = ctrd
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .join(NAMESPACE)
        .join(id)
        .join("husk-run-dir");
    std::fs::read_to_string(marker)
        .ok()
        .map(|s| PathBuf::from(s.trim()))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What is left of the container: shims, virtiofsd, run folders and mounts, the task and
/// container records.
fn leftovers(ctrd: &Containerd, run_dirs: &[PathBuf]) -> Vec<String> {
    let mut left: Vec<String> = shims_of(SHIM, NAMESPACE, ID)
        .into_iter()
        .map(|p| format!("shim {p}"))
        .collect();
    for dir in run_dirs {
        let needle = dir.to_string_lossy().into_owned();
        left.extend(
            processes_mentioning(&needle)
                .into_iter()
                .map(|(p, l)| format!("process {p}: {l}")),
        );
        if dir.exists() {
            left.push(format!("run folder {}", dir.display()));
        }
        left.extend(mounts_under(dir).into_iter().map(|m| format!("mount {m}")));
    }
    left.extend(
        mounts_under(ctrd.dir())
            .into_iter()
            .map(|m| format!("mount {m}")),
    );
    for (what, args) in [
        ("task", &["task", "ls", "-q"][..]),
        ("container", &["container", "ls", "-q"][..]),
    ] {
        match ctrd.ctr(args) {
            Ok(o) if text(&o.stdout).lines().any(|l| l.trim() == ID) => {
                left.push(format!("{what} {ID} still listed"));
            }
            Ok(_) => {}
            Err(e) => left.push(format!("ctr {args:?}: {e:#}")),
        }
    }
    left
}

fn write_config(path: &Path, base: &str, cold: bool) {
    let template = if cold { "off" } else { "auto" };
    std::fs::write(path, format!("{base}template = {template:?}\n")).expect("husk.toml");
}

#[test]
fn sigkill_at_random_points_through_containerd_leaves_nothing() {
    const NAME: &str = "sigkill_at_random_points_through_containerd_leaves_nothing";
    if skip_without_containerd(NAME) {
        return;
    }
    let Some(virtiofsd) = find_virtiofsd() else {
        eprintln!("SKIPPED {NAME}: virtiofsd not installed (scripts/install-deps.sh)");
        return;
    };
    let Some(image) = GuestImage::or_skip(NAME) else {
        return;
    };
    let rounds = env_number("HUSK_FAULT_ROUNDS", 4) as usize;
    let seed = fault::seed();
    eprintln!("{NAME}: {rounds} rounds, HUSK_FAULT_SEED={seed}");
    let mut rng = Rng::new(seed);
    let mut durations = Durations::<(Step, bool)>::default();

    let shim = workspace::binary(SHIM).expect("building the shim");
    let busybox = BusyboxImage::build().expect("busybox rootfs");
    let work = tempfile::Builder::new()
        .prefix("husk-ctr-fault-")
        .tempdir()
        .expect("temp dir");
    let base = format!(
        "kernel = {:?}\ninitramfs = {:?}\nrootfs_mode = \"virtiofs\"\nvirtiofsd = {:?}\nboot_timeout_secs = 300\ntemplate_dir = {:?}\n",
        image.kernel.display().to_string(),
        image.initramfs.display().to_string(),
        virtiofsd.display().to_string(),
        work.path().join("templates").display().to_string(),
    );
    let config_path = work.path().join("husk.toml");
    write_config(&config_path, &base, false);
    let shim_dir = shim.parent().expect("shim folder").to_path_buf();
    let ctrd = Containerd::start(&[&shim_dir], &[("HUSK_CONFIG", &config_path)])
        .expect("starting containerd");
    let tarball = work.path().join("image.tar");
    build_oci_image(&busybox.root_dir(), IMAGE, work.path(), &tarball).expect("OCI image");
    let o = ctrd
        .ctr(&["images", "import", tarball.to_str().expect("UTF-8 path")])
        .expect("ctr images import");
    assert!(o.status.success(), "import: {}", text(&o.stderr));

    for round in 0..rounds {
        let started = Instant::now();
        let step = STEPS[round % STEPS.len()];
        let target = TARGETS[(round / STEPS.len() + seed as usize) % TARGETS.len()];
        let cold = round % 4 == 3;
        write_config(&config_path, &base, cold);
        let mut run_dirs: Vec<PathBuf> = Vec::new();
        for before in STEPS.iter().take_while(|s| **s != step) {
            // A forced delete of the running task is the faulted delete's normal path.
            if *before == Step::Kill && step == Step::Delete {
                continue;
            }
            let t = Instant::now();
            let o = ctrd.ctr_timeout(RETURN_BOUND, &before.args()).expect("ctr");
            assert!(
                o.status.success(),
                "round {round}: ctr {:?} (before the fault): {}\n--- containerd log ---\n{}",
                before.args(),
                text(&o.stderr),
                ctrd.log_tail(60)
            );
            durations.record((*before, cold && *before == Step::Run), t.elapsed());
            if let Some(d) = run_dir(&ctrd, ID)
                && !run_dirs.contains(&d)
            {
                run_dirs.push(d);
            }
        }
        let window = durations.window((step, cold && step == Step::Run), step.default_window(cold));
        let delay = rng.moment(window);
        let err_file = work.path().join(format!("r{round}.err"));
        let mut command = ctrd
            .ctr_command(&step.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_file).expect("stderr file"))
            .spawn()
            .expect("spawning ctr");
        let ctr_pid = command.id() as i64;
        let killed = fault::kill_during(&mut command, delay, &mut rng, |exited| {
            if let Some(d) = run_dir(&ctrd, ID)
                && !run_dirs.contains(&d)
            {
                run_dirs.push(d);
            }
            match target {
                Target::Ctr if exited => Vec::new(),
                Target::Ctr => vec![ctr_pid],
                // The serving shim, not a `start` invocation that is about to exit.
                Target::Shim => shims_of(SHIM, NAMESPACE, ID)
                    .into_iter()
                    .filter(|p| {
                        !std::fs::read(format!("/proc/{p}/cmdline"))
                            .unwrap_or_default()
                            .split(|b| *b == 0)
                            .any(|a| a == b"start")
                    })
                    .map(i64::from)
                    .collect(),
                Target::Virtiofsd => run_dirs
                    .iter()
                    .flat_map(|d| processes_mentioning(&d.to_string_lossy()))
                    .filter(|(_, l)| l.contains("virtiofsd"))
                    .map(|(p, _)| p)
                    .collect(),
            }
        });
        let Some(status) = fault::wait_bounded(&mut command, RETURN_BOUND) else {
            panic!(
                "round {round}: ctr {:?} hung for {RETURN_BOUND:?} after {target:?} {killed:?} was SIGKILLed at {delay:?}\n--- containerd log ---\n{}",
                step.args(),
                ctrd.log_tail(80)
            );
        };
        let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
        eprintln!(
            "round {round}: {step:?}, killed {target:?} {killed:?} at {delay:?} ({}), ctr {status}: {}",
            if cold { "cold boot" } else { "template" },
            stderr.lines().last().unwrap_or("")
        );

        // The cleanup a containerd user does; either may find nothing to remove.
        let _ = ctrd.ctr_timeout(RETURN_BOUND, &["task", "delete", "--force", ID]);
        let _ = ctrd.ctr(&["container", "delete", ID]);
        let deadline = Instant::now() + SETTLE;
        let left = loop {
            let left = leftovers(&ctrd, &run_dirs);
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            left.is_empty(),
            "round {round} ({step:?}, {target:?} killed at {delay:?}, HUSK_FAULT_SEED={seed}): left after the cleanup: {left:#?}\n--- containerd log ---\n{}",
            ctrd.log_tail(80)
        );
        eprintln!("round {round} clean in {:?}", started.elapsed());
    }
}
