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

/// Issue 15: a large file renamed at the source is built from its old name,
/// which only the destination still has, edited or not; a file of another
/// size is not taken for it.
#[test]
fn a_renamed_file_is_built_from_its_old_name() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(src.join("d")).expect("mkdir");
    fs::create_dir_all(dst.join("d")).expect("mkdir");
    let mib = 1u64 << 20;
    let a = random(6 << 20, 1);
    let b = random(5 << 20, 2);
    let mut b2 = b.clone();
    b2[(2 << 20) + 7] ^= 1;
    fs::write(dst.join("d/a.old"), &a).expect("write");
    fs::write(dst.join("d/b.old"), &b).expect("write");
    fs::write(src.join("d/a.new"), &a).expect("write");
    fs::write(src.join("d/b.new"), &b2).expect("write");
    fs::write(src.join("d/c"), random(7 << 20, 3)).expect("write");

    let s = copy(&src, &dst, true);
    assert_eq!(fs::read(dst.join("d/a.new")).expect("read"), a);
    assert_eq!(fs::read(dst.join("d/b.new")).expect("read"), b2);
    // The old names stay (no --delete), untouched.
    assert_eq!(fs::read(dst.join("d/a.old")).expect("read"), a);
    assert_eq!(fs::read(dst.join("d/b.old")).expect("read"), b);
    assert_eq!(s.copied, 3);
    // c whole, and about a chunk of b's edit.
    assert!(s.bytes_written < 7 * mib + 64 * 1024, "{s:?}");
    assert!(s.bytes_deduplicated > 11 * mib - 64 * 1024, "{s:?}");
}

/// Issue 15: copies of small files cost one each, however the copies fall
/// into batches (the same batch, batches in flight together, or later
/// ones): the others are built at the destination from the first that
/// landed. Files under 512 bytes and files that only share a size travel
/// whole.
#[test]
fn copies_of_small_files_in_the_run_are_built_from_the_first() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    let (mut unique, mut total) = (0u64, 0u64);
    let mut files = Vec::new();
    for k in 0..40u64 {
        let f = random(1000 + 97 * k as usize, k);
        unique += f.len() as u64;
        files.push(f);
    }
    // Eight copies of the tree: 320 files, more than one batch holds.
    for c in 0..8 {
        for (k, f) in files.iter().enumerate() {
            let p = src.join(format!("copy{c}/f{k}"));
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, f).expect("write");
            total += f.len() as u64;
        }
    }
    // Same size as f0, other bytes; and a tiny file, twice.
    let other = random(1000, 99);
    fs::write(src.join("other"), &other).expect("write");
    fs::write(src.join("tiny-a"), b"tiny").expect("write");
    fs::write(src.join("tiny-b"), b"tiny").expect("write");

    let s = copy(&src, &dst, true);
    for c in 0..8 {
        for (k, f) in files.iter().enumerate() {
            let p = format!("copy{c}/f{k}");
            assert!(fs::read(dst.join(&p)).expect("read") == *f, "{p}");
        }
    }
    assert_eq!(fs::read(dst.join("other")).expect("read"), other);
    assert_eq!(fs::read(dst.join("tiny-b")).expect("read"), b"tiny");
    assert_eq!(s.copied, 323);
    assert_eq!(s.bytes_written, unique + 1000 + 8, "{s:?}");
    assert_eq!(s.bytes_deduplicated, total - unique, "{s:?}");

    // Without delta, every copy is written.
    let s = copy(&src, &t.path().join("dst2"), false);
    assert_eq!((s.bytes_written, s.bytes_deduplicated), (total + 1008, 0));
}

/// Issue 15: files smaller than a chunk are sent as their difference too,
/// in their batch, down to 16 KiB; smaller ones travel whole.
#[test]
fn files_under_a_chunk_cross_as_their_changes() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(&src).expect("mkdir");
    fs::create_dir_all(&dst).expect("mkdir");
    let sizes = [
        64 << 10,
        100 << 10,
        300 << 10,
        700 << 10,
        (1 << 20) - 1,
        32 << 10,
        8 << 10,
    ];
    let mut total = 0;
    for (k, &n) in sizes.iter().enumerate() {
        let old = random(n, 10 + k as u64);
        older(&dst.join(format!("f{k}")), &old);
        let mut new = old.clone();
        new[n / 2..n / 2 + 100].fill(0xEE);
        fs::write(src.join(format!("f{k}")), &new).expect("write");
        total += n as u64;
    }
    let s = copy(&src, &dst, true);
    same_trees(&src, &dst, sizes.len(), &s);
    // The 8 KiB file whole; each of the others a few 0.5-8 KiB chunks.
    assert!(s.bytes_written < (8 << 10) + 6 * (24 << 10), "{s:?}");
    assert!(s.bytes_matched > total - (8 << 10) - 6 * (24 << 10), "{s:?}");
    assert_eq!(s.bytes_written + s.bytes_matched, total);
}

/// Writes `data` at `path` with a time long past, as an old version.
fn older(path: &Path, data: &[u8]) {
    fs::write(path, data).expect("write");
    let f = fs::File::options().write(true).open(path).expect("open");
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
        .expect("mtime");
}

/// Files `f0`.. `f{n-1}` are the same in both trees.
fn same_trees(src: &Path, dst: &Path, n: usize, s: &Summary) {
    for k in 0..n {
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
}

/// A local destination whose old versions are rewritten right after their
/// signatures are taken, as another writer might.
struct Rewritten(LocalEndpoint, PathBuf, std::sync::atomic::AtomicUsize);

impl tern_core::Source for Rewritten {
    fn describe(&self, rel: &Path) -> String {
        self.0.describe(rel)
    }
    fn stat(&self, rel: &Path) -> tern_core::Result<Option<tern_core::Entry>> {
        self.0.stat(rel)
    }
    fn read_dir(&self, rel: &Path) -> tern_core::Result<Vec<tern_core::Entry>> {
        self.0.read_dir(rel)
    }
    fn open(&self, rel: &Path, expect: &tern_core::Entry) -> tern_core::Result<Box<dyn tern_core::ReadFile>> {
        self.0.open(rel, expect)
    }
    fn xattrs(&self, rel: &Path) -> tern_core::Result<tern_core::Xattrs> {
        self.0.xattrs(rel)
    }
}

impl Dest for Rewritten {
    fn make_dir(&self, rel: &Path) -> tern_core::Result<()> {
        self.0.make_dir(rel)
    }
    fn create(&self, rel: &Path, spec: &FileSpec) -> tern_core::Result<Box<dyn tern_core::WriteFile>> {
        self.0.create(rel, spec)
    }
    fn symlink(&self, rel: &Path, target: &Path, meta: &Meta, owner: bool) -> tern_core::Result<()> {
        self.0.symlink(rel, target, meta, owner)
    }
    fn hard_link(&self, existing: &Path, rel: &Path) -> tern_core::Result<bool> {
        self.0.hard_link(existing, rel)
    }
    fn set_meta(
        &self,
        rel: &Path,
        kind: tern_core::Kind,
        meta: &Meta,
        owner: bool,
        xattrs: Option<&tern_core::Xattrs>,
    ) -> tern_core::Result<()> {
        self.0.set_meta(rel, kind, meta, owner, xattrs)
    }
    fn remove(&self, rel: &Path) -> tern_core::Result<()> {
        self.0.remove(rel)
    }
    fn barrier(&self) -> tern_core::Result<()> {
        self.0.barrier()
    }
    fn can_chown(&self) -> bool {
        self.0.can_chown()
    }
    fn basis_signatures(&self, items: &[(&Path, u64)]) -> Vec<Option<tern_core::delta::Signature>> {
        let sigs = self.0.basis_signatures(items);
        let given = sigs.iter().filter(|s| s.is_some()).count();
        self.2.fetch_add(given, std::sync::atomic::Ordering::Relaxed);
        for (rel, size) in items {
            let mut b = fs::read(self.1.join(rel)).expect("read");
            b.iter_mut().take(size.div_ceil(2) as usize).for_each(|x| *x = !*x);
            fs::write(self.1.join(rel), b).expect("rewrite");
        }
        sigs
    }
}

/// Issue 15: a small file whose old version changes between its signature
/// and its delta is not built from it: it is sent again whole, and lands as
/// its source is.
#[test]
fn a_small_file_whose_basis_changed_is_sent_again_whole() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    fs::create_dir_all(&src).expect("mkdir");
    fs::create_dir_all(&dst).expect("mkdir");
    let n = 200 << 10;
    let old = random(n, 40);
    older(&dst.join("f0"), &old);
    let mut new = old.clone();
    new[n - 100..].fill(1);
    fs::write(src.join("f0"), &new).expect("write");
    let dest = Arc::new(Rewritten(LocalEndpoint::new(&dst), dst.clone(), Default::default()));
    let s = tern_core::run(
        vec![Root {
            src: Arc::new(LocalEndpoint::new(&src)),
            dst_rel: PathBuf::new(),
        }],
        dest.clone(),
        Options {
            fsync: false,
            delta: true,
            ..Options::default()
        },
        Arc::new(Quiet),
    );
    assert_eq!((s.errors, s.copied), (0, 1), "{s:?}");
    same_trees(&src, &dst, 1, &s);
    assert_eq!((s.bytes_written, s.bytes_matched), (n as u64, 0), "{s:?}");
    // A delta was tried: the old version's signature was taken.
    assert_eq!(dest.2.load(std::sync::atomic::Ordering::Relaxed), 1);
}
