//! A bound on what an agent reply may cost the host to decode. ttrpc caps a frame at
//! 4 MiB, but protobuf decoding turns each field into a Rust value: an empty
//! `IoDeviceStats` is 2 bytes on the wire and a struct of about a hundred bytes in memory,
//! a `map<string, uint64>` entry or a `repeated string` element a few bytes on the wire and
//! a heap allocation each, unknown fields a vector entry each. A hostile agent could make
//! one 4 MiB reply cost the host hundreds of MiB. So the fields of a reply are counted on
//! the wire before it is decoded, and a reply with more than [`MAX_REPLY_FIELDS`] is
//! refused.
//!
//! The count needs no schema: every length-delimited field that is itself valid wire format
//! is counted as a nested message too (a string whose bytes happen to parse counts a few
//! extra fields, which only makes the bound stricter). Nesting is followed to
//! [`MAX_DEPTH`] levels, so the scan costs at most that many passes over the reply.

/// Fields one reply may hold, all nesting levels together; real replies hold a few
/// hundred at most (a stats reply with every cgroup counter).
pub const MAX_REPLY_FIELDS: usize = 100_000;
/// Nesting levels followed (husk's replies nest three deep).
const MAX_DEPTH: usize = 8;

/// A reply with more fields than the bound.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the agent's reply holds more than {limit} protobuf fields ({bytes} bytes); refused undecoded"
)]
pub struct ReplyTooComplex {
    pub limit: usize,
    pub bytes: usize,
}

/// Checks `reply` (a protobuf message's bytes) against [`MAX_REPLY_FIELDS`]. Bytes that are
/// not wire format pass: decoding them fails on its own.
pub fn check(reply: &[u8]) -> Result<(), ReplyTooComplex> {
    check_with_limit(reply, MAX_REPLY_FIELDS)
}

fn check_with_limit(reply: &[u8], limit: usize) -> Result<(), ReplyTooComplex> {
    match scan(reply, 0, limit) {
        Scan::TooMany => Err(ReplyTooComplex {
            limit,
            bytes: reply.len(),
        }),
        Scan::Fields(_) | Scan::NotWire => Ok(()),
    }
}

enum Scan {
    Fields(usize),
    NotWire,
    TooMany,
}

/// A varint at the start of `buf`: its value and length.
fn varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in buf.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Counts the fields of `buf` (and of every nested candidate), up to `limit`.
fn scan(buf: &[u8], depth: usize, limit: usize) -> Scan {
    let mut fields = 0usize;
    let mut i = 0usize;
    while i < buf.len() {
        let Some((key, used)) = varint(&buf[i..]) else {
            return Scan::NotWire;
        };
        i += used;
        if key >> 3 == 0 {
            return Scan::NotWire;
        }
        let skip = match key & 7 {
            0 => match varint(&buf[i..]) {
                Some((_, used)) => used,
                None => return Scan::NotWire,
            },
            1 => 8,
            5 => 4,
            2 => {
                let Some((len, used)) = varint(&buf[i..]) else {
                    return Scan::NotWire;
                };
                i += used;
                let Some(inner) = usize::try_from(len)
                    .ok()
                    .and_then(|len| buf.get(i..i.checked_add(len)?))
                else {
                    return Scan::NotWire;
                };
                if depth + 1 < MAX_DEPTH {
                    match scan(inner, depth + 1, limit - fields) {
                        Scan::Fields(n) => fields += n,
                        Scan::NotWire => {}
                        Scan::TooMany => return Scan::TooMany,
                    }
                }
                inner.len()
            }
            // Groups (deprecated, not in proto3) and reserved wire types.
            _ => return Scan::NotWire,
        };
        i = match i.checked_add(skip) {
            Some(next) if next <= buf.len() => next,
            _ => return Scan::NotWire,
        };
        fields += 1;
        if fields > limit {
            return Scan::TooMany;
        }
    }
    Scan::Fields(fields)
}

#[cfg(test)]
mod tests {
    use protobuf::Message;

    use super::*;
    use crate::agent::{IoDeviceStats, StatsContainerResponse};

    #[test]
    fn a_real_stats_reply_passes() {
        let mut r = StatsContainerResponse::new();
        for i in 0..200 {
            let mut io = IoDeviceStats::new();
            io.major = i;
            r.io.push(io);
        }
        check(&r.write_to_bytes().unwrap()).unwrap();
    }

    /// 4 MiB of empty nested messages: 2 bytes each on the wire, two million structs
    /// once decoded. Refused before any is made.
    #[test]
    fn a_frame_of_empty_nested_messages_is_refused() {
        let field = 4u8; // StatsContainerResponse.io
        let mut reply = Vec::with_capacity(4 << 20);
        while reply.len() < 4 << 20 {
            reply.extend_from_slice(&[(field << 3) | 2, 0]);
        }
        let err = check(&reply).unwrap_err();
        assert_eq!(err.limit, MAX_REPLY_FIELDS);
        assert!(err.to_string().contains("refused undecoded"), "{err}");
        // What the bound spares the host: the same bytes decode into two million entries.
        let decoded = StatsContainerResponse::parse_from_bytes(&reply).unwrap();
        assert_eq!(decoded.io.len(), 2 << 20);
    }

    #[test]
    fn fields_count_at_every_level_and_strings_or_garbage_pass() {
        // 3 top-level fields, one of them a message of 2.
        let reply = [0x08, 0x01, 0x12, 0x04, 0x08, 0x02, 0x10, 0x03, 0x18, 0x04];
        assert!(check_with_limit(&reply, 5).is_ok());
        assert!(check_with_limit(&reply, 4).is_err());
        // A string field of text: not wire format inside, one field.
        let mut text = vec![0x0a, 11];
        text.extend_from_slice(b"hello world");
        assert!(check_with_limit(&text, 1).is_ok());
        // Not protobuf at all: left to the decoder.
        assert!(check(&[0xff; 16]).is_ok());
        assert!(check(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_ok());
    }
}
