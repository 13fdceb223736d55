//! Which VM a container belongs in, from the annotations containerd's CRI plugin puts on
//! every container's spec: a pod's sandbox (pause) container starts a shim and a VM of its
//! own; the pod's other containers go to that shim and run in that VM. A container without
//! CRI annotations (`ctr run`, another client) gets a VM of its own.

use std::collections::HashMap;

/// CRI's annotation naming the container's role in its pod.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod (the sandbox container's id) of a container.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// CRI's pod-level limits on the sandbox container (containerd ≥ 1.6.7, from the kubelet's
/// PodSandboxConfig: the sum of the containers' limits and the pod overhead).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";

/// The sandbox spec with the pod's limits (CRI's sandbox annotations) as its
/// `linux.resources`, where the spec itself has none, so that the VM is sized for the pod:
/// the pause container has no limits of its own.
pub fn with_pod_limits(raw: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Value, json};
    let mut spec = raw.clone();
    let annotation = |k: &str| -> Option<i64> {
        raw.pointer("/annotations")
            .and_then(|a| a.get(k))
            .and_then(Value::as_str)
            .and_then(|v| v.trim().parse().ok())
            .filter(|v: &i64| *v > 0)
    };
    let Some(obj) = spec.as_object_mut() else {
        return spec;
    };
    let linux = obj.entry("linux").or_insert_with(|| json!({}));
    let Some(linux) = linux.as_object_mut() else {
        return spec;
    };
    let resources = linux.entry("resources").or_insert_with(|| json!({}));
    let Some(resources) = resources.as_object_mut() else {
        return spec;
    };
    if let Some(limit) = annotation(SANDBOX_MEMORY) {
        let memory = resources.entry("memory").or_insert_with(|| json!({}));
        if let Some(m) = memory.as_object_mut()
            && m.get("limit")
                .and_then(Value::as_i64)
                .is_none_or(|l| l <= 0)
        {
            m.insert("limit".into(), json!(limit));
        }
    }
    if let (Some(quota), Some(period)) = (
        annotation(SANDBOX_CPU_QUOTA),
        annotation(SANDBOX_CPU_PERIOD),
    ) {
        let cpu = resources.entry("cpu").or_insert_with(|| json!({}));
        if let Some(c) = cpu.as_object_mut()
            && c.get("quota")
                .and_then(Value::as_i64)
                .is_none_or(|q| q <= 0)
        {
            c.insert("quota".into(), json!(quota));
            c.insert("period".into(), json!(period));
        }
    }
    spec
}

/// A container's place, as its spec's annotations say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A pod's sandbox container: its shim owns the pod's VM.
    Sandbox,
    /// A container of the pod whose sandbox container is `sandbox_id`.
    PodMember { sandbox_id: String },
    /// Not part of a pod: a VM of its own.
    Standalone,
}

impl Role {
    pub fn from_annotations(annotations: Option<&HashMap<String, String>>) -> Role {
        let get = |k: &str| {
            annotations
                .and_then(|a| a.get(k))
                .map(String::as_str)
                .filter(|v| !v.is_empty())
        };
        match (get(CONTAINER_TYPE), get(SANDBOX_ID)) {
            (Some("sandbox"), _) => Role::Sandbox,
            (Some("container"), Some(id)) => Role::PodMember {
                sandbox_id: id.to_owned(),
            },
            _ => Role::Standalone,
        }
    }

    /// Reads the role from a bundle's `config.json` (only its annotations).
    pub fn of_bundle(config_json: &[u8]) -> Result<Role, serde_json::Error> {
        #[derive(serde::Deserialize)]
        struct Annotated {
            #[serde(default)]
            annotations: Option<HashMap<String, String>>,
        }
        let a: Annotated = serde_json::from_slice(config_json)?;
        Ok(Role::from_annotations(a.annotations.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_cri_annotations() {
        let sandbox = br#"{"annotations": {"io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": "pod1"}}"#;
        assert_eq!(Role::of_bundle(sandbox).unwrap(), Role::Sandbox);
        let member = br#"{"annotations": {"io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.sandbox-id": "pod1"}}"#;
        assert_eq!(
            Role::of_bundle(member).unwrap(),
            Role::PodMember {
                sandbox_id: "pod1".into()
            }
        );
        assert_eq!(Role::of_bundle(b"{}").unwrap(), Role::Standalone);
        // A container claiming a pod without naming it cannot join one.
        let orphan = br#"{"annotations": {"io.kubernetes.cri.container-type": "container"}}"#;
        assert_eq!(Role::of_bundle(orphan).unwrap(), Role::Standalone);
        assert!(Role::of_bundle(b"not json").is_err());
    }

    #[test]
    fn pod_limits_size_the_sandbox() {
        let raw = serde_json::json!({"ociVersion": "1.0.2", "annotations": {
            "io.kubernetes.cri.sandbox-memory": "268435456",
            "io.kubernetes.cri.sandbox-cpu-quota": "150000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000"}});
        let s = with_pod_limits(&raw);
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 268435456);
        assert_eq!(s["linux"]["resources"]["cpu"]["quota"], 150000);
        assert_eq!(s["linux"]["resources"]["cpu"]["period"], 100000);
        // Unlimited pods ("0") and specs with limits of their own are left alone.
        let raw = serde_json::json!({"annotations": {"io.kubernetes.cri.sandbox-memory": "0"},
            "linux": {"resources": {"memory": {"limit": 5}}}});
        assert_eq!(with_pod_limits(&raw), raw);
    }
}
