//! KVM's own per-vCPU counters (the binary statistics of KVM_GET_STATS_FD, Linux 5.14+):
//! every exit, the ones KVM handles in the kernel included (halts, interrupts, emulated
//! instructions, page faults), which the VMM's exit counters cannot see.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;

/// `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
const HEADER_LEN: usize = 24;
const DESC_FIXED_LEN: usize = 16;
const TYPE_MASK: u32 = 0xf;
const TYPE_LINEAR_HIST: u32 = 3;

/// A vCPU's statistics file.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
}

impl KvmStats {
    /// Opens the statistics of `vcpu` (from its own thread: other vCPU ioctls wait while it
    /// runs).
    pub fn open(vcpu: &VcpuFd) -> std::io::Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new file descriptor.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned to us and is owned by nobody else.
        Ok(Self {
            file: unsafe { File::from_raw_fd(fd) },
        })
    }

    /// The current single-value counters (histograms left out), in KVM's order.
    pub fn read(&self) -> std::io::Result<Vec<(String, u64)>> {
        decode(|offset, buf| self.file.read_exact_at(buf, offset))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

/// Decodes a statistics file read through `read_at(offset, buf)`: the header, the
/// descriptors (flags, exponent, size, offset, bucket size, name), then the values.
pub fn decode(
    read_at: impl Fn(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Vec<(String, u64)>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut header = [0u8; HEADER_LEN];
    read_at(0, &mut header)?;
    let name_size = u32_at(&header, 4) as usize;
    let num_desc = u32_at(&header, 8) as usize;
    let desc_offset = u64::from(u32_at(&header, 16));
    let data_offset = u64::from(u32_at(&header, 20));
    if num_desc > 4096 || name_size > 4096 {
        return Err(bad("implausible KVM stats header"));
    }
    let desc_len = DESC_FIXED_LEN + name_size;
    let mut descs = vec![0u8; desc_len * num_desc];
    read_at(desc_offset, &mut descs)?;
    let mut out = Vec::with_capacity(num_desc);
    for d in descs.chunks_exact(desc_len) {
        let flags = u32_at(d, 0);
        let size = u16_at(d, 6);
        let offset = u64::from(u32_at(d, 8));
        if size != 1 || flags & TYPE_MASK >= TYPE_LINEAR_HIST {
            continue;
        }
        let name = &d[DESC_FIXED_LEN..];
        let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        let mut value = [0u8; 8];
        read_at(data_offset + offset, &mut value)?;
        out.push((
            String::from_utf8_lossy(&name[..end]).into_owned(),
            u64::from_le_bytes(value),
        ));
    }
    Ok(out)
}

/// Adds up counters of several vCPUs by name, keeping the first one's order.
pub fn sum(per_vcpu: &[Vec<(String, u64)>]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for stats in per_vcpu {
        for (name, v) in stats {
            match out.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total = total.saturating_add(*v),
                None => out.push((name.clone(), *v)),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics file as KVM lays it out, with `name_size` 8.
    fn file(stats: &[(&str, u32, u64)]) -> Vec<u8> {
        let name_size = 8usize;
        let desc_offset = HEADER_LEN + 8; // after an 8-byte id string
        let data_offset = desc_offset + stats.len() * (DESC_FIXED_LEN + name_size);
        let mut b = Vec::new();
        for v in [
            0,
            name_size as u32,
            stats.len() as u32,
            24,
            desc_offset as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(data_offset as u32).to_le_bytes());
        b.extend_from_slice(b"vcpu_0\0\0");
        for (i, (name, flags, _)) in stats.iter().enumerate() {
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&0i16.to_le_bytes());
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&((i * 8) as u32).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            b.extend_from_slice(&n);
        }
        for (_, _, v) in stats {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn read(buf: &[u8]) -> std::io::Result<Vec<(String, u64)>> {
        decode(|offset, out| {
            let start = offset as usize;
            let src = buf
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
            out.copy_from_slice(src);
            Ok(())
        })
    }

    #[test]
    fn decodes_counters_and_skips_histograms() {
        let buf = file(&[("exits", 0, 1234), ("hist", 4, 9), ("halt_ex", 0, 7)]);
        assert_eq!(
            read(&buf).unwrap(),
            vec![("exits".to_string(), 1234), ("halt_ex".to_string(), 7)]
        );
        assert!(read(&buf[..30]).is_err(), "a cut file is an error");
    }

    #[test]
    fn sums_vcpus_by_name() {
        let a = vec![("exits".to_string(), 3), ("io_exits".to_string(), 1)];
        let b = vec![("exits".to_string(), 4), ("other".to_string(), 2)];
        assert_eq!(
            sum(&[a, b]),
            vec![
                ("exits".to_string(), 7),
                ("io_exits".to_string(), 1),
                ("other".to_string(), 2)
            ]
        );
    }
}
