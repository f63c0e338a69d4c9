//! `--cache-dir`: blocks read from the daemon kept on a local disk across
//! opens and mounts, each file holding one block and the chaining value it
//! was checked against when it crossed, checked again every time it is
//! used. A block that fails the check is dropped and fetched again, so a
//! bad disk under the cache costs a fetch, never a wrong byte.
//!
//! Blocks are named by the daemon's version of their file (device, inode,
//! size, mtime and ctime, which no client can set back) and their index;
//! a file changed at the daemon gets a new name, and its old blocks age out.
//! The least recently used go first when the cache is over its size.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tern_core::Entry;

/// Bytes before a block's data: its chaining value.
const HEADER: usize = 32;
/// Eviction stops at this share of the limit, so it is not run per block.
const LOW_WATER: f64 = 0.9;

/// A block cache on disk, shared by every open file of a mount.
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    used: AtomicU64,
    evicting: Mutex<()>,
    next_tmp: AtomicU64,
}

/// The cache's name for one version of a file.
#[derive(Clone, Copy)]
pub struct Version([u8; 16]);

impl DiskCache {
    /// The cache in `dir` (made if missing), holding at most `limit`
    /// bytes. Temporary files a stopped mount left are removed.
    pub fn open(dir: &Path, limit: u64) -> std::io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        let c = DiskCache {
            dir: dir.to_path_buf(),
            limit,
            used: AtomicU64::new(0),
            evicting: Mutex::new(()),
            next_tmp: AtomicU64::new(0),
        };
        let mut used = 0;
        for (path, len, _) in c.files() {
            if path.extension().is_some_and(|x| x == "tmp") {
                let _ = std::fs::remove_file(&path);
            } else {
                used += len;
            }
        }
        c.used.store(used, Ordering::Relaxed);
        c.evict();
        tracing::info!(dir = %dir.display(), bytes = c.used.load(Ordering::Relaxed), limit, "block cache");
        Ok(c)
    }

    /// The name of `entry`'s version, or None when the daemon gave too
    /// little to tell versions apart (no inode or ctime).
    pub fn version(entry: &Entry) -> Option<Version> {
        let (dev, ino) = entry.file_id?;
        if entry.changed.sec == 0 && entry.changed.nsec == 0 {
            return None;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"tern-mount-cache 1\0");
        for v in [
            dev,
            ino,
            entry.size,
            entry.meta.mtime.sec as u64,
            u64::from(entry.meta.mtime.nsec),
            entry.changed.sec as u64,
            u64::from(entry.changed.nsec),
        ] {
            h.update(&v.to_le_bytes());
        }
        let mut v = [0u8; 16];
        v.copy_from_slice(&h.finalize().as_bytes()[..16]);
        Some(Version(v))
    }

    fn path(&self, v: Version, block: u64) -> PathBuf {
        let hex = tern_core::hash::hex(&v.0);
        self.dir.join(&hex[..2]).join(format!("{hex}-{block}"))
    }

    /// Block `block` of version `v`, `len` bytes at `offset` of the file,
    /// if the cache has it and it still hashes to the chaining value it
    /// crossed with.
    pub fn get(&self, v: Version, block: u64, offset: u64, len: usize) -> Option<Vec<u8>> {
        let path = self.path(v, block);
        let f = File::open(&path).ok()?;
        let mut buf = vec![0u8; HEADER + len];
        let ok = f.read_exact_at(&mut buf, 0).is_ok()
            && f.metadata().is_ok_and(|m| m.len() == buf.len() as u64)
            && buf[..HEADER] == tern_core::hash::cv_at(offset, &buf[HEADER..]);
        if !ok {
            tracing::warn!(file = %path.display(), "a cached block failed its check; fetched again");
            self.remove(&path);
            return None;
        }
        // Recently used: the last to be evicted.
        let _ = f.set_modified(std::time::SystemTime::now());
        buf.drain(..HEADER);
        Some(buf)
    }

    /// Keeps `data`, block `block` of version `v`, checked against `cv`
    /// when it crossed. Failures only cost a later fetch.
    pub fn put(&self, v: Version, block: u64, cv: &[u8; 32], data: &[u8]) {
        let path = self.path(v, block);
        let tmp = path.with_extension(format!(
            "{}-{}.tmp",
            std::process::id(),
            self.next_tmp.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = File::create(&tmp)?;
            f.write_all(cv)?;
            f.write_all(data)?;
            // Not synced: a block lost in a crash is a miss, and one torn
            // is caught by its check.
            std::fs::rename(&tmp, &path)
        })();
        match written {
            Ok(()) => {
                let added = (HEADER + data.len()) as u64;
                if self.used.fetch_add(added, Ordering::Relaxed) + added > self.limit {
                    self.evict();
                }
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!(file = %path.display(), error = %e, "block not cached");
            }
        }
    }

    fn remove(&self, path: &Path) {
        if let Ok(m) = std::fs::metadata(path) {
            if std::fs::remove_file(path).is_ok() {
                let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    Some(u.saturating_sub(m.len()))
                });
            }
        }
    }

    /// Every file under the cache, with its size and last use.
    fn files(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let Ok(top) = std::fs::read_dir(&self.dir) else {
            return out;
        };
        for sub in top.flatten() {
            let Ok(rd) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for e in rd.flatten() {
                if let Ok(m) = e.metadata() {
                    if m.is_file() {
                        out.push((e.path(), m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH)));
                    }
                }
            }
        }
        out
    }

    /// Drops the least recently used blocks until the cache is below its
    /// low-water mark; the count is taken from the disk again.
    fn evict(&self) {
        let Ok(_one) = self.evicting.try_lock() else {
            return;
        };
        let mut files = self.files();
        let mut used: u64 = files.iter().map(|f| f.1).sum();
        let target = (self.limit as f64 * LOW_WATER) as u64;
        if used > self.limit {
            files.sort_by_key(|f| f.2);
            for (path, len, _) in files {
                if used <= target {
                    break;
                }
                if std::fs::remove_file(&path).is_ok() {
                    used -= len;
                }
            }
        }
        self.used.store(used, Ordering::Relaxed);
    }

    /// Bytes held.
    #[cfg(test)]
    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(size: u64) -> Entry {
        Entry {
            name: "f".into(),
            kind: tern_core::Kind::File,
            size,
            meta: Default::default(),
            target: None,
            file_id: Some((1, 2)),
            nlink: 1,
            allocated: size,
            changed: tern_core::entry::Time { sec: 5, nsec: 6 },
        }
    }

    #[test]
    fn a_block_comes_back_only_while_it_hashes_to_its_value() {
        let d = tempfile::tempdir().expect("test");
        let c = DiskCache::open(d.path(), 1 << 30).expect("test");
        let v = DiskCache::version(&entry(3 << 20)).expect("test");
        let data = vec![7u8; 1 << 20];
        let cv = tern_core::hash::cv_at(1 << 20, &data);
        c.put(v, 1, &cv, &data);
        assert_eq!(c.get(v, 1, 1 << 20, data.len()).as_deref(), Some(&data[..]));
        assert!(c.get(v, 2, 2 << 20, data.len()).is_none());
        // A byte changed on the disk: dropped, not returned.
        let path = c.path(v, 1);
        let f = std::fs::OpenOptions::new().write(true).open(&path).expect("test");
        f.write_all_at(b"x", 100).expect("test");
        assert!(c.get(v, 1, 1 << 20, data.len()).is_none());
        assert!(!path.exists());
        assert_eq!(c.used(), 0);
    }

    #[test]
    fn another_version_is_another_name() {
        let a = entry(10);
        let mut b = entry(10);
        b.changed.nsec += 1;
        let (va, vb) = (
            DiskCache::version(&a).expect("test"),
            DiskCache::version(&b).expect("test"),
        );
        assert_ne!(va.0, vb.0);
        let mut c = entry(10);
        c.file_id = None;
        assert!(DiskCache::version(&c).is_none());
    }

    #[test]
    fn the_oldest_blocks_go_when_it_is_full() {
        let d = tempfile::tempdir().expect("test");
        let block = 64 << 10;
        let c = DiskCache::open(d.path(), 3 * (block as u64 + HEADER as u64)).expect("test");
        let v = DiskCache::version(&entry(10 << 20)).expect("test");
        let data = vec![1u8; block];
        for b in 0..3u64 {
            c.put(v, b, &tern_core::hash::cv_at(b * block as u64, &data), &data);
            // Distinct ages for the order of eviction.
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + b);
            File::options()
                .write(true)
                .open(c.path(v, b))
                .expect("test")
                .set_modified(t)
                .expect("test");
        }
        c.put(v, 3, &tern_core::hash::cv_at(3 * block as u64, &data), &data);
        assert!(!c.path(v, 0).exists(), "the oldest block is evicted");
        assert!(c.path(v, 3).exists(), "the newest is kept");
        assert!(c.used() <= 3 * (block as u64 + HEADER as u64));
        // A new mount counts what is there.
        let again = DiskCache::open(d.path(), 1 << 30).expect("test");
        assert_eq!(again.used(), c.used());
    }
}
