//! `containerd-shim-husk-v2`: containerd's runtime v2 shim for husk (runtime_type
//! `io.containerd.husk.v2`). Every container gets its own KVM micro-VM; its VMM is a jailed
//! process (this binary again, see `husk_jailer`), the container inside the VM under the husk agent.
//!
//! containerd runs this binary three ways (see `bootstrap`):
//! - `start`: spawn the long-lived shim server and print its socket address;
//! - (no action, `-socket` given): be that server, serving the task API;
//! - `delete`: clean up after a shim that is gone.

mod bootstrap;
mod cleanup;
mod container;
mod creating;
mod error;
mod events;
mod guest_mapping;
mod logging;
mod network;
mod oom;
mod pod;
mod rootfs;
mod sandbox;
mod service;
mod share;
mod stdio;
mod template;
mod vm;

use std::process::ExitCode;

use husk_shim::stats;

/// The runtime name containerd knows this shim by.
pub const RUNTIME_NAME: &str = "io.containerd.husk.v2";

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The VMM process of this shim's VM (`sandbox`): single-threaded still, as its jail
    // needs.
    if args.get(1).is_some_and(|a| a == husk_jailer::SUBCOMMAND) {
        husk_jailer::entry::main(&args[2..]);
    }
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{RUNTIME_NAME}: bad arguments: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.version {
        println!(
            "{RUNTIME_NAME} (containerd-shim-husk-v2) {}",
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    let result = if flags.info {
        bootstrap::print_info()
    } else {
        match flags.action.as_str() {
            "start" => bootstrap::start(&flags),
            "delete" => cleanup::delete(&flags),
            "" => bootstrap::serve(&flags),
            other => Err(anyhow::anyhow!(
                "unknown action {other:?}: expected start, delete, or none (serve)"
            )),
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("{RUNTIME_NAME}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
