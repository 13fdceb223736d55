//! The snapshot state file's framing: a header that names the format and its version and
//! checksums the payload, so a file of another version or a damaged one is refused with an
//! error that says which.
//!
//! ```text
//! magic "HUSKSNAP" | format version u32 LE | CRC-32 of payload u32 LE | payload length u64 LE | payload
//! ```

use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"HUSKSNAP";
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
/// Larger payloads are refused before reading: a state file holds registers and device
/// registers (tens of KiB per vCPU), never this much.
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Error reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a husk snapshot state file")]
    NotASnapshot { path: String },
    #[error("{path} is snapshot format version {found}; this husk-vmm reads version {supported}")]
    Version {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("{path} is truncated: {what}")]
    Truncated { path: String, what: String },
    #[error("{path} is corrupt: checksum {found:#010x}, header says {expected:#010x}")]
    Checksum {
        path: String,
        expected: u32,
        found: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `payload` framed as format `version`, through a temporary file renamed into place
/// so a crash never leaves a half-written state file under the final name.
pub fn write(path: &Path, version: u32, payload: &[u8]) -> Result<(), FileError> {
    let tmp = path.with_extension("partial");
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&version.to_le_bytes());
    header.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&header).map_err(io(&tmp))?;
    f.write_all(payload).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Reads and checks a state file of format `version`; returns the payload.
pub fn read(path: &Path, version: u32) -> Result<Vec<u8>, FileError> {
    let name = || path.display().to_string();
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = f.read(&mut header[got..]).map_err(io(path))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got < MAGIC.len() || &header[..8] != MAGIC {
        return Err(FileError::NotASnapshot { path: name() });
    }
    if got < HEADER_LEN {
        return Err(FileError::Truncated {
            path: name(),
            what: format!("header of {got} bytes"),
        });
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let found = u32_at(8);
    if found != version {
        return Err(FileError::Version {
            path: name(),
            found,
            supported: version,
        });
    }
    let expected = u32_at(12);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(FileError::Truncated {
            path: name(),
            what: format!("header claims a payload of {len} bytes (at most {MAX_PAYLOAD})"),
        });
    }
    let mut payload = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut payload).map_err(io(path))?;
    if payload.len() as u64 != len {
        return Err(FileError::Truncated {
            path: name(),
            what: format!("{} of {len} payload bytes", payload.len()),
        });
    }
    let crc = crc32fast::hash(&payload);
    if crc != expected {
        return Err(FileError::Checksum {
            path: name(),
            expected,
            found: crc,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_kind_of_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        write(&p, 3, b"{\"x\":1}").unwrap();
        assert_eq!(read(&p, 3).unwrap(), b"{\"x\":1}");
        assert!(!p.with_extension("partial").exists());

        let e = read(&p, 4).unwrap_err();
        assert!(
            matches!(
                e,
                FileError::Version {
                    found: 3,
                    supported: 4,
                    ..
                }
            ),
            "{e}"
        );

        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        let e = read(&p, 3).unwrap_err();
        assert!(matches!(e, FileError::Checksum { .. }), "{e}");
        assert!(e.to_string().contains("corrupt"), "{e}");

        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let e = read(&p, 3).unwrap_err();
        assert!(matches!(e, FileError::Truncated { .. }), "{e}");

        std::fs::write(&p, b"\x7fELF not a snapshot").unwrap();
        let e = read(&p, 3).unwrap_err();
        assert!(matches!(e, FileError::NotASnapshot { .. }), "{e}");

        let mut huge = bytes[..HEADER_LEN].to_vec();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&p, &huge).unwrap();
        let e = read(&p, 3).unwrap_err();
        assert!(e.to_string().contains("claims a payload"), "{e}");
    }
}
