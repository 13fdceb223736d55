//! husk's guest agent API and the host-side client that reaches it.
//!
//! - [`agent`]: protobuf messages of `husk.agent.v1` (generated from `proto/agent.proto`).
//! - [`agent_ttrpc`]: the generated ttrpc service trait (`AgentService`), its
//!   registration function (`create_agent_service`) and raw client (`AgentServiceClient`).
//! - [`client`]: connecting to an agent through the VMM's hybrid-vsock socket or a
//!   plain Unix socket, with retries while the VM boots.
//! - [`steps`]: the agent's per-step timings of a container's creation, start or exec.

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The guest vsock port of the stdio streams (see [`stdio`]).
pub const STDIO_VSOCK_PORT: u32 = 1025;

#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    dead_code,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    unused_mut,
    unused_qualifications,
    missing_docs,
    unreachable_pub
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    unused_imports,
    dead_code,
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    unused_mut,
    unused_qualifications,
    missing_docs,
    unreachable_pub
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod client;
#[doc(hidden)]
pub mod fuzzing;
pub mod reply_bound;
pub mod stdio;
pub mod steps;

pub use ttrpc;
