//! Guest kernel symbols from a `System.map` (`nm -n` output: `ADDRESS TYPE NAME`), looked up
//! by address with a binary search.
//!
//! Only text symbols count (`t`/`T`, and weak `w`/`W` with an address): an instruction
//! pointer never lands in data. A System.map has no symbol sizes, so a symbol is taken to run
//! up to the next one; the text end markers (`_etext`, `_einittext`) and a gap larger than
//! [`MAX_SYMBOL_SPAN`] end it earlier, so that an address past the kernel's text is reported
//! as unknown rather than blamed on its last function.

use std::path::{Path, PathBuf};

/// No kernel function is this large; an address this far past a symbol is not in it.
pub const MAX_SYMBOL_SPAN: u64 = 1 << 20;

/// Markers that end a text section rather than start a function.
const END_MARKERS: &[&str] = &[
    "_etext",
    "_einittext",
    "__entry_text_end",
    "__irqentry_text_end",
    "__static_call_text_end",
];

/// Error reading a System.map.
#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no text symbols (t/T/w/W) in it; is it a System.map?")]
    Empty { path: PathBuf },
}

/// Text symbols sorted by address.
#[derive(Debug, Default, Clone)]
pub struct SymbolMap {
    addrs: Vec<u64>,
    names: Vec<String>,
}

impl SymbolMap {
    /// Reads and parses a System.map file.
    pub fn load(path: &Path) -> Result<Self, SymbolsError> {
        let text = std::fs::read_to_string(path).map_err(|source| SymbolsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let map = Self::parse(&text);
        if map.is_empty() {
            return Err(SymbolsError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(map)
    }

    /// Parses System.map text; lines that are not `HEX TYPE NAME` are skipped.
    pub fn parse(text: &str) -> Self {
        let mut syms: Vec<(u64, &str)> = text
            .lines()
            .filter_map(|line| {
                let mut it = line.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then_some((addr, name))
            })
            .collect();
        // Of several names at one address (aliases, section markers), keep the one with the
        // fewest leading underscores: `startup_64` over `_text`, `memcpy` over `__memcpy`;
        // ties go to the first in the file (the sort is stable).
        syms.sort_by_key(|&(addr, name)| (addr, name.len() - name.trim_start_matches('_').len()));
        syms.dedup_by_key(|&mut (addr, _)| addr);
        let (addrs, names) = syms.into_iter().map(|(a, n)| (a, n.to_string())).unzip();
        Self { addrs, names }
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The function containing `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        // Index of the first symbol above addr; the one before it is at or below.
        let i = self.addrs.partition_point(|&a| a <= addr).checked_sub(1)?;
        let name = self.names[i].as_str();
        if END_MARKERS.contains(&name) || addr - self.addrs[i] >= MAX_SYMBOL_SPAN {
            return None;
        }
        Some(name)
    }
}

/// Where `--profile` looks for the kernel's symbols when none are given: `System.map` next to
/// the kernel image (as the guest-image cache keeps them).
pub fn default_path(kernel: &Path) -> Option<PathBuf> {
    let dir = kernel.parent()?;
    if kernel.as_os_str().is_empty() {
        return None;
    }
    Some(dir.join("System.map"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
0000000000000000 D __per_cpu_start
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff81000100 t early_func
ffffffff81000100 t __early_func
ffffffff81000200 W weak_func
ffffffff81000300 T do_syscall_64
ffffffff81000400 D some_data
ffffffff81000500 T _etext
ffffffff81800000 T _sinittext
ffffffff81800000 T start_kernel
ffffffff81800800 t unpack_to_rootfs
ffffffff81801000 T _einittext
ffffffff82000000 B __bss_start
garbage line
ffffffff8100zzzz T bad_hex
";

    #[test]
    fn parses_text_symbols_only() {
        let m = SymbolMap::parse(MAP);
        // _stext/_text/startup_64 share an address; data, bss and garbage are skipped.
        assert_eq!(m.len(), 8);
        assert!(!m.is_empty());
    }

    #[test]
    fn looks_up_the_enclosing_function() {
        let m = SymbolMap::parse(MAP);
        assert_eq!(
            m.lookup(0xffff_ffff_8100_0000),
            Some("startup_64"),
            "not a marker"
        );
        assert_eq!(m.lookup(0xffff_ffff_8100_0100), Some("early_func"));
        assert_eq!(m.lookup(0xffff_ffff_8100_01ff), Some("early_func"));
        assert_eq!(m.lookup(0xffff_ffff_8100_0234), Some("weak_func"));
        // Data symbols do not split a function.
        assert_eq!(m.lookup(0xffff_ffff_8100_0450), Some("do_syscall_64"));
        assert_eq!(m.lookup(0xffff_ffff_8180_0000), Some("start_kernel"));
        assert_eq!(m.lookup(0xffff_ffff_8180_0900), Some("unpack_to_rootfs"));
    }

    #[test]
    fn addresses_outside_text_are_unknown() {
        let m = SymbolMap::parse(MAP);
        assert_eq!(m.lookup(0), None, "below the first symbol");
        assert_eq!(m.lookup(0x4000_1000), None, "a user-space address");
        assert_eq!(m.lookup(0xffff_ffff_8100_0600), None, "past _etext");
        assert_eq!(m.lookup(0xffff_ffff_8180_2000), None, "past _einittext");
        assert_eq!(m.lookup(u64::MAX), None);
        let far = SymbolMap::parse("ffffffff81000000 T only\n");
        assert_eq!(
            far.lookup(0xffff_ffff_8100_0000 + MAX_SYMBOL_SPAN - 1),
            Some("only")
        );
        assert_eq!(far.lookup(0xffff_ffff_8100_0000 + MAX_SYMBOL_SPAN), None);
    }

    #[test]
    fn load_reports_missing_and_empty_files() {
        let err = SymbolMap::load(Path::new("/nonexistent/System.map")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/System.map"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("System.map");
        std::fs::write(&p, "0000000000001000 D data_only\n").unwrap();
        assert!(matches!(
            SymbolMap::load(&p),
            Err(SymbolsError::Empty { .. })
        ));
        std::fs::write(&p, MAP).unwrap();
        assert_eq!(SymbolMap::load(&p).unwrap().len(), 8);
    }

    #[test]
    fn default_path_is_next_to_the_kernel() {
        assert_eq!(
            default_path(Path::new("/c/kernel/abc/vmlinux")),
            Some(PathBuf::from("/c/kernel/abc/System.map"))
        );
        assert_eq!(default_path(Path::new("")), None, "restored VM: no kernel");
    }
}
