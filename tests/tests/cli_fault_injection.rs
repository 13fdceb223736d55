//! kill -9 anywhere, through the CLI: each round runs create, start, exec, kill and delete
//! of one container and SIGKILLs one of its processes at a random moment of one step: the
//! `husk` command doing the step, the monitor (with its in-process VMM and vCPU threads) or
//! virtiofsd. Whatever the interrupted command returns, it must return (no hang) and say
//! why it failed; then the cleanup a runc caller does, `husk delete --force`, must leave no
//! process, mount, host cgroup, socket or state folder, and the next round reuses the id.
//!
//! Round `i` faults step `i % 5` and rotates the target with the seed, so any 5 rounds
//! cover every step and 15 rounds every (step, target) pair; the moment is random. Every
//! fourth round boots cold (the others restore a template), so boots get killed too.
//! `HUSK_FAULT_ROUNDS` (default 6; nightly 24), `HUSK_FAULT_SEED` replays a run (printed
//! at the start). Skips without KVM, the guest image or virtiofsd.

use std::process::Stdio;
use std::time::{Duration, Instant};

use husk_tests::fault::{self, Durations, Rng, env_number};

use husk_tests::host::cgroup_folders;
use husk_tests::husk_cli::{Bundle, Husk, processes_mentioning, spec, virtiofs_setup};

const ID: &str = "fault";
/// How long an interrupted command may take to return before it counts as hung.
const RETURN_BOUND: Duration = Duration::from_secs(180);
/// How long the cleanup's effects (processes exiting) may take to show.
const SETTLE: Duration = Duration::from_secs(15);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Create,
    Start,
    Exec,
    Kill,
    Delete,
}

const STEPS: [Step; 5] = [
    Step::Create,
    Step::Start,
    Step::Exec,
    Step::Kill,
    Step::Delete,
];

#[derive(Clone, Copy, Debug)]
enum Target {
    /// The `husk` process running the step.
    Command,
    /// The container's monitor: the VMM runs in it.
    Monitor,
    Virtiofsd,
}

const TARGETS: [Target; 3] = [Target::Command, Target::Monitor, Target::Virtiofsd];

impl Step {
    fn args(self, bundle: &str) -> Vec<String> {
        let v: &[&str] = match self {
            Step::Create => &["create", "--bundle", bundle, ID],
            Step::Start => &["start", ID],
            Step::Exec => &["exec", ID, "sh", "-c", "echo exec; sleep 2"],
            Step::Kill => &["kill", ID, "KILL"],
            Step::Delete => &["delete", "--force", ID],
        };
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Where the fault lands before the step has run once unfaulted (see [`Durations`]):
    /// about what the step takes on the nested-PVM development host (a cold create boots a
    /// kernel).
    fn default_window(self, cold: bool) -> Duration {
        Duration::from_millis(match self {
            Step::Create if cold => 20_000,
            Step::Create => 3_000,
            Step::Start => 800,
            Step::Exec => 2_500,
            Step::Kill => 300,
            Step::Delete => 1_500,
        })
    }
}

/// The pids of `target` for this test's container now (the command is the test's child).
fn target_pids(husk: &Husk, target: Target, command: i64) -> Vec<i64> {
    let dir = husk.root().join(ID).to_string_lossy().into_owned();
    let root = husk.root().to_string_lossy().into_owned();
    match target {
        Target::Command => vec![command],
        Target::Monitor => processes_mentioning(&root)
            .into_iter()
            .filter(|(_, line)| line.contains("__monitor"))
            .map(|(pid, _)| pid)
            .collect(),
        // Its sandbox runs a child with the same command line: either may be killed.
        Target::Virtiofsd => processes_mentioning(&dir)
            .into_iter()
            .filter(|(_, line)| line.contains("virtiofsd"))
            .map(|(pid, _)| pid)
            .collect(),
    }
}

/// Runs `husk <args>` normally and fails the round on error.
fn run_step(husk: &Husk, round: usize, step: Step, bundle: &str) -> Duration {
    let started = Instant::now();
    let args = step.args(bundle);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let name = format!("r{round}-{step:?}");
    let o = husk.spawn_to_files(&name, &args).unwrap();
    assert_eq!(
        o.code,
        Some(0),
        "round {round}: husk {args:?} (before the fault) failed: {}\n--- monitor log ---\n{}",
        o.stderr(),
        husk.monitor_log(ID)
    );
    let took = started.elapsed();
    if step == Step::Kill {
        husk.wait_status(ID, "stopped", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
    }
    took
}

/// What is left of the container: processes, mounts, state folder, host cgroup.
fn leftovers(husk: &Husk, cgroup: &str) -> Vec<String> {
    let root = husk.root().to_string_lossy().into_owned();
    let mut left: Vec<String> = processes_mentioning(&root)
        .into_iter()
        .map(|(pid, line)| format!("process {pid}: {line}"))
        .collect();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&root))
            .map(|l| format!("mount: {l}")),
    );
    if husk.root().join(ID).exists() {
        let files: Vec<String> = std::fs::read_dir(husk.root().join(ID))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.push(format!("state folder {ID}/ with {files:?}"));
    }
    left.extend(
        cgroup_folders(cgroup)
            .into_iter()
            .map(|p| format!("cgroup {}", p.display())),
    );
    left
}

fn set_template(husk: &Husk, extra: &str, cold: bool, image: &husk_tests::GuestImage) {
    let mode = if cold { "template = \"off\"" } else { "" };
    std::fs::write(
        husk.dir().join("config.toml"),
        Husk::guest_config(image, &format!("{extra}\nlog_level = \"info\"\n{mode}")),
    )
    .unwrap();
}

#[test]
fn sigkill_at_random_points_leaves_nothing() {
    let test = "sigkill_at_random_points_leaves_nothing";
    let Some((image, extra)) = virtiofs_setup(test) else {
        return;
    };
    let rounds = env_number("HUSK_FAULT_ROUNDS", 6) as usize;
    let seed = fault::seed();
    eprintln!("{test}: {rounds} rounds, HUSK_FAULT_SEED={seed}");
    let mut rng = Rng::new(seed);
    // Keyed by step and whether it booted cold (only a create does).
    let mut durations = Durations::<(Step, bool)>::default();
    let husk = Husk::new(&Husk::guest_config(&image, &extra)).expect("husk setup");
    set_template(&husk, &extra, false, &image);
    let o = husk.output(&["template", "create"]).unwrap();
    assert!(
        o.status.success(),
        "template create: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A host cgroup of the container's own, which a dead monitor cannot remove itself.
    let cgroup = format!("husk-test-fault-{}", std::process::id());
    let mut config = spec(&["sleep", "1000"], true);
    config["linux"]["cgroupsPath"] = serde_json::json!(format!("/{cgroup}"));
    let b = Bundle::busybox(husk.dir(), "b", &config).unwrap();

    for round in 0..rounds {
        let started = Instant::now();
        let step = STEPS[round % STEPS.len()];
        let target = TARGETS[(round / STEPS.len() + seed as usize) % TARGETS.len()];
        let cold = round % 4 == 3;
        set_template(&husk, &extra, cold, &image);
        for before in STEPS.iter().take_while(|s| **s != step) {
            // The kill step's stop is part of the normal path only before a delete.
            if *before == Step::Kill && step == Step::Delete {
                continue;
            }
            let took = run_step(&husk, round, *before, b.path());
            durations.record((*before, cold && *before == Step::Create), took);
        }
        let window = durations.window(
            (step, cold && step == Step::Create),
            step.default_window(cold),
        );
        let delay = rng.moment(window);

        let args = step.args(b.path());
        let dir = husk.dir();
        let name = format!("r{round}-{step:?}-faulted");
        let mut command = husk
            .command(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        let command_pid = command.id() as i64;
        // A command that exited is no longer there to kill (its pid may be reused).
        let killed = fault::kill_during(&mut command, delay, &mut rng, |exited| match target {
            Target::Command if exited => Vec::new(),
            _ => target_pids(&husk, target, command_pid),
        });
        let Some(status) = fault::wait_bounded(&mut command, RETURN_BOUND) else {
            panic!(
                "round {round}: husk {args:?} hung for {RETURN_BOUND:?} after {target:?} {killed:?} was SIGKILLed at {delay:?}\n--- monitor log ---\n{}",
                husk.monitor_log(ID)
            );
        };
        let stderr = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
        let killed_itself = matches!(target, Target::Command) && killed.is_some();
        if !status.success() && !killed_itself {
            assert!(
                !stderr.trim().is_empty(),
                "round {round}: husk {args:?} failed ({status}) after {target:?} was killed, without saying why"
            );
        }
        eprintln!(
            "round {round}: {step:?}, killed {target:?} {killed:?} at {delay:?} ({}), command {status}: {}",
            if cold { "cold boot" } else { "template" },
            stderr.lines().last().unwrap_or("")
        );
        // `state` answers whatever happened.
        let o = husk.output(&["state", ID]).unwrap();
        if husk.root().join(ID).join("state.json").exists() {
            assert!(
                o.status.success(),
                "round {round}: state after the fault: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }

        // The cleanup a runc caller does.
        let o = husk.output(&["delete", "--force", ID]).unwrap();
        assert!(
            o.status.success(),
            "round {round}: delete --force after the fault: {}\n--- monitor log ---\n{}",
            String::from_utf8_lossy(&o.stderr),
            husk.monitor_log(ID)
        );
        let deadline = Instant::now() + SETTLE;
        let left = loop {
            let left = leftovers(&husk, &cgroup);
            if left.is_empty() || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            left.is_empty(),
            "round {round} ({step:?}, {target:?} killed at {delay:?}, HUSK_FAULT_SEED={seed}): left after delete --force: {left:#?}"
        );
        eprintln!("round {round} clean in {:?}", started.elapsed());
    }
    // Only the template remains under the root.
    let entries: Vec<String> = std::fs::read_dir(husk.root())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "@templates")
        .collect();
    assert!(entries.is_empty(), "state left under the root: {entries:?}");
}
