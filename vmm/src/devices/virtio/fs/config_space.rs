//! The virtio-fs configuration space (virtio 1.2, section 5.11.4): the tag the guest mounts
//! the share by and the number of request queues.

/// Length of the tag field. A tag of exactly this length has no terminating NUL.
pub const TAG_LEN: usize = 36;

/// Why a tag cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("empty tag")]
    Empty,
    #[error("tag {0:?} is longer than {TAG_LEN} bytes")]
    TooLong(String),
    #[error(
        "tag {0:?} must be printable ASCII without spaces, ',' or '=' (the guest mounts it by name)"
    )]
    BadCharacter(String),
}

/// Checks that `tag` fits the config space and can be written in a mount command or a
/// `--fs` spec.
pub fn validate_tag(tag: &str) -> Result<(), TagError> {
    if tag.is_empty() {
        return Err(TagError::Empty);
    }
    if tag.len() > TAG_LEN {
        return Err(TagError::TooLong(tag.to_string()));
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
    {
        return Err(TagError::BadCharacter(tag.to_string()));
    }
    Ok(())
}

/// `struct virtio_fs_config` without `notify_buf_size` (VIRTIO_FS_F_NOTIFICATION is not
/// offered): `u8 tag[36]; le32 num_request_queues`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfigSpace {
    bytes: [u8; TAG_LEN + 4],
}

impl FsConfigSpace {
    pub fn new(tag: &str, num_request_queues: u32) -> Result<Self, TagError> {
        validate_tag(tag)?;
        let mut bytes = [0u8; TAG_LEN + 4];
        bytes[..tag.len()].copy_from_slice(tag.as_bytes());
        bytes[TAG_LEN..].copy_from_slice(&num_request_queues.to_le_bytes());
        Ok(Self { bytes })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::read_config_bytes;

    #[test]
    fn layout_is_tag_then_le_queue_count() {
        let cfg = FsConfigSpace::new("rootfs", 1).unwrap();
        let b = cfg.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(&b[..6], b"rootfs");
        assert!(b[6..36].iter().all(|&x| x == 0), "tag padded with NULs");
        assert_eq!(&b[36..], &[1, 0, 0, 0]);
        // The driver reads the queue count as one 4-byte access at offset 36.
        let mut n = [0u8; 4];
        read_config_bytes(b, 36, &mut n);
        assert_eq!(u32::from_le_bytes(n), 1);
        // Reads past the end are zeros.
        let mut past = [0xffu8; 4];
        read_config_bytes(b, 40, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn a_36_byte_tag_fills_the_field_without_nul() {
        let tag = "a".repeat(TAG_LEN);
        let cfg = FsConfigSpace::new(&tag, 1).unwrap();
        assert_eq!(&cfg.as_bytes()[..TAG_LEN], tag.as_bytes());
    }

    #[test]
    fn bad_tags_are_named() {
        assert_eq!(validate_tag(""), Err(TagError::Empty));
        let long = "x".repeat(TAG_LEN + 1);
        assert!(
            validate_tag(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than 36 bytes")
        );
        for bad in ["a b", "a,b", "a=b", "tag\0", "t\u{e9}g"] {
            assert!(
                matches!(validate_tag(bad), Err(TagError::BadCharacter(_))),
                "{bad:?}"
            );
        }
        validate_tag("husk-rootfs_1.0").unwrap();
    }
}
