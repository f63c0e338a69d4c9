//! The journal of a multipart upload, kept on the client: the store's
//! upload id, the version of the file being sent, and each part the store
//! took with the chaining value of its bytes and the ETag it gave. A later
//! run that sends the same version reconciles it with `ListParts` and sends
//! only the parts the store does not hold.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use tern_core::endpoint::FileSpec;

const MAGIC: &str = "tern-s3-upload 1";

/// A part the store took: its number, the chaining value of its bytes,
/// and the ETag the store gave for it.
pub type Part = (u16, [u8; 32], String);

/// An upload's journal file.
pub struct Journal {
    path: PathBuf,
    file: File,
}

/// What a journal left by an earlier run says.
pub struct Found {
    /// The store's upload id.
    pub upload_id: String,
    /// Whether it was made for the same version of the file.
    pub same_version: bool,
    /// The parts recorded.
    pub parts: Vec<Part>,
}

fn version(spec: &FileSpec) -> String {
    let m = spec.source_meta.mtime;
    let c = spec.source_changed;
    format!(
        "{} {} {} {} {} {}",
        spec.size, spec.chunk_size, m.sec, m.nsec, c.sec, c.nsec
    )
}

/// Where the journal of an upload to `id` (the store, bucket and key) lives
/// in `dir`.
pub fn path_for(dir: &Path, id: &str) -> PathBuf {
    let h = blake3::hash(id.as_bytes()).to_hex();
    dir.join(format!("{}.upload", &h[..32]))
}

/// The journal at `path`, if one is there and readable.
pub fn read(path: &Path, spec: &FileSpec) -> Option<Found> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return None;
    }
    let upload_id = lines.next()?.trim().to_string();
    if upload_id.is_empty() {
        return None;
    }
    let same_version = lines.next()? == version(spec);
    // A line cut short by a crash is the last one, and is ignored.
    let parts = lines
        .filter_map(|l| {
            let mut f = l.split(' ');
            let n: u16 = f.next()?.parse().ok()?;
            let cv: [u8; 32] = tern_core::hash::unhex(f.next()?)?.try_into().ok()?;
            let etag = f.next()?.to_string();
            (!etag.is_empty() && f.next().is_none()).then_some((n, cv, etag))
        })
        .collect();
    Some(Found {
        upload_id,
        same_version,
        parts,
    })
}

impl Journal {
    /// A new journal at `path` for `upload_id`, replacing any there.
    pub fn create(path: &Path, upload_id: &str, spec: &FileSpec) -> std::io::Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("upload-new");
        let mut f = File::create(&tmp)?;
        write!(f, "{MAGIC}\n{upload_id}\n{}\n", version(spec))?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)?;
        Journal::reopen(path)
    }

    /// The journal at `path`, to append to.
    pub fn reopen(path: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Records a part the store took. One write per line, so parts uploaded
    /// at once never interleave.
    pub fn part(&self, n: u16, cv: &[u8; 32], etag: &str) -> std::io::Result<()> {
        let line = format!("{n} {} {}\n", tern_core::hash::hex(cv), etag.replace([' ', '\n'], ""));
        (&self.file).write_all(line.as_bytes())?;
        self.file.sync_data()
    }

    /// The upload is complete or given up: the journal goes.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64) -> FileSpec {
        FileSpec {
            size,
            chunk_size: 8 << 20,
            resumable: true,
            durable: true,
            source_meta: Default::default(),
            source_changed: Default::default(),
        }
    }

    #[test]
    fn parts_recorded_come_back_for_the_same_version_only() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = path_for(d.path(), "http://s/b/key");
        let j = Journal::create(&p, "UPLOAD-1", &spec(100 << 20)).expect("create");
        j.part(1, &[7u8; 32], "\"etag-1\"").expect("part");
        j.part(3, &[9u8; 32], "\"etag-3\"").expect("part");
        // A line cut short by a crash.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .expect("open")
            .write_all(b"4 abc")
            .expect("write");
        let f = read(&p, &spec(100 << 20)).expect("read");
        assert_eq!(f.upload_id, "UPLOAD-1");
        assert!(f.same_version);
        assert_eq!(f.parts.len(), 2);
        assert_eq!(f.parts[1], (3, [9u8; 32], "\"etag-3\"".to_string()));
        assert!(!read(&p, &spec(101 << 20)).expect("read").same_version);
        j.remove();
        assert!(read(&p, &spec(100 << 20)).is_none());
    }
}
