//! Seccomp: compiles an OCI `linux.seccomp` section into a classic BPF program and installs it.
//!
//! The compiler is our own rather than seccompiler's: seccompiler gives every rule of a filter
//! the same action (OCI gives each syscall entry its own action and errno), keeps its syscall
//! table private, and does not look at the x32 bit or other audit architectures.
//!
//! Semantics follow runc + libseccomp:
//! - architectures: x86_64 is always filtered (the native arch). `SCMP_ARCH_X86` adds a section
//!   for i386 system calls (AUDIT_ARCH_I386, i386 numbers); `SCMP_ARCH_X32` adds one for x32
//!   calls (AUDIT_ARCH_X86_64 with `__X32_SYSCALL_BIT`, x32 numbers). A call from an architecture
//!   (or ABI) not listed kills the process, as libseccomp's bad-arch action does. Any other
//!   architecture in the spec is an error.
//! - unknown syscall names are skipped with a warning (names missing on only some of the selected
//!   architectures are skipped there silently); the names are reported by
//!   [`BpfProgram::skipped_syscalls`].
//! - an entry whose action equals the default action is dropped, as runc does.
//! - conditions of one entry are ANDed; if two of them test the same argument, each condition
//!   becomes its own rule (ORed), as runc does. Comparisons are unsigned and 64-bit;
//!   `SCMP_CMP_MASKED_EQ` matches `(arg & value) == valueTwo`.
//! - the rules of one syscall are tried in spec order; the first that matches decides.
//! - `SCMP_ACT_ERRNO` and `SCMP_ACT_TRACE` default to EPERM when `errnoRet` is absent.
//! - when the default action refuses syscalls, syscalls numbered above the highest one the
//!   profile names get ENOSYS (runc's stub), so that newer libcs fall back to older calls.
//! - `SCMP_ACT_NOTIFY` / `listenerPath` are not supported (there is no seccomp agent).

use std::collections::HashMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use tracing::{debug, warn};

#[path = "seccomp_syscalls.rs"]
mod syscalls;

/// Errors of compiling or installing a seccomp filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error(
        "seccomp architecture {0} is not supported (only SCMP_ARCH_X86_64, SCMP_ARCH_X86, \
         SCMP_ARCH_X32 and SCMP_ARCH_NATIVE)"
    )]
    UnsupportedArch(Arch),
    #[error("seccomp action {action} ({context}) is not supported")]
    UnsupportedAction {
        action: LinuxSeccompAction,
        context: String,
    },
    #[error("seccomp listenerPath is set, but seccomp notify is not supported")]
    NotifyUnsupported,
    #[error("seccomp errnoRet {errno} for {context} is out of range (at most 65535)")]
    ErrnoOutOfRange { errno: u32, context: String },
    #[error(
        "seccomp errnoRet for {context} given with action {action}; only SCMP_ACT_ERRNO and SCMP_ACT_TRACE take one"
    )]
    ErrnoWithoutErrnoAction {
        action: LinuxSeccompAction,
        context: String,
    },
    #[error("seccomp rule for {syscalls:?}: argument index {index} is out of range (0-5)")]
    ArgIndex { syscalls: Vec<String>, index: usize },
    #[error("seccomp filter needs {0} BPF instructions, more than the kernel's limit of 4096")]
    TooLarge(usize),
    #[error("internal error: seccomp BPF jump of {0} instructions does not fit")]
    JumpTooFar(usize),
    #[error("installing the seccomp filter: {0} (needs no_new_privs or CAP_SYS_ADMIN)")]
    Install(#[source] std::io::Error),
}

type Result<T> = std::result::Result<T, SeccompError>;

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A compiled filter, ready for [`install`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfProgram {
    insns: Vec<SockFilter>,
    flags: libc::c_ulong,
    skipped: Vec<String>,
}

impl BpfProgram {
    /// The BPF instructions.
    pub fn instructions(&self) -> &[SockFilter] {
        &self.insns
    }

    /// `SECCOMP_FILTER_FLAG_*` bits passed to seccomp(2).
    pub fn flags(&self) -> libc::c_ulong {
        self.flags
    }

    /// Syscall names of the spec that no selected architecture knows (they were left out).
    pub fn skipped_syscalls(&self) -> &[String] {
        &self.skipped
    }
}

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_ALU_AND_K: u16 = 0x54;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGT_K: u16 = 0x25;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const BPF_MAXINSNS: usize = 4096;
/// Longest run of syscall tests sharing one `ret`; keeps every jump within 255.
const RUN_MAX: usize = 200;

// struct seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const RET_KILL_THREAD: u32 = 0x0000_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_DATA_MAX: u32 = 0xffff;

/// libseccomp's default bad-architecture action is to kill; the whole process, not a thread,
/// so that no half-dead process remains.
const RET_BAD_ARCH: u32 = RET_KILL_PROCESS;

/// The syscall ABIs a filter can cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Abi {
    X86_64,
    X32,
    I386,
}

impl Abi {
    fn table(self) -> &'static [(&'static str, u32)] {
        match self {
            Abi::X86_64 => syscalls::X86_64,
            Abi::X32 => syscalls::X32,
            Abi::I386 => syscalls::I386,
        }
    }

    /// The number the filter sees in `seccomp_data.nr` for `name`.
    fn lookup(self, name: &str) -> Option<u32> {
        let table = self.table();
        let i = table.binary_search_by(|(n, _)| (*n).cmp(name)).ok()?;
        let nr = table[i].1;
        Some(if self == Abi::X32 {
            nr | X32_SYSCALL_BIT
        } else {
            nr
        })
    }
}

/// Looks up an x86_64 system call number by name (the table the compiler uses).
pub fn syscall_number(name: &str) -> Option<u32> {
    Abi::X86_64.lookup(name)
}

#[derive(Clone, Copy, Debug)]
struct Cond {
    index: u32,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: u64,
}

#[derive(Clone, Debug)]
struct Rule {
    conds: Vec<Cond>,
    action: u32,
}

/// The rules of each syscall number of one ABI.
type SyscallRules = Vec<(u32, Vec<Rule>)>;

fn action_value(
    action: LinuxSeccompAction,
    errno: Option<u32>,
    context: &dyn Fn() -> String,
) -> Result<u32> {
    let data = |errno: Option<u32>| -> Result<u32> {
        let e = errno.unwrap_or(libc::EPERM as u32);
        if e > RET_DATA_MAX {
            return Err(SeccompError::ErrnoOutOfRange {
                errno: e,
                context: context(),
            });
        }
        Ok(e)
    };
    let takes_errno = matches!(
        action,
        LinuxSeccompAction::ScmpActErrno | LinuxSeccompAction::ScmpActTrace
    );
    if errno.is_some() && !takes_errno {
        return Err(SeccompError::ErrnoWithoutErrnoAction {
            action,
            context: context(),
        });
    }
    Ok(match action {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => RET_KILL_THREAD,
        LinuxSeccompAction::ScmpActKillProcess => RET_KILL_PROCESS,
        LinuxSeccompAction::ScmpActTrap => RET_TRAP,
        LinuxSeccompAction::ScmpActErrno => RET_ERRNO | data(errno)?,
        LinuxSeccompAction::ScmpActTrace => RET_TRACE | data(errno)?,
        LinuxSeccompAction::ScmpActLog => RET_LOG,
        LinuxSeccompAction::ScmpActAllow => RET_ALLOW,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::UnsupportedAction {
                action,
                context: context(),
            });
        }
    })
}

/// Splits an entry's conditions into rules the way runc does: all in one rule, unless two test
/// the same argument, then one rule per condition.
fn rules_for(names: &[String], args: &[LinuxSeccompArg], action: u32) -> Result<Vec<Rule>> {
    let mut conds = Vec::with_capacity(args.len());
    let mut per_index = [0usize; 6];
    for a in args {
        let slot = per_index
            .get_mut(a.index())
            .ok_or_else(|| SeccompError::ArgIndex {
                syscalls: names.to_vec(),
                index: a.index(),
            })?;
        *slot += 1;
        conds.push(Cond {
            // Bounded by the check above.
            index: a.index() as u32,
            op: a.op(),
            value: a.value(),
            value_two: a.value_two().unwrap_or(0),
        });
    }
    if per_index.iter().any(|&n| n > 1) {
        Ok(conds
            .into_iter()
            .map(|c| Rule {
                conds: vec![c],
                action,
            })
            .collect())
    } else {
        Ok(vec![Rule { conds, action }])
    }
}

/// Compiles an OCI seccomp section into a BPF program for x86_64 (see the module docs).
pub fn compile(spec: &LinuxSeccomp) -> Result<BpfProgram> {
    if spec.listener_path().is_some() {
        return Err(SeccompError::NotifyUnsupported);
    }
    let default = action_value(spec.default_action(), spec.default_errno_ret(), &|| {
        "defaultAction".to_string()
    })?;

    let mut abis = vec![Abi::X86_64];
    for arch in spec.architectures().iter().flatten() {
        let abi = match arch {
            Arch::ScmpArchNative | Arch::ScmpArchX86_64 => Abi::X86_64,
            Arch::ScmpArchX86 => Abi::I386,
            Arch::ScmpArchX32 => Abi::X32,
            other => return Err(SeccompError::UnsupportedArch(*other)),
        };
        if !abis.contains(&abi) {
            abis.push(abi);
        }
    }

    let mut flags: libc::c_ulong = 0;
    for f in spec.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
            }
        };
    }

    // Per ABI: (syscall number, its rules in spec order), numbers in first-seen order.
    let mut per_abi: Vec<(Abi, SyscallRules)> = abis.iter().map(|&a| (a, Vec::new())).collect();
    let mut skipped = Vec::new();
    for (i, entry) in spec.syscalls().iter().flatten().enumerate() {
        let context = || format!("syscalls[{i}] {:?}", entry.names());
        let action = action_value(entry.action(), entry.errno_ret(), &context)?;
        let rules = rules_for(
            entry.names(),
            entry.args().as_deref().unwrap_or_default(),
            action,
        )?;
        if action == default {
            debug!(names = ?entry.names(), "seccomp entry has the default action; dropped");
            continue;
        }
        for name in entry.names() {
            let mut known = false;
            for (abi, map) in per_abi.iter_mut() {
                let Some(nr) = abi.lookup(name) else {
                    continue;
                };
                known = true;
                match map.iter_mut().find(|(n, _)| *n == nr) {
                    Some((_, existing)) => existing.extend(rules.iter().cloned()),
                    None => map.push((nr, rules.clone())),
                }
            }
            if !known {
                warn!(syscall = %name, "unknown syscall in seccomp profile; skipped");
                if !skipped.contains(name) {
                    skipped.push(name.clone());
                }
            }
        }
    }

    // runc's ENOSYS stub applies when unknown syscalls would otherwise be refused.
    let enosys_stub = !matches!(default, RET_ALLOW | RET_LOG);

    let mut asm = Asm::default();
    let not_x86_64 = asm.label();
    let x32 = asm.label();
    let bad_arch = asm.label();
    asm.load(OFF_ARCH);
    asm.jump_unless_eq(AUDIT_ARCH_X86_64, not_x86_64);
    asm.load(OFF_NR);
    // x32 calls arrive with AUDIT_ARCH_X86_64 too; only the number tells them apart.
    asm.jump_if_ge(X32_SYSCALL_BIT, x32);
    let section = |abi: Abi| {
        per_abi
            .iter()
            .find(|(a, _)| *a == abi)
            .map(|(_, rules)| rules.as_slice())
    };
    emit_section(
        &mut asm,
        section(Abi::X86_64).unwrap_or_default(),
        default,
        enosys_stub,
    )?;

    asm.bind(x32);
    match section(Abi::X32) {
        Some(rules) => emit_section(&mut asm, rules, default, enosys_stub)?,
        None => asm.ret(RET_BAD_ARCH),
    }

    asm.bind(not_x86_64);
    if let Some(rules) = section(Abi::I386) {
        asm.jump_unless_eq(AUDIT_ARCH_I386, bad_arch);
        asm.load(OFF_NR);
        emit_section(&mut asm, rules, default, enosys_stub)?;
    }
    asm.bind(bad_arch);
    asm.ret(RET_BAD_ARCH);

    let insns = asm.finish()?;
    if insns.len() > BPF_MAXINSNS {
        return Err(SeccompError::TooLarge(insns.len()));
    }
    Ok(BpfProgram {
        insns,
        flags,
        skipped,
    })
}

/// Emits the dispatch of one ABI; the accumulator holds the syscall number on entry.
fn emit_section(
    asm: &mut Asm,
    rules: &[(u32, Vec<Rule>)],
    default: u32,
    enosys_stub: bool,
) -> Result<()> {
    let max = rules.iter().map(|(nr, _)| *nr).max();
    if let (true, Some(max)) = (enosys_stub, max) {
        asm.jump(BPF_JMP_JGT_K, max, Jmp::Rel(0), Jmp::Rel(1));
        asm.ret(RET_ERRNO | libc::ENOSYS as u32);
    }
    // Syscalls whose first rule is unconditional decide right away: runs of one-instruction
    // tests share a `ret` (a conditional jump reaches at most 255 instructions ahead).
    let mut direct: Vec<(u32, u32)> = rules
        .iter()
        .filter(|(_, chain)| chain.first().is_some_and(|r| r.conds.is_empty()))
        .filter_map(|(nr, chain)| chain.first().map(|r| (r.action, *nr)))
        .collect();
    direct.sort_unstable();
    for run in direct.chunk_by(|a, b| a.0 == b.0) {
        for part in run.chunks(RUN_MAX) {
            let ret = asm.label();
            for &(_, nr) in part {
                asm.jump(BPF_JMP_JEQ_K, nr, Jmp::To(ret), Jmp::Rel(0));
            }
            // None matched: skip this run's `ret`.
            asm.plain(BPF_JMP_JA, 1);
            asm.bind(ret);
            asm.ret(part[0].0);
        }
    }
    let conditional: Vec<(u32, &Vec<Rule>, Label)> = rules
        .iter()
        .filter(|(_, chain)| chain.first().is_some_and(|r| !r.conds.is_empty()))
        .map(|(nr, chain)| (*nr, chain, asm.label()))
        .collect();
    for (nr, _, block) in &conditional {
        asm.jump_if_eq(*nr, *block);
    }
    asm.ret(default);
    for (_, chain, block) in &conditional {
        asm.bind(*block);
        for rule in chain.iter() {
            let next = asm.label();
            for cond in &rule.conds {
                emit_cond(asm, cond, next);
            }
            asm.ret(rule.action);
            asm.bind(next);
            if rule.conds.is_empty() {
                // Later rules of this syscall can never be reached.
                break;
            }
        }
        asm.ret(default);
    }
    Ok(())
}

/// Emits a 64-bit unsigned comparison of one argument; falls through when it holds and jumps
/// to `fail` otherwise.
fn emit_cond(asm: &mut Asm, c: &Cond, fail: Label) {
    let lo_off = OFF_ARGS + 8 * c.index;
    let hi_off = lo_off + 4;
    let hi = |v: u64| (v >> 32) as u32;
    let lo = |v: u64| v as u32;
    let f = Jmp::To(fail);
    use LinuxSeccompOperator as Op;
    match c.op {
        Op::ScmpCmpEq => {
            asm.load(hi_off);
            asm.jump(BPF_JMP_JEQ_K, hi(c.value), Jmp::Rel(0), f);
            asm.load(lo_off);
            asm.jump(BPF_JMP_JEQ_K, lo(c.value), Jmp::Rel(0), f);
        }
        Op::ScmpCmpNe => {
            asm.load(hi_off);
            // High halves differ: the condition holds; skip the low-half test.
            asm.jump(BPF_JMP_JEQ_K, hi(c.value), Jmp::Rel(0), Jmp::Rel(2));
            asm.load(lo_off);
            asm.jump(BPF_JMP_JEQ_K, lo(c.value), f, Jmp::Rel(0));
        }
        Op::ScmpCmpGt | Op::ScmpCmpGe => {
            let lo_op = if c.op == Op::ScmpCmpGt {
                BPF_JMP_JGT_K
            } else {
                BPF_JMP_JGE_K
            };
            asm.load(hi_off);
            asm.jump(BPF_JMP_JGT_K, hi(c.value), Jmp::Rel(3), Jmp::Rel(0));
            asm.jump(BPF_JMP_JEQ_K, hi(c.value), Jmp::Rel(0), f);
            asm.load(lo_off);
            asm.jump(lo_op, lo(c.value), Jmp::Rel(0), f);
        }
        Op::ScmpCmpLt | Op::ScmpCmpLe => {
            // a < v is !(a >= v); a <= v is !(a > v).
            let lo_op = if c.op == Op::ScmpCmpLt {
                BPF_JMP_JGE_K
            } else {
                BPF_JMP_JGT_K
            };
            asm.load(hi_off);
            asm.jump(BPF_JMP_JGT_K, hi(c.value), f, Jmp::Rel(0));
            asm.jump(BPF_JMP_JEQ_K, hi(c.value), Jmp::Rel(0), Jmp::Rel(2));
            asm.load(lo_off);
            asm.jump(lo_op, lo(c.value), f, Jmp::Rel(0));
        }
        Op::ScmpCmpMaskedEq => {
            asm.load(hi_off);
            asm.alu_and(hi(c.value));
            asm.jump(BPF_JMP_JEQ_K, hi(c.value_two), Jmp::Rel(0), f);
            asm.load(lo_off);
            asm.alu_and(lo(c.value));
            asm.jump(BPF_JMP_JEQ_K, lo(c.value_two), Jmp::Rel(0), f);
        }
    }
}

/// Installs a compiled filter on the calling thread (all threads with TSYNC). Call it last
/// before exec, after `PR_SET_NO_NEW_PRIVS` or with CAP_SYS_ADMIN. Async-signal-safe apart from
/// the error path, so it can run in a forked child.
pub fn install(prog: &BpfProgram) -> Result<()> {
    let len =
        u16::try_from(prog.insns.len()).map_err(|_| SeccompError::TooLarge(prog.insns.len()))?;
    let fprog = libc::sock_fprog {
        len,
        // SockFilter has sock_filter's layout; the kernel only reads the program.
        filter: prog.insns.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `len` valid instructions that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            prog.flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(SeccompError::Install(std::io::Error::last_os_error()));
    }
    Ok(())
}

// ---- a small two-pass BPF assembler with forward labels ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Label(usize);

#[derive(Clone, Copy, Debug)]
enum Jmp {
    /// Relative offset from the next instruction.
    Rel(u8),
    To(Label),
}

#[derive(Debug)]
enum Insn {
    Plain(SockFilter),
    Cond { code: u16, k: u32, jt: Jmp, jf: Jmp },
    Always(Label),
}

#[derive(Debug, Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: HashMap<Label, usize>,
    next_label: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.next_label += 1;
        Label(self.next_label)
    }

    fn bind(&mut self, l: Label) {
        self.labels.insert(l, self.insns.len());
    }

    fn plain(&mut self, code: u16, k: u32) {
        self.insns.push(Insn::Plain(SockFilter {
            code,
            jt: 0,
            jf: 0,
            k,
        }));
    }

    fn load(&mut self, off: u32) {
        self.plain(BPF_LD_W_ABS, off);
    }

    fn alu_and(&mut self, k: u32) {
        self.plain(BPF_ALU_AND_K, k);
    }

    fn ret(&mut self, k: u32) {
        self.plain(BPF_RET_K, k);
    }

    fn jump(&mut self, code: u16, k: u32, jt: Jmp, jf: Jmp) {
        self.insns.push(Insn::Cond { code, k, jt, jf });
    }

    // Jumps to far labels go through `ja`, whose offset is 32-bit.
    fn jump_if_eq(&mut self, k: u32, to: Label) {
        self.jump(BPF_JMP_JEQ_K, k, Jmp::Rel(0), Jmp::Rel(1));
        self.insns.push(Insn::Always(to));
    }

    fn jump_unless_eq(&mut self, k: u32, to: Label) {
        self.jump(BPF_JMP_JEQ_K, k, Jmp::Rel(1), Jmp::Rel(0));
        self.insns.push(Insn::Always(to));
    }

    fn jump_if_ge(&mut self, k: u32, to: Label) {
        self.jump(BPF_JMP_JGE_K, k, Jmp::Rel(0), Jmp::Rel(1));
        self.insns.push(Insn::Always(to));
    }

    fn finish(self) -> Result<Vec<SockFilter>> {
        let target = |pc: usize, l: Label| -> Result<usize> {
            let at = self
                .labels
                .get(&l)
                .copied()
                .ok_or(SeccompError::JumpTooFar(usize::MAX))?;
            // Only forward jumps exist in classic BPF.
            at.checked_sub(pc + 1)
                .ok_or(SeccompError::JumpTooFar(usize::MAX))
        };
        let short = |pc: usize, j: Jmp| -> Result<u8> {
            match j {
                Jmp::Rel(n) => Ok(n),
                Jmp::To(l) => {
                    let off = target(pc, l)?;
                    u8::try_from(off).map_err(|_| SeccompError::JumpTooFar(off))
                }
            }
        };
        let mut out = Vec::with_capacity(self.insns.len());
        for (pc, insn) in self.insns.iter().enumerate() {
            out.push(match *insn {
                Insn::Plain(f) => f,
                Insn::Cond { code, k, jt, jf } => SockFilter {
                    code,
                    jt: short(pc, jt)?,
                    jf: short(pc, jf)?,
                    k,
                },
                Insn::Always(l) => {
                    let off = target(pc, l)?;
                    SockFilter {
                        code: BPF_JMP_JA,
                        jt: 0,
                        jf: 0,
                        k: u32::try_from(off).map_err(|_| SeccompError::JumpTooFar(off))?,
                    }
                }
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSyscall, LinuxSyscallBuilder,
    };

    fn rule(names: &[&str], action: LinuxSeccompAction, errno: Option<u32>) -> LinuxSyscall {
        let mut b = LinuxSyscallBuilder::default()
            .names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .action(action);
        if let Some(e) = errno {
            b = b.errno_ret(e);
        }
        b.build().unwrap()
    }

    fn arg(
        index: usize,
        op: LinuxSeccompOperator,
        value: u64,
        two: Option<u64>,
    ) -> LinuxSeccompArg {
        let b = LinuxSeccompArgBuilder::default()
            .index(index)
            .op(op)
            .value(value);
        match two {
            Some(t) => b.value_two(t).build().unwrap(),
            None => b.build().unwrap(),
        }
    }

    fn with_args(mut s: LinuxSyscall, args: Vec<LinuxSeccompArg>) -> LinuxSyscall {
        s.set_args(Some(args));
        s
    }

    fn profile(
        default: LinuxSeccompAction,
        arches: &[Arch],
        rules: Vec<LinuxSyscall>,
    ) -> LinuxSeccomp {
        LinuxSeccompBuilder::default()
            .default_action(default)
            .architectures(arches.to_vec())
            .syscalls(rules)
            .build()
            .unwrap()
    }

    /// Runs a classic BPF program on a seccomp_data, as the kernel would.
    fn run(prog: &BpfProgram, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let insns = prog.instructions();
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let f = insns[pc];
            pc += 1;
            match f.code {
                BPF_LD_W_ABS => {
                    let o = f.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                BPF_ALU_AND_K => acc &= f.k,
                BPF_RET_K => return f.k,
                BPF_JMP_JA => pc += f.k as usize,
                BPF_JMP_JEQ_K | BPF_JMP_JGT_K | BPF_JMP_JGE_K => {
                    let taken = match f.code {
                        BPF_JMP_JEQ_K => acc == f.k,
                        BPF_JMP_JGT_K => acc > f.k,
                        _ => acc >= f.k,
                    };
                    pc += if taken { f.jt } else { f.jf } as usize;
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    const X64: u32 = AUDIT_ARCH_X86_64;
    const EPERM_RET: u32 = RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn table_is_sorted_and_matches_libc() {
        for t in [syscalls::X86_64, syscalls::X32, syscalls::I386] {
            assert!(t.windows(2).all(|w| w[0].0 < w[1].0), "table not sorted");
        }
        assert_eq!(syscall_number("read"), Some(0));
        assert_eq!(syscall_number("getpid"), Some(libc::SYS_getpid as u32));
        assert_eq!(syscall_number("mkdir"), Some(libc::SYS_mkdir as u32));
        assert_eq!(
            syscall_number("personality"),
            Some(libc::SYS_personality as u32)
        );
        assert_eq!(syscall_number("clone3"), Some(libc::SYS_clone3 as u32));
        assert_eq!(syscall_number("mseal"), Some(462));
        assert_eq!(Abi::I386.lookup("read"), Some(3));
        assert_eq!(Abi::X32.lookup("rt_sigaction"), Some(512 | X32_SYSCALL_BIT));
        assert_eq!(Abi::X32.lookup("read"), Some(X32_SYSCALL_BIT));
        assert_eq!(syscall_number("no_such_syscall"), None);
    }

    #[test]
    fn dispatch_by_arch_and_x32_bit() {
        let getpid = libc::SYS_getpid as u32;
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[Arch::ScmpArchX86_64],
            vec![rule(
                &["getpid"],
                LinuxSeccompAction::ScmpActErrno,
                Some(13),
            )],
        ))
        .unwrap();
        assert_eq!(run(&p, X64, getpid, [0; 6]), RET_ERRNO | 13);
        assert_eq!(run(&p, X64, 0, [0; 6]), RET_ALLOW);
        // x32 and i386 calls are not allowed by a filter that lists only x86_64.
        assert_eq!(run(&p, X64, X32_SYSCALL_BIT | 39, [0; 6]), RET_BAD_ARCH);
        assert_eq!(run(&p, AUDIT_ARCH_I386, 20, [0; 6]), RET_BAD_ARCH);
        assert_eq!(run(&p, 0xc000_00b7, 0, [0; 6]), RET_BAD_ARCH);

        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
            vec![rule(
                &["getpid", "rt_sigaction"],
                LinuxSeccompAction::ScmpActErrno,
                None,
            )],
        ))
        .unwrap();
        assert_eq!(run(&p, X64, 39, [0; 6]), EPERM_RET);
        assert_eq!(run(&p, X64, 13, [0; 6]), EPERM_RET);
        assert_eq!(run(&p, X64, X32_SYSCALL_BIT | 39, [0; 6]), EPERM_RET);
        assert_eq!(run(&p, X64, X32_SYSCALL_BIT | 512, [0; 6]), EPERM_RET);
        // x32's rt_sigaction is 512, so the 64-bit number is not it.
        assert_eq!(run(&p, X64, X32_SYSCALL_BIT | 13, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, AUDIT_ARCH_I386, 20, [0; 6]), EPERM_RET);
        assert_eq!(run(&p, AUDIT_ARCH_I386, 174, [0; 6]), EPERM_RET);
        assert_eq!(run(&p, AUDIT_ARCH_I386, 39, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, 0xc000_00b7, 39, [0; 6]), RET_BAD_ARCH);
    }

    #[test]
    fn enosys_for_syscalls_newer_than_the_profile() {
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActErrno,
            &[],
            vec![rule(
                &["read", "write", "openat"],
                LinuxSeccompAction::ScmpActAllow,
                None,
            )],
        ))
        .unwrap();
        assert_eq!(run(&p, X64, 0, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, X64, 257, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, X64, 39, [0; 6]), EPERM_RET);
        assert_eq!(run(&p, X64, 258, [0; 6]), RET_ERRNO | libc::ENOSYS as u32);
        // No stub when everything unknown is allowed anyway.
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[],
            vec![rule(&["read"], LinuxSeccompAction::ScmpActErrno, None)],
        ))
        .unwrap();
        assert_eq!(run(&p, X64, 400, [0; 6]), RET_ALLOW);
    }

    #[test]
    fn actions_map_to_kernel_return_values() {
        use LinuxSeccompAction as A;
        let cases = [
            (A::ScmpActKill, RET_KILL_THREAD),
            (A::ScmpActKillThread, RET_KILL_THREAD),
            (A::ScmpActKillProcess, RET_KILL_PROCESS),
            (A::ScmpActTrap, RET_TRAP),
            (A::ScmpActLog, RET_LOG),
            (A::ScmpActTrace, RET_TRACE | libc::EPERM as u32),
            (A::ScmpActErrno, EPERM_RET),
        ];
        for (action, want) in cases {
            let p = compile(&profile(
                A::ScmpActAllow,
                &[],
                vec![rule(&["getpid"], action, None)],
            ))
            .unwrap();
            assert_eq!(run(&p, X64, 39, [0; 6]), want, "{action}");
        }
        let mut s = profile(A::ScmpActErrno, &[], vec![]);
        s.set_default_errno_ret(Some(38));
        let p = compile(&s).unwrap();
        assert_eq!(run(&p, X64, 39, [0; 6]), RET_ERRNO | 38);
        let p = compile(&profile(
            A::ScmpActAllow,
            &[],
            vec![rule(&["getpid"], A::ScmpActTrace, Some(5))],
        ))
        .unwrap();
        assert_eq!(run(&p, X64, 39, [0; 6]), RET_TRACE | 5);
    }

    #[test]
    fn argument_comparisons_are_64_bit_unsigned() {
        use LinuxSeccompOperator as Op;
        let big = 0x1_0000_0005u64;
        // (op, value, valueTwo, probe, matches)
        let cases: &[(Op, u64, Option<u64>, u64, bool)] = &[
            (Op::ScmpCmpEq, 5, None, 5, true),
            (Op::ScmpCmpEq, 5, None, big, false),
            (Op::ScmpCmpEq, big, None, big, true),
            (Op::ScmpCmpNe, 5, None, 5, false),
            (Op::ScmpCmpNe, 5, None, big, true),
            (Op::ScmpCmpNe, 5, None, 6, true),
            (Op::ScmpCmpGt, 5, None, 6, true),
            (Op::ScmpCmpGt, 5, None, 5, false),
            (Op::ScmpCmpGt, big, None, 6, false),
            (Op::ScmpCmpGt, 6, None, big, true),
            (Op::ScmpCmpGe, 5, None, 5, true),
            (Op::ScmpCmpGe, 5, None, 4, false),
            (Op::ScmpCmpGe, big, None, big + 1, true),
            (Op::ScmpCmpLt, 5, None, 4, true),
            (Op::ScmpCmpLt, 5, None, 5, false),
            (Op::ScmpCmpLt, big, None, 7, true),
            (Op::ScmpCmpLt, 7, None, big, false),
            (Op::ScmpCmpLt, 0, None, u64::MAX, false),
            (Op::ScmpCmpLe, 5, None, 5, true),
            (Op::ScmpCmpLe, 5, None, 6, false),
            (Op::ScmpCmpLe, big, None, 0xffff_ffff, true),
            (Op::ScmpCmpMaskedEq, 0xff00, Some(0x1200), 0x12ab, true),
            (Op::ScmpCmpMaskedEq, 0xff00, Some(0x1200), 0x13ab, false),
            (
                Op::ScmpCmpMaskedEq,
                0xff00_0000_0000,
                Some(0),
                0x0100_0000_0000,
                false,
            ),
            (Op::ScmpCmpMaskedEq, 0xff00_0000_0000, Some(0), 0x00ff, true),
        ];
        for &(op, value, two, probe, matches) in cases {
            for index in [0usize, 5] {
                let p = compile(&profile(
                    LinuxSeccompAction::ScmpActAllow,
                    &[],
                    vec![with_args(
                        rule(&["getppid"], LinuxSeccompAction::ScmpActErrno, None),
                        vec![arg(index, op, value, two)],
                    )],
                ))
                .unwrap();
                let mut args = [0u64; 6];
                args[index] = probe;
                let want = if matches { EPERM_RET } else { RET_ALLOW };
                assert_eq!(
                    run(&p, X64, libc::SYS_getppid as u32, args),
                    want,
                    "{op} value {value:#x} two {two:?} probe {probe:#x} arg {index}"
                );
            }
        }
    }

    #[test]
    fn conditions_and_across_args_or_within_one_arg() {
        use LinuxSeccompOperator as Op;
        let nr = libc::SYS_getppid as u32;
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[],
            vec![with_args(
                rule(&["getppid"], LinuxSeccompAction::ScmpActErrno, None),
                vec![
                    arg(0, Op::ScmpCmpEq, 1, None),
                    arg(1, Op::ScmpCmpEq, 2, None),
                ],
            )],
        ))
        .unwrap();
        assert_eq!(run(&p, X64, nr, [1, 2, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(run(&p, X64, nr, [1, 3, 0, 0, 0, 0]), RET_ALLOW);
        // Same argument twice: runc turns each into its own rule, so either matches.
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[],
            vec![with_args(
                rule(&["getppid"], LinuxSeccompAction::ScmpActErrno, None),
                vec![
                    arg(0, Op::ScmpCmpEq, 1, None),
                    arg(0, Op::ScmpCmpEq, 2, None),
                ],
            )],
        ))
        .unwrap();
        assert_eq!(run(&p, X64, nr, [1, 0, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(run(&p, X64, nr, [2, 0, 0, 0, 0, 0]), EPERM_RET);
        assert_eq!(run(&p, X64, nr, [3, 0, 0, 0, 0, 0]), RET_ALLOW);
    }

    #[test]
    fn bad_specs_are_named_in_errors() {
        use LinuxSeccompAction as A;
        let e = compile(&profile(A::ScmpActAllow, &[Arch::ScmpArchAarch64], vec![])).unwrap_err();
        assert!(e.to_string().contains("SCMP_ARCH_AARCH64"), "{e}");
        let e = compile(&profile(
            A::ScmpActAllow,
            &[],
            vec![rule(&["getpid"], A::ScmpActNotify, None)],
        ))
        .unwrap_err();
        assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
        assert!(e.to_string().contains("getpid"), "{e}");
        let e = compile(&profile(
            A::ScmpActAllow,
            &[],
            vec![rule(&["getpid"], A::ScmpActKill, Some(1))],
        ))
        .unwrap_err();
        assert!(
            matches!(e, SeccompError::ErrnoWithoutErrnoAction { .. }),
            "{e}"
        );
        let e = compile(&profile(
            A::ScmpActAllow,
            &[],
            vec![rule(&["getpid"], A::ScmpActErrno, Some(70000))],
        ))
        .unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
        let e = compile(&profile(
            A::ScmpActAllow,
            &[],
            vec![with_args(
                rule(&["getpid"], A::ScmpActErrno, None),
                vec![arg(6, LinuxSeccompOperator::ScmpCmpEq, 0, None)],
            )],
        ))
        .unwrap_err();
        assert!(e.to_string().contains("index 6"), "{e}");
        let mut s = profile(A::ScmpActAllow, &[], vec![]);
        s.set_listener_path(Some("/run/seccomp.sock".into()));
        assert!(matches!(compile(&s), Err(SeccompError::NotifyUnsupported)));
    }

    #[test]
    fn unknown_names_are_skipped() {
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[Arch::ScmpArchX86_64, Arch::ScmpArchX86],
            vec![rule(
                &["no_such_syscall", "getpid", "arch_prctl", "socketcall"],
                LinuxSeccompAction::ScmpActErrno,
                None,
            )],
        ))
        .unwrap();
        // socketcall exists on i386 only, so it is not reported as unknown.
        assert_eq!(p.skipped_syscalls(), ["no_such_syscall"]);
        assert_eq!(run(&p, X64, 39, [0; 6]), EPERM_RET);
        assert_eq!(run(&p, AUDIT_ARCH_I386, 102, [0; 6]), EPERM_RET);
    }

    #[test]
    fn docker_sized_profile_fits() {
        // Every x86_64 syscall in one entry, plus a conditional rule: must stay under 4096.
        let names: Vec<&str> = syscalls::X86_64.iter().map(|(n, _)| *n).collect();
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActErrno,
            &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
            vec![rule(&names, LinuxSeccompAction::ScmpActAllow, None)],
        ))
        .unwrap();
        assert!(
            p.instructions().len() < BPF_MAXINSNS,
            "{}",
            p.instructions().len()
        );
        assert_eq!(run(&p, X64, 0, [0; 6]), RET_ALLOW);
        assert_eq!(run(&p, X64, 9999, [0; 6]), RET_ERRNO | libc::ENOSYS as u32);
        // The kernel's checker accepts it, and everything named still works.
        let status = in_child(&p, || match sys(libc::SYS_getppid, 0) {
            Ok(_) => 0,
            Err(_) => 1,
        });
        assert_eq!(exit_code(status), 0);
        eprintln!(
            "all-syscalls profile: {} instructions",
            p.instructions().len()
        );
    }

    // ---- real installs, each in a forked child (a filter cannot be removed) ----

    /// Forks; the child sets no_new_privs, installs `prog`, runs `body` and exits with its
    /// return value. Returns the child's wait status.
    fn in_child(prog: &BpfProgram, body: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only makes raw syscalls and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: plain prctl/syscalls in the child.
            unsafe {
                // No core files from the SIGSYS kill test.
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(100);
                }
                if install(prog).is_err() {
                    libc::_exit(101);
                }
                libc::_exit(body());
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid);
        status
    }

    fn exit_code(status: i32) -> i32 {
        assert!(
            libc::WIFEXITED(status),
            "child did not exit normally: {status:#x}"
        );
        libc::WEXITSTATUS(status)
    }

    fn errno() -> i32 {
        // SAFETY: reads this thread's errno.
        unsafe { *libc::__errno_location() }
    }

    /// `syscall(nr, args)`: Ok(ret) or Err(errno).
    fn sys(nr: libc::c_long, a0: u64) -> std::result::Result<i64, i32> {
        // SAFETY: only harmless syscalls are made through this in tests.
        let r = unsafe { libc::syscall(nr, a0) };
        if r < 0 { Err(errno()) } else { Ok(r) }
    }

    #[test]
    fn installed_filter_fails_getpid_and_mkdir_with_errno() {
        let dir = tempfile::tempdir().unwrap();
        let path =
            std::ffi::CString::new(dir.path().join("d").into_os_string().into_encoded_bytes())
                .unwrap();
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[Arch::ScmpArchX86_64],
            vec![
                rule(
                    &["getpid", "no_such_call"],
                    LinuxSeccompAction::ScmpActErrno,
                    Some(libc::EPERM as u32),
                ),
                rule(
                    &["mkdir", "mkdirat"],
                    LinuxSeccompAction::ScmpActErrno,
                    Some(libc::ENOSPC as u32),
                ),
            ],
        ))
        .unwrap();
        assert_eq!(p.skipped_syscalls(), ["no_such_call"]);
        let status = in_child(&p, || {
            if sys(libc::SYS_getpid, 0) != Err(libc::EPERM) {
                return 1;
            }
            // SAFETY: mkdir on a NUL-terminated path.
            let r = unsafe { libc::mkdir(path.as_ptr(), 0o755) };
            if r != -1 || errno() != libc::ENOSPC {
                return 2;
            }
            if sys(libc::SYS_getppid, 0).is_err() {
                return 3;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
        assert!(!dir.path().join("d").exists(), "mkdir got through");
    }

    #[test]
    fn installed_filter_checks_arguments() {
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
            vec![with_args(
                rule(&["personality"], LinuxSeccompAction::ScmpActErrno, None),
                vec![arg(0, LinuxSeccompOperator::ScmpCmpEq, 0xffff_ffff, None)],
            )],
        ))
        .unwrap();
        let status = in_child(&p, || {
            if sys(libc::SYS_personality, 0xffff_ffff) != Err(libc::EPERM) {
                return 1;
            }
            if sys(libc::SYS_personality, 0).is_err() {
                return 2;
            }
            // The kernel truncates to 0xffffffff, but the filter compares all 64 bits.
            if sys(libc::SYS_personality, 0x1_ffff_ffff).is_err() {
                return 3;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }

    #[test]
    fn installed_kill_process_and_default_errno() {
        let p = compile(&profile(
            LinuxSeccompAction::ScmpActAllow,
            &[],
            vec![rule(
                &["getppid"],
                LinuxSeccompAction::ScmpActKillProcess,
                None,
            )],
        ))
        .unwrap();
        let status = in_child(&p, || {
            let _ = sys(libc::SYS_getppid, 0);
            0
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);

        // Allow-list with default ERRNO(EACCES); the child needs exit_group to finish.
        let mut s = profile(
            LinuxSeccompAction::ScmpActErrno,
            &[],
            vec![rule(
                &["exit_group", "exit", "getppid"],
                LinuxSeccompAction::ScmpActAllow,
                None,
            )],
        );
        s.set_default_errno_ret(Some(libc::EACCES as u32));
        let p = compile(&s).unwrap();
        let status = in_child(&p, || {
            if sys(libc::SYS_getpid, 0) != Err(libc::EACCES) {
                return 1;
            }
            if sys(libc::SYS_getppid, 0).is_err() {
                return 2;
            }
            // Above the profile's highest syscall: ENOSYS, as runc does.
            if sys(libc::SYS_clone3, 0) != Err(libc::ENOSYS) {
                return 3;
            }
            0
        });
        assert_eq!(exit_code(status), 0);
    }
}
