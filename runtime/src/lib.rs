//! Host side of husk: the runc-compatible `husk` CLI and `containerd-shim-husk-v2`.
//!
//! Both arrive in their own issues; this crate exists so that the workspace layout is final.
