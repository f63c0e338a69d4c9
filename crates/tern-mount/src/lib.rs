//! `tern mount`: a tern daemon's module (or a directory in it) as a local
//! folder, through FUSE.
//!
//! Reads go to the daemon as ranged requests, several in flight (the
//! kernel's read-ahead, served by a pool of session threads); every range
//! arrives with the BLAKE3 chaining value the daemon computed over the bytes
//! it read, and is checked against it before it reaches the application: a
//! mismatch is `EIO`, never wrong data. Listings are one request per
//! directory, answered with every entry's attributes (readdirplus). A lost
//! connection is re-established on the next operation, and open files carry
//! on when they are unchanged. See docs/mount.md for the semantics.

mod cache;
mod conn;
mod fs;
mod inodes;
mod reader;
mod staged;
mod writeback;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use conn::Connect;

/// How a mount behaves.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// How long the kernel may trust attributes and names before asking
    /// again.
    pub attr_timeout: Duration,
    /// Threads serving the kernel's requests: as many requests are in
    /// flight to the daemon at once.
    pub threads: usize,
    /// Shown as the mount's source in `mount` and `/proc/mounts`.
    pub source: String,
    /// Where files being written are staged until they are uploaded;
    /// None mounts read-only.
    pub staging: Option<PathBuf>,
    /// Upload closed files in the background, many small ones a request;
    /// `close` then no longer returns an upload's error (`fsync` does).
    pub write_back: bool,
    /// Let other local users use the mount (FUSE's `allow_other`), the
    /// kernel checking the permission bits the daemon reports
    /// (`default_permissions`).
    pub allow_other: bool,
    /// Keep blocks read in this directory, at most this many bytes, for
    /// later opens and mounts (each checked again when it is used).
    pub cache: Option<(PathBuf, u64)>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            attr_timeout: Duration::from_secs(1),
            threads: 8,
            source: "tern".into(),
            staging: None,
            write_back: false,
            allow_other: false,
            cache: None,
        }
    }
}

/// What can stop a mount.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mount point is not usable.
    #[error("{path}: {why}")]
    MountPoint {
        /// The mount point.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The kernel refused the mount, or the session failed.
    #[error("{path}: {source}")]
    Fuse {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The `--cache-dir` directory cannot be used.
    #[error("the cache directory {path}: {source}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Connecting to the daemon failed.
    #[error(transparent)]
    Net(#[from] tern_core::Error),
}

/// Mounts the daemon's tree that `connect` reaches at `dir` and serves it
/// until it is unmounted (`tern unmount`, `fusermount3 -u`, or `stop`
/// called from another thread, as a signal handler does). Writable when
/// `opts.staging` is set.
/// `mounted` is called once the file system is in place.
pub fn mount(
    connect: Connect,
    dir: &Path,
    opts: &MountOptions,
    stop: &Stopper,
    mounted: impl FnOnce(),
) -> Result<(), Error> {
    let md = std::fs::metadata(dir).map_err(|e| Error::MountPoint {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    if !md.is_dir() {
        return Err(Error::MountPoint {
            path: dir.to_path_buf(),
            why: "not a directory".into(),
        });
    }
    let conn = conn::Conn::new(connect)?;
    let pool = reader::Pool::new(opts.threads).map_err(|source| Error::Fuse {
        path: dir.to_path_buf(),
        source,
    })?;
    let write_back = match opts.write_back {
        true => Some(writeback::WriteBack::start(conn.clone()).map_err(|source| Error::Fuse {
            path: dir.to_path_buf(),
            source,
        })?),
        false => None,
    };
    let cache = match &opts.cache {
        Some((d, limit)) => Some(std::sync::Arc::new(cache::DiskCache::open(d, *limit).map_err(
            |source| Error::Cache {
                path: d.clone(),
                source,
            },
        )?)),
        None => None,
    };
    let fs = fs::TernFs::new(conn, opts, pool, write_back, cache);
    let (done, kept) = fs.recover();
    if done + kept > 0 {
        eprintln!("tern: {done} files an earlier mount left staged were uploaded; {kept} still wait");
    }
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(opts.source.clone()),
        fuser::MountOption::Subtype("tern".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if opts.staging.is_none() {
        cfg.mount_options.push(fuser::MountOption::RO);
    }
    if opts.allow_other {
        cfg.acl = fuser::SessionACL::All;
        cfg.mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    cfg.n_threads = Some(opts.threads.max(1));
    cfg.clone_fd = true;
    let fuse = |source| Error::Fuse {
        path: dir.to_path_buf(),
        source,
    };
    let mut session = fuser::Session::new(fs, dir, &cfg).map_err(fuse)?;
    if let Ok(mut s) = stop.0.lock() {
        *s = Some(session.unmount_callable());
    }
    tracing::info!(dir = %dir.display(), "mounted");
    mounted();
    let r = session.run().map_err(fuse);
    if let Ok(mut s) = stop.0.lock() {
        s.take();
    }
    r
}

/// Unmounts a running [`mount`] from another thread.
#[derive(Default)]
pub struct Stopper(std::sync::Mutex<Option<fuser::SessionUnmounter>>);

impl Stopper {
    /// Unmounts, if mounted; the serving [`mount`] then returns.
    pub fn stop(&self) -> io::Result<()> {
        match self.0.lock() {
            Ok(mut s) => match s.as_mut() {
                Some(u) => u.unmount(),
                None => Ok(()),
            },
            Err(_) => Ok(()),
        }
    }
}

/// Unmounts the FUSE file system at `dir`: directly where this process may
/// (root), else through `fusermount3 -u` (or `fusermount -u`).
pub fn unmount(dir: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let direct = io::Error::last_os_error();
    if direct.raw_os_error() != Some(libc::EPERM) {
        return Err(direct);
    }
    for helper in ["fusermount3", "fusermount"] {
        match std::process::Command::new(helper).arg("-u").arg(dir).status() {
            Ok(s) if s.success() => return Ok(()),
            Ok(s) => return Err(io::Error::other(format!("{helper} -u exited with {s}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        }
    }
    Err(direct)
}

/// Whether a FUSE file system of tern's is mounted at `dir` now.
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(dir).or_else(|_| std::path::absolute(dir)) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let fstype = fields.iter().position(|f| *f == "-").and_then(|i| fields.get(i + 1));
        fields.get(4).is_some_and(|m| Path::new(&unescape(m)) == dir) && fstype.is_some_and(|t| t.starts_with("fuse"))
    })
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
