//! Conversions between the engine's types and the wire's.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use tern_core::delta::{Piece, Signature};
use tern_core::{Entry, Error, FileSpec, Kind, Meta, Time, Xattrs};
use tern_proto::{ErrorCode, ErrorMsg, Msg, ShortIds, WireEntry, WireKind, WireMeta, WireSpec};

use crate::error::{NetError, Result};
use crate::stream::Stream;

/// A path as bytes.
pub fn path_bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

/// Bytes as a path.
pub fn bytes_path(b: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(b.to_vec()))
}

fn time(t: Time) -> (i64, u32) {
    (t.sec, t.nsec)
}

fn untime((sec, nsec): (i64, u32)) -> Time {
    Time {
        sec,
        nsec: nsec.min(999_999_999),
    }
}

/// Engine metadata to wire.
pub fn meta(m: &Meta) -> WireMeta {
    WireMeta {
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        mtime: time(m.mtime),
        atime: time(m.atime),
    }
}

/// Wire metadata to engine.
pub fn unmeta(m: &WireMeta) -> Meta {
    Meta {
        mode: m.mode & 0o7777,
        uid: m.uid,
        gid: m.gid,
        mtime: untime(m.mtime),
        atime: untime(m.atime),
    }
}

/// Engine kind to wire.
pub fn kind(k: Kind) -> WireKind {
    match k {
        Kind::File => WireKind::File,
        Kind::Dir => WireKind::Dir,
        Kind::Symlink => WireKind::Symlink,
        Kind::Special => WireKind::Special,
    }
}

/// Wire kind to engine.
pub fn unkind(k: WireKind) -> Kind {
    match k {
        WireKind::File => Kind::File,
        WireKind::Dir => Kind::Dir,
        WireKind::Symlink => Kind::Symlink,
        WireKind::Special => Kind::Special,
    }
}

/// Engine entry to wire.
pub fn entry(e: &Entry) -> WireEntry {
    WireEntry {
        name: e.name.as_bytes().to_vec(),
        kind: kind(e.kind),
        size: e.size,
        meta: meta(&e.meta),
        target: e.target.as_deref().map(path_bytes),
        file_id: e.file_id,
        nlink: e.nlink,
        allocated: e.allocated,
        changed: time(e.changed),
    }
}

/// Wire entry to engine. Names with a `/` or NUL, or empty ones, are
/// refused: a listing must never name anything but a child.
pub fn unentry(w: WireEntry) -> Option<Entry> {
    if w.name.is_empty() {
        return None;
    }
    unentry_any_name(w)
}

/// Like [`unentry`], but an empty name is allowed (a root's).
pub fn unentry_any_name(w: WireEntry) -> Option<Entry> {
    if w.name.contains(&b'/') || w.name.contains(&0) || w.name == b"." || w.name == b".." {
        return None;
    }
    Some(Entry {
        name: OsString::from_vec(w.name),
        kind: unkind(w.kind),
        size: if w.kind == WireKind::File { w.size } else { 0 },
        meta: unmeta(&w.meta),
        target: w.target.map(|t| bytes_path(&t)),
        file_id: w.file_id,
        nlink: w.nlink,
        allocated: w.allocated,
        changed: untime(w.changed),
    })
}

/// Engine file spec to wire.
pub fn spec(s: &FileSpec) -> WireSpec {
    WireSpec {
        size: s.size,
        chunk_size: s.chunk_size,
        resumable: s.resumable,
        durable: s.durable,
        source_meta: meta(&s.source_meta),
        source_changed: time(s.source_changed),
    }
}

/// Wire file spec to engine.
pub fn unspec(s: &WireSpec) -> FileSpec {
    FileSpec {
        size: s.size,
        chunk_size: s.chunk_size,
        resumable: s.resumable,
        durable: s.durable,
        source_meta: unmeta(&s.source_meta),
        source_changed: untime(s.source_changed),
    }
}

/// Extended attributes to wire.
pub fn xattrs(x: &Xattrs) -> Vec<(Vec<u8>, Vec<u8>)> {
    x.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.clone())).collect()
}

/// Wire extended attributes to engine.
pub fn unxattrs(x: Vec<(Vec<u8>, Vec<u8>)>) -> Xattrs {
    x.into_iter().map(|(n, v)| (OsString::from_vec(n), v)).collect()
}

/// An engine error as sent to the peer: the path is left out (the peer
/// knows which path it asked about, and names it its own way).
pub fn error_msg(e: &Error) -> ErrorMsg {
    let code = match e {
        Error::Vanished(_) => ErrorCode::Vanished,
        Error::Changed(_) => ErrorCode::Changed,
        Error::TypeConflict { .. } => ErrorCode::Conflict,
        Error::Busy(_) => ErrorCode::Busy,
        Error::VerifyFailed { .. } => ErrorCode::Corrupt,
        Error::Interrupted => ErrorCode::Unavailable,
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied => ErrorCode::Forbidden,
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorCode::NotFound,
        _ => ErrorCode::Server,
    };
    ErrorMsg::new(code, e.detail())
}

/// A peer's error about `shown` as an engine error.
pub fn unerror(m: ErrorMsg, shown: PathBuf) -> Error {
    match m.code {
        ErrorCode::Vanished => Error::Vanished(shown),
        ErrorCode::Changed => Error::Changed(shown),
        ErrorCode::Busy => Error::Busy(shown),
        _ => Error::Other {
            path: shown,
            message: m.message,
        },
    }
}

/// A recipe piece on the wire.
pub fn piece(p: tern_core::delta::Piece) -> tern_proto::WirePiece {
    match p {
        tern_core::delta::Piece::Copy { offset, len } => tern_proto::WirePiece::Copy { offset, len },
        tern_core::delta::Piece::Literal { len } => tern_proto::WirePiece::Literal { len },
    }
}

/// A recipe piece from the wire.
pub fn unpiece(p: tern_proto::WirePiece) -> tern_core::delta::Piece {
    match p {
        tern_proto::WirePiece::Copy { offset, len } => tern_core::delta::Piece::Copy { offset, len },
        tern_proto::WirePiece::Literal { len } => tern_core::delta::Piece::Literal { len },
    }
}

/// A signature entry on the wire: its id as fixed bytes.
pub fn id((id, len): (u64, u32)) -> ([u8; 8], u32) {
    (id.to_le_bytes(), len)
}

/// A signature entry from the wire.
pub fn unid((id, len): ([u8; 8], u32)) -> (u64, u32) {
    (u64::from_le_bytes(id), len)
}

/// A recipe from the wire for a chunk of `len` bytes, and the literal
/// bytes it takes; `None` when it has more than [`tern_proto::MAX_PIECES`]
/// pieces or does not add up to `len`.
pub fn unrecipe(pieces: Vec<tern_proto::WirePiece>, len: u64) -> Option<(Vec<Piece>, u64)> {
    if pieces.len() > tern_proto::MAX_PIECES {
        return None;
    }
    let pieces: Vec<Piece> = pieces.into_iter().map(unpiece).collect();
    let total = pieces.iter().try_fold(0u64, |n, p| n.checked_add(p.len()))?;
    let literal = pieces
        .iter()
        .filter(|p| matches!(p, Piece::Literal { .. }))
        .map(Piece::len)
        .sum();
    (total == len).then_some((pieces, literal))
}

/// Sends `sig` as [`Msg::Signature`] parts, or one empty part for none:
/// as [`Msg::ShortSignature`] parts, each id cut to what a new version of
/// `new_size` bytes needs, where the peer takes them.
pub fn send_signature(s: &mut Stream, sig: Option<&Signature>, new_size: u64) -> Result<()> {
    let sig = sig.filter(|g| !g.chunks.is_empty() && g.chunks.len() <= tern_core::delta::MAX_SIGNATURE_CHUNKS);
    let short = s.has(tern_proto::FEATURE_SHORT_IDS);
    let Some(sig) = sig else {
        return s.send(&Msg::Signature {
            avg: 0,
            chunks: Vec::new(),
            last: true,
        });
    };
    let id_bytes = sig.id_bytes_for(new_size);
    let parts = sig.chunks.chunks(tern_proto::SIGNATURE_PART);
    let n = parts.len();
    for (i, part) in parts.enumerate() {
        let last = i + 1 == n;
        s.send(&match short {
            true => Msg::ShortSignature {
                avg: sig.avg,
                chunks: ShortIds::new(id_bytes, part),
                last,
            },
            false => Msg::Signature {
                avg: sig.avg,
                chunks: part.iter().map(|&c| id(c)).collect(),
                last,
            },
        })?;
    }
    Ok(())
}

/// A signature part's entries from the wire, with the bytes of each id that
/// count; `None` when its ids are malformed.
pub fn sig_part(chunks: SigPart) -> Option<(Vec<(u64, u32)>, u8)> {
    match chunks {
        SigPart::Full(c) => Some((c.into_iter().map(unid).collect(), 8)),
        SigPart::Short(c) => Some((c.entries()?, c.id_bytes)),
    }
}

/// The entries of a signature part as they crossed.
pub enum SigPart {
    /// Eight bytes per id ([`Msg::Signature`], [`Msg::DeltaBasis`]).
    Full(Vec<([u8; 8], u32)>),
    /// Ids cut short ([`Msg::ShortSignature`], [`Msg::ShortDeltaBasis`]).
    Short(ShortIds),
}

impl SigPart {
    /// How many chunks the part holds.
    pub fn len(&self) -> usize {
        match self {
            SigPart::Full(c) => c.len(),
            SigPart::Short(c) => c.lens.len(),
        }
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Receives what [`send_signature`] sent: at most `max` entries, each
/// part's count given to `take` before the part is kept (a daemon charges
/// its memory there). `None` for no signature.
pub fn recv_signature(
    s: &mut Stream,
    max: usize,
    take: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<Option<Signature>> {
    let malformed = |m: &str| NetError::Proto(tern_proto::ProtoError::Malformed(m.into()));
    let mut sig = Signature::default();
    loop {
        let (avg, chunks, last) = match s.recv()? {
            Msg::Signature { avg, chunks, last } => (avg, SigPart::Full(chunks), last),
            Msg::ShortSignature { avg, chunks, last } => (avg, SigPart::Short(chunks), last),
            _ => return Err(malformed("expected a signature")),
        };
        if chunks.len() > tern_proto::SIGNATURE_PART
            || sig.chunks.len() + chunks.len() > max
            || (!sig.chunks.is_empty() && avg != sig.avg)
            || (!chunks.is_empty() && !(tern_core::delta::Params { avg }).valid())
        {
            return Err(malformed(
                "a signature too large, of mixed parts, or of a chunk size tern does not cut with",
            ));
        }
        take(chunks.len())?;
        let first = sig.chunks.is_empty();
        let Some((entries, id_bytes)) = sig_part(chunks) else {
            return Err(malformed("a signature whose ids do not divide into its chunks"));
        };
        if !entries.is_empty() {
            if !first && id_bytes != sig.id_bytes {
                return Err(malformed("a signature of mixed parts"));
            }
            sig.avg = avg;
            sig.id_bytes = id_bytes;
        }
        sig.chunks.extend(entries);
        if last {
            return Ok((!sig.chunks.is_empty()).then_some(sig));
        }
    }
}
