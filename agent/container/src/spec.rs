//! Loading and checking an OCI runtime spec (config.json).
//!
//! Parsing goes through `serde_path_to_error` so a schema error names the field
//! (`linux.namespaces[2].type: unknown variant ...`), not just a line and column.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{Linux, Process, Spec};

use crate::error::{Error, Result};

/// Largest config.json accepted: specs are a few KiB; this only stops a runaway file.
const MAX_SPEC_BYTES: u64 = 4 << 20;

/// Reads and parses `path` (a config.json). Does not validate; see [`validate`].
pub fn load(path: &Path) -> Result<Spec> {
    let read_err = |source| Error::ReadSpec {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_SPEC_BYTES {
        return Err(Error::SpecSyntax {
            field: ".".into(),
            message: format!("{len} bytes is more than the {MAX_SPEC_BYTES}-byte limit"),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    parse(&text)
}

/// Parses config.json text; errors name the offending field.
pub fn parse(text: &str) -> Result<Spec> {
    // A slice reader, as the agent uses for the other spec parts it parses (a process,
    // resources): one instantiation of their deserializers instead of two in the agent,
    // whose size the guest pays for at every boot (initramfs unpack).
    let de = &mut serde_json::Deserializer::from_slice(text.as_bytes());
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        Error::SpecSyntax {
            field,
            message: e.into_inner().to_string(),
        }
    })
}

/// Resolves `root.path` against the bundle directory (relative paths are relative to it).
pub fn rootfs_path(spec: &Spec, bundle: &Path) -> Result<PathBuf> {
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| Error::invalid("root", "missing"))?;
    if root.path().as_os_str().is_empty() {
        return Err(Error::invalid("root.path", "empty"));
    }
    Ok(bundle.join(root.path()))
}

/// The checks every container needs before any process is started. Field-specific
/// translation (namespaces, mounts, process) validates the rest as it builds its plan.
pub fn validate(spec: &Spec) -> Result<()> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::invalid("process", "missing"))?;
    validate_process(process, "process")?;
    spec.linux()
        .as_ref()
        .ok_or_else(|| Error::invalid("linux", "missing (only Linux containers run here)"))?;
    if let Some(h) = spec.hostname()
        && (h.len() > 64 || h.contains('\0'))
    {
        return Err(Error::invalid(
            "hostname",
            "longer than 64 bytes or contains NUL",
        ));
    }
    Ok(())
}

/// Checks a process (the init's or an exec's); `field` prefixes the field names.
pub fn validate_process(process: &Process, field: &str) -> Result<()> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() {
        return Err(Error::invalid(format!("{field}.args"), "empty"));
    }
    if !process.cwd().is_absolute() {
        return Err(Error::invalid(
            format!("{field}.cwd"),
            format!("{:?} is not absolute", process.cwd()),
        ));
    }
    for (i, e) in process
        .env()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if !e.contains('=') {
            return Err(Error::invalid(format!("{field}.env[{i}]"), "no '='"));
        }
    }
    Ok(())
}

/// The spec's `linux` section (checked present by [`validate`]).
pub(crate) fn linux(spec: &Spec) -> Result<&Linux> {
    spec.linux()
        .as_ref()
        .ok_or_else(|| Error::invalid("linux", "missing"))
}

/// The spec's `process` section (checked present by [`validate`]).
pub(crate) fn process(spec: &Spec) -> Result<&Process> {
    spec.process()
        .as_ref()
        .ok_or_else(|| Error::invalid("process", "missing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_errors_name_the_field() {
        let err = parse(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},{"type":"bogus"}]}}"#,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("linux.namespaces[1].type"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");

        let err = parse(r#"{"process":{"user":{"uid":"root"},"cwd":"/"}}"#).unwrap_err();
        assert!(err.to_string().contains("process.user.uid"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let spec =
            parse(r#"{"process":{"user":{"uid":0,"gid":0},"cwd":"/","args":[]},"linux":{}}"#)
                .unwrap();
        assert!(
            validate(&spec)
                .unwrap_err()
                .to_string()
                .contains("process.args")
        );
        let spec =
            parse(r#"{"process":{"user":{"uid":0,"gid":0},"cwd":"rel","args":["x"]},"linux":{}}"#)
                .unwrap();
        assert!(
            validate(&spec)
                .unwrap_err()
                .to_string()
                .contains("process.cwd")
        );
        let spec =
            parse(r#"{"process":{"user":{"uid":0,"gid":0},"cwd":"/","args":["x"]}}"#).unwrap();
        assert!(validate(&spec).unwrap_err().to_string().contains("linux"));
    }
}
