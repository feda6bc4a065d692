//! The WAL's metadata: vote, committed and purged positions in two CRC-protected slots.
//!
//! `wal.meta` holds two 512-byte slots, A at byte 0 and B at byte 512. Each save writes the
//! slot *not* holding the newest state, then fdatasyncs, so a torn write can only damage the
//! slot being written and the other still holds the previous state. Open picks the valid slot
//! with the higher sequence number.
//!
//! Slot layout (big-endian):
//! ```text
//!   0  4  magic "RNWM"           48  1  purged present (0/1)
//!   4  2  version (1)            56  8  purged index
//!   6  2  reserved (0)           64  8  purged term
//!   8  8  sequence number        72  8  purged leader node
//!  16  1  committed present      80  2  vote length V (≤ 256); top bit set = a vote is present
//!  24  8  committed index        82  V  vote bytes (opaque)
//!  32  8  committed term       82+V  4  CRC-32C of bytes 0..82+V
//!  40  8  committed leader node  (unlisted bytes are reserved, 0)
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{IoContext, Result, StorageError};
use crate::fsutil;

/// Largest opaque vote the meta file stores.
pub const VOTE_BYTES_MAX: usize = 256;
const SLOT: usize = 512;
const MAGIC: &[u8; 4] = b"RNWM";
const VERSION: u16 = 1;
/// Name of the meta file (vote, committed and purge points) in a WAL directory.
pub const FILE_NAME: &str = "wal.meta";
/// Where the vote bytes start in a slot (its 2-byte length sits just before).
const VOTE_AT: usize = 82;

/// A position in the Raft log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogPosition {
    /// Term of the entry.
    pub term: u64,
    /// Id of the leader that proposed the entry (Raft log ids name it beside the term); 0 where
    /// the WAL derives a position from its records, which carry only index and term.
    pub leader_node: u64,
    /// Index of the entry.
    pub index: u64,
}

/// What the meta file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalMeta {
    /// The last vote, encoded by the Raft layer.
    pub vote: Option<Bytes>,
    /// The last committed position saved.
    pub committed: Option<LogPosition>,
    /// Entries up to and including this position are purged.
    pub purged: Option<LogPosition>,
}

#[derive(Debug)]
pub(crate) struct MetaFile {
    path: PathBuf,
    file: Arc<File>,
    seq: u64,
    state: WalMeta,
}

impl MetaFile {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE_NAME);
        if !path.exists() {
            let mut init = vec![0u8; 2 * SLOT];
            init[..SLOT].copy_from_slice(&encode(0, &WalMeta::default())?);
            fsutil::write_atomic(&path, &init)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx("open", &path)?;
        let mut buf = vec![0u8; 2 * SLOT];
        let n = file.read_at(&mut buf, 0).ctx("read", &path)?;
        buf.truncate(n);
        let a = buf.get(..SLOT).and_then(decode);
        let b = buf.get(SLOT..2 * SLOT).and_then(decode);
        let (seq, state) = match (a, b) {
            (Some(a), Some(b)) => {
                if a.0 >= b.0 {
                    a
                } else {
                    b
                }
            }
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => {
                return Err(StorageError::Corruption {
                    path,
                    position: 0,
                    reason: "neither WAL meta slot is valid".into(),
                });
            }
        };
        Ok(MetaFile {
            path,
            file: Arc::new(file),
            seq,
            state,
        })
    }

    pub(crate) fn state(&self) -> &WalMeta {
        &self.state
    }

    /// Writes `next` into the older slot and fdatasyncs it.
    pub(crate) fn save(&mut self, next: WalMeta) -> Result<()> {
        let w = self.prepare(next)?;
        w.write()?;
        self.finish(w);
        Ok(())
    }

    /// Encodes `next` for the older slot, to be written by [`MetaWrite::write`] (which may run
    /// without the WAL lock) and then taken in by [`MetaFile::finish`]. Saves must not overlap:
    /// the caller serializes prepare, write and finish.
    pub(crate) fn prepare(&self, next: WalMeta) -> Result<MetaWrite> {
        let seq = self.seq + 1;
        Ok(MetaWrite {
            slot: encode(seq, &next)?,
            at: if seq % 2 == 0 { 0 } else { SLOT as u64 },
            seq,
            next,
            file: Arc::clone(&self.file),
            path: self.path.clone(),
        })
    }

    /// Makes a written save the current state.
    pub(crate) fn finish(&mut self, w: MetaWrite) {
        self.seq = w.seq;
        self.state = w.next;
    }
}

/// One prepared save of the meta file.
pub(crate) struct MetaWrite {
    slot: Vec<u8>,
    at: u64,
    seq: u64,
    next: WalMeta,
    file: Arc<File>,
    path: PathBuf,
}

impl MetaWrite {
    /// Writes the slot and fdatasyncs it.
    pub(crate) fn write(&self) -> Result<()> {
        self.file
            .write_all_at(&self.slot, self.at)
            .ctx("write", &self.path)?;
        self.file.sync_data().ctx("fdatasync", &self.path)
    }
}

fn encode(seq: u64, m: &WalMeta) -> Result<Vec<u8>> {
    let vote = m.vote.as_deref().unwrap_or(&[]);
    if vote.len() > VOTE_BYTES_MAX {
        return Err(StorageError::InvalidArgument(format!(
            "vote of {} bytes exceeds VOTE_BYTES_MAX {VOTE_BYTES_MAX}",
            vote.len()
        )));
    }
    let mut b = vec![0u8; SLOT];
    b[..4].copy_from_slice(MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_be_bytes());
    b[8..16].copy_from_slice(&seq.to_be_bytes());
    for (flag, at, pos) in [(16, 24, m.committed), (48, 56, m.purged)] {
        if let Some(p) = pos {
            b[flag] = 1;
            b[at..at + 8].copy_from_slice(&p.index.to_be_bytes());
            b[at + 8..at + 16].copy_from_slice(&p.term.to_be_bytes());
            b[at + 16..at + 24].copy_from_slice(&p.leader_node.to_be_bytes());
        }
    }
    // The top bit marks a present vote, so an empty vote is distinct from none.
    let vlen = if m.vote.is_some() {
        vote.len() as u16 | 0x8000
    } else {
        0
    };
    b[VOTE_AT - 2..VOTE_AT].copy_from_slice(&vlen.to_be_bytes());
    b[VOTE_AT..VOTE_AT + vote.len()].copy_from_slice(vote);
    let end = VOTE_AT + vote.len();
    let crc = crc32c::crc32c(&b[..end]);
    b[end..end + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(b)
}

fn decode(b: &[u8]) -> Option<(u64, WalMeta)> {
    if b.len() < SLOT || &b[..4] != MAGIC || b[4..6] != VERSION.to_be_bytes() {
        return None;
    }
    let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let vlen_raw = u16::from_be_bytes([b[VOTE_AT - 2], b[VOTE_AT - 1]]);
    let vlen = (vlen_raw & 0x7fff) as usize;
    if vlen > VOTE_BYTES_MAX {
        return None;
    }
    let end = VOTE_AT + vlen;
    if crc32c::crc32c(&b[..end]).to_be_bytes() != b[end..end + 4] {
        return None;
    }
    let pos = |flag: u8, at: usize| match flag {
        0 => Some(None),
        1 => Some(Some(LogPosition {
            index: u64_at(at),
            term: u64_at(at + 8),
            leader_node: u64_at(at + 16),
        })),
        _ => None,
    };
    let meta = WalMeta {
        vote: (vlen_raw & 0x8000 != 0).then(|| Bytes::copy_from_slice(&b[VOTE_AT..end])),
        committed: pos(b[16], 24)?,
        purged: pos(b[48], 56)?,
    };
    Some((u64_at(8), meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_survive_reopen_and_a_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        assert_eq!(m.state(), &WalMeta::default());
        let v1 = WalMeta {
            vote: Some(Bytes::from_static(b"v1")),
            ..Default::default()
        };
        m.save(v1.clone()).unwrap();
        let v2 = WalMeta {
            vote: Some(Bytes::from_static(b"vote-2")),
            committed: Some(LogPosition {
                term: 2,
                leader_node: 5,
                index: 9,
            }),
            purged: Some(LogPosition {
                term: 1,
                leader_node: 4,
                index: 3,
            }),
        };
        m.save(v2.clone()).unwrap();
        drop(m);
        assert_eq!(MetaFile::open(dir.path()).unwrap().state(), &v2);
        // Tear the newest slot (seq 2 lives in slot A): the previous state comes back.
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all_at(&[0xAB; 7], 30).unwrap();
        assert_eq!(MetaFile::open(dir.path()).unwrap().state(), &v1);
        // Both slots bad: corruption, not a silent reset of the vote.
        f.write_all_at(&[0xAB; 7], SLOT as u64 + 30).unwrap();
        assert!(MetaFile::open(dir.path()).unwrap_err().is_corruption());
    }

    #[test]
    fn oversized_vote_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetaFile::open(dir.path()).unwrap();
        let big = WalMeta {
            vote: Some(Bytes::from(vec![1; VOTE_BYTES_MAX + 1])),
            ..Default::default()
        };
        assert!(matches!(m.save(big), Err(StorageError::InvalidArgument(_))));
    }
}
