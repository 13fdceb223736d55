//! The attach request line: `ATTACH <stream-id>\n`.

use husk_protocol::stdio::{MAX_ATTACH_LINE, is_valid_stream_id};

/// Why a request line was refused. The text goes back to the host as `ERR <text>\n`, so it
/// is one short line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("request line too long")]
    TooLong,
    #[error("connection closed before a complete request line")]
    Eof,
    #[error("malformed request: expected ATTACH <stream-id>")]
    Malformed,
    #[error("invalid stream id")]
    InvalidId,
}

/// Accumulates the request line one byte at a time (the caller must not read past the
/// newline: stdin bytes may follow it). Returns the line without its newline once
/// complete.
#[derive(Debug, Default)]
pub struct LineBuf {
    line: Vec<u8>,
}

impl LineBuf {
    /// Feeds one byte; `Ok(true)` once the newline has arrived.
    pub fn push(&mut self, byte: u8) -> Result<bool, LineError> {
        if byte == b'\n' {
            return Ok(true);
        }
        // Room for the newline still to come.
        if self.line.len() + 1 >= MAX_ATTACH_LINE {
            return Err(LineError::TooLong);
        }
        self.line.push(byte);
        Ok(false)
    }

    pub fn line(&self) -> &[u8] {
        &self.line
    }
}

/// Parses a request line (newline stripped): `ATTACH <id>`, exactly one space, nothing
/// else (no trailing space or `\r`).
pub fn parse_attach(line: &[u8]) -> Result<&str, LineError> {
    let id = line.strip_prefix(b"ATTACH ").ok_or(LineError::Malformed)?;
    let id = std::str::from_utf8(id).map_err(|_| LineError::InvalidId)?;
    if !is_valid_stream_id(id) {
        return Err(LineError::InvalidId);
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(bytes: &[u8]) -> Result<Option<Vec<u8>>, LineError> {
        let mut buf = LineBuf::default();
        for &b in bytes {
            if buf.push(b)? {
                return Ok(Some(buf.line().to_vec()));
            }
        }
        Ok(None)
    }

    #[test]
    fn parses_valid_lines() {
        assert_eq!(parse_attach(b"ATTACH c1:stdout"), Ok("c1:stdout"));
        let long = format!("ATTACH {}", "a".repeat(128));
        assert_eq!(parse_attach(long.as_bytes()), Ok(&long[7..]));
    }

    #[test]
    fn refuses_malformed_lines() {
        for bad in [
            &b""[..],
            b"ATTACH",
            b"attach x",
            b"ATTACH  x",
            b"DETACH x",
            b" ATTACH x",
        ] {
            assert!(parse_attach(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_attach(b"ATTACH x\r"), Err(LineError::InvalidId));
        assert_eq!(parse_attach(b"ATTACH x y"), Err(LineError::InvalidId));
        assert_eq!(parse_attach(b"ATTACH \xff"), Err(LineError::InvalidId));
        let long = format!("ATTACH {}", "a".repeat(129));
        assert_eq!(parse_attach(long.as_bytes()), Err(LineError::InvalidId));
    }

    #[test]
    fn line_buffer_is_bounded() {
        assert_eq!(feed(b"ATTACH x\nrest"), Ok(Some(b"ATTACH x".to_vec())));
        assert_eq!(feed(b"ATTACH x"), Ok(None));
        // The longest valid line fits; one more byte does not.
        let max = format!("ATTACH {}\n", "a".repeat(128));
        assert_eq!(max.len(), MAX_ATTACH_LINE);
        assert!(matches!(feed(max.as_bytes()), Ok(Some(_))));
        let over = format!("ATTACH {}\n", "a".repeat(129));
        assert_eq!(feed(over.as_bytes()), Err(LineError::TooLong));
        assert_eq!(feed(&[b'x'; 10_000]), Err(LineError::TooLong));
    }
}
