//! Giving up root for good, once the VM's files are open.

use std::io;

use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(option, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn named(what: &'static str) -> impl Fn(nix::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// Becomes `uid:gid` with no supplementary groups and no capabilities, under
/// `no_new_privs`, not dumpable (no ptrace by the same uid, no core file with guest memory),
/// with at most `max_open_files` descriptors. Checks that root cannot be regained.
///
/// Must be called while the process has one thread: the new ids and rlimits are the
/// process's, and no thread may run under the old ones.
pub fn drop_to(uid: u32, gid: u32, max_open_files: u64) -> io::Result<()> {
    if uid == 0 || gid == 0 {
        return Err(io::Error::other("refusing to 'drop' to uid or gid 0"));
    }
    setrlimit(Resource::RLIMIT_NOFILE, max_open_files, max_open_files)
        .map_err(named("setrlimit(RLIMIT_NOFILE)"))?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(named("setrlimit(RLIMIT_CORE)"))?;
    prctl(libc::PR_SET_DUMPABLE, 0)?;
    // Capabilities go with the uid change only without keep-caps.
    prctl(libc::PR_SET_KEEPCAPS, 0)?;
    setgroups(&[]).map_err(named("setgroups([])"))?;
    let (g, u) = (Gid::from_raw(gid), Uid::from_raw(uid));
    setresgid(g, g, g).map_err(named("setresgid"))?;
    setresuid(u, u, u).map_err(named("setresuid"))?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)?;
    let root = Uid::from_raw(0);
    if setresuid(root, root, root).is_ok() {
        return Err(io::Error::other(
            "the VMM could become root again after dropping it",
        ));
    }
    Ok(())
}
