use std::fs;
use std::path::Path;
use std::time::Duration;

use oci_spec::runtime::{
    LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
    LinuxResourcesBuilder, LinuxThrottleDeviceBuilder, LinuxWeightDeviceBuilder,
};

use super::*;

const ALL: &str = "cpuset cpu io memory hugetlb pids rdma misc";

/// Makes `dir` look like a cgroup2 directory as the kernel would populate it.
fn fake_cgroup(dir: &Path, controllers: &str) {
    fs::create_dir_all(dir).unwrap();
    let files = [
        ("cgroup.controllers", format!("{controllers}\n")),
        ("cgroup.subtree_control", String::new()),
        ("cgroup.procs", String::new()),
        ("cgroup.events", "populated 0\nfrozen 0\n".to_string()),
        ("cgroup.freeze", "0\n".to_string()),
    ];
    for (name, content) in files {
        fs::write(dir.join(name), content).unwrap();
    }
    for c in controllers.split_whitespace() {
        let per: &[(&str, &str)] = match c {
            "cpu" => &[("cpu.weight", "100\n"), ("cpu.max", "max 100000\n")],
            "memory" => &[
                ("memory.max", "max\n"),
                ("memory.low", "0\n"),
                ("memory.swap.max", "max\n"),
                ("memory.current", "0\n"),
                (
                    "memory.events",
                    "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
                ),
            ],
            "pids" => &[("pids.max", "max\n"), ("pids.current", "0\n")],
            "io" => &[("io.weight", "default 100\n"), ("io.max", "")],
            "cpuset" => &[("cpuset.cpus", "\n"), ("cpuset.mems", "\n")],
            _ => &[],
        };
        for (name, content) in per {
            fs::write(dir.join(name), content).unwrap();
        }
    }
}

fn content(dir: &Path, file: &str) -> String {
    fs::read_to_string(dir.join(file)).unwrap()
}

fn memory(limit: i64, swap: Option<i64>) -> LinuxResources {
    let mut m = LinuxMemoryBuilder::default().limit(limit);
    if let Some(s) = swap {
        m = m.swap(s);
    }
    LinuxResourcesBuilder::default()
        .memory(m.build().unwrap())
        .build()
        .unwrap()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn resolve_path_handles_spec_forms_and_refuses_escapes() {
    let r = |p: Option<&str>| resolve_path(p.map(Path::new), "ctr1");
    assert_eq!(r(None).unwrap(), Path::new("husk/ctr1"));
    assert_eq!(r(Some("")).unwrap(), Path::new("husk/ctr1"));
    assert_eq!(r(Some("/pods/ctr")).unwrap(), Path::new("pods/ctr"));
    assert_eq!(r(Some("pods/./ctr/")).unwrap(), Path::new("pods/ctr"));
    assert_eq!(
        r(Some("kubepods-besteffort-pod12.slice:cri-containerd:abc")).unwrap(),
        Path::new(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/\
             cri-containerd-abc.scope"
        )
    );
    assert_eq!(
        r(Some("system.slice:docker:abc")).unwrap(),
        Path::new("system.slice/docker-abc.scope")
    );
    for bad in [
        "/../etc",
        "a/../../x",
        "a/..",
        "/",
        "a\0b",
        "bad-.slice:x:y",
        "x.slice:p:",
    ] {
        let e = r(Some(bad)).unwrap_err();
        assert!(matches!(e, CgroupError::InvalidPath { .. }), "{bad:?}: {e}");
    }
    assert!(r(Some("/../etc")).unwrap_err().to_string().contains(".."));
}

#[test]
fn create_enables_controllers_down_to_the_parent_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    fake_cgroup(root, ALL);
    fake_cgroup(&root.join("pods"), "cpu memory pids");
    fs::write(root.join("pods/cgroup.subtree_control"), "memory\n").unwrap();
    fake_cgroup(&root.join("pods/ctr"), "cpu memory pids");

    let cg = Cgroup::create(root, Path::new("/pods/ctr")).unwrap();
    assert_eq!(cg.path(), root.join("pods/ctr"));
    assert_eq!(cg.relative_path(), Path::new("pods/ctr"));
    // Root: the wanted controllers it has, in its order; rdma/misc are not wanted.
    assert_eq!(
        content(root, "cgroup.subtree_control"),
        "+cpuset +cpu +io +memory +hugetlb +pids"
    );
    // Already-enabled memory is not written again.
    assert_eq!(
        content(&root.join("pods"), "cgroup.subtree_control"),
        "+cpu +pids"
    );
    // The leaf keeps its processes and delegates nothing.
    assert_eq!(
        content(&root.join("pods/ctr"), "cgroup.subtree_control"),
        ""
    );
    // Creating again is fine (exec/update reopen it).
    Cgroup::create(root, Path::new("pods/ctr")).unwrap();
    assert_eq!(Cgroup::open(root, Path::new("pods/ctr")).unwrap(), cg);
    assert!(matches!(
        Cgroup::open(root, Path::new("pods/none")),
        Err(CgroupError::NotFound(_))
    ));
    assert!(matches!(
        Cgroup::create(root, Path::new("../x")),
        Err(CgroupError::InvalidPath { .. })
    ));
}

#[test]
fn create_fails_naming_a_parent_without_cgroup_files() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cgroup(tmp.path(), ALL);
    // A plain directory that is no cgroup: reading its cgroup.controllers fails.
    let e = Cgroup::create(tmp.path(), Path::new("a/b")).unwrap_err();
    assert!(e.to_string().contains("a/cgroup.controllers"), "{e}");
}

#[test]
fn apply_writes_runc_values() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cgroup(tmp.path(), ALL);
    fake_cgroup(&tmp.path().join("c"), ALL);
    let cg = Cgroup::create(tmp.path(), Path::new("c")).unwrap();
    let dir = cg.path();
    let res = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(1_048_576)
                .swap(3_145_728)
                .reservation(524_288)
                .build()
                .unwrap(),
        )
        .cpu(
            LinuxCpuBuilder::default()
                .shares(1024u64)
                .quota(50_000)
                .period(100_000u64)
                .cpus("0-1")
                .mems("0")
                .build()
                .unwrap(),
        )
        .pids(LinuxPidsBuilder::default().limit(64).build().unwrap())
        .block_io(
            LinuxBlockIoBuilder::default()
                .weight(500u16)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let report = cg.apply(&res).unwrap();
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(content(dir, "memory.max"), "1048576");
    assert_eq!(content(dir, "memory.swap.max"), "2097152");
    assert_eq!(content(dir, "memory.low"), "524288");
    assert_eq!(content(dir, "cpu.weight"), "100");
    assert_eq!(content(dir, "cpu.max"), "50000 100000");
    assert_eq!(content(dir, "cpuset.cpus"), "0-1");
    assert_eq!(content(dir, "cpuset.mems"), "0");
    assert_eq!(content(dir, "pids.max"), "64");
    // No BFQ: io.weight = 1 + (500 - 10) * 9999 / 990.
    assert_eq!(content(dir, "io.weight"), "4950");

    // Update: unlimited memory and swap, no quota (keeps the period), unlimited pids.
    let res = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(-1).build().unwrap())
        .cpu(LinuxCpuBuilder::default().quota(-1).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(0).build().unwrap())
        .build()
        .unwrap();
    cg.update(&res).unwrap();
    assert_eq!(content(dir, "memory.max"), "max");
    assert_eq!(content(dir, "memory.swap.max"), "max");
    assert_eq!(content(dir, "cpu.max"), "max");
    assert_eq!(content(dir, "pids.max"), "max");
    // Untouched by the update.
    assert_eq!(content(dir, "memory.low"), "524288");
}

#[test]
fn shares_to_weight_matches_runc() {
    for (shares, weight) in [
        (0, 0),
        (1, 1),
        (2, 1),
        (1024, 100),
        (262_144, 10_000),
        (1_000_000, 10_000),
        (512, 59),
        (2048, 174),
    ] {
        assert_eq!(shares_to_weight(shares), weight, "shares {shares}");
    }
    // Monotonic over the whole range.
    let mut last = 0;
    for s in (2..262_144u64).step_by(97) {
        let w = shares_to_weight(s);
        assert!(w >= last && (1..=10_000).contains(&w), "shares {s} -> {w}");
        last = w;
    }
}

#[test]
fn swap_conversion_and_validation() {
    let all = names(&["memory"]);
    let yes = |_: &str| true;
    let p = |limit, swap| plan(&memory(limit, swap), &all, yes);
    // swap == limit: no swap.
    assert_eq!(
        p(1000, Some(1000)).unwrap().value_of("memory.swap.max"),
        Some("0")
    );
    assert_eq!(
        p(1000, Some(-1)).unwrap().value_of("memory.swap.max"),
        Some("max")
    );
    // -1 limit with unset swap: both unlimited.
    let r = p(-1, None).unwrap();
    assert_eq!(r.value_of("memory.swap.max"), Some("max"));
    assert_eq!(r.value_of("memory.max"), Some("max"));
    // Limit only: swap untouched.
    assert_eq!(p(1000, None).unwrap().value_of("memory.swap.max"), None);
    for (limit, swap, needle) in [(1000, 999, "smaller"), (0, 1000, "needs a memory.limit")] {
        let e = p(limit, Some(swap)).unwrap_err();
        assert!(matches!(e, CgroupError::InvalidResource(_)), "{e}");
        assert!(e.to_string().contains(needle), "{e}");
    }
    // No swap accounting in the kernel: "max"/"0" are skipped, a real limit is an error.
    let no = |f: &str| f != "memory.swap.max";
    let r = plan(&memory(1000, Some(1000)), &all, no).unwrap();
    assert_eq!(r.value_of("memory.swap.max"), None);
    assert_eq!(r.skipped.len(), 1);
    assert!(plan(&memory(1000, Some(2000)), &all, no).is_err());
}

#[test]
fn io_plan_uses_bfq_and_io_max() {
    let td = |maj: i64, min: i64, rate: u64| {
        LinuxThrottleDeviceBuilder::default()
            .major(maj)
            .minor(min)
            .rate(rate)
            .build()
            .unwrap()
    };
    let b = LinuxBlockIoBuilder::default()
        .weight(300u16)
        .weight_device(vec![
            LinuxWeightDeviceBuilder::default()
                .major(8)
                .minor(0)
                .weight(200u16)
                .build()
                .unwrap(),
        ])
        .throttle_read_bps_device(vec![td(8, 0, 1_048_576), td(8, 16, 5)])
        .throttle_write_iops_device(vec![td(254, 0, 100)])
        .build()
        .unwrap();
    let res = LinuxResourcesBuilder::default()
        .block_io(b)
        .build()
        .unwrap();
    let io = names(&["io"]);
    let r = plan(&res, &io, |f| f == "io.bfq.weight").unwrap();
    let got: Vec<(&str, &str)> = r
        .writes
        .iter()
        .map(|w| (w.file.as_str(), w.value.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("io.bfq.weight", "300"),
            ("io.bfq.weight", "8:0 200"),
            ("io.max", "8:0 rbps=1048576"),
            ("io.max", "8:16 rbps=5"),
            ("io.max", "254:0 wiops=100"),
        ]
    );
    // Without BFQ the device weight cannot be set: reported, not silently dropped.
    let r = plan(&res, &io, |_| false).unwrap();
    assert_eq!(r.value_of("io.weight"), Some("2930"));
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    assert!(r.skipped[0].contains("8:0"));
}

#[test]
fn missing_controller_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cgroup(tmp.path(), ALL);
    fake_cgroup(&tmp.path().join("c"), "cpu memory");
    let cg = Cgroup::create(tmp.path(), Path::new("c")).unwrap();
    let res = LinuxResourcesBuilder::default()
        .memory(LinuxMemoryBuilder::default().limit(4096).build().unwrap())
        .pids(LinuxPidsBuilder::default().limit(10).build().unwrap())
        .build()
        .unwrap();
    let e = cg.apply(&res).unwrap_err();
    match &e {
        CgroupError::ControllerMissing {
            controller, path, ..
        } => {
            assert_eq!(controller, "pids");
            assert_eq!(path, cg.path());
        }
        other => panic!("unexpected {other}"),
    }
    assert!(e.to_string().contains("pids"), "{e}");
    let cpuset = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().cpus("0").build().unwrap())
        .build()
        .unwrap();
    assert!(
        cg.apply(&cpuset)
            .unwrap_err()
            .to_string()
            .contains("cpuset")
    );
}

#[test]
fn v1_only_settings_are_reported_as_skipped() {
    let res = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(4096)
                .kernel(1000)
                .swappiness(10u64)
                .disable_oom_killer(true)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let r = plan(&res, &names(&["memory"]), |_| true).unwrap();
    assert_eq!(r.value_of("memory.max"), Some("4096"));
    assert_eq!(r.skipped.len(), 3, "{:?}", r.skipped);
    assert!(r.skipped.iter().any(|s| s.contains("swappiness")));
    // Realtime CPU settings have no v2 equivalent at all.
    let rt = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .realtime_runtime(1000)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    assert!(plan(&rt, &names(&["cpu"]), |_| true).is_err());
}

#[test]
fn unified_keys_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cgroup(tmp.path(), ALL);
    fake_cgroup(&tmp.path().join("c"), "memory pids");
    fs::write(tmp.path().join("c/memory.high"), "max\n").unwrap();
    let cg = Cgroup::create(tmp.path(), Path::new("c")).unwrap();
    let with = |k: &str| {
        let mut r = LinuxResources::default();
        r.set_unified(Some([(k.to_string(), "12345".to_string())].into()));
        r
    };
    cg.apply(&with("memory.high")).unwrap();
    assert_eq!(content(cg.path(), "memory.high"), "12345");
    assert!(matches!(
        cg.apply(&with("cpu.weight")),
        Err(CgroupError::ControllerMissing { .. })
    ));
    for bad in ["../x", "cgroup.procs", "memory.nope"] {
        assert!(
            matches!(cg.apply(&with(bad)), Err(CgroupError::InvalidResource(_))),
            "{bad}"
        );
    }
}

#[test]
fn stats_parse_kernel_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let files = [
        (
            "cpu.stat",
            "usage_usec 2031945\nuser_usec 1234000\nsystem_usec 797945\ncore_sched.force_idle_usec 0\n\
             nr_periods 120\nnr_throttled 7\nthrottled_usec 351806\nnr_bursts 0\nburst_usec 0\n",
        ),
        ("memory.current", "8486912\n"),
        ("memory.max", "268435456\n"),
        ("memory.swap.current", "0\n"),
        ("memory.swap.max", "max\n"),
        (
            "memory.stat",
            "anon 1216512\nfile 6209536\nkernel 819200\nkernel_stack 65536\npagetables 135168\n\
             sock 0\nshmem 4096\nfile_mapped 2293760\nfile_dirty 0\nworkingset_refault_anon 0\n\
             pgfault 4218\npgmajfault 27\n",
        ),
        (
            "memory.events",
            "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n",
        ),
        ("pids.current", "3\n"),
        ("pids.max", "64\n"),
        (
            "io.stat",
            "254:0 rbytes=7340032 wbytes=4096 rios=310 wios=1 dbytes=0 dios=0\n\
             7:0 rbytes=1024 wbytes=0 rios=2 wios=0 dbytes=0 dios=0 cost.usage=9\n",
        ),
    ];
    for (name, text) in files {
        fs::write(d.join(name), text).unwrap();
    }
    let s = stats::read_stats(d).unwrap();
    let cpu = s.cpu.unwrap();
    assert_eq!(
        cpu,
        CpuStats {
            usage_usec: 2_031_945,
            user_usec: 1_234_000,
            system_usec: 797_945,
            nr_periods: 120,
            nr_throttled: 7,
            throttled_usec: 351_806,
        }
    );
    let m = s.memory.unwrap();
    assert_eq!(m.usage, 8_486_912);
    assert_eq!(m.limit, Some(268_435_456));
    assert_eq!(m.swap_usage, Some(0));
    assert_eq!(m.swap_limit, None);
    assert_eq!(m.stat("anon"), 1_216_512);
    assert_eq!(m.stat("file"), 6_209_536);
    assert_eq!(m.stat("pgmajfault"), 27);
    assert_eq!(m.stat("absent"), 0);
    assert_eq!(
        m.events,
        MemoryEvents {
            low: 0,
            high: 0,
            max: 12,
            oom: 2,
            oom_kill: 1
        }
    );
    assert_eq!(
        s.pids,
        Some(PidsStats {
            current: 3,
            limit: Some(64)
        })
    );
    assert_eq!(s.io.len(), 2);
    assert_eq!(
        s.io[0],
        IoDeviceStats {
            major: 254,
            minor: 0,
            rbytes: 7_340_032,
            wbytes: 4096,
            rios: 310,
            wios: 1,
            dbytes: 0,
            dios: 0
        }
    );
    assert_eq!((s.io[1].major, s.io[1].rbytes), (7, 1024));

    // Controllers absent: their parts are None; garbage lines are skipped.
    let tmp2 = tempfile::tempdir().unwrap();
    fs::write(
        tmp2.path().join("cpu.stat"),
        "usage_usec x\nbogus\nuser_usec 5\n",
    )
    .unwrap();
    fs::write(tmp2.path().join("io.stat"), "garbage\n8:x rbytes=1\n").unwrap();
    let s = stats::read_stats(tmp2.path()).unwrap();
    assert_eq!(s.cpu.unwrap().user_usec, 5);
    assert!(s.memory.is_none() && s.pids.is_none() && s.io.is_empty());
}

#[test]
fn freeze_and_thaw_write_cgroup_freeze_and_wait_for_events() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cgroup(tmp.path(), "");
    let cg = Cgroup {
        root: tmp.path().to_path_buf(),
        relative: "x".into(),
        dir: tmp.path().to_path_buf(),
    };
    fs::write(tmp.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    cg.freeze().unwrap();
    assert_eq!(content(tmp.path(), "cgroup.freeze"), "1");
    assert!(cg.is_frozen().unwrap());
    fs::write(tmp.path().join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    cg.thaw().unwrap();
    assert_eq!(content(tmp.path(), "cgroup.freeze"), "0");
    assert!(!cg.is_frozen().unwrap());
}

#[test]
fn oom_watcher_reports_increases_of_oom_kill() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cgroup(tmp.path(), "memory");
    fs::write(
        tmp.path().join("memory.events"),
        "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
    )
    .unwrap();
    let cg = Cgroup {
        root: tmp.path().to_path_buf(),
        relative: "x".into(),
        dir: tmp.path().to_path_buf(),
    };
    let mut w = cg.oom_watcher().unwrap();
    // Kills before the watcher started are not reported.
    assert_eq!(w.read_oom_kills().unwrap(), 0);
    assert_eq!(w.wait(Some(Duration::from_millis(30))).unwrap(), 0);
    let events = tmp.path().join("memory.events");
    fs::write(&events, "low 0\nhigh 0\nmax 5\noom 3\noom_kill 3\n").unwrap();
    assert_eq!(w.read_oom_kills().unwrap(), 2);
    assert_eq!(w.read_oom_kills().unwrap(), 0);
    // A blocked waiter wakes on the inotify event.
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        fs::write(&events, "low 0\nhigh 0\nmax 5\noom 4\noom_kill 4\n").unwrap();
    });
    let start = std::time::Instant::now();
    assert_eq!(w.wait(Some(Duration::from_secs(5))).unwrap(), 1);
    assert!(start.elapsed() < Duration::from_secs(4));
    writer.join().unwrap();
    // No memory controller: a clear error.
    let tmp2 = tempfile::tempdir().unwrap();
    assert!(matches!(
        OomWatcher::new(tmp2.path()),
        Err(CgroupError::ControllerMissing { .. })
    ));
}

#[test]
fn remove_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    fake_cgroup(tmp.path(), ALL);
    fs::create_dir(tmp.path().join("c")).unwrap();
    let cg = Cgroup {
        root: tmp.path().to_path_buf(),
        relative: "c".into(),
        dir: tmp.path().join("c"),
    };
    cg.remove().unwrap();
    assert!(!tmp.path().join("c").exists());
    cg.remove().unwrap();
    cg.kill_all().unwrap();
}

/// A real cgroup2 without controllers (this host's /sys/fs/cgroup/unified); skips elsewhere.
#[test]
fn real_cgroup2_lifecycle() {
    let root = Path::new("/sys/fs/cgroup/unified");
    let is_cgroup2 = nix::sys::statfs::statfs(root)
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    if !is_cgroup2 || !nix::unistd::geteuid().is_root() {
        eprintln!(
            "skipped: {} is not a cgroup2 mount we can write as root",
            root.display()
        );
        return;
    }
    let rel = format!("husk-test-{}/ctr", std::process::id());
    let cg = Cgroup::create(root, Path::new(&rel)).unwrap();
    if !cg.path().join("cgroup.freeze").exists() || !cg.path().join("cgroup.kill").exists() {
        eprintln!("note: kernel without cgroup.freeze or cgroup.kill");
    }
    let mut child = std::process::Command::new("sleep")
        .arg("100")
        .spawn()
        .unwrap();
    let pid = i32::try_from(child.id()).unwrap();
    cg.add_process(pid).unwrap();
    assert_eq!(cg.procs().unwrap(), [pid]);
    let self_cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        self_cgroup.contains(&format!("0::/{rel}\n")),
        "{self_cgroup}"
    );

    if cg.path().join("cgroup.freeze").exists() {
        cg.freeze().unwrap();
        assert!(cg.is_frozen().unwrap());
        let state = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        eprintln!("frozen child stat: {}", &state[..state.len().min(40)]);
        cg.thaw().unwrap();
        assert!(!cg.is_frozen().unwrap());
    }
    let stats = cg.stats().unwrap();
    assert!(stats.cpu.is_some(), "cpu.stat exists without controllers");
    assert!(stats.memory.is_none());

    // Not removable while the process lives... (remove retries for SETTLE_TIMEOUT, so only
    // check the immediate rmdir here).
    assert!(fs::remove_dir(cg.path()).is_err());
    cg.kill_all().unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(cg.procs().unwrap().is_empty());
    cg.remove().unwrap();
    assert!(!cg.path().exists());
    cg.remove().unwrap();
    // The test's parent.
    let parent = Cgroup::open(
        root,
        Path::new(&format!("husk-test-{}", std::process::id())),
    )
    .unwrap();
    parent.remove().unwrap();
}
