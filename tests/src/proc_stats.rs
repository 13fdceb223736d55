//! Resource figures of a running process, read from /proc.

use std::path::Path;

use anyhow::{Context, Result};

/// Resident memory of a VMM process in KiB, split into guest RAM and the VMM's own memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rss {
    pub total_kib: u64,
    pub guest_ram_kib: u64,
}

impl Rss {
    pub fn excluding_guest_ram_kib(&self) -> u64 {
        self.total_kib - self.guest_ram_kib
    }
}

/// Reads `/proc/<pid>/smaps` and splits its Rss: mappings starting inside one of
/// `guest_ram` (host address, length) — what the VMM reports in its `guest_ram` metrics
/// event — are guest RAM.
pub fn rss(pid: u32, guest_ram: &[(u64, u64)]) -> Result<Rss> {
    let path = Path::new("/proc").join(pid.to_string()).join("smaps");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_smaps(&text, guest_ram))
}

/// Splits the Rss lines of an smaps text by whether their mapping lies in guest RAM.
pub fn parse_smaps(text: &str, guest_ram: &[(u64, u64)]) -> Rss {
    let mut rss = Rss {
        total_kib: 0,
        guest_ram_kib: 0,
    };
    let mut in_guest_ram = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0);
            rss.total_kib += kib;
            if in_guest_ram {
                rss.guest_ram_kib += kib;
            }
        } else if let Some(start) = mapping_start(line) {
            in_guest_ram = guest_ram
                .iter()
                .any(|&(base, len)| start >= base && start < base.saturating_add(len));
        }
    }
    rss
}

/// The start address of a mapping header line (`start-end perms ...`); field lines such as
/// `Rss:` or `VmFlags:` give `None`.
fn mapping_start(line: &str) -> Option<u64> {
    let (a, b) = line.split_whitespace().next()?.split_once('-')?;
    if b.is_empty() || !b.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(a, 16).ok()
}

/// Host address ranges (start, length) of guest RAM in `pid`: the mappings whose name
/// contains `husk-guest-ram` (the VMM names its anonymous or memfd guest RAM so), or, on
/// hosts without anonymous mapping names, the nameless anonymous mappings exactly
/// `ram_bytes` long (guest RAM below the MMIO gap is one mapping).
pub fn guest_ram_ranges(pid: u32, ram_bytes: u64) -> Vec<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let parse = |l: &str| -> Option<(u64, u64)> {
        let (a, b) = l.split_whitespace().next()?.split_once('-')?;
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        Some((a, b - a))
    };
    let named: Vec<_> = maps
        .lines()
        .filter(|l| l.contains("husk-guest-ram"))
        .filter_map(parse)
        .collect();
    if !named.is_empty() {
        return named;
    }
    maps.lines()
        // address, perms, offset, device, inode: no path
        .filter(|l| l.split_whitespace().count() == 5)
        .filter_map(parse)
        .filter(|&(_, len)| len == ram_bytes)
        .collect()
}

/// `pid` and all its descendants (a shim's or monitor's virtiofsd, which forks a sandboxed
/// child).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // The field after the state, past the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            parents.push((p, ppid));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Prints each process's RSS (total, guest RAM, the rest) prefixed with `label` and returns
/// the sum of the rest in KiB: the host memory of a VM's processes, without guest RAM of
/// `ram_bytes` (see [`guest_ram_ranges`]). Says so if no process showed guest RAM, as the
/// figure then includes it.
pub fn memory_excluding_guest_ram(pids: &[u32], ram_bytes: u64, label: &str) -> u64 {
    let mut total = 0;
    let mut guest_ram_seen = false;
    for &pid in pids {
        let ranges = guest_ram_ranges(pid, ram_bytes);
        guest_ram_seen |= !ranges.is_empty();
        let Ok(rss) = rss(pid, &ranges) else {
            continue; // gone meanwhile
        };
        println!(
            "  {label}pid {pid} {}: RSS {} KiB, of which guest RAM {} KiB -> {} KiB",
            comm(pid),
            rss.total_kib,
            rss.guest_ram_kib,
            rss.excluding_guest_ram_kib()
        );
        total += rss.excluding_guest_ram_kib();
    }
    if !guest_ram_seen {
        println!("  {label}guest RAM not found in the mappings: the figure below includes it");
    }
    total
}

/// Every process with its arguments (`/proc/<pid>/cmdline` split at NULs); kernel threads
/// have none.
pub fn command_lines() -> Vec<(u32, Vec<String>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue; // gone meanwhile
        };
        let Some(body) = cmdline.strip_suffix(&[0]) else {
            found.push((pid, Vec::new()));
            continue; // a kernel thread or a zombie
        };
        let args = body
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        found.push((pid, args));
    }
    found
}

/// The value after `flag` in `args` (`-id X` gives `X`).
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// The command name of `pid` (`/proc/<pid>/comm`), `?` if gone.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// User and system CPU time of `pid` in microseconds (from /proc/<pid>/stat).
pub fn cpu_time_us(pid: u32) -> Result<(u64, u64)> {
    let path = Path::new("/proc").join(pid.to_string()).join("stat");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> u64 { fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0) };
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok((ticks(11) * 1_000_000 / hz, ticks(12) * 1_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_guest_ram_from_the_rest() {
        let smaps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:00 123 /usr/bin/husk-vmm
Size:               1024 kB
Rss:                 700 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:               20480 kB
7f0010000000-7f0010021000 rw-p 00000000 00:00 0
Rss:                 132 kB
VmFlags: rd wr mr mw me ac
";
        let r = parse_smaps(smaps, &[(0x7f00_0000_0000, 128 << 20)]);
        assert_eq!(r.total_kib, 700 + 20480 + 132);
        assert_eq!(r.guest_ram_kib, 20480);
        assert_eq!(r.excluding_guest_ram_kib(), 832);
    }

    #[test]
    fn process_tree_holds_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let tree = process_tree(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tree[0], std::process::id());
        assert!(
            tree.contains(&child.id()),
            "{tree:?} lacks the child {}",
            child.id()
        );
    }

    #[test]
    fn reads_own_process() {
        let r = rss(std::process::id(), &[]).unwrap();
        assert!(r.total_kib > 0);
        assert_eq!(r.guest_ram_kib, 0);
    }
}
