//! Checkpoint manifests: the list of files (with sizes and CRCs) that make up a snapshot, plus
//! the state machine's own opaque state, written atomically.
//!
//! ```text
//!  0  4  magic "RNMF"          body:
//!  4  2  version (1)             u16 id length, id (UTF-8)
//!  6  2  reserved (0)            u32 file count F
//!  8  4  body length B           F × (u16 path length, path (UTF-8, relative),
//! 12  4  CRC-32C of the body            u64 length, u32 CRC-32C of the file's bytes)
//! 16  B  body                    u32 state length S, S bytes of state (opaque)
//! ```

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};

use bytes::Bytes;

use crate::error::{IoContext, Result, StorageError};
use crate::fsutil;

const MAGIC: &[u8; 4] = b"RNMF";
const VERSION: u16 = 1;
const HEADER: usize = 16;
/// Largest manifest accepted (header included).
pub const MANIFEST_BYTES_MAX: usize = 64 << 20;
/// Longest relative path a manifest may name.
pub const PATH_BYTES_MAX: usize = 1024;

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Path relative to the checkpoint directory; never absolute, never `..`.
    pub path: String,
    /// Length in bytes.
    pub len: u64,
    /// CRC-32C of the whole file.
    pub crc32c: u32,
}

impl ManifestFile {
    /// Describes `dir/rel` by reading it.
    pub fn describe(dir: &Path, rel: &str) -> Result<Self> {
        check_path(rel)?;
        let p = dir.join(rel);
        let (len, crc) = file_crc(&p)?;
        Ok(ManifestFile {
            path: rel.to_string(),
            len,
            crc32c: crc,
        })
    }
}

/// A checkpoint manifest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    /// Identifies the checkpoint (the Raft layer's snapshot id).
    pub id: String,
    /// The files that make up the checkpoint.
    pub files: Vec<ManifestFile>,
    /// The state machine's own state (dedup tables, offsets …), encoded by its owner.
    pub state: Bytes,
}

impl Manifest {
    /// Encodes the manifest.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        put_str(&mut body, &self.id)?;
        body.extend_from_slice(&(self.files.len() as u32).to_be_bytes());
        for f in &self.files {
            check_path(&f.path)?;
            put_str(&mut body, &f.path)?;
            body.extend_from_slice(&f.len.to_be_bytes());
            body.extend_from_slice(&f.crc32c.to_be_bytes());
        }
        body.extend_from_slice(&(self.state.len() as u32).to_be_bytes());
        body.extend_from_slice(&self.state);
        if HEADER + body.len() > MANIFEST_BYTES_MAX {
            return Err(StorageError::InvalidArgument(
                "manifest above MANIFEST_BYTES_MAX".into(),
            ));
        }
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes and validates a manifest; any damage is a descriptive error, never a panic.
    pub fn decode(buf: &[u8]) -> std::result::Result<Self, String> {
        if buf.len() < HEADER || &buf[..4] != MAGIC {
            return Err("not a manifest (bad magic or too short)".into());
        }
        if buf[4..6] != VERSION.to_be_bytes() || buf[6..8] != [0, 0] {
            return Err("unsupported manifest version or flags".into());
        }
        let len = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes")) as usize;
        if buf.len() != HEADER + len {
            return Err(format!(
                "body length {len} disagrees with file size {}",
                buf.len()
            ));
        }
        let body = &buf[HEADER..];
        if crc32c::crc32c(body).to_be_bytes() != buf[12..16] {
            return Err("manifest CRC-32C mismatch".into());
        }
        let mut r = Reader { b: body, pos: 0 };
        let id = r.string()?;
        let n = r.u32()? as usize;
        // Each file entry takes at least 14 bytes: bound the allocation by the input.
        let mut files = Vec::with_capacity(n.min(body.len() / 14));
        for _ in 0..n {
            let path = r.string()?;
            check_path(&path).map_err(|e| e.to_string())?;
            files.push(ManifestFile {
                path,
                len: r.u64()?,
                crc32c: r.u32()?,
            });
        }
        let s = r.u32()? as usize;
        let state = Bytes::copy_from_slice(r.take(s)?);
        if r.pos != body.len() {
            return Err("bytes after the manifest state".into());
        }
        Ok(Manifest { id, files, state })
    }

    /// Writes the manifest to `path` atomically (temp file, fsync, rename, directory fsync).
    pub fn write(&self, path: &Path) -> Result<()> {
        fsutil::write_atomic(path, &self.encode()?)
    }

    /// Reads and validates the manifest at `path`.
    ///
    /// # Errors
    /// [`StorageError::Corruption`] for a damaged manifest.
    pub fn read(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).ctx("stat", path)?;
        if meta.len() > MANIFEST_BYTES_MAX as u64 {
            return Err(corrupt(path, "manifest above MANIFEST_BYTES_MAX".into()));
        }
        let buf = std::fs::read(path).ctx("read", path)?;
        Manifest::decode(&buf).map_err(|reason| corrupt(path, reason))
    }

    /// Checks that every listed file exists under `dir` with its recorded length and CRC.
    pub fn verify_files(&self, dir: &Path) -> Result<()> {
        for f in &self.files {
            let p = dir.join(&f.path);
            let (len, crc) = file_crc(&p)?;
            if len != f.len || crc != f.crc32c {
                return Err(corrupt(
                    &p,
                    format!(
                        "expected {} bytes with CRC {:#010x}, found {len} bytes with CRC {crc:#010x}",
                        f.len, f.crc32c
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn corrupt(path: &Path, reason: String) -> StorageError {
    StorageError::Corruption {
        path: path.to_path_buf(),
        position: 0,
        reason,
    }
}

/// Length and CRC-32C of a whole file, read in 1 MiB chunks.
pub fn file_crc(path: &Path) -> Result<(u64, u32)> {
    let mut f = File::open(path).ctx("open", path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut len, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            return Ok((len, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        len += n as u64;
    }
}

fn check_path(p: &str) -> Result<()> {
    let ok = !p.is_empty()
        && p.len() <= PATH_BYTES_MAX
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "bad checkpoint path {p:?}"
        )))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > PATH_BYTES_MAX {
        return Err(StorageError::InvalidArgument(format!(
            "string of {} bytes in manifest",
            s.len()
        )));
    }
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("manifest truncated")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "manifest string is not UTF-8".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Manifest {
        std::fs::create_dir_all(dir.join("p0")).unwrap();
        std::fs::write(dir.join("p0/00000000000000000000.log"), b"segment bytes").unwrap();
        Manifest {
            id: "group-1-term-3-index-99".into(),
            files: vec![ManifestFile::describe(dir, "p0/00000000000000000000.log").unwrap()],
            state: Bytes::from_static(b"dedup+offsets"),
        }
    }

    #[test]
    fn round_trip_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample(dir.path());
        let p = dir.path().join("MANIFEST");
        m.write(&p).unwrap();
        assert!(!dir.path().join("MANIFEST.tmp").exists());
        let back = Manifest::read(&p).unwrap();
        assert_eq!(back, m);
        back.verify_files(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("p0/00000000000000000000.log"),
            b"segment bytez",
        )
        .unwrap();
        assert!(back.verify_files(dir.path()).unwrap_err().is_corruption());
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let enc = sample(dir.path()).encode().unwrap();
        for cut in 0..enc.len() {
            assert!(Manifest::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..enc.len() {
            for bit in 0..8 {
                let mut bad = enc.clone();
                bad[i] ^= 1 << bit;
                assert!(Manifest::decode(&bad).is_err(), "flip {i}.{bit}");
            }
        }
    }

    #[test]
    fn escaping_paths_are_refused() {
        for p in ["../etc/passwd", "/abs", "a/../../b", "", "./x"] {
            let m = Manifest {
                files: vec![ManifestFile {
                    path: p.into(),
                    len: 0,
                    crc32c: 0,
                }],
                ..Default::default()
            };
            assert!(m.encode().is_err(), "{p:?} accepted");
        }
    }
}
