//! Container ids, validated as runc does, and the id the guest agent knows the container by.

/// Longest id accepted. The id names a directory under `--root` (255 bytes at most on
/// common file systems) and is part of socket paths, which are limited to 107 bytes.
pub const MAX_ID_LEN: usize = 200;

/// Why an id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("container id must not be empty")]
    Empty,
    #[error("invalid container id {0:?}: \".\" and \"..\" are not allowed")]
    Dots(String),
    #[error("invalid container id {0:?}: only letters, digits, '_', '+', '-' and '.' are allowed")]
    Charset(String),
    #[error("invalid container id {0:?}: longer than {MAX_ID_LEN} bytes")]
    TooLong(String),
}

/// Checks `id` like runc (`^[\w+\-.]+$`, not `.` or `..`), plus a length limit.
pub fn validate(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id == "." || id == ".." {
        return Err(IdError::Dots(id.to_owned()));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'))
    {
        return Err(IdError::Charset(id.to_owned()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(id.to_owned()));
    }
    Ok(())
}

/// The container's id inside its VM. The agent accepts `[A-Za-z0-9_.-]`, not starting with
/// '.'; each VM holds one container, so a lossy mapping cannot collide.
pub fn agent_id(id: &str) -> String {
    let mapped: String = id.chars().map(|c| if c == '+' { '_' } else { c }).collect();
    if mapped.starts_with('.') {
        format!("c{mapped}")
    } else {
        mapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_runc_ids() {
        for id in ["a", "abc-123", "my_box.1", "x+y", "...a", "A"] {
            validate(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        }
        validate(&"f".repeat(64)).unwrap();
    }

    #[test]
    fn refuses_bad_ids() {
        assert_eq!(validate(""), Err(IdError::Empty));
        assert!(matches!(validate("."), Err(IdError::Dots(_))));
        assert!(matches!(validate(".."), Err(IdError::Dots(_))));
        for bad in ["a/b", "../x", "a b", "é", "a\0", "a:b"] {
            let err = validate(bad).unwrap_err();
            assert!(matches!(err, IdError::Charset(_)), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(matches!(
            validate(&"a".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong(_))
        ));
    }

    #[test]
    fn agent_ids_fit_the_agent_charset() {
        assert_eq!(agent_id("abc"), "abc");
        assert_eq!(agent_id("a+b"), "a_b");
        assert_eq!(agent_id(".x"), "c.x");
    }
}
