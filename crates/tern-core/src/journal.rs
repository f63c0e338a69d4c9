//! The resume journal: which chunks of a partial file were written, and
//! their BLAKE3 chaining values.
//!
//! It lives beside the temporary file and is removed when the file is
//! committed. Format (little-endian):
//!
//! ```text
//! header, 64 bytes:  "TERNJNL\x01" | size u64 | chunk_size u64 | mtime_sec i64
//!                    | mtime_nsec u32 | ctime_sec i64 | ctime_nsec u32
//!                    | blake3(bytes 0..48)[..16]
//! record, 48 bytes:  chunk index u64 | chaining value [32] | blake3(bytes 0..40)[..8]
//! ```
//!
//! Records are appended after the chunk's data was written, without fsync.
//! That is safe because a record is only a claim: on resume every recorded
//! chunk is read back from the temporary file and re-hashed, and only chunks
//! whose hash still matches are kept. A torn or corrupt record fails its own
//! check and is ignored, as is a journal written for another source version.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use blake3::hazmat::ChainingValue;

use crate::endpoint::FileSpec;

const MAGIC: &[u8; 8] = b"TERNJNL\x01";
const HEADER_LEN: usize = 64;
const RECORD_LEN: usize = 48;

fn header(spec: &FileSpec) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&spec.size.to_le_bytes());
    h[16..24].copy_from_slice(&spec.chunk_size.to_le_bytes());
    h[24..32].copy_from_slice(&spec.source_meta.mtime.sec.to_le_bytes());
    h[32..36].copy_from_slice(&spec.source_meta.mtime.nsec.to_le_bytes());
    h[36..44].copy_from_slice(&spec.source_changed.sec.to_le_bytes());
    h[44..48].copy_from_slice(&spec.source_changed.nsec.to_le_bytes());
    let sum = blake3::hash(&h[..48]);
    h[48..64].copy_from_slice(&sum.as_bytes()[..16]);
    h
}

fn record(index: u64, cv: &ChainingValue) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..8].copy_from_slice(&index.to_le_bytes());
    r[8..40].copy_from_slice(cv);
    let sum = blake3::hash(&r[..40]);
    r[40..48].copy_from_slice(&sum.as_bytes()[..8]);
    r
}

/// Reads the records of the journal at `path` if it was written for `spec`.
/// Returns an empty list when there is no usable journal.
pub fn load(path: &Path, spec: &FileSpec) -> Vec<(u64, ChainingValue)> {
    let mut data = Vec::new();
    let Ok(mut f) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) else {
        return Vec::new();
    };
    if f.read_to_end(&mut data).is_err() || data.len() < HEADER_LEN || data[..HEADER_LEN] != header(spec) {
        return Vec::new();
    }
    let chunks = crate::hash::chunk_count(spec.size, spec.chunk_size);
    let mut out: Vec<(u64, ChainingValue)> = data[HEADER_LEN..]
        .chunks_exact(RECORD_LEN)
        .filter_map(|r| {
            let index = u64::from_le_bytes(r[0..8].try_into().ok()?);
            let cv: ChainingValue = r[8..40].try_into().ok()?;
            (index < chunks && record(index, &cv)[..] == r[..]).then_some((index, cv))
        })
        .collect();
    out.sort_by_key(|&(i, _)| i);
    out.dedup_by_key(|&mut (i, _)| i);
    out
}

/// An open journal that records are appended to.
#[derive(Debug)]
pub struct Journal {
    file: File,
}

impl Journal {
    /// Creates (or replaces) the journal at `path` with `records` already in it.
    pub fn create(path: &Path, spec: &FileSpec, records: &[(u64, ChainingValue)]) -> io::Result<Journal> {
        let mut buf = Vec::with_capacity(HEADER_LEN + records.len() * RECORD_LEN);
        buf.extend_from_slice(&header(spec));
        for (i, cv) in records {
            buf.extend_from_slice(&record(*i, cv));
        }
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        file.write_all(&buf)?;
        // Appends from several threads must not interleave within a record.
        let file = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        Ok(Journal { file })
    }

    /// Records that chunk `index` with chaining value `cv` was written.
    pub fn append(&self, index: u64, cv: &ChainingValue) -> io::Result<()> {
        // One write(2) on an O_APPEND file: records never interleave.
        (&self.file).write_all(&record(index, cv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{Meta, Time};

    fn spec(size: u64) -> FileSpec {
        FileSpec {
            size,
            chunk_size: 1024,
            resumable: true,
            durable: true,
            source_meta: Meta {
                mtime: Time {
                    sec: 1_700_000_000,
                    nsec: 5,
                },
                ..Meta::default()
            },
            source_changed: Time {
                sec: 1_700_000_001,
                nsec: 6,
            },
        }
    }

    #[test]
    fn roundtrip_and_rejections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("j");
        let s = spec(10_000);
        let j = Journal::create(&p, &s, &[(1, [1; 32])]).expect("create");
        j.append(3, &[3; 32]).expect("append");
        j.append(1, &[1; 32]).expect("append");
        assert_eq!(load(&p, &s), vec![(1, [1; 32]), (3, [3; 32])]);

        // Another source version: nothing is trusted.
        assert!(load(&p, &spec(10_001)).is_empty());
        let mut touched = spec(10_000);
        touched.source_changed.nsec += 1;
        assert!(load(&p, &touched).is_empty(), "same size and mtime, but changed since");

        // A torn trailing record and a corrupted one are dropped.
        let mut bytes = std::fs::read(&p).expect("read");
        bytes[HEADER_LEN + RECORD_LEN + 10] ^= 0xff;
        bytes.extend_from_slice(&[7; 20]);
        std::fs::write(&p, &bytes).expect("write");
        assert_eq!(load(&p, &s), vec![(1, [1; 32])]);

        // Out-of-range indexes are dropped.
        let j = Journal::create(&p, &s, &[]).expect("create");
        j.append(99, &[9; 32]).expect("append");
        assert!(load(&p, &s).is_empty());
        assert!(load(&dir.path().join("missing"), &s).is_empty());
    }
}
