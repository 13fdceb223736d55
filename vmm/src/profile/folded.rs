//! The profile file: folded stacks, one `frame;frame count` line per distinct stack (the
//! input format of inferno's and Brendan Gregg's flamegraph tools), and the top-N table
//! `husk-profile-report` prints from it.
//!
//! The sampler records only the instruction pointer, so each stack has two frames: the
//! privilege level (`kernel` or `user`) and the kernel function from System.map, or the
//! address in hex where there is no symbol (user space, or outside the kernel's text).

use std::collections::HashMap;
use std::fmt::Write as _;

use super::symbols::SymbolMap;

/// Where a sample's instruction pointer was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Kernel,
    User,
}

/// Samples per (mode, address).
pub type SampleCounts = HashMap<(Mode, u64), u64>;

/// The folded stacks of `samples`, largest count first (ties by name).
pub fn fold(samples: &SampleCounts, symbols: Option<&SymbolMap>) -> Vec<(String, u64)> {
    let mut stacks: HashMap<String, u64> = HashMap::new();
    for (&(mode, addr), &n) in samples {
        let stack = match mode {
            Mode::Kernel => match symbols.and_then(|s| s.lookup(addr)) {
                Some(name) => format!("kernel;{name}"),
                None => format!("kernel;{addr:#x}"),
            },
            Mode::User => format!("user;{addr:#x}"),
        };
        *stacks.entry(stack).or_insert(0) += n;
    }
    sorted(stacks)
}

fn sorted(map: HashMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The file's text: one `stack count` line each.
pub fn render(stacks: &[(String, u64)]) -> String {
    let mut out = String::new();
    for (stack, n) in stacks {
        let _ = writeln!(out, "{stack} {n}");
    }
    out
}

/// A line of a folded file that is not `stack count`.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: expected \"frame;frame... COUNT\", got {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub text: String,
}

/// Reads folded text (blank lines and `#` comments skipped); equal stacks are added up.
pub fn parse(text: &str) -> Result<Vec<(String, u64)>, ParseError> {
    let mut stacks: HashMap<String, u64> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || ParseError {
            line: i + 1,
            text: line.chars().take(200).collect(),
        };
        let (stack, count) = line.rsplit_once(' ').ok_or_else(bad)?;
        let count: u64 = count.parse().map_err(|_| bad())?;
        if stack.is_empty() {
            return Err(bad());
        }
        *stacks.entry(stack.to_string()).or_insert(0) += count;
    }
    Ok(sorted(stacks))
}

/// The top-`n` table: rank, samples, share, stack (frames joined by ` > `), then the totals
/// per first frame (kernel, user).
pub fn top_table(stacks: &[(String, u64)], n: usize) -> String {
    let total: u64 = stacks.iter().map(|(_, c)| c).sum();
    let pct = |c: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * c as f64 / total as f64
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "{:>4} {:>9} {:>6}  symbol", "#", "samples", "%");
    for (i, (stack, c)) in stacks.iter().take(n).enumerate() {
        let _ = writeln!(
            out,
            "{:>4} {c:>9} {:>5.1}%  {}",
            i + 1,
            pct(*c),
            stack.replace(';', " > ")
        );
    }
    let mut by_mode: HashMap<&str, u64> = HashMap::new();
    for (stack, c) in stacks {
        let first = stack.split(';').next().unwrap_or(stack);
        *by_mode.entry(first).or_insert(0) += c;
    }
    let mut modes: Vec<_> = by_mode.into_iter().collect();
    modes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let _ = write!(out, "total {total} samples");
    for (mode, c) in modes {
        let _ = write!(out, ", {mode} {c} ({:.1}%)", pct(c));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbols() -> SymbolMap {
        SymbolMap::parse(
            "ffffffff81000000 T _stext\n\
             ffffffff81000100 T clear_page\n\
             ffffffff81000200 t unpack_to_rootfs\n\
             ffffffff81000300 T _etext\n",
        )
    }

    #[test]
    fn folds_by_symbol() {
        let mut s = SampleCounts::new();
        s.insert((Mode::Kernel, 0xffff_ffff_8100_0104), 5);
        s.insert((Mode::Kernel, 0xffff_ffff_8100_0180), 2);
        s.insert((Mode::Kernel, 0xffff_ffff_8100_0210), 4);
        s.insert((Mode::Kernel, 0xffff_ffff_8100_0400), 1);
        s.insert((Mode::User, 0x7f00_0000_1234), 3);
        let folded = fold(&s, Some(&symbols()));
        assert_eq!(
            folded,
            vec![
                ("kernel;clear_page".to_string(), 7),
                ("kernel;unpack_to_rootfs".to_string(), 4),
                ("user;0x7f0000001234".to_string(), 3),
                ("kernel;0xffffffff81000400".to_string(), 1),
            ]
        );
        let text = render(&folded);
        assert_eq!(
            text,
            "kernel;clear_page 7\nkernel;unpack_to_rootfs 4\nuser;0x7f0000001234 3\n\
             kernel;0xffffffff81000400 1\n"
        );
        // Without symbols every kernel address stays an address.
        let raw = fold(&s, None);
        assert_eq!(raw.len(), 5);
        assert!(raw.iter().all(|(st, _)| st.contains(";0x")));
    }

    #[test]
    fn parses_what_it_writes() {
        let mut s = SampleCounts::new();
        s.insert((Mode::Kernel, 0xffff_ffff_8100_0104), 5);
        s.insert((Mode::User, 0x4000), 2);
        let folded = fold(&s, Some(&symbols()));
        assert_eq!(parse(&render(&folded)).unwrap(), folded);
        // Comments, blank lines and repeated stacks.
        let p = parse("# profile\n\na;b 2\na;b 3\nc 1\n").unwrap();
        assert_eq!(p, vec![("a;b".to_string(), 5), ("c".to_string(), 1)]);
    }

    #[test]
    fn bad_lines_are_named() {
        let err = parse("a;b 2\nno-count\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.to_string().contains("no-count"), "{err}");
        assert!(parse("a;b x\n").is_err());
        assert!(parse(" 5\n").is_err());
    }

    #[test]
    fn top_table_lists_shares_and_totals() {
        let stacks = vec![
            ("kernel;clear_page".to_string(), 6),
            ("kernel;unpack_to_rootfs".to_string(), 3),
            ("user;0x4000".to_string(), 1),
        ];
        let t = top_table(&stacks, 2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(
            lines[1].contains("60.0%") && lines[1].ends_with("kernel > clear_page"),
            "{t}"
        );
        assert!(lines[2].contains("30.0%"), "{t}");
        assert_eq!(
            lines[3],
            "total 10 samples, kernel 9 (90.0%), user 1 (10.0%)"
        );
        assert!(top_table(&[], 5).contains("total 0 samples"));
    }
}
