//! Delta transfer: only what the destination's old version of a file lacks
//! crosses.
//!
//! Both versions are cut into content-defined chunks (FastCDC 2020), so an
//! insertion or deletion moves the cut points with the content and the
//! chunks after it match again. The side holding the old version (the
//! *basis*) sends its [`Signature`]: a short id and the length of each of
//! its chunks. The side holding the new version cuts it the same way and,
//! for each chunk of the engine's fixed chunk grid, makes a recipe: ranges
//! to copy from the basis and literal bytes ([`Piece`]). The receiver
//! builds each grid chunk from its recipe ([`assemble`]) and checks it
//! against the chunk's BLAKE3 chaining value before writing it, so a basis
//! that changed, a short-id collision or a lying sender costs a resend,
//! never a wrong byte; the whole-file hash is composed of those checked
//! values as for a plain copy, and resume works chunk by chunk as before.
//!
//! To use several cores on one file, the file is cut in segments of about
//! [`SEGMENT`] bytes, each chunked on its own thread. Segments join at
//! seams found from the content past each nominal boundary (the end of the
//! third chunk cut from there), not at fixed offsets, so an insertion
//! moves the seams with the content and costs no extra chunks there.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};

/// Bytes chunked on their own (one thread each).
pub const SEGMENT: u64 = 64 << 20;

/// The largest signature accepted, in chunks: a 16 TiB basis at the
/// largest average chunk size, and 16 M entries (about 200 MiB) at most.
pub const MAX_SIGNATURE_CHUNKS: usize = 16 << 20;

/// Chunk size parameters; both sides must cut with the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Average chunk size, a power of two.
    pub avg: u32,
}

impl Params {
    /// The parameters for a basis of `size` bytes: an average chunk of
    /// about sqrt(size)/2 (16 KiB at 1 GiB), between 2 KiB and 1 MiB.
    pub fn for_size(size: u64) -> Params {
        let target = ((size as f64).sqrt() / 2.0) as u64;
        let avg = target.clamp(2 << 10, 1 << 20).next_power_of_two().min(1 << 20);
        Params { avg: avg as u32 }
    }

    /// Whether `avg` is a size this module cuts with (a peer's value is
    /// checked before use).
    pub fn valid(&self) -> bool {
        self.avg.is_power_of_two() && (2 << 10..=1 << 20).contains(&self.avg)
    }

    fn sizes(&self) -> (usize, usize, usize) {
        let avg = self.avg as usize;
        (avg / 4, avg, avg * 4)
    }
}

/// The basis's chunks: a short id (the first bytes of the chunk's BLAKE3,
/// as a little-endian `u64`) and the length of each, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The parameters the basis was cut with.
    pub avg: u32,
    /// `(id, len)` per chunk.
    pub chunks: Vec<(u64, u32)>,
    /// How many bytes of each id count, 1 to 8: a signature that crossed
    /// with its ids cut short holds them so, and a new version's chunks are
    /// compared on as many.
    pub id_bytes: u8,
}

impl Default for Signature {
    fn default() -> Signature {
        Signature {
            avg: 0,
            chunks: Vec::new(),
            id_bytes: 8,
        }
    }
}

impl Signature {
    /// The length of the basis the signature describes.
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|&(_, l)| u64::from(l)).sum()
    }

    /// The bits of an id that count.
    fn mask(&self) -> u64 {
        match self.id_bytes {
            1..=7 => (1u64 << (8 * u32::from(self.id_bytes))) - 1,
            _ => u64::MAX,
        }
    }

    /// How many bytes each id needs so that a new version of `new_size`
    /// bytes, cut and looked up chunk by chunk, falsely matches one of this
    /// signature's chunks about once in 65,536 files or fewer: 16 bits more
    /// than the two chunk counts' bits, as the chance of a false match
    /// is their product over 2^bits. A false match costs the file's
    /// transfer again (the whole-file hash finds it), never a wrong file.
    /// Never more than the signature holds ([`Signature::id_bytes`]).
    pub fn id_bytes_for(&self, new_size: u64) -> u8 {
        let bits = |n: u64| u64::BITS - n.max(1).saturating_sub(1).leading_zeros();
        let new_chunks = new_size / u64::from(self.avg.max(1));
        let need = 16 + bits(self.chunks.len() as u64) + bits(new_chunks);
        (need.div_ceil(8).clamp(2, 8) as u8).min(self.id_bytes.clamp(1, 8))
    }
}

/// One part of a grid chunk's recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// `len` bytes copied from the basis at `offset`.
    Copy {
        /// Where in the basis.
        offset: u64,
        /// How many bytes.
        len: u32,
    },
    /// `len` bytes that follow in the literal data.
    Literal {
        /// How many bytes.
        len: u32,
    },
}

impl Piece {
    /// The bytes this piece contributes.
    pub fn len(&self) -> u64 {
        match *self {
            Piece::Copy { len, .. } | Piece::Literal { len } => u64::from(len),
        }
    }

    /// Whether it contributes nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A chunk of a file: where it starts, how long it is, its short id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Offset in the file.
    pub offset: u64,
    /// Length.
    pub len: u32,
    /// First 8 bytes of its BLAKE3.
    pub id: u64,
}

/// Reads a range of a file: `(offset, buffer to fill)`.
pub type ReadAt<'a> = &'a (dyn Fn(u64, &mut [u8]) -> Result<()> + Sync);

/// Cuts `size` bytes read through `read` into content-defined chunks, one
/// segment per thread (at most `threads` at once).
pub fn cut_file(read: ReadAt<'_>, size: u64, params: Params, threads: usize) -> Result<Vec<Cut>> {
    cut_and_hash(read, size, params, threads, None).map(|(cuts, _)| cuts)
}

/// [`cut_file`], also computing in the same pass the chaining value of
/// every chunk of the grid of `chunk_size` (which must divide [`SEGMENT`]),
/// so that a sender need not read its file again but for the literals.
pub fn cut_and_hash(
    read: ReadAt<'_>,
    size: u64,
    params: Params,
    threads: usize,
    chunk_size: Option<u64>,
) -> Result<(Vec<Cut>, Vec<blake3::hazmat::ChainingValue>)> {
    let grid = chunk_size.filter(|cs| cs.is_power_of_two() && *cs <= SEGMENT);
    let segments = size.div_ceil(SEGMENT).max(1);
    let threads = threads.clamp(1, segments as usize);
    let next = std::sync::atomic::AtomicU64::new(0);
    type Part = (Vec<Cut>, Vec<blake3::hazmat::ChainingValue>);
    let mut parts: Vec<(u64, Result<Part>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    let mut buf = Vec::new();
                    loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if k >= segments {
                            return done;
                        }
                        let start = k * SEGMENT;
                        let end = (start + SEGMENT).min(size);
                        // The segment is cut between seams found past its
                        // nominal start and end: what follows a seam does not
                        // depend on where the reading began.
                        let window = 12 * u64::from(params.avg);
                        let read_end = (end + window).min(size);
                        buf.resize((read_end - start) as usize, 0);
                        let r = read(start, &mut buf).map(|()| {
                            let nominal = (end - start) as usize;
                            let cvs: Vec<_> = match grid {
                                Some(cs) => buf[..nominal]
                                    .chunks(cs as usize)
                                    .enumerate()
                                    .map(|(j, c)| crate::hash::chunk_cv(start + j as u64 * cs, c))
                                    .collect(),
                                None => Vec::new(),
                            };
                            let lo = match k {
                                0 => 0,
                                _ => seam(&buf[..buf.len().min(window as usize)], params),
                            };
                            let hi = match end >= size {
                                true => buf.len(),
                                false => nominal + seam(&buf[nominal..], params),
                            };
                            let lo = lo.min(hi);
                            (cut_bytes(&buf[lo..hi], start + lo as u64, params), cvs)
                        });
                        done.push((k, r));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    if parts.len() as u64 != segments {
        return Err(Error::Internal("a chunking thread failed".into()));
    }
    parts.sort_by_key(|p| p.0);
    let (mut cuts, mut cvs) = (Vec::new(), Vec::new());
    for (_, p) in parts {
        let (c, v) = p?;
        cuts.extend(c);
        cvs.extend(v);
    }
    Ok((cuts, cvs))
}

/// Where the third chunk cut from the start of `data` ends (or its end, if
/// it holds fewer): a content-defined place to join two segments. Cuts
/// made from an arbitrary start fall in step with those made from the
/// start of the file within a chunk or two, so both versions of a file put
/// their seams at the same content.
fn seam(data: &[u8], params: Params) -> usize {
    let (min, avg, max) = params.sizes();
    fastcdc::v2020::FastCDC::new(data, min, avg, max)
        .take(3)
        .last()
        .map_or(data.len(), |c| c.offset + c.length)
}

/// Cuts `data`, which starts at `base` in its file.
pub fn cut_bytes(data: &[u8], base: u64, params: Params) -> Vec<Cut> {
    let (min, avg, max) = params.sizes();
    fastcdc::v2020::FastCDC::new(data, min, avg, max)
        .map(|c| Cut {
            offset: base + c.offset as u64,
            len: c.length as u32,
            id: short_id(&data[c.offset..c.offset + c.length]),
        })
        .collect()
}

fn short_id(data: &[u8]) -> u64 {
    let h = blake3::hash(data);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// The signature of a basis of `size` bytes read through `read`.
pub fn signature(read: ReadAt<'_>, size: u64, threads: usize) -> Result<Signature> {
    let params = Params::for_size(size);
    let cuts = cut_file(read, size, params, threads)?;
    Ok(Signature {
        avg: params.avg,
        chunks: cuts.into_iter().map(|c| (c.id, c.len)).collect(),
        id_bytes: 8,
    })
}

/// What the new version makes of the basis: a recipe per grid chunk.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Per grid chunk of `chunk_size`, its pieces, in order.
    pub chunks: Vec<Vec<Piece>>,
    /// Bytes found in the basis.
    pub matched: u64,
    /// Bytes that must cross.
    pub literal: u64,
    /// Per grid chunk, its chaining value, when the sender computed them
    /// while cutting (empty otherwise).
    pub cvs: Vec<blake3::hazmat::ChainingValue>,
    /// Per grid chunk, the chaining value of the basis's chunk at the same
    /// place, when the plan copies each chunk from there (a copy of a file
    /// whose hashes are known): a recipe is used only where the new chunk
    /// hashes the same.
    pub basis_cvs: Vec<blake3::hazmat::ChainingValue>,
}

impl Plan {
    /// Every grid chunk of `chunk_size` of a file of `size` bytes copied
    /// from the same place in the basis, whose chunks hash to `basis_cvs`.
    pub fn in_place(size: u64, chunk_size: u64, basis_cvs: Vec<blake3::hazmat::ChainingValue>) -> Plan {
        let chunks = (0..crate::hash::chunk_count(size, chunk_size))
            .map(|i| {
                let offset = i * chunk_size;
                vec![Piece::Copy {
                    offset,
                    len: chunk_size.min(size - offset) as u32,
                }]
            })
            .collect();
        Plan {
            chunks,
            matched: size,
            literal: 0,
            cvs: Vec::new(),
            basis_cvs,
        }
    }
}

/// The basis's chunks by id and length, each at its first offset.
pub struct Index {
    at: HashMap<(u64, u32), u64>,
    mask: u64,
}

impl Index {
    /// Indexes `sig`.
    pub fn new(sig: &Signature) -> Index {
        let mask = sig.mask();
        let mut index = HashMap::with_capacity(sig.chunks.len());
        let mut at = 0u64;
        for &(id, len) in &sig.chunks {
            index.entry((id & mask, len)).or_insert(at);
            at += u64::from(len);
        }
        Index { at: index, mask }
    }

    /// Where in the basis a chunk like `c` starts, if it holds one.
    pub fn find(&self, c: &Cut) -> Option<u64> {
        self.at.get(&(c.id & self.mask, c.len)).copied()
    }
}

/// Whether finding `matched` bytes of a file of `size` in its basis pays for
/// the recipes and the signature: below a 32nd, the file is sent plainly.
pub fn worth(matched: u64, size: u64) -> bool {
    matched >= size / 32
}

/// Windows of the new version cut and looked up before the whole file is.
const SAMPLES: u64 = 64;

/// Whether a sample of the new version (`size` bytes read through `read`)
/// finds anything in the basis: [`SAMPLES`] windows of eight average chunks,
/// spread evenly, so that any stretch of a 32nd of the file (what
/// [`worth`] asks for) holds a whole window. A file rewritten through is
/// then sent plainly at the cost of reading less than 1% of it, not after
/// cutting all of it. Files too small for the sample to be cheap are not
/// sampled.
fn sample_matches(read: ReadAt<'_>, size: u64, params: Params, index: &Index) -> Result<bool> {
    let window = 8 * u64::from(params.avg);
    if size < SAMPLES * window * 4 {
        return Ok(true);
    }
    let mut buf = vec![0u8; window as usize];
    for k in 0..SAMPLES {
        let at = k * (size / SAMPLES);
        read(at, &mut buf)?;
        let cuts = cut_bytes(&buf, at, params);
        // The first cut starts where the window does, not where the content
        // says, and the last ends with the window.
        let inner = cuts.get(1..cuts.len().saturating_sub(1)).unwrap_or_default();
        if inner.iter().any(|c| index.find(c).is_some()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Plans the new version (`size` bytes read through `read`) against the
/// basis `sig`, with `threads` cutting, over the grid of `chunk_size`; with
/// `cvs`, the grid's chaining values come with it. `None` when delta does
/// not pay: too little of the basis matches (found early from a sample when
/// nothing does), or the signature is not one this module cuts with.
pub fn plan_file(
    read: ReadAt<'_>,
    size: u64,
    sig: &Signature,
    threads: usize,
    chunk_size: u64,
    cvs: bool,
) -> Result<Option<Plan>> {
    let params = Params { avg: sig.avg };
    if !params.valid() || sig.chunks.len() > MAX_SIGNATURE_CHUNKS {
        return Ok(None);
    }
    let index = Index::new(sig);
    if !sample_matches(read, size, params, &index)? {
        return Ok(None);
    }
    let (cuts, grid_cvs) = cut_and_hash(read, size, params, threads, cvs.then_some(chunk_size))?;
    let mut plan = plan_indexed(&cuts, &index, size, chunk_size);
    if grid_cvs.len() == plan.chunks.len() {
        plan.cvs = grid_cvs;
    }
    Ok(worth(plan.matched, size).then_some(plan))
}

/// The most pieces one grid chunk's recipe may have (a peer refuses more).
pub const MAX_PIECES: usize = 16 << 10;

/// Plans a file held whole in memory, of one grid chunk, against the basis
/// `sig`: its recipe, or `None` when a delta does not pay (too little
/// matches, the recipe is too long) or `sig` is not one this module cuts
/// with.
pub fn plan_bytes(data: &[u8], sig: &Signature) -> Option<Vec<Piece>> {
    let params = Params { avg: sig.avg };
    if data.is_empty() || !params.valid() || sig.chunks.len() > MAX_SIGNATURE_CHUNKS {
        return None;
    }
    let size = data.len() as u64;
    let mut p = plan(&cut_bytes(data, 0, params), sig, size, size);
    let pieces = p
        .chunks
        .pop()
        .filter(|c| p.chunks.is_empty() && c.len() <= MAX_PIECES)?;
    worth(p.matched, size).then_some(pieces)
}

/// Matches the new version's `cuts` (of a file of `size` bytes) against
/// the basis `sig`, and lays the result out over the grid of
/// `chunk_size`.
pub fn plan(cuts: &[Cut], sig: &Signature, size: u64, chunk_size: u64) -> Plan {
    plan_indexed(cuts, &Index::new(sig), size, chunk_size)
}

fn plan_indexed(cuts: &[Cut], index: &Index, size: u64, chunk_size: u64) -> Plan {
    let grid = crate::hash::chunk_count(size, chunk_size) as usize;
    let mut out = Plan {
        chunks: vec![Vec::new(); grid],
        ..Plan::default()
    };
    for c in cuts {
        let basis = index.find(c);
        let (mut off, end) = (c.offset, c.offset + u64::from(c.len));
        while off < end {
            let g = (off / chunk_size) as usize;
            let take = end.min((g as u64 + 1) * chunk_size) - off;
            let piece = match basis {
                Some(b) => Piece::Copy {
                    offset: b + (off - c.offset),
                    len: take as u32,
                },
                None => Piece::Literal { len: take as u32 },
            };
            match basis {
                Some(_) => out.matched += take,
                None => out.literal += take,
            }
            if let Some(pieces) = out.chunks.get_mut(g) {
                push_merged(pieces, piece);
            }
            off += take;
        }
    }
    out
}

fn push_merged(pieces: &mut Vec<Piece>, p: Piece) {
    match (pieces.last_mut(), p) {
        (Some(Piece::Literal { len }), Piece::Literal { len: more }) => *len += more,
        (Some(Piece::Copy { offset, len }), Piece::Copy { offset: o, len: more }) if *offset + u64::from(*len) == o => {
            *len += more
        }
        _ => pieces.push(p),
    }
}

/// The literal byte ranges of grid chunk `index`'s recipe, as offsets in
/// the new file.
pub fn literal_ranges(pieces: &[Piece], chunk_offset: u64) -> Vec<(u64, u64)> {
    let mut at = chunk_offset;
    let mut out = Vec::new();
    for p in pieces {
        if let Piece::Literal { len } = *p {
            out.push((at, u64::from(len)));
        }
        at += p.len();
    }
    out
}

/// The bytes of the literal pieces of the chunk at `chunk_offset`, taken
/// from the chunk's bytes. A range outside `chunk` is left out, which makes
/// the literals short: the receiver refuses them.
pub fn literals(pieces: &[Piece], chunk_offset: u64, chunk: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (at, len) in literal_ranges(pieces, chunk_offset) {
        let from = (at - chunk_offset) as usize;
        if let Some(b) = chunk.get(from..from + len as usize) {
            out.extend_from_slice(b);
        }
    }
    out
}

/// Builds a grid chunk of `len` bytes into `out` from its recipe: basis
/// ranges read from `basis` (of `basis_size` bytes), literals taken in
/// order from `literals`. A recipe that does not add up to `len`, reads
/// outside the basis or uses more or fewer literal bytes than given is
/// refused: a sender chooses recipes, and must not make this side read
/// anything else or allocate more than the chunk.
pub fn assemble(
    pieces: &[Piece],
    len: u64,
    basis: &File,
    basis_size: u64,
    literals: &[u8],
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    let total: u64 = pieces.iter().map(Piece::len).sum();
    if total != len {
        return Err(format!("a delta recipe of {total} bytes for a chunk of {len}"));
    }
    out.clear();
    out.resize(len as usize, 0);
    let (mut at, mut lit) = (0usize, 0usize);
    for p in pieces {
        let n = p.len() as usize;
        match *p {
            Piece::Copy { offset, .. } => {
                if offset.checked_add(n as u64).is_none_or(|e| e > basis_size) {
                    return Err(format!("a delta recipe reading past the basis ({basis_size} bytes)"));
                }
                basis
                    .read_exact_at(&mut out[at..at + n], offset)
                    .map_err(|e| format!("reading the basis: {e}"))?;
            }
            Piece::Literal { .. } => {
                let Some(src) = literals.get(lit..lit + n) else {
                    return Err("a delta recipe with fewer literal bytes than it uses".into());
                };
                out[at..at + n].copy_from_slice(src);
                lit += n;
            }
        }
        at += n;
    }
    if lit != literals.len() {
        return Err("a delta recipe with more literal bytes than it uses".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut v);
        v
    }

    fn sig_of(data: &[u8]) -> Signature {
        let p = Params::for_size(data.len() as u64);
        Signature {
            avg: p.avg,
            chunks: cut_segments(data, p).into_iter().map(|c| (c.id, c.len)).collect(),
            id_bytes: 8,
        }
    }

    /// `cut_file` over memory.
    fn cut_segments(data: &[u8], p: Params) -> Vec<Cut> {
        let read = |off: u64, buf: &mut [u8]| {
            buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
            Ok(())
        };
        cut_file(&read, data.len() as u64, p, 2).expect("cut")
    }

    fn rebuild(new: &[u8], basis: &[u8], cs: u64) -> (Vec<u8>, Plan) {
        let sig = sig_of(basis);
        let cuts = cut_segments(new, Params { avg: sig.avg });
        let plan = plan(&cuts, &sig, new.len() as u64, cs);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b"), basis).expect("write");
        let b = File::open(dir.path().join("b")).expect("open");
        let mut out = Vec::new();
        let mut built = Vec::new();
        for (i, pieces) in plan.chunks.iter().enumerate() {
            let off = i as u64 * cs;
            let len = cs.min(new.len() as u64 - off);
            let lits = literals(pieces, off, &new[off as usize..(off + len) as usize]);
            assemble(pieces, len, &b, basis.len() as u64, &lits, &mut out).expect("assemble");
            built.extend_from_slice(&out);
        }
        (built, plan)
    }

    #[test]
    fn chunk_sizes_scale_with_the_file() {
        assert_eq!(Params::for_size(1 << 30).avg, 16 << 10);
        assert_eq!(Params::for_size(1000).avg, 2 << 10);
        assert_eq!(Params::for_size(u64::MAX).avg, 1 << 20);
        assert!(Params::for_size(5 << 20).valid());
        assert!(!Params { avg: 3000 }.valid());
    }

    #[test]
    fn ids_cut_short_still_find_the_basis_and_only_it() {
        let basis = random(4 << 20, 21);
        let mut new = random(64 << 10, 22);
        new.extend_from_slice(&basis);
        let full = sig_of(&basis);
        let n = full.id_bytes_for(new.len() as u64);
        // 2 KiB chunks: 11 bits for each side's count, and 16 more.
        assert_eq!((full.avg, n), (2 << 10, 5));
        let mut short = full.clone();
        short.id_bytes = n;
        let mask = (1u64 << (8 * n)) - 1;
        for c in &mut short.chunks {
            c.0 &= mask;
        }
        let cuts = cut_segments(&new, Params { avg: full.avg });
        let a = plan(&cuts, &full, new.len() as u64, 8 << 20);
        let b = plan(&cuts, &short, new.len() as u64, 8 << 20);
        assert_eq!(a.chunks, b.chunks);
        assert!(b.matched >= basis.len() as u64 - 3 * u64::from(full.avg));
        // Unrelated data finds nothing, its ids cut short or not.
        let other = random(4 << 20, 23);
        let cuts = cut_segments(&other, Params { avg: full.avg });
        assert_eq!(plan(&cuts, &short, other.len() as u64, 8 << 20).matched, 0);
        // Fewer chunks need fewer bytes, and never fewer than two.
        let tiny = Signature {
            avg: 2 << 10,
            chunks: vec![(1, 4096)],
            id_bytes: 8,
        };
        assert_eq!(tiny.id_bytes_for(4096), 3);
        assert_eq!(tiny.id_bytes_for(0), 2);
        let huge = Signature {
            avg: 16 << 10,
            chunks: vec![(1, 4096); 1 << 16],
            id_bytes: 8,
        };
        assert_eq!(huge.id_bytes_for(1 << 30), 6);
        // A signature that crossed cut short cannot be sent on longer.
        let cut = Signature { id_bytes: 3, ..huge };
        assert_eq!(cut.id_bytes_for(1 << 30), 3);
    }

    #[test]
    fn an_insertion_at_the_start_costs_about_itself() {
        let basis = random(24 << 20, 7);
        let mut new = random(1 << 20, 9);
        new.extend_from_slice(&basis);
        let (built, plan) = rebuild(&new, &basis, 8 << 20);
        assert_eq!(built, new);
        assert!(plan.literal < (1 << 20) + (64 << 10), "{} literal bytes", plan.literal);
    }

    #[test]
    fn segments_join_at_content_defined_seams() {
        // Three segments; an insertion moves every seam's content.
        let basis = random(150 << 20, 11);
        let mut new = random(1 << 20, 12);
        new.extend_from_slice(&basis);
        let p = Params::for_size(basis.len() as u64);
        let cuts = cut_segments(&new, p);
        // The cuts tile the file.
        let mut at = 0;
        for c in &cuts {
            assert_eq!(c.offset, at);
            at += u64::from(c.len);
        }
        assert_eq!(at, new.len() as u64);
        let (built, plan) = rebuild(&new, &basis, 8 << 20);
        assert_eq!(built, new);
        // Forced cuts at the nominal segment starts cost about 70 KB more
        // here; seams cost a chunk or so.
        assert!(
            plan.literal < (1 << 20) + 4 * u64::from(p.avg),
            "{} literal bytes",
            plan.literal
        );
    }

    #[test]
    fn scattered_overwrites_cost_a_chunk_or_two_each() {
        let basis = random(20 << 20, 3);
        let mut new = basis.clone();
        for k in 0..50 {
            let at = k * (new.len() / 50) + 1000;
            new[at..at + 100].fill(0xAA);
        }
        let (built, plan) = rebuild(&new, &basis, 4 << 20);
        assert_eq!(built, new);
        let avg = u64::from(Params::for_size(basis.len() as u64).avg);
        assert!(plan.literal <= 50 * 3 * avg, "{} literal bytes", plan.literal);
        assert_eq!(plan.matched + plan.literal, new.len() as u64);
    }

    #[test]
    fn an_unrelated_file_matches_nothing_and_an_appended_one_everything_but_the_tail() {
        let basis = random(9 << 20, 1);
        let (built, plan) = rebuild(&random(9 << 20, 2), &basis, 8 << 20);
        assert_eq!(plan.matched, 0);
        assert_eq!(built.len(), 9 << 20);
        let mut grown = basis.clone();
        grown.extend_from_slice(&random(1 << 20, 5));
        let (built, plan) = rebuild(&grown, &basis, 8 << 20);
        assert_eq!(built, grown);
        assert!(plan.literal < (1 << 20) + (64 << 10), "{} literal bytes", plan.literal);
    }

    #[test]
    fn a_rewritten_file_is_given_up_on_from_a_sample_and_a_partly_kept_one_is_not() {
        let basis = random(16 << 20, 21);
        let sig = sig_of(&basis);
        let plan_of = |new: &[u8]| {
            let read_bytes = std::sync::atomic::AtomicU64::new(0);
            let read = |off: u64, buf: &mut [u8]| {
                read_bytes.fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
                buf.copy_from_slice(&new[off as usize..off as usize + buf.len()]);
                Ok(())
            };
            let plan = plan_file(&read, new.len() as u64, &sig, 2, 4 << 20, true).expect("plan");
            (plan, read_bytes.into_inner())
        };
        let rewritten = random(16 << 20, 22);
        let (plan, read) = plan_of(&rewritten);
        assert!(plan.is_none());
        assert!(read < (16 << 20) / 8, "read {read} bytes of a rewritten file");
        // A 16th of the basis kept in the middle of new content: found by
        // the sample, and worth a delta.
        let mut kept = random(16 << 20, 23);
        kept[7 << 20..8 << 20].copy_from_slice(&basis[3 << 20..4 << 20]);
        let (plan, _) = plan_of(&kept);
        let plan = plan.expect("a delta");
        assert!(plan.matched >= (1 << 20) - (64 << 10), "{} matched", plan.matched);
        assert_eq!(plan.cvs.len(), plan.chunks.len());
    }

    #[test]
    fn recipes_that_do_not_add_up_or_read_outside_the_basis_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b"), vec![1u8; 100]).expect("write");
        let b = File::open(dir.path().join("b")).expect("open");
        let mut out = Vec::new();
        let copy = |offset, len| Piece::Copy { offset, len };
        for (pieces, lits, why) in [
            (vec![copy(0, 50)], &[][..], "recipe of 50 bytes"),
            (vec![copy(90, 20), copy(0, 44)], &[], "past the basis"),
            (vec![copy(u64::MAX - 5, 64)], &[], "past the basis"),
            (vec![Piece::Literal { len: 64 }], &[0u8; 10][..], "fewer literal bytes"),
            (vec![copy(0, 64)], &[0u8; 1][..], "more literal bytes"),
        ] {
            let e = assemble(&pieces, 64, &b, 100, lits, &mut out).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
        assemble(&[copy(36, 64)], 64, &b, 100, &[], &mut out).expect("inside");
        assert_eq!(out, vec![1u8; 64]);
    }
}
