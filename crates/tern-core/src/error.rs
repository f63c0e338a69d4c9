//! Errors of the engine and its endpoints. Each names the path it concerns.

use std::io;
use std::path::{Path, PathBuf};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Something that went wrong with one entry or with the whole run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
    #[error("{path}: {op}: {}", describe_io(.source))]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// What was being done ("open", "write", ...).
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The source file disappeared between listing and reading.
    #[error("{0}: source file vanished before it could be copied")]
    Vanished(PathBuf),
    /// The source file changed while it was being copied.
    #[error("{0}: source file changed while being copied; not committed (rerun to copy the new version)")]
    Changed(PathBuf),
    /// A destination entry is in the way of a different kind of entry.
    #[error("{path}: destination is a {found}, source is a {wanted}{hint}")]
    TypeConflict {
        /// The destination path.
        path: PathBuf,
        /// Kind at the destination.
        found: &'static str,
        /// Kind at the source.
        wanted: &'static str,
        /// What the user can do about it, with its leading separator, or
        /// nothing.
        hint: &'static str,
    },
    /// Data read back did not hash to what was written.
    #[error("{path}: verification failed: destination hashes to {found}, source to {expected}")]
    VerifyFailed {
        /// The file concerned.
        path: PathBuf,
        /// The source hash.
        expected: String,
        /// The destination hash.
        found: String,
    },
    /// A hard link was not made because the name it links to was not copied.
    #[error("{link}: not hard-linked, because {first} was not copied")]
    NotLinked {
        /// The name that should have been a link.
        link: PathBuf,
        /// The first name, whose copy failed.
        first: PathBuf,
    },
    /// Another process holds the temporary file of this destination.
    #[error("{0}: another tern process is writing this file")]
    Busy(PathBuf),
    /// A failure described by a message (from a remote endpoint, or shared
    /// by several files).
    #[error("{path}: {message}")]
    Other {
        /// The path concerned.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Bad arguments or an unusable root.
    #[error("{0}")]
    Usage(String),
    /// A bug in tern: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(String),
    /// The run was interrupted; partial files stay for a resume.
    #[error("interrupted")]
    Interrupted,
    /// Not done because the request that carried it and others failed as a
    /// whole (a connection dropped), which another entry's error reports
    /// once for all of them.
    #[error("{} not done: its batch failed", .0.display())]
    WithBatch(PathBuf),
}

fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => "no space left on device".into(),
        Some(libc::EDQUOT) => "disk quota exceeded".into(),
        _ => e.to_string(),
    }
}

impl Error {
    /// Wraps an I/O error with the path and operation.
    pub fn io(path: &Path, op: &'static str, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// The path the error is about, if it names one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::TypeConflict { path, .. }
            | Error::VerifyFailed { path, .. }
            | Error::Other { path, .. } => Some(path),
            Error::Vanished(p) | Error::Changed(p) | Error::Busy(p) | Error::WithBatch(p) => Some(p),
            Error::NotLinked { link, .. } => Some(link),
            Error::Usage(_) | Error::Internal(_) | Error::Interrupted => None,
        }
    }

    /// The message without the leading path, for a peer that names the
    /// path its own way.
    pub fn detail(&self) -> String {
        let full = self.to_string();
        match self.path() {
            Some(p) => {
                let prefix = format!("{}: ", p.display());
                full.strip_prefix(&prefix).map(str::to_string).unwrap_or(full)
            }
            None => full,
        }
    }

    /// True when this is an interruption, not a failure.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, Error::Interrupted)
    }

    /// True when another entry's error already reports this one's cause
    /// ([`Error::WithBatch`]): neither counted nor shown again.
    pub fn is_reported(&self) -> bool {
        matches!(self, Error::WithBatch(_))
    }
}

/// Adds path context to `io::Result`s.
pub trait IoContext<T> {
    /// Names the path and operation of a failed I/O call.
    fn ctx(self, path: &Path, op: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: &Path, op: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, op, e))
    }
}
