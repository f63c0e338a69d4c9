//! tern's wire format, free of I/O ("sans-IO"): the caller moves bytes, this
//! crate turns them into frames and messages and back.
//!
//! A connection carries frames. Each frame is a fixed 12-byte header and a
//! payload:
//!
//! ```text
//! offset size field
//! 0      4    payload length (u32, little-endian), at most the decoder's limit
//! 4      1    kind: 0 = control message, 1 = data
//! 5      1    flags: bit 0 = last frame of its channel
//! 6      2    reserved, must be 0
//! 8      4    channel (u32, little-endian): which request a frame belongs to
//! ```
//!
//! Control payloads are [`Msg`]s in postcard's compact serde encoding. Data
//! payloads are file bytes, never re-encoded: a writer sends the header and
//! then the bytes straight from its buffer.
//!
//! Every connection starts with a [`Hello`] from each side; [`negotiate`]
//! picks the highest protocol version both speak and the features both have,
//! so a newer client still talks to an older daemon. A client sends its
//! Hello and the stream's second message ([`Auth`], [`Login`] or
//! `Join`) together, before it reads anything: a daemon may wait for both
//! before it serves the stream, each at most 4 KiB.

mod frame;
mod msg;

pub use frame::{
    data_header, decode_control, encode_control, Decoder, Frame, FrameHeader, FrameKind, DEFAULT_MAX_PAYLOAD,
    FLAG_LAST, HEADER_LEN, MAX_INFLATED,
};
pub use msg::{
    negotiate, Agreed, Auth, Batch, BatchBody, BatchItem, Commit, ErrorCode, ErrorMsg, HashOutcome, Hello, Login,
    ModuleInfo, Msg, PullExtra, PullRequest, PullSource, RunEvent, RunOptions, ShortIds, Ticket, Walk, Welcome,
    WireDelta, WireEntry, WireKind, WireMeta, WirePiece, WireSpec, WriteChunk, BENCH_BLOCK, BENCH_MAX_BYTES, FEATURES,
    FEATURE_BACKUP, FEATURE_BATCH_COPIES, FEATURE_BATCH_DELTA, FEATURE_BENCH, FEATURE_COPIES, FEATURE_DELTA,
    FEATURE_MODULES, FEATURE_PULL, FEATURE_RENAME, FEATURE_SHORT_IDS, FEATURE_TCP_BBR, FEATURE_TRUNCATE, FEATURE_ZSTD,
    FEATURE_ZSTD_ALWAYS, MAGIC, MAX_BATCH_FILES, MAX_PIECES, SIGNATURE_PART, TICKET_LIFETIME, VERSION_LOGIN,
    VERSION_MAX, VERSION_MIN, VERSION_PIPELINE,
};

/// A violation of the protocol by the peer (or a bug in the caller).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// A frame announced a payload larger than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// Reserved header bits were set.
    #[error("reserved header bits set")]
    Reserved,
    /// A control payload did not decode as a message.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// The peer is not speaking tern.
    #[error("not a tern peer (bad magic)")]
    BadMagic,
    /// No protocol version in common.
    #[error("no common protocol version: we speak {ours_min}..={ours_max}, peer speaks {theirs_min}..={theirs_max}")]
    NoCommonVersion {
        /// Our lowest version.
        ours_min: u16,
        /// Our highest version.
        ours_max: u16,
        /// Peer's lowest version.
        theirs_min: u16,
        /// Peer's highest version.
        theirs_max: u16,
    },
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({0} bytes left over)")]
    Truncated(usize),
}
