//! tern's transfer engine.
//!
//! The engine ([`engine::run`]) moves files from [`Source`] endpoints to a
//! [`Dest`] endpoint: it scans the source, plans against the destination,
//! schedules work items (batches of small files, chunks of large ones) on
//! worker threads, hashes every byte with BLAKE3 as it goes, writes to
//! temporary names, makes the data durable and renames it into place. Large
//! files keep a journal of verified chunks so an interrupted copy resumes.
//!
//! This crate holds no network code; remote endpoints implement the same
//! traits elsewhere.

pub mod delta;
pub mod endpoint;
pub mod engine;
pub mod entry;
pub mod error;
pub mod expire;
pub mod filter;
pub mod hash;
pub mod journal;
pub mod local;
pub mod policy;
pub mod quota;
mod sys;

pub use sys::{drop_cache, open_file_budget, AlignedBuf};

pub use endpoint::{Dest, FileSpec, ReadFile, Source, WriteFile, Xattrs};
pub use engine::{hash_file, run, Action, Diff, Mode, Observer, Options, Root, Summary};
pub use entry::{Entry, Kind, Meta, Time};
pub use error::{Error, Result};
pub use local::LocalEndpoint;
pub use policy::MetaPolicy;
