//! The OCI state document (`husk state`, hooks' stdin, `list --format json`).

use serde_json::{Value, json};

use husk_runtime::state::ContainerState;

/// OCI runtime-spec version of the state document.
pub const OCI_VERSION: &str = "1.0.2";

/// The state JSON of a container, with its real status and pid.
pub fn document(st: &ContainerState) -> Value {
    json!({
        "ociVersion": OCI_VERSION,
        "id": st.id,
        "pid": st.effective_pid(),
        "status": st.effective_status().as_str(),
        "bundle": st.bundle,
        "rootfs": st.rootfs,
        "created": st.created,
        "owner": st.owner,
        "annotations": st.annotations,
    })
}
