//! The FUSE operations, answered from the daemon.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tern_core::entry::{Meta, Time};
use tern_core::{Dest, Entry, Kind, ReadFile, Source};
use tern_net::remote::RemoteEndpoint;

use crate::cache::DiskCache;
use crate::conn::Conn;
use crate::inodes::{Inodes, ROOT};
use crate::reader::{Pool, Reader};
use crate::staged::Staged;
use crate::writeback::WriteBack;
use crate::MountOptions;

/// The extended attribute holding a file's BLAKE3, as `b3sum` prints it.
const HASH_XATTR: &str = "user.tern.blake3";
/// The longest name a directory entry may have, as on the daemon's side.
const NAME_MAX: usize = 255;
/// What the kernel is told to read and write at once, and `st_blksize`.
const IO_SIZE: u32 = 1 << 20;

/// A directory listed for readdir.
struct DirHandle {
    entries: Vec<Entry>,
}

/// An open file: read from the daemon, or written through a staging file.
#[derive(Clone)]
enum Open {
    Read(Arc<Reader>),
    Write(Arc<Staged>),
}

/// The mounted tree.
pub struct TernFs {
    conn: Arc<Conn>,
    inodes: Mutex<Inodes>,
    /// Open handles, and their inodes.
    files: RwLock<HashMap<u64, (u64, Open)>>,
    pool: Pool,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    ttl: Duration,
    /// Whole-file hashes asked for, by path and version.
    hashes: Mutex<HashMap<(PathBuf, u64, i64, u32), String>>,
    /// Paths being written, by path.
    staged: Mutex<HashMap<PathBuf, Arc<Staged>>>,
    /// Where staging files go; None: mounted read-only.
    staging: Option<PathBuf>,
    /// Names the daemon said are not there, and when.
    absent: Mutex<HashMap<PathBuf, Instant>>,
    /// Directory listings, by path, and when they were made.
    listings: Mutex<HashMap<PathBuf, Listing>>,
    /// `--write-back`: the queue of closed files to upload.
    write_back: Option<WriteBack>,
    /// `--cache-dir`: blocks read, kept on disk.
    cache: Option<Arc<DiskCache>>,
}

/// A directory's entries as the daemon listed them, and when.
type Listing = (Instant, Arc<Vec<Entry>>);

type Res<T> = Result<T, Errno>;

impl TernFs {
    /// A file system over `conn`; the root is stat'ed when first asked for.
    pub fn new(
        conn: Arc<Conn>,
        opts: &MountOptions,
        pool: Pool,
        write_back: Option<WriteBack>,
        cache: Option<Arc<DiskCache>>,
    ) -> TernFs {
        let root = Entry::bare_dir(Default::default());
        let fs = TernFs {
            conn,
            inodes: Mutex::new(Inodes::new(root)),
            files: RwLock::default(),
            pool,
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            ttl: opts.attr_timeout,
            hashes: Mutex::default(),
            staged: Mutex::default(),
            staging: opts.staging.clone(),
            absent: Mutex::default(),
            listings: Mutex::default(),
            write_back,
            cache,
        };
        // The root's own attributes, stale at once so the first getattr asks.
        if let Ok(mut t) = fs.inodes.lock() {
            if let Some(n) = t.get_mut(ROOT) {
                n.seen = Instant::now().checked_sub(opts.attr_timeout * 2).unwrap_or(n.seen);
            }
        }
        fs
    }

    fn fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// The path and the last seen entry of `ino`.
    fn node(&self, ino: u64) -> Res<(PathBuf, Entry, Instant)> {
        let t = self.inodes.lock().map_err(|_| Errno::EIO)?;
        let n = t.named(ino).ok_or(Errno::ESTALE)?;
        Ok((n.rel.clone(), n.entry.clone(), n.seen))
    }

    fn child(&self, parent: u64, name: &OsStr) -> Res<PathBuf> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        match self.inodes.lock().map(|t| t.child_path(parent, name)) {
            Ok(Some(r)) => Ok(r),
            _ => Err(Errno::ESTALE),
        }
    }

    fn staged_at(&self, rel: &Path) -> Option<Arc<Staged>> {
        self.staged.lock().ok().and_then(|s| s.get(rel).cloned())
    }

    /// What the daemon says of `rel` now, or what is being written there.
    fn stat(&self, rel: &Path) -> Res<Option<Entry>> {
        if let Some(s) = self.staged_at(rel) {
            return s.entry().map(Some).map_err(Errno::from);
        }
        self.conn.run(|ep, _| ep.stat(rel)).map_err(|e| errno(&e, rel))
    }

    /// `ino`'s entry, asked again once the attribute timeout has passed.
    fn fresh(&self, ino: u64) -> Res<Entry> {
        let (rel, entry, seen) = self.node(ino)?;
        if seen.elapsed() < self.ttl && self.staged_at(&rel).is_none() {
            return Ok(entry);
        }
        let now = self.stat(&rel)?.ok_or(Errno::ENOENT)?;
        self.note(ino, &now);
        Ok(now)
    }

    fn note(&self, ino: u64, e: &Entry) {
        if let Ok(mut t) = self.inodes.lock() {
            if let Some(n) = t.get_mut(ino) {
                n.entry = e.clone();
                n.seen = Instant::now();
            }
        }
    }

    fn attr(&self, ino: u64, e: &Entry) -> FileAttr {
        let kind = match e.kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
            Kind::Symlink => FileType::Symlink,
            Kind::Special => FileType::RegularFile,
        };
        let size = match e.kind {
            Kind::Symlink => e.target.as_ref().map_or(0, |t| t.as_os_str().len() as u64),
            _ => e.size,
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: e.allocated.div_ceil(512),
            atime: e.meta.atime.to_system(),
            mtime: e.meta.mtime.to_system(),
            ctime: e.changed.to_system(),
            crtime: e.meta.mtime.to_system(),
            kind,
            perm: (e.meta.mode & 0o7777) as u16,
            nlink: e.nlink.max(1) as u32,
            uid: e.meta.uid,
            gid: e.meta.gid,
            rdev: 0,
            flags: 0,
            blksize: IO_SIZE,
        }
    }

    /// Takes a reference to `name` in `parent` for the kernel.
    fn remember(&self, parent: u64, name: &OsStr, e: &Entry) -> Res<FileAttr> {
        let mut t = self.inodes.lock().map_err(|_| Errno::EIO)?;
        let ino = t.remember(parent, name, e.clone());
        Ok(self.attr(ino, e))
    }

    /// The daemon's listing of the directory `rel`, if one is at hand and
    /// younger than the attribute timeout.
    fn listing(&self, rel: &Path) -> Option<Arc<Vec<Entry>>> {
        self.listings.lock().ok().and_then(|l| {
            l.get(rel)
                .filter(|(t, _)| t.elapsed() < self.ttl)
                .map(|(_, v)| v.clone())
        })
    }

    /// A directory's entries: the daemon's listing, with what is being
    /// written in it shown as it is here.
    fn dir_entries(&self, ino: u64) -> Res<Vec<Entry>> {
        let (rel, entry, _) = self.node(ino)?;
        if entry.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let mut entries = match self.listing(&rel) {
            Some(v) => (*v).clone(),
            None => {
                let v = self.conn.run(|ep, _| ep.read_dir(&rel)).map_err(|e| errno(&e, &rel))?;
                if let Ok(mut l) = self.listings.lock() {
                    if l.len() > 4096 {
                        l.clear();
                    }
                    l.insert(rel.clone(), (Instant::now(), Arc::new(v.clone())));
                }
                v
            }
        };
        // tern's own temporary files at the daemon (uploads under way) are
        // no one's files.
        entries.retain(|e| !tern_core::local::is_side_file(&e.name));
        let here: Vec<Arc<Staged>> = match self.staged.lock() {
            Ok(s) => s
                .values()
                .filter(|s| s.rel().parent() == Some(rel.as_path()))
                .cloned()
                .collect(),
            Err(_) => Vec::new(),
        };
        for s in here {
            let Ok(e) = s.entry() else { continue };
            match entries.binary_search_by(|x| x.name.cmp(&e.name)) {
                Ok(i) => entries[i] = e,
                Err(i) => entries.insert(i, e),
            }
        }
        Ok(entries)
    }

    fn open_file(&self, fh: FileHandle) -> Res<Open> {
        let files = self.files.read().map_err(|_| Errno::EIO)?;
        files.get(&fh.0).map(|(_, o)| o.clone()).ok_or(Errno::EBADF)
    }

    /// An open handle of inode `ino`, if it has one.
    fn open_of(&self, ino: u64) -> Option<Open> {
        let files = self.files.read().ok()?;
        files.values().find(|(i, _)| *i == ino).map(|(_, o)| o.clone())
    }

    fn add_open(&self, ino: u64, o: Open) -> Res<u64> {
        let fh = self.fh();
        self.files.write().map_err(|_| Errno::EIO)?.insert(fh, (ino, o));
        Ok(fh)
    }

    fn file_hash(&self, ino: u64) -> Res<String> {
        let (rel, entry, _) = self.node(ino)?;
        if entry.kind != Kind::File {
            return Err(Errno::NO_XATTR);
        }
        if let Some(s) = self.staged_at(&rel) {
            // What is being written: hashed here.
            let mut h = blake3::Hasher::new();
            let mut f = &s.file;
            h.update_reader(&mut f).map_err(Errno::from)?;
            return Ok(h.finalize().to_hex().to_string());
        }
        let key = (rel.clone(), entry.size, entry.meta.mtime.sec, entry.meta.mtime.nsec);
        if let Some(h) = self.hashes.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(h);
        }
        let h = self
            .conn
            .run(|ep, _| {
                ep.file_hash(&rel, &entry)
                    .unwrap_or_else(|| Err(tern_core::Error::Internal("no hash".into())))
            })
            .map_err(|e| errno(&e, &rel))?
            .to_hex()
            .to_string();
        if let Ok(mut m) = self.hashes.lock() {
            if m.len() > 4096 {
                m.clear();
            }
            m.insert(key, h.clone());
        }
        Ok(h)
    }

    fn writable(&self) -> Res<&Path> {
        self.staging.as_deref().ok_or(Errno::EROFS)
    }

    /// The staging file of `rel`, made if there is none (holding the
    /// daemon's version `base`, its first `keep` bytes, or empty), with one
    /// more open handle counted: the caller closes it with
    /// [`TernFs::close_staged`]. No lock is held while it is made or
    /// filled, so the daemon being slow stalls only this path.
    fn stage(&self, rel: &Path, base: Option<&Entry>, keep: u64, req: &Request) -> Res<Arc<Staged>> {
        let dir = self.writable()?;
        if let Some(s) = self.open_staged(rel) {
            if keep < s.entry().map_err(Errno::from)?.size {
                s.file.set_len(keep).map_err(Errno::from)?;
                s.dirty.store(true, Ordering::Release);
            }
            return Ok(s);
        }
        let (mode, owner) = match base {
            Some(b) => (b.meta.mode, (b.meta.uid, b.meta.gid)),
            None => (0o644, (req.uid(), req.gid())),
        };
        let s = Arc::new(Staged::create(dir, rel, mode, owner).map_err(Errno::from)?);
        match base {
            Some(b) => {
                self.conn
                    .run(|ep, _| s.fill(ep, rel, b, keep))
                    .map_err(|e| errno(&e, rel))?;
                if keep < b.size {
                    s.dirty.store(true, Ordering::Release);
                }
            }
            None => s.dirty.store(true, Ordering::Release),
        }
        s.set_base(base.map(|b| (b.size, b.meta.mtime)));
        if let Err(e) = s.save_manifest() {
            tracing::warn!(path = %rel.display(), error = %e, "no staging manifest: a restart could not finish this upload");
        }
        let mut map = self.staged.lock().map_err(|_| Errno::EIO)?;
        if let Some(other) = map.get(rel) {
            // Another open staged it meanwhile: that one is the file.
            let other = other.clone();
            other.opens.fetch_add(1, Ordering::AcqRel);
            s.orphan();
            return Ok(other);
        }
        s.opens.fetch_add(1, Ordering::AcqRel);
        map.insert(rel.to_path_buf(), s.clone());
        drop(map);
        // Shown through the staged overlay until it is uploaded.
        if let Ok(mut a) = self.absent.lock() {
            a.remove(rel);
        }
        Ok(s)
    }

    /// The staging file of `rel`, if there is one, with one more open
    /// handle counted (under the map's lock, so the last close cannot drop
    /// it meanwhile).
    fn open_staged(&self, rel: &Path) -> Option<Arc<Staged>> {
        let map = self.staged.lock().ok()?;
        let s = map.get(rel)?.clone();
        s.opens.fetch_add(1, Ordering::AcqRel);
        Some(s)
    }

    /// Uploads what an earlier mount left staged in the staging directory:
    /// to its path if the daemon still has the version it was staged from,
    /// else beside it as `NAME.conflict-SECS`, so nobody's change is lost.
    /// What cannot be uploaded now stays staged for the next close, fsync
    /// or unmount. Returns (uploaded, kept).
    pub fn recover(&self) -> (usize, usize) {
        let Some(dir) = self.staging.as_deref() else {
            return (0, 0);
        };
        let (mut done, mut kept) = (0, 0);
        for s in crate::staged::Staged::left_in(dir) {
            let s = Arc::new(s);
            let rel = s.rel();
            let now = self.conn.run(|ep, _| ep.stat(&rel)).ok();
            let theirs = now.as_ref().map(|o| o.as_ref().map(|e| (e.size, e.meta.mtime)));
            if theirs.is_some_and(|t| t != s.base()) {
                let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let mut name = rel.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                name.push(format!(".conflict-{secs}"));
                let aside = rel.with_file_name(name);
                eprintln!(
                    "tern: {} changed at the daemon since it was staged; the staged version goes to {}",
                    rel.display(),
                    aside.display()
                );
                if let Ok(mut r) = s.rel.lock() {
                    *r = aside;
                }
            }
            match self.publish(&s) {
                Ok(()) => done += 1,
                Err(_) => {
                    kept += 1;
                    if let Ok(mut m) = self.staged.lock() {
                        m.insert(s.rel(), s.clone());
                    }
                }
            }
        }
        (done, kept)
    }

    /// Uploads `s` if it holds changes.
    fn publish(&self, s: &Staged) -> Res<()> {
        let rel = s.rel();
        let t = Instant::now();
        self.conn.run(|ep, _| s.publish(ep)).map_err(|e| {
            tracing::error!(path = %rel.display(), error = %e, "upload failed; kept staged");
            errno(&e, &rel)
        })?;
        self.forget_hash(&rel);
        self.added(&rel, s.entry().ok());
        // What the kernel is told of it from now is what was published.
        if let (Ok(e), Ok(mut t)) = (s.entry(), self.inodes.lock()) {
            if let Some(n) = t.find(&rel).and_then(|ino| t.get_mut(ino)) {
                n.entry = e;
                n.seen = Instant::now();
            }
        }
        tracing::debug!(path = %rel.display(), secs = t.elapsed().as_secs_f64(), "published");
        Ok(())
    }

    /// flush and fsync: what the handle wrote is uploaded, or the error is
    /// the application's.
    fn publish_handle(&self, fh: FileHandle, reply: ReplyEmpty) {
        match self.open_file(fh) {
            Ok(Open::Write(s)) => match self.publish(&s) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            Ok(Open::Read(_)) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// One handle of `s` closed: with the last, uploaded, and dropped once
    /// the daemon has everything. The upload's error, if the last.
    fn close_staged(&self, s: &Arc<Staged>) -> Res<()> {
        self.reap();
        if s.opens.fetch_sub(1, Ordering::AcqRel) > 1 {
            return Ok(());
        }
        if let Some(wb) = &self.write_back {
            if s.dirty.load(Ordering::Acquire) && wb.queue(s.clone()) {
                // Taken out of the map once uploaded (`reap`).
                return Ok(());
            }
        }
        let published = self.publish(s);
        if let Ok(mut map) = self.staged.lock() {
            let rel = s.rel();
            let idle = s.opens.load(Ordering::Acquire) == 0 && !s.dirty.load(Ordering::Acquire);
            if idle && map.get(&rel).is_some_and(|x| Arc::ptr_eq(x, s)) {
                map.remove(&rel);
            } else if published.is_err() {
                tracing::error!(path = %rel.display(), "closed with changes the daemon does not have; they are kept until unmount");
            }
        }
        published
    }

    /// Takes the files whose background upload ended out of the map, as the
    /// last close does in the foreground.
    fn reap(&self) {
        let Some(wb) = &self.write_back else { return };
        let done = wb.take_done();
        if done.is_empty() {
            return;
        }
        for s in done {
            let rel = s.rel();
            self.forget_hash(&rel);
            self.added(&rel, s.entry().ok());
            if let (Ok(e), Ok(mut t)) = (s.entry(), self.inodes.lock()) {
                if let Some(n) = t.find(&rel).and_then(|ino| t.get_mut(ino)) {
                    n.entry = e;
                    n.seen = Instant::now();
                }
            }
            if let Ok(mut map) = self.staged.lock() {
                let idle = s.opens.load(Ordering::Acquire) == 0 && !s.dirty.load(Ordering::Acquire);
                if idle && map.get(&rel).is_some_and(|x| Arc::ptr_eq(x, &s)) {
                    map.remove(&rel);
                }
            }
        }
    }

    /// Something changed at the daemon under this mount: listings are asked
    /// for again, and `rel` is no longer known to be absent.
    fn changed(&self, rel: &Path) {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if let Ok(mut l) = self.listings.lock() {
            // Its directory's listing, and its own and those beneath it
            // (a directory renamed or removed).
            l.remove(parent);
            l.retain(|k, _| !k.starts_with(rel));
        }
        self.stale(parent);
        if let Ok(mut a) = self.absent.lock() {
            a.remove(rel);
        }
    }

    /// The attributes the mount has of `rel` are asked for again when next
    /// wanted: a change in a directory changes its times and link count.
    fn stale(&self, rel: &Path) {
        if let Ok(mut t) = self.inodes.lock() {
            if let Some(n) = t.find(rel).and_then(|ino| t.get_mut(ino)) {
                n.seen = Instant::now().checked_sub(self.ttl * 2).unwrap_or(n.seen);
            }
        }
    }

    /// `rel` was uploaded as `e`: a listing of its directory at hand takes
    /// it in (else it would vanish from there when the staged file goes).
    fn added(&self, rel: &Path, e: Option<Entry>) {
        let (Some(e), Some(parent)) = (e, rel.parent()) else {
            return self.changed(rel);
        };
        self.stale(parent);
        if let Ok(mut l) = self.listings.lock() {
            if let Some((_, list)) = l.get_mut(parent) {
                let v = Arc::make_mut(list);
                match v.binary_search_by(|x| x.name.cmp(&e.name)) {
                    Ok(i) => v[i] = e,
                    Err(i) => v.insert(i, e),
                }
            }
        }
        if let Ok(mut a) = self.absent.lock() {
            a.remove(rel);
        }
    }

    /// Whether the daemon said `rel` is not there, within the attribute
    /// timeout.
    fn known_absent(&self, rel: &Path) -> bool {
        self.absent
            .lock()
            .is_ok_and(|a| a.get(rel).is_some_and(|t| t.elapsed() < self.ttl))
    }

    fn forget_hash(&self, rel: &Path) {
        if let Ok(mut m) = self.hashes.lock() {
            m.retain(|k, _| k.0 != rel);
        }
    }

    /// The path of a name about to be made in `parent`: `EEXIST` if
    /// something is there already (here or at the daemon).
    fn new_name(&self, parent: u64, name: &OsStr) -> Res<PathBuf> {
        let rel = self.child(parent, name)?;
        if !self.known_absent(&rel) && self.stat(&rel)?.is_some() {
            return Err(Errno::EEXIST);
        }
        Ok(rel)
    }

    /// Runs a change on the daemon and waits until it is applied.
    fn change(&self, rel: &Path, f: impl Fn(&RemoteEndpoint) -> tern_core::Result<()>) -> Res<()> {
        self.writable()?;
        let r = self
            .conn
            .run(|ep, _| {
                f(ep)?;
                match Dest::settle(ep).into_iter().next() {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            })
            .map_err(|e| errno(&e, rel));
        self.changed(rel);
        r
    }

    /// The entry `rel` has now at the daemon, for a reply.
    fn entry_reply(&self, parent: u64, name: &OsStr, rel: &Path, reply: ReplyEntry) {
        match self.stat(rel) {
            Ok(Some(e)) => match self.remember(parent, name, &e) {
                Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
                Err(e) => reply.error(e),
            },
            Ok(None) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        }
    }

    fn set_attrs(&self, ino: u64, fh: Option<FileHandle>, a: &Attrs, req: &Request) -> Res<Entry> {
        let (rel, _, _) = self.node(ino)?;
        // A staged file is changed there, and held open meanwhile so that a
        // last close racing this cannot drop the change.
        let staged = match fh.and_then(|fh| self.open_file(fh).ok()) {
            Some(Open::Write(s)) => {
                s.opens.fetch_add(1, Ordering::AcqRel);
                Some(s)
            }
            _ => self.open_staged(&rel),
        };
        let r = self.set_attrs_on(ino, &rel, staged.clone(), a, req);
        match staged {
            // Uploaded here if this was the last handle.
            Some(s) => self.close_staged(&s).and(r),
            None => r,
        }
    }

    fn set_attrs_on(&self, ino: u64, rel: &Path, staged: Option<Arc<Staged>>, a: &Attrs, req: &Request) -> Res<Entry> {
        let rel = rel.to_path_buf();
        if a.uid.is_some() || a.gid.is_some() {
            let now = self.fresh(ino)?;
            if a.uid.is_some_and(|u| u != now.meta.uid) || a.gid.is_some_and(|g| g != now.meta.gid) {
                // Owners are the daemon's to give.
                return Err(Errno::EPERM);
            }
        }
        // A size: the daemon sets it where it can (nothing crosses);
        // otherwise the file is staged, cut, and uploaded.
        let staged = match (a.size, staged) {
            (Some(size), None) if self.conn.run(|ep, _| Ok(ep.supports_truncate())).unwrap_or(false) => {
                let e = self
                    .conn
                    .run(|ep, _| Dest::truncate(ep, &rel, size))
                    .map_err(|e| errno(&e, &rel))?;
                self.forget_hash(&rel);
                self.changed(&rel);
                self.note(ino, &e);
                if a.mode.is_none() && a.atime.is_none() && a.mtime.is_none() {
                    return Ok(e);
                }
                None
            }
            (Some(size), None) => {
                let now = self.stat(&rel)?.ok_or(Errno::ENOENT)?;
                if now.kind != Kind::File {
                    return Err(Errno::EISDIR);
                }
                let s = self.stage(&rel, Some(&now), size, req)?;
                let cut = s.file.set_len(size).map_err(Errno::from);
                s.dirty.store(true, Ordering::Release);
                let published = self.close_staged(&s);
                cut?;
                published?;
                None
            }
            (Some(size), Some(s)) => {
                s.file.set_len(size).map_err(Errno::from)?;
                s.dirty.store(true, Ordering::Release);
                Some(s)
            }
            (None, s) => s,
        };
        if let Some(s) = staged {
            if let Some(m) = a.mode {
                s.mode.store(m & 0o7777, Ordering::Relaxed);
                s.dirty.store(true, Ordering::Release);
                let _ = s.save_manifest();
            }
            if a.atime.is_some() || a.mtime.is_some() {
                let mut t = std::fs::FileTimes::new();
                if let Some(x) = a.atime {
                    t = t.set_accessed(x);
                }
                if let Some(x) = a.mtime {
                    t = t.set_modified(x);
                }
                s.file.set_times(t).map_err(Errno::from)?;
                s.dirty.store(true, Ordering::Release);
            }
            let e = s.entry().map_err(Errno::from)?;
            self.note(ino, &e);
            return Ok(e);
        }
        if a.mode.is_some() || a.atime.is_some() || a.mtime.is_some() {
            // What the kernel was told of it a moment ago.
            let mut now = self.fresh(ino)?;
            let mut meta = now.meta.clone();
            if let Some(m) = a.mode {
                meta.mode = m & 0o7777;
            }
            if let Some(x) = a.atime {
                meta.atime = Time::from_system(x);
            }
            if let Some(x) = a.mtime {
                meta.mtime = Time::from_system(x);
            }
            self.change(&rel, |ep| Dest::set_meta(ep, &rel, now.kind, &meta, false, None))?;
            now.meta = meta;
            now.changed = Time::now();
            self.note(ino, &now);
            return Ok(now);
        }
        let e = self.stat(&rel)?.ok_or(Errno::ENOENT)?;
        self.note(ino, &e);
        Ok(e)
    }
}

/// What a setattr asks to change.
struct Attrs {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<SystemTime>,
    mtime: Option<SystemTime>,
}

fn when(t: Option<TimeOrNow>) -> Option<SystemTime> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    })
}

/// The errno an application sees for an engine error.
/// The errno in a message that ends as an I/O error's text does ("... (os
/// error 39)"), if it is one the daemon's system can give.
fn os_error(message: &str) -> Option<i32> {
    let n: i32 = message.rsplit_once("(os error ")?.1.strip_suffix(')')?.parse().ok()?;
    (1..4096).contains(&n).then_some(n)
}

pub(crate) fn errno(e: &tern_core::Error, rel: &Path) -> Errno {
    use tern_core::Error as E;
    let n = match e {
        E::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        E::Vanished(_) => libc::ENOENT,
        E::Changed(_) => libc::ESTALE,
        E::Busy(_) => libc::EBUSY,
        E::Other { message, .. } if message.contains("read-only") || message.contains("may only read") => libc::EROFS,
        E::Other { message, .. } if message.contains("quota") => libc::EDQUOT,
        E::Other { message, .. } if message.contains("No space left") => libc::ENOSPC,
        // The daemon's own system error, as its message ends.
        E::Other { message, .. } => os_error(message).unwrap_or(libc::EIO),
        _ => libc::EIO,
    };
    tracing::debug!(path = %rel.display(), error = %e, errno = n, "operation failed");
    Errno::from_i32(n)
}

impl fuser::Filesystem for TernFs {
    fn destroy(&mut self) {
        if let Some(wb) = &self.write_back {
            wb.wait();
        }
        self.reap();
        // Unmounted: what is still staged is published now, or reported.
        let left: Vec<Arc<Staged>> = match self.staged.lock() {
            Ok(mut m) => m.drain().map(|(_, s)| s).collect(),
            Err(_) => Vec::new(),
        };
        for s in left {
            if self.publish(&s).is_err() {
                eprintln!(
                    "tern: {} was not published; its data is kept in {}",
                    s.rel().display(),
                    s.path().display()
                );
            }
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_CACHE_SYMLINKS;
        if let Err(missing) = config.add_capabilities(want) {
            tracing::debug!(?missing, "kernel lacks some FUSE capabilities");
            let _ = config.add_capabilities(want & !missing);
        }
        let _ = config
            .set_max_readahead(IO_SIZE)
            .or_else(|m| config.set_max_readahead(m));
        let _ = config.set_max_write(IO_SIZE).or_else(|m| config.set_max_write(m));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        tracing::trace!(op = "lookup", "request");
        if tern_core::local::is_side_file(name) {
            return reply.error(Errno::ENOENT);
        }
        let rel = match self.child(parent.0, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        // A listing of the directory made a moment ago answers without
        // asking the daemon again (a tree being written: nothing there yet).
        let listed = match (self.staged_at(&rel), rel.parent().and_then(|p| self.listing(p))) {
            (None, Some(l)) => Some(
                l.binary_search_by(|e| e.name.as_os_str().cmp(name))
                    .ok()
                    .map(|i| l[i].clone()),
            ),
            _ => None,
        };
        let found = match listed {
            Some(e) => Ok(e),
            None => self.stat(&rel),
        };
        match found {
            Ok(Some(e)) => match self.remember(parent.0, name, &e) {
                Ok(attr) => reply.entry(&self.ttl, &attr, Generation(0)),
                Err(e) => reply.error(e),
            },
            Ok(None) => {
                if let Ok(mut t) = self.inodes.lock() {
                    t.vanished(parent.0, name);
                }
                if let Ok(mut a) = self.absent.lock() {
                    if a.len() > 16384 {
                        a.clear();
                    }
                    a.insert(rel, Instant::now());
                }
                reply.error(Errno::ENOENT)
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Ok(mut t) = self.inodes.lock() {
            t.forget(ino.0, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        tracing::trace!(op = "getattr", "request");
        match fh.and_then(|fh| self.open_file(fh).ok()) {
            // An open file's attributes are those of the version opened, or
            // of what is being written.
            Some(Open::Read(r)) => return reply.attr(&self.ttl, &self.attr(ino.0, &r.entry)),
            Some(Open::Write(s)) => {
                return match s.entry() {
                    Ok(e) => reply.attr(&Duration::ZERO, &self.attr(ino.0, &e)),
                    Err(e) => reply.error(Errno::from(e)),
                }
            }
            None => {}
        }
        match self.fresh(ino.0) {
            Ok(e) => reply.attr(&self.ttl, &self.attr(ino.0, &e)),
            // Unlinked while open (fstat asks without its handle): what the
            // handle has, with no name left.
            Err(Errno::ESTALE) => {
                let e = match self.open_of(ino.0) {
                    Some(Open::Read(r)) => Ok(r.entry.clone()),
                    Some(Open::Write(s)) => s.entry().map_err(Errno::from),
                    None => Err(Errno::ESTALE),
                };
                match e {
                    Ok(e) => {
                        let mut a = self.attr(ino.0, &e);
                        a.nlink = 0;
                        reply.attr(&Duration::ZERO, &a)
                    }
                    Err(e) => reply.error(e),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        tracing::trace!(op = "setattr", "request");
        if let Err(e) = self.writable() {
            return reply.error(e);
        }
        let a = Attrs {
            mode,
            uid,
            gid,
            size,
            atime: when(atime),
            mtime: when(mtime),
        };
        match self.set_attrs(ino.0, fh, &a, req) {
            Ok(e) => reply.attr(&Duration::ZERO, &self.attr(ino.0, &e)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        use std::os::unix::ffi::OsStrExt;
        match self.fresh(ino.0) {
            Ok(e) => match (e.kind, &e.target) {
                (Kind::Symlink, Some(t)) => reply.data(t.as_os_str().as_bytes()),
                _ => reply.error(Errno::EINVAL),
            },
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        tracing::trace!(op = "mkdir", "request");
        let rel = match self.new_name(parent.0, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let meta = Meta {
            mode: mode & !umask & 0o7777,
            mtime: Time::now(),
            atime: Time::now(),
            ..Default::default()
        };
        let made = self.change(&rel, |ep| {
            Dest::make_dir(ep, &rel)?;
            Dest::set_meta(ep, &rel, Kind::Dir, &meta, false, None)
        });
        match made {
            Ok(()) => {
                // Empty, as made: lookups in it need not ask the daemon.
                if let Ok(mut l) = self.listings.lock() {
                    l.insert(rel.clone(), (Instant::now(), Arc::new(Vec::new())));
                }
                self.entry_reply(parent.0, name, &rel, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        tracing::trace!(op = "symlink", "request");
        let rel = match self.new_name(parent.0, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let meta = Meta {
            mode: 0o777,
            mtime: Time::now(),
            atime: Time::now(),
            ..Default::default()
        };
        match self.change(&rel, |ep| Dest::symlink(ep, &rel, target, &meta, false)) {
            Ok(()) => self.entry_reply(parent.0, name, &rel, reply),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        tracing::trace!(op = "link", "request");
        if let Err(e) = self.writable() {
            return reply.error(e);
        }
        let (rel, entry, _) = match self.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if entry.kind == Kind::Dir {
            return reply.error(Errno::EPERM);
        }
        let new = match self.new_name(newparent.0, newname) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        // The new name shares what the daemon has: what is being written
        // there goes first.
        if let Some(s) = self.staged_at(&rel) {
            if let Err(e) = self.publish(&s) {
                return reply.error(e);
            }
        }
        match self.change(&new, |ep| Dest::hard_link(ep, &rel, &new).map(|_| ())) {
            Ok(()) => {
                // Its link count changed.
                self.stale(&rel);
                self.entry_reply(newparent.0, newname, &new, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tracing::trace!(op = "unlink", "request");
        let rel = match self.child(parent.0, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let staged = self.staged_at(&rel);
        let remote = match self.conn.run(|ep, _| ep.stat(&rel)) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e, &rel)),
        };
        match (&remote, &staged) {
            (Some(e), _) if e.kind == Kind::Dir => return reply.error(Errno::EISDIR),
            (None, None) => return reply.error(Errno::ENOENT),
            _ => {}
        }
        // Staged: no upload may land after the removal.
        let held = staged.as_ref().map(|s| s.hold());
        if remote.is_some() {
            if let Err(e) = self.change(&rel, |ep| Dest::remove(ep, &rel)) {
                return reply.error(e);
            }
        }
        drop(held);
        if let Some(s) = staged {
            // Still open elsewhere: its handles write to a file nobody names.
            s.orphan();
            if let Ok(mut m) = self.staged.lock() {
                if m.get(&rel).is_some_and(|x| Arc::ptr_eq(x, &s)) {
                    m.remove(&rel);
                }
            }
        }
        if let Ok(mut t) = self.inodes.lock() {
            t.vanished(parent.0, name);
        }
        self.changed(&rel);
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        tracing::trace!(op = "rmdir", "request");
        let rel = match self.child(parent.0, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        let checked = self.conn.run(|ep, _| {
            let e = ep.stat(&rel)?;
            let empty = match &e {
                Some(e) if e.kind == Kind::Dir => Some(ep.read_dir(&rel)?.is_empty()),
                _ => None,
            };
            Ok((e, empty))
        });
        let has_staged = self
            .staged
            .lock()
            .map(|m| m.keys().any(|k| k.starts_with(&rel)))
            .unwrap_or(false);
        match checked {
            Ok((None, _)) => return reply.error(Errno::ENOENT),
            Ok((Some(_), None)) => return reply.error(Errno::ENOTDIR),
            Ok((Some(_), Some(false))) => return reply.error(Errno::ENOTEMPTY),
            Ok((Some(_), Some(true))) if has_staged => return reply.error(Errno::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(errno(&e, &rel)),
        }
        match self.change(&rel, |ep| Dest::remove(ep, &rel)) {
            Ok(()) => {
                if let Ok(mut t) = self.inodes.lock() {
                    t.vanished(parent.0, name);
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(op = "rename", "request");
        if let Err(e) = self.writable() {
            return reply.error(e);
        }
        if !flags.difference(RenameFlags::RENAME_NOREPLACE).is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let (from, to) = match (self.child(parent.0, name), self.child(newparent.0, newname)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        if from == to {
            return reply.ok();
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE) {
            match self.stat(&to) {
                Ok(Some(_)) => return reply.error(Errno::EEXIST),
                Ok(None) => {}
                Err(e) => return reply.error(e),
            }
        }
        // What is being written there moves with the name; what the daemon
        // has moves there. Uploads of both wait meanwhile, so none lands at
        // a name it no longer has.
        let staged = self.staged_at(&from);
        let replaced = self.staged_at(&to);
        let remote = match self.conn.run(|ep, _| ep.stat(&from)) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e, &from)),
        };
        if remote.is_none() && staged.is_none() {
            return reply.error(Errno::ENOENT);
        }
        let held = staged.as_ref().map(|s| s.hold());
        if remote.is_some() {
            if let Err(e) = self.change(&from, |ep| Dest::rename(ep, &from, &to)) {
                return reply.error(e);
            }
        }
        if let Some(old) = replaced {
            old.orphan();
        }
        if let Ok(mut m) = self.staged.lock() {
            m.remove(&to);
            // Staged beneath a renamed directory: their paths move too.
            let moved: Vec<PathBuf> = m.keys().filter(|k| k.starts_with(&from)).cloned().collect();
            for k in moved {
                if let (Some(s), Ok(rest)) = (m.remove(&k), k.strip_prefix(&from)) {
                    let dst = if rest.as_os_str().is_empty() {
                        to.clone()
                    } else {
                        to.join(rest)
                    };
                    if let Ok(mut r) = s.rel.lock() {
                        *r = dst.clone();
                    }
                    let _ = s.save_manifest();
                    m.insert(dst, s);
                }
            }
        }
        drop(held);
        if let Ok(mut t) = self.inodes.lock() {
            t.rename(parent.0, name, newparent.0, newname);
        }
        self.changed(&to);
        reply.ok();
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        tracing::trace!(op = "open", "request");
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let (rel, _, _) = match self.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        // Being written here: every handle sees the staging file.
        let staged = self.open_staged(&rel);
        if write || staged.is_some() {
            let s = match staged {
                Some(s) if flags.0 & libc::O_TRUNC == 0 => Ok(s),
                other => {
                    if let Some(s) = other {
                        // Counted again by `stage`.
                        s.opens.fetch_sub(1, Ordering::AcqRel);
                    }
                    // Close-to-open: the daemon's current version.
                    let base = match self.conn.run(|ep, _| ep.stat(&rel)) {
                        Ok(Some(e)) if e.kind == Kind::File => Some(e),
                        Ok(Some(_)) => return reply.error(Errno::EISDIR),
                        Ok(None) => None,
                        Err(e) => return reply.error(errno(&e, &rel)),
                    };
                    let keep = if flags.0 & libc::O_TRUNC != 0 { 0 } else { u64::MAX };
                    self.stage(&rel, base.as_ref(), keep, req)
                }
            };
            return match s {
                Ok(s) => match self.add_open(ino.0, Open::Write(s.clone())) {
                    Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                    Err(e) => {
                        let _ = self.close_staged(&s);
                        reply.error(e)
                    }
                },
                Err(e) => reply.error(e),
            };
        }
        // Close-to-open: every open asks the daemon for the current version.
        let entry = match self.stat(&rel) {
            Ok(Some(e)) if e.kind == Kind::File => e,
            Ok(Some(_)) => return reply.error(Errno::EISDIR),
            Ok(None) => return reply.error(Errno::ENOENT),
            Err(e) => return reply.error(e),
        };
        let opened = self.conn.run(|ep, gen| {
            let f = ep.open(&rel, &entry)?;
            Ok((gen, Arc::<dyn ReadFile>::from(f)))
        });
        let file = match opened {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e, &rel)),
        };
        // The kernel keeps the pages it has of this file when the version is
        // the one they were read from.
        let version = (entry.size, entry.meta.mtime);
        let keep = match self.inodes.lock() {
            Ok(mut t) => match t.get_mut(ino.0) {
                Some(n) => {
                    let same = n.cached == Some(version);
                    n.cached = Some(version);
                    n.entry = entry.clone();
                    n.seen = Instant::now();
                    same
                }
                None => false,
            },
            Err(_) => false,
        };
        match self.add_open(
            ino.0,
            Open::Read(Arc::new(Reader::new(rel, entry, file, self.cache.clone()))),
        ) {
            Ok(fh) => {
                let flags = if keep {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), flags)
            }
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        tracing::trace!(op = "create", "request");
        let rel = match self.child(parent.0, name) {
            Ok(r) => r,
            Err(e) => return reply.error(e),
        };
        // The kernel looked the name up just before: no need to ask again.
        let asked = match self.known_absent(&rel) {
            true => Ok(None),
            false => self.stat(&rel),
        };
        let base = match asked {
            Ok(Some(_)) if flags & libc::O_EXCL != 0 => return reply.error(Errno::EEXIST),
            Ok(Some(e)) if e.kind == Kind::Dir => return reply.error(Errno::EISDIR),
            Ok(b) => b,
            Err(e) => return reply.error(e),
        };
        let keep = if flags & libc::O_TRUNC != 0 { 0 } else { u64::MAX };
        let s = match self.stage(&rel, base.as_ref().filter(|b| b.kind == Kind::File), keep, req) {
            Ok(s) => s,
            Err(e) => return reply.error(e),
        };
        if base.is_none() {
            s.mode.store(mode & !umask & 0o7777, Ordering::Relaxed);
        }
        let e = match s.entry() {
            Ok(e) => e,
            Err(e) => return reply.error(Errno::from(e)),
        };
        let attr = match self.remember(parent.0, name, &e) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        match self.add_open(attr.ino.0, Open::Write(s)) {
            Ok(fh) => reply.created(
                &Duration::ZERO,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.open_file(fh) {
            Ok(Open::Read(h)) => {
                let end = h.entry.size.min(offset.saturating_add(u64::from(size)));
                if offset >= end {
                    return reply.data(&[]);
                }
                match h.read(&self.conn, &self.pool, offset, end - offset) {
                    Ok(buf) => reply.data(&buf),
                    Err(e) => reply.error(e),
                }
            }
            Ok(Open::Write(s)) => {
                let mut buf = vec![0u8; size as usize];
                match s.file.read_at(&mut buf, offset) {
                    Ok(n) => reply.data(&buf[..n]),
                    Err(e) => reply.error(Errno::from(e)),
                }
            }
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        tracing::trace!(fh = fh.0, offset, len = data.len(), "write");
        match self.open_file(fh) {
            Ok(Open::Write(s)) => match s.file.write_all_at(data, offset) {
                Ok(()) => {
                    s.dirty.store(true, Ordering::Release);
                    reply.written(data.len() as u32)
                }
                Err(e) => reply.error(Errno::from(e)),
            },
            Ok(Open::Read(_)) => reply.error(Errno::EBADF),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        tracing::trace!(op = "flush", "request");
        if let Some(wb) = &self.write_back {
            // Queued now, as close(2) returns (the release that follows
            // comes later): an fsync of its directory after close waits
            // for it. Uploaded in the background.
            if let Ok(Open::Write(s)) = self.open_file(fh) {
                if s.dirty.load(Ordering::Acquire) && !wb.queue(s.clone()) {
                    return self.publish_handle(fh, reply);
                }
            }
            return reply.ok();
        }
        // close(2) returns this: a failed upload is the application's error.
        self.publish_handle(fh, reply);
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Everything closed before is at the daemon, or the error says not.
        let failed = self.write_back.as_ref().map_or(0, |wb| wb.wait());
        self.reap();
        if failed > 0 {
            reply.error(Errno::EIO)
        } else {
            reply.ok()
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        tracing::trace!(op = "fsync", "request");
        self.publish_handle(fh, reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        tracing::trace!(op = "release", "request");
        let o = self
            .files
            .write()
            .ok()
            .and_then(|mut f| f.remove(&fh.0))
            .map(|(_, o)| o);
        if let Some(Open::Write(s)) = o {
            // The application closed it already: a failed upload can only
            // be logged now (it was returned by flush).
            let _ = self.close_staged(&s);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        tracing::trace!(op = "opendir", "request");
        // One request for the whole directory, attributes included.
        match self.dir_entries(ino.0) {
            Ok(entries) => {
                let fh = self.fh();
                match self.dirs.lock() {
                    Ok(mut d) => {
                        d.insert(fh, Arc::new(DirHandle { entries }));
                    }
                    Err(_) => return reply.error(Errno::EIO),
                }
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(d) = self.dirs.lock().ok().and_then(|d| d.get(&fh.0).cloned()) else {
            return reply.error(Errno::EBADF);
        };
        let t = match self.inodes.lock() {
            Ok(t) => t,
            Err(_) => return reply.error(Errno::EIO),
        };
        // Offsets: 1 and 2 for `.` and `..`, then 3 on for the entries.
        let dots = [(1u64, ".", FileType::Directory), (2, "..", FileType::Directory)];
        for (off, name, kind) in dots.into_iter().skip(offset.min(2) as usize) {
            if reply.add(ino, off, kind, name) {
                return reply.ok();
            }
        }
        for (i, e) in d.entries.iter().enumerate().skip(offset.saturating_sub(2) as usize) {
            // The inode number is only shown (d_ino); lookups take it.
            let n = t.peek(ino.0, &e.name).unwrap_or(u64::MAX - i as u64);
            if reply.add(INodeNo(n), i as u64 + 3, self.attr(n, e).kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let Some(d) = self.dirs.lock().ok().and_then(|d| d.get(&fh.0).cloned()) else {
            return reply.error(Errno::EBADF);
        };
        let mut t = match self.inodes.lock() {
            Ok(t) => t,
            Err(_) => return reply.error(Errno::EIO),
        };
        // `.` and `..` take no reference; the entries each take one, but
        // only once the buffer holds them.
        let here = t.get(ino.0).map(|n| n.entry.clone());
        let zero = Duration::ZERO;
        if let Some(e) = &here {
            for (off, name) in [(1u64, "."), (2, "..")] {
                if offset < off && reply.add(ino, off, name, &zero, &self.attr(ino.0, e), Generation(0)) {
                    return reply.ok();
                }
            }
        }
        for (i, e) in d.entries.iter().enumerate().skip(offset.saturating_sub(2) as usize) {
            let ino_now = t.remember(ino.0, &e.name, e.clone());
            let full = reply.add(
                INodeNo(ino_now),
                i as u64 + 3,
                &e.name,
                &self.ttl,
                &self.attr(ino_now, e),
                Generation(0),
            );
            if full {
                // Not handed over: the reference was not taken.
                t.forget(ino_now, 1);
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        if let Ok(mut d) = self.dirs.lock() {
            d.remove(&fh.0);
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The daemon does not report its free space yet.
        reply.statfs(0, 0, 0, 0, 0, IO_SIZE, 255, IO_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        tracing::trace!(op = "getxattr", "request");
        if name != HASH_XATTR {
            use std::os::unix::ffi::OsStrExt;
            // Only user.tern.* is there. Saying the other namespaces are not
            // supported (rather than empty) lets `ls -l` stop asking for
            // ACLs and security labels on this file system after the first.
            let user = name.as_bytes().starts_with(b"user.");
            return reply.error(if user {
                Errno::NO_XATTR
            } else {
                Errno::from_i32(libc::EOPNOTSUPP)
            });
        }
        match self.file_hash(ino.0) {
            Ok(h) => xattr_reply(reply, h.as_bytes(), size),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let is_file = self.node(ino.0).is_ok_and(|(_, e, _)| e.kind == Kind::File);
        let names: &[u8] = if is_file { b"user.tern.blake3\0" } else { b"" };
        xattr_reply(reply, names, size);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        tracing::trace!(op = "access", "request");
        // The daemon decides what may be read and written.
        if mask.contains(fuser::AccessFlags::W_OK) && self.staging.is_none() {
            reply.error(Errno::EROFS)
        } else {
            reply.ok()
        }
    }
}

/// An xattr value or name list: its size when asked with 0, ERANGE when the
/// buffer is too small.
fn xattr_reply(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}
