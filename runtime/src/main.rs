//! `husk`: a runc-compatible OCI runtime that runs every container in its own micro-VM.
//! See docs/cli.md.

mod cli;

fn main() {
    // The VMM process (started by this binary's own monitor): before anything else runs,
    // so that it is still single-threaded when it enters its jail.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == husk_jailer::SUBCOMMAND) {
        husk_jailer::entry::main(&args[2..]);
    }
    std::process::exit(cli::main());
}
