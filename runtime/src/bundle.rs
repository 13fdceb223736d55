//! An OCI bundle: `config.json` parsed with errors that name the bad field, the rootfs
//! resolved and checked, and the spec as the guest gets it.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde_json::Value;

pub const CONFIG_FILE: &str = "config.json";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle {path}: {source}")]
    Bundle {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    Field {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: rootfs {rootfs} (root.path) does not exist or is not a directory")]
    MissingRootfs { path: PathBuf, rootfs: PathBuf },
}

/// A loaded bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Absolute bundle directory.
    pub dir: PathBuf,
    pub spec: Spec,
    /// config.json as parsed JSON (what the guest gets, minus host-only parts).
    pub raw: Value,
    /// Absolute rootfs directory.
    pub rootfs: PathBuf,
}

impl Bundle {
    /// Loads `<dir>/config.json` and checks the rootfs.
    pub fn load(dir: &Path) -> Result<Self, BundleError> {
        let dir = std::fs::canonicalize(dir).map_err(|source| BundleError::Bundle {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read(&path).map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
        let (spec, raw) = parse_spec(&text, &path)?;
        let root = spec.root().as_ref().ok_or_else(|| BundleError::Field {
            path: path.clone(),
            field: "root".into(),
            message: "missing (the rootfs must be given as root.path)".into(),
        })?;
        if spec.process().is_none() {
            return Err(BundleError::Field {
                path: path.clone(),
                field: "process".into(),
                message: "missing (a container needs a process to run)".into(),
            });
        }
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            dir.join(root.path())
        };
        if !rootfs.is_dir() {
            return Err(BundleError::MissingRootfs { path, rootfs });
        }
        Ok(Self {
            dir,
            spec,
            raw,
            rootfs,
        })
    }
}

/// Parses config.json text; a type error names the JSON path of the field.
pub fn parse_spec(text: &[u8], path: &Path) -> Result<(Spec, Value), BundleError> {
    let raw: Value = serde_json::from_slice(text).map_err(|source| BundleError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let spec: Spec = serde_path_to_error::deserialize(&raw).map_err(|e| {
        let field = e.path().to_string();
        BundleError::Field {
            path: path.to_path_buf(),
            field: if field == "." {
                "(top level)".into()
            } else {
                field
            },
            message: e.into_inner().to_string(),
        }
    })?;
    Ok((spec, raw))
}

/// The spec as the guest gets it, and warnings about what was left out:
/// - `hooks` run on the host (see `hooks`), never in the guest;
/// - bind mounts of host paths are dropped: the guest cannot see host files (only the
///   rootfs travels to the guest);
/// - namespace paths (host namespaces to join) are dropped: the guest makes new ones.
pub fn guest_spec(raw: &Value) -> (Value, Vec<String>) {
    let mut spec = raw.clone();
    let mut warnings = Vec::new();
    if let Some(obj) = spec.as_object_mut() {
        obj.remove("hooks");
    }
    // A namespace path names a host namespace (e.g. podman's /run/netns/...), which does not
    // exist in the guest: the container gets a new namespace of that type there instead.
    if let Some(namespaces) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    {
        for ns in namespaces.iter_mut() {
            if let Some(obj) = ns.as_object_mut()
                && let Some(path) = obj.remove("path")
            {
                warnings.push(format!(
                    "{} namespace path {path} is a host namespace, not available in the VM; a new one is created in the guest",
                    obj.get("type").and_then(Value::as_str).unwrap_or("?")
                ));
            }
        }
    }
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        mounts.retain(|m| {
            let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
                || m.get("options")
                    .and_then(Value::as_array)
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
            let source = m.get("source").and_then(Value::as_str).unwrap_or("");
            let host_path = source.starts_with('/');
            if is_bind && host_path {
                warnings.push(format!(
                    "mount {} (bind of host path {source}) is not available in the VM; skipped",
                    m.get("destination").and_then(Value::as_str).unwrap_or("?")
                ));
                false
            } else {
                true
            }
        });
    }
    (spec, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write_bundle(config: &Value, with_rootfs: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        if with_rootfs {
            std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        }
        dir
    }

    fn good() -> Value {
        json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
               "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}}})
    }

    #[test]
    fn loads_a_good_bundle() {
        let dir = write_bundle(&good(), true);
        let b = Bundle::load(dir.path()).unwrap();
        assert!(b.rootfs.ends_with("rootfs"));
        assert!(b.rootfs.is_absolute());
    }

    #[test]
    fn bad_field_is_named() {
        let mut c = good();
        c["process"]["user"]["uid"] = json!("root");
        let dir = write_bundle(&c, true);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("process.user.uid"), "{err}");
        let mut c = good();
        c["linux"] = json!({"namespaces": [{"type": "bogus"}]});
        let dir = write_bundle(&c, true);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("linux.namespaces[0].type"), "{err}");
    }

    #[test]
    fn missing_rootfs_and_process() {
        let dir = write_bundle(&good(), false);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("rootfs") && err.contains("does not exist"),
            "{err}"
        );
        let mut c = good();
        c.as_object_mut().unwrap().remove("process");
        let dir = write_bundle(&c, true);
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("`process`"), "{err}");
        let err = Bundle::load(Path::new("/nonexistent/bundle"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/bundle"), "{err}");
    }

    #[test]
    fn invalid_json_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("invalid JSON"), "{err}");
    }

    #[test]
    fn guest_spec_drops_hooks_and_host_binds() {
        let mut c = good();
        c["hooks"] = json!({"poststart": [{"path": "/bin/true"}]});
        c["mounts"] = json!([
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind"]},
            {"destination": "/data", "source": "/srv/data", "options": ["bind", "ro"]},
        ]);
        c["linux"] =
            json!({"namespaces": [{"type": "network", "path": "/run/netns/x"}, {"type": "pid"}]});
        let (g, warnings) = guest_spec(&c);
        assert!(g.get("hooks").is_none());
        assert_eq!(g["mounts"].as_array().unwrap().len(), 1);
        assert_eq!(
            g["linux"]["namespaces"],
            json!([{"type": "network"}, {"type": "pid"}])
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("/run/netns/x"), "{warnings:?}");
        assert!(warnings[1].contains("/etc/hosts"), "{warnings:?}");
    }
}
