//! The engine against endpoints that fail on purpose: a source file that
//! vanishes when opened, a destination that runs out of space mid-file.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blake3::hazmat::ChainingValue;
use tern_core::endpoint::{FileSpec, ReadFile, WriteFile, Xattrs};
use tern_core::engine::{Options, Quiet, Root};
use tern_core::entry::{Entry, Kind, Meta};
use tern_core::hash::Hash;
use tern_core::{Dest, Error, LocalEndpoint, Result, Source};

fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, data).expect("write");
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn side_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(side_files(&p));
        } else if p.to_string_lossy().contains(".tern.") {
            out.push(p);
        }
    }
    out
}

/// The `Source` methods a wrapper passes straight to `self.inner`.
macro_rules! delegate_listing {
    () => {
        fn describe(&self, rel: &Path) -> String {
            self.inner.describe(rel)
        }
        fn stat(&self, rel: &Path) -> Result<Option<Entry>> {
            self.inner.stat(rel)
        }
        fn read_dir(&self, rel: &Path) -> Result<Vec<Entry>> {
            self.inner.read_dir(rel)
        }
        fn xattrs(&self, rel: &Path) -> Result<Xattrs> {
            self.inner.xattrs(rel)
        }
    };
}

/// Deletes `victim` just before it is opened.
struct Vanishing {
    inner: LocalEndpoint,
    root: PathBuf,
    victim: OsString,
}

impl Source for Vanishing {
    delegate_listing!();
    fn open(&self, rel: &Path, expect: &Entry) -> Result<Box<dyn ReadFile>> {
        if rel.file_name() == Some(self.victim.as_os_str()) {
            fs::remove_file(self.root.join(rel)).expect("remove victim");
        }
        self.inner.open(rel, expect)
    }
}

#[test]
fn a_vanished_source_file_fails_alone() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("a.txt"), b"a");
    write(&src.join("gone.txt"), b"soon gone");
    write(&src.join("big.bin"), &bytes(300_000, 1));
    let dst = t.path().join("dst");
    let source = Arc::new(Vanishing {
        inner: LocalEndpoint::new(&src),
        root: src.clone(),
        victim: "gone.txt".into(),
    });
    let opts = Options {
        chunk_size: 64 << 10,
        ..Options::default()
    };
    let s = tern_core::run(
        vec![Root {
            src: source,
            dst_rel: PathBuf::new(),
        }],
        Arc::new(LocalEndpoint::new(&dst)),
        opts,
        Arc::new(Quiet),
    );
    assert_eq!(s.errors, 1, "{:?}", s.error_messages);
    assert!(s.error_messages[0].contains("gone.txt") && s.error_messages[0].contains("vanished"));
    assert_eq!(s.copied, 2, "the two others were copied");
    assert_eq!(fs::read(dst.join("a.txt")).expect("a"), b"a");
    assert_eq!(fs::read(dst.join("big.bin")).expect("big"), bytes(300_000, 1));
    assert!(!dst.join("gone.txt").exists());
    assert!(side_files(&dst).is_empty());
}

/// A local destination whose writes to one file fail with ENOSPC from chunk
/// `fail_at` on.
struct FullDisk {
    inner: LocalEndpoint,
    victim: PathBuf,
    fail_at: u64,
}

struct FullFile {
    inner: Box<dyn WriteFile>,
    fail_at: u64,
}

impl WriteFile for FullFile {
    fn resumed(&self) -> Vec<(u64, ChainingValue)> {
        self.inner.resumed()
    }
    fn write_chunk(
        &self,
        index: u64,
        offset: u64,
        data: &[u8],
        holes: &[(u64, u64)],
        cv: Option<&ChainingValue>,
    ) -> Result<()> {
        if index >= self.fail_at {
            return Err(Error::io(
                Path::new("victim"),
                "write",
                io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        self.inner.write_chunk(index, offset, data, holes, cv)
    }
    fn set_meta(&self, meta: &Meta, owner: bool, xattrs: &Xattrs) -> Result<()> {
        self.inner.set_meta(meta, owner, xattrs)
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn verify(&self, expected: &Hash) -> Result<()> {
        self.inner.verify(expected)
    }
    fn publish(self: Box<Self>) -> Result<()> {
        self.inner.publish()
    }
    fn abort(self: Box<Self>, keep: bool) {
        self.inner.abort(keep)
    }
}

impl Source for FullDisk {
    delegate_listing!();
    fn open(&self, rel: &Path, expect: &Entry) -> Result<Box<dyn ReadFile>> {
        self.inner.open(rel, expect)
    }
}

impl Dest for FullDisk {
    fn make_dir(&self, rel: &Path) -> Result<()> {
        self.inner.make_dir(rel)
    }
    fn create(&self, rel: &Path, spec: &FileSpec) -> Result<Box<dyn WriteFile>> {
        let w = self.inner.create(rel, spec)?;
        if rel == self.victim {
            return Ok(Box::new(FullFile {
                inner: w,
                fail_at: self.fail_at,
            }));
        }
        Ok(w)
    }
    fn symlink(&self, rel: &Path, target: &Path, meta: &Meta, owner: bool) -> Result<()> {
        self.inner.symlink(rel, target, meta, owner)
    }
    fn hard_link(&self, existing: &Path, rel: &Path) -> Result<bool> {
        self.inner.hard_link(existing, rel)
    }
    fn set_meta(&self, rel: &Path, kind: Kind, meta: &Meta, owner: bool, xattrs: Option<&Xattrs>) -> Result<()> {
        self.inner.set_meta(rel, kind, meta, owner, xattrs)
    }
    fn remove(&self, rel: &Path) -> Result<()> {
        self.inner.remove(rel)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn can_chown(&self) -> bool {
        self.inner.can_chown()
    }
}

#[test]
fn a_write_failure_mid_file_keeps_the_old_version_and_leaves_no_debris() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("big.bin"), &bytes(500_000, 2));
    write(&src.join("small.txt"), b"small");
    let dst = t.path().join("dst");
    write(&dst.join("big.bin"), b"previous version");
    for (fail_at, jobs) in [(0, 1), (3, 1), (3, 4)] {
        let opts = Options {
            chunk_size: 64 << 10,
            jobs,
            delete: true,
            ..Options::default()
        };
        write(&dst.join("extra"), b"would be deleted");
        let s = tern_core::run(
            vec![Root {
                src: Arc::new(LocalEndpoint::new(&src)),
                dst_rel: PathBuf::new(),
            }],
            Arc::new(FullDisk {
                inner: LocalEndpoint::new(&dst),
                victim: PathBuf::from("big.bin"),
                fail_at,
            }),
            opts,
            Arc::new(Quiet),
        );
        assert_eq!(s.errors, 1, "{:?}", s.error_messages);
        assert!(
            s.error_messages[0].contains("no space left on device"),
            "{:?}",
            s.error_messages
        );
        assert_eq!(fs::read(dst.join("big.bin")).expect("old"), b"previous version");
        assert_eq!(fs::read(dst.join("small.txt")).expect("small"), b"small");
        assert!(dst.join("extra").exists(), "no deletions after an error");
        assert!(s.deletions_skipped);
        assert!(side_files(&dst).is_empty(), "{:?}", side_files(&dst));
    }
}

#[test]
fn a_planted_resume_is_rehashed_against_the_source_and_only_true_chunks_are_kept() {
    let t = tempfile::tempdir().expect("tempdir");
    let cs = 64u64 << 10;
    let src = t.path().join("src");
    let data = bytes(5 * cs as usize - 100, 4);
    write(&src.join("big.bin"), &data);
    let dst = t.path().join("dst");
    fs::create_dir(&dst).expect("mkdir");

    // Someone who can write the destination directory plants a partial
    // file whose chunk 1 is theirs, and a journal (with the public default
    // key) that vouches for it and for chunk 2, which is the source's.
    let e = LocalEndpoint::new(&src)
        .stat(Path::new("big.bin"))
        .expect("stat")
        .expect("exists");
    let spec = FileSpec {
        size: e.size,
        chunk_size: cs,
        resumable: true,
        durable: true,
        source_meta: e.meta.clone(),
        source_changed: e.changed,
    };
    let mut planted = data.clone();
    planted[cs as usize..2 * cs as usize].fill(0xee);
    fs::write(dst.join(".big.bin.tern.tmp"), &planted).expect("plant");
    let cv = |i: usize| tern_core::hash::chunk_cv(i as u64 * cs, &planted[i * cs as usize..(i + 1) * cs as usize]);
    tern_core::journal::Journal::create(
        &dst.join(".big.bin.tern.journal"),
        &spec,
        &tern_core::journal::DEFAULT_KEY,
        &[(1, cv(1)), (2, cv(2))],
    )
    .expect("journal");

    let s = tern_core::run(
        vec![Root {
            src: Arc::new(LocalEndpoint::new(&src)),
            dst_rel: PathBuf::new(),
        }],
        Arc::new(LocalEndpoint::new(&dst)),
        Options {
            chunk_size: cs,
            jobs: 3,
            ..Options::default()
        },
        Arc::new(Quiet),
    );
    assert_eq!(s.errors, 0, "{:?}", s.error_messages);
    assert_eq!(
        blake3::hash(&fs::read(dst.join("big.bin")).expect("read")),
        blake3::hash(&data),
        "the planted chunk was committed"
    );
    assert_eq!(
        s.bytes_resumed, cs,
        "only the chunk that matches the source counts as resumed"
    );
    assert_eq!(s.bytes_written, data.len() as u64 - cs);
    assert!(side_files(&dst).is_empty(), "{:?}", side_files(&dst));
}
