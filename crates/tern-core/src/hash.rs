//! BLAKE3 hashing of chunks and composition of a whole-file hash from them.
//!
//! A file is cut into chunks of `chunk_size` bytes (a power of two, at least
//! 1 KiB). Each chunk is hashed on its own into a BLAKE3 *chaining value*
//! (CV) at its offset; the CVs are then merged along BLAKE3's own tree. The
//! result is bit-for-bit the hash `b3sum FILE` prints, however the chunks
//! were scheduled. This works because BLAKE3's left subtree always holds the
//! largest power-of-two number of 1 KiB blocks that leaves something on the
//! right, so every split of a file longer than one chunk falls on a chunk
//! boundary.

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode};

/// The smallest chunk size the composition rule allows.
pub const MIN_CHUNK_SIZE: u64 = 1024;

/// A whole-file BLAKE3 hash.
pub type Hash = blake3::Hash;

/// Returns true when `size` can be used as a chunk size.
pub fn valid_chunk_size(size: u64) -> bool {
    size >= MIN_CHUNK_SIZE && size.is_power_of_two()
}

/// Number of chunks a file of `len` bytes is cut into (an empty file has one,
/// empty, chunk).
pub fn chunk_count(len: u64, chunk_size: u64) -> u64 {
    if len == 0 {
        1
    } else {
        len.div_ceil(chunk_size)
    }
}

/// Chaining value of the chunk that starts at `offset` in a file made of
/// more than one chunk.
pub fn chunk_cv(offset: u64, data: &[u8]) -> ChainingValue {
    if data.is_empty() {
        // No chunk of a file is empty (an empty file is hashed whole), but
        // a zero-length read or write may name one; BLAKE3 has no chaining
        // value for an empty subtree, so both sides use the hash of nothing.
        return *blake3::hash(&[]).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

/// True when [`cv_at`] can vouch for `len` bytes at `offset`: BLAKE3 gives
/// a chaining value only for a whole subtree, and a subtree starting at
/// chunk N > 0 holds at most the largest power of two dividing N chunks.
/// Checked on everything a peer asks for, which must never panic a handler.
pub fn valid_span(offset: u64, len: u64) -> bool {
    if offset == 0 || offset % MIN_CHUNK_SIZE != 0 {
        return true;
    }
    blake3::hazmat::max_subtree_len(offset).is_none_or(|most| len <= most)
}

/// The chaining value that vouches for `data` read at `offset` when it
/// crosses a network: [`chunk_cv`] where the offset allows it (a multiple of
/// 1 KiB, as every chunk and hole boundary is), else the BLAKE3 of the bytes.
pub fn cv_at(offset: u64, data: &[u8]) -> ChainingValue {
    if offset % MIN_CHUNK_SIZE == 0 {
        chunk_cv(offset, data)
    } else {
        *blake3::hash(data).as_bytes()
    }
}

/// Standard BLAKE3 of a buffer: the hash of a file of one chunk.
pub fn hash_bytes(data: &[u8]) -> Hash {
    blake3::hash(data)
}

/// Composes the whole-file hash of a `len`-byte file from the chaining values
/// of its chunks, in order. Files of one chunk are hashed directly, not
/// through here; `cvs` must then hold `chunk_count(len, chunk_size)` entries.
///
/// Returns `None` when the number of CVs does not fit the length.
pub fn compose(cvs: &[ChainingValue], len: u64, chunk_size: u64) -> Option<Hash> {
    if cvs.len() < 2 || cvs.len() as u64 != chunk_count(len, chunk_size) {
        return None;
    }
    let split = blake3::hazmat::left_subtree_len(len);
    let left_chunks = (split / chunk_size) as usize;
    let left = merge(&cvs[..left_chunks], split, chunk_size);
    let right = merge(&cvs[left_chunks..], len - split, chunk_size);
    Some(merge_subtrees_root(&left, &right, Mode::Hash))
}

fn merge(cvs: &[ChainingValue], len: u64, chunk_size: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let split = blake3::hazmat::left_subtree_len(len);
    let left_chunks = (split / chunk_size) as usize;
    let left = merge(&cvs[..left_chunks], split, chunk_size);
    let right = merge(&cvs[left_chunks..], len - split, chunk_size);
    merge_subtrees_non_root(&left, &right, Mode::Hash)
}

/// Bytes as lower-case hex text, as the journals and manifests tern keeps
/// beside files write them.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What [`hex`] wrote, or None for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Formats a hash the way `b3sum` does.
pub fn to_hex(hash: &Hash) -> String {
    hash.to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_that_are_not_whole_subtrees_are_told_apart_and_the_rest_hash() {
        let data = vec![3u8; 16 << 10];
        for (offset, len, ok) in [
            (0, 16 << 10, true),
            (1024, 1024, true),
            (1024, 2048, false),
            (4096, 4096, true),
            (4096, 8192, false),
            (8192, 8192, true),
            (100, 16 << 10, true),
        ] {
            assert_eq!(valid_span(offset, len), ok, "{len} bytes at {offset}");
            if ok {
                cv_at(offset, &data[..len as usize]);
            }
        }
    }

    fn data(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x9e37_79b9;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn chunked(buf: &[u8], chunk: u64) -> Hash {
        if buf.len() as u64 <= chunk {
            return hash_bytes(buf);
        }
        // Hash the chunks out of order to show order does not matter.
        let n = chunk_count(buf.len() as u64, chunk) as usize;
        let mut cvs = vec![[0u8; 32]; n];
        for i in (0..n).rev() {
            let start = i * chunk as usize;
            let end = (start + chunk as usize).min(buf.len());
            cvs[i] = chunk_cv(start as u64, &buf[start..end]);
        }
        compose(&cvs, buf.len() as u64, chunk).expect("count fits")
    }

    #[test]
    fn composed_hash_equals_plain_blake3() {
        let buf = data(300 * 1024 + 17);
        for chunk in [1024u64, 2048, 4096, 64 * 1024, 256 * 1024] {
            for len in [
                0usize,
                1,
                1023,
                1024,
                1025,
                2048,
                3 * 1024,
                5 * 1024 + 1,
                64 * 1024,
                64 * 1024 + 1,
                200 * 1024 - 3,
                300 * 1024 + 17,
            ] {
                let part = &buf[..len];
                assert_eq!(chunked(part, chunk), blake3::hash(part), "len {len} chunk {chunk}");
            }
        }
    }

    #[test]
    fn compose_rejects_wrong_count() {
        let cv = [0u8; 32];
        assert!(compose(&[cv, cv], 10_000, 1024).is_none());
        assert!(compose(&[cv], 1024, 1024).is_none());
    }

    #[test]
    fn chunk_size_rule() {
        assert!(valid_chunk_size(1024));
        assert!(valid_chunk_size(8 << 20));
        assert!(!valid_chunk_size(512));
        assert!(!valid_chunk_size(3000));
    }

    #[test]
    fn an_empty_range_has_a_value_at_any_offset() {
        // Found by tools/crash_resume.sh: a zero-length read at a non-zero
        // offset made the daemon's handler panic inside BLAKE3.
        for off in [0u64, 1024, 4096, 8 << 20, 12345] {
            assert_eq!(cv_at(off, &[]), *blake3::hash(&[]).as_bytes());
        }
    }
}
