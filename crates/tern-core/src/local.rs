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
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use blake3::hazmat::ChainingValue;

use crate::endpoint::{Dest, FileSpec, ReadFile, Source, WriteFile, Xattrs};
use crate::entry::{Entry, Kind, Meta, Time};
use crate::error::{Error, IoContext, Result};
use crate::hash::{self, Hash};
use crate::journal::{self, Journal};
use crate::policy::MetaPolicy;
use crate::quota::{Charge, Quota};
use crate::sys;

mod backup;
pub use backup::Backup;

/// A directory tree (or single file) on a local file system.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    root: PathBuf,
    follow_root: bool,
    /// Keys the resume journals written and trusted here.
    journal_key: journal::Key,
    /// One open directory on each file system written to, for `barrier`.
    devices: Arc<Mutex<Vec<(u64, File)>>>,
    /// Barriers asked for while one runs share the next one.
    group: Arc<GroupSync>,
    /// For an endpoint exported to remote clients: the open root directory,
    /// beneath which every path is resolved by the kernel.
    confine: Option<Arc<OwnedFd>>,
    /// What writers may set, for an endpoint written on behalf of others.
    policy: Option<Arc<MetaPolicy>>,
    /// How many bytes writers may keep beneath the root.
    quota: Option<Arc<Quota>>,
    /// What is kept of replaced and deleted entries.
    backup: Option<Arc<Backup>>,
}

/// A path ready for a system call, and the open directory it is relative to
/// when the endpoint is confined (the path is then `/proc/self/fd/N/NAME`,
/// which names NAME in exactly that directory, whatever happens to the path
/// that led there).
struct At {
    path: PathBuf,
    dir: Option<Arc<OwnedFd>>,
}

impl std::ops::Deref for At {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for At {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl LocalEndpoint {
    /// An endpoint rooted at `root`, which need not exist yet. A root that
    /// is a symlink is the symlink itself (a source copied as a link).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalEndpoint {
            root: root.into(),
            follow_root: false,
            journal_key: journal::DEFAULT_KEY,
            devices: Arc::default(),
            group: Arc::default(),
            confine: None,
            policy: None,
            quota: None,
            backup: None,
        }
    }

    /// An endpoint whose root, if a symlink, stands for what it points to:
    /// a destination like `/backup -> /mnt/disk` is written through, never
    /// replaced.
    pub fn following_root(root: impl Into<PathBuf>) -> Self {
        LocalEndpoint {
            follow_root: true,
            ..LocalEndpoint::new(root)
        }
    }

    /// The most descriptors a file being written to `spec` holds open
    /// until it is published or aborted: the file, its directory (when
    /// confined), the resume journal, and a second, O_DIRECT descriptor
    /// for a large file.
    pub fn descriptors_for(spec: &FileSpec) -> usize {
        2 + usize::from(spec.resumable) + usize::from(writes_direct(spec))
    }

    /// An endpoint for a directory exported to untrusted clients. Every path
    /// is resolved beneath `root` by the kernel (`openat2` with
    /// `RESOLVE_BENEATH`), so `..`, absolute paths and symlinks, also ones
    /// swapped in while a transfer runs, cannot reach outside it; a final
    /// symlink is never followed, and only regular files are opened. The root
    /// must be an existing directory.
    pub fn confined(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&root)
            .ctx(&root, "open module root")?;
        Ok(LocalEndpoint {
            root,
            follow_root: false,
            journal_key: journal::DEFAULT_KEY,
            devices: Arc::default(),
            group: Arc::default(),
            confine: Some(Arc::new(dir.into())),
            policy: None,
            quota: None,
            backup: None,
        })
    }

    /// Keys resume journals with `key` instead of the public default: a
    /// journal planted by someone who does not know it is ignored, as a torn
    /// one is. A daemon passes a secret derived from its identity.
    pub fn with_journal_key(mut self, key: [u8; 32]) -> Self {
        self.journal_key = key;
        self
    }

    /// Removes the temporary files and journals beneath the root that were
    /// last modified more than `max_age` ago: what interrupted transfers
    /// left and no rerun came back for. The walk never follows a symlink and
    /// stays beneath the root; a temporary file being written is kept.
    pub fn expire_side_files(&self, max_age: std::time::Duration) -> Result<crate::expire::Expired> {
        let cutoff = std::time::SystemTime::now()
            .checked_sub(max_age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let root = self.at(Path::new("")).ctx(&self.root, "open directory")?;
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&*root)
            .ctx(&self.root, "open directory")?;
        Ok(crate::expire::expire(dir.into(), cutoff))
    }

    /// This endpoint, applying `policy` to every mode, owner and extended
    /// attribute written, and to the attributes it shows. The root's own
    /// metadata is then left alone: it belongs to whoever set the endpoint
    /// up, not to its writers.
    pub fn with_policy(mut self, policy: MetaPolicy) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// This endpoint, refusing to create a file that would take the bytes
    /// beneath the root past `quota` (see [`crate::quota`]).
    pub fn with_quota(mut self, quota: Arc<Quota>) -> Self {
        self.quota = Some(quota);
        self
    }

    /// The quota, if there is one.
    pub fn quota(&self) -> Option<&Arc<Quota>> {
        self.quota.as_ref()
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the system calls for `rel` go. Confined, the parent directory
    /// is opened beneath the root; a path with `..`, a root or `.` component
    /// is refused outright.
    fn at(&self, rel: &Path) -> io::Result<At> {
        let Some(root) = &self.confine else {
            return Ok(At {
                path: self.path(rel),
                dir: None,
            });
        };
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "path must be relative and free of `..` and `.`",
            ));
        }
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            // "X/." names the directory itself, where "X" alone would be the
            // /proc link.
            return Ok(At {
                path: sys::fd_path(&**root).join("."),
                dir: Some(root.clone()),
            });
        };
        let dir = if parent.as_os_str().is_empty() {
            root.clone()
        } else {
            let fd = sys::open_beneath(&**root, parent, libc::O_PATH | libc::O_DIRECTORY).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::EXDEV) => io::Error::new(ErrorKind::PermissionDenied, "path leads outside the module"),
                    _ => e,
                }
            })?;
            Arc::new(fd)
        };
        Ok(At {
            path: sys::fd_path(&*dir).join(name),
            dir: Some(dir),
        })
    }

    /// The name of the entry `rel` (of the root itself when `rel` is empty).
    fn name_of(&self, rel: &Path) -> OsString {
        rel.file_name()
            .or_else(|| self.root.file_name())
            .map(OsStr::to_os_string)
            .unwrap_or_default()
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

/// A regular, non-empty file at `path` (never through a final symlink), as
/// a delta basis; `None` if there is none. It is looked at before it is
/// opened for reading, so no device or FIFO is ever opened for real.
fn open_basis(path: &Path, shown: &Path) -> Result<Option<(File, u64)>> {
    let looked = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path);
    let f = match looked {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(Error::io(shown, "open the old version", e)),
    };
    let md = f.metadata().ctx(shown, "stat")?;
    if !md.is_file() || md.len() == 0 {
        return Ok(None);
    }
    let f = File::open(sys::fd_path(&f)).ctx(shown, "open the old version")?;
    Ok(Some((f, md.len())))
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

fn not_found(e: &io::Error) -> bool {
    e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

impl Source for LocalEndpoint {
    fn describe(&self, rel: &Path) -> String {
        self.path(rel).display().to_string()
    }

    fn stat(&self, rel: &Path) -> Result<Option<Entry>> {
        let shown = self.path(rel);
        let name = self.name_of(rel);
        let found = self.at(rel).and_then(|p| {
            if self.follow_root && rel.as_os_str().is_empty() {
                fs::metadata(&*p).map(|md| entry_from_metadata(name, &md))
            } else {
                lstat_entry(&p, name)
            }
        });
        match found {
            Ok(e) => Ok(Some(e)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(Error::io(&shown, "stat", e)),
        }
    }

    fn read_dir(&self, rel: &Path) -> Result<Vec<Entry>> {
        let shown = self.path(rel);
        let p = self.at(rel).ctx(&shown, "read directory")?;
        // Confined, the directory itself is opened without following a
        // symlink swapped in for it, and listed through its descriptor.
        let opened;
        let list: &Path = match p.dir {
            None => &p,
            Some(_) => {
                let d = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .open(&*p)
                    .ctx(&shown, "read directory")?;
                opened = (sys::fd_path(&d), d);
                &opened.0
            }
        };
        let mut out = Vec::new();
        for de in fs::read_dir(list).ctx(&shown, "read directory")? {
            let de = de.ctx(&shown, "read directory")?;
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
                Err(e) => return Err(Error::io(&shown.join(de.file_name()), "stat", e)),
            }
        }
        out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        Ok(out)
    }

    fn open(&self, rel: &Path, expect: &Entry) -> Result<Box<dyn ReadFile>> {
        let shown = self.path(rel);
        let opened = self.at(rel).and_then(|p| {
            if p.dir.is_none() {
                return OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(&*p);
            }
            // Confined: look before opening, so that no device or FIFO is
            // ever opened for real; the reopen goes to the inode looked at.
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
                .open(&*p)?;
            if !f.metadata()?.is_file() {
                return Err(io::Error::new(ErrorKind::InvalidInput, "not a regular file"));
            }
            File::open(sys::fd_path(&f))
        });
        let file = match opened {
            Ok(f) => f,
            Err(e) if not_found(&e) => return Err(Error::Vanished(shown)),
            Err(e) if e.kind() == ErrorKind::InvalidInput => return Err(Error::Changed(shown)),
            Err(e) => return Err(Error::io(&shown, "open", e)),
        };
        let md = file.metadata().ctx(&shown, "stat")?;
        if !md.is_file()
            || md.size() != expect.size
            || md.mtime() != expect.meta.mtime.sec
            || md.mtime_nsec() as u32 != expect.meta.mtime.nsec
        {
            return Err(Error::Changed(shown));
        }
        if md.size() > 1 << 20 {
            sys::advise_sequential(&file);
        }
        let sparse = md.blocks() * 512 < md.size();
        Ok(Box::new(LocalReadFile {
            stamp: stamp(&md),
            file,
            path: shown,
            sparse,
        }))
    }

    fn xattrs(&self, rel: &Path) -> Result<Xattrs> {
        let shown = self.path(rel);
        let p = self.at(rel).ctx(&shown, "list xattrs")?;
        let mut out = Vec::new();
        for name in sys::list_xattrs(&p).ctx(&shown, "list xattrs")? {
            if self.policy.as_ref().is_some_and(|pol| !pol.xattr_allowed(&name)) {
                continue;
            }
            match sys::get_xattr(&p, &name) {
                Ok(v) => out.push((name, v)),
                Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
                Err(e) => return Err(Error::io(&shown, "read xattr", e)),
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
    fn describe(&self) -> PathBuf {
        self.path.clone()
    }

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
    let stem = side_stem(final_path);
    (with_suffix(&stem, TMP_SUFFIX), with_suffix(&stem, JOURNAL_SUFFIX))
}

/// Side files are a stem and one of these: the temporary file, its journal,
/// and the temporary name of a symlink or hard link.
const TMP_SUFFIX: &[u8] = b".tmp";
const JOURNAL_SUFFIX: &[u8] = b".journal";
const LINK_SUFFIX: &[u8] = b".tmp.lnk";
const SIDE_SUFFIXES: [&[u8]; 3] = [TMP_SUFFIX, JOURNAL_SUFFIX, LINK_SUFFIX];
/// Hex digits of the name's BLAKE3 in the stem of a name too long to keep.
const HASHED_DIGITS: usize = 32;

/// The path, minus its suffix, of the side files of `final_path`:
/// `.NAME.tern`, or `.tern-HASH` for a name too long to take the prefix and
/// the longest suffix within NAME_MAX.
fn side_stem(final_path: &Path) -> PathBuf {
    let parent = final_path.parent().unwrap_or(Path::new("."));
    let name = final_path.file_name().unwrap_or(OsStr::new("")).as_bytes();
    let stem: Vec<u8> = if name.len() + 15 <= 255 {
        [b".", name, b".tern"].concat()
    } else {
        format!(".tern-{}", &blake3::hash(name).to_hex()[..HASHED_DIGITS]).into_bytes()
    };
    parent.join(OsStr::from_bytes(&stem))
}

fn with_suffix(stem: &Path, suffix: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&[stem.as_os_str().as_bytes(), suffix].concat()))
}

/// Whether `stem` has either shape [`side_stem`] gives a name.
fn is_side_stem(stem: &[u8]) -> bool {
    let kept = stem.starts_with(b".") && stem.ends_with(b".tern");
    let hashed = stem
        .strip_prefix(b".tern-")
        .is_some_and(|h| h.len() == HASHED_DIGITS && h.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)));
    kept || hashed
}

/// The name of the temporary file a journal named `name` belongs to.
pub(crate) fn temp_of_journal(name: &[u8]) -> Option<Vec<u8>> {
    let stem = name.strip_suffix(JOURNAL_SUFFIX).filter(|s| is_side_stem(s))?;
    Some([stem, TMP_SUFFIX].concat())
}

/// Temporary name for a symlink or hard link about to be renamed into place:
/// distinct from file temporaries, which other writers may hold locked.
fn link_temp(final_path: &Path) -> PathBuf {
    with_suffix(&side_stem(final_path), LINK_SUFFIX)
}

/// True when `name` is one of tern's own temporary or journal files, in
/// any of the forms [`side_paths`] and [`link_temp`] produce. Every name a
/// client may create is checked with this one predicate: a side file a
/// client could make would be written through or trusted by a later copy.
pub fn is_side_file(name: &OsStr) -> bool {
    let b = name.as_bytes();
    SIDE_SUFFIXES
        .iter()
        .any(|s| b.strip_suffix(*s).is_some_and(is_side_stem))
}

fn apply_owner(path: &Path, f: Option<&File>, (uid, gid): (u32, u32)) -> io::Result<()> {
    match f {
        Some(f) => std::os::unix::fs::fchown(f, Some(uid), Some(gid)),
        None => std::os::unix::fs::lchown(path, Some(uid), Some(gid)),
    }
}

/// The owner and group to give an entry, `None` to leave them: what its
/// writer asks for (`asked`), or under a policy, when this process may
/// give files away, what the policy makes of that and of the entry's
/// `current` owner.
fn owner_to_set(
    policy: Option<&MetaPolicy>,
    current: impl FnOnce() -> io::Result<(u32, u32)>,
    asked: Option<(u32, u32)>,
) -> io::Result<Option<(u32, u32)>> {
    match policy {
        Some(p) if sys::is_root() => {
            let now = current()?;
            let want = p.owner(now, asked);
            Ok((want != now).then_some(want))
        }
        _ => Ok(asked),
    }
}

fn owner_of(path: &Path) -> io::Result<(u32, u32)> {
    fs::symlink_metadata(path).map(|m| (m.uid(), m.gid()))
}

/// `meta` with the permission bits `policy` allows an entry of `kind`.
fn allowed_meta(policy: Option<&MetaPolicy>, kind: Kind, meta: &Meta) -> Meta {
    let mut m = meta.clone();
    if let Some(p) = policy {
        m.mode = p.mode(kind, m.mode);
    }
    m
}

/// The attributes of `xattrs` that `policy` lets a writer set.
fn allowed_xattrs<'a>(policy: Option<&MetaPolicy>, xattrs: &'a Xattrs) -> std::borrow::Cow<'a, Xattrs> {
    match policy {
        Some(p) => p.filter_xattrs(xattrs),
        None => std::borrow::Cow::Borrowed(xattrs),
    }
}

fn apply_mode(path: &Path, f: Option<&File>, meta: &Meta, symlink: bool) -> io::Result<()> {
    if !symlink {
        let perm = fs::Permissions::from_mode(meta.mode);
        match f {
            Some(f) => f.set_permissions(perm)?,
            None => sys::chmod_nofollow(path, meta.mode)?,
        }
    }
    Ok(())
}

fn set_xattrs(path: &Path, shown: &Path, xattrs: &Xattrs) -> Result<()> {
    for (name, value) in xattrs {
        sys::set_xattr(path, name, value).ctx(shown, "set xattr")?;
    }
    Ok(())
}

impl Dest for LocalEndpoint {
    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let shown = self.path(from);
        let a = self.at(from).ctx(&shown, "rename")?;
        let b = self.at(to).ctx(&self.path(to), "rename")?;
        let replaced = fs::symlink_metadata(&*b).ok();
        let kept = match &replaced {
            Some(m) if !m.is_dir() => self.back_up_replaced(to, &b)?,
            _ => false,
        };
        fs::rename(&*a, &*b).map_err(|e| Error::io(&shown, "rename", e))?;
        if let (Some(q), Some(m), false) = (&self.quota, &replaced, kept) {
            if m.is_file() && m.nlink() == 1 {
                q.credit(m.len());
            }
        }
        Ok(())
    }

    fn make_dir(&self, rel: &Path) -> Result<()> {
        let shown = self.path(rel);
        let p = self.at(rel).ctx(&shown, "create directory")?;
        let mut b = fs::DirBuilder::new();
        b.mode(0o755).recursive(rel.as_os_str().is_empty());
        match b.create(&*p) {
            Ok(()) => self.own_new_dir(rel, &p).ctx(&shown, "set owner"),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && p.symlink_metadata().is_ok_and(|m| m.is_dir()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists || e.raw_os_error() == Some(libc::ENOTDIR) => {
                Err(Error::TypeConflict {
                    path: shown,
                    found: "non-directory",
                    wanted: "directory",
                    hint: "",
                })
            }
            Err(e) => Err(Error::io(&shown, "create directory", e)),
        }
    }

    fn basis_signatures(&self, items: &[(&Path, u64)]) -> Vec<Option<crate::delta::Signature>> {
        items
            .iter()
            .map(|&(rel, listed)| {
                let shown = self.path(rel);
                let sig = self
                    .at(rel)
                    .map_err(|e| Error::io(&shown, "open the old version", e))
                    .and_then(|at| open_basis(&at, &shown))
                    .and_then(|basis| {
                        let Some((f, size)) = basis.filter(|b| b.1 == listed) else {
                            return Ok(None);
                        };
                        let read =
                            |off: u64, buf: &mut [u8]| f.read_exact_at(buf, off).ctx(&shown, "read the old version");
                        crate::delta::signature(&read, size, 1).map(Some)
                    });
                sig.unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "no delta: the old version cannot be read");
                    None
                })
            })
            .collect()
    }

    fn create(&self, rel: &Path, spec: &FileSpec) -> Result<Box<dyn WriteFile>> {
        let shown = self.path(rel);
        let at = self.at(rel).ctx(&shown, "create")?;
        let (tmp, jpath) = side_paths(&at.path);
        let charge = match &self.quota {
            Some(q) => {
                // A partial file being resumed is counted already.
                let held = match spec.resumable {
                    true => fs::symlink_metadata(&tmp).map_or(0, |m| if m.is_file() { m.len() } else { 0 }),
                    false => 0,
                };
                Some(q.charge(spec.size, held, &shown)?)
            }
            None => None,
        };
        let final_path = at.path.clone();
        let new = |file, unnamed, journal, resumed: Vec<_>, created, charge| LocalWriteFile {
            created,
            unnamed,
            durable: spec.durable,
            write_lock: std::sync::Mutex::new(sys::AlignedBuf::default()),
            direct: writes_direct(spec).then(|| sys::reopen_direct(&file)).flatten(),
            direct_failed: std::sync::atomic::AtomicBool::new(false),
            reused: !resumed.is_empty(),
            file,
            tmp: tmp.clone(),
            final_path: final_path.clone(),
            jpath: jpath.clone(),
            shown: shown.clone(),
            _dir: at.dir.clone(),
            arrived: Arrived::new(spec, &resumed),
            journal,
            resumed,
            size: spec.size,
            policy: self.policy.clone(),
            charge,
            basis: std::sync::OnceLock::new(),
            ep: self.clone(),
            rel: rel.to_path_buf(),
        };
        if !spec.resumable {
            // An unnamed file needs no lock, leaves nothing behind if we die,
            // and can be linked straight to its final name.
            let dir = final_path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if let Some(file) = sys::open_unnamed(dir, spec.source_meta.mode & 0o777).ctx(&shown, "create")? {
                let md = file.metadata().ctx(&shown, "stat")?;
                self.note_device(md.dev(), dir)?;
                let created = (md.mode() & 0o7777, md.uid(), md.gid());
                return Ok(Box::new(new(file, true, None, Vec::new(), created, charge)));
            }
        }
        // Created with its final permission bits where that needs no
        // fchmod later; a new file's descriptor is writable whatever its mode.
        // Kept owner-writable so that a rerun can reopen it to resume; the
        // final mode is applied before the rename. O_NONBLOCK: a FIFO planted
        // at the name must not hold this thread (it has no effect on a
        // regular file, so it stays set).
        let open = |fresh: bool| {
            let mut o = OpenOptions::new();
            o.read(true)
                .write(true)
                .mode(spec.source_meta.mode & 0o777 | 0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
            match fresh {
                true => o.create_new(true),
                false => o.create(true).truncate(false),
            };
            o.open(&tmp)
        };
        // Only a regular file with no other name can be tern's own leftover.
        // Anything else at the name was planted there: a hard link, to have
        // another file overwritten; a FIFO, to hang us; a symlink. Its name
        // is taken back and a new file made; what it led to is never touched.
        let planted = |md: &fs::Metadata| !md.file_type().is_file() || md.nlink() != 1;
        let replace = || -> Result<File> {
            tracing::warn!(path = ?shown, "replacing something at the temporary name that tern did not write");
            fs::remove_file(&tmp).ctx(&shown, "remove planted temporary file")?;
            open(true).ctx(&shown, "create temporary file")
        };
        let file = match open(false) {
            Err(e) if e.kind() == ErrorKind::PermissionDenied => match fs::symlink_metadata(&tmp) {
                // A leftover that already got a read-only final mode.
                Ok(md) if !planted(&md) => {
                    sys::chmod_nofollow(&tmp, 0o600).ctx(&shown, "make temporary file writable")?;
                    open(false).ctx(&shown, "create temporary file")?
                }
                _ => replace()?,
            },
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => replace()?,
            r => r.ctx(&shown, "create temporary file")?,
        };
        let md = file.metadata().ctx(&shown, "stat")?;
        let (file, md) = if planted(&md) {
            drop(file);
            let file = replace()?;
            let md = file.metadata().ctx(&shown, "stat")?;
            (file, md)
        } else {
            (file, md)
        };
        if !sys::try_lock(&file).ctx(&shown, "lock")? {
            return Err(Error::Busy(shown));
        }
        // The name may have been renamed into place by another process
        // between our open and our lock: then this is no longer our file.
        if !fs::symlink_metadata(&tmp).is_ok_and(|m| m.ino() == md.ino() && m.dev() == md.dev()) {
            return Err(Error::Busy(shown));
        }
        self.note_device(md.dev(), tmp.parent().unwrap_or(Path::new(".")))?;
        let mut resumed = Vec::new();
        if spec.resumable && md.size() == spec.size {
            resumed = reverify(&file, &shown, spec, journal::load(&jpath, spec, &self.journal_key))?;
        }
        if resumed.is_empty() && md.size() > 0 {
            file.set_len(0).ctx(&shown, "truncate")?;
        }
        // Resumable files get their length up front so chunks land anywhere;
        // others grow as written (and are extended over a final hole).
        if spec.resumable {
            file.set_len(spec.size).ctx(&shown, "set length")?;
        }

        let journal = if spec.resumable {
            Some(Journal::create(&jpath, spec, &self.journal_key, &resumed).ctx(&shown, "write journal")?)
        } else {
            None
        };
        let created = (md.mode() & 0o7777, md.uid(), md.gid());
        Ok(Box::new(new(file, false, journal, resumed, created, charge)))
    }

    fn symlink(&self, rel: &Path, target: &Path, meta: &Meta, owner: bool) -> Result<()> {
        let shown = self.path(rel);
        let at = self.at(rel).ctx(&shown, "create symlink")?;
        let tmp = link_temp(&at);
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).ctx(&shown, "create symlink")?;
        let asked = owner.then_some((meta.uid, meta.gid));
        let done = owner_to_set(self.policy.as_deref(), || owner_of(&tmp), asked)
            .and_then(|o| o.map_or(Ok(()), |o| apply_owner(&tmp, None, o)))
            .and_then(|()| sys::lutimes(&tmp, meta.atime, meta.mtime))
            .map_err(|e| Error::io(&shown, "create symlink", e))
            .and_then(|()| self.back_up_replaced(rel, &at))
            .and_then(|_| fs::rename(&tmp, &*at).ctx(&shown, "create symlink"));
        if done.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        done
    }

    fn hard_link(&self, existing: &Path, rel: &Path) -> Result<bool> {
        let shown = self.path(rel);
        let from = self.at(existing).ctx(&self.path(existing), "hard link")?;
        let to = self.at(rel).ctx(&shown, "hard link")?;
        let same = |a: &Path, b: &Path| match (fs::symlink_metadata(a), fs::symlink_metadata(b)) {
            (Ok(x), Ok(y)) => x.ino() == y.ino() && x.dev() == y.dev(),
            _ => false,
        };
        if same(&from, &to) {
            return Ok(false);
        }
        let tmp = link_temp(&to);
        let _ = fs::remove_file(&tmp);
        // linkat without AT_SYMLINK_FOLLOW: a symlink is linked as itself.
        fs::hard_link(&*from, &tmp).ctx(&shown, "hard link")?;
        let r = self
            .back_up_replaced(rel, &to)
            .and_then(|_| fs::rename(&tmp, &*to).ctx(&shown, "hard link"));
        let _ = fs::remove_file(&tmp);
        r.map(|()| true)
    }

    fn set_meta(&self, rel: &Path, kind: Kind, meta: &Meta, owner: bool, xattrs: Option<&Xattrs>) -> Result<()> {
        let shown = self.path(rel);
        let policy = self.policy.as_deref();
        if policy.is_some() && rel.as_os_str().is_empty() {
            tracing::debug!(root = %shown.display(), "the root's metadata is left as it is");
            return Ok(());
        }
        let mut p = self.at(rel).ctx(&shown, "set metadata")?;
        if self.follow_root && rel.as_os_str().is_empty() {
            // The root stands for what it points to.
            p.path = fs::canonicalize(&p.path).ctx(&shown, "resolve")?;
        }
        let symlink = kind == Kind::Symlink;
        let meta = &allowed_meta(policy, kind, meta);
        let asked = owner.then_some((meta.uid, meta.gid));
        if let Some(o) = owner_to_set(policy, || owner_of(&p), asked).ctx(&shown, "set owner")? {
            apply_owner(&p, None, o).ctx(&shown, "set owner")?;
        }
        if let Some(x) = xattrs {
            set_xattrs(&p, &shown, &allowed_xattrs(policy, x))?;
        }
        apply_mode(&p, None, meta, symlink).ctx(&shown, "set permissions")?;
        sys::lutimes(&p, meta.atime, meta.mtime).ctx(&shown, "set times")
    }

    fn remove(&self, rel: &Path) -> Result<()> {
        let shown = self.path(rel);
        let p = self.at(rel).ctx(&shown, "delete")?;
        let md = match fs::symlink_metadata(&*p) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(&shown, "stat", e)),
        };
        if self.back_up_removed(rel, &p, &md)? {
            return Ok(());
        }
        // remove_dir_all descends with O_NOFOLLOW and unlinkat: it never
        // leaves the tree, even if a directory is swapped for a symlink.
        if md.is_dir() {
            let freed = self.quota.as_ref().map(|_| dir_usage(&p));
            fs::remove_dir_all(&*p).ctx(&shown, "delete directory")?;
            if let (Some(q), Some(n)) = (&self.quota, freed) {
                q.credit(n);
            }
            Ok(())
        } else {
            fs::remove_file(&*p).ctx(&shown, "delete")?;
            if let (Some(q), true) = (&self.quota, md.is_file()) {
                q.credit(md.len());
            }
            Ok(())
        }
    }

    fn barrier(&self) -> Result<()> {
        self.group.run(&self.root, || self.sync_devices())
    }

    fn can_chown(&self) -> bool {
        // Owners a policy fixes are not the writer's to choose: it is told
        // so, and neither sends nor compares them.
        sys::is_root() && !self.policy.as_ref().is_some_and(|p| p.uid.is_some() && p.gid.is_some())
    }
}

/// The bytes of the regular files beneath the directory `p`, never
/// following a symlink: what deleting it gives back to a quota.
fn dir_usage(p: &Path) -> u64 {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(p)
        .map_or(0, |d| crate::expire::expire(d.into(), std::time::UNIX_EPOCH).remaining)
}

impl LocalEndpoint {
    /// Gives a directory just made at `rel` the owner the policy wants for
    /// it (none asked: the directory has no source owner yet).
    fn own_new_dir(&self, rel: &Path, p: &Path) -> io::Result<()> {
        if rel.as_os_str().is_empty() {
            return Ok(());
        }
        match owner_to_set(self.policy.as_deref(), || owner_of(p), None)? {
            Some(o) => apply_owner(p, None, o),
            None => Ok(()),
        }
    }
}

/// Files at least this large are written with O_DIRECT where the file
/// system allows it (smaller ones gain little and are often read soon).
const DIRECT_MIN: u64 = 32 << 20;

/// Whether a file to `spec` is written with O_DIRECT: a large one that is
/// to be durable, whose pages would otherwise be written twice (copied into
/// the cache, then flushed by the fsync). One not made durable
/// (`--no-fsync`) goes to the page cache, as `cp` puts it there: its user
/// asked for speed, and a file that fits in memory lands at memory speed.
fn writes_direct(spec: &FileSpec) -> bool {
    spec.durable && spec.size >= DIRECT_MIN
}

/// Group commit for barriers: a barrier asked for while a sync runs waits
/// for the next sync, which serves every request made before it started.
/// Several workers ending their batches at once then cost one `syncfs`
/// instead of one each, one after the other.
#[derive(Debug, Default)]
struct GroupSync {
    state: Mutex<SyncState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Requests so far.
    requested: u64,
    /// Every request up to this one is covered by a finished sync.
    covered: u64,
    running: bool,
    /// The last sync's failure, and the requests it covered.
    failed: Option<(u64, String)>,
}

impl GroupSync {
    fn run(&self, shown: &Path, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        let poisoned = || Error::Internal("poisoned lock".into());
        let mut st = self.state.lock().map_err(|_| poisoned())?;
        st.requested += 1;
        let ticket = st.requested;
        loop {
            if st.covered >= ticket {
                return match &st.failed {
                    Some((upto, message)) if *upto >= ticket => Err(Error::Other {
                        path: shown.to_path_buf(),
                        message: message.clone(),
                    }),
                    _ => Ok(()),
                };
            }
            if !st.running {
                st.running = true;
                let upto = st.requested;
                drop(st);
                let r = sync();
                let mut st = self.state.lock().map_err(|_| poisoned())?;
                st.running = false;
                st.covered = upto;
                st.failed = r.as_ref().err().map(|e| (upto, e.detail()));
                self.done.notify_all();
                return r;
            }
            st = self.done.wait(st).map_err(|_| poisoned())?;
        }
    }
}

impl LocalEndpoint {
    fn sync_devices(&self) -> Result<()> {
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
}

/// Keeps the journaled chunks whose data in the temporary file still hashes
/// to the recorded value.
fn reverify(
    file: &File,
    shown: &Path,
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
            Err(e) => return Err(Error::io(shown, "read temporary file", e)),
        }
        if hash::chunk_cv(off, &buf) == cv {
            ok.push((index, cv));
        }
    }
    Ok(ok)
}

/// Which whole chunks of a resumable file are in place. A resumable file
/// has its full length from the start, so one published with a chunk
/// missing would hold zeros the source never had.
struct Arrived {
    bits: Vec<std::sync::atomic::AtomicU64>,
    chunks: u64,
    chunk_size: u64,
    size: u64,
}

impl Arrived {
    fn new(spec: &FileSpec, resumed: &[(u64, ChainingValue)]) -> Arrived {
        let chunks = match spec.resumable && spec.chunk_size > 0 {
            true => spec.size.div_ceil(spec.chunk_size),
            false => 0,
        };
        let a = Arrived {
            bits: (0..chunks.div_ceil(64)).map(|_| Default::default()).collect(),
            chunks,
            chunk_size: spec.chunk_size,
            size: spec.size,
        };
        for &(i, _) in resumed {
            a.set(i);
        }
        a
    }

    fn set(&self, index: u64) {
        if let Some(w) = self.bits.get((index / 64) as usize).filter(|_| index < self.chunks) {
            w.fetch_or(1 << (index % 64), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Notes a write of `len` bytes at `offset`: it counts only if it is one
    /// whole chunk.
    fn wrote(&self, offset: u64, len: u64) {
        let whole = self.chunks > 0
            && offset % self.chunk_size == 0
            && offset < self.size
            && len == self.chunk_size.min(self.size - offset);
        if whole {
            self.set(offset / self.chunk_size);
        }
    }

    fn all(&self) {
        (0..self.chunks).for_each(|i| self.set(i));
    }

    /// How many chunks were never written.
    fn missing(&self) -> u64 {
        let have: u64 = self
            .bits
            .iter()
            .map(|w| u64::from(w.load(std::sync::atomic::Ordering::Relaxed).count_ones()))
            .sum();
        self.chunks - have
    }
}

struct LocalWriteFile {
    file: File,
    tmp: PathBuf,
    final_path: PathBuf,
    jpath: PathBuf,
    /// The final path as shown in messages.
    shown: PathBuf,
    /// Keeps the directory the paths above are relative to open (confined).
    _dir: Option<Arc<OwnedFd>>,
    journal: Option<Journal>,
    resumed: Vec<(u64, ChainingValue)>,
    /// Which chunks are in place (kept for resumable files only).
    arrived: Arrived,
    reused: bool,
    size: u64,
    /// Mode, owner and group the temporary file was created with.
    created: (u32, u32, u32),
    /// Opened with O_TMPFILE: `tmp` is only used if the final name is taken.
    unnamed: bool,
    /// Will be fsync'd before it is published.
    durable: bool,
    /// Serialises writes: concurrent writes into one file make Linux
    /// (ext4, tmpfs) spin on the inode lock, which measured several times
    /// slower than one writer at a time, and starves the other cores. It
    /// holds the aligned buffer direct writes go through.
    write_lock: std::sync::Mutex<sys::AlignedBuf>,
    /// The same file opened with O_DIRECT, for large files: whole blocks
    /// go to the device without being copied into the page cache first
    /// (measured: that copy was the largest CPU cost of receiving a large
    /// file), and the cache is not filled with data nobody reads next.
    direct: Option<File>,
    /// Set if the file system refused a direct write: buffered from then on.
    direct_failed: std::sync::atomic::AtomicBool,
    /// The endpoint's policy for what writers may set.
    policy: Option<Arc<MetaPolicy>>,
    /// The file's bytes, taken from the endpoint's quota.
    charge: Option<Charge>,
    /// The basis of a delta transfer and its size: the file at the final
    /// name when it was first needed, or the one `use_basis` opened.
    basis: std::sync::OnceLock<Option<(File, u64)>>,
    /// The endpoint, to resolve another basis's path as any other.
    ep: LocalEndpoint,
    /// The file's path below the endpoint's root.
    rel: PathBuf,
}

impl LocalWriteFile {
    /// The basis chosen with `use_basis`, else the file at the final name,
    /// opened the first time it is asked for.
    fn basis(&self) -> Result<Option<&(File, u64)>> {
        if self.basis.get().is_none() {
            let _ = self.basis.set(open_basis(&self.final_path, &self.shown)?);
        }
        Ok(self.basis.get().and_then(Option::as_ref))
    }
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
        let mut direct_done = false;
        let write = |from: u64, to: u64, direct_done: &mut bool| -> Result<()> {
            if to <= from {
                return Ok(());
            }
            let mut s = (from - offset) as usize;
            let e = (to - offset) as usize;
            let mut guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let whole = (e - s) & !(sys::DIRECT_ALIGN - 1);
            if let Some(d) = self.direct.as_ref().filter(|_| {
                from % sys::DIRECT_ALIGN as u64 == 0
                    && whole > 0
                    && !self.direct_failed.load(std::sync::atomic::Ordering::Relaxed)
            }) {
                match guard.write_direct(d, &data[s..s + whole], from) {
                    Ok(()) => {
                        s += whole;
                        *direct_done = true;
                    }
                    // EINVAL: this file system (or this device's block size)
                    // does not take such writes; the buffered path does.
                    Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::debug!(path = %self.shown.display(), "direct write refused; writing through the page cache");
                        self.direct_failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(err) => return Err(Error::io(&self.shown, "write", err)),
                }
            }
            if e > s {
                let at = offset + s as u64;
                self.file.write_all_at(&data[s..e], at).ctx(&self.shown, "write")?;
            }
            Ok(())
        };
        for &(h, hl) in holes {
            write(pos, h, &mut direct_done)?;
            if self.reused {
                // Stale bytes from an unverified earlier attempt may sit here.
                match sys::punch_hole(&self.file, h, hl) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        let zeros = vec![0u8; hl as usize];
                        self.file.write_all_at(&zeros, h).ctx(&self.shown, "write")?;
                    }
                    r => r.ctx(&self.shown, "punch hole")?,
                }
            }
            pos = h + hl;
        }
        write(pos, end, &mut direct_done)?;
        if pos >= end && end == self.size && self.journal.is_none() {
            // The file ends in a hole: give it its length.
            self.file.set_len(self.size).ctx(&self.shown, "set length")?;
        }
        if self.durable && self.journal.is_some() && !direct_done {
            // The fsync before the rename will need these bytes on disk:
            // start now, so the disk works while later chunks are copied.
            sys::start_writeback(&self.file, offset, data.len() as u64);
        }
        if let (Some(j), Some(cv)) = (&self.journal, cv) {
            j.append(index, cv).ctx(&self.jpath, "write journal")?;
        }
        self.arrived.wrote(offset, data.len() as u64);
        Ok(())
    }

    fn set_meta(&self, meta: &Meta, owner: bool, xattrs: &Xattrs) -> Result<()> {
        let (mode, uid, gid) = self.created;
        let policy = self.policy.as_deref();
        let meta = &allowed_meta(policy, Kind::File, meta);
        // chown clears set-id bits and file capabilities: owner first, then
        // xattrs, then mode.
        let asked = owner.then_some((meta.uid, meta.gid));
        let owner = owner_to_set(policy, || Ok((uid, gid)), asked)
            .ctx(&self.shown, "set owner")?
            .filter(|o| *o != (uid, gid));
        if let Some(o) = owner {
            apply_owner(&self.tmp, Some(&self.file), o).ctx(&self.shown, "set owner")?;
        }
        for (name, value) in allowed_xattrs(policy, xattrs).iter() {
            sys::fset_xattr(&self.file, name, value).ctx(&self.shown, "set xattr")?;
        }
        if owner.is_some() || meta.mode != mode {
            apply_mode(&self.tmp, Some(&self.file), meta, false).ctx(&self.shown, "set permissions")?;
        }
        sys::futimes(&self.file, meta.atime, meta.mtime).ctx(&self.shown, "set times")
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_all().ctx(&self.shown, "fsync")
    }

    fn verify(&self, expected: &Hash) -> Result<()> {
        sys::drop_cache(&self.file);
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = self.file.read_at(&mut buf, total).ctx(&self.shown, "read back")?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
        }
        let found = h.finalize();
        if total != self.size || found != *expected {
            return Err(Error::VerifyFailed {
                path: self.shown.clone(),
                expected: expected.to_hex().to_string(),
                found: found.to_hex().to_string(),
            });
        }
        Ok(())
    }

    fn publish(mut self: Box<Self>) -> Result<()> {
        let missing = self.arrived.missing();
        if missing > 0 {
            // Kept as it is, journal and all, for a later run to complete.
            self.charge.take().map(Charge::keep);
            return Err(Error::Other {
                path: self.shown.clone(),
                message: format!(
                    "{missing} of its {} chunks were never written; not committed",
                    self.arrived.chunks
                ),
            });
        }
        if self.unnamed {
            // With a backup to keep, whatever is there is kept first.
            if self.ep.backup.is_none() {
                match sys::link_unnamed(&self.file, &self.final_path) {
                    Ok(()) => {
                        self.charge.take().map(Charge::keep);
                        return Ok(());
                    }
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::io(&self.shown, "link into place", e)),
                }
            }
            // Replacing a file: name ours beside it, then rename over it.
            let _ = fs::remove_file(&self.tmp);
            sys::link_unnamed(&self.file, &self.tmp).ctx(&self.shown, "link temporary file")?;
        }
        if !self.unnamed {
            // Rename only what we wrote: the name must still be our inode.
            let ours = self.file.metadata().ctx(&self.shown, "stat")?;
            match fs::symlink_metadata(&self.tmp) {
                Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                // Gone with its directory, or a directory on its path
                // replaced by a file.
                Err(e) if e.kind() == ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(Error::Other {
                        path: self.shown.clone(),
                        message: "its temporary file was removed while being written (was the destination directory deleted?); not committed"
                            .into(),
                    });
                }
                _ => return Err(Error::Busy(self.shown.clone())),
            }
        }
        let mut replaced = fs::symlink_metadata(&self.final_path).map_or(0, |m| if m.is_file() { m.len() } else { 0 });
        if self.ep.back_up_replaced(&self.rel, &self.final_path)? {
            replaced = 0;
        }
        // The journal goes first: a run killed between the two leaves a
        // temporary file the next run replaces, never a journal beside a
        // published file that no later run would look at.
        if self.journal.is_some() {
            let _ = fs::remove_file(&self.jpath);
        }
        fs::rename(&self.tmp, &self.final_path).ctx(&self.shown, "rename into place")?;
        if let Some(c) = self.charge.take() {
            c.keep().credit(replaced);
        }
        Ok(())
    }

    fn clone_from(&self, src: &File) -> Result<bool> {
        if self.reused {
            return Ok(false);
        }
        let cloned = sys::reflink(&self.file, src).ctx(&self.shown, "reflink")?;
        if cloned {
            self.arrived.all();
        }
        Ok(cloned)
    }

    fn use_basis(&self, rel: &Path) -> Result<bool> {
        let shown = self.ep.path(rel);
        let at = self.ep.at(rel).map_err(|e| Error::io(&shown, "open a basis", e))?;
        let basis = open_basis(&at, &shown)?;
        Ok(basis.is_some() && self.basis.set(basis).is_ok())
    }

    fn basis_signature(&self) -> Result<Option<crate::delta::Signature>> {
        let Some((f, size)) = self.basis()? else {
            return Ok(None);
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let read = |off: u64, buf: &mut [u8]| f.read_exact_at(buf, off).ctx(&self.shown, "read the old version");
        Ok(Some(crate::delta::signature(&read, *size, threads)?))
    }

    fn write_delta(
        &self,
        index: u64,
        offset: u64,
        len: u64,
        pieces: &[crate::delta::Piece],
        literals: &[u8],
        cv: &ChainingValue,
    ) -> Result<bool> {
        let Some((basis, size)) = self.basis()? else {
            return Ok(false);
        };
        let mut built = Vec::new();
        crate::delta::assemble(pieces, len, basis, *size, literals, &mut built).map_err(|message| Error::Other {
            path: self.shown.clone(),
            message,
        })?;
        let found = match offset == 0 && len == self.size {
            true => *hash::hash_bytes(&built).as_bytes(),
            false => hash::chunk_cv(offset, &built),
        };
        if found != *cv {
            tracing::debug!(path = ?self.shown, index, "the old version changed: chunk sent whole");
            return Ok(false);
        }
        self.write_chunk(index, offset, &built, &[], Some(cv))?;
        Ok(true)
    }

    fn abort(mut self: Box<Self>, keep: bool) {
        if self.unnamed {
            return; // freed when the descriptor closes
        }
        let ours = self.file.metadata().ok();
        let still_ours = fs::symlink_metadata(&self.tmp).is_ok_and(|m| ours.is_some_and(|o| o.ino() == m.ino()));
        if still_ours && (!keep || self.journal.is_none()) {
            let _ = fs::remove_file(&self.tmp);
            let _ = fs::remove_file(&self.jpath);
        } else if still_ours {
            // Kept for a resume: its space stays in use.
            self.charge.take().map(Charge::keep);
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

    #[test]
    fn every_side_file_name_is_recognised() {
        for len in 1..=255 {
            let name = "n".repeat(len);
            let p = Path::new("/d").join(&name);
            let (t, j) = side_paths(&p);
            for side in [t, j, link_temp(&p)] {
                let n = side.file_name().expect("name");
                assert!(n.len() <= 255, "{len}: {n:?} too long");
                assert!(is_side_file(n), "{len}: {n:?} not recognised");
            }
            assert!(!is_side_file(OsStr::new(&name)));
        }
        let hashed = side_paths(&Path::new("/d").join("y".repeat(241))).0;
        let journal = side_paths(&Path::new("/d").join("y".repeat(241))).1;
        let journal = journal.file_name().expect("name").as_bytes();
        assert_eq!(
            temp_of_journal(journal).as_deref(),
            Some(hashed.file_name().expect("name").as_bytes())
        );
        for ordinary in [
            ".tern-xyz.tmp",
            ".tern-0123.journal",
            "a.tern.tmp",
            ".tern-tmp",
            ".x.tern.tmpx",
        ] {
            assert!(!is_side_file(OsStr::new(ordinary)), "{ordinary}");
        }
    }

    #[test]
    fn a_barrier_returns_only_after_a_sync_that_saw_its_writes() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let g = Arc::new(GroupSync::default());
        // "Writes" are numbers added to `written`; a sync makes durable
        // everything written when it starts.
        let written = Arc::new(Mutex::new(Vec::new()));
        let durable = Arc::new(Mutex::new(Vec::new()));
        let syncs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let (g, written, durable, syncs) = (g.clone(), written.clone(), durable.clone(), syncs.clone());
                std::thread::spawn(move || {
                    for k in 0..50 {
                        let mark = i * 1000 + k;
                        written.lock().expect("lock").push(mark);
                        g.run(Path::new("/x"), || {
                            syncs.fetch_add(1, Ordering::Relaxed);
                            let now = written.lock().expect("lock").clone();
                            durable.lock().expect("lock").extend(now);
                            Ok(())
                        })
                        .expect("barrier");
                        assert!(
                            durable.lock().expect("lock").contains(&mark),
                            "{mark} returned before durable"
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(syncs.load(Ordering::Relaxed) <= 400);

        // A failed sync fails every barrier it was meant to cover.
        let g = GroupSync::default();
        let e = g
            .run(Path::new("/x"), || Err(Error::Internal("disk gone".into())))
            .expect_err("failure");
        assert!(e.to_string().contains("disk gone"));
        g.run(Path::new("/x"), || Ok(())).expect("a later sync succeeds");
    }
}
