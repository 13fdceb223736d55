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
    #[error(
        "{path}: rootfs {rootfs} (root.path) is the host's root directory; husk does not hand the whole host file system to a VM"
    )]
    HostRoot { path: PathBuf, rootfs: PathBuf },
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
        // The rootfs is shared with the guest (read-write in virtio-fs mode): `/`, however
        // spelled (`/`, `/..`, a symlink to it), would give a hostile guest the host.
        if std::fs::canonicalize(&rootfs).is_ok_and(|r| r == Path::new("/")) {
            return Err(BundleError::HostRoot { path, rootfs });
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

/// What becomes of a namespace entry that names a host namespace (`path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceMapping {
    /// Join this namespace in the guest instead (e.g. another container's
    /// `/proc/<guest pid>/ns/ipc`).
    Join(String),
    /// The container gets a new namespace of that type in the guest (the entry loses its
    /// path); worth a warning, as the spec asked to share.
    New,
    /// The entry is removed: the container stays in the agent's namespace of that type
    /// (e.g. a pod's network namespace, which is the VM's own).
    Inherit,
    /// The spec cannot be honoured in a VM: creating the container fails with this reason.
    Refuse(String),
}

/// How host resources that a spec names reach the guest (the CLI's is
/// `volumes::SharedBinds`, the shim's its pod mapping).
pub trait HostMapping {
    /// A namespace entry of type `kind` with host path `path`.
    fn namespace(&mut self, kind: &str, path: &str) -> NamespaceMapping;
    /// A bind mount of host path `source` at `destination` (`options` as in the spec):
    /// the guest source to bind instead (e.g. `sandbox://...`), `None` to skip the mount,
    /// or an error naming why the mount cannot be provided.
    fn bind(
        &mut self,
        destination: &str,
        source: &str,
        options: &[String],
    ) -> Result<Option<String>, String>;
}

/// The spec as the guest gets it, and warnings about what was left out, with `mapping`
/// deciding what becomes of host binds and namespace paths; `hooks` run on the host (see
/// `hooks`), never in the guest. Fails when the mapping cannot provide a bind mount (the
/// message names the mount).
pub fn guest_spec(
    raw: &Value,
    mapping: &mut dyn HostMapping,
) -> Result<(Value, Vec<String>), String> {
    let mut spec = raw.clone();
    let mut warnings = Vec::new();
    if let Some(obj) = spec.as_object_mut() {
        obj.remove("hooks");
    }
    if let Some(namespaces) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    {
        let mut kept = Vec::with_capacity(namespaces.len());
        for (i, mut ns) in std::mem::take(namespaces).into_iter().enumerate() {
            let Some(obj) = ns.as_object_mut() else {
                kept.push(ns);
                continue;
            };
            let Some(path) = obj.get("path").and_then(Value::as_str).map(str::to_owned) else {
                kept.push(ns);
                continue;
            };
            if path.is_empty() {
                obj.remove("path");
                kept.push(ns);
                continue;
            }
            let kind = obj
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned();
            match mapping.namespace(&kind, &path) {
                NamespaceMapping::Join(guest) => {
                    obj.insert("path".into(), Value::String(guest));
                    kept.push(ns);
                }
                NamespaceMapping::New => {
                    // A path names a host namespace (e.g. podman's /run/netns/...), which
                    // does not exist in the guest.
                    obj.remove("path");
                    warnings.push(format!(
                        "{kind} namespace path {path} is a host namespace, not available in the VM; a new one is created in the guest"
                    ));
                    kept.push(ns);
                }
                NamespaceMapping::Inherit => {}
                NamespaceMapping::Refuse(why) => {
                    return Err(format!(
                        "linux.namespaces[{i}]: {kind} namespace path {path}: {why}"
                    ));
                }
            }
        }
        *namespaces = kept;
    }
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        let mut kept = Vec::with_capacity(mounts.len());
        for mut m in std::mem::take(mounts) {
            let options: Vec<String> = m
                .get("options")
                .and_then(Value::as_array)
                .map(|o| {
                    o.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
                || options.iter().any(|x| x == "bind" || x == "rbind");
            let source = m
                .get("source")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            if !(is_bind && source.starts_with('/')) {
                kept.push(m);
                continue;
            }
            let destination = m
                .get("destination")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned();
            match mapping.bind(&destination, &source, &options) {
                Ok(Some(guest)) => {
                    if let Some(obj) = m.as_object_mut() {
                        obj.insert("source".into(), Value::String(guest));
                    }
                    kept.push(m);
                }
                Ok(None) => warnings.push(format!(
                    "mount {destination} (bind of host path {source}) is not available in the VM; skipped"
                )),
                Err(e) => return Err(format!("mount {destination} (bind of {source}): {e}")),
            }
        }
        *mounts = kept;
    }
    Ok((spec, warnings))
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
    fn the_host_root_is_refused_as_rootfs() {
        for root in ["/", "/..", "/usr/.."] {
            let mut c = good();
            c["root"]["path"] = json!(root);
            let dir = write_bundle(&c, false);
            let err = Bundle::load(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("is the host's root directory"),
                "{root}: {err}"
            );
        }
        let dir = write_bundle(&good(), false);
        std::os::unix::fs::symlink("/", dir.path().join("rootfs")).unwrap();
        let err = Bundle::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is the host's root directory"), "{err}");
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
        /// Hides the host: binds skipped, namespace paths become new namespaces.
        struct Hidden;
        impl HostMapping for Hidden {
            fn namespace(&mut self, _: &str, _: &str) -> NamespaceMapping {
                NamespaceMapping::New
            }
            fn bind(&mut self, _: &str, _: &str, _: &[String]) -> Result<Option<String>, String> {
                Ok(None)
            }
        }
        let (g, warnings) = guest_spec(&c, &mut Hidden).unwrap();
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

    #[test]
    fn a_refused_namespace_path_fails_naming_the_entry() {
        struct NoJoin;
        impl HostMapping for NoJoin {
            fn namespace(&mut self, kind: &str, _: &str) -> NamespaceMapping {
                NamespaceMapping::Refuse(format!("a VM cannot join a host {kind} namespace"))
            }
            fn bind(&mut self, _: &str, _: &str, _: &[String]) -> Result<Option<String>, String> {
                Ok(None)
            }
        }
        let mut c = good();
        c["linux"] =
            json!({"namespaces": [{"type": "pid"}, {"type": "ipc", "path": "/proc/9/ns/ipc"}]});
        let err = guest_spec(&c, &mut NoJoin).unwrap_err();
        assert_eq!(
            err,
            "linux.namespaces[1]: ipc namespace path /proc/9/ns/ipc: a VM cannot join a host ipc namespace"
        );
    }

    #[test]
    fn a_mapping_joins_inherits_and_shares() {
        struct Pod;
        impl HostMapping for Pod {
            fn namespace(&mut self, kind: &str, path: &str) -> NamespaceMapping {
                match kind {
                    "network" => NamespaceMapping::Inherit,
                    "ipc" => NamespaceMapping::Join(path.replace("/proc/7/", "/proc/1/")),
                    _ => NamespaceMapping::New,
                }
            }
            fn bind(
                &mut self,
                destination: &str,
                _source: &str,
                options: &[String],
            ) -> Result<Option<String>, String> {
                match destination {
                    "/etc/hosts" => Ok(Some(format!(
                        "sandbox://shared/hosts?{}",
                        options.join(",")
                    ))),
                    "/bad" => Err("no such file".into()),
                    _ => Ok(None),
                }
            }
        }
        let mut c = good();
        c["mounts"] = json!([
            {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"]},
            {"destination": "/data", "source": "/srv/data", "options": ["bind"]},
        ]);
        c["linux"] = json!({"namespaces": [
            {"type": "network", "path": "/run/netns/cni-1"},
            {"type": "ipc", "path": "/proc/7/ns/ipc"},
            {"type": "uts", "path": "/proc/7/ns/uts"},
            {"type": "mount"},
        ]});
        let (g, warnings) = guest_spec(&c, &mut Pod).unwrap();
        assert_eq!(
            g["linux"]["namespaces"],
            json!([{"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "uts"}, {"type": "mount"}])
        );
        assert_eq!(g["mounts"].as_array().unwrap().len(), 1);
        assert_eq!(g["mounts"][0]["source"], "sandbox://shared/hosts?rbind,ro");
        assert_eq!(warnings.len(), 2, "{warnings:?}");

        c["mounts"] = json!([{"destination": "/bad", "type": "bind", "source": "/nope"}]);
        let err = guest_spec(&c, &mut Pod).unwrap_err();
        assert!(
            err.contains("/bad") && err.contains("/nope") && err.contains("no such file"),
            "{err}"
        );
    }
}
