//! Structure-aware: an authenticated client sending well-framed sequences
//! of requests built from the input (paths from a vocabulary of traps:
//! `..`, absolute paths, NUL bytes, tern's temporary names, a symlink to
//! outside; handles that exist or not; chunks whose hash is right or
//! wrong), against a real daemon whose open-file budget is small. Nothing
//! may panic or hang, and nothing outside the module may change.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tern_net::server::Server;
use tern_proto::{
    data_header, encode_control, Auth, Batch, BatchBody, BatchItem, Hello, Msg, ShortIds, WireDelta, WireEntry,
    WireKind, WireMeta, WireSpec, WriteChunk,
};

/// One component of a path.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Part {
    Sub,
    F,
    New,
    Dir,
    DotDot,
    Dot,
    Empty,
    Out,
    Tmp,
    Journal,
    Nul,
    Long,
    Abs,
    Name(u8),
}

#[derive(Arbitrary, Debug)]
struct P(Vec<Part>);

impl P {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, p) in self.0.iter().take(6).enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            match p {
                Part::Sub => out.extend_from_slice(b"sub"),
                Part::F => out.extend_from_slice(b"f"),
                Part::New => out.extend_from_slice(b"new"),
                Part::Dir => out.extend_from_slice(b"dir"),
                Part::DotDot => out.extend_from_slice(b".."),
                Part::Dot => out.extend_from_slice(b"."),
                Part::Empty => {}
                Part::Out => out.extend_from_slice(b"out"),
                Part::Tmp => out.extend_from_slice(b".new.tern.tmp"),
                Part::Journal => out.extend_from_slice(b".new.tern.journal"),
                Part::Nul => out.extend_from_slice(b"a\0b"),
                Part::Long => out.extend(std::iter::repeat_n(b'x', 300)),
                Part::Abs => out.extend_from_slice(b"/tmp"),
                Part::Name(n) => out.extend_from_slice(format!("n{}", n % 8).as_bytes()),
            }
        }
        out
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Stat(P),
    ReadDir(P),
    MakeDir(P),
    Remove(P),
    Create {
        h: u8,
        p: P,
        size: u16,
        chunk_shift: u8,
        resumable: bool,
    },
    Write {
        h: u8,
        index: u8,
        chunk_shift: u8,
        len: u16,
        fill: u8,
        hole: bool,
        good: bool,
    },
    FileMeta {
        h: u8,
        writes: u8,
        mode: u16,
    },
    Sync(u8),
    Verify {
        h: u8,
        hash: [u8; 4],
    },
    Publish {
        h: u8,
        writes: u8,
    },
    Abort {
        h: u8,
        keep: bool,
    },
    Symlink {
        p: P,
        target: P,
    },
    HardLink {
        from: P,
        to: P,
    },
    SetMeta {
        p: P,
        dir: bool,
        mode: u16,
    },
    Barrier,
    Batch(Vec<(P, u8, bool, bool)>),
    OpenRead {
        h: u8,
        p: P,
        size: u16,
        real_mtime: bool,
    },
    Read {
        h: u8,
        offset: u16,
        len: u16,
    },
    Ranges {
        h: u8,
        offset: u16,
        len: u16,
    },
    CheckUnchanged(u8),
    CloseRead(u8),
    Hash(P),
    // The pipelined requests of protocol version 2.
    Walk {
        p: P,
        rule: Option<(P, bool)>,
        prefix: P,
        from: P,
    },
    ReadFiles {
        items: Vec<(P, u16, bool)>,
        xattrs: bool,
    },
    HashFiles(Vec<(P, u16)>),
    /// From here on this stream's changes are queued.
    OpsStream,
    After(u8),
    Settle,
    Commit {
        h: u8,
        writes: u8,
        mode: u16,
        sync: bool,
        verify: Option<[u8; 4]>,
    },
    /// A ticket for a holder (a real-looking fingerprint or garbage).
    GrantTicket {
        p: P,
        fingerprint: bool,
    },
    /// A pull with a forged ticket (its MAC guessed).
    PullTicketed {
        p: P,
        dst: P,
        mac: [u8; 4],
        check: bool,
    },
    /// The signature of a handle's basis.
    BasisSignature(u8),
    /// Another file as a handle's basis.
    UseBasis(u8, P),
    /// A signature part for a file open for reading (plans it when last).
    DeltaBasis {
        h: u8,
        avg_shift: u8,
        chunks: Vec<(u8, u16)>,
        ids: Ids,
        last: bool,
        size: u32,
        chunk_shift: u8,
    },
    /// A chunk of a planned file.
    ReadDelta {
        h: u8,
        index: u8,
    },
    /// A chunk built from the basis: copies anywhere, literals of any
    /// length, the literal bytes sent as announced or not.
    WriteDelta {
        h: u8,
        index: u8,
        chunk_shift: u8,
        pieces: Vec<(bool, u16, u16)>,
        sent: u16,
        fill: u8,
    },
    /// The frames since the last container (or the login) go in a zstd
    /// container: all of them, or cut at `cut` bytes, mid-frame.
    Pack {
        cut: u16,
    },
    /// The signatures of old versions a batch will replace.
    BasisSignatures(Vec<(P, u16)>),
    /// Small files read as deltas: basis flags (as many as the files or
    /// not), each flagged item's signature part following.
    ReadFilesDelta {
        items: Vec<(P, u16, bool)>,
        bases: Vec<bool>,
        avg_shift: u8,
        chunks: Vec<(u8, u16)>,
        ids: Ids,
        xattrs: bool,
    },
    /// A batch of files built from their old versions: any recipe, the
    /// literal bytes as announced or not, the hash right or not.
    BatchDelta(Vec<(P, Vec<(bool, u16, u16)>, u16, u8, bool, Option<P>)>),
    /// Backups from now on: in a directory or beside the file, with a
    /// suffix of tern's temporary names, none, a slash or a plain one.
    Backup {
        dir: Option<P>,
        base: P,
        suffix: u8,
    },
    /// An entry renamed anywhere, onto anything.
    Rename {
        from: P,
        to: P,
    },
    /// Any entry's length set, up to 16 MiB (past that the daemon only
    /// writes zeros for longer).
    Truncate {
        path: P,
        size: u32,
    },
}

/// How a signature's ids cross: eight bytes each, or cut to any number of
/// bytes (none and more than eight included), the id bytes whole or one
/// short.
#[derive(Arbitrary, Debug)]
struct Ids {
    full: bool,
    id_bytes: u8,
    ragged: bool,
}

impl Ids {
    /// Signature entries `chunks` as `Ids` says they cross.
    fn part(&self, chunks: &[(u8, u16)]) -> SigPart {
        let entries: Vec<(u64, u32)> = chunks
            .iter()
            .take(64)
            .map(|&(id, len)| (u64::from_le_bytes([id; 8]), u32::from(len)))
            .collect();
        if self.full {
            return SigPart::Full(entries.iter().map(|&(id, len)| (id.to_le_bytes(), len)).collect());
        }
        let mut short = ShortIds::new(self.id_bytes % 8 + 1, &entries);
        short.id_bytes = self.id_bytes % 10;
        if self.ragged {
            short.ids.pop();
        }
        SigPart::Short(short)
    }

    /// A signature part of `chunks` for `ReadFilesDelta`.
    fn signature(&self, avg: u32, chunks: &[(u8, u16)]) -> Msg {
        match self.part(chunks) {
            SigPart::Full(chunks) => Msg::Signature {
                avg,
                chunks,
                last: true,
            },
            SigPart::Short(chunks) => Msg::ShortSignature {
                avg,
                chunks,
                last: true,
            },
        }
    }
}

/// A signature part's entries, as [`Ids`] makes them.
enum SigPart {
    Full(Vec<([u8; 8], u32)>),
    Short(ShortIds),
}

/// Recipe pieces: copies anywhere, literals of any length.
fn recipe(v: &[(bool, u16, u16)]) -> Vec<tern_proto::WirePiece> {
    v.iter()
        .take(32)
        .map(|&(copy, at, len)| match copy {
            true => tern_proto::WirePiece::Copy {
                offset: u64::from(at),
                len: u32::from(len),
            },
            false => tern_proto::WirePiece::Literal { len: u32::from(len) },
        })
        .collect()
}

fn pieces_len(pieces: &[tern_proto::WirePiece]) -> u64 {
    pieces
        .iter()
        .map(|p| match *p {
            tern_proto::WirePiece::Copy { len, .. } | tern_proto::WirePiece::Literal { len } => u64::from(len),
        })
        .sum()
}

fn entry(name: &[u8], size: u64, real_mtime: bool) -> WireEntry {
    tern_fuzz::file_entry(name, size, if real_mtime { tern_fuzz::FIXTURE_MTIME } else { 7 })
}

/// Metadata with only the permission bits set.
fn mode_only(mode: u16) -> WireMeta {
    WireMeta {
        mode: u32::from(mode),
        ..WireMeta::default()
    }
}

fn chunk_size(shift: u8) -> u64 {
    tern_core::hash::MIN_CHUNK_SIZE << (shift % 4)
}

/// The input as the bytes a client would send.
fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    let msg = |m: Msg, out: &mut Vec<u8>| {
        let _ = encode_control(0, &m, out);
    };
    let data = |d: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&data_header(d.len() as u32, true));
        out.extend_from_slice(d);
    };
    msg(Msg::Hello(Hello::ours("fuzz")), &mut out);
    msg(
        Msg::Auth(Auth {
            module: "data".into(),
            token: Some("t".into()),
            write: true,
        }),
        &mut out,
    );
    let mut mark = out.len();
    for op in ops.iter().take(64) {
        let m = match op {
            Op::Pack { cut } => {
                let body = out.split_off(mark);
                let n = match *cut as usize {
                    0 => body.len(),
                    c => c % (body.len() + 1),
                };
                let packed = zstd::bulk::compress(&body[..n], 1).unwrap_or_default();
                out.extend_from_slice(
                    &tern_proto::FrameHeader {
                        len: packed.len() as u32,
                        kind: tern_proto::FrameKind::Zstd,
                        flags: 0,
                        channel: 0,
                    }
                    .encode(),
                );
                out.extend_from_slice(&packed);
                out.extend_from_slice(&body[n..]);
                mark = out.len();
                continue;
            }
            Op::Stat(p) => Msg::Stat { path: p.bytes() },
            Op::ReadDir(p) => Msg::ReadDir { path: p.bytes() },
            Op::MakeDir(p) => Msg::MakeDir { path: p.bytes() },
            Op::Remove(p) => Msg::Remove { path: p.bytes() },
            Op::Create {
                h,
                p,
                size,
                chunk_shift,
                resumable,
            } => Msg::Create {
                handle: u64::from(*h % 8),
                path: p.bytes(),
                spec: WireSpec {
                    size: u64::from(*size),
                    chunk_size: chunk_size(*chunk_shift),
                    resumable: *resumable,
                    durable: false,
                    source_meta: WireMeta {
                        mode: 0o644,
                        ..WireMeta::default()
                    },
                    source_changed: (0, 0),
                },
            },
            Op::Write {
                h,
                index,
                chunk_shift,
                len,
                fill,
                hole,
                good,
            } => {
                let cs = chunk_size(*chunk_shift);
                let offset = u64::from(*index % 16) * cs;
                let len = u64::from(*len).min(cs);
                let mut bytes = vec![*fill; len as usize];
                // A hole in the middle: zeros, not sent.
                let holes = if *hole && len >= 8 {
                    let (s, l) = (len / 4, len / 2);
                    bytes[s as usize..(s + l) as usize].fill(0);
                    vec![(offset + s, l)]
                } else {
                    Vec::new()
                };
                let mut cv = tern_core::hash::cv_at(offset, &bytes);
                if !*good {
                    cv[0] ^= 1;
                }
                msg(
                    Msg::Write(WriteChunk {
                        handle: u64::from(*h % 8),
                        index: u64::from(*index % 16),
                        offset,
                        len,
                        holes: holes.clone(),
                        cv,
                    }),
                    &mut out,
                );
                let sent: Vec<u8> = match holes.first() {
                    Some(&(s, l)) => {
                        let (s, l) = ((s - offset) as usize, l as usize);
                        [&bytes[..s], &bytes[s + l..]].concat()
                    }
                    None => bytes,
                };
                data(&sent, &mut out);
                continue;
            }
            Op::BasisSignatures(items) => Msg::BasisSignatures {
                items: items.iter().take(40).map(|(p, n)| (p.bytes(), u64::from(*n))).collect(),
            },
            Op::ReadFilesDelta {
                items,
                bases,
                avg_shift,
                chunks,
                ids,
                xattrs,
            } => {
                let bases: Vec<bool> = bases.iter().take(40).copied().collect();
                msg(
                    Msg::ReadFilesDelta {
                        items: items
                            .iter()
                            .take(40)
                            .map(|(p, size, real)| (p.bytes(), entry(b"f", u64::from(*size % 8), *real)))
                            .collect(),
                        bases: bases.clone(),
                        xattrs: *xattrs,
                    },
                    &mut out,
                );
                for _ in bases.iter().filter(|b| **b) {
                    msg(ids.signature(1 << (10 + avg_shift % 12), chunks), &mut out);
                }
                continue;
            }
            Op::BatchDelta(items) => {
                let items: Vec<_> = items.iter().take(40).collect();
                let recipes: Vec<Vec<tern_proto::WirePiece>> = items.iter().map(|(_, r, ..)| recipe(r)).collect();
                let batch = Batch {
                    items: items
                        .iter()
                        .zip(&recipes)
                        .map(|((p, _, sent, fill, good, basis), recipe)| {
                            let delta = WireDelta {
                                size: pieces_len(recipe),
                                pieces: recipe.clone(),
                                literal: u64::from(*sent),
                                hash: match good {
                                    true => *blake3::hash(b"hello").as_bytes(),
                                    false => [*fill; 32],
                                },
                                xattrs: Vec::new(),
                                changed: (0, 0),
                            };
                            BatchItem {
                                path: p.bytes(),
                                meta: WireMeta {
                                    mode: 0o644,
                                    ..WireMeta::default()
                                },
                                body: match basis {
                                    None => BatchBody::Delta(delta),
                                    Some(b) => BatchBody::DeltaFrom {
                                        basis: b.bytes(),
                                        delta,
                                    },
                                },
                            }
                        })
                        .collect(),
                    owner: false,
                    sync: true,
                    verify: true,
                };
                msg(Msg::Batch(batch), &mut out);
                for (_, _, sent, fill, ..) in &items {
                    data(&vec![*fill; usize::from(*sent)], &mut out);
                }
                continue;
            }
            Op::BasisSignature(h) => Msg::BasisSignature {
                handle: u64::from(*h % 8),
            },
            Op::UseBasis(h, p) => Msg::UseBasis {
                handle: u64::from(*h % 8),
                path: p.bytes(),
            },
            Op::DeltaBasis {
                h,
                avg_shift,
                chunks,
                ids,
                last,
                size,
                chunk_shift,
            } => {
                let (handle, avg) = (u64::from(*h % 8), 1 << (10 + avg_shift % 12));
                let (size, chunk_size) = (u64::from(*size % (1 << 22)), chunk_size(*chunk_shift));
                match ids.part(chunks) {
                    SigPart::Full(chunks) => Msg::DeltaBasis {
                        handle,
                        avg,
                        chunks,
                        last: *last,
                        size,
                        chunk_size,
                    },
                    SigPart::Short(chunks) => Msg::ShortDeltaBasis {
                        handle,
                        avg,
                        chunks,
                        last: *last,
                        size,
                        chunk_size,
                    },
                }
            }
            Op::ReadDelta { h, index } => Msg::ReadDelta {
                handle: u64::from(*h % 8),
                index: u64::from(*index % 16),
            },
            Op::WriteDelta {
                h,
                index,
                chunk_shift,
                pieces,
                sent,
                fill,
            } => {
                let cs = chunk_size(*chunk_shift);
                let offset = u64::from(*index % 16) * cs;
                let pieces = recipe(pieces);
                let len = pieces_len(&pieces);
                msg(
                    Msg::WriteDelta {
                        handle: u64::from(*h % 8),
                        index: u64::from(*index % 16),
                        offset,
                        len: len.min(cs),
                        pieces,
                        cv: [*fill; 32],
                    },
                    &mut out,
                );
                data(&vec![*fill; usize::from(*sent)], &mut out);
                continue;
            }
            Op::FileMeta { h, writes, mode } => Msg::FileMeta {
                handle: u64::from(*h % 8),
                writes: u64::from(*writes % 8),
                meta: mode_only(*mode),
                owner: false,
                xattrs: Vec::new(),
            },
            Op::Sync(h) => Msg::Sync {
                handle: u64::from(*h % 8),
            },
            Op::Verify { h, hash } => {
                let mut full = [0u8; 32];
                full[..4].copy_from_slice(hash);
                Msg::Verify {
                    handle: u64::from(*h % 8),
                    hash: full,
                }
            }
            Op::Publish { h, writes } => Msg::Publish {
                handle: u64::from(*h % 8),
                writes: u64::from(*writes % 8),
            },
            Op::Abort { h, keep } => Msg::Abort {
                handle: u64::from(*h % 8),
                keep: *keep,
            },
            Op::Symlink { p, target } => Msg::Symlink {
                path: p.bytes(),
                target: target.bytes(),
                meta: WireMeta::default(),
                owner: false,
            },
            Op::HardLink { from, to } => Msg::HardLink {
                existing: from.bytes(),
                path: to.bytes(),
            },
            Op::SetMeta { p, dir, mode } => Msg::SetMeta {
                path: p.bytes(),
                kind: if *dir { WireKind::Dir } else { WireKind::File },
                meta: mode_only(*mode),
                owner: false,
                xattrs: None,
            },
            Op::Barrier => Msg::Barrier,
            Op::Rename { from, to } => Msg::Rename {
                from: from.bytes(),
                to: to.bytes(),
            },
            Op::Truncate { path, size } => Msg::Truncate {
                path: path.bytes(),
                size: u64::from(*size % (16 << 20)),
            },
            Op::Backup { dir, base, suffix } => Msg::Backup {
                dir: dir.as_ref().map(P::bytes),
                base: base.bytes(),
                suffix: [&b"~"[..], b"", b".tern.tmp", b"a/b", b".bak"][usize::from(*suffix) % 5].to_vec(),
            },
            Op::Batch(items) => {
                let items: Vec<_> = items.iter().take(40).collect();
                let bodies: Vec<Vec<u8>> = items
                    .iter()
                    .map(|(_, len, _, _)| vec![len.wrapping_mul(7); usize::from(*len)])
                    .collect();
                let batch = Batch {
                    items: items
                        .iter()
                        .zip(&bodies)
                        .map(|((p, _, good, link), body)| BatchItem {
                            path: p.bytes(),
                            meta: WireMeta {
                                mode: 0o644,
                                ..WireMeta::default()
                            },
                            body: if *link {
                                BatchBody::Symlink {
                                    target: b"../../outside".to_vec(),
                                }
                            } else {
                                let mut hash = *blake3::hash(body).as_bytes();
                                if !*good {
                                    hash[31] ^= 0x80;
                                }
                                BatchBody::File {
                                    size: body.len() as u64,
                                    holes: Vec::new(),
                                    hash,
                                    xattrs: Vec::new(),
                                    changed: (0, 0),
                                }
                            },
                        })
                        .collect(),
                    owner: false,
                    sync: true,
                    verify: true,
                };
                msg(Msg::Batch(batch), &mut out);
                for ((_, _, _, link), body) in items.iter().zip(&bodies) {
                    if !*link {
                        data(body, &mut out);
                    }
                }
                continue;
            }
            Op::OpenRead { h, p, size, real_mtime } => Msg::OpenRead {
                handle: u64::from(*h % 8),
                path: p.bytes(),
                expect: entry(b"f", u64::from(*size % 8), *real_mtime),
            },
            Op::Read { h, offset, len } => Msg::Read {
                handle: u64::from(*h % 8),
                offset: u64::from(*offset % 16),
                len: u64::from(*len % 16),
            },
            Op::Ranges { h, offset, len } => Msg::Ranges {
                handle: u64::from(*h % 8),
                offset: u64::from(*offset),
                len: u64::from(*len),
            },
            Op::CheckUnchanged(h) => Msg::CheckUnchanged {
                handle: u64::from(*h % 8),
            },
            Op::CloseRead(h) => Msg::CloseRead {
                handle: u64::from(*h % 8),
            },
            Op::Hash(p) => Msg::Hash {
                path: p.bytes(),
                expect: entry(b"f", 5, true),
            },
            Op::Walk { p, rule, prefix, from } => Msg::Walk(tern_proto::Walk {
                path: p.bytes(),
                rules: rule.iter().map(|(r, inc)| (r.bytes(), *inc)).collect(),
                prefix: prefix.bytes(),
                from: from.bytes(),
            }),
            Op::ReadFiles { items, xattrs } => Msg::ReadFiles {
                items: items
                    .iter()
                    .take(40)
                    .map(|(p, size, real)| (p.bytes(), entry(b"f", u64::from(*size % 8), *real)))
                    .collect(),
                xattrs: *xattrs,
            },
            Op::HashFiles(items) => Msg::HashFiles {
                items: items
                    .iter()
                    .take(40)
                    .map(|(p, size)| (p.bytes(), entry(b"f", u64::from(*size % 8), true)))
                    .collect(),
            },
            Op::OpsStream => Msg::OpsStream,
            Op::After(n) => Msg::After { ops: u64::from(*n % 8) },
            Op::Settle => Msg::Settle,
            Op::Commit {
                h,
                writes,
                mode,
                sync,
                verify,
            } => Msg::Commit(tern_proto::Commit {
                handle: u64::from(*h % 8),
                writes: u64::from(*writes % 8),
                meta: mode_only(*mode),
                owner: false,
                xattrs: Vec::new(),
                sync: *sync,
                verify: verify.map(|v| {
                    let mut full = [0u8; 32];
                    full[..4].copy_from_slice(&v);
                    full
                }),
            }),
            Op::GrantTicket { p, fingerprint } => Msg::GrantTicket {
                holder: if *fingerprint {
                    format!("b3:{}", "ab".repeat(32))
                } else {
                    "not a key".into()
                },
                path: p.bytes(),
            },
            Op::PullTicketed { p, dst, mac, check } => {
                let mut full = [0u8; 32];
                full[..4].copy_from_slice(mac);
                let ticket = tern_proto::Ticket {
                    module: "data".into(),
                    path: p.bytes(),
                    holder: format!("b3:{}", "ab".repeat(32)),
                    expires: u64::MAX,
                    mac: full,
                };
                Msg::PullTicketed {
                    req: Box::new(tern_proto::PullRequest {
                        sources: vec![tern_proto::PullSource {
                            host: "127.0.0.1".into(),
                            port: 9,
                            module: "data".into(),
                            path: p.bytes(),
                            fingerprint: format!("b3:{}", "ab".repeat(32)),
                            dst_rel: dst.bytes(),
                        }],
                        opts: tern_proto::RunOptions {
                            check: *check,
                            delete: false,
                            dry_run: false,
                            checksum: false,
                            rules: Vec::new(),
                            jobs: 1,
                            fsync: false,
                            verify: false,
                            chunk_size: 1 << 20,
                            hard_links: false,
                            xattrs: false,
                            bwlimit: None,
                        },
                        transport: 2,
                    }),
                    tickets: vec![ticket],
                }
            }
        };
        msg(m, &mut out);
    }
    out
}

struct World {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    server: Arc<Server>,
}

impl World {
    fn module(&self) -> PathBuf {
        self.dir.path().join("module")
    }

    /// Puts the module back as the fixture has it: `sub/f` and the
    /// symlink `out` to the directory beside the module.
    fn reset(&self) {
        let module = self.module();
        // An input may have taken the write bit off the root itself.
        let _ = make_writable(&module);
        if let Ok(rd) = std::fs::read_dir(&module) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = make_writable(&p);
                let _ = match e.file_type() {
                    Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
                    _ => std::fs::remove_file(&p),
                };
            }
        }
        tern_fuzz::write_fixture(&module);
        std::os::unix::fs::symlink(self.dir.path().join("outside"), module.join("out")).expect("symlink");
    }

    /// The directory beside the module must hold exactly what it was given.
    fn outside_untouched(&self) {
        let outside = self.dir.path().join("outside");
        let names: Vec<_> = std::fs::read_dir(&outside)
            .expect("list outside")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec!["secret"], "something was written outside the module");
        assert_eq!(std::fs::read(outside.join("secret")).expect("read"), b"secret");
        let mode = std::fs::metadata(&outside).expect("stat").permissions();
        assert!(!mode.readonly(), "outside's mode changed");
    }
}

/// Makes `p` and, for a directory, everything in it writable by us, so a
/// mode the input set does not stop the reset.
fn make_writable(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::symlink_metadata(p)?;
    if md.file_type().is_symlink() {
        return Ok(());
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
    if md.is_dir() {
        for e in std::fs::read_dir(p)?.flatten() {
            let _ = make_writable(&e.path());
        }
    }
    Ok(())
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let module = dir.path().join("module");
        std::fs::create_dir_all(&module).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("outside")).expect("mkdir");
        std::fs::write(dir.path().join("outside/secret"), b"secret").expect("write");
        // Requests waiting for chunks that never come give up quickly.
        let mut cfg = tern_fuzz::config(&module, &dir.path().join("state"), Duration::from_millis(50));
        // A small budget, so that limits on open files are reached.
        cfg.limits.open_files = Some(8);
        let (rt, server) = tern_fuzz::start(&cfg);
        let w = World { dir, rt, server };
        w.reset();
        w
    })
}

fuzz_target!(|ops: Vec<Op>| {
    let w = world();
    w.reset();
    tern_fuzz::serve(&w.rt, &w.server, encode(&ops));
    w.outside_untouched();
});
