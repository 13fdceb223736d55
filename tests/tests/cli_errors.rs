//! `husk` refuses bad input with exit status 1 and a message naming the problem. None of
//! these boot a VM: every check runs before the monitor starts.

use husk_tests::husk_cli::{Bundle, Husk, spec};
use serde_json::{Value, json};

/// A config whose guest files exist (they are never booted here).
fn husk() -> Husk {
    let h = Husk::new("").expect("husk setup");
    let kernel = h.dir().join("vmlinux");
    std::fs::write(&kernel, b"x").unwrap();
    std::fs::write(
        h.dir().join("config.toml"),
        format!(
            "kernel = {:?}\ninitramfs = {:?}\n",
            kernel.display().to_string(),
            kernel.display().to_string()
        ),
    )
    .unwrap();
    h
}

fn fails_with(h: &Husk, args: &[&str], needle: &str) {
    let o = h.output(args).expect("run husk");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "husk {args:?}: {err}");
    assert!(
        err.contains(needle),
        "husk {args:?}: expected {needle:?} in {err:?}"
    );
    assert!(
        o.stdout.is_empty(),
        "errors stay off stdout: {:?}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn unknown_ids_are_named() {
    let h = husk();
    for cmd in ["state", "start", "kill", "delete", "pause", "resume", "ps"] {
        fails_with(&h, &[cmd, "ghost"], "container \"ghost\" does not exist");
    }
    fails_with(
        &h,
        &["exec", "ghost", "true"],
        "container \"ghost\" does not exist",
    );
    fails_with(&h, &["state", "../etc"], "invalid container id");
    let o = h.output(&["delete", "--force", "ghost"]).unwrap();
    assert!(
        o.status.success(),
        "delete --force of a missing container succeeds"
    );
}

#[test]
fn invalid_config_json_names_the_field() {
    let h = husk();
    let mut c = spec(&["true"], true);
    c["process"]["user"]["uid"] = json!("root");
    let b = Bundle::busybox(h.dir(), "bad", &c).unwrap();
    fails_with(
        &h,
        &["create", "--bundle", b.path(), "c1"],
        "process.user.uid",
    );
    let mut c = spec(&["true"], true);
    c["linux"]["namespaces"][0]["type"] = json!("bogus");
    b.write_config(&c).unwrap();
    fails_with(
        &h,
        &["run", "--bundle", b.path(), "c1"],
        "linux.namespaces[0].type",
    );
    std::fs::write(b.dir.join("config.json"), "{").unwrap();
    fails_with(&h, &["create", "--bundle", b.path(), "c1"], "invalid JSON");
    assert!(
        !h.root().join("c1").exists(),
        "nothing recorded for a refused create"
    );
}

#[test]
fn missing_rootfs_and_bundle() {
    let h = husk();
    let b = Bundle::busybox(h.dir(), "b", &spec(&["true"], true)).unwrap();
    std::fs::remove_dir_all(b.dir.join("rootfs")).unwrap();
    fails_with(&h, &["create", "--bundle", b.path(), "c2"], "rootfs");
    fails_with(
        &h,
        &["create", "--bundle", "/nonexistent/bundle", "c2"],
        "/nonexistent/bundle",
    );
}

#[test]
fn bad_host_config_is_named() {
    let h = husk();
    std::fs::write(h.dir().join("config.toml"), "vcpus = 2\nmemroy_mib = 5\n").unwrap();
    let b = Bundle::busybox(h.dir(), "b", &spec(&["true"], true)).unwrap();
    fails_with(&h, &["create", "--bundle", b.path(), "c3"], "memroy_mib");
    std::fs::write(
        h.dir().join("config.toml"),
        "kernel = \"/nonexistent/vmlinux\"\n",
    )
    .unwrap();
    fails_with(
        &h,
        &["create", "--bundle", b.path(), "c3"],
        "/nonexistent/vmlinux",
    );
}

#[test]
fn terminal_without_console_socket_and_bad_signal() {
    let h = husk();
    let mut c = spec(&["sh"], true);
    c["process"]["terminal"] = json!(true);
    let b = Bundle::busybox(h.dir(), "t", &c).unwrap();
    fails_with(
        &h,
        &["create", "--bundle", b.path(), "t1"],
        "--console-socket",
    );
    fails_with(&h, &["kill", "t1", "SIGNOPE"], "invalid signal \"SIGNOPE\"");
}

#[test]
fn spec_features_version() {
    let h = husk();
    let dir = h.dir().join("spec");
    std::fs::create_dir(&dir).unwrap();
    let o = h
        .output(&["spec", "--bundle", dir.to_str().unwrap()])
        .unwrap();
    assert!(o.status.success());
    let v: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(v["process"]["args"], json!(["sh"]));
    assert_eq!(v["root"]["path"], "rootfs");
    fails_with(&h, &["spec", "--bundle", dir.to_str().unwrap()], "exists");

    let o = h.output(&["features"]).unwrap();
    assert!(o.status.success());
    let f: Value = serde_json::from_slice(&o.stdout).expect("features JSON");
    assert_eq!(f["linux"]["cgroup"]["v2"], true);
    assert!(f["hooks"].as_array().unwrap().contains(&json!("poststart")));

    let o = h.output(&["--version"]).unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("husk "));

    let o = h.output(&["list"]).unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ID "));
}

#[test]
fn log_file_gets_runc_style_json_errors() {
    let h = husk();
    let log = h.dir().join("husk.log");
    let o = h
        .output(&[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "state",
            "ghost",
        ])
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let text = std::fs::read_to_string(&log).expect("log file written");
    let line: Value = serde_json::from_str(text.lines().last().unwrap()).expect("JSON line");
    assert_eq!(line["level"], "error");
    assert!(line["msg"].as_str().unwrap().contains("ghost"), "{line}");
}

#[test]
fn check_reports_the_vmm_confinement_in_use() {
    let h = husk();
    let line = |h: &Husk, what: &str| {
        let o = h.output(&["check"]).expect("run husk check");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains(what))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {what} line in {o:?}"))
    };
    // This host has seccomp filters and namespaces, and the tests run as root (the VM tests
    // run jailed and filtered).
    let on = line(&h, "VMM seccomp");
    assert!(on.starts_with("[ok]") && on.contains("filters"), "{on}");
    let jail = line(&h, "VMM jail");
    assert!(
        jail.starts_with("[ok]") && jail.contains("uid 65534") && jail.contains("PID"),
        "{jail}"
    );
    let config = h.dir().join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("vmm_seccomp = \"off\"\nvmm_jail = \"off\"\n");
    std::fs::write(&config, text).unwrap();
    let off = line(&h, "VMM seccomp");
    assert!(
        off.starts_with("[warn]") && off.contains("unfiltered"),
        "{off}"
    );
    let unjailed = line(&h, "VMM jail");
    assert!(
        unjailed.starts_with("[warn]") && unjailed.contains("as root"),
        "{unjailed}"
    );
}
