//! The container process's identity and limits: user and groups, the five capability
//! sets, rlimits, no_new_privileges, environment, cwd, and finally execve. The plan is
//! built and checked in the agent; the child applies it.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::errno::Errno;
use oci_spec::runtime::{PosixRlimitType, Process};

use crate::error::{Error, Result, SysContext};

/// PATH used to find the program when the process environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Default)]
pub struct CapsPlan {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub permitted: CapsHashSet,
    pub ambient: CapsHashSet,
}

#[derive(Debug, Clone)]
pub struct ProcessPlan {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    /// PATH from `env`, used to look the program up inside the container.
    pub search_path: String,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    /// Absent capabilities in the spec mean none at all (as runc does).
    pub caps: CapsPlan,
    pub rlimits: Vec<(RlimitResource, u64, u64)>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
    pub terminal: bool,
}

#[cfg(target_env = "gnu")]
pub type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
pub type RlimitResource = libc::c_int;

fn rlimit_resource(t: PosixRlimitType) -> RlimitResource {
    match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }
}

fn cstring(s: &str, field: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(field, "contains a NUL byte"))
}

fn cap_set(set: &Option<oci_spec::runtime::Capabilities>, field: &str) -> Result<CapsHashSet> {
    let mut out = HashSet::new();
    for cap in set.iter().flatten() {
        let name = format!("CAP_{cap}");
        let parsed: Capability = name
            .parse()
            .map_err(|_| Error::invalid(field, format!("unknown capability {name}")))?;
        out.insert(parsed);
    }
    Ok(out)
}

impl ProcessPlan {
    /// Builds the plan for `process`; `field` names it in errors ("process").
    pub fn from_spec(process: &Process, field: &str) -> Result<Self> {
        crate::spec::validate_process(process, field)?;
        let args = process
            .args()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, a)| cstring(a, &format!("{field}.args[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let env_strs = process.env().as_deref().unwrap_or_default();
        let env = env_strs
            .iter()
            .enumerate()
            .map(|(i, e)| cstring(e, &format!("{field}.env[{i}]")))
            .collect::<Result<Vec<_>>>()?;
        let search_path = env_strs
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_owned();
        let caps = match process.capabilities() {
            None => CapsPlan::default(),
            Some(c) => CapsPlan {
                bounding: cap_set(c.bounding(), &format!("{field}.capabilities.bounding"))?,
                effective: cap_set(c.effective(), &format!("{field}.capabilities.effective"))?,
                inheritable: cap_set(
                    c.inheritable(),
                    &format!("{field}.capabilities.inheritable"),
                )?,
                permitted: cap_set(c.permitted(), &format!("{field}.capabilities.permitted"))?,
                ambient: cap_set(c.ambient(), &format!("{field}.capabilities.ambient"))?,
            },
        };
        let mut rlimits = Vec::new();
        for (i, r) in process
            .rlimits()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if r.soft() > r.hard() {
                return Err(Error::invalid(
                    format!("{field}.rlimits[{i}]"),
                    "soft limit above the hard limit",
                ));
            }
            rlimits.push((rlimit_resource(r.typ()), r.soft(), r.hard()));
        }
        let user = process.user();
        Ok(ProcessPlan {
            args,
            env,
            search_path,
            cwd: process.cwd().clone(),
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
            caps,
            rlimits,
            no_new_privileges: process.no_new_privileges().unwrap_or(false),
            oom_score_adj: process.oom_score_adj(),
            terminal: process.terminal().unwrap_or(false),
        })
    }

    /// Child side, while still fully privileged: rlimits (raising a hard limit needs
    /// CAP_SYS_RESOURCE) and the OOM score.
    pub fn apply_limits(&self) -> Result<()> {
        for &(resource, soft, hard) in &self.rlimits {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: plain syscall on a stack value.
            let rc = unsafe { libc::setrlimit(resource, &lim) };
            Errno::result(rc).sys(|| format!("setrlimit({resource})"))?;
        }
        if let Some(score) = self.oom_score_adj {
            std::fs::write("/proc/self/oom_score_adj", score.to_string())
                .sys(|| "writing oom_score_adj".into())?;
        }
        Ok(())
    }

    /// Child side: the program's path inside the container (PATH lookup as execvp does),
    /// checked before the container reports itself created so a typo fails `create`.
    pub fn find_program(&self) -> Result<CString> {
        let Some(arg0) = self.args.first().and_then(|a| a.to_str().ok()) else {
            return Err(Error::invalid("process.args[0]", "empty or not UTF-8"));
        };
        let candidates: Vec<PathBuf> = if arg0.contains('/') {
            vec![self.cwd.join(arg0)]
        } else {
            self.search_path
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| Path::new(d).join(arg0))
                .collect()
        };
        for c in &candidates {
            if let Ok(meta) = std::fs::metadata(c)
                && meta.is_file()
                && meta.permissions().mode() & 0o111 != 0
            {
                return cstring(&c.to_string_lossy(), "process.args[0]");
            }
        }
        Err(Error::Setup(format!(
            "executable {arg0:?} not found in the container (PATH {})",
            self.search_path
        )))
    }

    /// Child side: bounding set, then groups/gid/uid (keeping capabilities across the
    /// uid change), then the other four sets. The bounding set must go first: dropping
    /// from it needs CAP_SETPCAP, which the final sets usually lack.
    pub fn set_identity(&self) -> Result<()> {
        let c = &self.caps;
        for cap in caps::all() {
            if !c.bounding.contains(&cap)
                && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false)
            {
                caps::drop(None, CapSet::Bounding, cap).map_err(|e| {
                    Error::Setup(format!("dropping {cap} from the bounding set: {e}"))
                })?;
            }
        }
        prctl(libc::PR_SET_KEEPCAPS, 1).sys(|| "PR_SET_KEEPCAPS".into())?;
        let groups: Vec<libc::gid_t> = self.additional_gids.clone();
        // SAFETY: the pointer and length describe `groups`.
        Errno::result(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })
            .sys(|| format!("setgroups({groups:?})"))?;
        // SAFETY: plain syscalls.
        Errno::result(unsafe { libc::setresgid(self.gid, self.gid, self.gid) })
            .sys(|| format!("setresgid({})", self.gid))?;
        Errno::result(unsafe { libc::setresuid(self.uid, self.uid, self.uid) })
            .sys(|| format!("setresuid({})", self.uid))?;
        prctl(libc::PR_SET_KEEPCAPS, 0).sys(|| "PR_SET_KEEPCAPS".into())?;
        // One capset call for the three sets: set one at a time, the kernel would refuse
        // intermediate states (effective outside permitted).
        capset(&c.effective, &c.permitted, &c.inheritable)?;
        caps::clear(None, CapSet::Ambient)
            .map_err(|e| Error::Setup(format!("clearing the ambient set: {e}")))?;
        // The kernel raises an ambient capability only if it is also permitted and
        // inheritable; specs often list ambient caps without inheritable ones (runc's
        // default spec did). runc ignores those failures, and so do we.
        for &cap in &c.ambient {
            let _ = caps::raise(None, CapSet::Ambient, cap);
        }
        Ok(())
    }

    /// Child side: umask, cwd (after the uid change, so the user must be able to enter
    /// it, as runc does) and no_new_privs.
    pub fn finish(&self) -> Result<()> {
        if let Some(mask) = self.umask {
            // SAFETY: plain syscall.
            unsafe { libc::umask(mask & 0o777) };
        }
        nix::unistd::chdir(&self.cwd).sys(|| format!("chdir to cwd {:?}", self.cwd))?;
        if self.no_new_privileges {
            prctl(libc::PR_SET_NO_NEW_PRIVS, 1).sys(|| "PR_SET_NO_NEW_PRIVS".into())?;
        }
        Ok(())
    }

    /// Child side: replaces the process image. Returns only on failure.
    pub fn exec(&self, program: &CString) -> Error {
        match nix::unistd::execve(program, &self.args, &self.env) {
            Err(e) => Error::Sys {
                what: format!("execve {program:?}"),
                source: e,
            },
        }
    }
}

fn cap_mask(set: &CapsHashSet) -> u64 {
    set.iter().fold(0u64, |m, c| m | (1u64 << c.index()))
}

/// capset(2) with the v3 ABI (two 32-bit words per set).
fn capset(
    effective: &CapsHashSet,
    permitted: &CapsHashSet,
    inheritable: &CapsHashSet,
) -> Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const V3: u32 = 0x2008_0522;
    let (e, p, i) = (
        cap_mask(effective),
        cap_mask(permitted),
        cap_mask(inheritable),
    );
    let mut header = Header {
        version: V3,
        pid: 0,
    };
    let data = [
        Data {
            effective: e as u32,
            permitted: p as u32,
            inheritable: i as u32,
        },
        Data {
            effective: (e >> 32) as u32,
            permitted: (p >> 32) as u32,
            inheritable: (i >> 32) as u32,
        },
    ];
    // SAFETY: header and data have the kernel's v3 layout and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    Errno::result(rc)
        .map(drop)
        .sys(|| format!("capset(effective {e:#x}, permitted {p:#x}, inheritable {i:#x})"))
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> nix::Result<()> {
    // SAFETY: the options used here take one integer argument.
    Errno::result(unsafe { libc::prctl(option, arg, 0, 0, 0) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_from_spec() {
        let spec = crate::spec::parse(
            r#"{"process":{"user":{"uid":1000,"gid":100,"additionalGids":[5,6]},"cwd":"/tmp",
            "args":["sh","-c","x"],"env":["A=1","PATH=/bin"],
            "capabilities":{"bounding":["CAP_KILL"],"effective":["CAP_KILL","CAP_CHOWN"]},
            "rlimits":[{"type":"RLIMIT_NOFILE","soft":10,"hard":20}],"noNewPrivileges":true}}"#,
        )
        .unwrap();
        let plan = ProcessPlan::from_spec(spec.process().as_ref().unwrap(), "process").unwrap();
        assert_eq!(plan.search_path, "/bin");
        assert_eq!(plan.additional_gids, vec![5, 6]);
        assert!(plan.caps.effective.contains(&Capability::CAP_CHOWN));
        assert!(plan.caps.bounding.contains(&Capability::CAP_KILL));
        assert!(plan.caps.ambient.is_empty());
        assert_eq!(plan.rlimits, vec![(libc::RLIMIT_NOFILE, 10, 20)]);
        assert!(plan.no_new_privileges);
    }

    #[test]
    fn inverted_rlimit_names_the_entry() {
        let spec = crate::spec::parse(
            r#"{"process":{"user":{"uid":0,"gid":0},"cwd":"/","args":["x"],
            "rlimits":[{"type":"RLIMIT_NOFILE","soft":30,"hard":20}]}}"#,
        )
        .unwrap();
        let err = ProcessPlan::from_spec(spec.process().as_ref().unwrap(), "process").unwrap_err();
        assert!(err.to_string().contains("process.rlimits[0]"), "{err}");
    }
}
