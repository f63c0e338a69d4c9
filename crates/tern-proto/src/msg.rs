//! Control messages and version negotiation.

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// First bytes of every Hello: "TERN".
pub const MAGIC: [u8; 4] = *b"TERN";
/// Lowest protocol version this build speaks.
pub const VERSION_MIN: u16 = 1;
/// Highest protocol version this build speaks. Version 2 adds the
/// pipelined requests: [`Msg::Walk`], [`Msg::ReadFiles`], [`Msg::HashFiles`],
/// the queued-operations stream ([`Msg::OpsStream`], [`Msg::After`],
/// [`Msg::Settle`]) and [`Msg::Commit`]. A version-1 peer never sees them.
/// Version 3 adds [`Msg::Login`] (a token proved, never sent) and the
/// tickets of a remote-to-remote transfer ([`Msg::GrantTicket`],
/// [`Msg::PullTicketed`]).
pub const VERSION_MAX: u16 = 3;
/// The first version with [`Msg::Login`] and tickets.
pub const VERSION_LOGIN: u16 = 3;
/// How long a [`Ticket`] may be used, in seconds.
pub const TICKET_LIFETIME: u64 = 600;
/// The first version with the pipelined requests.
pub const VERSION_PIPELINE: u16 = 2;
/// Most files one [`Msg::ReadFiles`] or [`Msg::HashFiles`] may name.
pub const MAX_BATCH_FILES: usize = 1024;
/// Feature bit: the daemon runs transfers from another daemon itself
/// ([`Msg::Pull`]).
pub const FEATURE_PULL: u64 = 1;
/// Feature bit: the daemon answers [`Msg::Bench`] (`tern bench`).
pub const FEATURE_BENCH: u64 = 2;
/// Feature bit: the daemon's TCP connections send with BBR, so a pull over
/// TCP keeps pace on a long, lossy path (a client offers it to say it
/// understands it).
pub const FEATURE_TCP_BBR: u64 = 4;
/// Feature bit: the daemon builds changed files from their old version
/// ([`Msg::BasisSignature`], [`Msg::WriteDelta`]).
pub const FEATURE_DELTA: u64 = 8;
/// Signature entries per [`Msg::Signature`] part: well under the control
/// message limit.
pub const SIGNATURE_PART: usize = 32 << 10;
/// Pieces in one [`Msg::WriteDelta`] recipe, at most.
pub const MAX_PIECES: usize = 16 << 10;
/// Feature bit: the side accepts zstd containers of frames
/// ([`crate::FrameKind::Zstd`]) and may send them when it measures that
/// they pay. A client that does not offer it asks the daemon never to
/// compress.
pub const FEATURE_ZSTD: u64 = 16;
/// Feature bit, with [`FEATURE_ZSTD`]: a client asks for compression of
/// whatever compresses, whatever the link (`--compress always`); a daemon
/// offers it to say it honours that.
pub const FEATURE_ZSTD_ALWAYS: u64 = 32;
/// Feature bit: the daemon builds a file from another file of the module
/// ([`Msg::UseBasis`]) and takes [`Msg::PullWith`].
pub const FEATURE_COPIES: u64 = 64;
/// Feature bit: small files cross as deltas in their batches
/// ([`Msg::BasisSignatures`], [`BatchBody::Delta`], [`Msg::ReadFilesDelta`]).
pub const FEATURE_BATCH_DELTA: u64 = 128;
/// Feature bit: signatures may cross with their ids cut to as few bytes
/// as the chunk counts need ([`Msg::ShortSignature`],
/// [`Msg::ShortDeltaBasis`]).
pub const FEATURE_SHORT_IDS: u64 = 256;
/// Feature bit: a batch's file may be built from another file of the
/// module, one written earlier in the run ([`BatchBody::DeltaFrom`]).
pub const FEATURE_BATCH_COPIES: u64 = 512;
/// Feature bit: the daemon keeps backups of what a session replaces or
/// deletes when asked to ([`Msg::Backup`]).
pub const FEATURE_BACKUP: u64 = 1024;
/// Feature bit: the daemon lists its modules ([`Msg::ListModules`]).
pub const FEATURE_MODULES: u64 = 2048;
/// [`Msg::Rename`]: an entry renamed within the module.
pub const FEATURE_RENAME: u64 = 4096;
/// [`Msg::Truncate`]: a file's length set in place at the daemon.
pub const FEATURE_TRUNCATE: u64 = 8192;
/// Feature bits this build offers. Unknown bits from a peer are ignored.
pub const FEATURES: u64 = FEATURE_PULL
    | FEATURE_BENCH
    | FEATURE_TCP_BBR
    | FEATURE_DELTA
    | FEATURE_ZSTD
    | FEATURE_ZSTD_ALWAYS
    | FEATURE_COPIES
    | FEATURE_BATCH_DELTA
    | FEATURE_SHORT_IDS
    | FEATURE_BATCH_COPIES
    | FEATURE_BACKUP
    | FEATURE_MODULES
    | FEATURE_RENAME
    | FEATURE_TRUNCATE;
/// Most bytes one [`Msg::Bench`] may move.
pub const BENCH_MAX_BYTES: u64 = 1 << 30;
/// Bench data moves in blocks of this size (the last may be shorter), each
/// one data frame.
pub const BENCH_BLOCK: usize = 1 << 20;

/// A control message.
///
/// New variants are only ever appended, and only sent to a peer whose
/// negotiated version knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// First message of each side.
    Hello(Hello),
    /// A request failed, or the connection is being closed.
    Error(ErrorMsg),

    // Opening a stream, after the Hellos.
    /// Client: authenticate for `module` (first stream of a session).
    Auth(Auth),
    /// Client: attach this stream to an existing session.
    Join {
        /// Session id from [`Welcome`].
        session: u64,
        /// Session secret from [`Welcome`].
        secret: [u8; 32],
    },
    /// Server: the stream is open.
    Welcome(Welcome),

    // Generic replies.
    /// The request succeeded and has nothing to return.
    Done,
    /// Reply to `Stat`: the entry, if one is there.
    StatReply(Option<WireEntry>),
    /// Reply to `ReadDir`: some entries; more replies follow while `more`.
    Entries {
        /// Entries, sorted by name.
        entries: Vec<WireEntry>,
        /// More `Entries` replies follow.
        more: bool,
    },
    /// Reply to `Xattrs`.
    XattrList(Vec<(Vec<u8>, Vec<u8>)>),
    /// Reply to `Read`: `len` bytes follow as data frames. `cv` is the
    /// BLAKE3 chaining value of those bytes at their offset, computed by the
    /// sender from what it read.
    ReadReply {
        /// Number of bytes in the data frames that follow.
        len: u64,
        /// Chaining value of the bytes.
        cv: [u8; 32],
    },
    /// Reply to `Ranges`.
    RangesReply(Vec<(u64, u64)>),
    /// Reply to `Create`: chunks already in place from an earlier attempt.
    Created {
        /// `(index, chaining value)` of each.
        resumed: Vec<(u64, [u8; 32])>,
    },
    /// Reply to `HardLink`: whether a link was made.
    Linked(bool),
    /// Reply to `Hash`.
    HashReply([u8; 32]),
    /// Reply to `Batch`: one result per item, in order.
    BatchReply(Vec<Option<ErrorMsg>>),

    // Reading.
    /// Describe `path`.
    Stat {
        /// Module-relative path.
        path: Vec<u8>,
    },
    /// List the directory `path`.
    ReadDir {
        /// Module-relative path.
        path: Vec<u8>,
    },
    /// Extended attributes of `path`.
    Xattrs {
        /// Module-relative path.
        path: Vec<u8>,
    },
    /// Open a file for reading as `handle` (chosen by the client).
    OpenRead {
        /// Client-chosen handle.
        handle: u64,
        /// Module-relative path.
        path: Vec<u8>,
        /// The entry as listed: the file must still match it.
        expect: WireEntry,
    },
    /// Read `len` bytes at `offset`.
    Read {
        /// Handle from `OpenRead`.
        handle: u64,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// The data ranges (not holes) within `[offset, offset+len)`.
    Ranges {
        /// Handle from `OpenRead`.
        handle: u64,
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Fail if the open file changed since it was opened.
    CheckUnchanged {
        /// Handle from `OpenRead`.
        handle: u64,
    },
    /// Forget a read handle (no reply).
    CloseRead {
        /// Handle from `OpenRead`.
        handle: u64,
    },
    /// The BLAKE3 of a whole file, computed where it lives.
    Hash {
        /// Module-relative path.
        path: Vec<u8>,
        /// The entry as listed.
        expect: WireEntry,
    },

    // Writing.
    /// Start writing `path` at a temporary name, as `handle`.
    Create {
        /// Client-chosen handle.
        handle: u64,
        /// Module-relative path.
        path: Vec<u8>,
        /// What is coming.
        spec: WireSpec,
    },
    /// A chunk for `handle`: its data bytes follow as data frames (holes
    /// are not sent). No reply; a failure is reported by the next request
    /// on the handle that has one.
    Write(WriteChunk),
    /// Final metadata of a file being written, once `writes` chunks sent
    /// for it (on any stream) have been applied.
    FileMeta {
        /// Handle from `Create`.
        handle: u64,
        /// Number of `Write`s the client sent for the handle.
        writes: u64,
        /// Metadata.
        meta: WireMeta,
        /// Also set owner and group.
        owner: bool,
        /// Extended attributes.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Make the file durable.
    Sync {
        /// Handle.
        handle: u64,
    },
    /// Read the file back and check its BLAKE3.
    Verify {
        /// Handle.
        handle: u64,
        /// Expected whole-file hash.
        hash: [u8; 32],
    },
    /// Rename the file into place; the handle is gone afterwards.
    Publish {
        /// Handle.
        handle: u64,
        /// Number of `Write`s the client sent for the handle.
        writes: u64,
    },
    /// Give up on the file (no reply).
    Abort {
        /// Handle.
        handle: u64,
        /// Keep the partial data and journal for a later resume.
        keep: bool,
    },
    /// Create a directory.
    MakeDir {
        /// Module-relative path.
        path: Vec<u8>,
    },
    /// Create or replace a symlink.
    Symlink {
        /// Module-relative path.
        path: Vec<u8>,
        /// Link target, stored as is.
        target: Vec<u8>,
        /// Metadata.
        meta: WireMeta,
        /// Also set owner and group.
        owner: bool,
    },
    /// Make `path` a hard link to `existing`.
    HardLink {
        /// Existing module-relative path.
        existing: Vec<u8>,
        /// New module-relative path.
        path: Vec<u8>,
    },
    /// Apply metadata to an existing entry.
    SetMeta {
        /// Module-relative path.
        path: Vec<u8>,
        /// Its kind.
        kind: WireKind,
        /// Metadata.
        meta: WireMeta,
        /// Also set owner and group.
        owner: bool,
        /// Extended attributes to set, if any.
        xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    },
    /// Remove an entry (directories with their contents).
    Remove {
        /// Module-relative path.
        path: Vec<u8>,
    },
    /// Make everything written so far durable.
    Barrier,
    /// Several small files (and symlinks) in one request; the files'
    /// bytes follow as data frames, in item order, holes left out.
    Batch(Batch),

    // Daemon to daemon (feature [`FEATURE_PULL`]).
    /// Client: run a transfer (or check) from other daemons into this
    /// session's module, here. The server answers with [`Msg::RunEvent`]s
    /// and one [`Msg::RunDone`], or an `Error`.
    Pull(Box<PullRequest>),
    /// Server: something the run did.
    RunEvent(RunEvent),
    /// Server: the run ended.
    RunDone {
        /// The run's summary, as JSON (its fields change more often than
        /// the protocol does).
        summary_json: String,
        /// The transport the server used to reach the sources.
        transport: String,
    },

    // Measuring the path (feature [`FEATURE_BENCH`]).
    /// Client: move `bytes` (at most [`BENCH_MAX_BYTES`]) of filler data
    /// on this stream, in [`BENCH_BLOCK`]s: the server sends them then
    /// `Done` (download), or the client sends them after this message and
    /// the server answers `Done` once it has them all (upload). Nothing
    /// touches the module.
    Bench {
        /// The client sends.
        upload: bool,
        /// How many bytes.
        bytes: u64,
    },

    // Pipelined requests (version 2, [`VERSION_PIPELINE`]).
    /// Client: list the whole tree under `path`, depth-first, children in
    /// name order (each directory before what it holds). The server
    /// answers with one [`Msg::Listing`] (in parts) or
    /// [`Msg::ListingFailed`] per directory, then [`Msg::WalkDone`].
    /// A directory the filter excludes is not entered.
    Walk(Walk),
    /// Server: (part of) the listing of `dir`, relative to the walk's path.
    Listing {
        /// The directory, relative to the walk's path (empty: that path).
        dir: Vec<u8>,
        /// Entries, sorted by name.
        entries: Vec<WireEntry>,
        /// More parts of this directory's listing follow.
        more: bool,
    },
    /// Server: the directory `dir` of a walk could not be listed.
    ListingFailed {
        /// The directory, relative to the walk's path.
        dir: Vec<u8>,
        /// Why.
        error: ErrorMsg,
    },
    /// Server: the walk is complete.
    WalkDone,
    /// Client: read these files (each at most one chunk) whole. The server
    /// answers each in order with [`Msg::FileData`] and its bytes (holes
    /// left out) as data frames, or [`Msg::FileFailed`].
    ReadFiles {
        /// (module-relative path, the entry as listed) of each file.
        items: Vec<(Vec<u8>, WireEntry)>,
        /// Also send each file's extended attributes.
        xattrs: bool,
    },
    /// Server: one file of a [`Msg::ReadFiles`]; `size` bytes less `holes`
    /// follow as data frames.
    FileData {
        /// Length of the file.
        size: u64,
        /// Zero ranges, not sent.
        holes: Vec<(u64, u64)>,
        /// BLAKE3 of the file as the server read it.
        hash: [u8; 32],
        /// Extended attributes, if asked for.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Server: one file of a [`Msg::ReadFiles`] could not be read.
    FileFailed(ErrorMsg),
    /// Client: the BLAKE3 of each of these files, computed where they live.
    HashFiles {
        /// (module-relative path, the entry as listed) of each file.
        items: Vec<(Vec<u8>, WireEntry)>,
    },
    /// Server: reply to [`Msg::HashFiles`], one outcome per file in order.
    Hashes(Vec<HashOutcome>),
    /// Client: the requests that follow on this stream which change the
    /// module (`MakeDir`, `SetMeta`, `Remove`, `Symlink`) are queued: applied
    /// in order without a reply, failures kept until a [`Msg::Settle`].
    /// They are numbered from 1 for [`Msg::After`].
    OpsStream,
    /// Client: apply the next request on this stream only once the
    /// session's queued operations numbered up to `ops` are applied (they
    /// travel on another stream). No reply.
    After {
        /// Number of queued operations sent before this.
        ops: u64,
    },
    /// Client, on the operations stream: report the queued operations that
    /// failed since the last `Settle` ([`Msg::Settled`]).
    Settle,
    /// Server: reply to [`Msg::Settle`].
    Settled {
        /// (module-relative path, error) of each failed operation, the first
        /// ones if many failed.
        failed: Vec<(Vec<u8>, ErrorMsg)>,
        /// How many more failed than are listed.
        more: u64,
    },
    /// Client: finish a file being written in one request, once `writes`
    /// chunks are applied: set its metadata, make it durable if `sync`,
    /// check it reads back as `verify` if given, and rename it into place.
    /// The handle is gone afterwards, whatever the outcome.
    Commit(Commit),

    // Version 3 ([`VERSION_LOGIN`]).
    /// Client: authenticate for a module, as `Auth` does, proving a token
    /// rather than sending it, or presenting a ticket. Sent with the Hello;
    /// a daemon older than version 3 does not know it.
    Login(Login),
    /// Client: a ticket that lets the daemon whose key is `holder` read
    /// `path` in this session's module, on this client's behalf, for
    /// [`TICKET_LIFETIME`] seconds. Answered with [`Msg::TicketReply`].
    GrantTicket {
        /// Fingerprint of the daemon that will present the ticket.
        holder: String,
        /// Module-relative path it may read (and everything under it).
        path: Vec<u8>,
    },
    /// Reply to `GrantTicket`.
    TicketReply(Ticket),
    /// Client: run a transfer from other daemons into this session's
    /// module, as [`Msg::Pull`] asked before version 3, with one ticket per
    /// source proving the client may read it.
    PullTicketed {
        /// The transfer.
        req: Box<PullRequest>,
        /// `tickets[i]` was granted by `req.sources[i]`.
        tickets: Vec<Ticket>,
    },
    // Delta transfer (feature [`FEATURE_DELTA`]).
    /// Client: the signature of the basis of the file being written on
    /// `handle`: the file it replaces, or the one [`Msg::UseBasis`] named.
    /// Answered by [`Msg::Signature`] parts, the last with `last` set; one
    /// empty part when there is no basis.
    BasisSignature {
        /// Handle from `Create`.
        handle: u64,
    },
    /// Part of a basis signature: per content-defined chunk of the basis,
    /// its short id and length, in file order.
    Signature {
        /// The average chunk size the basis was cut with.
        avg: u32,
        /// `(id, len)` per chunk, at most [`SIGNATURE_PART`]; ids are
        /// fixed 8 bytes (as varints they would take 9 or 10).
        chunks: Vec<([u8; 8], u32)>,
        /// The last part.
        last: bool,
    },
    /// Client: chunk `index` of `handle`, to be built from the basis by
    /// `pieces`; the literal pieces' bytes follow as one data frame. No
    /// reply, as for [`Msg::Write`]; a chunk that does not hash to `cv` is
    /// not written and fails the file, which the client then sends whole.
    WriteDelta {
        /// Handle from `Create`.
        handle: u64,
        /// Chunk index.
        index: u64,
        /// Offset in the file.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// How to build it, at most [`MAX_PIECES`].
        pieces: Vec<WirePiece>,
        /// BLAKE3 chaining value of the built chunk at its offset.
        cv: [u8; 32],
    },
    /// Client: part of the signature of its old version of the file open
    /// for reading on `handle`. After the last part the daemon reads the
    /// file, plans it against the signature and answers with
    /// [`Msg::DeltaPlan`] parts.
    DeltaBasis {
        /// Handle from `OpenRead`.
        handle: u64,
        /// The average chunk size the basis was cut with.
        avg: u32,
        /// `(id, len)` per basis chunk, as in [`Msg::Signature`].
        chunks: Vec<([u8; 8], u32)>,
        /// The last part: `size` and `chunk_size` then say what to plan.
        last: bool,
        /// The file's size.
        size: u64,
        /// The grid the plan is laid over.
        chunk_size: u64,
    },
    /// Part of a plan: the recipes of consecutive grid chunks from `first`.
    /// A single part with no chunks says a delta does not pay: too little of
    /// the basis matches; the client reads the file plainly.
    DeltaPlan {
        /// Index of the first chunk in this part.
        first: u64,
        /// Per chunk, its pieces.
        chunks: Vec<Vec<WirePiece>>,
        /// The last part.
        last: bool,
    },
    /// Client: grid chunk `index` of the planned file on `handle`. Answered
    /// by [`Msg::DeltaRead`] and one data frame of its literal bytes.
    ReadDelta {
        /// Handle from `OpenRead`.
        handle: u64,
        /// Chunk index.
        index: u64,
    },
    /// Reply to `ReadDelta`.
    DeltaRead {
        /// BLAKE3 chaining value of the whole chunk at its offset.
        cv: [u8; 32],
        /// Literal bytes in the data frame that follows.
        literal: u64,
    },
    // Feature [`FEATURE_COPIES`].
    /// Client: the module's file at `path`, not the one the file being
    /// written on `handle` replaces, is the basis its chunks are built from
    /// (a copy of a file the run wrote before). Answered by `Done`.
    UseBasis {
        /// Handle from `Create`.
        handle: u64,
        /// The file to build from.
        path: Vec<u8>,
    },
    /// [`Msg::PullTicketed`] with what later options say.
    PullWith {
        /// The transfer.
        req: Box<PullRequest>,
        /// `tickets[i]` was granted by `req.sources[i]`.
        tickets: Vec<Ticket>,
        /// The options added since.
        extra: PullExtra,
    },
    // Feature [`FEATURE_BATCH_DELTA`].
    /// Client: the signatures of the module's files at `items` (at most
    /// [`MAX_BATCH_FILES`]), the old versions that a batch's files will be
    /// built from. Answered per item, in order, by its [`Msg::Signature`]
    /// parts; one empty part where there is no such file, it is no longer
    /// of the size listed, or it is too large to be a basis.
    BasisSignatures {
        /// (module-relative path, size as listed) of each file.
        items: Vec<(Vec<u8>, u64)>,
    },
    /// Client: [`Msg::ReadFiles`], each file planned as a delta against
    /// the client's old version of it where `bases` is set: that item's
    /// signature follows the request as [`Msg::Signature`] parts, items in
    /// order. Answered like `ReadFiles`, with [`Msg::FileDelta`] for a file
    /// whose delta pays.
    ReadFilesDelta {
        /// (module-relative path, the entry as listed) of each file.
        items: Vec<(Vec<u8>, WireEntry)>,
        /// Per item, whether its signature follows.
        bases: Vec<bool>,
        /// Also send each file's extended attributes.
        xattrs: bool,
    },
    /// Server: one file of a [`Msg::ReadFilesDelta`] as its recipe against
    /// the client's old version; its `literal` bytes follow as data frames.
    FileDelta {
        /// Length of the file.
        size: u64,
        /// The recipe, the whole file as one chunk, at most [`MAX_PIECES`].
        pieces: Vec<WirePiece>,
        /// Bytes of its literal pieces.
        literal: u64,
        /// BLAKE3 of the file as the server read it.
        hash: [u8; 32],
        /// Extended attributes, if asked for.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    },
    // Feature [`FEATURE_SHORT_IDS`].
    /// [`Msg::Signature`], its ids cut short.
    ShortSignature {
        /// The average chunk size the basis was cut with.
        avg: u32,
        /// The chunks, at most [`SIGNATURE_PART`].
        chunks: ShortIds,
        /// The last part.
        last: bool,
    },
    /// [`Msg::DeltaBasis`], its ids cut short.
    ShortDeltaBasis {
        /// Handle from `OpenRead`.
        handle: u64,
        /// The average chunk size the basis was cut with.
        avg: u32,
        /// The chunks, at most [`SIGNATURE_PART`].
        chunks: ShortIds,
        /// The last part.
        last: bool,
        /// The file's size.
        size: u64,
        /// The grid the plan is laid over.
        chunk_size: u64,
    },
    // Feature [`FEATURE_BACKUP`].
    /// Client, before its session writes anything: keep what the session
    /// replaces or deletes (rsync's `--backup`). Answered `Done`.
    Backup {
        /// Module-relative directory the backups go to; `None`: beside the
        /// file.
        dir: Option<Vec<u8>>,
        /// The destination's directory in the module: a backup in `dir`
        /// goes at the file's path below it, as rsync has it.
        base: Vec<u8>,
        /// Appended to each backup's name.
        suffix: Vec<u8>,
    },
    // Feature [`FEATURE_MODULES`].
    /// Client, after the Hellos and instead of a login: the modules it may
    /// use. Answered with `Modules`; the stream then ends.
    ListModules {
        /// A token's proof, as in [`Login::proof`]; without one only the
        /// client's key counts.
        proof: Option<[u8; 32]>,
    },
    /// Reply to `ListModules`, sorted by name.
    Modules(Vec<ModuleInfo>),
    // Feature [`FEATURE_RENAME`].
    /// Client: renames the entry `from` to `to`, both in the module,
    /// replacing what `to` names as rename(2) does. Answered `Done`.
    Rename {
        /// The entry's path.
        from: Vec<u8>,
        /// Its new path.
        to: Vec<u8>,
    },

    // Feature [`FEATURE_TRUNCATE`].
    /// Client: sets the length of the regular file `path` in the module,
    /// as truncate(2) does (cut, or extended with a hole), and makes it
    /// durable. Answered `StatReply` with the file as it is then.
    Truncate {
        /// The file's path.
        path: Vec<u8>,
        /// Its new length.
        size: u64,
    },
}

/// A module as `ListModules` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Its name.
    pub name: String,
    /// The configuration's comment, or empty.
    pub comment: String,
    /// The client may write to it.
    pub write: bool,
}

/// Signature entries whose ids are the first `id_bytes` bytes of each
/// chunk's BLAKE3: as many as the chunk counts on both sides need, so that
/// a false match (found by the whole file's hash, and paid for by sending
/// the file again) stays rare.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShortIds {
    /// Bytes per id, 1 to 8.
    pub id_bytes: u8,
    /// The ids, `id_bytes` each, in chunk order.
    pub ids: Vec<u8>,
    /// Each chunk's length.
    pub lens: Vec<u32>,
}

impl ShortIds {
    /// `(id, len)` per chunk, each id in the low bytes of a little-endian
    /// `u64`; `None` when the ids do not divide into `lens.len()` ids of
    /// 1 to 8 bytes.
    pub fn entries(&self) -> Option<Vec<(u64, u32)>> {
        let n = usize::from(self.id_bytes);
        if !(1..=8).contains(&n) || self.ids.len() != self.lens.len().checked_mul(n)? {
            return None;
        }
        let ids = self.ids.chunks_exact(n).map(|b| {
            let mut id = [0u8; 8];
            id[..n].copy_from_slice(b);
            u64::from_le_bytes(id)
        });
        Some(ids.zip(self.lens.iter().copied()).collect())
    }

    /// `entries` with each id cut to its first `id_bytes` bytes (1 to 8).
    pub fn new(id_bytes: u8, entries: &[(u64, u32)]) -> ShortIds {
        let n = usize::from(id_bytes.clamp(1, 8));
        ShortIds {
            id_bytes: n as u8,
            ids: entries
                .iter()
                .flat_map(|&(id, _)| id.to_le_bytes().into_iter().take(n))
                .collect(),
            lens: entries.iter().map(|&(_, len)| len).collect(),
        }
    }
}

/// One part of a [`Msg::WriteDelta`] recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WirePiece {
    /// `len` bytes copied from the basis at `offset`.
    Copy {
        /// Where in the basis.
        offset: u64,
        /// How many bytes.
        len: u32,
    },
    /// The next `len` literal bytes.
    Literal {
        /// How many bytes.
        len: u32,
    },
}

/// A [`Msg::Login`] request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// The module to use.
    pub module: String,
    /// The client intends to write.
    pub write: bool,
    /// Proof of a token, bound to the daemon's key and this TLS session
    /// (tern-net's `proof::token_proof`).
    pub proof: Option<[u8; 32]>,
    /// A ticket from this daemon, for the module, bound to the client's key.
    pub ticket: Option<Ticket>,
}

/// A daemon's grant to another daemon (the holder) to read part of a
/// module on a client's behalf, MAC'd with a key only the granting daemon
/// has; it checks every field when the holder presents it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The module.
    pub module: String,
    /// The module-relative path that may be read, and all under it.
    pub path: Vec<u8>,
    /// Fingerprint of the key the holder must present.
    pub holder: String,
    /// Unix time, in seconds, after which the ticket is refused.
    pub expires: u64,
    /// The granting daemon's MAC over the fields above (tern-net's
    /// `proof::ticket_mac`).
    pub mac: [u8; 32],
}

/// A [`Msg::Walk`] request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Walk {
    /// Module-relative path of the tree's top.
    pub path: Vec<u8>,
    /// Filter rules in order: (pattern, include); excluded directories are
    /// not entered.
    pub rules: Vec<(Vec<u8>, bool)>,
    /// What the filter sees for the walk's top: the entry `a/b` under it
    /// is matched as `PREFIX/a/b`.
    pub prefix: Vec<u8>,
    /// Resume a walk: leave out every directory that sorts before this one
    /// (relative to `path`; empty: nothing left out).
    pub from: Vec<u8>,
}

/// One file's outcome in a [`Msg::Hashes`] reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashOutcome {
    /// The file's BLAKE3.
    Hash([u8; 32]),
    /// Why it could not be hashed.
    Failed(ErrorMsg),
}

/// A [`Msg::Commit`] request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// Handle from `Create`.
    pub handle: u64,
    /// Number of `Write`s the client sent for the handle.
    pub writes: u64,
    /// Final metadata.
    pub meta: WireMeta,
    /// Also set owner and group.
    pub owner: bool,
    /// Extended attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Make the file durable first.
    pub sync: bool,
    /// Read it back and check this whole-file BLAKE3 first.
    pub verify: Option<[u8; 32]>,
}

/// A transfer for a daemon to run from other daemons into its module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// What to transfer, and where each lands.
    pub sources: Vec<PullSource>,
    /// How.
    pub opts: RunOptions,
    /// 0: auto, 1: QUIC, 2: TCP.
    pub transport: u8,
}

/// One source of a [`PullRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullSource {
    /// Host name or address, as the client named it.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Module on that daemon.
    pub module: String,
    /// Path inside the module.
    pub path: Vec<u8>,
    /// The source daemon's key fingerprint, as the client verified it: the
    /// server must see the same one.
    pub fingerprint: String,
    /// Where it lands, relative to the session module's root.
    pub dst_rel: Vec<u8>,
}

/// The engine options of a delegated run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunOptions {
    /// Compare only (`tern check`).
    pub check: bool,
    /// Delete what the source does not have.
    pub delete: bool,
    /// Change nothing.
    pub dry_run: bool,
    /// Decide by content.
    pub checksum: bool,
    /// Filter rules in order: (pattern, include).
    pub rules: Vec<(Vec<u8>, bool)>,
    /// Worker threads.
    pub jobs: u32,
    /// fsync before rename.
    pub fsync: bool,
    /// Read back and hash before commit.
    pub verify: bool,
    /// Chunk size.
    pub chunk_size: u64,
    /// Preserve hard links.
    pub hard_links: bool,
    /// Preserve extended attributes.
    pub xattrs: bool,
    /// Bytes per second, if limited.
    pub bwlimit: Option<u64>,
}

/// Options of a delegated run added after [`RunOptions`] ([`Msg::PullWith`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullExtra {
    /// Send changed files as deltas (off with `--whole-file`).
    pub delta: bool,
    /// Compression between the daemons: 0 never, 1 auto, 2 always.
    pub compress: u8,
}

impl Default for PullExtra {
    /// What a [`Msg::PullTicketed`] means: delta on, compression auto.
    fn default() -> Self {
        PullExtra {
            delta: true,
            compress: 1,
        }
    }
}

/// What a delegated run did, as it does it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunEvent {
    /// More work planned.
    Planned {
        /// Files.
        files: u64,
        /// Bytes.
        bytes: u64,
    },
    /// The scan ended.
    ScanDone,
    /// Bytes transferred (or found in place) since the last event.
    Progress(u64),
    /// Files finished since the last event.
    FilesDone(u64),
    /// An action on a path (relative to the destination root).
    Action {
        /// The action's name, as in `--json` output.
        action: String,
        /// Path.
        path: Vec<u8>,
        /// Size.
        size: u64,
    },
    /// A failure; the run goes on.
    Failed {
        /// Path concerned, if any.
        path: Option<Vec<u8>>,
        /// What went wrong.
        message: String,
    },
}

/// An authentication request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// The module to use.
    pub module: String,
    /// A token, if the client has one (it may also be known by its key).
    pub token: Option<String>,
    /// The client intends to write.
    pub write: bool,
}

/// The server's answer to `Auth` or `Join`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Session id, for `Join` on more streams.
    pub session: u64,
    /// Secret that must accompany `session`.
    pub secret: [u8; 32],
    /// The client may write.
    pub writable: bool,
    /// The server's chunk-size limit for one `Read` or `Write`.
    pub max_chunk: u64,
    /// The server can set owners (it runs privileged).
    pub can_chown: bool,
}

/// Kind of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Device, FIFO, socket.
    Special,
}

/// Metadata of an entry; times are (seconds, nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMeta {
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: (i64, u32),
    /// Access time.
    pub atime: (i64, u32),
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Name (bytes, no `/`).
    pub name: Vec<u8>,
    /// Kind.
    pub kind: WireKind,
    /// Size of a file.
    pub size: u64,
    /// Metadata.
    pub meta: WireMeta,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// (device, inode) on the server, to find hard links.
    pub file_id: Option<(u64, u64)>,
    /// Link count.
    pub nlink: u64,
    /// Bytes allocated.
    pub allocated: u64,
    /// Status change time.
    pub changed: (i64, u32),
}

/// What a file about to be written will be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSpec {
    /// Final size.
    pub size: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// Keep a resume journal.
    pub resumable: bool,
    /// Will be synced before publishing.
    pub durable: bool,
    /// Source metadata (the version's identity).
    pub source_meta: WireMeta,
    /// Source ctime.
    pub source_changed: (i64, u32),
}

/// One chunk of a file being written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteChunk {
    /// Handle from `Create`.
    pub handle: u64,
    /// Chunk index.
    pub index: u64,
    /// Offset in the file.
    pub offset: u64,
    /// Chunk length, holes included.
    pub len: u64,
    /// Ranges within the chunk that are zeros and not sent.
    pub holes: Vec<(u64, u64)>,
    /// BLAKE3 chaining value of the whole chunk at its offset; the server
    /// recomputes it before writing. For a file of one chunk it is the
    /// file's BLAKE3 hash.
    pub cv: [u8; 32],
}

/// Several small files or symlinks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The items.
    pub items: Vec<BatchItem>,
    /// Set owners.
    pub owner: bool,
    /// Make the files durable before publishing them.
    pub sync: bool,
    /// Read each file back and check its hash before publishing.
    pub verify: bool,
}

/// One entry of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    /// Module-relative path.
    pub path: Vec<u8>,
    /// Metadata to apply.
    pub meta: WireMeta,
    /// What to create.
    pub body: BatchBody,
}

/// What a batch item creates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchBody {
    /// A regular file of `size` bytes; its bytes less `holes` are in the
    /// batch's data.
    File {
        /// File length.
        size: u64,
        /// Zero ranges not sent.
        holes: Vec<(u64, u64)>,
        /// The file's BLAKE3.
        hash: [u8; 32],
        /// Extended attributes.
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        /// Source ctime.
        changed: (i64, u32),
    },
    /// A symlink.
    Symlink {
        /// Target.
        target: Vec<u8>,
    },
    /// A regular file built from the module's file at the same path by its
    /// recipe (feature [`FEATURE_BATCH_DELTA`]); its literal bytes are in
    /// the batch's data.
    Delta(WireDelta),
    /// [`BatchBody::Delta`] built from the module's file at `basis`, one
    /// written earlier in the run, not from the file at the item's path
    /// (feature [`FEATURE_BATCH_COPIES`]): a copy of it, when the recipe
    /// copies it whole.
    DeltaFrom {
        /// Module-relative path of the file to build from.
        basis: Vec<u8>,
        /// What to build.
        delta: WireDelta,
    },
}

/// A file of a batch built by a recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDelta {
    /// File length.
    pub size: u64,
    /// The recipe, the whole file as one chunk, at most [`MAX_PIECES`].
    pub pieces: Vec<WirePiece>,
    /// Bytes of its literal pieces.
    pub literal: u64,
    /// The file's BLAKE3.
    pub hash: [u8; 32],
    /// Extended attributes.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Source ctime.
    pub changed: (i64, u32),
}

/// What a side speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// Lowest version spoken.
    pub version_min: u16,
    /// Highest version spoken.
    pub version_max: u16,
    /// Feature bits offered.
    pub features: u64,
    /// Free text naming the software, for logs ("tern 0.1.0").
    pub agent: String,
}

impl Hello {
    /// This build's Hello.
    pub fn ours(agent: &str) -> Hello {
        Hello {
            magic: MAGIC,
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            features: FEATURES,
            agent: agent.into(),
        }
    }
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The version both speak, the highest such.
    pub version: u16,
    /// Features both offer.
    pub features: u64,
}

/// Picks the highest common version and the common features.
pub fn negotiate(ours: &Hello, theirs: &Hello) -> Result<Agreed, ProtoError> {
    if theirs.magic != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let version = ours.version_max.min(theirs.version_max);
    if version < ours.version_min.max(theirs.version_min) || theirs.version_min > theirs.version_max {
        return Err(ProtoError::NoCommonVersion {
            ours_min: ours.version_min,
            ours_max: ours.version_max,
            theirs_min: theirs.version_min,
            theirs_max: theirs.version_max,
        });
    }
    Ok(Agreed {
        version,
        features: ours.features & theirs.features,
    })
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or unexpected message.
    Protocol,
    /// Authentication failed or missing.
    Unauthorized,
    /// Authenticated, but not allowed to do this.
    Forbidden,
    /// No such module or path.
    NotFound,
    /// The server could not do it (disk full, I/O error...).
    Server,
    /// The source file vanished.
    Vanished,
    /// The source file changed while being read.
    Changed,
    /// An entry of another kind is in the way.
    Conflict,
    /// Another writer holds the file.
    Busy,
    /// Data did not hash to what it should.
    Corrupt,
    /// The server is shutting down or overloaded; retry later.
    Unavailable,
}

/// An error sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Category.
    pub code: ErrorCode,
    /// One line for the user, without the path.
    pub message: String,
}

impl ErrorMsg {
    /// An error of `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorMsg {
        ErrorMsg {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u16, max: u16, features: u64) -> Hello {
        Hello {
            magic: MAGIC,
            version_min: min,
            version_max: max,
            features,
            agent: "t".into(),
        }
    }

    #[test]
    fn a_newer_peer_is_met_at_our_highest_version() {
        let ours = hello(1, 1, 0b011);
        let newer = hello(1, 5, 0b110 | 1 << 40);
        let a = negotiate(&ours, &newer).expect("common version");
        assert_eq!(a.version, 1);
        assert_eq!(a.features, 0b010);
        // Symmetric: the newer side picks the older one's version too.
        assert_eq!(negotiate(&newer, &ours).expect("common").version, 1);
    }

    #[test]
    fn no_overlap_and_bad_magic_are_refused() {
        assert!(matches!(
            negotiate(&hello(1, 2, 0), &hello(3, 4, 0)),
            Err(ProtoError::NoCommonVersion { .. })
        ));
        assert!(matches!(
            negotiate(&hello(3, 4, 0), &hello(1, 2, 0)),
            Err(ProtoError::NoCommonVersion { .. })
        ));
        let mut h = hello(1, 1, 0);
        h.magic = *b"RSYN";
        assert_eq!(negotiate(&hello(1, 1, 0), &h), Err(ProtoError::BadMagic));
        assert!(negotiate(&hello(1, 1, 0), &hello(2, 1, 0)).is_err(), "inverted range");
    }

    #[test]
    fn short_ids_keep_their_low_bytes_and_refuse_a_ragged_list() {
        let e = [(0x0807_0605_0403_0201u64, 4096u32), (0x1817_1615_1413_1211, 100)];
        let s = ShortIds::new(3, &e);
        assert_eq!(s.ids, [1, 2, 3, 0x11, 0x12, 0x13]);
        assert_eq!(s.entries(), Some(vec![(0x03_0201, 4096), (0x13_1211, 100)]));
        assert_eq!(ShortIds::new(8, &e).entries(), Some(e.to_vec()));
        let ragged = ShortIds {
            id_bytes: 3,
            ids: vec![1, 2],
            lens: vec![7],
        };
        assert_eq!(ragged.entries(), None);
        let wide = ShortIds {
            id_bytes: 9,
            ids: vec![0; 9],
            lens: vec![7],
        };
        assert_eq!(wide.entries(), None);
        let none = ShortIds {
            id_bytes: 0,
            ids: vec![],
            lens: vec![7],
        };
        assert_eq!(none.entries(), None);
    }
}
