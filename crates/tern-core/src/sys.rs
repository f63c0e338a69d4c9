//! Thin safe wrappers over the few Linux calls std does not offer.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use crate::entry::Time;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn timespec(t: Time) -> libc::timespec {
    libc::timespec {
        tv_sec: t.sec as libc::time_t,
        tv_nsec: t.nsec as libc::c_long,
    }
}

/// Sets access and modification times of `path` without following a final
/// symlink.
pub fn lutimes(path: &Path, atime: Time, mtime: Time) -> io::Result<()> {
    let c = cstr(path)?;
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: `c` is a valid NUL-terminated string and `ts` two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// Sets access and modification times of an open file.
pub fn futimes(f: &File, atime: Time, mtime: Time) -> io::Result<()> {
    let ts = [timespec(atime), timespec(mtime)];
    // SAFETY: the descriptor is open for the lifetime of `f`.
    check(unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) })
}

/// Takes an exclusive advisory lock without waiting; `Ok(false)` if another
/// process holds it.
pub fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: plain syscall on an open descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Flushes every dirty page and inode of the file system holding `f`.
pub fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::syncfs(f.as_raw_fd()) })
}

/// Asks the kernel to drop cached pages of `f`, so the next read comes from
/// the device. Only clean pages are dropped: call after fsync.
pub fn drop_cache(f: &File) {
    // SAFETY: plain syscall on an open descriptor; failure is harmless.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Tells the kernel `f` will be read sequentially.
pub fn advise_sequential(f: &File) {
    // SAFETY: plain syscall on an open descriptor; failure is harmless.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

/// Starts writeback of `[offset, offset+len)` of `f` without waiting, so a
/// later fsync has less left to do. Failure is harmless.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
    // SAFETY: plain syscall on an open descriptor.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Alignment of buffers, offsets and lengths for O_DIRECT (the largest
/// logical block size in common use).
pub const DIRECT_ALIGN: usize = 4096;

/// Opens the file `f` is open on again, for writing with O_DIRECT; `None`
/// where the file system does not support it.
pub fn reopen_direct(f: &File) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(fd_path(f))
        .ok()
}

/// A heap buffer aligned to [`DIRECT_ALIGN`], grown as needed and reused.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
}

// SAFETY: the buffer is plain bytes owned by this value.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&self` (never done here).
unsafe impl Sync for AlignedBuf {}

impl Default for AlignedBuf {
    fn default() -> Self {
        AlignedBuf {
            ptr: std::ptr::NonNull::dangling(),
            cap: 0,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated in `reserve` with exactly this layout.
            unsafe {
                std::alloc::dealloc(
                    self.ptr.as_ptr(),
                    std::alloc::Layout::from_size_align_unchecked(self.cap, DIRECT_ALIGN),
                )
            };
        }
    }
}

impl AlignedBuf {
    /// Bytes allocated.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The first `len` bytes, growing the buffer as needed. New bytes are
    /// zero; bytes from earlier use are left as they were.
    pub fn slice(&mut self, len: usize) -> io::Result<&mut [u8]> {
        if len > self.cap {
            let cap = len.next_multiple_of(DIRECT_ALIGN);
            let layout = std::alloc::Layout::from_size_align(cap, DIRECT_ALIGN)
                .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
            // SAFETY: the layout has a non-zero size.
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            let p = std::ptr::NonNull::new(p).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
            *self = AlignedBuf { ptr: p, cap };
        }
        // SAFETY: `cap >= len` initialised bytes (zeroed at allocation,
        // written since) owned by `self`, borrowed mutably once.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) })
    }

    /// Writes `data` (a whole number of blocks) at `offset` (block
    /// aligned) through the O_DIRECT descriptor `f`, by way of this buffer.
    /// Data that is already aligned is written as it is.
    pub fn write_direct(&mut self, f: &File, data: &[u8], offset: u64) -> io::Result<()> {
        if (data.as_ptr() as usize) % DIRECT_ALIGN == 0 {
            return std::os::unix::fs::FileExt::write_all_at(f, data, offset);
        }
        let buf = self.slice(data.len())?;
        buf.copy_from_slice(data);
        std::os::unix::fs::FileExt::write_all_at(f, buf, offset)
    }
}

/// Deallocates `[offset, offset+len)` of `f`, keeping its size.
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
}

/// The data ranges of `f` within `[offset, offset+len)`, found with
/// `SEEK_DATA`/`SEEK_HOLE`. File systems without hole reporting give one
/// range covering everything.
pub fn data_ranges(f: &File, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let end = offset + len;
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        // SAFETY: plain syscall on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after `pos`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = (hole as u64).min(end);
        out.push((data, stop - data));
        pos = stop;
    }
    Ok(out)
}

/// Names of the extended attributes of `path` (not following symlinks).
pub fn list_xattrs(path: &Path) -> io::Result<Vec<OsString>> {
    let c = cstr(path)?;
    loop {
        // SAFETY: a null buffer with size 0 asks for the needed size.
        let n = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOTSUP) {
                Ok(Vec::new())
            } else {
                Err(e)
            };
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: `buf` has `buf.len()` writable bytes.
        let m = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if m < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue; // grew in between
            }
            return Err(e);
        }
        buf.truncate(m as usize);
        return Ok(buf
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| OsString::from_vec(s.to_vec()))
            .collect());
    }
}

/// Value of one extended attribute of `path` (not following symlinks).
pub fn get_xattr(path: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
    let c = cstr(path)?;
    let n = cstr(Path::new(name))?;
    loop {
        // SAFETY: a null buffer with size 0 asks for the needed size.
        let len = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; len as usize];
        // SAFETY: `buf` has `buf.len()` writable bytes.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if m < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(m as usize);
        return Ok(buf);
    }
}

/// Sets one extended attribute of `path` (not following symlinks).
pub fn set_xattr(path: &Path, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let c = cstr(path)?;
    let n = cstr(Path::new(name))?;
    // SAFETY: valid C strings and a buffer of `value.len()` bytes.
    check(unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// Makes `dst` share all of `src`'s blocks (FICLONE). `Ok(false)` when the
/// file system or the pair of files cannot do that.
pub fn reflink(dst: &File, src: &File) -> io::Result<bool> {
    // SAFETY: both descriptors are open; FICLONE takes the source fd as arg.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::EPERM | libc::EBADF) => Ok(false),
        _ => Err(e),
    }
}

/// Opens an unnamed regular file in directory `dir` (`O_TMPFILE`). `None`
/// when the file system cannot.
pub fn open_unnamed(dir: &Path, mode: u32) -> io::Result<Option<File>> {
    let c = cstr(dir)?;
    // SAFETY: valid C string; the returned descriptor is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(Some(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
}

/// Gives the unnamed file `f` the name `path`; fails with `EEXIST` if the
/// name is taken.
pub fn link_unnamed(f: &File, path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: valid descriptor and C strings.
    let r = unsafe {
        libc::linkat(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOENT) {
        return Err(e);
    }
    // Without CAP_DAC_READ_SEARCH, AT_EMPTY_PATH fails with ENOENT; the
    // /proc link to the descriptor works for anyone.
    let proc_path = cstr(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())))?;
    // SAFETY: valid C strings.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
}

/// Sets one extended attribute of an open file.
pub fn fset_xattr(f: &File, name: &OsStr, value: &[u8]) -> io::Result<()> {
    let n = cstr(Path::new(name))?;
    // SAFETY: valid descriptor, C string and buffer.
    check(unsafe { libc::fsetxattr(f.as_raw_fd(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// Raises the soft limit on open files to the hard limit (once), and returns
/// how many descriptors the engine may keep open for pending files.
pub fn open_file_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit to fill.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return 256;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            // SAFETY: as above; failure leaves the old limit.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        // Keep room for sources, directories, journals and the rest.
        (lim.rlim_cur as usize).saturating_sub(128) / 2
    })
}

/// True when the process runs with root's effective uid.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Opens `rel` relative to the directory `dir` with `openat2` and
/// `RESOLVE_BENEATH`: the kernel refuses any resolution (`..`, an absolute
/// path, a symlink, also one swapped in concurrently) that would leave `dir`,
/// with `EXDEV`. Magic links (`/proc/.../fd`) are refused too.
pub fn open_beneath(dir: &impl AsRawFd, rel: &Path, flags: libc::c_int) -> io::Result<std::os::fd::OwnedFd> {
    let c = cstr(if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    })?;
    // SAFETY: a plain C struct, valid all zeros.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid descriptor, C string and `open_how` of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as libc::c_int) })
}

/// The path through which the open descriptor `fd` can be named again.
pub fn fd_path(fd: &impl AsRawFd) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Sets the permission bits of `path` without following a final symlink (a
/// symlink is left alone: Linux symlinks have no permissions of their own).
pub fn chmod_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if f.metadata()?.file_type().is_symlink() {
        return Ok(());
    }
    // The /proc link names exactly the inode opened above.
    std::fs::set_permissions(fd_path(&f), std::fs::Permissions::from_mode(mode))
}
