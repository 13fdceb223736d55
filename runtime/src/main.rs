//! `husk`: a runc-compatible OCI runtime that runs every container in its own micro-VM.
//! See docs/cli.md.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
