//! Generates the agent API (messages + ttrpc client/server) from `proto/agent.proto`.
//! ttrpc-codegen parses the proto in pure Rust, so no `protoc` is needed.

use std::path::Path;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");

    Codegen::new()
        .out_dir(&out_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc-codegen failed on proto/agent.proto");

    // The generated files open with inner attributes (`#![...]`, `//!`), which
    // `include!` rejects; drop those lines, lib.rs sets the equivalent allows itself.
    for file in ["agent.rs", "agent_ttrpc.rs"] {
        let path = Path::new(&out_dir).join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading generated {}: {e}", path.display()));
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
            .collect();
        std::fs::write(&path, kept.join("\n"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
