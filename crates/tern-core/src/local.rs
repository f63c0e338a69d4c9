//! The local file system endpoint.
//!
//! Writing: a file is written at `.NAME.tern.tmp` beside its target, under an
//! exclusive `flock`, given its metadata, made durable, then renamed into
//! place. Large files keep a resume journal at `.NAME.tern.journal`. Both
//! names are fixed, so a rerun after a crash finds them again; a name too long
//! to take the prefix and suffix gets a hashed temporary name instead.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use blake3::hazmat::ChainingValue;

use crate::endpoint::{Dest, FileSpec, ReadFile, Source, WriteFile, Xattrs};
use crate::entry::{Entry, Kind, Meta, Time};
use crate::error::{Error, IoContext, Result};
use crate::hash::{self, Hash};
use crate::journal::{self, Journal};
use crate::sys;

/// A directory tree (or single file) on a local file system.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    root: PathBuf,
    follow_root: bool,
    /// One open directory on each file system written to, for `barrier`.
    devices: Arc<Mutex<Vec<(u64, File)>>>,
}

impl LocalEndpoint {
    /// An endpoint rooted at `root`, which need not exist yet. A root that
    /// is a symlink is the symlink itself (a source copied as a link).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalEndpoint {
            root: root.into(),
            follow_root: false,
            devices: Arc::default(),
        }
    }

    /// An endpoint whose root, if a symlink, stands for what it points to:
    /// a destination like `/backup -> /mnt/disk` is written through, never
    /// replaced.
    pub fn following_root(root: impl Into<PathBuf>) -> Self {
        LocalEndpoint {
            root: root.into(),
            follow_root: true,
            devices: Arc::default(),
        }
    }

    /// Remembers that a file was written on device `dev` (in `dir`), so the
    /// next barrier syncs that file system too.
    fn note_device(&self, dev: u64, dir: &Path) -> Result<()> {
        let mut devs = self
            .devices
            .lock()
            .map_err(|_| Error::Internal("poisoned lock".into()))?;
        if !devs.iter().any(|(d, _)| *d == dev) {
            devs.push((dev, File::open(dir).ctx(dir, "open directory")?));
        }
        Ok(())
    }

    /// The absolute or relative path of `rel` under the root.
    pub fn path(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }
}

/// Converts file system metadata into an [`Entry`].
pub fn entry_from_metadata(name: OsString, md: &fs::Metadata) -> Entry {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Special
    };
    Entry {
        name,
        kind,
        size: if kind == Kind::File { md.size() } else { 0 },
        meta: Meta {
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: Time {
                sec: md.mtime(),
                nsec: md.mtime_nsec() as u32,
            },
            atime: Time {
                sec: md.atime(),
                nsec: md.atime_nsec() as u32,
            },
        },
        target: None,
        file_id: Some((md.dev(), md.ino())),
        nlink: md.nlink(),
        allocated: md.blocks() * 512,
        changed: Time {
            sec: md.ctime(),
            nsec: md.ctime_nsec() as u32,
        },
    }
}

fn lstat_entry(path: &Path, name: OsString) -> io::Result<Entry> {
    let md = fs::symlink_metadata(path)?;
    let mut e = entry_from_metadata(name, &md);
    if e.kind == Kind::Symlink {
        e.target = Some(fs::read_link(path)?);
    }
    Ok(e)
}

impl Source for LocalEndpoint {
    fn describe(&self, rel: &Path) -> String {
        self.path(rel).display().to_string()
    }

    fn stat(&self, rel: &Path) -> Result<Option<Entry>> {
        let p = self.path(rel);
        let name = p.file_name().map(OsStr::to_os_string).unwrap_or_default();
        let found = if self.follow_root && rel.as_os_str().is_empty() {
            fs::metadata(&p).map(|md| entry_from_metadata(name, &md))
        } else {
            lstat_entry(&p, name)
        };
        match found {
            Ok(e) => Ok(Some(e)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&p, "stat", e)),
        }
    }

    fn read_dir(&self, rel: &Path) -> Result<Vec<Entry>> {
        let p = self.path(rel);
        let mut out = Vec::new();
        for de in fs::read_dir(&p).ctx(&p, "read directory")? {
            let de = de.ctx(&p, "read directory")?;
            // DirEntry::metadata stats relative to the open directory.
            let md = de.metadata();
            let child = de.path();
            let entry = md.and_then(|md| {
                let mut e = entry_from_metadata(de.file_name(), &md);
                if e.kind == Kind::Symlink {
                    e.target = Some(fs::read_link(&child)?);
                }
                Ok(e)
            });
            match entry {
                Ok(e) => out.push(e),
                // Removed since the directory was read: as if never there.
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&child, "stat", e)),
            }
        }
        out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }

    fn open(&self, rel: &Path, expect: &Entry) -> Result<Box<dyn ReadFile>> {
        let p = self.path(rel);
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::Vanished(p)),
            Err(e) => return Err(Error::io(&p, "open", e)),
        };
        let md = file.metadata().ctx(&p, "stat")?;
        if !md.is_file()
            || md.size() != expect.size
            || md.mtime() != expect.meta.mtime.sec
            || md.mtime_nsec() as u32 != expect.meta.mtime.nsec
        {
            return Err(Error::Changed(p));
        }
        if md.size() > 1 << 20 {
            sys::advise_sequential(&file);
        }
        let sparse = md.blocks() * 512 < md.size();
        Ok(Box::new(LocalReadFile {
            stamp: stamp(&md),
            file,
            path: p,
            sparse,
        }))
    }

    fn xattrs(&self, rel: &Path) -> Result<Xattrs> {
        let p = self.path(rel);
        let mut out = Vec::new();
        for name in sys::list_xattrs(&p).ctx(&p, "list xattrs")? {
            match sys::get_xattr(&p, &name) {
                Ok(v) => out.push((name, v)),
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(Error::io(&p, "read xattr", e)),
            }
        }
        Ok(out)
    }
}

/// What identifies one version of a file's contents.
fn stamp(md: &fs::Metadata) -> (u64, i64, i64, i64, i64) {
    (md.size(), md.mtime(), md.mtime_nsec(), md.ctime(), md.ctime_nsec())
}

struct LocalReadFile {
    file: File,
    path: PathBuf,
    stamp: (u64, i64, i64, i64, i64),
    sparse: bool,
}

impl ReadFile for LocalReadFile {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(Error::Changed(self.path.clone())),
            Err(e) => Err(Error::io(&self.path, "read", e)),
        }
    }

    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        if !self.sparse {
            return Ok(vec![(offset, len)]);
        }
        sys::data_ranges(&self.file, offset, len).ctx(&self.path, "find holes")
    }

    fn local_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn check_unchanged(&self) -> Result<()> {
        let md = self.file.metadata().ctx(&self.path, "stat")?;
        if !md.is_file() || stamp(&md) != self.stamp {
            return Err(Error::Changed(self.path.clone()));
        }
        Ok(())
    }
}

/// Temporary and journal names for `final_path`.
fn side_paths(final_path: &Path) -> (PathBuf, PathBuf) {
    let parent = final_path.parent().unwrap_or(Path::new("."));
    let name = final_path.file_name().unwrap_or(OsStr::new("")).as_bytes();
    // Leave room for ".journal" within NAME_MAX.
    let stem: Vec<u8> = if name.len() + 15 <= 255 {
        [b".", name, b".tern"].concat()
    } else {
        format!(".tern-{}", &blake3::hash(name).to_hex()[..32]).into_bytes()
    };
    let with = |ext: &[u8]| parent.join(OsStr::from_bytes(&[&stem[..], ext].concat()));
    (with(b".tmp"), with(b".journal"))
}

/// Temporary name for a symlink or hard link about to be renamed into place:
/// distinct from file temporaries, which other writers may hold locked.
fn link_temp(final_path: &Path) -> PathBuf {
    let (tmp, _) = side_paths(final_path);
    let mut name = tmp.into_os_string();
    name.push(".lnk");
    PathBuf::from(name)
}

/// True when `name` is one of tern's own temporary or journal files.
pub fn is_side_file(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(b".")
        && [&b".tern.tmp"[..], b".tern.journal", b".tern.tmp.lnk"]
            .iter()
            .any(|s| b.ends_with(s))
}

fn apply_owner(path: &Path, f: Option<&File>, meta: &Meta) -> io::Result<()> {
    match f {
        Some(f) => std::os::unix::fs::fchown(f, Some(meta.uid), Some(meta.gid)),
        None => std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid)),
    }
}

fn apply_mode(path: &Path, f: Option<&File>, meta: &Meta, symlink: bool) -> io::Result<()> {
    if !symlink {
        let perm = fs::Permissions::from_mode(meta.mode);
        match f {
            Some(f) => f.set_permissions(perm)?,
            None => fs::set_permissions(path, perm)?,
        }
    }
    Ok(())
}

fn set_xattrs(path: &Path, xattrs: &Xattrs) -> Result<()> {
    for (name, value) in xattrs {
        sys::set_xattr(path, name, value).ctx(path, "set xattr")?;
    }
    Ok(())
}

impl Dest for LocalEndpoint {
    fn make_dir(&self, rel: &Path) -> Result<()> {
        let p = self.path(rel);
        let mut b = fs::DirBuilder::new();
        b.mode(0o755).recursive(rel.as_os_str().is_empty());
        match b.create(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && p.symlink_metadata().is_ok_and(|m| m.is_dir()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists || e.raw_os_error() == Some(libc::ENOTDIR) => {
                Err(Error::TypeConflict {
                    path: p,
                    found: "non-directory",
                    wanted: "directory",
                })
            }
            Err(e) => Err(Error::io(&p, "create directory", e)),
        }
    }

    fn create(&self, rel: &Path, spec: &FileSpec) -> Result<Box<dyn WriteFile>> {
        let final_path = self.path(rel);
        let (tmp, jpath) = side_paths(&final_path);
        if !spec.resumable {
            // An unnamed file needs no lock, leaves nothing behind if we die,
            // and can be linked straight to its final name.
            let dir = final_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if let Some(file) = sys::open_unnamed(dir, spec.source_meta.mode & 0o777).ctx(dir, "create")? {
                let md = file.metadata().ctx(&final_path, "stat")?;
                self.note_device(md.dev(), dir)?;
                return Ok(Box::new(LocalWriteFile {
                    created: (md.mode() & 0o7777, md.uid(), md.gid()),
                    unnamed: true,
                    durable: spec.durable,
                    reused: false,
                    file,
                    tmp,
                    final_path,
                    jpath,
                    journal: None,
                    resumed: Vec::new(),
                    size: spec.size,
                }));
            }
        }
        // Created with its final permission bits where that needs no
        // fchmod later; a new file's descriptor is writable whatever its mode.
        // Kept owner-writable so that a rerun can reopen it to resume; the
        // final mode is applied before the rename.
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(spec.source_meta.mode & 0o777 | 0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
        };
        let file = match open() {
            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                // A leftover that already got a read-only final mode.
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).ctx(&tmp, "make writable")?;
                open()
            }
            r => r,
        }
        .ctx(&tmp, "create")?;
        if !sys::try_lock(&file).ctx(&tmp, "lock")? {
            return Err(Error::Busy(final_path));
        }
        // The name may have been renamed into place by another process
        // between our open and our lock: then this is no longer our file.
        let md = file.metadata().ctx(&tmp, "stat")?;
        if !fs::symlink_metadata(&tmp).is_ok_and(|m| m.ino() == md.ino() && m.dev() == md.dev()) {
            return Err(Error::Busy(final_path));
        }
        self.note_device(md.dev(), tmp.parent().unwrap_or(Path::new(".")))?;
        let mut resumed = Vec::new();
        if spec.resumable && md.size() == spec.size {
            resumed = reverify(&file, &tmp, spec, journal::load(&jpath, spec))?;
        }
        if resumed.is_empty() && md.size() > 0 {
            file.set_len(0).ctx(&tmp, "truncate")?;
        }
        // Resumable files get their length up front so chunks land anywhere;
        // others grow as written (and are extended over a final hole).
        if spec.resumable {
            file.set_len(spec.size).ctx(&tmp, "set length")?;
        }

        let journal = if spec.resumable {
            Some(Journal::create(&jpath, spec, &resumed).ctx(&jpath, "write journal")?)
        } else {
            None
        };
        Ok(Box::new(LocalWriteFile {
            created: (md.mode() & 0o7777, md.uid(), md.gid()),
            unnamed: false,
            durable: spec.durable,
            reused: !resumed.is_empty(),
            file,
            tmp,
            final_path,
            jpath,
            journal,
            resumed,
            size: spec.size,
        }))
    }

    fn symlink(&self, rel: &Path, target: &Path, meta: &Meta, owner: bool) -> Result<()> {
        let final_path = self.path(rel);
        let tmp = link_temp(&final_path);
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).ctx(&tmp, "create symlink")?;
        let done = (if owner { apply_owner(&tmp, None, meta) } else { Ok(()) })
            .and_then(|()| sys::lutimes(&tmp, meta.atime, meta.mtime))
            .and_then(|()| fs::rename(&tmp, &final_path));
        if let Err(e) = done {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(&final_path, "create symlink", e));
        }
        Ok(())
    }

    fn hard_link(&self, existing: &Path, rel: &Path) -> Result<bool> {
        let from = self.path(existing);
        let to = self.path(rel);
        let same = |a: &Path, b: &Path| match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
            (Ok(x), Ok(y)) => x.ino() == y.ino() && x.dev() == y.dev(),
            _ => false,
        };
        if same(&from, &to) {
            return Ok(false);
        }
        let tmp = link_temp(&to);
        let _ = fs::remove_file(&tmp);
        fs::hard_link(&from, &tmp).ctx(&to, "hard link")?;
        let r = fs::rename(&tmp, &to).ctx(&to, "hard link");
        let _ = fs::remove_file(&tmp);
        r.map(|()| true)
    }

    fn set_meta(&self, rel: &Path, kind: Kind, meta: &Meta, owner: bool, xattrs: Option<&Xattrs>) -> Result<()> {
        let mut p = self.path(rel);
        if self.follow_root && rel.as_os_str().is_empty() {
            // The root stands for what it points to.
            p = fs::canonicalize(&p).ctx(&p, "resolve")?;
        }
        let symlink = kind == Kind::Symlink;
        if owner {
            apply_owner(&p, None, meta).ctx(&p, "set owner")?;
        }
        if let Some(x) = xattrs {
            set_xattrs(&p, x)?;
        }
        apply_mode(&p, None, meta, symlink).ctx(&p, "set permissions")?;
        sys::lutimes(&p, meta.atime, meta.mtime).ctx(&p, "set times")
    }

    fn remove(&self, rel: &Path) -> Result<()> {
        let p = self.path(rel);
        let md = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&p, "stat", e)),
        };
        if md.is_dir() {
            fs::remove_dir_all(&p).ctx(&p, "delete directory")
        } else {
            fs::remove_file(&p).ctx(&p, "delete")
        }
    }

    fn barrier(&self) -> Result<()> {
        let devs = self
            .devices
            .lock()
            .map_err(|_| Error::Internal("poisoned lock".into()))?;
        for (_, dir) in devs.iter() {
            sys::syncfs(dir).ctx(&self.root, "sync file system")?;
        }
        if !devs.is_empty() {
            return Ok(());
        }
        drop(devs);
        let mut p = self.root.clone();
        // The root of a single-file copy may not exist yet: sync its parent.
        while !p.exists() {
            if !p.pop() {
                p = PathBuf::from(".");
                break;
            }
        }
        let f = File::open(&p).ctx(&p, "open")?;
        sys::syncfs(&f).ctx(&p, "sync file system")
    }

    fn can_chown(&self) -> bool {
        sys::is_root()
    }
}

/// Keeps the journaled chunks whose data in the temporary file still hashes
/// to the recorded value.
fn reverify(
    file: &File,
    tmp: &Path,
    spec: &FileSpec,
    records: Vec<(u64, ChainingValue)>,
) -> Result<Vec<(u64, ChainingValue)>> {
    let mut buf = Vec::new();
    let mut ok = Vec::with_capacity(records.len());
    for (index, cv) in records {
        let off = index * spec.chunk_size;
        let len = spec.chunk_size.min(spec.size - off) as usize;
        buf.resize(len, 0);
        match file.read_exact_at(&mut buf, off) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => continue,
            Err(e) => return Err(Error::io(tmp, "read", e)),
        }
        if hash::chunk_cv(off, &buf) == cv {
            ok.push((index, cv));
        }
    }
    Ok(ok)
}

struct LocalWriteFile {
    file: File,
    tmp: PathBuf,
    final_path: PathBuf,
    jpath: PathBuf,
    journal: Option<Journal>,
    resumed: Vec<(u64, ChainingValue)>,
    reused: bool,
    size: u64,
    /// Mode, owner and group the temporary file was created with.
    created: (u32, u32, u32),
    /// Opened with O_TMPFILE: `tmp` is only used if the final name is taken.
    unnamed: bool,
    /// Will be fsync'd before it is published.
    durable: bool,
}

impl WriteFile for LocalWriteFile {
    fn resumed(&self) -> Vec<(u64, ChainingValue)> {
        self.resumed.clone()
    }

    fn write_chunk(
        &self,
        index: u64,
        offset: u64,
        data: &[u8],
        holes: &[(u64, u64)],
        cv: Option<&ChainingValue>,
    ) -> Result<()> {
        let mut pos = offset;
        let end = offset + data.len() as u64;
        let write = |from: u64, to: u64| -> Result<()> {
            if to > from {
                let s = (from - offset) as usize;
                let e = (to - offset) as usize;
                self.file
                    .write_all_at(&data[s..e], from)
                    .ctx(&self.final_path, "write")?;
            }
            Ok(())
        };
        for &(h, hl) in holes {
            write(pos, h)?;
            if self.reused {
                // Stale bytes from an unverified earlier attempt may sit here.
                match sys::punch_hole(&self.file, h, hl) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        let zeros = vec![0u8; hl as usize];
                        self.file.write_all_at(&zeros, h).ctx(&self.final_path, "write")?;
                    }
                    r => r.ctx(&self.final_path, "punch hole")?,
                }
            }
            pos = h + hl;
        }
        write(pos, end)?;
        if pos >= end && end == self.size && self.journal.is_none() {
            // The file ends in a hole: give it its length.
            self.file.set_len(self.size).ctx(&self.final_path, "set length")?;
        }
        if self.durable && self.journal.is_some() {
            // The fsync before the rename will need these bytes on disk:
            // start now, so the disk works while later chunks are copied.
            sys::start_writeback(&self.file, offset, data.len() as u64);
        }
        if let (Some(j), Some(cv)) = (&self.journal, cv) {
            j.append(index, cv).ctx(&self.jpath, "write journal")?;
        }
        Ok(())
    }

    fn set_meta(&self, meta: &Meta, owner: bool, xattrs: &Xattrs) -> Result<()> {
        let (mode, uid, gid) = self.created;
        // chown clears set-id bits and file capabilities: owner first, then
        // xattrs, then mode.
        let owner = owner && (meta.uid, meta.gid) != (uid, gid);
        if owner {
            apply_owner(&self.tmp, Some(&self.file), meta).ctx(&self.final_path, "set owner")?;
        }
        for (name, value) in xattrs {
            sys::fset_xattr(&self.file, name, value).ctx(&self.final_path, "set xattr")?;
        }
        if owner || meta.mode != mode {
            apply_mode(&self.tmp, Some(&self.file), meta, false).ctx(&self.final_path, "set permissions")?;
        }
        sys::futimes(&self.file, meta.atime, meta.mtime).ctx(&self.final_path, "set times")
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_all().ctx(&self.final_path, "fsync")
    }

    fn verify(&self, expected: &Hash) -> Result<()> {
        sys::drop_cache(&self.file);
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = self.file.read_at(&mut buf, total).ctx(&self.final_path, "read back")?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
        }
        let found = h.finalize();
        if total != self.size || found != *expected {
            return Err(Error::VerifyFailed {
                path: self.final_path.clone(),
                expected: expected.to_hex().to_string(),
                found: found.to_hex().to_string(),
            });
        }
        Ok(())
    }

    fn publish(self: Box<Self>) -> Result<()> {
        if self.unnamed {
            match sys::link_unnamed(&self.file, &self.final_path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&self.final_path, "link into place", e)),
            }
            // Replacing a file: name ours beside it, then rename over it.
            let _ = fs::remove_file(&self.tmp);
            sys::link_unnamed(&self.file, &self.tmp).ctx(&self.final_path, "link temporary file")?;
        }
        if !self.unnamed {
            // Rename only what we wrote: the name must still be our inode.
            let ours = self.file.metadata().ctx(&self.final_path, "stat")?;
            if !fs::symlink_metadata(&self.tmp).is_ok_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev()) {
                return Err(Error::Busy(self.final_path.clone()));
            }
        }
        fs::rename(&self.tmp, &self.final_path).ctx(&self.final_path, "rename into place")?;
        if self.journal.is_some() {
            let _ = fs::remove_file(&self.jpath);
        }
        Ok(())
    }

    fn clone_from(&self, src: &File) -> Result<bool> {
        if self.reused {
            return Ok(false);
        }
        sys::reflink(&self.file, src).ctx(&self.final_path, "reflink")
    }

    fn abort(self: Box<Self>, keep: bool) {
        if self.unnamed {
            return; // freed when the descriptor closes
        }
        let ours = self.file.metadata().ok();
        let still_ours = fs::symlink_metadata(&self.tmp).is_ok_and(|m| ours.is_some_and(|o| o.ino() == m.ino()));
        if still_ours && (!keep || self.journal.is_none()) {
            let _ = fs::remove_file(&self.tmp);
            let _ = fs::remove_file(&self.jpath);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_paths_stay_within_name_max() {
        let long = "x".repeat(250);
        let (t, j) = side_paths(&Path::new("/d").join(&long));
        assert!(t.file_name().map_or(0, |n| n.len()) <= 255);
        assert!(j.file_name().map_or(0, |n| n.len()) <= 255);
        let (t, j) = side_paths(Path::new("/d/a"));
        assert_eq!(t, Path::new("/d/.a.tern.tmp"));
        assert_eq!(j, Path::new("/d/.a.tern.journal"));
    }
}
