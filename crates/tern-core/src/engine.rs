//! The transfer engine: scan → plan → schedule → read → hash → write →
//! commit → report.
//!
//! One scanner thread walks the source depth-first, one directory at a time,
//! compares each entry with the destination and turns what must change into
//! work items on a bounded queue (so memory does not grow with the tree).
//! Worker threads take the items:
//! - a *batch* of small files and symlinks, written to temporary names, made
//!   durable together with one file-system barrier, then renamed into place;
//! - a *large file*, whose chunks are claimed by every worker that picks up
//!   one of its items, hashed and written in parallel at their offsets, and
//!   journaled so an interrupted copy resumes; the last worker out composes
//!   the whole-file hash and commits;
//! - a *single* file to compare by content first (`--checksum`), or a pair
//!   to compare (`check`).
//!
//! What must wait for all data to be in place (hard links, deletions,
//! directory times) runs after the workers finish.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use blake3::hazmat::ChainingValue;

use crate::delta::Piece;
use crate::endpoint::{
    BatchBody, BatchItem, BatchOptions, Dest, FileSpec, ReadFile, SmallFile, Source, WriteFile, Xattrs,
};
use crate::entry::{Entry, Kind, Meta};
use crate::error::{Error, Result};
use crate::filter::Filter;
use crate::hash::{self, Hash};

/// Default chunk size: large enough to amortise per-chunk cost, small enough
/// for parallelism and fine-grained resume.
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;

const BATCH_FILES: usize = 256;
/// With delta on, a changed small file (at most one chunk) of at least
/// this size whose old version is a file of this size too is sent in its
/// batch as a delta against that old version: smaller files have too few
/// content-defined chunks for a delta to find much.
const DELTA_MIN: u64 = 16 << 10;
/// Old versions larger than this are not a basis for a small file: cutting
/// them costs more than the small file's bytes.
const BASIS_MAX: u64 = 4 * DEFAULT_CHUNK_SIZE;
/// With delta on, a small file of at least this size identical to one
/// that landed earlier in the run is built from that one at the
/// destination, its bytes not sent: below it, the item's own description
/// costs about as much as the bytes.
const COPY_MIN: u64 = 512;
/// Small files (and sizes) remembered for that, at most: about 130 bytes
/// each, so 8 MiB; later ones are sent as they are.
const COPIES_REMEMBERED: usize = 64 << 10;
const BATCH_BYTES: u64 = 16 << 20;
/// Files compared by content are gathered in larger batches: nothing but
/// their hashes crosses, and each batch costs a far endpoint a round trip
/// (bench/latency.sh, `check` of 20,000 small files 50 ms away: 2.17 s in
/// batches of 256 with four workers).
const HASH_BATCH_FILES: usize = 1024;
const HASH_BATCH_BYTES: u64 = 64 << 20;

/// What the run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Make the destination hold the source's files (`copy`, `sync`).
    Transfer,
    /// Compare source and destination by content, change nothing.
    Check,
}

/// How a run behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Transfer or check.
    pub mode: Mode,
    /// Remove destination entries the source does not have (after all data
    /// is in place).
    pub delete: bool,
    /// With `delete`, also remove destination entries the filter excludes
    /// (rsync's `--delete-excluded`).
    pub delete_excluded: bool,
    /// With `delete`, remove nothing if more than this many entries would
    /// go, everything inside a removed directory counted.
    pub max_delete: Option<u64>,
    /// Make a new directory only when something lands in or beneath it
    /// (rsync's `--prune-empty-dirs`).
    pub prune_empty_dirs: bool,
    /// Report what would be done; change nothing.
    pub dry_run: bool,
    /// Decide what changed by BLAKE3 instead of size and mtime.
    pub checksum: bool,
    /// Include/exclude rules.
    pub filter: Filter,
    /// Worker threads.
    pub jobs: usize,
    /// fsync data before it is renamed into place.
    pub fsync: bool,
    /// Read each written file back and check its hash before committing it.
    pub verify: bool,
    /// Chunk size (power of two, at least 1 KiB).
    pub chunk_size: u64,
    /// Preserve hard links between source files.
    pub hard_links: bool,
    /// Preserve extended attributes.
    pub xattrs: bool,
    /// Bandwidth limit in bytes per second.
    pub bwlimit: Option<u64>,
    /// Send a changed large file as a delta against the destination's old
    /// version where both ends can (see [`crate::delta`]).
    pub delta: bool,
    /// Rules that leave some files alone.
    pub select: Select,
    /// Destination entries the run never deletes or writes over: the
    /// backups the destination keeps.
    pub protect: Protect,
    /// Set to stop the run: in-flight chunks finish, partial files stay
    /// resumable.
    pub cancel: Arc<AtomicBool>,
}

/// rsync's transfer rules: files they leave alone neither cross nor
/// change, and, unlike filtered ones, still count as the source's for
/// `--delete`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Select {
    /// A file of the same size at the destination is unchanged, whatever
    /// its times (`--size-only`).
    pub size_only: bool,
    /// A file the destination has is left alone (`--ignore-existing`).
    pub ignore_existing: bool,
    /// A file modified later at the destination is left alone (`--update`).
    pub update: bool,
    /// Modification times at most this many seconds apart are the same,
    /// compared in whole seconds (`--modify-window`); `None`: only equal
    /// times, nanoseconds included.
    pub modify_window: Option<u64>,
    /// Files smaller than this are left alone (`--min-size`).
    pub min_size: Option<u64>,
    /// Files larger than this are left alone (`--max-size`).
    pub max_size: Option<u64>,
}

/// What a run leaves alone at the destination because backups are kept
/// there (`--backup`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protect {
    /// A backup directory inside the destination, relative to its root:
    /// neither deleted nor written into from the source.
    pub dir: Option<PathBuf>,
    /// Names ending so are never deleted (backups kept beside their files;
    /// rsync protects them the same way unless told `--delete-excluded`).
    pub suffix: Option<OsString>,
}

impl Protect {
    /// Whether the destination entry `rel` is one to leave alone.
    pub fn holds(&self, rel: &Path) -> bool {
        self.dir.as_ref().is_some_and(|d| rel.starts_with(d))
            || self.suffix.as_ref().is_some_and(|s| {
                !s.is_empty()
                    && rel
                        .file_name()
                        .is_some_and(|n| n.as_encoded_bytes().ends_with(s.as_encoded_bytes()))
            })
    }
}

impl Select {
    /// Whether a rule is set.
    pub fn any(&self) -> bool {
        *self != Select::default()
    }

    /// Whether modification times `a` and `b` count as the same.
    pub fn same_time(&self, a: &crate::entry::Time, b: &crate::entry::Time) -> bool {
        match self.modify_window {
            None => a == b,
            Some(w) => a.sec.abs_diff(b.sec) <= w,
        }
    }

    /// Why source file `se` is left alone, given what the destination has
    /// there (`de`); `None` to go on comparing.
    fn leaves(&self, se: &Entry, de: Option<&Entry>) -> Option<&'static str> {
        if self.min_size.is_some_and(|m| se.size < m) {
            return Some("smaller than --min-size");
        }
        if self.max_size.is_some_and(|m| se.size > m) {
            return Some("larger than --max-size");
        }
        let d = de.filter(|d| d.kind != Kind::Dir)?;
        if self.ignore_existing {
            return Some("exists (--ignore-existing)");
        }
        // rsync: a file of the same time but another size is still sent.
        (self.update && d.kind == Kind::File && d.meta.mtime > se.meta.mtime).then_some("newer there (--update)")
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: Mode::Transfer,
            delete: false,
            delete_excluded: false,
            max_delete: None,
            prune_empty_dirs: false,
            dry_run: false,
            checksum: false,
            filter: Filter::new(),
            jobs: default_jobs(),
            fsync: true,
            verify: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            hard_links: false,
            xattrs: false,
            bwlimit: None,
            delta: false,
            select: Select::default(),
            protect: Protect::default(),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Default number of workers: enough to overlap I/O waits on small machines.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(4, |n| (n.get() * 2).clamp(4, 16))
}

/// One source of a run and where it lands.
#[derive(Clone)]
pub struct Root {
    /// The source endpoint, rooted at the file or directory to transfer.
    pub src: Arc<dyn Source>,
    /// Where it lands, relative to the destination endpoint's root (empty:
    /// the root itself).
    pub dst_rel: PathBuf,
}

/// What happened (or, in a dry run, would happen) to one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A file was copied where none was.
    New,
    /// A file was replaced by a newer version.
    Update,
    /// Only permissions/owner/times were changed.
    Meta,
    /// A directory was created.
    Dir,
    /// A symlink was created or replaced.
    Symlink,
    /// A hard link was made.
    HardLink,
    /// An entry the source does not have was removed.
    Delete,
    /// A device, FIFO or socket was skipped.
    SkipSpecial,
    /// A file a transfer rule ([`Select`]) left alone.
    Skip,
    /// `check`: present in the source only.
    Missing,
    /// `check`: present in the destination only.
    Extra,
    /// `check`: both have it, with different content or kind.
    Differ,
}

/// What differs between a source entry and the destination's, as rsync's
/// `--itemize-changes` reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Diff {
    /// The destination had nothing there (or something of another kind).
    pub new: bool,
    /// The contents differ by hash (`--checksum`), or a symlink's target.
    pub content: bool,
    /// The sizes differ.
    pub size: bool,
    /// The modification times differ.
    pub time: bool,
    /// The permissions differ.
    pub perms: bool,
    /// The owners differ (and are kept).
    pub owner: bool,
    /// The groups differ (and are kept).
    pub group: bool,
}

/// Receives what the engine does, as it does it. Called from several
/// threads.
pub trait Observer: Send + Sync {
    /// More work was planned: `files` files of `bytes` bytes in all.
    fn planned(&self, _files: u64, _bytes: u64) {}
    /// The scan finished: nothing more will be planned.
    fn scan_done(&self) {}
    /// `bytes` more bytes were transferred (or found already in place).
    fn progress(&self, _bytes: u64) {}
    /// A planned file is finished (committed, found equal, or failed).
    fn file_done(&self) {}
    /// An action on `path` (relative to the destination root).
    fn action(&self, _action: Action, _path: &Path, _size: u64) {}
    /// The same action with what differs, for rsync's `--itemize-changes`:
    /// `kind` is the source entry's (the removed entry's for a deletion).
    fn itemize(&self, _action: Action, _kind: Kind, _path: &Path, _diff: Diff) {}
    /// Something failed; the run goes on with other files.
    fn error(&self, _error: &Error) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// The outcome of a run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Summary {
    /// Regular files seen in the source (after filters).
    pub files: u64,
    /// Files written (or to be written, in a dry run).
    pub copied: u64,
    /// Files already up to date.
    pub unchanged: u64,
    /// Bytes of file data written in this run.
    pub bytes_written: u64,
    /// Bytes found already written and verified from an interrupted run.
    pub bytes_resumed: u64,
    /// Bytes shared with the source by reflink instead of being copied.
    pub bytes_cloned: u64,
    /// Bytes of delta transfers taken from the destination's old version
    /// instead of being sent (not in `bytes_written`).
    pub bytes_matched: u64,
    /// Bytes taken from another file, instead of being sent again: one
    /// written earlier in the run (a copy of it), or one the destination
    /// had under another name (not in `bytes_written`).
    pub bytes_deduplicated: u64,
    /// Total size of the files copied.
    pub bytes_total: u64,
    /// Directories created.
    pub dirs_created: u64,
    /// Symlinks created or replaced.
    pub symlinks: u64,
    /// Hard links made.
    pub hard_links: u64,
    /// Entries whose metadata alone was updated.
    pub meta_updated: u64,
    /// Entries deleted from the destination.
    pub deleted: u64,
    /// Special files skipped.
    pub skipped_special: u64,
    /// Files a transfer rule ([`Select`]) left alone.
    pub skipped: u64,
    /// `check`: paths that differ, are missing or extra.
    pub differences: u64,
    /// Number of failures.
    pub errors: u64,
    /// The first failures, one line each.
    pub error_messages: Vec<String>,
    /// Wall time in seconds.
    pub elapsed_secs: f64,
    /// Bytes written per second of wall time.
    pub bytes_per_sec: f64,
    /// Every written file was read back and matched its source hash.
    pub verified: bool,
    /// Nothing was changed.
    pub dry_run: bool,
    /// The run was stopped before the end.
    pub interrupted: bool,
    /// Deletions were skipped because of errors.
    pub deletions_skipped: bool,
}

const MAX_MESSAGES: usize = 100;

#[derive(Default)]
struct Stats {
    files: AtomicU64,
    copied: AtomicU64,
    unchanged: AtomicU64,
    bytes_written: AtomicU64,
    bytes_resumed: AtomicU64,
    bytes_cloned: AtomicU64,
    bytes_matched: AtomicU64,
    bytes_deduplicated: AtomicU64,
    bytes_total: AtomicU64,
    dirs_created: AtomicU64,
    symlinks: AtomicU64,
    hard_links: AtomicU64,
    meta_updated: AtomicU64,
    deleted: AtomicU64,
    skipped_special: AtomicU64,
    skipped: AtomicU64,
    differences: AtomicU64,
    errors: AtomicU64,
    messages: Mutex<Vec<String>>,
    deletions_skipped: AtomicBool,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A task on one source entry.
#[derive(Clone)]
struct Task {
    src: Arc<dyn Source>,
    src_rel: PathBuf,
    dst_rel: PathBuf,
    entry: Entry,
    /// The destination entry it replaces, if any.
    existing: Option<Entry>,
    /// Where it has no old version: a large file of its size that only the
    /// destination has, in a directory the scan walked; perhaps this file
    /// under its old name, a basis for it.
    moved: Option<PathBuf>,
}

enum Work {
    Batch(Vec<Task>),
    Large(Arc<Large>),
    /// Compare by content, then copy those that differ.
    Compare(Vec<Task>),
    /// `check`: compare pairs.
    Check(Vec<Task>),
}

/// The tasks of `tasks` that `want` picks (by index), grouped by source
/// endpoint (by identity), as indexes in order.
fn by_source(tasks: &[Task], want: impl Fn(usize) -> bool) -> Vec<(Arc<dyn Source>, Vec<usize>)> {
    let mut groups: Vec<(Arc<dyn Source>, Vec<usize>)> = Vec::new();
    for (i, t) in tasks.iter().enumerate().filter(|&(i, _)| want(i)) {
        match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &t.src)) {
            Some((_, v)) => v.push(i),
            None => groups.push((t.src.clone(), vec![i])),
        }
    }
    groups
}

/// Paces writes to a byte rate shared by all workers.
struct Throttle {
    rate: u64,
    start: Instant,
    sent: AtomicU64,
}

impl Throttle {
    fn take(&self, n: u64) {
        let sent = self.sent.fetch_add(n, Ordering::Relaxed) + n;
        let due = Duration::from_secs_f64(sent as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

struct Ctx {
    dest: Arc<dyn Dest>,
    opts: Options,
    obs: Arc<dyn Observer>,
    stats: Stats,
    owner: bool,
    throttle: Option<Throttle>,
    /// Files per write batch: each stays open until its batch commits.
    batch_files: usize,
    /// Large files published in this run, by size: bases for their copies.
    landed: Mutex<HashMap<u64, Vec<Arc<Landed>>>>,
    /// The small files sent in this run.
    small: Mutex<SmallSent>,
    /// Small files identical to one in flight when they were read: sent
    /// once everything else has landed, as copies of it.
    twins: Mutex<Vec<Task>>,
    /// Those are being sent: none is held back again.
    twins_last: AtomicBool,
}

/// The small files sent in a run, for [`Ctx::twin`].
#[derive(Default)]
struct SmallSent {
    /// How many files of each size were batched.
    sizes: HashMap<u64, u32>,
    /// By size and BLAKE3: the destination path of the first sent.
    sent: HashMap<(u64, Hash), SmallAt>,
}

/// A small file sent in the run, by its destination path.
enum SmallAt {
    InFlight(PathBuf),
    Landed(PathBuf),
}

/// What [`Ctx::twin`] makes of a small file.
enum Twin {
    /// Send it: the first of its contents, or a copy of nothing that landed.
    Send,
    /// Hold it back until the one identical to it, in flight, has landed.
    Defer,
    /// Build it at the destination from this file, which landed.
    Copy(PathBuf),
}

/// A large file published in this run.
struct Landed {
    src: Arc<dyn Source>,
    src_rel: PathBuf,
    entry: Entry,
    dst_rel: PathBuf,
    /// Its chunks' chaining values.
    cvs: Arc<Vec<ChainingValue>>,
    /// Its [`sample_digest`], once a file of its size is compared with it.
    sample: std::sync::OnceLock<Option<Hash>>,
}

/// The hash of `f`'s bytes at its start, middle and end ([`DEDUP_SAMPLE`]
/// at each), for a file of `size` bytes; `None` if they cannot be read.
fn sample_digest(f: &dyn ReadFile, size: u64) -> Option<Hash> {
    let n = DEDUP_SAMPLE.min(size as usize);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; n];
    for at in [0, size / 2 - n as u64 / 2, size - n as u64] {
        f.read_exact_at(at, &mut buf).ok()?;
        h.update(&buf);
    }
    Some(h.finalize())
}

/// Bytes compared at each of three places (start, middle, end) of two
/// files of one size before one is made the delta basis of the other.
const DEDUP_SAMPLE: usize = 64 << 10;

/// Runs a transfer or check of `roots` into `dest`.
pub fn run(roots: Vec<Root>, dest: Arc<dyn Dest>, opts: Options, obs: Arc<dyn Observer>) -> Summary {
    let start = Instant::now();
    let owner = dest.can_chown();
    let throttle = opts.bwlimit.map(|rate| Throttle {
        rate: rate.max(1),
        start,
        sent: AtomicU64::new(0),
    });
    let jobs = opts.jobs.max(1);
    let batch_files = BATCH_FILES.min(crate::sys::open_file_budget() / jobs).max(1);
    let ctx = Arc::new(Ctx {
        dest,
        opts,
        obs,
        stats: Stats::default(),
        owner,
        throttle,
        batch_files,
        landed: Mutex::default(),
        small: Mutex::default(),
        twins: Mutex::default(),
        twins_last: AtomicBool::new(false),
    });
    let spawn = |rx: Receiver<Work>| {
        let rx = Arc::new(Mutex::new(rx));
        (0..jobs)
            .map(|_| {
                let ctx = ctx.clone();
                let rx = rx.clone();
                std::thread::spawn(move || worker(&ctx, &rx))
            })
            .collect::<Vec<_>>()
    };
    let join = |workers: Vec<std::thread::JoinHandle<()>>| {
        for w in workers {
            if w.join().is_err() {
                ctx.fail(Error::Internal("a worker thread panicked".into()));
            }
        }
    };
    let (tx, rx) = sync_channel::<Work>(jobs * 2);
    let workers = spawn(rx);

    let mut scan = Scanner {
        ctx: &ctx,
        tx,
        batch: Vec::new(),
        batch_bytes: 0,
        dirs: Vec::new(),
        deletions: Vec::new(),
        links: HashMap::new(),
        deferred_links: Vec::new(),
        unmade: Vec::new(),
        batch_files,
        jobs,
        hashed: Vec::new(),
        hashed_bytes: 0,
        sizes: HashSet::new(),
        copies: Vec::new(),
        extras: HashMap::new(),
    };
    for root in &roots {
        if ctx.cancelled() {
            break;
        }
        scan.root(root);
    }
    scan.flush();
    let Scanner {
        tx,
        dirs,
        deletions,
        deferred_links,
        copies,
        ..
    } = scan;
    drop(tx);
    ctx.obs.scan_done();
    join(workers);
    let twins = ctx
        .twins
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default();
    if (!copies.is_empty() || !twins.is_empty()) && !ctx.cancelled() {
        // Possible copies of files that have landed now: each is sent as a
        // delta against the one it copies, when a sample says it does; a
        // small file, as a copy of the one it was found identical to.
        let (tx, rx) = sync_channel::<Work>(jobs * 2);
        let workers = spawn(rx);
        ctx.twins_last.store(true, Ordering::Relaxed);
        let mut twins = twins.into_iter().peekable();
        while twins.peek().is_some() {
            if tx
                .send(Work::Batch(twins.by_ref().take(batch_files).collect()))
                .is_err()
            {
                break;
            }
        }
        for t in copies {
            let large = Arc::new(Large::new(t, ctx.opts.chunk_size, jobs));
            for _ in 0..large.participants {
                if tx.send(Work::Large(large.clone())).is_err() {
                    break;
                }
            }
        }
        drop(tx);
        join(workers);
    }
    ctx.finish(dirs, deletions, deferred_links);

    let s = &ctx.stats;
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let errors = get(&s.errors);
    let interrupted = ctx.cancelled();
    Summary {
        files: get(&s.files),
        copied: get(&s.copied),
        unchanged: get(&s.unchanged),
        bytes_written: get(&s.bytes_written),
        bytes_resumed: get(&s.bytes_resumed),
        bytes_cloned: get(&s.bytes_cloned),
        bytes_matched: get(&s.bytes_matched),
        bytes_deduplicated: get(&s.bytes_deduplicated),
        bytes_total: get(&s.bytes_total),
        dirs_created: get(&s.dirs_created),
        symlinks: get(&s.symlinks),
        hard_links: get(&s.hard_links),
        meta_updated: get(&s.meta_updated),
        deleted: get(&s.deleted),
        skipped_special: get(&s.skipped_special),
        skipped: get(&s.skipped),
        differences: get(&s.differences),
        errors,
        error_messages: s.messages.lock().map(|m| m.clone()).unwrap_or_default(),
        elapsed_secs: elapsed,
        bytes_per_sec: if elapsed > 0.0 {
            get(&s.bytes_written) as f64 / elapsed
        } else {
            0.0
        },
        verified: ctx.opts.verify && errors == 0 && !interrupted && !ctx.opts.dry_run,
        dry_run: ctx.opts.dry_run,
        interrupted,
        deletions_skipped: s.deletions_skipped.load(Ordering::Relaxed),
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::File => "file",
        Kind::Dir => "directory",
        Kind::Symlink => "symlink",
        Kind::Special => "special file",
    }
}

impl Ctx {
    fn cancelled(&self) -> bool {
        self.opts.cancel.load(Ordering::Relaxed)
    }

    fn fail(&self, e: Error) {
        if e.is_interrupted() || e.is_reported() {
            return;
        }
        add(&self.stats.errors, 1);
        if let Ok(mut m) = self.stats.messages.lock() {
            if m.len() < MAX_MESSAGES {
                m.push(e.to_string());
            }
        }
        self.obs.error(&e);
    }

    fn act(&self, action: Action, path: &Path, size: u64) {
        self.obs.action(action, path, size);
    }

    /// Tells the observer what differs about `path`, whose source entry is
    /// `se` and destination entry `de`.
    fn itemize(&self, action: Action, path: &Path, se: &Entry, de: Option<&Entry>) {
        let same_kind = de.filter(|d| d.kind == se.kind);
        let diff = match same_kind {
            None => Diff {
                new: true,
                ..Diff::default()
            },
            Some(d) => Diff {
                new: false,
                content: se.kind == Kind::Symlink && se.target != d.target,
                size: se.kind == Kind::File && se.size != d.size,
                time: se.kind != Kind::Symlink && !self.opts.select.same_time(&se.meta.mtime, &d.meta.mtime),
                perms: se.kind != Kind::Symlink && se.meta.mode != d.meta.mode,
                owner: self.owner && se.meta.uid != d.meta.uid,
                group: self.owner && se.meta.gid != d.meta.gid,
            },
        };
        self.obs.itemize(action, se.kind, path, diff);
    }

    fn meta_differs(&self, a: &Meta, b: &Meta, kind: Kind) -> bool {
        (kind != Kind::Symlink && a.mode != b.mode)
            || !self.opts.select.same_time(&a.mtime, &b.mtime)
            || (self.owner && (a.uid != b.uid || a.gid != b.gid))
    }

    fn xattrs_of(&self, src: &dyn Source, rel: &Path) -> Result<Xattrs> {
        if self.opts.xattrs {
            src.xattrs(rel)
        } else {
            Ok(Vec::new())
        }
    }

    /// How many entries deleting `deletions` removes, everything inside a
    /// directory counted; counting stops once past `max`. An entry that
    /// cannot be listed counts as one.
    fn count_deletions(&self, deletions: &[PathBuf], max: u64) -> u64 {
        let mut n = 0u64;
        let mut dirs: Vec<PathBuf> = Vec::new();
        for rel in deletions {
            n += 1;
            if let Ok(Some(e)) = self.dest.stat(rel) {
                if e.kind == Kind::Dir {
                    dirs.push(rel.clone());
                }
            }
        }
        while let Some(d) = dirs.pop() {
            if n > max {
                break;
            }
            for e in self.dest.read_dir(&d).unwrap_or_default() {
                n += 1;
                if e.kind == Kind::Dir {
                    dirs.push(d.join(&e.name));
                }
            }
        }
        n
    }

    /// Work that must wait until all data is in place.
    fn finish(
        &self,
        dirs: Vec<(PathBuf, Entry, Arc<dyn Source>, PathBuf)>,
        deletions: Vec<PathBuf>,
        links: Vec<(PathBuf, PathBuf, Entry)>,
    ) {
        if self.opts.dry_run || self.opts.mode == Mode::Check || self.cancelled() {
            return;
        }
        for (first, link, se) in links {
            // Never link to a first copy that failed: the old file there
            // would replace the other name's content.
            match self.dest.stat(&first) {
                Ok(Some(d)) if d.kind == Kind::File && d.same_size_and_mtime(&se) => {}
                Ok(_) => {
                    self.fail(Error::NotLinked {
                        link: PathBuf::from(self.dest.describe(&link)),
                        first: PathBuf::from(self.dest.describe(&first)),
                    });
                    continue;
                }
                Err(e) => {
                    self.fail(e);
                    continue;
                }
            }
            match self.dest.hard_link(&first, &link) {
                Ok(made) => add(&self.stats.hard_links, made as u64),
                Err(e) => self.fail(e),
            }
        }
        // Changes the destination queued during the scan must have landed
        // (or failed) before deleting is decided.
        if !deletions.is_empty() {
            self.settle();
        }
        let mut safe_to_delete = self.stats.errors.load(Ordering::Relaxed) == 0 && !self.cancelled();
        if let (true, false, Some(max)) = (safe_to_delete, deletions.is_empty(), self.opts.max_delete) {
            let n = self.count_deletions(&deletions, max);
            if n > max {
                self.fail(Error::Other {
                    path: PathBuf::from(self.dest.describe(Path::new(""))),
                    message: format!(
                        "{} entries or more would be deleted, over --max-delete {max}; nothing was deleted",
                        n
                    ),
                });
                safe_to_delete = false;
            }
        }
        if safe_to_delete {
            for rel in deletions {
                match self.dest.remove(&rel) {
                    Ok(()) => {
                        add(&self.stats.deleted, 1);
                        self.act(Action::Delete, &rel, 0);
                        self.obs.itemize(Action::Delete, Kind::File, &rel, Diff::default());
                    }
                    Err(e) => self.fail(e),
                }
            }
        } else if !deletions.is_empty() {
            tracing::warn!(
                count = deletions.len(),
                "deletions skipped because of errors; nothing was deleted"
            );
            self.stats.deletions_skipped.store(true, Ordering::Relaxed);
        }
        // Deepest first, so setting a child's times does not disturb its
        // parent's.
        for (dst_rel, entry, src, src_rel) in dirs.into_iter().rev() {
            let x = match self.xattrs_of(&*src, &src_rel) {
                Ok(x) => x,
                Err(e) => {
                    self.fail(e);
                    continue;
                }
            };
            let xa = self.opts.xattrs.then_some(&x);
            if let Err(e) = self.dest.set_meta(&dst_rel, Kind::Dir, &entry.meta, self.owner, xa) {
                self.fail(e);
            }
        }
        if self.opts.fsync {
            if let Err(e) = self.dest.barrier() {
                self.fail(e);
            }
        }
        self.settle();
    }

    /// Reports the queued changes of the destination that failed.
    fn settle(&self) {
        for e in self.dest.settle() {
            self.fail(e);
        }
    }
}

struct Scanner<'a> {
    ctx: &'a Arc<Ctx>,
    tx: SyncSender<Work>,
    batch: Vec<Task>,
    batch_bytes: u64,
    /// Every directory in the destination, in pre-order, for the final
    /// metadata pass.
    dirs: Vec<(PathBuf, Entry, Arc<dyn Source>, PathBuf)>,
    deletions: Vec<PathBuf>,
    links: HashMap<(u64, u64), PathBuf>,
    /// Files per batch: each stays open until its batch commits.
    batch_files: usize,
    /// (first name, other name, source entry): linked at the end if the
    /// first name then holds this entry's version.
    deferred_links: Vec<(PathBuf, PathBuf, Entry)>,
    /// With `prune_empty_dirs`, the new directories on the current path not
    /// made yet, shallowest first: (destination path, source entry,
    /// source, source path).
    unmade: Vec<(PathBuf, Entry, Arc<dyn Source>, PathBuf)>,
    jobs: usize,
    /// Small files to compare by content, gathered like a batch.
    hashed: Vec<Task>,
    hashed_bytes: u64,
    /// Sizes of the large files sent so far.
    sizes: HashSet<u64>,
    /// Large files with no old version and the size of one sent before:
    /// perhaps copies, sent once the others have landed.
    copies: Vec<Task>,
    /// Large files only the destination has, in the directories walked so
    /// far, by size: perhaps old names of files the source has.
    extras: HashMap<u64, PathBuf>,
}

impl Scanner<'_> {
    fn send(&mut self, w: Work) {
        // Fails only when every worker is gone, which ends the run anyway.
        let _ = self.tx.send(w);
    }

    fn flush(&mut self) {
        if !self.batch.is_empty() {
            let b = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            self.send(Work::Batch(b));
        }
        self.flush_hashed();
    }

    fn flush_hashed(&mut self) {
        if !self.hashed.is_empty() {
            let b = std::mem::take(&mut self.hashed);
            self.hashed_bytes = 0;
            self.send(match self.ctx.opts.mode {
                Mode::Check => Work::Check(b),
                Mode::Transfer => Work::Compare(b),
            });
        }
    }

    /// Queues a file to compare by content (`check`, `--checksum`): small
    /// ones gathered so that a remote endpoint hashes a batch per request,
    /// large ones alone so that workers hash them in parallel.
    fn push_hashed(&mut self, t: Task) {
        if t.entry.size > self.ctx.opts.chunk_size {
            let w = match self.ctx.opts.mode {
                Mode::Check => Work::Check(vec![t]),
                Mode::Transfer => Work::Compare(vec![t]),
            };
            return self.send(w);
        }
        self.hashed_bytes += t.entry.size;
        self.hashed.push(t);
        if self.hashed.len() >= HASH_BATCH_FILES || self.hashed_bytes >= HASH_BATCH_BYTES {
            self.flush_hashed();
        }
    }

    fn dest_stat(&self, rel: &Path) -> Option<Option<Entry>> {
        match self.ctx.dest.stat(rel) {
            Ok(e) => Some(e),
            Err(e) => {
                self.ctx.fail(e);
                None
            }
        }
    }

    fn root(&mut self, root: &Root) {
        let entry = match root.src.stat(Path::new("")) {
            Ok(Some(e)) => e,
            Ok(None) => {
                self.ctx.fail(Error::Usage(format!(
                    "{}: source does not exist",
                    root.src.describe(Path::new(""))
                )));
                return;
            }
            Err(e) => {
                self.ctx.fail(e);
                return;
            }
        };
        if !root.dst_rel.as_os_str().is_empty() && !self.ctx.opts.dry_run && self.ctx.opts.mode == Mode::Transfer {
            // Landing inside the destination directory: make sure it exists.
            if let Err(e) = self.ctx.dest.make_dir(Path::new("")) {
                return self.ctx.fail(e);
            }
        }
        let Some(existing) = self.dest_stat(&root.dst_rel) else {
            return;
        };
        if !root.dst_rel.as_os_str().is_empty()
            && !self.ctx.opts.filter.included(&root.dst_rel, entry.kind == Kind::Dir)
        {
            return;
        }
        if entry.kind == Kind::Dir {
            // Both listings stream from here on, so a far endpoint costs
            // no round trip per directory.
            let filter = &self.ctx.opts.filter;
            root.src.walk_ahead(Path::new(""), filter, &root.dst_rel);
            if existing.as_ref().is_some_and(|d| d.kind == Kind::Dir) {
                self.ctx.dest.walk_ahead(&root.dst_rel, filter, &root.dst_rel);
            }
        }
        self.entry(&root.src, Path::new(""), &root.dst_rel, entry, existing);
    }

    /// Removes a destination entry of the wrong kind when deleting is
    /// allowed; otherwise reports the conflict. Returns true if the way is
    /// now clear.
    fn clear_conflict(&mut self, dst_rel: &Path, found: &Entry, wanted: Kind) -> bool {
        let ctx = self.ctx;
        // The destination root itself is never removed to make way.
        if !ctx.opts.delete || dst_rel.as_os_str().is_empty() {
            let hint = if dst_rel.as_os_str().is_empty() {
                "; the destination itself is never replaced: move it away, or name another destination"
            } else {
                " (sync --delete replaces it)"
            };
            ctx.fail(Error::TypeConflict {
                path: PathBuf::from(ctx.dest.describe(dst_rel)),
                found: kind_name(found.kind),
                wanted: kind_name(wanted),
                hint,
            });
            return false;
        }
        ctx.act(Action::Delete, dst_rel, 0);
        ctx.obs.itemize(Action::Delete, found.kind, dst_rel, Diff::default());
        if ctx.opts.dry_run {
            return true;
        }
        match ctx.dest.remove(dst_rel) {
            Ok(()) => {
                add(&ctx.stats.deleted, 1);
                true
            }
            Err(e) => {
                ctx.fail(e);
                false
            }
        }
    }

    /// Plans one source entry against what the destination has there.
    fn entry(&mut self, src: &Arc<dyn Source>, src_rel: &Path, dst_rel: &Path, se: Entry, de: Option<Entry>) {
        let ctx = self.ctx;
        if se.kind == Kind::Dir {
            if let Some(exists) = self.dir(src, src_rel, dst_rel, &se, de.as_ref()) {
                self.walk(src, src_rel, dst_rel, exists);
            }
            return;
        }
        if se.kind == Kind::Symlink && !ctx.dest.keeps_symlinks() {
            add(&ctx.stats.skipped_special, 1);
            return ctx.act(Action::SkipSpecial, dst_rel, 0);
        }
        if ctx.opts.mode == Mode::Check {
            return self.check_entry(src, src_rel, dst_rel, se, de);
        }
        if se.kind != Kind::Special && !self.make_way(dst_rel) {
            return;
        }
        match se.kind {
            Kind::Dir => {} // planned above
            Kind::Special => {
                add(&ctx.stats.skipped_special, 1);
                ctx.act(Action::SkipSpecial, dst_rel, 0);
            }
            Kind::Symlink => {
                if let Some(d) = &de {
                    if d.kind == Kind::Symlink && d.target == se.target {
                        return self.unchanged(src, src_rel, dst_rel, se, d.clone());
                    }
                    if d.kind == Kind::Dir && !self.clear_conflict(dst_rel, d, Kind::Symlink) {
                        return;
                    }
                }
                self.push_small(src, src_rel, dst_rel, se, de);
            }
            Kind::File => {
                add(&ctx.stats.files, 1);
                if ctx.opts.hard_links && se.nlink > 1 {
                    if let Some(id) = se.file_id {
                        if let Some(first) = self.links.get(&id) {
                            ctx.act(Action::HardLink, dst_rel, 0);
                            ctx.itemize(Action::HardLink, dst_rel, &se, None);
                            self.deferred_links.push((first.clone(), dst_rel.to_path_buf(), se));
                            return;
                        }
                        self.links.insert(id, dst_rel.to_path_buf());
                    }
                }
                if let Some(why) = ctx.opts.select.leaves(&se, de.as_ref()) {
                    tracing::debug!(path = %dst_rel.display(), why, "left alone");
                    add(&ctx.stats.skipped, 1);
                    return ctx.act(Action::Skip, dst_rel, se.size);
                }
                if let Some(d) = &de {
                    if d.kind == Kind::Dir && !self.clear_conflict(dst_rel, d, Kind::File) {
                        return;
                    }
                    if d.kind == Kind::File && d.size == se.size {
                        if ctx.opts.checksum {
                            ctx.obs.planned(1, se.size);
                            return self.push_hashed(task(src, src_rel, dst_rel, se, de));
                        }
                        let sel = &ctx.opts.select;
                        if sel.size_only || sel.same_time(&se.meta.mtime, &d.meta.mtime) {
                            return self.unchanged(src, src_rel, dst_rel, se, d.clone());
                        }
                    }
                }
                let update = de.as_ref().is_some_and(|d| d.kind != Kind::Dir);
                let what = if update { Action::Update } else { Action::New };
                ctx.act(what, dst_rel, se.size);
                ctx.itemize(what, dst_rel, &se, de.as_ref());
                if ctx.opts.dry_run {
                    add(&ctx.stats.copied, 1);
                    add(&ctx.stats.bytes_total, se.size);
                    return;
                }
                ctx.obs.planned(1, se.size);
                if se.size > ctx.opts.chunk_size {
                    let first = self.sizes.insert(se.size);
                    let replaces = de.as_ref().is_some_and(|d| d.kind == Kind::File);
                    if ctx.opts.delta && !first && !replaces {
                        self.copies.push(task(src, src_rel, dst_rel, se, de));
                        return;
                    }
                    let mut t = task(src, src_rel, dst_rel, se, de);
                    if ctx.opts.delta && !replaces {
                        t.moved = self.extras.get(&t.entry.size).cloned();
                    }
                    let large = Arc::new(Large::new(t, ctx.opts.chunk_size, self.jobs));
                    for _ in 0..large.participants {
                        self.send(Work::Large(large.clone()));
                    }
                } else {
                    self.push_small(src, src_rel, dst_rel, se, de);
                }
            }
        }
    }

    /// Plans a directory. Returns whether to descend into it, and if so
    /// whether the destination directory existed before (a new one is known
    /// to be empty).
    fn dir(
        &mut self,
        src: &Arc<dyn Source>,
        src_rel: &Path,
        dst_rel: &Path,
        se: &Entry,
        de: Option<&Entry>,
    ) -> Option<bool> {
        let ctx = self.ctx;
        if ctx.opts.mode == Mode::Check {
            return match de {
                Some(d) if d.kind == Kind::Dir => Some(true),
                Some(_) => {
                    add(&ctx.stats.differences, 1);
                    ctx.act(Action::Differ, dst_rel, 0);
                    None
                }
                None => {
                    add(&ctx.stats.differences, 1);
                    ctx.act(Action::Missing, dst_rel, 0);
                    None
                }
            };
        }
        let exists = match de {
            Some(d) if d.kind == Kind::Dir => true,
            Some(d) => {
                if !self.clear_conflict(dst_rel, d, Kind::Dir) {
                    return None;
                }
                false
            }
            None => false,
        };
        if !exists && ctx.opts.prune_empty_dirs && !dst_rel.as_os_str().is_empty() {
            // Made when something lands in it, if anything does.
            self.unmade
                .push((dst_rel.to_path_buf(), se.clone(), src.clone(), src_rel.to_path_buf()));
            return Some(false);
        }
        if !exists && !self.make_dir(dst_rel, se) {
            return None;
        }
        // Every directory is revisited at the end: writing or deleting inside
        // it changes its mtime even when it matched during the scan.
        if !ctx.opts.dry_run {
            self.dirs
                .push((dst_rel.to_path_buf(), se.clone(), src.clone(), src_rel.to_path_buf()));
        }
        Some(exists)
    }

    /// Makes the new directory `dst_rel`; false if that failed (counted).
    fn make_dir(&mut self, dst_rel: &Path, se: &Entry) -> bool {
        let ctx = self.ctx;
        ctx.act(Action::Dir, dst_rel, 0);
        ctx.itemize(Action::Dir, dst_rel, se, None);
        if !ctx.opts.dry_run {
            if let Err(e) = ctx.dest.make_dir(dst_rel) {
                ctx.fail(e);
                return false;
            }
            add(&ctx.stats.dirs_created, 1);
        }
        true
    }

    /// Makes the directories not made yet on the way to `dst_rel`, which is
    /// about to be planned; those not on its way stayed empty and are never
    /// made. False if one could not be made.
    fn make_way(&mut self, dst_rel: &Path) -> bool {
        if self.unmade.is_empty() {
            return true;
        }
        self.unmade.retain(|(d, ..)| dst_rel.starts_with(d));
        for (d, se, src, src_rel) in std::mem::take(&mut self.unmade) {
            if !self.make_dir(&d, &se) {
                return false;
            }
            if !self.ctx.opts.dry_run {
                self.dirs.push((d, se, src, src_rel));
            }
        }
        true
    }

    /// An entry whose content is in place; its metadata may still differ.
    fn unchanged(&mut self, src: &Arc<dyn Source>, src_rel: &Path, dst_rel: &Path, se: Entry, de: Entry) {
        let ctx = self.ctx;
        if se.kind == Kind::File {
            add(&ctx.stats.unchanged, 1);
        }
        if !ctx.meta_differs(&de.meta, &se.meta, se.kind) && !ctx.opts.xattrs {
            return;
        }
        if ctx.meta_differs(&de.meta, &se.meta, se.kind) {
            ctx.act(Action::Meta, dst_rel, 0);
            ctx.itemize(Action::Meta, dst_rel, &se, Some(&de));
            add(&ctx.stats.meta_updated, 1);
        }
        if ctx.opts.dry_run {
            return;
        }
        let x = match ctx.xattrs_of(&**src, src_rel) {
            Ok(x) => x,
            Err(e) => return ctx.fail(e),
        };
        if let Err(e) = ctx
            .dest
            .set_meta(dst_rel, se.kind, &se.meta, ctx.owner, ctx.opts.xattrs.then_some(&x))
        {
            ctx.fail(e);
        }
    }

    fn push_small(&mut self, src: &Arc<dyn Source>, src_rel: &Path, dst_rel: &Path, se: Entry, de: Option<Entry>) {
        if se.kind == Kind::Symlink {
            self.ctx.act(Action::Symlink, dst_rel, 0);
            self.ctx.itemize(Action::Symlink, dst_rel, &se, de.as_ref());
            if self.ctx.opts.dry_run {
                return;
            }
        }
        self.batch_bytes += se.size;
        self.batch.push(task(src, src_rel, dst_rel, se, de));
        if self.batch.len() >= self.batch_files || self.batch_bytes >= BATCH_BYTES {
            self.flush();
        }
    }

    fn check_entry(&mut self, src: &Arc<dyn Source>, src_rel: &Path, dst_rel: &Path, se: Entry, de: Option<Entry>) {
        let ctx = self.ctx;
        let differ = |what: Action| {
            add(&ctx.stats.differences, 1);
            ctx.act(what, dst_rel, 0);
        };
        let Some(de) = de else {
            if se.kind == Kind::File {
                add(&ctx.stats.files, 1);
            }
            return differ(Action::Missing);
        };
        match (se.kind, de.kind) {
            (Kind::File, Kind::File) => {
                add(&ctx.stats.files, 1);
                if se.size != de.size {
                    return differ(Action::Differ);
                }
                ctx.obs.planned(1, se.size);
                self.push_hashed(task(src, src_rel, dst_rel, se, Some(de)));
            }
            (Kind::Symlink, Kind::Symlink) if se.target == de.target => {}
            (Kind::Special, Kind::Special) => {}
            _ => differ(Action::Differ),
        }
    }

    /// Walks the directory `src_rel` (landing at `dst_rel`) depth-first.
    fn walk(&mut self, src: &Arc<dyn Source>, src_rel: &Path, dst_rel: &Path, dst_exists: bool) {
        let mut stack = vec![(src_rel.to_path_buf(), dst_rel.to_path_buf(), dst_exists)];
        while let Some((s, d, exists)) = stack.pop() {
            if self.ctx.cancelled() {
                return;
            }
            let src_entries = match src.read_dir(&s) {
                Ok(v) => v,
                Err(e) => {
                    self.ctx.fail(e);
                    continue;
                }
            };
            let dst_entries = if exists {
                match self.ctx.dest.read_dir(&d) {
                    Ok(v) => v,
                    Err(e) => {
                        self.ctx.fail(e);
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            if self.ctx.opts.delta && !dst_entries.is_empty() {
                let names: HashSet<&OsStr> = src_entries.iter().map(|e| e.name.as_os_str()).collect();
                for de in &dst_entries {
                    if de.kind == Kind::File
                        && de.size > self.ctx.opts.chunk_size
                        && self.extras.len() < COPIES_REMEMBERED
                        && !names.contains(de.name.as_os_str())
                        && !crate::local::is_side_file(&de.name)
                    {
                        self.extras.entry(de.size).or_insert_with(|| d.join(&de.name));
                    }
                }
            }
            let mut subdirs = Vec::new();
            let mut di = dst_entries.into_iter().peekable();
            for se in src_entries {
                // Destination-only names sorting before this one.
                while let Some(de) = di.next_if(|de| de.name.as_encoded_bytes() < se.name.as_encoded_bytes()) {
                    self.extra(&d, de);
                }
                let de = di.next_if(|de| de.name == se.name);
                if crate::local::is_side_file(&se.name) {
                    // Another tern's partial file: never data to copy, and
                    // copying it could collide with our own temporaries.
                    continue;
                }
                let cs = s.join(&se.name);
                let cd = d.join(&se.name);
                if self.ctx.opts.protect.dir.as_ref().is_some_and(|p| cd.starts_with(p)) {
                    continue;
                }
                if !self.ctx.opts.filter.included(&cd, se.kind == Kind::Dir) {
                    if let (Some(de), true) = (de, self.ctx.opts.delete_excluded) {
                        self.extra(&d, de);
                    }
                    continue;
                }
                if se.kind == Kind::Dir {
                    if let Some(exists) = self.dir(src, &cs, &cd, &se, de.as_ref()) {
                        subdirs.push((cs, cd, exists));
                    }
                } else {
                    self.entry(src, &cs, &cd, se, de);
                }
            }
            for de in di {
                self.extra(&d, de);
            }
            stack.extend(subdirs.into_iter().rev());
        }
    }

    /// A destination entry the source does not have.
    fn extra(&mut self, dir: &Path, de: Entry) {
        let ctx = self.ctx;
        let rel = dir.join(&de.name);
        if ctx.opts.mode == Mode::Transfer && ctx.opts.protect.holds(&rel) {
            return;
        }
        let purge = ctx.opts.delete && ctx.opts.delete_excluded && ctx.opts.mode == Mode::Transfer;
        if !purge && !ctx.opts.filter.included(&rel, de.kind == Kind::Dir) {
            return;
        }
        if ctx.opts.mode == Mode::Check {
            if crate::local::is_side_file(&de.name) {
                return;
            }
            add(&ctx.stats.differences, 1);
            ctx.act(Action::Extra, &rel, 0);
        } else if ctx.opts.delete {
            if ctx.opts.dry_run {
                ctx.act(Action::Delete, &rel, 0);
                ctx.obs.itemize(Action::Delete, de.kind, &rel, Diff::default());
                add(&ctx.stats.deleted, 1);
            } else {
                self.deletions.push(rel);
            }
        }
    }
}

fn task(src: &Arc<dyn Source>, src_rel: &Path, dst_rel: &Path, entry: Entry, existing: Option<Entry>) -> Task {
    Task {
        src: src.clone(),
        src_rel: src_rel.to_path_buf(),
        dst_rel: dst_rel.to_path_buf(),
        entry,
        existing,
        moved: None,
    }
}

/// A file copied in chunks by several workers at once.
struct Large {
    task: Task,
    chunks: u64,
    participants: u32,
    next: AtomicU64,
    exited: AtomicU32,
    failed: AtomicBool,
    state: Mutex<LargeState>,
    sink: RwLock<Option<Box<dyn WriteFile>>>,
    /// Sent whole: a delta of it already failed.
    whole: bool,
}

/// Per chunk, the chaining value a destination claims to hold already.
type Claims = Arc<Vec<Option<ChainingValue>>>;

/// What a participant of a large file gets once it is open: the source,
/// the destination's claims, whether it was reflinked, the delta plan.
type LargeOpen = (Arc<dyn ReadFile>, Claims, bool, Option<Arc<crate::delta::Plan>>);

/// How a chunk reached the destination.
enum Sent {
    /// All its bytes.
    Whole,
    /// Already there from an interrupted run.
    Resumed,
    /// As a delta: this many literal bytes, the rest from the old version.
    Delta(u64),
}

#[derive(Default)]
struct LargeState {
    opened: bool,
    /// The destination shares the source's blocks: no bytes to copy.
    cloned: bool,
    src: Option<Arc<dyn ReadFile>>,
    /// The chaining values of the chunks the destination says it holds
    /// from an earlier run. Only a claim: each is kept only if the source's
    /// chunk hashes the same.
    claimed: Claims,
    /// How to build each chunk from the destination's old version, for a
    /// delta transfer.
    plan: Option<Arc<crate::delta::Plan>>,
    /// The plan's basis is another file of the run, which this one copies.
    copy: bool,
    /// What this file added to the byte counts, taken back if it is sent
    /// again whole: written, resumed, found in a basis.
    counted: [u64; 3],
    cvs: Vec<Option<ChainingValue>>,
    error: Option<Error>,
}

impl Large {
    fn new(task: Task, chunk_size: u64, jobs: usize) -> Large {
        let chunks = hash::chunk_count(task.entry.size, chunk_size);
        Large {
            task,
            chunks,
            participants: chunks.min(jobs as u64).max(1) as u32,
            next: AtomicU64::new(0),
            exited: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            state: Mutex::new(LargeState::default()),
            sink: RwLock::new(None),
            whole: false,
        }
    }
}

fn worker(ctx: &Ctx, rx: &Mutex<Receiver<Work>>) {
    let mut buf = Vec::new();
    loop {
        let work = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(work) = work else { return };
        match work {
            Work::Batch(tasks) => ctx.batch(tasks, ctx.opts.delta),
            Work::Large(l) => ctx.large(&l, &mut buf),
            Work::Compare(t) => ctx.compare(t, &mut buf),
            Work::Check(t) => ctx.check(t, &mut buf),
        }
    }
}

/// Reads `[offset, offset+len)` of `f` into `buf`, zero-filling holes
/// without reading them. Returns the holes.
fn read_chunk(f: &dyn ReadFile, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<Vec<(u64, u64)>> {
    buf.resize(len, 0);
    let data = f.data_ranges(offset, len as u64)?;
    let mut holes = Vec::new();
    let mut pos = offset;
    for &(s, l) in &data {
        if s > pos {
            holes.push((pos, s - pos));
        }
        pos = s + l;
    }
    if pos < offset + len as u64 {
        holes.push((pos, offset + len as u64 - pos));
    }
    if holes.is_empty() {
        // The caller checks the sender's CV against the one it computes.
        f.read_exact_at(offset, buf)?;
    } else {
        for &(s, l) in &holes {
            buf[(s - offset) as usize..(s - offset + l) as usize].fill(0);
        }
        for &(s, l) in &data {
            let part = &mut buf[(s - offset) as usize..(s - offset + l) as usize];
            f.read_exact_at(s, part)?;
            if let Some(sent) = f.sent_cv(s) {
                check_sent(f, s, &sent, &hash::cv_at(s, part))?;
            }
        }
    }
    Ok(holes)
}

/// Reads a file of at most one chunk whole into `buf`, checked against
/// what the sender computed where it crossed a network. Returns its holes.
pub(crate) fn read_whole(f: &dyn ReadFile, size: u64, buf: &mut Vec<u8>) -> Result<Vec<(u64, u64)>> {
    let holes = read_chunk(f, 0, size as usize, buf)?;
    check_chunk(f, 0, buf, None, &holes)?;
    Ok(holes)
}

/// Fails when bytes that crossed a network do not hash to what the sender
/// computed from what it read.
fn check_sent(f: &dyn ReadFile, offset: u64, sent: &ChainingValue, got: &ChainingValue) -> Result<()> {
    if sent == got {
        return Ok(());
    }
    Err(Error::Other {
        path: f.describe(),
        message: format!("data at offset {offset} arrived corrupted (BLAKE3 mismatch); not written"),
    })
}

/// Checks a whole chunk read without holes against the sender's CV, given
/// the chunk CV the caller computed (`None`: compute it here).
fn check_chunk(
    f: &dyn ReadFile,
    offset: u64,
    data: &[u8],
    cv: Option<&ChainingValue>,
    holes: &[(u64, u64)],
) -> Result<()> {
    if !holes.is_empty() {
        return Ok(()); // checked range by range
    }
    match f.sent_cv(offset) {
        Some(sent) => {
            let got = cv.copied().unwrap_or_else(|| hash::cv_at(offset, data));
            check_sent(f, offset, &sent, &got)
        }
        None => Ok(()),
    }
}

/// The BLAKE3 of a whole file, read chunk by chunk (checked against the
/// sender's chaining values where the file crossed a network).
pub fn hash_file(f: &dyn ReadFile, size: u64, chunk_size: u64, buf: &mut Vec<u8>, cancel: &AtomicBool) -> Result<Hash> {
    if size <= chunk_size {
        let holes = read_chunk(f, 0, size as usize, buf)?;
        check_chunk(f, 0, buf, None, &holes)?;
        return Ok(hash::hash_bytes(buf));
    }
    let n = hash::chunk_count(size, chunk_size);
    let mut cvs = Vec::with_capacity(n as usize);
    for i in 0..n {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let off = i * chunk_size;
        let holes = read_chunk(f, off, chunk_size.min(size - off) as usize, buf)?;
        let cv = hash::chunk_cv(off, buf);
        check_chunk(f, off, buf, Some(&cv), &holes)?;
        cvs.push(cv);
    }
    hash::compose(&cvs, size, chunk_size).ok_or_else(|| Error::Internal("chunk count".into()))
}

impl Ctx {
    fn spec(&self, e: &Entry, resumable: bool) -> FileSpec {
        FileSpec {
            size: e.size,
            chunk_size: self.opts.chunk_size,
            resumable,
            durable: self.opts.fsync,
            source_meta: e.meta.clone(),
            source_changed: e.changed,
        }
    }

    /// Sends small files and symlinks as one batch; with `delta`, those
    /// replacing an old version as deltas against it where that pays.
    fn batch(&self, tasks: Vec<Task>, delta: bool) {
        if self.cancelled() {
            return;
        }
        let bases = match delta {
            true => self.bases(&tasks),
            false => tasks.iter().map(|_| None).collect(),
        };
        // Files identical to others of the run: known before they are read
        // where their source hashes them cheaply (a daemon), else once read.
        let mut read: Vec<Option<Result<BatchBody>>> = tasks.iter().map(|_| None).collect();
        let mut defer = vec![false; tasks.len()];
        if delta {
            for (i, h) in self.hashes_of_twins(&tasks) {
                match self.twin(&tasks[i], h) {
                    Twin::Copy(basis) if !self.opts.xattrs => {
                        read[i] = Some(Ok(self.copy_body(&tasks[i], basis, h, Xattrs::new())));
                    }
                    Twin::Defer => defer[i] = true,
                    _ => {}
                }
            }
        }
        // The files of each source are read with one call: one request,
        // its answer one stream, when the source is remote.
        let unread = |t: &Task, i: usize| t.entry.kind != Kind::Symlink && read[i].is_none() && !defer[i];
        let wanted: Vec<bool> = tasks.iter().enumerate().map(|(i, t)| unread(t, i)).collect();
        for (src, idx) in by_source(&tasks, |i| wanted[i]) {
            let items: Vec<(&Path, &Entry)> = idx
                .iter()
                .map(|&i| (tasks[i].src_rel.as_path(), &tasks[i].entry))
                .collect();
            let sigs: Vec<_> = idx.iter().map(|&i| bases[i].as_ref()).collect();
            let mut files = src.read_files(&items, &sigs, self.opts.xattrs).into_iter();
            for &i in &idx {
                let t = &tasks[i];
                read[i] = Some(match files.next() {
                    Some(Ok(f)) if delta && f.delta.is_none() => {
                        let h = hash::hash_bytes(&f.data);
                        match self.twin(t, h) {
                            Twin::Copy(basis) => Ok(self.copy_body(t, basis, h, f.xattrs)),
                            Twin::Defer => {
                                defer[i] = true;
                                continue;
                            }
                            Twin::Send => Ok(self.small_body(t, f, Some(h))),
                        }
                    }
                    Some(f) => f.map(|f| self.small_body(t, f, None)),
                    None => Err(Error::Internal(format!("{}: not read", t.src.describe(&t.src_rel)))),
                });
            }
        }
        let mut items = Vec::with_capacity(tasks.len());
        let mut kept = Vec::with_capacity(tasks.len());
        for ((t, r), defer) in tasks.into_iter().zip(read).zip(defer) {
            if self.cancelled() {
                break;
            }
            if defer {
                if let Ok(mut w) = self.twins.lock() {
                    tracing::debug!(path = %t.dst_rel.display(), "identical to a file in flight; sent after it");
                    w.push(t);
                }
                continue;
            }
            let body = match r {
                None => BatchBody::Symlink {
                    target: t.entry.target.clone().unwrap_or_default(),
                },
                Some(Ok(body)) => body,
                Some(Err(e)) => {
                    self.fail(e);
                    self.obs.file_done();
                    continue;
                }
            };
            items.push(BatchItem {
                rel: t.dst_rel.clone(),
                meta: t.entry.meta.clone(),
                body,
            });
            kept.push(t);
        }
        if items.is_empty() || self.cancelled() {
            return;
        }
        let opts = BatchOptions {
            owner: self.owner,
            sync: self.opts.fsync,
            verify: self.opts.verify,
            cancel: self.opts.cancel.clone(),
        };
        // Per item: its literal bytes if it is a delta, whether it copies
        // another file of the run, and its hash.
        let sent: Vec<(Option<u64>, bool, Option<Hash>)> = items
            .iter()
            .map(|it| match &it.body {
                BatchBody::Delta {
                    literals, basis, hash, ..
                } => (Some(literals.len() as u64), basis.is_some(), Some(*hash)),
                BatchBody::File { hash, .. } => (None, false, Some(*hash)),
                BatchBody::Symlink { .. } => (None, false, None),
            })
            .collect();
        let results = self.dest.write_batch(items, &opts);
        let mut again = Vec::new();
        let mut landed = Vec::new();
        for ((t, r), (literal, copy, hash)) in kept.into_iter().zip(results).zip(sent) {
            let file = t.entry.kind != Kind::Symlink;
            match r {
                Ok(()) if file => {
                    let written = literal.unwrap_or(t.entry.size);
                    add(&self.stats.copied, 1);
                    add(&self.stats.bytes_total, t.entry.size);
                    add(&self.stats.bytes_written, written);
                    add(self.found_stat(copy), t.entry.size - written);
                    self.obs.progress(t.entry.size);
                    tracing::debug!(path = %t.dst_rel.display(), literal = ?literal, copy, "committed");
                    if let (Some(h), true) = (hash, delta && t.entry.size >= COPY_MIN) {
                        landed.push(((t.entry.size, h), t.dst_rel.clone()));
                    }
                }
                Ok(()) => add(&self.stats.symlinks, 1),
                // Not built from its old version (which changed since its
                // signature, or a short id matched the wrong chunk): sent
                // again whole.
                Err(e) if literal.is_some() && !e.is_interrupted() => {
                    tracing::info!(path = %t.dst_rel.display(), error = %e, "delta failed; sending the file whole");
                    again.push(t);
                    continue;
                }
                Err(e) => self.fail(e),
            }
            if file {
                self.obs.file_done();
            }
        }
        if let (false, Ok(mut s)) = (landed.is_empty(), self.small.lock()) {
            for (k, rel) in landed {
                let room = s.sent.len() < COPIES_REMEMBERED;
                match s.sent.get_mut(&k) {
                    Some(SmallAt::Landed(_)) => {}
                    Some(at) => *at = SmallAt::Landed(rel),
                    None if room => {
                        s.sent.insert(k, SmallAt::Landed(rel));
                    }
                    None => {}
                }
            }
        }
        if !again.is_empty() {
            self.batch(again, false);
        }
    }

    /// Per task, the signature of the old version it replaces, when it is
    /// a file to send as a delta against it: asked of the destination in
    /// one call.
    fn bases(&self, tasks: &[Task]) -> Vec<Option<crate::delta::Signature>> {
        let mut out: Vec<_> = tasks.iter().map(|_| None).collect();
        let wanted: Vec<usize> = (0..tasks.len())
            .filter(|&i| {
                let t = &tasks[i];
                t.entry.kind == Kind::File
                    && t.entry.size >= DELTA_MIN
                    && t.existing
                        .as_ref()
                        .is_some_and(|d| d.kind == Kind::File && (DELTA_MIN..=BASIS_MAX).contains(&d.size))
            })
            .collect();
        if wanted.is_empty() {
            return out;
        }
        let items: Vec<(&Path, u64)> = wanted
            .iter()
            .map(|&i| {
                (
                    tasks[i].dst_rel.as_path(),
                    tasks[i].existing.as_ref().map_or(0, |d| d.size),
                )
            })
            .collect();
        for (i, sig) in wanted.into_iter().zip(self.dest.basis_signatures(&items)) {
            out[i] = sig;
        }
        out
    }

    /// Verifies (if asked) and renames a written, synced file into place.
    /// Verifies (with `--verify`) and publishes, counting the file.
    fn try_commit(&self, t: &Task, w: Box<dyn WriteFile>, h: Option<&Hash>) -> Result<()> {
        if let (true, Some(h)) = (self.opts.verify, h) {
            if let Err(e) = w.verify(h) {
                w.abort(false);
                return Err(e);
            }
        }
        if let Some(h) = h {
            if let Some(known) = t.src.known_hash(&t.src_rel, &t.entry).filter(|k| k != h) {
                w.abort(false);
                return Err(Error::VerifyFailed {
                    path: t.dst_rel.clone(),
                    expected: known.to_hex().to_string(),
                    found: h.to_hex().to_string(),
                });
            }
            w.expect_hash(h);
        }
        w.publish()?;
        add(&self.stats.copied, 1);
        add(&self.stats.bytes_total, t.entry.size);
        tracing::debug!(path = %t.dst_rel.display(), hash = ?h.map(|h| h.to_hex()), "committed");
        Ok(())
    }

    /// The BLAKE3 of each file of `tasks` that may be identical to another
    /// small file of the run (another of its size was seen), where its
    /// source computes them without sending the files: by task index.
    fn hashes_of_twins(&self, tasks: &[Task]) -> Vec<(usize, Hash)> {
        let mut twins = vec![false; tasks.len()];
        if let Ok(mut s) = self.small.lock() {
            for t in tasks.iter().filter(|t| t.entry.kind == Kind::File) {
                let full = s.sizes.len() >= COPIES_REMEMBERED;
                match s.sizes.get_mut(&t.entry.size) {
                    Some(n) => *n += 1,
                    None if !full => {
                        s.sizes.insert(t.entry.size, 1);
                    }
                    None => {}
                }
            }
            for (i, t) in tasks.iter().enumerate() {
                twins[i] = t.entry.kind == Kind::File
                    && t.entry.size >= COPY_MIN
                    && s.sizes.get(&t.entry.size).is_some_and(|&n| n > 1);
            }
        }
        let mut out = Vec::new();
        for (src, idx) in by_source(tasks, |i| twins[i]) {
            let items: Vec<(&Path, &Entry)> = idx
                .iter()
                .map(|&i| (tasks[i].src_rel.as_path(), &tasks[i].entry))
                .collect();
            let Some(hashes) = src.file_hashes(&items) else {
                continue;
            };
            out.extend(idx.into_iter().zip(hashes).filter_map(|(i, h)| Some((i, h.ok()?))));
        }
        out
    }

    /// What to do with small file `t`, whose BLAKE3 is `hash`, given the
    /// files sent earlier in the run; a file sent first is noted in flight.
    fn twin(&self, t: &Task, hash: Hash) -> Twin {
        let size = t.entry.size;
        let Ok(mut s) = self.small.lock() else {
            return Twin::Send;
        };
        if size < COPY_MIN || u32::try_from(size).is_err() {
            return Twin::Send;
        }
        match s.sent.get(&(size, hash)) {
            Some(SmallAt::Landed(rel)) if *rel != t.dst_rel => Twin::Copy(rel.clone()),
            Some(SmallAt::InFlight(rel)) if *rel != t.dst_rel && !self.twins_last.load(Ordering::Relaxed) => {
                Twin::Defer
            }
            Some(_) => Twin::Send,
            None => {
                if s.sent.len() < COPIES_REMEMBERED {
                    s.sent.insert((size, hash), SmallAt::InFlight(t.dst_rel.clone()));
                }
                Twin::Send
            }
        }
    }

    /// Small file `t` as a copy of `basis`, a file of the destination that
    /// landed earlier in the run with the same BLAKE3.
    fn copy_body(&self, t: &Task, basis: PathBuf, hash: Hash, xattrs: Xattrs) -> BatchBody {
        tracing::debug!(path = %t.dst_rel.display(), basis = %basis.display(), "a copy");
        BatchBody::Delta {
            basis: Some(basis),
            pieces: vec![Piece::Copy {
                offset: 0,
                len: u32::try_from(t.entry.size).unwrap_or(u32::MAX),
            }],
            literals: Vec::new(),
            hash,
            xattrs,
            spec: self.spec(&t.entry, false),
        }
    }

    /// A small file read whole or as a delta, as a batch item's body;
    /// `hash` when the caller hashed it already.
    fn small_body(&self, t: &Task, f: SmallFile, hash: Option<Hash>) -> BatchBody {
        if let Some(th) = &self.throttle {
            th.take(f.data.len() as u64);
        }
        if let Some(d) = f.delta {
            return BatchBody::Delta {
                basis: None,
                pieces: d.pieces,
                literals: f.data,
                hash: d.hash,
                xattrs: f.xattrs,
                spec: self.spec(&t.entry, false),
            };
        }
        BatchBody::File {
            hash: hash.unwrap_or_else(|| hash::hash_bytes(&f.data)),
            data: f.data,
            holes: f.holes,
            xattrs: f.xattrs,
            spec: self.spec(&t.entry, false),
        }
    }

    fn large(&self, l: &Large, buf: &mut Vec<u8>) {
        self.large_chunks(l, buf);
        if l.exited.fetch_add(1, Ordering::AcqRel) + 1 == l.participants {
            self.large_finish(l, buf);
        }
    }

    /// Opens source and destination once, for the first participant.
    /// `None` when that failed (the error is kept for the finisher); else
    /// the source, the chunks the destination claims to hold, and whether
    /// the destination shares the source's blocks.
    fn large_open(&self, l: &Large) -> Option<LargeOpen> {
        let mut st = l.state.lock().ok()?;
        if !st.opened {
            st.opened = true;
            let t = &l.task;
            let opened = t
                .src
                .open(&t.src_rel, &t.entry)
                .and_then(|rf| Ok((rf, self.dest.create(&t.dst_rel, &self.spec(&t.entry, true))?)));
            let (rf, w) = match opened {
                Ok(x) => x,
                Err(e) => {
                    l.failed.store(true, Ordering::Relaxed);
                    st.error = Some(e);
                    return None;
                }
            };
            st.cvs = vec![None; l.chunks as usize];
            let mut claimed = vec![None; l.chunks as usize];
            let mut claimed_bytes = 0;
            for (i, cv) in w.resumed() {
                if let Some(slot) = claimed.get_mut(i as usize) {
                    *slot = Some(cv);
                    claimed_bytes += self.opts.chunk_size.min(t.entry.size - i * self.opts.chunk_size);
                }
            }
            st.claimed = Arc::new(claimed);
            if claimed_bytes > 0 {
                tracing::info!(path = %t.dst_rel.display(), bytes = claimed_bytes, "resuming");
            } else {
                let shared = match rf.local_file() {
                    Some(f) => w.clone_from(f),
                    None => w.copy_within(&*rf),
                };
                match shared {
                    Ok(true) => {
                        tracing::debug!(path = %t.dst_rel.display(), "reflinked or copied where it is");
                        st.cloned = true;
                        add(&self.stats.bytes_cloned, t.entry.size);
                        self.obs.progress(t.entry.size);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        l.failed.store(true, Ordering::Relaxed);
                        st.error = Some(e);
                        w.abort(false);
                        return None;
                    }
                }
            }
            // A resumed file is planned too: its old version is still at
            // the final name, and the chunks already there are kept where
            // the source's hash as claimed.
            if !st.cloned && !l.whole {
                if let Some((plan, copy)) = self.delta_plan(t, &*rf, &*w) {
                    (st.plan, st.copy) = (Some(plan), copy);
                }
            }
            st.src = Some(Arc::from(rf));
            *l.sink.write().ok()? = Some(w);
        }
        let src = st.src.clone()?;
        Some((src, st.claimed.clone(), st.cloned, st.plan.clone()))
    }

    /// A plan for sending `t` as a delta against the file it replaces, when
    /// delta is on, the source is on this machine (its bytes are read to
    /// cut them) and the destination has a basis to offer; `None` also when
    /// too little of the basis matches to be worth it.
    fn delta_plan(&self, t: &Task, src: &dyn ReadFile, w: &dyn WriteFile) -> Option<(Arc<crate::delta::Plan>, bool)> {
        if !self.opts.delta {
            return None;
        }
        let mut moved = false;
        if !t.existing.as_ref().is_some_and(|e| e.kind == Kind::File) {
            // A copy of a file that landed earlier in the run: each chunk
            // that hashes as the other's at its place is built from there.
            if let Some((rel, cvs, exact)) = self.copied_from(t, src) {
                if !matches!(w.use_basis(&rel), Ok(true)) {
                    return None;
                }
                tracing::debug!(path = %t.dst_rel.display(), basis = %rel.display(), exact, "a copy");
                let mut plan = crate::delta::Plan::in_place(t.entry.size, self.opts.chunk_size, cvs.to_vec());
                if exact {
                    // The same file hash, so the same chunk hashes: no chunk
                    // need be read from the source.
                    plan.cvs = cvs.to_vec();
                }
                return Some((Arc::new(plan), true));
            }
            // Else perhaps this file under an old name the destination still
            // has: a delta against that, its matches counted as found in
            // another file.
            let old = t.moved.as_ref()?;
            if !matches!(w.use_basis(old), Ok(true)) {
                return None;
            }
            tracing::debug!(path = %t.dst_rel.display(), basis = %old.display(), "perhaps moved");
            moved = true;
        }
        let sig = match w.basis_signature() {
            Ok(Some(sig)) => sig,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(path = %t.dst_rel.display(), error = %e, "no delta: the old version cannot be read");
                return None;
            }
        };
        let planned = match src.local_file() {
            Some(_) => {
                let read = |off: u64, buf: &mut [u8]| src.read_exact_at(off, buf);
                crate::delta::plan_file(&read, t.entry.size, &sig, self.opts.jobs, self.opts.chunk_size, true)
            }
            // Its bytes would have to cross to be cut here: its side plans.
            None => src.delta_plan(&sig, self.opts.chunk_size),
        };
        let plan = match planned {
            Ok(Some(p)) if crate::delta::worth(p.matched, t.entry.size) => p,
            Ok(_) => {
                tracing::debug!(path = %t.dst_rel.display(), "no delta: the old version barely matches");
                return None;
            }
            Err(e) => {
                tracing::debug!(path = %t.dst_rel.display(), error = %e, "no delta: the source cannot be planned");
                return None;
            }
        };
        tracing::debug!(path = %t.dst_rel.display(), matched = plan.matched, literal = plan.literal, "delta");
        Some((Arc::new(plan), moved))
    }

    /// Where the bytes a delta took from its basis are counted: from the
    /// file's old version, or from a copy sent earlier in the run.
    fn found_stat(&self, copy: bool) -> &AtomicU64 {
        match copy {
            true => &self.stats.bytes_deduplicated,
            false => &self.stats.bytes_matched,
        }
    }

    /// Notes that `t`, whose chunks hash to `cvs`, was published: a basis
    /// for copies of it later in the run.
    fn landed(&self, t: &Task, cvs: Option<Arc<Vec<ChainingValue>>>) {
        let (true, Some(cvs)) = (self.opts.delta, cvs) else {
            return;
        };
        if let Ok(mut l) = self.landed.lock() {
            l.entry(t.entry.size).or_default().push(Arc::new(Landed {
                src: t.src.clone(),
                src_rel: t.src_rel.clone(),
                entry: t.entry.clone(),
                dst_rel: t.dst_rel.clone(),
                cvs,
                sample: std::sync::OnceLock::new(),
            }));
        }
    }

    /// A file published earlier in the run that `t` (open as `src`) is a
    /// copy of: its destination path, relative to the root, its chunks'
    /// chaining values, and whether `t` is known to be exactly that. A file
    /// here is compared by size and by its bytes at its start, middle and
    /// end; a file on a daemon, by its BLAKE3, which the daemon computes
    /// without sending the file.
    fn copied_from(&self, t: &Task, src: &dyn ReadFile) -> Option<(PathBuf, Arc<Vec<ChainingValue>>, bool)> {
        let size = t.entry.size;
        let candidates: Vec<Arc<Landed>> = self.landed.lock().ok()?.get(&size)?.clone();
        if src.local_file().is_none() {
            let theirs = t.src.file_hashes(&[(&t.src_rel, &t.entry)])?.pop()?.ok()?;
            return candidates.into_iter().find_map(|l| {
                let landed = hash::compose(&l.cvs, size, self.opts.chunk_size)?;
                (landed == theirs).then(|| (l.dst_rel.clone(), l.cvs.clone(), true))
            });
        }
        let ours = sample_digest(src, size)?;
        candidates.into_iter().find_map(|l| {
            // Each landed file's sample is read once, however many files of
            // its size are compared with it.
            let theirs = l.sample.get_or_init(|| {
                l.src
                    .open(&l.src_rel, &l.entry)
                    .ok()
                    .and_then(|f| sample_digest(&*f, size))
            });
            (*theirs == Some(ours)).then(|| (l.dst_rel.clone(), l.cvs.clone(), false))
        })
    }

    fn large_chunks(&self, l: &Large, buf: &mut Vec<u8>) {
        let Some((src, claimed, cloned, plan)) = self.large_open(l) else {
            return; // reported once, by the finisher
        };
        if cloned {
            return;
        }
        let cs = self.opts.chunk_size;
        let size = l.task.entry.size;
        loop {
            if self.cancelled() || l.failed.load(Ordering::Relaxed) {
                return;
            }
            let i = l.next.fetch_add(1, Ordering::Relaxed);
            if i >= l.chunks {
                return;
            }
            let off = i * cs;
            let len = cs.min(size - off);
            let has_copy = |p: &&Vec<Piece>| p.iter().any(|x| matches!(x, Piece::Copy { .. }));
            let recipe = plan.as_ref().and_then(|p| p.chunks.get(i as usize)).filter(has_copy);
            let known_cv = plan.as_ref().and_then(|p| p.cvs.get(i as usize)).copied();
            let delta_read = || -> Result<Option<(ChainingValue, Sent)>> {
                let Some(pieces) = recipe else { return Ok(None) };
                let (cv, literals) = match (src.local_file(), known_cv) {
                    // Hashed while cut: only the literals are read again.
                    (Some(_), Some(cv)) => {
                        let mut lits = Vec::new();
                        for (at, n) in crate::delta::literal_ranges(pieces, off) {
                            let from = lits.len();
                            lits.resize(from + n as usize, 0);
                            src.read_exact_at(at, &mut lits[from..])?;
                        }
                        (cv, lits)
                    }
                    (Some(_), None) => return Ok(None),
                    // A copy of a landed file, whose hashes the source's
                    // match: nothing crosses; the chunk built here is
                    // checked against its hash.
                    (None, Some(cv)) if crate::delta::literal_ranges(pieces, off).is_empty() => (cv, Vec::new()),
                    // Planned where the source is: only the literals cross.
                    (None, _) => src.read_delta(i, off, len)?,
                };
                if claimed.get(i as usize).copied().flatten() == Some(cv) {
                    return Ok(Some((cv, Sent::Resumed)));
                }
                let sink = l.sink.read().map_err(|_| Error::Internal("poisoned lock".into()))?;
                let Some(w) = sink.as_ref() else {
                    return Err(Error::Internal("sink missing".into()));
                };
                let sent = literals.len() as u64;
                if let Some(th) = &self.throttle {
                    th.take(sent);
                }
                Ok(w.write_delta(i, off, len, pieces, &literals, &cv)?
                    .then_some((cv, Sent::Delta(sent))))
            };
            let r = match delta_read() {
                Ok(Some(done)) => Ok(done),
                Err(e) => Err(e),
                Ok(None) => read_chunk(&*src, off, len as usize, buf).and_then(|holes| {
                    let cv = hash::chunk_cv(off, buf);
                    check_chunk(&*src, off, buf, Some(&cv), &holes)?;
                    // The destination's claim is kept only when the source's
                    // own bytes hash to it: whoever could write the partial file
                    // and its journal must not choose what this copy commits.
                    if claimed.get(i as usize).copied().flatten() == Some(cv) {
                        return Ok((cv, Sent::Resumed));
                    }
                    let sink = l.sink.read().map_err(|_| Error::Internal("poisoned lock".into()))?;
                    let Some(w) = sink.as_ref() else {
                        return Err(Error::Internal("sink missing".into()));
                    };
                    let local = plan.as_ref().filter(|_| src.local_file().is_some());
                    // Built in place from a copy's basis only where that
                    // chunk hashes the same there.
                    let fits = |p: &&Arc<crate::delta::Plan>| p.basis_cvs.get(i as usize).is_none_or(|b| *b == cv);
                    // A rebuilt chunk is written as data: one with holes
                    // goes as read, so its holes stay holes.
                    let recipe = local.filter(fits).filter(|_| holes.is_empty());
                    if let Some(pieces) = recipe.and_then(|p| p.chunks.get(i as usize)).filter(has_copy) {
                        let literals = crate::delta::literals(pieces, off, buf);
                        let sent: u64 = literals.len() as u64;
                        if let Some(th) = &self.throttle {
                            th.take(sent);
                        }
                        if w.write_delta(i, off, len, pieces, &literals, &cv)? {
                            return Ok((cv, Sent::Delta(sent)));
                        }
                    }
                    if let Some(th) = &self.throttle {
                        th.take(len);
                    }
                    w.write_chunk(i, off, buf, &holes, Some(&cv))?;
                    Ok((cv, Sent::Whole))
                }),
            };
            match (r, l.state.lock()) {
                (Ok((cv, sent)), Ok(mut st)) => {
                    st.cvs[i as usize] = Some(cv);
                    let (written, resumed) = match sent {
                        Sent::Whole => (len, 0),
                        Sent::Resumed => (0, len),
                        Sent::Delta(n) => (n, 0),
                    };
                    let found = len - written - resumed;
                    add(&self.stats.bytes_written, written);
                    add(&self.stats.bytes_resumed, resumed);
                    add(self.found_stat(st.copy), found);
                    for (c, n) in st.counted.iter_mut().zip([written, resumed, found]) {
                        *c += n;
                    }
                    self.obs.progress(len);
                }
                (Err(e), Ok(mut st)) => {
                    l.failed.store(true, Ordering::Relaxed);
                    st.error.get_or_insert(e);
                    return;
                }
                (_, Err(_)) => return,
            }
        }
    }

    fn large_finish(&self, l: &Large, buf: &mut Vec<u8>) {
        let t = &l.task;
        let sink = l.sink.write().ok().and_then(|mut s| s.take());
        let Ok(mut st) = l.state.lock() else { return };
        let interrupted = self.cancelled();
        let result: Result<()> = match (st.error.take(), sink) {
            (Some(e), w) => {
                if let Some(w) = w {
                    w.abort(false);
                }
                Err(e)
            }
            (None, None) => Err(Error::Internal(format!("{}: nothing opened", t.dst_rel.display()))),
            (None, Some(w)) if interrupted => {
                w.abort(true);
                return;
            }
            (None, Some(w)) => {
                let cvs: Option<Vec<_>> = st.cvs.iter().copied().collect();
                let landed = cvs.clone().map(Arc::new);
                let src = st.src.take();
                let cloned = st.cloned;
                let delta = st.plan.is_some();
                let (counted, copy) = (st.counted, st.copy);
                drop(st);
                let done = (|| {
                    let src =
                        src.ok_or_else(|| Error::Internal(format!("{}: source not open", t.dst_rel.display())))?;
                    // Hash only to verify: the blocks were never copied,
                    // or the file is one chunk, whose (non-root) chaining
                    // value the whole-file hash is not composed from.
                    let h = if cloned || l.chunks == 1 {
                        match self.opts.verify {
                            true => Some(hash_file(
                                &*src,
                                t.entry.size,
                                self.opts.chunk_size,
                                buf,
                                &self.opts.cancel,
                            )?),
                            false => None,
                        }
                    } else {
                        let cvs =
                            cvs.ok_or_else(|| Error::Internal(format!("{}: chunk missing", t.dst_rel.display())))?;
                        let h = hash::compose(&cvs, t.entry.size, self.opts.chunk_size)
                            .ok_or_else(|| Error::Internal("chunk count".into()))?;
                        Some(h)
                    };
                    src.check_unchanged()?;
                    let x = self.xattrs_of(&*t.src, &t.src_rel)?;
                    w.set_meta(&t.entry.meta, self.owner, &x)?;
                    if self.opts.fsync {
                        w.sync()?;
                    }
                    Ok(h)
                })();
                match done {
                    Ok(h) if delta => {
                        if let Err(e) = self.try_commit(t, w, h.as_ref()) {
                            // A chunk the destination could not build from
                            // its old version (it changed meanwhile) fails
                            // the file there: send it again, whole.
                            tracing::info!(path = %t.dst_rel.display(), error = %e, "delta failed; sending the file whole");
                            let stats = [
                                &self.stats.bytes_written,
                                &self.stats.bytes_resumed,
                                self.found_stat(copy),
                            ];
                            for (c, n) in stats.into_iter().zip(counted) {
                                c.fetch_sub(n, Ordering::Relaxed);
                            }
                            let mut again = Large::new(t.clone(), self.opts.chunk_size, 1);
                            again.whole = true;
                            self.large(&again, buf);
                            return;
                        }
                        self.landed(t, landed);
                        self.obs.file_done();
                        return;
                    }
                    Ok(h) => {
                        match self.try_commit(t, w, h.as_ref()) {
                            Ok(()) => self.landed(t, landed),
                            Err(e) => self.fail(e),
                        }
                        self.obs.file_done();
                        return;
                    }
                    Err(e) => {
                        w.abort(false);
                        Err(e)
                    }
                }
            }
        };
        if let Err(e) = result {
            self.fail(e);
            self.obs.file_done();
        }
    }

    /// Whether each source file and its destination counterpart (every
    /// task has one) hash the same. Each side's hashes are asked for in
    /// one call, computed where the files live when that is cheaper.
    fn same_contents(&self, tasks: &[Task], buf: &mut Vec<u8>) -> Vec<Result<bool>> {
        let mut src: Vec<Option<Result<Hash>>> = tasks.iter().map(|_| None).collect();
        for (ep, idx) in by_source(tasks, |_| true) {
            let items: Vec<(&Path, &Entry)> = idx
                .iter()
                .map(|&i| (tasks[i].src_rel.as_path(), &tasks[i].entry))
                .collect();
            for (&i, h) in idx.iter().zip(self.hashes_of(&*ep, &items, buf)) {
                src[i] = Some(h);
            }
        }
        let items: Vec<(&Path, &Entry)> = tasks
            .iter()
            .map(|t| (t.dst_rel.as_path(), t.existing.as_ref().unwrap_or(&t.entry)))
            .collect();
        let dest: &dyn Source = &*self.dest;
        let dst = self.hashes_of(dest, &items, buf);
        src.into_iter()
            .zip(dst)
            .map(|(a, b)| Ok(a.ok_or_else(|| Error::Internal("not hashed".into()))?? == b?))
            .collect()
    }

    /// The BLAKE3 of each file of `ep`, one result per item.
    fn hashes_of(&self, ep: &dyn Source, items: &[(&Path, &Entry)], buf: &mut Vec<u8>) -> Vec<Result<Hash>> {
        if let Some(v) = ep.file_hashes(items).filter(|v| v.len() == items.len()) {
            return v;
        }
        items
            .iter()
            .map(|(rel, e)| self.content_hash(ep, rel, e, buf))
            .collect()
    }

    /// The BLAKE3 of a file: computed by the endpoint where it lives if it
    /// can, else read and hashed here.
    fn content_hash(&self, ep: &dyn Source, rel: &Path, e: &Entry, buf: &mut Vec<u8>) -> Result<Hash> {
        if let Some(h) = ep.file_hash(rel, e) {
            return h;
        }
        let f = ep.open(rel, e)?;
        hash_file(&*f, e.size, self.opts.chunk_size, buf, &self.opts.cancel)
    }

    /// `--checksum`: copy only those whose content differs.
    fn compare(&self, tasks: Vec<Task>, buf: &mut Vec<u8>) {
        let tasks: Vec<Task> = tasks.into_iter().filter(|t| t.existing.is_some()).collect();
        let same = self.same_contents(&tasks, buf);
        let mut small = Vec::new();
        for (t, r) in tasks.into_iter().zip(same) {
            match r {
                Ok(true) => self.compared_equal(&t),
                Ok(false) => {
                    self.act(Action::Update, &t.dst_rel, t.entry.size);
                    let diff = Diff {
                        content: true,
                        ..Diff::default()
                    };
                    self.obs.itemize(Action::Update, Kind::File, &t.dst_rel, diff);
                    if self.opts.dry_run {
                        add(&self.stats.copied, 1);
                        add(&self.stats.bytes_total, t.entry.size);
                        continue;
                    }
                    if t.entry.size > self.opts.chunk_size {
                        let l = Large::new(t, self.opts.chunk_size, 1);
                        self.large(&l, buf);
                    } else {
                        small.push(t);
                    }
                }
                Err(e) => {
                    self.fail(e);
                    self.obs.file_done();
                }
            }
        }
        let mut small = small.into_iter().peekable();
        while small.peek().is_some() {
            self.batch(small.by_ref().take(self.batch_files).collect(), self.opts.delta);
        }
    }

    /// A file found equal by content: only its metadata may need fixing.
    fn compared_equal(&self, t: &Task) {
        let Some(de) = &t.existing else { return };
        add(&self.stats.unchanged, 1);
        self.obs.progress(t.entry.size);
        self.obs.file_done();
        if self.meta_differs(&de.meta, &t.entry.meta, Kind::File) || self.opts.xattrs {
            self.act(Action::Meta, &t.dst_rel, 0);
            self.itemize(Action::Meta, &t.dst_rel, &t.entry, Some(de));
            add(&self.stats.meta_updated, 1);
            if !self.opts.dry_run {
                let r = self.xattrs_of(&*t.src, &t.src_rel).and_then(|x| {
                    self.dest.set_meta(
                        &t.dst_rel,
                        Kind::File,
                        &t.entry.meta,
                        self.owner,
                        self.opts.xattrs.then_some(&x),
                    )
                });
                if let Err(e) = r {
                    self.fail(e);
                }
            }
        }
    }

    fn check(&self, tasks: Vec<Task>, buf: &mut Vec<u8>) {
        let tasks: Vec<Task> = tasks.into_iter().filter(|t| t.existing.is_some()).collect();
        let same = self.same_contents(&tasks, buf);
        for (t, r) in tasks.iter().zip(same) {
            self.obs.progress(t.entry.size);
            self.obs.file_done();
            match r {
                Ok(true) => add(&self.stats.unchanged, 1),
                Ok(false) => {
                    add(&self.stats.differences, 1);
                    self.act(Action::Differ, &t.dst_rel, t.entry.size);
                }
                Err(e) => self.fail(e),
            }
        }
    }
}
