//! `husk-vmm`: see `husk-vmm --help` and the crate docs for the exit statuses.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use husk_vmm::config::Cli;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    let config = match cli.into_vm_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            return ExitCode::from(1);
        }
    };
    let filter = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("husk-vmm: --log-level {}: {e}", config.log_level);
            return ExitCode::from(1);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    match husk_vmm::vm::run(&config, start) {
        Ok(reason) => {
            let code = reason.exit_code();
            if code == 0 {
                tracing::info!("VM stopped: {}", reason.label());
            } else {
                eprintln!("husk-vmm: VM stopped: {}", reason.label());
            }
            // Exit without unwinding: vCPU threads are still inside KVM_RUN.
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("husk-vmm: {}", husk_vmm::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
