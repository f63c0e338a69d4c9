//! Delta transfer through the engine: a changed file is rebuilt from the
//! destination's old version and the bytes that differ, to the same BLAKE3
//! as the source; a basis that changes under the transfer costs a resend,
//! never a wrong byte.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tern_core::delta::Piece;
use tern_core::engine::Quiet;
use tern_core::{Dest, FileSpec, LocalEndpoint, Meta, Options, Root, Summary};

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof()
        .fill(&mut v);
    v
}

fn copy(src: &Path, dst: &Path, delta: bool) -> Summary {
    let s = tern_core::run(
        vec![Root {
            src: Arc::new(LocalEndpoint::new(src)),
            dst_rel: PathBuf::new(),
        }],
        Arc::new(LocalEndpoint::new(dst)),
        Options {
            chunk_size: 1 << 20,
            fsync: false,
            delta,
            ..Options::default()
        },
        Arc::new(Quiet),
    );
    assert_eq!(s.errors, 0, "{:?}", s.error_messages);
    s
}

#[test]
fn a_changed_file_crosses_as_its_changes_only() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(&src).expect("mkdir");
    fs::create_dir_all(&dst).expect("mkdir");
    let old = random(12 << 20, 1);
    fs::write(dst.join("f"), &old).expect("write");
    // 64 KiB inserted at the start, 4 KiB overwritten in the middle, 8 KiB
    // appended.
    let mut new = random(64 << 10, 2);
    new.extend_from_slice(&old);
    new[6 << 20..(6 << 20) + 4096].fill(0x55);
    new.extend_from_slice(&random(8 << 10, 3));
    fs::write(src.join("f"), &new).expect("write");

    let s = copy(&src, &dst, true);
    assert_eq!(fs::read(dst.join("f")).expect("read"), new);
    assert_eq!(s.copied, 1);
    assert!(s.bytes_written < 256 << 10, "{} bytes sent", s.bytes_written);
    assert_eq!(s.bytes_written + s.bytes_matched, new.len() as u64);
    assert!(fs::read_dir(&dst).expect("list").count() == 1, "a side file was left");

    // Without delta (or with nothing to match) the file crosses whole.
    let other = random(12 << 20, 9);
    fs::write(src.join("f"), &other).expect("write");
    let s = copy(&src, &dst, true);
    assert_eq!(fs::read(dst.join("f")).expect("read"), other);
    assert_eq!((s.bytes_matched, s.bytes_written), (0, other.len() as u64));
    fs::write(src.join("f"), &new).expect("write");
    let s = copy(&src, &dst, false);
    assert_eq!((s.bytes_matched, s.bytes_written), (0, new.len() as u64));
}

#[test]
fn a_basis_that_changes_after_its_signature_is_not_used() {
    let t = tempfile::tempdir().expect("tempdir");
    let old = random(3 << 20, 4);
    fs::write(t.path().join("f"), &old).expect("write");
    let ep = LocalEndpoint::new(t.path());
    let spec = FileSpec {
        size: old.len() as u64,
        chunk_size: 1 << 20,
        resumable: true,
        durable: false,
        source_meta: Meta {
            mode: 0o644,
            ..Meta::default()
        },
        source_changed: Default::default(),
    };
    let w = ep.create(Path::new("f"), &spec).expect("create");
    let sig = w.basis_signature().expect("signature").expect("a basis");
    assert_eq!(sig.size(), old.len() as u64);
    let chunk = &old[..1 << 20];
    let cv = tern_core::hash::chunk_cv(0, chunk);
    let whole = [Piece::Copy {
        offset: 0,
        len: 1 << 20,
    }];
    // The basis is rewritten in place after its signature was taken.
    fs::write(t.path().join("f"), random(3 << 20, 5)).expect("rewrite");
    assert!(!w.write_delta(0, 0, 1 << 20, &whole, &[], &cv).expect("delta"));
    // A recipe reading outside the basis is an error, not a read.
    let outside = [Piece::Copy {
        offset: 3 << 20,
        len: 1 << 20,
    }];
    let e = w.write_delta(0, 0, 1 << 20, &outside, &[], &cv).expect_err("outside");
    assert!(e.to_string().contains("past the basis"), "{e}");
    w.abort(false);
}

/// Issue 15: copies of a file in the tree cost one; a file of the same size
/// that only starts, ends and is centred like it is built from it where
/// its chunks are the same, and one of the same size that differs is sent
/// whole.
#[test]
fn copies_of_a_file_in_the_run_are_built_from_the_first() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("sub")).expect("mkdir");
    let mib = 1u64 << 20;
    let a = random(12 << 20, 1);
    let mut near = a.clone();
    near[(5 << 20) + 100] ^= 1;
    fs::write(src.join("a"), &a).expect("write");
    fs::write(src.join("b"), &a).expect("write");
    fs::write(src.join("sub/c"), &a).expect("write");
    fs::write(src.join("d"), random(12 << 20, 2)).expect("write");
    fs::write(src.join("e"), &near).expect("write");

    let s = copy(&src, &dst, true);
    for (name, want) in [("a", &a), ("b", &a), ("sub/c", &a), ("e", &near)] {
        assert!(fs::read(dst.join(name)).expect("read") == *want, "{name}");
    }
    assert_eq!(
        fs::read(dst.join("d")).expect("read"),
        fs::read(src.join("d")).expect("read")
    );
    assert_eq!(s.copied, 5);
    // a and d whole, and the one chunk of e that differs.
    assert_eq!(s.bytes_written, 25 * mib, "{s:?}");
    assert_eq!(s.bytes_deduplicated, 35 * mib, "{s:?}");
    assert_eq!(s.bytes_matched, 0);

    // Without delta, every copy is written.
    let dst2 = t.path().join("dst2");
    let s = copy(&src, &dst2, false);
    assert_eq!((s.bytes_written, s.bytes_deduplicated), (60 * mib, 0));
}

/// Issue 15: files smaller than a chunk are sent as their difference too,
/// down to 64 KiB; smaller ones travel whole in batches.
#[test]
fn files_under_a_chunk_cross_as_their_changes() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(&src).expect("mkdir");
    fs::create_dir_all(&dst).expect("mkdir");
    let sizes = [64 << 10, 100 << 10, 300 << 10, 700 << 10, (1 << 20) - 1, 32 << 10];
    let mut total = 0;
    for (k, &n) in sizes.iter().enumerate() {
        let old = random(n, 10 + k as u64);
        fs::write(dst.join(format!("f{k}")), &old).expect("write");
        // An older version: same size, older time.
        let f = fs::File::options()
            .write(true)
            .open(dst.join(format!("f{k}")))
            .expect("open");
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .expect("mtime");
        let mut new = old.clone();
        new[n / 2..n / 2 + 100].fill(0xEE);
        fs::write(src.join(format!("f{k}")), &new).expect("write");
        total += n as u64;
    }
    let s = copy(&src, &dst, true);
    for k in 0..sizes.len() {
        let name = format!("f{k}");
        let (got, want) = (
            fs::read(dst.join(&name)).expect("read"),
            fs::read(src.join(&name)).expect("read"),
        );
        let first = got.iter().zip(&want).position(|(a, b)| a != b);
        assert!(
            got == want,
            "{name}: {} vs {} bytes, first difference at {first:?}; {s:?}",
            got.len(),
            want.len()
        );
    }
    // The 32 KiB file whole; each of the others a few 2-8 KiB chunks.
    assert!(s.bytes_written < (32 << 10) + 5 * (24 << 10), "{s:?}");
    assert_eq!(s.bytes_written + s.bytes_matched, total);
}
