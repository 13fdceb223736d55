//! Environment the VM's kernel command line gives the agent for every container process.
//!
//! On nested-PVM hosts guest user mode runs natively under the host's XCR0 (AVX and
//! AVX-512 on), while the guest kernel must run with `noxsave` (its emulator cannot execute
//! XSAVE) and switches only the FXSAVE area between tasks: the upper halves of YMM/ZMM
//! registers leak from one process into the next. glibc's string functions use them, so a
//! freshly exec'd busybox copied another process's bytes into its TLS and crashed. The
//! VMM's `pvm` CPU template therefore puts `GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,...` on
//! the command line; the kernel hands it to PID 1 (the agent, itself static glibc) as
//! environment, and the agent passes it on to container processes that do not set
//! GLIBC_TUNABLES themselves. Programs that use AVX without glibc (Go, hand-written SIMD)
//! are not covered: see docs/architecture.md. Real KVM hosts need none of this and the
//! variable is absent there.

use oci_spec::runtime::Process;

/// Variables a guest agent hands down, when its own environment has them.
const INHERITED: &[&str] = &["GLIBC_TUNABLES"];

/// `NAME=value` entries for the variables in [`INHERITED`] that `lookup` finds.
pub fn from_agent_env(lookup: impl Fn(&str) -> Option<String>) -> Vec<String> {
    INHERITED
        .iter()
        .filter_map(|name| lookup(name).map(|value| format!("{name}={value}")))
        .collect()
}

/// Adds each of `inherited` whose name `process`'s environment does not set.
pub fn apply(process: &mut Process, inherited: &[String]) {
    if inherited.is_empty() {
        return;
    }
    let mut env = process.env().clone().unwrap_or_default();
    for var in inherited {
        let name = var.split_once('=').map_or(var.as_str(), |(n, _)| n);
        let set = env
            .iter()
            .any(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) == name);
        if !set {
            env.push(var.clone());
        }
    }
    process.set_env(Some(env));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(env: &[&str]) -> Process {
        let mut p = Process::default();
        p.set_env(Some(env.iter().map(|s| s.to_string()).collect()));
        p
    }

    #[test]
    fn takes_only_listed_variables_that_are_set() {
        let got =
            from_agent_env(|n| (n == "GLIBC_TUNABLES").then(|| "glibc.cpu.hwcaps=-AVX".into()));
        assert_eq!(got, vec!["GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX".to_owned()]);
        assert!(from_agent_env(|_| None).is_empty());
    }

    #[test]
    fn adds_missing_and_keeps_the_processs_own_value() {
        let inherited = vec!["GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX".to_owned()];
        let mut p = process(&["PATH=/bin"]);
        apply(&mut p, &inherited);
        assert_eq!(
            p.env().as_deref(),
            Some(&["PATH=/bin".to_owned(), inherited[0].clone()][..])
        );

        let mut own = process(&["GLIBC_TUNABLES=glibc.malloc.check=3"]);
        apply(&mut own, &inherited);
        assert_eq!(
            own.env().as_deref(),
            Some(&["GLIBC_TUNABLES=glibc.malloc.check=3".to_owned()][..])
        );

        let mut none = Process::default();
        none.set_env(None);
        apply(&mut none, &[]);
        assert_eq!(none.env(), &None, "nothing to add leaves the spec alone");
    }
}
