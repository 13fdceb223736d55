//! Exec into a running container: a new process that joins every namespace of the
//! container's init (through `/proc/<pid>/ns/*`), its cgroup, and gets the container's
//! seccomp filter, with its own user, capabilities, rlimits, env and cwd.

use nix::unistd::Pid;
use oci_spec::runtime::Process;

use crate::container::{Container, ProcessHandle, Spawner, Status};
use crate::error::{Error, Result};
use crate::init::{self, ChildPlan, Stdio};
use crate::namespaces::open_process_namespaces;
use crate::process::ProcessPlan;
use crate::sync::{self, Msg};

impl Container {
    /// Starts `process` inside the running container. Returns once the program has been
    /// exec'd (or setup failed: then nothing is left running). The spawner's handle
    /// receives the exit status.
    pub fn exec<S: Spawner>(
        &self,
        process: &Process,
        stdio: Stdio,
        spawner: &S,
    ) -> Result<(ProcessHandle, S::Handle)> {
        if self.status() != Status::Running {
            return Err(Error::State {
                id: self.id.clone(),
                reason: "cannot exec: the container is not running".into(),
            });
        }
        let mut timeline = crate::timing::Timeline::start();
        let plan = ProcessPlan::from_spec(process, "process")?;
        if plan.terminal && !matches!(stdio, Stdio::Terminal) {
            return Err(Error::invalid(
                "process.terminal",
                "true, but the caller passed no terminal",
            ));
        }
        // Opened now, from the agent: if the init is replaced by another process with
        // the same pid between here and the check below, its namespaces are not used.
        let join = open_process_namespaces(self.init.pid())?;
        if self.init.exited() {
            return Err(Error::State {
                id: self.id.clone(),
                reason: "cannot exec: the container stopped".into(),
            });
        }
        let child_plan = ChildPlan {
            join: &join,
            new_namespaces: nix::sched::CloneFlags::empty(),
            new_cgroup_ns: false,
            hostname: None,
            domainname: None,
            rootfs: None,
            process: &plan,
            stdio: &stdio,
            seccomp: self.seccomp.as_ref(),
            hold: false,
        };
        let (parent, child) = sync::pair()?;
        let mut handle_out = None;
        let (pid, handle) = spawner.spawn(|| {
            let pid: Pid = init::spawn(&child_plan, &parent, child)?;
            handle_out = Some(ProcessHandle::open(pid)?);
            Ok(pid)
        })?;
        let mut proc_handle =
            handle_out.ok_or_else(|| Error::Setup(format!("no pidfd for {pid}")))?;
        timeline.mark("plan, spawn (namespaces joined, fork, clone)");
        let terminal = matches!(stdio, Stdio::Terminal);
        let result = (|| {
            if let Some(cg) = &self.cgroup {
                cg.add_process(pid)?;
            }
            timeline.mark("cgroup join");
            parent.send(&Msg::Go)?;
            proc_handle.await_setup(&parent, false, terminal, "exec", &mut timeline)
        })();
        match result {
            Ok(()) => {
                proc_handle.steps = timeline.into_steps();
                Ok((proc_handle, handle))
            }
            Err(e) => {
                proc_handle.kill_and_wait();
                Err(e)
            }
        }
    }
}
