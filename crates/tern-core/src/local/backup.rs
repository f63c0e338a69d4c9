//! What a destination keeps of a file before replacing or deleting it
//! (rsync's `--backup`, `--backup-dir` and `--suffix`).
//!
//! A replaced file or symlink is hard-linked to its backup name first, so
//! its final name never goes missing: the new version is then renamed over
//! it as always. A deleted entry (a directory with its contents) is renamed
//! there. Where the backup directory is on another file system the entry
//! is copied instead.

use std::ffi::OsString;
use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{At, LocalEndpoint};
use crate::error::{Error, IoContext, Result};
use crate::sys;

/// Where a destination keeps what it replaces or deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// The directory backups go to, each at its path below the root. A
    /// relative one is relative to the root (for a confined endpoint it
    /// is resolved beneath the root like every other path). `None`: beside
    /// the file, which then needs a suffix.
    pub dir: Option<PathBuf>,
    /// What a path below the root loses in the backup directory: the
    /// destination's own directory, where the root is above it (a daemon's
    /// module).
    pub base: PathBuf,
    /// Appended to a backup's name (rsync's default is `~`, and nothing
    /// with a backup directory).
    pub suffix: OsString,
}

impl Backup {
    /// Whether `name` is that of a backup kept beside its file.
    pub fn is_backup_name(&self, name: &std::ffi::OsStr) -> bool {
        use std::os::unix::ffi::OsStrExt;
        self.dir.is_none() && !self.suffix.is_empty() && name.as_bytes().ends_with(self.suffix.as_bytes())
    }
}

impl LocalEndpoint {
    /// Keeps the backups of what this endpoint replaces or deletes.
    pub fn with_backup(mut self, backup: Backup) -> Self {
        self.backup = Some(std::sync::Arc::new(backup));
        self
    }

    /// The backup policy, if any.
    pub fn backup(&self) -> Option<&Backup> {
        self.backup.as_deref()
    }

    /// Keeps the file or symlink at `at` (the entry `rel`) as a backup
    /// before it is replaced. Nothing there, or a directory (replaced only
    /// by way of `remove`), keeps nothing. Returns whether a backup holds
    /// the old file now, so its bytes are still in use.
    pub(super) fn back_up_replaced(&self, rel: &Path, at: &Path) -> Result<bool> {
        let Some(b) = self.backup.as_deref() else {
            return Ok(false);
        };
        let shown = self.path(rel);
        let md = match fs::symlink_metadata(at) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(&shown, "stat", e)),
        };
        if md.is_dir() {
            return Ok(false);
        }
        let to = self.backup_at(b, rel).ctx(&shown, "keep a backup")?;
        self.clear_backup(&to).ctx(&shown, "replace its old backup")?;
        match fs::hard_link(at, &*to) {
            Ok(()) => Ok(true),
            Err(e) if crosses(&e) => copy_entry(at, &to, &md).map(|()| false),
            Err(e) => Err(e),
        }
        .ctx(&shown, "back up")
    }

    /// Moves the entry at `at` (`rel`, a directory with its contents) to
    /// its backup instead of deleting it. Returns false when it was copied
    /// there (another file system) and is still to be removed.
    pub(super) fn back_up_removed(&self, rel: &Path, at: &Path, md: &fs::Metadata) -> Result<bool> {
        let Some(b) = self.backup.as_deref() else {
            return Ok(false);
        };
        let shown = self.path(rel);
        let to = self.backup_at(b, rel).ctx(&shown, "keep a backup")?;
        self.clear_backup(&to).ctx(&shown, "replace its old backup")?;
        match fs::rename(at, &*to) {
            Ok(()) => Ok(true),
            Err(e) if crosses(&e) => copy_entry(at, &to, md).map(|()| false),
            Err(e) => Err(e),
        }
        .ctx(&shown, "back up")
    }

    /// Where the backup of `rel` goes, its directories made.
    fn backup_at(&self, b: &Backup, rel: &Path) -> io::Result<At> {
        let mut name = self.name_of(rel);
        name.push(&b.suffix);
        if super::is_side_file(&name) {
            // The next run would take it for one of tern's temporary files
            // and clear it away.
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                format!("its backup name {name:?} is one tern uses for temporary files"),
            ));
        }
        let Some(dir) = &b.dir else {
            let at = self.at(rel)?;
            return Ok(At {
                path: at.path.with_file_name(name),
                dir: at.dir,
            });
        };
        let below = rel.strip_prefix(&b.base).unwrap_or(rel);
        let parent = match below.parent() {
            Some(p) if !below.as_os_str().is_empty() => dir.join(p),
            _ => dir.clone(),
        };
        if self.confine.is_some() {
            let mut made = PathBuf::new();
            for c in parent.components() {
                made.push(c);
                let at = self.at(&made)?;
                match fs::create_dir(&*at) {
                    Ok(()) => self.own_new_dir(&made, &at)?,
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            self.at(&parent.join(name))
        } else {
            let parent = self.path(&parent);
            fs::create_dir_all(&parent)?;
            if let Ok(m) = fs::metadata(&parent) {
                // A backup directory on another file system is synced by the
                // barriers too.
                let _ = self.note_device(m.dev(), &parent);
            }
            Ok(At {
                path: parent.join(name),
                dir: None,
            })
        }
    }

    /// Removes an older backup at `to`, giving its bytes back to the quota.
    fn clear_backup(&self, to: &Path) -> io::Result<()> {
        let md = match fs::symlink_metadata(to) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let freed = if md.is_dir() {
            let n = self.quota.as_ref().map_or(0, |_| super::dir_usage(to));
            fs::remove_dir_all(to)?;
            n
        } else {
            fs::remove_file(to)?;
            if md.is_file() && md.nlink() == 1 {
                md.len()
            } else {
                0
            }
        };
        if let Some(q) = &self.quota {
            q.credit(freed);
        }
        Ok(())
    }
}

/// A link or rename that cannot be made where the backup goes: another
/// file system, or one without hard links.
fn crosses(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EMLINK) | Some(libc::EOPNOTSUPP)
    )
}

/// Copies a file, symlink or directory tree from `from` to `to`, with its
/// permissions and times.
fn copy_entry(from: &Path, to: &Path, md: &fs::Metadata) -> io::Result<()> {
    let ft = md.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if ft.is_dir() {
        fs::create_dir(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            copy_entry(&e.path(), &to.join(e.file_name()), &e.metadata()?)?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(md.mode() & 0o7777))?;
    } else if ft.is_file() {
        fs::copy(from, to)?;
    } else {
        // A device or FIFO is not data; there is nothing to keep of it.
        return Ok(());
    }
    let t = |sec: i64, nsec: i64| crate::entry::Time {
        sec,
        nsec: nsec.clamp(0, 999_999_999) as u32,
    };
    sys::lutimes(to, t(md.atime(), md.atime_nsec()), t(md.mtime(), md.mtime_nsec()))
}
