//! Expiry of side files nobody came back for.
//!
//! An interrupted transfer leaves its temporary file and journal for a
//! rerun to resume; when no rerun comes they would stay forever. The walk
//! here removes those last modified before a cutoff.
//!
//! It runs over trees others can change while it walks (a daemon's
//! modules), so each directory is opened beneath the one before it, with
//! O_NOFOLLOW, and everything is named relative to that descriptor: a
//! directory swapped for a symlink mid-walk is not followed out of the tree.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use crate::local::{is_side_file, temp_of_journal};
use crate::sys;

/// What an expiry walk removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// Side files removed.
    pub files: u64,
    /// Their sizes, added up.
    pub bytes: u64,
    /// The sizes of the regular files left, side files included: what a
    /// quota counts.
    pub remaining: u64,
}

/// Removes the side files beneath the open directory `root` last modified
/// before `cutoff` (none for `UNIX_EPOCH`), and adds up what is left. A temporary file another writer holds locked, and the
/// journal beside it, are kept. Directories that cannot be opened are
/// skipped.
pub(crate) fn expire(root: OwnedFd, cutoff: SystemTime) -> Expired {
    let mut done = Expired::default();
    // Directories still to list, each with the open parent it is named in;
    // depth-first, so only the directories on the current path stay open.
    let mut todo: Vec<(Arc<OwnedFd>, std::ffi::OsString)> = Vec::new();
    let mut dir = Some(Arc::new(root));
    loop {
        if let Some(d) = dir.take() {
            list(&d, cutoff, &mut todo, &mut done);
        }
        let Some((parent, name)) = todo.pop() else {
            return done;
        };
        match sys::open_beneath(
            &*parent,
            Path::new(&name),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        ) {
            Ok(fd) => dir = Some(Arc::new(fd)),
            Err(e) => tracing::debug!(name = ?name, error = %e, "not walked for expired side files"),
        }
    }
}

fn list(
    dir: &Arc<OwnedFd>,
    cutoff: SystemTime,
    todo: &mut Vec<(Arc<OwnedFd>, std::ffi::OsString)>,
    done: &mut Expired,
) {
    let here = sys::fd_path(&**dir);
    let Ok(entries) = fs::read_dir(&here) else {
        return;
    };
    for de in entries.flatten() {
        let name = de.file_name();
        // The type comes from the directory entry (or an lstat): never
        // through a symlink.
        let Ok(ft) = de.file_type() else { continue };
        if ft.is_dir() {
            todo.push((dir.clone(), name));
            continue;
        }
        // DirEntry::metadata stats relative to the open directory.
        let Ok(md) = de.metadata() else { continue };
        let size = if ft.is_file() { md.len() } else { 0 };
        if !is_side_file(&name) || md.modified().map_or(true, |m| m >= cutoff) {
            done.remaining += size;
            continue;
        }
        // A temporary file is locked by whoever writes it; holding the lock
        // while unlinking keeps a writer from starting on it meanwhile.
        let temp = match temp_of_journal(name.as_bytes()) {
            Some(t) => here.join(std::ffi::OsStr::from_bytes(&t)),
            None => here.join(&name),
        };
        let lock = match lock_if_file(&temp) {
            Ok(Some(f)) => Some(f),
            Ok(None) => {
                done.remaining += size;
                continue;
            }
            Err(_) => None,
        };
        if fs::remove_file(here.join(&name)).is_ok() {
            done.files += 1;
            done.bytes += md.len();
        } else {
            done.remaining += size;
        }
        drop(lock);
    }
}

/// Locks the regular file at `path` if no one else holds it: `Ok(None)`
/// when someone does. Never follows a symlink, and opens nothing but a
/// regular file (opening a device can have effects of its own).
fn lock_if_file(path: &Path) -> io::Result<Option<File>> {
    if !fs::symlink_metadata(path)?.is_file() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    Ok(sys::try_lock(&f)?.then_some(f))
}
