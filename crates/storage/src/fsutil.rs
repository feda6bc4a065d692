//! Small file-system helpers: directory fsync, atomic file replacement, block reservation.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{IoContext, Result};

/// fsyncs a directory so that creates, renames and unlinks inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Replaces `path` with `bytes` atomically: temp file, fsync, rename, directory fsync.
///
/// A crash leaves either the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .ctx("create", tmp)?;
    f.write_all(bytes).ctx("write", tmp)?;
    f.sync_all().ctx("fsync", tmp)?;
    drop(f);
    fs::rename(tmp, path).ctx("rename", path)?;
    fsync_dir(dir)
}

/// Reserves real blocks for `[0, len)` of `file` (not a sparse hole), so later writes through a
/// map cannot fail with `SIGBUS` for lack of space.
///
/// Falls back to writing zeros where the file system has no `fallocate`.
pub fn reserve_blocks(file: &File, path: &Path, len: u64) -> Result<()> {
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
            write_zeros(file, path, 0, len)
        }
        Err(e) => Err(e.into()).ctx("fallocate", path),
    }
}

/// Zeroes `[from, to)` of a file that is not mapped, keeping its blocks allocated.
pub fn zero_range(file: &File, path: &Path, from: u64, to: u64) -> Result<()> {
    if to <= from {
        return Ok(());
    }
    match rustix::fs::fallocate(
        file,
        rustix::fs::FallocateFlags::ZERO_RANGE,
        from,
        to - from,
    ) {
        Ok(()) => Ok(()),
        Err(_) => write_zeros(file, path, from, to),
    }
}

fn write_zeros(file: &File, path: &Path, from: u64, to: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let chunk = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(chunk.len());
        file.write_all_at(&chunk[..n], at)
            .ctx("write zeros", path)?;
        at += n as u64;
    }
    Ok(())
}

/// Formats a base offset or index as the 20-digit zero-padded file stem.
pub fn file_stem(n: u64) -> String {
    format!("{n:020}")
}

/// Parses a 20-digit file stem with the given extension, e.g. `00000000000000000042.log`.
pub fn parse_stem(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Bytes an unprivileged writer may still use on the file system holding `path` (`statvfs`:
/// available blocks times the fragment size).
pub fn free_bytes(path: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(path)
        .map_err(std::io::Error::from)
        .ctx("statvfs", path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_round_trip_and_reject_junk() {
        assert_eq!(file_stem(42), "00000000000000000042");
        assert_eq!(parse_stem("00000000000000000042.log", "log"), Some(42));
        assert_eq!(parse_stem("00000000000000000042.index", "log"), None);
        assert_eq!(parse_stem("42.log", "log"), None);
        assert_eq!(parse_stem("0000000000000000004x.log", "log"), None);
    }

    #[test]
    fn reserved_blocks_are_not_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = File::create(&p).unwrap();
        reserve_blocks(&f, &p, 1 << 20).unwrap();
        let m = f.metadata().unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert!(
            m.blocks() * 512 >= 1 << 20,
            "only {} blocks allocated",
            m.blocks()
        );
    }
}
