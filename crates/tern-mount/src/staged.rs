//! Files being written through the mount: a local staging file per path,
//! uploaded to the daemon's commit path (temporary name, every chunk
//! checked, the whole file verified, atomic rename) on close or fsync, so
//! nobody at the daemon sees a half-written file.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use tern_core::endpoint::{BatchBody, BatchItem, BatchOptions};
use tern_core::entry::{Meta, Time};
use tern_core::{Dest, Entry, FileSpec, Kind};
use tern_net::remote::RemoteEndpoint;

/// Chunks of an upload: the engine's default, checked one by one.
const CHUNK: u64 = tern_core::engine::DEFAULT_CHUNK_SIZE;
/// Chunks in flight at once in an upload.
const UPLOAD_STREAMS: u64 = 4;
/// Files up to this size are uploaded in one request.
const SMALL: u64 = 1 << 20;

/// A path being written: its staging file, and whether it holds changes
/// the daemon does not have yet.
pub struct Staged {
    /// Where it goes, below the mounted root (a rename moves it).
    pub rel: Mutex<PathBuf>,
    /// The staging file.
    pub file: File,
    path: PathBuf,
    /// Changes not yet uploaded.
    pub dirty: AtomicBool,
    /// Permission bits it is published with.
    pub mode: AtomicU32,
    /// Open handles.
    pub opens: AtomicUsize,
    /// One upload at a time.
    publishing: Mutex<()>,
    /// The owner the daemon gave the version it had, for the attributes.
    pub owner: (u32, u32),
    /// Uploads done.
    pub uploads: AtomicU64,
    /// Unlinked or replaced here: its handles write to a file nobody names,
    /// which is never uploaded.
    orphaned: AtomicBool,
    /// The daemon's version (size, mtime) it was staged from or last
    /// uploaded as; None: there was none.
    base: Mutex<Option<(u64, Time)>>,
}

/// How staged files are committed in a batch: durable, owners left to
/// the daemon.
fn batch_options() -> BatchOptions {
    BatchOptions {
        owner: false,
        sync: true,
        verify: false,
        cancel: Default::default(),
    }
}

/// First line of a staging file's manifest.
const MANIFEST_MAGIC: &str = "tern-staged 1";

impl Staged {
    /// A new, empty staging file in `dir` for `rel`.
    pub fn create(dir: &Path, rel: &Path, mode: u32, owner: (u32, u32)) -> std::io::Result<Staged> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            "{}-{}.staged",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let s = Staged {
            rel: Mutex::new(rel.to_path_buf()),
            file,
            path,
            dirty: AtomicBool::new(false),
            mode: AtomicU32::new(mode & 0o7777),
            opens: AtomicUsize::new(0),
            publishing: Mutex::new(()),
            owner,
            uploads: AtomicU64::new(0),
            orphaned: AtomicBool::new(false),
            base: Mutex::new(None),
        };
        Ok(s)
    }

    /// The staging files an earlier mount left in `dir` (it stopped before
    /// it could upload them), each with its manifest's path, mode and the
    /// daemon's version it was made from.
    pub fn left_in(dir: &Path) -> Vec<Staged> {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "staged") {
                continue;
            }
            match Staged::reopen(&path) {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "a staging file without a usable manifest; left alone")
                }
            }
        }
        out
    }

    fn reopen(path: &Path) -> std::io::Result<Staged> {
        use std::os::unix::ffi::OsStringExt;
        let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
        let text = std::fs::read_to_string(path.with_extension("manifest"))?;
        let mut lines = text.lines();
        if lines.next() != Some(MANIFEST_MAGIC) {
            return Err(bad("not a tern staging manifest"));
        }
        let rel = lines
            .next()
            .and_then(tern_core::hash::unhex)
            .ok_or_else(|| bad("no path"))?;
        let rel = PathBuf::from(std::ffi::OsString::from_vec(rel));
        if rel.as_os_str().is_empty()
            || rel.is_absolute()
            || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad("a path that is not below the mount"));
        }
        let mode = lines
            .next()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .ok_or_else(|| bad("no mode"))?;
        let base = match lines.next() {
            Some("-") => None,
            Some(b) => {
                let v: Vec<&str> = b.split(' ').collect();
                match (
                    v.first().and_then(|x| x.parse().ok()),
                    v.get(1).and_then(|x| x.parse().ok()),
                    v.get(2).and_then(|x| x.parse().ok()),
                ) {
                    (Some(size), Some(sec), Some(nsec)) => Some((size, Time { sec, nsec })),
                    _ => return Err(bad("a bad base version")),
                }
            }
            None => return Err(bad("no base version")),
        };
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        let md = file.metadata()?;
        Ok(Staged {
            rel: Mutex::new(rel),
            file,
            path: path.to_path_buf(),
            dirty: AtomicBool::new(true),
            mode: AtomicU32::new(mode & 0o7777),
            opens: AtomicUsize::new(0),
            publishing: Mutex::new(()),
            owner: (md.uid(), md.gid()),
            uploads: AtomicU64::new(0),
            orphaned: AtomicBool::new(false),
            base: Mutex::new(base),
        })
    }

    /// Records where it goes, its mode and the daemon's version it replaces
    /// beside the staging file, so that a later mount can finish its upload
    /// if this one stops first. Written to a temporary name and renamed.
    pub fn save_manifest(&self) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::ffi::OsStrExt;
        let rel = self.rel();
        let base = match self.base.lock().ok().and_then(|b| *b) {
            Some((size, t)) => format!("{size} {} {}", t.sec, t.nsec),
            None => "-".into(),
        };
        let text = format!(
            "{MANIFEST_MAGIC}\n{}\n{:o}\n{base}\n",
            tern_core::hash::hex(rel.as_os_str().as_bytes()),
            self.mode.load(Ordering::Relaxed)
        );
        let final_path = self.path.with_extension("manifest");
        let tmp = self.path.with_extension("manifest-new");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, &final_path)
    }

    /// The daemon's version (size, mtime) this file was staged from or last
    /// uploaded as.
    pub fn set_base(&self, base: Option<(u64, Time)>) {
        if let Ok(mut b) = self.base.lock() {
            *b = base;
        }
    }

    /// The daemon's version this file was staged from or last uploaded as.
    pub fn base(&self) -> Option<(u64, Time)> {
        self.base.lock().ok().and_then(|b| *b)
    }

    /// Where it goes now.
    pub fn rel(&self) -> PathBuf {
        self.rel.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Its attributes as the mount shows them: the staging file's size and
    /// times, the mode it will be published with.
    pub fn entry(&self) -> std::io::Result<Entry> {
        let md = self.file.metadata()?;
        let t = |sec: i64, nsec: i64| Time {
            sec,
            nsec: nsec.clamp(0, 999_999_999) as u32,
        };
        Ok(Entry {
            name: self.rel().file_name().map(|n| n.to_os_string()).unwrap_or_default(),
            kind: Kind::File,
            size: md.len(),
            meta: Meta {
                mode: self.mode.load(Ordering::Relaxed),
                uid: self.owner.0,
                gid: self.owner.1,
                mtime: t(md.mtime(), md.mtime_nsec()),
                atime: t(md.atime(), md.atime_nsec()),
            },
            target: None,
            file_id: None,
            nlink: 1,
            allocated: md.blocks() * 512,
            changed: t(md.ctime(), md.ctime_nsec()),
        })
    }

    /// Uploads the staging file to its path if it holds changes: written at
    /// a temporary name, each chunk checked by the daemon against its
    /// chaining value, the whole file's BLAKE3 verified there, then renamed
    /// into place.
    pub fn publish(&self, ep: &RemoteEndpoint) -> tern_core::Result<()> {
        let _one = self
            .publishing
            .lock()
            .map_err(|_| tern_core::Error::Internal("publish lock poisoned".into()))?;
        if !self.dirty.swap(false, Ordering::AcqRel) || self.orphaned.load(Ordering::Acquire) {
            return Ok(());
        }
        let rel = self.rel();
        let before = self.entry().ok();
        let r = self.upload(ep, &rel);
        if r.is_err() {
            // Still to do: the next flush, fsync or close tries again.
            self.dirty.store(true, Ordering::Release);
        } else {
            self.uploads.fetch_add(1, Ordering::Relaxed);
            self.set_base(before.map(|e| (e.size, e.meta.mtime)));
            if let Err(e) = self.save_manifest() {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot update the staging manifest");
            }
        }
        r
    }

    /// Fills the staging file with the first `upto` bytes of the daemon's
    /// version `entry` of `rel`, each block checked against the chaining
    /// value sent with it, and gives it that version's times.
    pub fn fill(&self, ep: &RemoteEndpoint, rel: &Path, entry: &Entry, upto: u64) -> tern_core::Result<()> {
        let io = |op: &'static str| move |e: std::io::Error| tern_core::Error::io(&self.path, op, e);
        let end = entry.size.min(upto);
        if end > 0 {
            let src = tern_core::Source::open(ep, rel, entry)?;
            let mut buf = vec![0u8; crate::reader::BLOCK.min(end) as usize];
            let mut off = 0;
            while off < end {
                let data = &mut buf[..crate::reader::BLOCK.min(end - off) as usize];
                src.read_exact_at(off, data)?;
                if src.sent_cv(off) != Some(tern_core::hash::cv_at(off, data)) {
                    return Err(tern_core::Error::Other {
                        path: rel.to_path_buf(),
                        message: format!("the bytes at offset {off} do not hash to what the daemon sent with them"),
                    });
                }
                self.file.write_all_at(data, off).map_err(io("write"))?;
                off += data.len() as u64;
            }
        }
        self.file.set_len(end).map_err(io("truncate"))?;
        let times = std::fs::FileTimes::new()
            .set_modified(entry.meta.mtime.to_system())
            .set_accessed(entry.meta.atime.to_system());
        self.file.set_times(times).map_err(io("set times"))?;
        Ok(())
    }

    fn upload(&self, ep: &RemoteEndpoint, rel: &Path) -> tern_core::Result<()> {
        let io = |op: &'static str| move |e: std::io::Error| tern_core::Error::io(&self.path, op, e);
        let e = self.entry().map_err(io("stat"))?;
        if e.size <= SMALL {
            return self.upload_small(ep, rel, e);
        }
        let spec = FileSpec {
            size: e.size,
            chunk_size: CHUNK,
            // A journal at the daemon: an upload cut off (the connection, a
            // restart of the mount) sends only the chunks it lacks.
            resumable: e.size > CHUNK,
            durable: true,
            source_meta: e.meta.clone(),
            source_changed: e.changed,
        };
        let spec_resumable = spec.resumable;
        let w = ep.create(rel, &spec)?;
        let chunks = tern_core::hash::chunk_count(e.size, CHUNK);
        // Chunks cross on several streams at once, each checked by the
        // daemon against its chaining value as it arrives; the daemon
        // publishes only a file with every chunk in.
        let next = AtomicU64::new(0);
        let workers = chunks.clamp(1, UPLOAD_STREAMS);
        let resumed: std::collections::HashMap<u64, [u8; 32]> = w.resumed().into_iter().collect();
        let result = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| -> tern_core::Result<()> {
                        let mut buf = vec![0u8; CHUNK.min(e.size) as usize];
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= chunks || e.size == 0 {
                                return Ok(());
                            }
                            let off = i * CHUNK;
                            let data = &mut buf[..CHUNK.min(e.size - off) as usize];
                            self.file.read_exact_at(data, off).map_err(io("read"))?;
                            let cv = (chunks > 1).then(|| tern_core::hash::chunk_cv(off, data));
                            if cv.is_some() && resumed.get(&i) == cv.as_ref() {
                                // The daemon kept this chunk from an earlier try.
                                continue;
                            }
                            w.write_chunk(i, off, data, &[], cv.as_ref())?;
                        }
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(tern_core::Error::Internal("an upload thread panicked".into())))
            })
        });
        let result = result.and_then(|()| {
            // Changed while it was read: uploaded again by the next flush.
            if self.entry().map_err(io("stat"))?.size != e.size {
                return Err(tern_core::Error::Changed(self.path.clone()));
            }
            w.set_meta(&e.meta, false, &Vec::new())?;
            w.sync()
        });
        match result {
            Ok(()) => w.publish(),
            Err(err) => {
                // Kept at the daemon, journal and all, for the next try.
                w.abort(spec_resumable);
                Err(err)
            }
        }
    }
}

impl Staged {
    /// No name holds it any more: nothing it holds is uploaded from now on.
    /// Waits for an upload in progress, so none lands after this returns.
    pub fn orphan(&self) {
        let _wait = self.publishing.lock();
        self.orphaned.store(true, Ordering::Release);
        self.dirty.store(false, Ordering::Release);
    }

    /// Holds off uploads (an upload in progress finishes first) while its
    /// name changes at the daemon.
    pub fn hold(&self) -> std::sync::MutexGuard<'_, ()> {
        match self.publishing.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// A small file in one request: its bytes, hash and metadata as a batch
    /// of one, made durable and renamed into place by the daemon.
    fn upload_small(&self, ep: &RemoteEndpoint, rel: &Path, e: Entry) -> tern_core::Result<()> {
        let item = self.batch_item(rel, e)?;
        ep.write_batch(vec![item], &batch_options())
            .pop()
            .unwrap_or_else(|| Err(tern_core::Error::Internal("a batch of one answered nothing".into())))
    }

    /// The file as an item of a batch: its bytes, hash and metadata.
    fn batch_item(&self, rel: &Path, e: Entry) -> tern_core::Result<BatchItem> {
        let mut data = vec![0u8; e.size as usize];
        self.file
            .read_exact_at(&mut data, 0)
            .map_err(|x| tern_core::Error::io(&self.path, "read", x))?;
        let spec = FileSpec {
            size: e.size,
            chunk_size: CHUNK,
            resumable: false,
            durable: true,
            source_meta: e.meta.clone(),
            source_changed: e.changed,
        };
        Ok(BatchItem {
            rel: rel.to_path_buf(),
            meta: e.meta,
            body: BatchBody::File {
                hash: tern_core::hash::hash_bytes(&data),
                data,
                holes: Vec::new(),
                xattrs: Vec::new(),
                spec,
            },
        })
    }

    /// Whether it is small enough to go in a batch with others.
    pub fn is_small(&self) -> bool {
        self.file.metadata().is_ok_and(|m| m.len() <= SMALL)
    }

    /// Uploads several small files in one request (those with changes; the
    /// others are left as they are), each held from other uploads
    /// meanwhile. What failed keeps its changes for the next try. Returns
    /// how many failed, and the first failure.
    pub fn publish_batch(ep: &RemoteEndpoint, files: &[std::sync::Arc<Staged>]) -> (usize, Option<tern_core::Error>) {
        let _held: Vec<_> = files.iter().map(|s| s.hold()).collect();
        let mut items = Vec::new();
        let mut sent = Vec::new();
        let mut first_err = None;
        let mut failed = 0;
        for s in files {
            if s.orphaned.load(Ordering::Acquire) || !s.dirty.swap(false, Ordering::AcqRel) {
                continue;
            }
            let made = s
                .entry()
                .map_err(|x| tern_core::Error::io(&s.path, "stat", x))
                .and_then(|e| {
                    let version = (e.size, e.meta.mtime);
                    s.batch_item(&s.rel(), e).map(|item| (item, version))
                });
            match made {
                Ok((item, version)) => {
                    items.push(item);
                    sent.push((s, version));
                }
                Err(e) => {
                    s.dirty.store(true, Ordering::Release);
                    failed += 1;
                    first_err.get_or_insert(e);
                }
            }
        }
        if items.is_empty() {
            return (failed, first_err);
        }
        let results = ep.write_batch(items, &batch_options());
        for (i, (s, version)) in sent.into_iter().enumerate() {
            match results.get(i) {
                Some(Ok(())) => {
                    s.uploads.fetch_add(1, Ordering::Relaxed);
                    s.set_base(Some(version));
                    let _ = s.save_manifest();
                }
                Some(Err(e)) => {
                    s.dirty.store(true, Ordering::Release);
                    failed += 1;
                    tracing::warn!(path = %s.rel().display(), error = %e, "upload failed; kept staged");
                    first_err.get_or_insert_with(|| tern_core::Error::Other {
                        path: s.rel(),
                        message: e.to_string(),
                    });
                }
                None => {
                    s.dirty.store(true, Ordering::Release);
                    failed += 1;
                    first_err.get_or_insert(tern_core::Error::Internal("a batch answered short".into()));
                }
            }
        }
        (failed, first_err)
    }

    /// The staging file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Changes the daemon never got stay where the user was told, with
        // their manifest, for the next mount to upload.
        if !self.dirty.load(Ordering::Acquire) || self.orphaned.load(Ordering::Acquire) {
            let _ = std::fs::remove_file(self.path.with_extension("manifest"));
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
