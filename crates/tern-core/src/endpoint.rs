//! The interface between the engine and where files live.
//!
//! The engine (scan, plan, schedule, commit) only talks to these traits, so
//! the same code drives a local directory, a remote daemon or an object
//! store. All calls are blocking and made from the engine's worker threads;
//! an endpoint that speaks to the network runs its own I/O underneath.
//!
//! Paths given to an endpoint are relative to its root; the empty path is
//! the root itself.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use blake3::hazmat::ChainingValue;

use crate::delta::{Piece, Signature};
use crate::entry::{Entry, Kind, Meta};
use crate::error::{Error, Result};
use crate::hash::Hash;

/// Extended attributes of an entry: (name, value) pairs.
pub type Xattrs = Vec<(OsString, Vec<u8>)>;

/// The read side of an endpoint.
pub trait Source: Send + Sync {
    /// A short description for messages (a path, an URL).
    fn describe(&self, rel: &Path) -> String;
    /// The entry at `rel`, without following a final symlink; `None` if
    /// nothing is there.
    fn stat(&self, rel: &Path) -> Result<Option<Entry>>;
    /// The entries of the directory `rel`, sorted by name.
    fn read_dir(&self, rel: &Path) -> Result<Vec<Entry>>;
    /// Opens the regular file `rel` for reading. `expect` is the entry as it
    /// was listed; the file must still match it.
    fn open(&self, rel: &Path, expect: &Entry) -> Result<Box<dyn ReadFile>>;
    /// Extended attributes of `rel` (not following symlinks).
    fn xattrs(&self, rel: &Path) -> Result<Xattrs>;
    /// The BLAKE3 of the file `rel`, computed where the file lives, when
    /// that is cheaper than reading it here (a remote endpoint). `None`:
    /// the caller reads and hashes the file itself.
    fn file_hash(&self, _rel: &Path, _expect: &Entry) -> Option<Result<Hash>> {
        None
    }
    /// The BLAKE3 the source holds for this version of `rel` already (an
    /// object store's metadata), at no cost: what it sends is checked
    /// against it before the copy is published. `None` elsewhere.
    fn known_hash(&self, _rel: &Path, _expect: &Entry) -> Option<Hash> {
        None
    }
    /// Several files' BLAKE3 at once, computed where they live, one result
    /// per item in order; `None` where that is not cheaper than reading
    /// them here. A remote endpoint asks for all of them in one request.
    fn file_hashes(&self, _items: &[(&Path, &Entry)]) -> Option<Vec<Result<Hash>>> {
        None
    }
    /// Reads several small files (at most one chunk each) whole, with
    /// their extended attributes if `xattrs`; one result per item, in
    /// order. Each file must still match its entry, before and after it is
    /// read. Where `bases` gives item `i` the signature of the file it
    /// replaces, it comes as a delta against that when one pays
    /// ([`SmallFile::delta`]). A remote endpoint asks for all of them in
    /// one request, plans where the files are, and receives them as one
    /// stream.
    fn read_files(
        &self,
        items: &[(&Path, &Entry)],
        bases: &[Option<&Signature>],
        xattrs: bool,
    ) -> Vec<Result<SmallFile>> {
        items
            .iter()
            .enumerate()
            .map(|(i, (rel, e))| {
                read_file_whole(self, rel, e, xattrs).map(|f| f.against(bases.get(i).copied().flatten()))
            })
            .collect()
    }
    /// Tells the endpoint that the tree under `rel` is about to be listed
    /// with [`Source::read_dir`] depth-first, each directory's children in
    /// name order, leaving out the directories `filter` excludes (an entry
    /// `x` under `rel` is matched as `as_path/x`). A remote endpoint starts
    /// streaming the whole listing at once, so those calls wait on no
    /// round trip; other endpoints ignore it. Listings come out as they
    /// would without it.
    fn walk_ahead(&self, _rel: &Path, _filter: &crate::filter::Filter, _as_path: &Path) {}
}

/// A small file read whole, for a batch.
#[derive(Debug, Clone)]
pub struct SmallFile {
    /// Its bytes, holes zero-filled; for a delta, only the bytes of its
    /// literal pieces, in order.
    pub data: Vec<u8>,
    /// Zero ranges that need not be written (none in a delta).
    pub holes: Vec<(u64, u64)>,
    /// Its extended attributes, if asked for.
    pub xattrs: Xattrs,
    /// Set when the file comes as a delta against the old version it
    /// replaces.
    pub delta: Option<SmallDelta>,
}

/// How a small file is built from the old version it replaces.
#[derive(Debug, Clone)]
pub struct SmallDelta {
    /// Its recipe, the whole file as one grid chunk.
    pub pieces: Vec<Piece>,
    /// The BLAKE3 of the file built, as its source read it.
    pub hash: Hash,
}

impl SmallFile {
    /// The file as a delta against the basis `sig` when one pays, else as
    /// it is.
    pub fn against(self, sig: Option<&Signature>) -> SmallFile {
        let Some(pieces) = sig.and_then(|s| crate::delta::plan_bytes(&self.data, s)) else {
            return self;
        };
        let hash = crate::hash::hash_bytes(&self.data);
        SmallFile {
            data: crate::delta::literals(&pieces, 0, &self.data),
            holes: Vec::new(),
            xattrs: self.xattrs,
            delta: Some(SmallDelta { pieces, hash }),
        }
    }
}

/// Reads the small file `rel` of `src` whole through the single-file calls:
/// what [`Source::read_files`] does for each item by default.
pub fn read_file_whole(src: &(impl Source + ?Sized), rel: &Path, e: &Entry, xattrs: bool) -> Result<SmallFile> {
    let rf = src.open(rel, e)?;
    let mut data = Vec::new();
    let holes = crate::engine::read_whole(&*rf, e.size, &mut data)?;
    rf.check_unchanged()?;
    let xattrs = if xattrs { src.xattrs(rel)? } else { Vec::new() };
    Ok(SmallFile {
        data,
        holes,
        xattrs,
        delta: None,
    })
}

/// An open source file.
pub trait ReadFile: Send + Sync {
    /// The file, for messages.
    fn describe(&self) -> PathBuf;
    /// Fills `buf` from `offset`; reading past the end is a `Changed` error
    /// (the file shrank).
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// The BLAKE3 chaining value the sender computed for the bytes last read
    /// at `offset` (a remote source sends one with every chunk), so the
    /// reader can check what arrived against what was read. `None` where
    /// the bytes did not cross a network.
    fn sent_cv(&self, _offset: u64) -> Option<ChainingValue> {
        None
    }
    /// The ranges `(start, len)` within `[offset, offset+len)` that hold data;
    /// the rest are holes that read as zeros.
    fn data_ranges(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
        Ok(vec![(offset, len)])
    }
    /// Errors with `Changed` if the file was modified since it was opened.
    fn check_unchanged(&self) -> Result<()>;
    /// The open local file, when the source is on this machine: lets a
    /// local destination use the kernel's copy paths.
    fn local_file(&self) -> Option<&std::fs::File> {
        None
    }
    /// The reader as itself, for a destination that can copy from a source
    /// of its own kind without the bytes crossing (an object store copying
    /// between its keys): see [`WriteFile::copy_within`].
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// For a file not on this machine: a plan for sending it as a delta
    /// against the basis `sig`, made where the file is (which reads it
    /// whole), with chunks of `chunk_size`. `None` where that is not
    /// possible; a local file is planned by the engine itself.
    fn delta_plan(&self, _sig: &crate::delta::Signature, _chunk_size: u64) -> Result<Option<crate::delta::Plan>> {
        Ok(None)
    }
    /// For a file planned by [`ReadFile::delta_plan`]: chunk `index`
    /// (`len` bytes at `offset`) as its chaining value and the bytes of its
    /// literal pieces, which the caller checks once it has built the chunk.
    fn read_delta(&self, _index: u64, _offset: u64, _len: u64) -> Result<(ChainingValue, Vec<u8>)> {
        Err(Error::Internal("no delta plan for this file".into()))
    }
}

/// What the engine tells a destination about a file it is about to write.
#[derive(Debug, Clone)]
pub struct FileSpec {
    /// Final length.
    pub size: u64,
    /// Chunk size used for hashing and journaling.
    pub chunk_size: u64,
    /// Keep a journal of verified chunks so an interrupted copy resumes.
    pub resumable: bool,
    /// The file will be made durable before it is published, so writing it
    /// out early is free.
    pub durable: bool,
    /// Identity of the source version (size, mtime): a journal written for
    /// another version is discarded.
    pub source_meta: Meta,
    /// The source's last status change (ctime), zero where unknown: part of
    /// the version's identity too, so a file rewritten with its mtime put
    /// back is not resumed into.
    pub source_changed: crate::entry::Time,
}

/// A file being written at a temporary name.
pub trait WriteFile: Send + Sync {
    /// Chunks already in place from an interrupted earlier run, re-verified
    /// against their recorded hashes: `(index, chaining value)`.
    fn resumed(&self) -> Vec<(u64, ChainingValue)>;
    /// Writes one chunk at `offset`. `holes` are sub-ranges that are all
    /// zeros and need not be written. `cv` is the chunk's chaining value
    /// when the file has more than one chunk; it is journaled.
    fn write_chunk(
        &self,
        index: u64,
        offset: u64,
        data: &[u8],
        holes: &[(u64, u64)],
        cv: Option<&ChainingValue>,
    ) -> Result<()>;
    /// Applies the final metadata (and extended attributes, if any).
    fn set_meta(&self, meta: &Meta, owner: bool, xattrs: &Xattrs) -> Result<()>;
    /// Makes the written data durable.
    fn sync(&self) -> Result<()>;
    /// Reads the written data back (from the device where possible) and
    /// checks it hashes to `expected`.
    fn verify(&self, expected: &Hash) -> Result<()>;
    /// The BLAKE3 the source's bytes hash to, when the engine knows it
    /// before publishing: for a destination that records it (an object
    /// store's metadata). The default ignores it.
    fn expect_hash(&self, _hash: &Hash) {}
    /// Moves the file to its final name atomically.
    fn publish(self: Box<Self>) -> Result<()>;
    /// Gives up. With `keep`, the temporary data and journal stay for a
    /// later resume; otherwise they are removed.
    fn abort(self: Box<Self>, keep: bool);
    /// Makes the file share `src`'s data blocks (a reflink), when both are
    /// on one file system that can. Returns false when that is not
    /// possible here; the caller then copies the bytes.
    fn clone_from(&self, _src: &std::fs::File) -> Result<bool> {
        Ok(false)
    }
    /// Makes the file a copy of what `src` reads, done where both live (an
    /// object store copying one key to another), when `src` is of a kind
    /// it knows. Returns false when that is not possible; the caller then
    /// copies the bytes. After true, the file is complete: no chunk is
    /// written.
    fn copy_within(&self, _src: &dyn ReadFile) -> Result<bool> {
        Ok(false)
    }
    /// The signature of the file this one will replace (the basis of a
    /// delta transfer, see [`crate::delta`]), made where that file is;
    /// `None` when there is no basis, or no way to use one here.
    fn basis_signature(&self) -> Result<Option<crate::delta::Signature>> {
        Ok(None)
    }
    /// Makes the destination's file at `rel` (relative to its root), not the
    /// one this file replaces, the basis for [`WriteFile::basis_signature`]
    /// and the chunks built from it: a copy of a file written earlier in the
    /// run. Call before `basis_signature`; `false` where that is not
    /// possible.
    fn use_basis(&self, _rel: &Path) -> Result<bool> {
        Ok(false)
    }
    /// Writes chunk `index` (`len` bytes at `offset`) built from the basis
    /// by `pieces`, taking the literal pieces' bytes from `literals` in
    /// order, once it hashes to `cv` (for a file of one chunk, `cv` is the
    /// file's BLAKE3 hash). Without a basis chosen before, the file at the
    /// final name is the basis. `Ok(false)` when the chunk does not hash to
    /// `cv` (the basis changed, or is not what the recipe was made from):
    /// nothing is written, and the caller sends the chunk whole.
    fn write_delta(
        &self,
        _index: u64,
        _offset: u64,
        _len: u64,
        _pieces: &[crate::delta::Piece],
        _literals: &[u8],
        _cv: &ChainingValue,
    ) -> Result<bool> {
        Ok(false)
    }
}

/// A small file or a symlink for [`Dest::write_batch`].
#[derive(Debug, Clone)]
pub struct BatchItem {
    /// Where, relative to the destination root.
    pub rel: PathBuf,
    /// Metadata to apply.
    pub meta: Meta,
    /// What to create.
    pub body: BatchBody,
}

/// What a [`BatchItem`] creates.
#[derive(Debug, Clone)]
pub enum BatchBody {
    /// A regular file of at most one chunk.
    File {
        /// Its bytes, holes zero-filled.
        data: Vec<u8>,
        /// Zero ranges that need not be written.
        holes: Vec<(u64, u64)>,
        /// BLAKE3 of `data`.
        hash: Hash,
        /// Extended attributes to set.
        xattrs: Xattrs,
        /// What the destination is told about the file.
        spec: FileSpec,
    },
    /// A symlink.
    Symlink {
        /// Its target.
        target: PathBuf,
    },
    /// A regular file of at most one chunk built from the old version at
    /// its path (whose signature [`Dest::basis_signatures`] gave), or from
    /// `basis`.
    Delta {
        /// Another file of the destination to build from, relative to its
        /// root: one written earlier in the run, which this one copies (see
        /// [`WriteFile::use_basis`]).
        basis: Option<PathBuf>,
        /// Its recipe.
        pieces: Vec<Piece>,
        /// The bytes of its literal pieces, in order.
        literals: Vec<u8>,
        /// BLAKE3 of the file to build.
        hash: Hash,
        /// Extended attributes to set.
        xattrs: Xattrs,
        /// What the destination is told about the file.
        spec: FileSpec,
    },
}

/// How [`Dest::write_batch`] commits.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// Set owners.
    pub owner: bool,
    /// Make the files durable before they get their names.
    pub sync: bool,
    /// Read each file back and check its hash first.
    pub verify: bool,
    /// Set when the run is interrupted: nothing more is published.
    pub cancel: Arc<AtomicBool>,
}

/// Below this many files a batch is synced file by file rather than with a
/// file-system-wide barrier.
const BARRIER_MIN_FILES: usize = 4;

/// Writes a batch through the single-file calls of `dest`: every file to a
/// temporary name with its metadata, one barrier (or an fsync each, for a
/// few files), then each renamed into place. One result per item.
pub fn write_batch_each(dest: &(impl Dest + ?Sized), items: Vec<BatchItem>, opts: &BatchOptions) -> Vec<Result<()>> {
    let cancelled = || opts.cancel.load(Ordering::Relaxed);
    let mut results: Vec<Result<()>> = Vec::with_capacity(items.len());
    let mut pending: Vec<(usize, Box<dyn WriteFile>, Hash, PathBuf)> = Vec::new();
    for item in items {
        if cancelled() {
            results.push(Err(Error::Interrupted));
            continue;
        }
        match item.body {
            BatchBody::Symlink { target } => results.push(dest.symlink(&item.rel, &target, &item.meta, opts.owner)),
            BatchBody::File {
                ref spec, ref xattrs, ..
            }
            | BatchBody::Delta {
                ref spec, ref xattrs, ..
            } => {
                let written = dest.create(&item.rel, spec).and_then(|w| {
                    let hash = match &item.body {
                        BatchBody::File { data, holes, hash, .. } => {
                            w.write_chunk(0, 0, data, holes, None).map(|()| *hash)
                        }
                        BatchBody::Delta {
                            basis,
                            pieces,
                            literals,
                            hash,
                            ..
                        } => {
                            let unbuilt = |why: &str| Error::Other {
                                path: PathBuf::from(dest.describe(&item.rel)),
                                message: format!("{why}; not built"),
                            };
                            match basis.as_deref().map_or(Ok(true), |b| w.use_basis(b)) {
                                Ok(true) => match w.write_delta(0, 0, spec.size, pieces, literals, hash.as_bytes()) {
                                    Ok(true) => Ok(*hash),
                                    Ok(false) => Err(unbuilt("what it was to be built from changed since")),
                                    Err(e) => Err(e),
                                },
                                Ok(false) => Err(unbuilt("the file it copies cannot be built from")),
                                Err(e) => Err(e),
                            }
                        }
                        BatchBody::Symlink { .. } => Err(Error::Internal("a symlink as a file".into())),
                    };
                    match hash.and_then(|h| w.set_meta(&item.meta, opts.owner, xattrs).map(|()| h)) {
                        Ok(h) => Ok((w, h)),
                        Err(e) => {
                            w.abort(false);
                            Err(e)
                        }
                    }
                });
                match written {
                    Ok((w, hash)) => {
                        pending.push((results.len(), w, hash, item.rel));
                        results.push(Ok(()));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
        }
    }
    let mut fail_all = |pending: Vec<(usize, Box<dyn WriteFile>, Hash, PathBuf)>, e: &Error| {
        for (i, w, _, rel) in pending {
            w.abort(false);
            results[i] = Err(match e {
                Error::Interrupted => Error::Interrupted,
                e => Error::Other {
                    path: PathBuf::from(dest.describe(&rel)),
                    message: format!("not committed: {e}"),
                },
            });
        }
    };
    if pending.is_empty() {
        return results;
    }
    if cancelled() {
        fail_all(pending, &Error::Interrupted);
        return results;
    }
    if opts.sync {
        let synced = if pending.len() >= BARRIER_MIN_FILES {
            dest.barrier()
        } else {
            pending.iter().try_for_each(|(_, w, _, _)| w.sync())
        };
        if let Err(e) = synced {
            fail_all(pending, &e);
            return results;
        }
    }
    for (i, w, hash, _) in pending {
        if opts.verify {
            if let Err(e) = w.verify(&hash) {
                w.abort(false);
                results[i] = Err(e);
                continue;
            }
        }
        results[i] = w.publish();
    }
    results
}

/// The write side of an endpoint. It can also be read, to compare.
pub trait Dest: Source {
    /// Creates the directory `rel` (its parent exists). Succeeds if it is
    /// already a directory.
    fn make_dir(&self, rel: &Path) -> Result<()>;
    /// Renames the entry `from` to `to` (whose parent exists), replacing
    /// what `to` names as rename(2) does: a file or symlink, or an empty
    /// directory by a directory.
    fn rename(&self, from: &Path, _to: &Path) -> Result<()> {
        Err(Error::Other {
            path: self.describe(from).into(),
            message: "this destination cannot rename entries".into(),
        })
    }
    /// Starts writing the regular file `rel` at a temporary name.
    fn create(&self, rel: &Path, spec: &FileSpec) -> Result<Box<dyn WriteFile>>;
    /// Creates or atomically replaces `rel` with a symlink to `target`.
    fn symlink(&self, rel: &Path, target: &Path, meta: &Meta, owner: bool) -> Result<()>;
    /// Makes `rel` a hard link to the already written `existing`. Returns
    /// false if it already was one.
    fn hard_link(&self, existing: &Path, rel: &Path) -> Result<bool>;
    /// Sets the length of the regular file `rel` as truncate(2) does (cut,
    /// or extended with zeros, as a hole where the file system allows) and
    /// returns the file as it is then. Never changed in place: the new
    /// version is written at a temporary name, made durable and renamed
    /// over the old one, so a reader sees one or the other and a hard link
    /// to the old version keeps it. Owners and extended attributes are the
    /// destination's to give, as for any file written without them.
    fn truncate(&self, rel: &Path, size: u64) -> Result<Entry> {
        let shown: PathBuf = self.describe(rel).into();
        let old = self.stat(rel)?.ok_or_else(|| Error::Vanished(shown.clone()))?;
        if old.kind != Kind::File {
            return Err(Error::Other {
                path: shown,
                message: "not a regular file".into(),
            });
        }
        let src = self.open(rel, &old)?;
        let now = crate::entry::Time::now();
        let meta = Meta {
            mtime: now,
            ..old.meta.clone()
        };
        let chunk = crate::engine::DEFAULT_CHUNK_SIZE;
        let spec = FileSpec {
            size,
            chunk_size: chunk,
            resumable: false,
            durable: true,
            source_meta: meta.clone(),
            source_changed: now,
        };
        let w = self.create(rel, &spec)?;
        let written = (|| {
            let chunks = crate::hash::chunk_count(size, chunk);
            let mut buf = vec![0u8; chunk.min(size) as usize];
            for i in 0..chunks {
                let off = i * chunk;
                let data = &mut buf[..chunk.min(size - off) as usize];
                let len = data.len() as u64;
                // What the old version has of this chunk, then a hole (its
                // bytes in `data` are never written). No journal, so no
                // chaining values: an extension costs neither reads nor hashing.
                let kept = old.size.saturating_sub(off).min(len);
                src.read_exact_at(off, &mut data[..kept as usize])?;
                let holes: Vec<(u64, u64)> = (kept < len).then_some((off + kept, len - kept)).into_iter().collect();
                w.write_chunk(i, off, data, &holes, None)?;
            }
            src.check_unchanged()?;
            w.set_meta(&meta, false, &Vec::new())?;
            w.sync()
        })();
        match written {
            Ok(()) => w.publish()?,
            Err(e) => {
                w.abort(false);
                return Err(e);
            }
        }
        self.stat(rel)?.ok_or(Error::Vanished(shown))
    }
    /// Applies metadata to an existing entry (not following symlinks).
    fn set_meta(&self, rel: &Path, kind: Kind, meta: &Meta, owner: bool, xattrs: Option<&Xattrs>) -> Result<()>;
    /// Removes `rel`; directories with all their contents.
    fn remove(&self, rel: &Path) -> Result<()>;
    /// Makes everything written so far durable at once (cheaper than one
    /// `sync` a file for many small files).
    fn barrier(&self) -> Result<()>;
    /// True when the endpoint can preserve owners (running privileged).
    fn can_chown(&self) -> bool;
    /// False where symlinks have no form (an object store): the engine
    /// then skips them, counted with the special files.
    fn keeps_symlinks(&self) -> bool {
        true
    }
    /// The signatures of the regular files at `items` (path, size as
    /// listed), made where they are, one per item in order: the bases that
    /// small files replacing them are sent as deltas against
    /// ([`BatchBody::Delta`]). `None` where there is no such file, it is no
    /// longer of the size listed, it cannot be read, or this endpoint
    /// cannot build from one. A remote endpoint
    /// asks for all of them in one request.
    fn basis_signatures(&self, items: &[(&Path, u64)]) -> Vec<Option<Signature>> {
        items.iter().map(|_| None).collect()
    }
    /// Creates several small files and symlinks at once; one result per
    /// item, in order. A remote endpoint sends them as one request.
    fn write_batch(&self, items: Vec<BatchItem>, opts: &BatchOptions) -> Vec<Result<()>> {
        write_batch_each(self, items, opts)
    }
    /// Waits until every change the endpoint accepted without waiting for
    /// its outcome (a remote endpoint queues `make_dir`, `set_meta` and
    /// `remove`) has been applied, and returns those that failed.
    fn settle(&self) -> Vec<Error> {
        Vec::new()
    }
}
