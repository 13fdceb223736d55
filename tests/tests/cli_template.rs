//! VM templates through the CLI: `husk template create` boots one VM and snapshots it;
//! `husk run` (`template = "auto"`) then restores it instead of booting: in virtio-fs mode
//! it binds the share to the container's own virtiofsd, in block mode it fills the
//! template's empty disk slot with the container's image; each clone is made unique. Per
//! mode one VM boot and two restores, one VM at a time; skips without KVM or the guest
//! image (and virtiofsd for the virtio-fs case).

use std::process::Stdio;

use husk_tests::GuestImage;
use husk_tests::husk_cli::{Bundle, Husk, spec, virtiofs_setup};
use serde_json::Value;

/// Two guests booting side by side on a small host each take several times longer.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `husk template create` in a store with no template yet: its key, and the one template
/// `template list` then shows.
fn create_template(husk: &Husk) -> (String, Vec<Value>) {
    let o = husk.output(&["template", "create"]).unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "template create: {stderr}");
    let key = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    eprintln!("template create: {}", stderr.lines().last().unwrap_or(""));
    let listed = templates(husk);
    assert_eq!(listed.len(), 1, "{listed:?}");
    (key, listed)
}

/// A busybox bundle `name` whose process runs `sh -c script`, with a `/whoami` file only
/// it has (`bundle NAME`).
fn whoami_bundle(husk: &Husk, name: &str, script: &str) -> Bundle {
    let b = Bundle::busybox(husk.dir(), name, &spec(&["sh", "-c", script], true)).unwrap();
    std::fs::write(b.dir.join("rootfs/whoami"), format!("bundle {name}\n")).unwrap();
    b
}

/// The monitor's log says its VM was restored from template `key`, not booted.
fn assert_restored_from(log_text: &str, key: &str) {
    assert!(
        log_text.contains("VM restored from its template") && log_text.contains(key),
        "the VM was restored, not booted: {log_text}"
    );
}

/// `husk --log LOG run` of a bundle; returns stdout and the log, after checking success.
fn run_logged(husk: &Husk, b: &Bundle, id: &str) -> (String, String) {
    let log = husk.dir().join(format!("{id}.log"));
    let o = husk
        .command(&[
            "--log",
            log.to_str().unwrap(),
            "run",
            "--bundle",
            b.path(),
            id,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        o.status.success(),
        "husk run {id}: {}\n{log_text}",
        String::from_utf8_lossy(&o.stderr)
    );
    (String::from_utf8_lossy(&o.stdout).into_owned(), log_text)
}

fn templates(husk: &Husk) -> Vec<Value> {
    let o = husk
        .output(&["template", "list", "--format", "json"])
        .expect("husk template list");
    assert!(
        o.status.success(),
        "template list: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice::<Value>(&o.stdout)
        .expect("template list prints JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn run_restores_a_template_into_unique_containers_on_their_own_share() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let test = "run_restores_a_template_into_unique_containers_on_their_own_share";
    let Some((image, base)) = virtiofs_setup(test) else {
        return;
    };
    let extra = format!("{base}log_level = \"info\"\n");
    let config = Husk::guest_config(&image, &extra);
    let husk = Husk::new(&config).expect("husk setup");

    // Nothing to restore yet, and a bad removal names what is missing.
    assert!(templates(&husk).is_empty());
    let o = husk.output(&["template", "rm", "nope"]).unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no template nope"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let (key, listed) = create_template(&husk);
    assert_eq!(listed[0]["key"], key.as_str());
    assert_eq!(listed[0]["usable"], true, "{listed:?}");
    assert_eq!(listed[0]["slots"][0], "fs:shared");
    // A second create finds it.
    let o = husk.output(&["template", "create"]).unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), key);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));

    // Each container's own rootfs (a file only it has) through its own virtiofsd, and a
    // random UUID drawn after the restore.
    let mut uuids = Vec::new();
    for n in 0..2 {
        let name = format!("b{n}");
        let b = whoami_bundle(
            &husk,
            &name,
            "cat /whoami; cat /proc/sys/kernel/random/uuid; echo written > /from-guest",
        );
        let (out, log_text) = run_logged(&husk, &b, &format!("t{n}"));
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some(format!("bundle {name}").as_str()),
            "{out}"
        );
        uuids.push(lines.next().unwrap_or_default().to_owned());
        assert_restored_from(&log_text, &key);
        assert_eq!(
            std::fs::read_to_string(b.dir.join("rootfs/from-guest")).unwrap_or_default(),
            "written\n",
            "the restored guest writes through this container's share"
        );
    }
    assert_ne!(uuids[0], uuids[1], "clones draw different random numbers");
    assert!(uuids.iter().all(|u| u.len() == 36), "{uuids:?}");

    // Another size is another template: the configuration's default no longer matches.
    let bigger = Husk::guest_config(&image, &format!("{extra}memory_mib = 256\n"));
    std::fs::write(husk.dir().join("config.toml"), bigger).unwrap();
    let listed = templates(&husk);
    assert_eq!(listed[0]["usable"], true, "its own size still matches");
    let cmdline = Husk::guest_config(&image, &format!("{extra}kernel_cmdline = \"quiet\"\n"));
    std::fs::write(husk.dir().join("config.toml"), cmdline).unwrap();
    assert_eq!(
        templates(&husk)[0]["usable"],
        false,
        "a template whose inputs changed is never used"
    );
    std::fs::write(husk.dir().join("config.toml"), &config).unwrap();

    let o = husk.output(&["template", "rm", "--all"]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(templates(&husk).is_empty());
    let left: Vec<_> = std::fs::read_dir(husk.root().join("@templates"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(
        left.is_empty(),
        "nothing of the templates is left: {left:?}"
    );
}

#[test]
fn run_restores_a_block_template_with_each_containers_image_in_its_disk_slot() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let test = "run_restores_a_block_template_with_each_containers_image_in_its_disk_slot";
    let Some(image) = GuestImage::or_skip(test) else {
        return;
    };
    let config = Husk::guest_config(&image, "rootfs_mode = \"block\"\nlog_level = \"info\"\n");
    let husk = Husk::new(&config).expect("husk setup");

    let o = husk
        .output(&[
            "template",
            "create",
            "--rootfs-mode",
            "virtiofs",
            "--volumes",
        ])
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--volumes is for --rootfs-mode block"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The configuration's mode (block) by default.
    let (key, listed) = create_template(&husk);
    assert_eq!(listed[0]["slots"], serde_json::json!(["blk:rootfs,ro"]));

    // Two images of different sizes in the slot that was empty at the snapshot: the guest
    // sees each one's capacity and content.
    let mut uuids = Vec::new();
    for n in 0..2usize {
        let name = format!("k{n}");
        let b = whoami_bundle(
            &husk,
            &name,
            "cat /whoami; wc -c < /filler; cat /proc/sys/kernel/random/uuid",
        );
        let filler = vec![b'f'; (1 + 3 * n) << 20];
        std::fs::write(b.dir.join("rootfs/filler"), &filler).unwrap();
        let (out, log_text) = run_logged(&husk, &b, &format!("k{n}"));
        let mut lines = out.lines();
        assert_eq!(
            lines.next(),
            Some(format!("bundle {name}").as_str()),
            "{out}\n{log_text}"
        );
        assert_eq!(
            lines.next().map(str::trim),
            Some(filler.len().to_string().as_str()),
            "{out}"
        );
        uuids.push(lines.next().unwrap_or_default().to_owned());
        assert_restored_from(&log_text, &key);
        // The VMM process logs into the monitor's log at its level, not into the
        // container's stderr.
        assert!(
            log_text.contains("configuring VM"),
            "the VMM's info lines in the --log file: {log_text}"
        );
    }
    assert_ne!(uuids[0], uuids[1], "clones draw different random numbers");

    let o = husk.output(&["template", "rm", "--all"]).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
