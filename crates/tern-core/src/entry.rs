//! What the engine knows about one file system entry.

use std::ffi::OsString;
use std::path::PathBuf;

/// The kind of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed).
    Symlink,
    /// A device, FIFO or socket: not transferred.
    Special,
}

/// A point in time, as seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Time {
    /// Whole seconds (may be negative).
    pub sec: i64,
    /// Nanoseconds, below 1e9.
    pub nsec: u32,
}

impl Time {
    /// The system's time as an entry records it (before the epoch too).
    pub fn from_system(t: std::time::SystemTime) -> Time {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Time {
                sec: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let (sec, nsec) = match d.subsec_nanos() {
                    0 => (-(d.as_secs() as i64), 0),
                    n => (-(d.as_secs() as i64) - 1, 1_000_000_000 - n),
                };
                Time { sec, nsec }
            }
        }
    }

    /// Now.
    pub fn now() -> Time {
        Time::from_system(std::time::SystemTime::now())
    }

    /// As the system's time.
    pub fn to_system(self) -> std::time::SystemTime {
        let d = std::time::Duration::new(self.sec.unsigned_abs(), self.nsec);
        if self.sec >= 0 {
            std::time::UNIX_EPOCH + d
        } else {
            std::time::UNIX_EPOCH.checked_sub(d).unwrap_or(std::time::UNIX_EPOCH)
        }
    }
}

/// Metadata carried over with an entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last modification.
    pub mtime: Time,
    /// Last access.
    pub atime: Time,
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name within its directory (any bytes but `/` and NUL).
    pub name: OsString,
    /// What it is.
    pub kind: Kind,
    /// Length in bytes (files), 0 otherwise.
    pub size: u64,
    /// Permissions, owner, times.
    pub meta: Meta,
    /// The link target, for symlinks.
    pub target: Option<PathBuf>,
    /// Identity of the underlying file (device, inode) when the endpoint
    /// knows it: used to preserve hard links.
    pub file_id: Option<(u64, u64)>,
    /// Number of hard links.
    pub nlink: u64,
    /// Bytes allocated on disk; less than `size` for sparse files.
    pub allocated: u64,
    /// Last status change (ctime) where the endpoint knows it: with size and
    /// mtime, it tells whether a file changed since it was listed.
    pub changed: Time,
}

impl Entry {
    /// A directory called `name` with mode 0755 and nothing else known: what
    /// an endpoint shows where directories have no record of their own.
    pub fn bare_dir(name: OsString) -> Entry {
        Entry {
            name,
            kind: Kind::Dir,
            size: 0,
            meta: Meta {
                mode: 0o755,
                ..Default::default()
            },
            target: None,
            file_id: None,
            nlink: 2,
            allocated: 0,
            changed: Time::default(),
        }
    }

    /// True when size and modification time match: rsync's quick check.
    pub fn same_size_and_mtime(&self, other: &Entry) -> bool {
        self.size == other.size && self.meta.mtime == other.meta.mtime
    }
}
