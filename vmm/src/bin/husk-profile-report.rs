//! `husk-profile-report FILE [--top N]`: the top-N table of a `husk-vmm --profile FILE`
//! profile (symbol, samples, share), then the exit-count tables of FILE.exits.txt.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use husk_vmm::profile::{exits_path, folded};

/// Prints the top symbols of a husk-vmm guest profile and its exit counts.
#[derive(Parser, Debug)]
#[command(name = "husk-profile-report", version)]
struct Args {
    /// The folded-stack file written by `husk-vmm --profile FILE`.
    file: PathBuf,
    /// How many rows of the top table.
    #[arg(long, default_value_t = 25)]
    top: usize,
    /// Leave out the exit counts (FILE.exits.txt).
    #[arg(long)]
    no_exits: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let text = match std::fs::read_to_string(&args.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("husk-profile-report: {}: {e}", args.file.display());
            return ExitCode::from(1);
        }
    };
    let stacks = match folded::parse(&text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("husk-profile-report: {}: {e}", args.file.display());
            return ExitCode::from(1);
        }
    };
    println!("## top {} of {}", args.top, args.file.display());
    print!("{}", folded::top_table(&stacks, args.top));
    if !args.no_exits {
        let exits = exits_path(&args.file);
        match std::fs::read_to_string(&exits) {
            Ok(t) => print!("\n{t}"),
            Err(e) => eprintln!("husk-profile-report: {}: {e}", exits.display()),
        }
    }
    ExitCode::SUCCESS
}
