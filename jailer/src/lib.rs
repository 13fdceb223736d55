//! The VMM as a confined process of its own, in the manner of Firecracker's jailer.
//!
//! The runtime (the CLI's monitor, the containerd shim) does not run a VM in its own
//! process: it starts its own binary again as `<exe> __vmm` ([`launch`]), which
//! - enters new mount, PID, IPC and UTS namespaces; a supervisor stays outside and
//!   relays the exit status, the VMM becomes PID 1 of its PID namespace ([`enter`]);
//! - mounts a tmpfs on a per-VM folder and binds into it, at their own paths, exactly the
//!   files the VM's configuration names (kernel, initramfs or snapshot, images, the
//!   folders of its sockets, netns files) plus the device nodes it opens, then makes that
//!   its root with `pivot_root` ([`spec`]);
//! - builds the VM as root inside that root, and before the VM's first thread starts gives up
//!   root for good: an unprivileged uid and gid, no supplementary groups, no capabilities,
//!   `no_new_privs`, not dumpable, no core files, a bound on open files ([`privileges`]);
//!   then the per-thread seccomp filters of `husk_vmm::seccomp` apply as before.
//!
//! Boot and snapshot restore take the same path: the launch differs only in its VMM
//! arguments, from which the jail's contents are derived.

pub mod enter;
pub mod entry;
pub mod launch;
pub mod privileges;
pub mod spec;

pub use entry::SUBCOMMAND;
pub use launch::{LaunchError, VmmLog, VmmProcess};
pub use spec::{Bind, BindKind, JailSpec, SpecError};
