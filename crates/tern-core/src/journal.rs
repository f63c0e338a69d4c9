//! The resume journal: which chunks of a partial file were written, and
//! their BLAKE3 chaining values.
//!
//! It lives beside the temporary file and is removed when the file is
//! committed. Format (little-endian):
//!
//! ```text
//! header, 64 bytes:  "TERNJNL\x02" | size u64 | chunk_size u64 | mtime_sec i64
//!                    | mtime_nsec u32 | ctime_sec i64 | ctime_nsec u32
//!                    | keyed-blake3(key, bytes 0..48)[..16]
//! record, 48 bytes:  chunk index u64 | chaining value [32]
//!                    | keyed-blake3(key, header tag | bytes 0..40)[..8]
//! ```
//!
//! Records are appended after the chunk's data was written, without fsync.
//! That is safe because a record is only a claim: on resume every recorded
//! chunk is read back from the temporary file and re-hashed, and only chunks
//! whose hash still matches are kept. A torn or corrupt record fails its own
//! check and is ignored, as is a journal written for another source version.
//!
//! The checks are keyed. A daemon keys them with a secret derived from its
//! identity, so a journal planted by anyone without that secret is ignored
//! as a torn one would be; local copies use [`DEFAULT_KEY`], which is public
//! and only separates journals from arbitrary bytes. Either way a record
//! says nothing about the *source*: the engine re-hashes every resumed chunk
//! of its source before it skips sending it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use blake3::hazmat::ChainingValue;

use crate::endpoint::FileSpec;

const MAGIC: &[u8; 8] = b"TERNJNL\x02";
const HEADER_LEN: usize = 64;
const RECORD_LEN: usize = 48;
/// Records beyond one per chunk that a legitimate journal may hold: a chunk
/// rewritten after a failed re-check is recorded again.
const SLACK_RECORDS: u64 = 64;

/// The key of journals written without a secret (local copies). Public:
/// it makes a journal's checks mean "written by tern for this source
/// version", not "written by someone who knows a secret".
pub const DEFAULT_KEY: [u8; 32] = *b"tern journal default key 2026-12";

/// A journal key: the MAC key of the header and records.
pub type Key = [u8; 32];

/// The longest journal a file of `spec` can legitimately have: its header,
/// one record per chunk twice over (a resumed chunk is recorded again when
/// it is rewritten), and some slack. Reading never goes further.
pub fn max_len(spec: &FileSpec) -> u64 {
    let chunks = crate::hash::chunk_count(spec.size, spec.chunk_size);
    HEADER_LEN as u64 + RECORD_LEN as u64 * chunks.saturating_mul(2).saturating_add(SLACK_RECORDS)
}

fn header(spec: &FileSpec, key: &Key) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&spec.size.to_le_bytes());
    h[16..24].copy_from_slice(&spec.chunk_size.to_le_bytes());
    h[24..32].copy_from_slice(&spec.source_meta.mtime.sec.to_le_bytes());
    h[32..36].copy_from_slice(&spec.source_meta.mtime.nsec.to_le_bytes());
    h[36..44].copy_from_slice(&spec.source_changed.sec.to_le_bytes());
    h[44..48].copy_from_slice(&spec.source_changed.nsec.to_le_bytes());
    let sum = blake3::keyed_hash(key, &h[..48]);
    h[48..64].copy_from_slice(&sum.as_bytes()[..16]);
    h
}

/// The header's tag, which every record's check covers: a record copied
/// from another file's journal fails it.
fn tag(header: &[u8; HEADER_LEN]) -> [u8; 16] {
    let mut t = [0u8; 16];
    t.copy_from_slice(&header[48..64]);
    t
}

fn record(key: &Key, tag: &[u8; 16], index: u64, cv: &ChainingValue) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0..8].copy_from_slice(&index.to_le_bytes());
    r[8..40].copy_from_slice(cv);
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(tag);
    h.update(&r[..40]);
    r[40..48].copy_from_slice(&h.finalize().as_bytes()[..8]);
    r
}

/// Opens an existing side file for reading without following a symlink or
/// waiting on a FIFO, and only if it is a regular file with no other name:
/// anything else was not written by tern and is not read.
pub(crate) fn open_side_file(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let md = f.metadata()?;
    if !md.is_file() || md.nlink() != 1 {
        return Err(io::Error::new(ErrorKind::InvalidData, "not a side file tern wrote"));
    }
    Ok(f)
}

/// Reads the records of the journal at `path` if it was written for `spec`
/// with `key`. Returns an empty list when there is no usable journal. A
/// chunk recorded more than once keeps its last record.
pub fn load(path: &Path, spec: &FileSpec, key: &Key) -> Vec<(u64, ChainingValue)> {
    let Ok(f) = open_side_file(path) else {
        return Vec::new();
    };
    let max = max_len(spec);
    let len = f.metadata().map_or(0, |m| m.len()).min(max);
    let mut data = Vec::with_capacity(len as usize);
    let head = header(spec, key);
    if f.take(max).read_to_end(&mut data).is_err() || data.len() < HEADER_LEN || data[..HEADER_LEN] != head {
        return Vec::new();
    }
    let tag = tag(&head);
    let chunks = crate::hash::chunk_count(spec.size, spec.chunk_size);
    let mut out = BTreeMap::new();
    for r in data[HEADER_LEN..].chunks_exact(RECORD_LEN) {
        let mut index = [0u8; 8];
        index.copy_from_slice(&r[0..8]);
        let index = u64::from_le_bytes(index);
        let mut cv: ChainingValue = [0; 32];
        cv.copy_from_slice(&r[8..40]);
        if index < chunks && record(key, &tag, index, &cv)[..] == r[..] {
            out.insert(index, cv);
        }
    }
    out.into_iter().collect()
}

/// An open journal that records are appended to.
#[derive(Debug)]
pub struct Journal {
    file: File,
    key: Key,
    tag: [u8; 16],
}

impl Journal {
    /// Replaces whatever is at `path` with a new journal holding `records`.
    /// The old name is unlinked first, never truncated: if it was a hard
    /// link or a FIFO planted there, its other name is left alone.
    pub fn create(path: &Path, spec: &FileSpec, key: &Key, records: &[(u64, ChainingValue)]) -> io::Result<Journal> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let head = header(spec, key);
        let tag = tag(&head);
        let mut buf = Vec::with_capacity(HEADER_LEN + records.len() * RECORD_LEN);
        buf.extend_from_slice(&head);
        for (i, cv) in records {
            buf.extend_from_slice(&record(key, &tag, *i, cv));
        }
        // O_APPEND from the start: appends from several threads must not
        // interleave within a record.
        let mut file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        file.write_all(&buf)?;
        Ok(Journal { file, key: *key, tag })
    }

    /// Records that chunk `index` with chaining value `cv` was written.
    pub fn append(&self, index: u64, cv: &ChainingValue) -> io::Result<()> {
        // One write(2) on an O_APPEND file: records never interleave.
        (&self.file).write_all(&record(&self.key, &self.tag, index, cv))
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

    const K: Key = [7; 32];

    #[test]
    fn roundtrip_and_rejections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("j");
        let s = spec(10_000);
        let j = Journal::create(&p, &s, &K, &[(1, [1; 32])]).expect("create");
        j.append(3, &[3; 32]).expect("append");
        j.append(1, &[1; 32]).expect("append");
        assert_eq!(load(&p, &s, &K), vec![(1, [1; 32]), (3, [3; 32])]);

        // Another source version: nothing is trusted.
        assert!(load(&p, &spec(10_001), &K).is_empty());
        let mut touched = spec(10_000);
        touched.source_changed.nsec += 1;
        assert!(
            load(&p, &touched, &K).is_empty(),
            "same size and mtime, but changed since"
        );

        // A torn trailing record and a corrupted one are dropped.
        let mut bytes = std::fs::read(&p).expect("read");
        bytes[HEADER_LEN + RECORD_LEN + 10] ^= 0xff;
        bytes.extend_from_slice(&[7; 20]);
        std::fs::write(&p, &bytes).expect("write");
        assert_eq!(load(&p, &s, &K), vec![(1, [1; 32])]);

        // Out-of-range indexes are dropped.
        let j = Journal::create(&p, &s, &K, &[]).expect("create");
        j.append(99, &[9; 32]).expect("append");
        assert!(load(&p, &s, &K).is_empty());
        assert!(load(&dir.path().join("missing"), &s, &K).is_empty());
    }

    #[test]
    fn a_chunk_recorded_again_keeps_its_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("j");
        let s = spec(10_000);
        let j = Journal::create(&p, &s, &K, &[(2, [1; 32])]).expect("create");
        j.append(2, &[5; 32]).expect("append");
        assert_eq!(load(&p, &s, &K), vec![(2, [5; 32])]);
    }

    #[test]
    fn a_journal_checked_with_another_key_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("j");
        let s = spec(10_000);
        let j = Journal::create(&p, &s, &DEFAULT_KEY, &[(1, [1; 32])]).expect("create");
        j.append(2, &[2; 32]).expect("append");
        assert_eq!(load(&p, &s, &DEFAULT_KEY).len(), 2);
        assert!(
            load(&p, &s, &K).is_empty(),
            "a journal forged without the key must not count"
        );

        // Records copied from another file's journal (same key, another
        // header) fail their check.
        let q = dir.path().join("k");
        Journal::create(&q, &spec(20_000), &K, &[(1, [1; 32])]).expect("create");
        let theirs = std::fs::read(&q).expect("read");
        let mut mine = std::fs::read(&p).expect("read");
        Journal::create(&p, &s, &K, &[]).expect("create");
        mine.truncate(0);
        mine.extend_from_slice(&std::fs::read(&p).expect("read"));
        mine.extend_from_slice(&theirs[HEADER_LEN..]);
        std::fs::write(&p, &mine).expect("write");
        assert!(load(&p, &s, &K).is_empty());
    }

    #[test]
    fn reading_stops_at_the_longest_legitimate_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("j");
        let s = spec(10_000);
        Journal::create(&p, &s, &K, &[(1, [1; 32])]).expect("create");
        let head = header(&s, &K);
        let far = record(&K, &tag(&head), 4, &[4; 32]);
        // A sparse gigabyte of zeros (torn records), then a valid record:
        // it is only seen if everything before it was read.
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        let at = (1u64 << 30) / RECORD_LEN as u64 * RECORD_LEN as u64 + HEADER_LEN as u64;
        std::os::unix::fs::FileExt::write_all_at(&f, &far, at).expect("write far record");
        assert!(at > max_len(&s));
        assert_eq!(load(&p, &s, &K), vec![(1, [1; 32])]);
    }

    #[test]
    fn fifos_and_hard_links_are_neither_read_nor_written_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = spec(10_000);
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(load(&fifo, &s, &K).is_empty(), "returns at once, without a writer");
        Journal::create(&fifo, &s, &K, &[]).expect("a FIFO is replaced");
        assert!(std::fs::symlink_metadata(&fifo).expect("stat").is_file());

        let other = dir.path().join("other");
        let p = dir.path().join("j");
        Journal::create(&other, &s, &K, &[(1, [1; 32])]).expect("create");
        std::fs::hard_link(&other, &p).expect("link");
        assert!(load(&p, &s, &K).is_empty(), "a journal with two names was planted");
        let before = std::fs::read(&other).expect("read");
        Journal::create(&p, &s, &K, &[])
            .expect("create")
            .append(2, &[2; 32])
            .expect("append");
        assert_eq!(
            std::fs::read(&other).expect("read"),
            before,
            "the other name is untouched"
        );
    }
}
