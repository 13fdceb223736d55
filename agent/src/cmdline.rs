//! The agent's options on the guest kernel command line (`/proc/cmdline`).
//!
//! Dotted `key=value` parameters are not handed to init as arguments or environment by the
//! kernel (it takes them for module parameters), so the agent reads them from /proc.
//! The command line comes from whoever built the VM: parse it defensively, never fail on it.

use tracing::level_filters::LevelFilter;

/// x86's COMMAND_LINE_SIZE is 2048; read a little more so truncation shows up as a
/// malformed last token rather than silently.
pub const MAX_CMDLINE: u64 = 4096;

/// Agent options found on the kernel command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelOptions {
    /// `husk.boot_timer=0x<addr>`: guest-physical address the agent writes once at start.
    pub boot_timer: Option<u64>,
    /// `husk.ready=console`: announce readiness on /dev/console.
    pub ready_console: bool,
    /// `husk.agent_log=<level>`.
    pub log_level: Option<LevelFilter>,
}

/// Parses the command line; returns the options and one warning per malformed husk option
/// (to be logged once logging is set up).
pub fn parse(cmdline: &str) -> (KernelOptions, Vec<String>) {
    let mut opts = KernelOptions::default();
    let mut warnings = Vec::new();
    for token in cmdline.split_ascii_whitespace() {
        let (key, value) = match token.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (token, None),
        };
        if !key.starts_with("husk.") {
            continue;
        }
        match (key, value) {
            ("husk.boot_timer", Some(v)) => match parse_boot_timer(v) {
                Ok(addr) => opts.boot_timer = Some(addr),
                Err(why) => warnings.push(format!("ignoring husk.boot_timer={v:.32}: {why}")),
            },
            ("husk.ready", Some("console")) => opts.ready_console = true,
            ("husk.agent_log", Some(v)) => match parse_level(v) {
                Some(level) => opts.log_level = Some(level),
                None => warnings.push(format!(
                    "ignoring husk.agent_log={v:.32}: expected off, error, warn, info, debug or trace"
                )),
            },
            _ => warnings.push(format!("ignoring unknown or malformed option {token:.64}")),
        }
    }
    (opts, warnings)
}

fn parse_boot_timer(value: &str) -> Result<u64, &'static str> {
    let hex = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
        .ok_or("expected a 0x-prefixed hex address")?;
    if hex.is_empty() || hex.len() > 16 {
        return Err("expected 1 to 16 hex digits");
    }
    let addr = u64::from_str_radix(hex, 16).map_err(|_| "not a hex number")?;
    // The agent writes a u32 there; it must not straddle a page (we map one).
    if !addr.is_multiple_of(4) {
        return Err("address is not 4-byte aligned");
    }
    // mmap offsets are signed 64-bit.
    if addr > i64::MAX as u64 {
        return Err("address out of range");
    }
    Ok(addr)
}

/// Parses a log level name (case-insensitive).
pub fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_options() {
        let (opts, warnings) = parse(
            "console=ttyS0 quiet husk.boot_timer=0xd0000000 husk.ready=console husk.agent_log=debug panic=-1\n",
        );
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            opts,
            KernelOptions {
                boot_timer: Some(0xd000_0000),
                ready_console: true,
                log_level: Some(LevelFilter::DEBUG),
            }
        );
    }

    #[test]
    fn defaults_when_absent() {
        let (opts, warnings) = parse("console=ttyS0 reboot=k");
        assert_eq!(opts, KernelOptions::default());
        assert!(warnings.is_empty());
    }

    #[test]
    fn malformed_values_are_ignored_with_warnings() {
        let (opts, warnings) = parse(
            "husk.boot_timer=d0000000 husk.boot_timer=0x husk.boot_timer=0xzz \
             husk.boot_timer=0xd0000002 husk.boot_timer=0x11112222333344445 \
             husk.boot_timer=0xffffffffffffffff husk.ready=serial husk.agent_log=loud husk.frob husk.boot_timer",
        );
        assert_eq!(opts, KernelOptions::default());
        assert_eq!(warnings.len(), 10, "{warnings:?}");
        assert!(warnings[0].contains("0x-prefixed"), "{}", warnings[0]);
        assert!(warnings[3].contains("aligned"), "{}", warnings[3]);
        assert!(
            warnings[7].contains("husk.agent_log=loud"),
            "{}",
            warnings[7]
        );
    }

    #[test]
    fn last_valid_value_wins_and_bad_one_does_not_clobber() {
        let (opts, warnings) = parse("husk.boot_timer=0x1000 husk.boot_timer=junk");
        assert_eq!(opts.boot_timer, Some(0x1000));
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn hostile_input_does_not_panic() {
        let long = "husk.boot_timer=0x".to_owned() + &"f".repeat(10_000);
        let (opts, warnings) = parse(&long);
        assert_eq!(opts.boot_timer, None);
        // Warnings quote a bounded prefix only.
        assert!(warnings[0].len() < 200, "{}", warnings[0].len());
        let (_, _) = parse("husk.\u{0}=\u{ffff} = == husk.ready= ===");
    }
}
