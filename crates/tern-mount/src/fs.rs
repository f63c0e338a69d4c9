//! The FUSE operations, answered from the daemon.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tern_core::{Entry, Kind, ReadFile, Source};

use crate::conn::Conn;
use crate::inodes::{Inodes, ROOT};
use crate::reader::{Pool, Reader, Readers};
use crate::MountOptions;

/// The extended attribute holding a file's BLAKE3, as `b3sum` prints it.
const HASH_XATTR: &str = "user.tern.blake3";
/// What the kernel is told to read at once, and `st_blksize`.
const IO_SIZE: u32 = 1 << 20;

/// A directory listed for readdir: its entries with their inodes.
struct DirHandle {
    entries: Vec<Entry>,
}

/// The mounted tree.
pub struct TernFs {
    conn: Arc<Conn>,
    inodes: Mutex<Inodes>,
    files: Readers,
    pool: Pool,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    ttl: Duration,
    /// Whole-file hashes asked for, by path and version.
    hashes: Mutex<HashMap<(PathBuf, u64, i64, u32), String>>,
}

impl TernFs {
    /// A file system over `conn`; the root is stat'ed when first asked for.
    pub fn new(conn: Arc<Conn>, opts: &MountOptions, pool: Pool) -> TernFs {
        let root = Entry {
            name: Default::default(),
            kind: Kind::Dir,
            size: 0,
            meta: tern_core::entry::Meta {
                mode: 0o755,
                ..Default::default()
            },
            target: None,
            file_id: None,
            nlink: 2,
            allocated: 0,
            changed: Default::default(),
        };
        let fs = TernFs {
            conn,
            inodes: Mutex::new(Inodes::new(root)),
            files: RwLock::default(),
            pool,
            dirs: Mutex::default(),
            next_fh: AtomicU64::new(1),
            ttl: opts.attr_timeout,
            hashes: Mutex::default(),
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
    fn node(&self, ino: u64) -> Result<(PathBuf, Entry, Instant), Errno> {
        let t = self.inodes.lock().map_err(|_| Errno::EIO)?;
        let n = t.get(ino).ok_or(Errno::ESTALE)?;
        Ok((n.rel.clone(), n.entry.clone(), n.seen))
    }

    /// What the daemon says of `rel` now.
    fn stat(&self, rel: &Path) -> Result<Option<Entry>, Errno> {
        self.conn.run(|ep, _| ep.stat(rel)).map_err(|e| errno(&e, rel))
    }

    /// `ino`'s entry, asked again once the attribute timeout has passed.
    fn fresh(&self, ino: u64) -> Result<Entry, Errno> {
        let (rel, entry, seen) = self.node(ino)?;
        if seen.elapsed() < self.ttl {
            return Ok(entry);
        }
        let now = self.stat(&rel)?.ok_or(Errno::ENOENT)?;
        if let Ok(mut t) = self.inodes.lock() {
            if let Some(n) = t.get_mut(ino) {
                n.entry = now.clone();
                n.seen = Instant::now();
            }
        }
        Ok(now)
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
            atime: time(e.meta.atime),
            mtime: time(e.meta.mtime),
            ctime: time(e.changed),
            crtime: time(e.meta.mtime),
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

    fn dir_entries(&self, ino: u64) -> Result<(PathBuf, Vec<Entry>), Errno> {
        let (rel, entry, _) = self.node(ino)?;
        if entry.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let entries = self.conn.run(|ep, _| ep.read_dir(&rel)).map_err(|e| errno(&e, &rel))?;
        Ok((rel, entries))
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Reader>, Errno> {
        let files = self.files.read().map_err(|_| Errno::EIO)?;
        files.get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn file_hash(&self, ino: u64) -> Result<String, Errno> {
        let (rel, entry, _) = self.node(ino)?;
        if entry.kind != Kind::File {
            return Err(Errno::NO_XATTR);
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
}

fn time(t: tern_core::entry::Time) -> SystemTime {
    let d = Duration::new(t.sec.unsigned_abs(), t.nsec);
    if t.sec >= 0 {
        UNIX_EPOCH + d
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// The errno an application sees for an engine error.
pub(crate) fn errno(e: &tern_core::Error, rel: &Path) -> Errno {
    use tern_core::Error as E;
    let n = match e {
        E::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        E::Vanished(_) => libc::ENOENT,
        E::Changed(_) => libc::ESTALE,
        E::Busy(_) => libc::EBUSY,
        _ => libc::EIO,
    };
    tracing::debug!(path = %rel.display(), error = %e, errno = n, "operation failed");
    Errno::from_i32(n)
}

impl fuser::Filesystem for TernFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_CACHE_SYMLINKS;
        if let Err(missing) = config.add_capabilities(want) {
            tracing::debug!(?missing, "kernel lacks some FUSE capabilities");
            let _ = config.add_capabilities(want & !missing);
        }
        let _ = config
            .set_max_readahead(IO_SIZE)
            .or_else(|m| config.set_max_readahead(m));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let rel = match self.inodes.lock().map(|t| t.child_path(parent.0, name)) {
            Ok(Some(r)) => r,
            _ => return reply.error(Errno::ESTALE),
        };
        match self.stat(&rel) {
            Ok(Some(e)) => {
                let attr = match self.inodes.lock() {
                    Ok(mut t) => {
                        let ino = t.remember(parent.0, name, e.clone());
                        self.attr(ino, &e)
                    }
                    Err(_) => return reply.error(Errno::EIO),
                };
                reply.entry(&self.ttl, &attr, Generation(0));
            }
            Ok(None) => {
                if let Ok(mut t) = self.inodes.lock() {
                    t.vanished(parent.0, name);
                }
                // A negative entry, cached as long as attributes are.
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
        // An open file's attributes are those of the version opened.
        if let Some(h) = fh.and_then(|fh| self.handle(fh).ok()) {
            return reply.attr(&self.ttl, &self.attr(ino.0, &h.entry));
        }
        match self.fresh(ino.0) {
            Ok(e) => reply.attr(&self.ttl, &self.attr(ino.0, &e)),
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

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        // Close-to-open: every open asks the daemon for the current version.
        let (rel, _, _) = match self.node(ino.0) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
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
        let fh = self.fh();
        let h = Arc::new(Reader::new(rel, entry, file));
        match self.files.write() {
            Ok(mut f) => {
                f.insert(fh, h);
            }
            Err(_) => return reply.error(Errno::EIO),
        }
        let flags = if keep {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(fh), flags);
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
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply.error(e),
        };
        let end = h.entry.size.min(offset.saturating_add(u64::from(size)));
        if offset >= end {
            return reply.data(&[]);
        }
        match h.read(&self.conn, &self.pool, offset, end - offset) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
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
        if let Ok(mut f) = self.files.write() {
            f.remove(&fh.0);
        }
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // One request for the whole directory, attributes included.
        match self.dir_entries(ino.0) {
            Ok((_, entries)) => {
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
        if offset < 1 {
            if let Some(e) = &here {
                if reply.add(ino, 1, ".", &zero, &self.attr(ino.0, e), Generation(0)) {
                    return reply.ok();
                }
            }
        }
        if offset < 2 {
            if let Some(e) = &here {
                if reply.add(ino, 2, "..", &zero, &self.attr(ino.0, e), Generation(0)) {
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
        if name != HASH_XATTR {
            return reply.error(Errno::NO_XATTR);
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
        // The daemon decides what may be read; nothing may be written.
        if mask.contains(fuser::AccessFlags::W_OK) {
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
