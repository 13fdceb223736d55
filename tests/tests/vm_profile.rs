//! `husk-vmm --profile`: one boot to the agent, then the folded profile must hold kernel
//! samples named after real System.map functions, and the exit table must list the exits
//! every boot makes (virtio-mmio set-up, the agent's boot-timer write).

use std::ffi::OsString;
use std::time::Duration;

use husk_tests::host::skip_without_kvm;
use husk_tests::{GuestImage, VmOptions, VmProcess};
use husk_vmm::profile::symbols::SymbolMap;
use husk_vmm::profile::{exits_path, folded};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn profiled_boot_writes_symbolized_samples_and_exit_counts() {
    if skip_without_kvm("profiled_boot_writes_symbolized_samples_and_exit_counts") {
        return;
    }
    let image = GuestImage::locate_or_build().expect("guest image");
    let system_map = image.kernel.with_file_name("System.map");
    assert!(
        system_map.is_file(),
        "the guest-image cache keeps System.map next to vmlinux: {}",
        system_map.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("boot.folded");
    let args: Vec<OsString> = vec!["--profile".into(), out.clone().into()];
    let mut vm =
        VmProcess::boot_with_args(&image, &VmOptions::default(), &args).expect("starting husk-vmm");
    let rt = husk_tests::runtime().expect("tokio runtime");
    rt.block_on(async {
        let agent = vm.agent(BOOT_TIMEOUT).await.expect("agent answers");
        agent.check().await.expect("Check");
        agent.destroy_sandbox().await.expect("DestroySandbox");
    });
    let status = vm
        .wait_exit(Duration::from_secs(60))
        .expect("husk-vmm exits");
    assert!(
        status.success(),
        "husk-vmm exit {status}: {}",
        vm.diagnostics()
    );

    // Folded stacks, symbolized with the kernel's own map.
    let text = std::fs::read_to_string(&out).expect("profile written at exit");
    let stacks = folded::parse(&text).expect("folded format");
    let symbols = SymbolMap::load(&system_map).expect("System.map");
    let map_text = std::fs::read_to_string(&system_map).expect("reading System.map");
    let names: std::collections::HashSet<&str> = map_text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert!(!symbols.is_empty());
    let kernel: Vec<(&str, u64)> = stacks
        .iter()
        .filter_map(|(s, n)| Some((s.strip_prefix("kernel;")?, *n)))
        .collect();
    let named: u64 = kernel
        .iter()
        .filter(|(sym, _)| names.contains(sym))
        .map(|(_, n)| n)
        .sum();
    let total: u64 = stacks.iter().map(|(_, n)| n).sum();
    // The boot takes seconds at ~1 kHz; nearly all of it is in the (emulated) kernel.
    assert!(total >= 500, "only {total} samples:\n{text}");
    assert!(
        named * 10 >= total * 8,
        "{named} of {total} samples are in System.map functions:\n{}",
        folded::top_table(&stacks, 20)
    );
    assert!(
        kernel.iter().filter(|(sym, _)| names.contains(sym)).count() >= 20,
        "samples spread over many kernel functions:\n{text}"
    );
    eprintln!("{}", folded::top_table(&stacks, 15));

    // The exit table next to it.
    let exits = std::fs::read_to_string(exits_path(&out)).expect("exit counts written");
    assert!(exits.contains("## exits to the VMM by reason"), "{exits}");
    let count_of = |needle: &str| -> u64 {
        exits
            .lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()))
            .unwrap_or(0)
    };
    assert!(count_of("mmio_write ") > 0, "{exits}");
    assert!(count_of("intr (signal kick)") > 0, "{exits}");
    assert!(
        exits
            .lines()
            .any(|l| l.contains("0xd0000000") && l.contains("boot timer")),
        "the agent's boot-timer write is counted by address:\n{exits}"
    );
    assert!(exits.contains("virtio slot 0 (vsock) Status"), "{exits}");
}
