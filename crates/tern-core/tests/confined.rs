//! A confined endpoint (what the daemon exports) never reads or writes
//! outside its root, whatever paths it is given and whatever is planted or
//! swapped inside the tree.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use tern_core::{Dest, Entry, FileSpec, Kind, LocalEndpoint, Meta, Source};

struct Setup {
    _tmp: tempfile::TempDir,
    module: PathBuf,
    outside: PathBuf,
    ep: LocalEndpoint,
}

/// A module directory and, beside it, an "outside" directory holding a
/// secret file that must never be read, changed or replaced.
fn setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let module = tmp.path().join("module");
    let outside = tmp.path().join("outside");
    fs::create_dir(&module).expect("mkdir");
    fs::create_dir(&outside).expect("mkdir");
    fs::write(outside.join("secret"), b"secret").expect("write");
    fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let ep = LocalEndpoint::confined(&module).expect("confined");
    Setup {
        _tmp: tmp,
        module,
        outside,
        ep,
    }
}

impl Setup {
    fn outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec!["secret"], "nothing may appear outside the module");
        let md = fs::metadata(self.outside.join("secret")).expect("stat");
        assert_eq!(fs::read(self.outside.join("secret")).expect("read"), b"secret");
        assert_eq!(md.mode() & 0o7777, 0o600);
        assert_eq!(md.nlink(), 1);
    }
}

fn spec(size: u64, resumable: bool) -> FileSpec {
    FileSpec {
        size,
        chunk_size: 1024,
        resumable,
        durable: false,
        source_meta: Meta {
            mode: 0o644,
            ..Meta::default()
        },
        source_changed: Default::default(),
    }
}

fn file_entry(size: u64) -> Entry {
    Entry {
        name: "x".into(),
        kind: Kind::File,
        size,
        meta: Meta::default(),
        target: None,
        file_id: None,
        nlink: 1,
        allocated: 0,
        changed: Default::default(),
    }
}

fn escapes() -> Vec<PathBuf> {
    let outside_abs = PathBuf::from("/etc/passwd");
    vec![
        PathBuf::from("../outside/secret"),
        PathBuf::from("a/../../outside/secret"),
        outside_abs,
        PathBuf::from("./x"),
    ]
}

#[test]
fn dot_dot_absolute_and_dot_paths_are_refused_for_every_operation() {
    let s = setup();
    fs::create_dir(s.module.join("a")).expect("mkdir");
    for p in escapes() {
        assert!(s.ep.stat(&p).is_err(), "stat {p:?}");
        assert!(s.ep.read_dir(&p).is_err(), "read_dir {p:?}");
        assert!(s.ep.open(&p, &file_entry(6)).is_err(), "open {p:?}");
        assert!(s.ep.create(&p, &spec(1, false)).is_err(), "create {p:?}");
        assert!(s.ep.create(&p, &spec(1, true)).is_err(), "create resumable {p:?}");
        assert!(s.ep.make_dir(&p).is_err(), "mkdir {p:?}");
        assert!(s.ep.remove(&p).is_err(), "remove {p:?}");
        assert!(
            s.ep.symlink(&p, Path::new("t"), &Meta::default(), false).is_err(),
            "symlink {p:?}"
        );
        assert!(s.ep.hard_link(&p, Path::new("l")).is_err(), "hard link from {p:?}");
        let m = Meta {
            mode: 0o777,
            ..Meta::default()
        };
        assert!(
            s.ep.set_meta(&p, Kind::File, &m, false, None).is_err(),
            "set_meta {p:?}"
        );
        assert!(s.ep.xattrs(&p).is_err(), "xattrs {p:?}");
    }
    s.outside_untouched();
}

#[test]
fn a_symlink_to_outside_is_never_followed_as_a_directory_or_a_file() {
    let s = setup();
    symlink(&s.outside, s.module.join("out")).expect("symlink");
    symlink(s.outside.join("secret"), s.module.join("sec")).expect("symlink");
    symlink("../outside", s.module.join("rel_out")).expect("symlink");

    for dir in ["out", "rel_out"] {
        let inside = Path::new(dir).join("secret");
        let e = s.ep.stat(&inside).expect_err("stat through a symlink out");
        assert!(e.to_string().contains("outside the module"), "{e}");
        assert!(s.ep.read_dir(Path::new(dir)).is_err(), "listing {dir}");
        assert!(s.ep.open(&inside, &file_entry(6)).is_err());
        assert!(s.ep.create(&Path::new(dir).join("new"), &spec(3, false)).is_err());
        assert!(s.ep.create(&Path::new(dir).join("new"), &spec(3, true)).is_err());
        assert!(s.ep.make_dir(&Path::new(dir).join("d")).is_err());
        assert!(s.ep.remove(&inside).is_err());
    }
    // The final symlink is an entry of its own: statted, never followed.
    let e = s.ep.stat(Path::new("sec")).expect("stat").expect("exists");
    assert_eq!(e.kind, Kind::Symlink);
    assert!(
        s.ep.open(Path::new("sec"), &file_entry(6)).is_err(),
        "open must not follow"
    );
    let m = Meta {
        mode: 0o777,
        ..Meta::default()
    };
    s.ep.set_meta(Path::new("sec"), Kind::Dir, &m, false, None).ok();
    s.ep.set_meta(Path::new("out"), Kind::Dir, &m, false, None).ok();
    // Hard-linking the symlink links the symlink, not the secret.
    assert!(s.ep.hard_link(Path::new("sec"), Path::new("hl")).expect("link"));
    assert!(fs::symlink_metadata(s.module.join("hl"))
        .expect("stat")
        .file_type()
        .is_symlink());
    // Removing the symlink removes only the symlink.
    s.ep.remove(Path::new("out")).expect("remove");
    assert!(!s.module.join("out").exists());
    s.outside_untouched();
}

#[test]
fn a_planted_journal_symlink_is_not_followed() {
    let s = setup();
    symlink(s.outside.join("secret"), s.module.join(".big.tern.journal")).expect("symlink");
    symlink(s.outside.join("secret"), s.module.join(".big2.tern.tmp")).expect("symlink");
    // The planted links lose their names to new files; the secret stays.
    let _w = s.ep.create(Path::new("big"), &spec(4096, true)).expect("create");
    let _w2 = s.ep.create(Path::new("big2"), &spec(4096, true)).expect("create");
    for side in [".big.tern.journal", ".big2.tern.tmp"] {
        assert!(
            fs::symlink_metadata(s.module.join(side)).expect("stat").is_file(),
            "{side}"
        );
    }
    s.outside_untouched();
}

#[test]
fn a_directory_swapped_for_a_symlink_mid_write_keeps_the_write_inside() {
    let s = setup();
    fs::create_dir(s.module.join("d")).expect("mkdir");
    let w = s.ep.create(Path::new("d/f"), &spec(5, true)).expect("create");
    fs::rename(s.module.join("d"), s.module.join("d_old")).expect("rename");
    symlink(&s.outside, s.module.join("d")).expect("symlink");
    w.write_chunk(0, 0, b"hello", &[], None).expect("write");
    w.publish().expect("publish");
    assert_eq!(fs::read(s.module.join("d_old/f")).expect("read"), b"hello");
    s.outside_untouched();
}

#[test]
fn fifos_and_devices_are_not_opened() {
    let s = setup();
    let fifo = s.module.join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("cstr");
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let tmp_fifo = s.module.join(".g.tern.tmp");
    let c = std::ffi::CString::new(tmp_fifo.as_os_str().as_encoded_bytes()).expect("cstr");
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    symlink("/dev/zero", s.module.join("zero")).expect("symlink");

    // Opening a FIFO for reading would block until a writer came: it must
    // fail at once instead. Bounded so a regression fails, not hangs.
    let (tx, rx) = mpsc::channel();
    let ep = s.ep.clone();
    std::thread::spawn(move || {
        let r = (
            ep.open(Path::new("fifo"), &file_entry(0)).is_err(),
            ep.open(Path::new("zero"), &file_entry(0)).is_err(),
            // The FIFO at the temporary name is replaced, never opened.
            ep.create(Path::new("g"), &spec(10, true)).is_ok(),
        );
        let _ = tx.send(r);
    });
    let r = rx.recv_timeout(Duration::from_secs(20)).expect("open of a FIFO hung");
    assert_eq!(r, (true, true, true));
    assert!(fs::symlink_metadata(&tmp_fifo).expect("stat").is_file());
    s.outside_untouched();
}

#[test]
fn ordinary_use_inside_the_module_works() {
    let s = setup();
    fs::create_dir(s.module.join("sub")).expect("mkdir");
    fs::write(s.module.join("sub/in"), b"inside").expect("write");
    // A symlink that stays inside may be traversed as a directory.
    symlink("sub", s.module.join("alias")).expect("symlink");
    let e = s.ep.stat(Path::new("alias/in")).expect("stat").expect("exists");
    assert_eq!(e.size, 6);
    let names: Vec<_> =
        s.ep.read_dir(Path::new("sub"))
            .expect("list")
            .into_iter()
            .map(|e| e.name)
            .collect();
    assert_eq!(names, vec!["in"]);
    let root = s.ep.stat(Path::new("")).expect("stat").expect("root");
    assert_eq!(root.kind, Kind::Dir);

    s.ep.make_dir(Path::new("new")).expect("mkdir");
    for resumable in [false, true] {
        let name = format!("new/f{resumable}");
        let w = s.ep.create(Path::new(&name), &spec(3, resumable)).expect("create");
        w.write_chunk(0, 0, b"abc", &[], None).expect("write");
        w.set_meta(
            &Meta {
                mode: 0o640,
                ..Meta::default()
            },
            false,
            &Vec::new(),
        )
        .expect("meta");
        w.publish().expect("publish");
        let md = fs::metadata(s.module.join(&name)).expect("stat");
        assert_eq!(md.mode() & 0o777, 0o640);
        assert_eq!(fs::read(s.module.join(&name)).expect("read"), b"abc");
    }
    let rf =
        s.ep.open(
            Path::new("sub/in"),
            &s.ep.stat(Path::new("sub/in")).expect("stat").expect("e"),
        )
        .expect("open");
    let mut buf = [0u8; 6];
    rf.read_exact_at(0, &mut buf).expect("read");
    assert_eq!(&buf, b"inside");
    s.ep.remove(Path::new("new")).expect("remove");
    assert!(!s.module.join("new").exists());
    s.outside_untouched();
}

/// The side-file names of `name`, in the module's root directory: the
/// temporary file and the journal.
fn side_names(name: &str) -> (String, String) {
    if name.len() <= 240 {
        (format!(".{name}.tern.tmp"), format!(".{name}.tern.journal"))
    } else {
        let h = blake3::hash(name.as_bytes()).to_hex();
        (format!(".tern-{}.tmp", &h[..32]), format!(".tern-{}.journal", &h[..32]))
    }
}

/// Writes every chunk of `data` (1 KiB chunks) to `w` and journals it.
fn write_all_chunks(w: &dyn tern_core::WriteFile, data: &[u8], only: impl Fn(u64) -> bool) {
    for (i, c) in data.chunks(1024).enumerate() {
        let (i, off) = (i as u64, i as u64 * 1024);
        if only(i) {
            let cv = tern_core::hash::chunk_cv(off, c);
            w.write_chunk(i, off, c, &[], Some(&cv)).expect("write");
        }
    }
}

#[test]
fn hard_links_planted_at_side_file_names_are_not_written_through() {
    let s = setup();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    for name in ["short", &"long".repeat(62)] {
        let (tmp, journal) = side_names(name);
        // Two files of the module, each given a side-file name as well.
        for (victim, side) in [("victim_tmp", &tmp), ("victim_journal", &journal)] {
            fs::write(s.module.join(victim), b"precious").expect("write");
            fs::hard_link(s.module.join(victim), s.module.join(side)).expect("link");
        }
        let w = s.ep.create(Path::new(name), &spec(3000, true)).expect("create");
        assert!(w.resumed().is_empty());
        write_all_chunks(&*w, &data, |_| true);
        w.publish().expect("publish");
        assert_eq!(fs::read(s.module.join(name)).expect("read"), data);
        for victim in ["victim_tmp", "victim_journal"] {
            let p = s.module.join(victim);
            assert_eq!(
                fs::read(&p).expect("read"),
                b"precious",
                "{name}: {victim} written through"
            );
            assert_eq!(fs::metadata(&p).expect("stat").nlink(), 1);
            fs::remove_file(p).expect("rm");
        }
    }
    s.outside_untouched();
}

#[test]
fn a_journal_written_with_another_key_or_as_a_fifo_is_ignored_at_once() {
    let s = setup();
    let data = vec![7u8; 3000];
    let sp = spec(3000, true);
    let (tmp, journal) = side_names("f");
    // A partial file and a journal forged with the public default key.
    let cv = tern_core::hash::chunk_cv(0, &data[..1024]);
    let plant = || {
        fs::write(s.module.join(&tmp), &data).expect("write");
        let key = &tern_core::journal::DEFAULT_KEY;
        tern_core::journal::Journal::create(&s.module.join(&journal), &sp, key, &[(0, cv)]).expect("journal");
    };
    plant();
    let keyed = LocalEndpoint::confined(&s.module)
        .expect("confined")
        .with_journal_key([9; 32]);
    let w = keyed.create(Path::new("f"), &sp).expect("create");
    assert!(
        w.resumed().is_empty(),
        "a journal without the endpoint's key was trusted"
    );
    w.abort(true);
    // The same journal is good for an endpoint with the default key: it was
    // the key that made the difference.
    plant();
    let w = s.ep.create(Path::new("f"), &sp).expect("create");
    assert_eq!(w.resumed(), vec![(0, cv)]);
    w.abort(false);

    // A FIFO at the journal name neither blocks the create nor is read.
    fs::write(s.module.join(&tmp), &data).expect("write");
    let c = std::ffi::CString::new(s.module.join(&journal).into_os_string().into_encoded_bytes()).expect("cstr");
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let (tx, rx) = mpsc::channel();
    let ep = s.ep.clone();
    std::thread::spawn(move || {
        let _ = tx.send(
            ep.create(Path::new("f"), &spec(3000, true))
                .map(|w| w.resumed().len())
                .ok(),
        );
    });
    let r = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a FIFO journal hung the create");
    assert_eq!(r, Some(0));
    assert!(fs::symlink_metadata(s.module.join(&journal)).expect("stat").is_file());
    s.outside_untouched();
}

#[test]
fn a_resumable_file_is_published_only_when_every_chunk_arrived() {
    let s = setup();
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 13) as u8).collect();
    let w = s.ep.create(Path::new("f"), &spec(3000, true)).expect("create");
    write_all_chunks(&*w, &data, |i| i != 1);
    let e = w.publish().expect_err("published with a chunk missing");
    assert!(e.to_string().contains("1 of its 3 chunks were never written"), "{e}");
    assert!(
        !s.module.join("f").exists(),
        "a file with a zero-filled gap at its final name"
    );
    // What was written is kept for a resume, which completes it.
    let w = s.ep.create(Path::new("f"), &spec(3000, true)).expect("create");
    assert_eq!(w.resumed().iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 2]);
    write_all_chunks(&*w, &data, |i| i == 1);
    w.publish().expect("publish");
    assert_eq!(fs::read(s.module.join("f")).expect("read"), data);
    s.outside_untouched();
}

/// Sets the mtime of `p` (not following a symlink) `days` ago.
fn age(p: &Path, days: u64) {
    let then = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    let f = fs::OpenOptions::new().write(true).open(p).expect("open");
    f.set_modified(then).expect("set mtime");
}

#[test]
fn abandoned_side_files_expire_and_nothing_else_does() {
    let s = setup();
    let m = &s.module;
    fs::create_dir_all(m.join("a/b")).expect("mkdir");
    let (long_tmp, long_journal) = side_names(&"x".repeat(250));
    let old = [
        "a/.f.tern.tmp".to_string(),
        "a/.f.tern.journal".to_string(),
        format!("a/b/{long_tmp}"),
        format!("a/b/{long_journal}"),
    ];
    let kept = ["a/.new.tern.tmp", "a/old-but-ordinary", "a/b/.tern-notahash.tmp"];
    for p in old.iter().map(String::as_str).chain(kept) {
        fs::write(m.join(p), b"partial").expect("write");
    }
    for p in old
        .iter()
        .map(String::as_str)
        .chain(["a/old-but-ordinary", "a/b/.tern-notahash.tmp"])
    {
        age(&m.join(p), 8);
    }
    // A file being written right now whose mtime happens to be old: its
    // temporary file is locked, and it and its journal stay.
    let w = s.ep.create(Path::new("busy"), &spec(3000, true)).expect("create");
    age(&m.join(".busy.tern.tmp"), 8);
    age(&m.join(".busy.tern.journal"), 8);
    // Side files outside the module, reached through a symlink, are not
    // the module's.
    let elsewhere = s.outside.parent().expect("parent").join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    fs::write(elsewhere.join(".g.tern.tmp"), b"not ours").expect("write");
    age(&elsewhere.join(".g.tern.tmp"), 30);
    symlink(&elsewhere, m.join("a/link")).expect("symlink");

    let x = s.ep.expire_side_files(Duration::from_secs(7 * 86_400)).expect("expire");
    assert_eq!(x.files, 4, "{x:?}");
    assert_eq!(x.bytes, 4 * 7);
    for p in &old {
        assert!(!m.join(p).exists(), "{p} kept");
    }
    for p in kept.iter().chain(&[".busy.tern.tmp", ".busy.tern.journal"]) {
        assert!(m.join(p).exists(), "{p} removed");
    }
    assert!(elsewhere.join(".g.tern.tmp").exists(), "the walk followed a symlink");
    drop(w);
    s.outside_untouched();
}

/// Issue 13 (low): a read-write client could fill the module's file system,
/// partial uploads included. A quota caps the bytes its writers keep:
/// counted by a walk, charged when a file is created, credited what a
/// publish replaces, a deletion removes or an abort throws away.
#[test]
fn a_quota_caps_the_bytes_writers_keep() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let m = tmp.path().join("m");
    fs::create_dir_all(m.join("dir")).expect("mkdir");
    fs::write(m.join("old"), vec![1u8; 4000]).expect("write");
    fs::write(m.join("dir/inner"), vec![1u8; 1000]).expect("write");
    symlink("/etc/passwd", m.join("link")).expect("symlink");
    let q = tern_core::quota::Quota::new("m", 10_000);
    let ep = LocalEndpoint::confined(&m).expect("confined").with_quota(q.clone());
    let write = |name: &str, size: usize| -> tern_core::Result<()> {
        let w = ep.create(Path::new(name), &spec(size as u64, false))?;
        write_all_chunks(&*w, &vec![7u8; size], |_| true);
        w.publish()
    };

    // What is there already counts, symlinks not followed.
    q.walking();
    let x = ep.expire_side_files(Duration::MAX).expect("walk");
    q.walked(x.remaining);
    assert_eq!((x.files, q.used()), (0, 5000));

    write("a", 4000).expect("fits");
    assert_eq!(q.used(), 9000);
    let e = write("b", 2000).expect_err("over the quota");
    let msg = e.to_string();
    assert!(
        msg.ends_with("b: over the quota of `m`: this file needs 2.0 KiB, and 8.8 KiB of its 9.8 KiB are in use"),
        "{msg}"
    );
    assert!(!m.join("b").exists());
    assert_eq!(q.used(), 9000, "a refused file takes nothing");

    // Deleting gives back, a directory with what is in it.
    ep.remove(Path::new("dir")).expect("remove");
    ep.remove(Path::new("old")).expect("remove");
    assert_eq!(q.used(), 4000);
    // Replacing a file: charged its size, credited the old one's.
    write("a", 5000).expect("fits");
    assert_eq!(q.used(), 5000);
    // Thrown away: given back. Kept for a resume: still counted, and the
    // resume takes it over rather than counting it twice.
    let w = ep.create(Path::new("gone"), &spec(3000, false)).expect("create");
    w.abort(false);
    assert_eq!(q.used(), 5000);
    let data = vec![3u8; 4000];
    let w = ep.create(Path::new("part"), &spec(4000, true)).expect("create");
    write_all_chunks(&*w, &data, |i| i < 2);
    w.abort(true);
    assert_eq!(q.used(), 9000);
    let w = ep
        .create(Path::new("part"), &spec(4000, true))
        .expect("resume within the quota");
    write_all_chunks(&*w, &data, |i| i >= 2);
    w.publish().expect("publish");
    assert_eq!(q.used(), 9000);
    assert_eq!(fs::read(m.join("part")).expect("read"), data);

    // A later walk agrees with the running count.
    q.walking();
    q.walked(ep.expire_side_files(Duration::MAX).expect("walk").remaining);
    assert_eq!(q.used(), 9000);
}

#[test]
fn truncate_writes_a_new_version_and_never_follows_what_is_planted() {
    let s = setup();
    let body: Vec<u8> = (0..(9u32 << 20) + 77).map(|i| (i % 251) as u8).collect();
    fs::write(s.module.join("f"), &body).expect("write");
    fs::hard_link(s.module.join("f"), s.module.join("other-name")).expect("link");
    // Cut across a chunk boundary: the first bytes, the old inode untouched.
    let e = s.ep.truncate(Path::new("f"), (8 << 20) + 5).expect("cut");
    assert_eq!(e.size, (8 << 20) + 5);
    assert_eq!(fs::read(s.module.join("f")).expect("read"), body[..(8 << 20) + 5]);
    assert_eq!(
        fs::read(s.module.join("other-name")).expect("read"),
        body,
        "a hard link keeps the old version"
    );
    // Extended: zeros, as a hole.
    let e = s.ep.truncate(Path::new("f"), 64 << 20).expect("extend");
    let now = fs::read(s.module.join("f")).expect("read");
    assert_eq!(now.len(), 64 << 20);
    assert_eq!(e.size, 64 << 20);
    assert_eq!(now[..(8 << 20) + 5], body[..(8 << 20) + 5]);
    assert!(now[(8 << 20) + 5..].iter().all(|&b| b == 0));
    assert!(
        fs::metadata(s.module.join("f")).expect("stat").blocks() * 512 < 32 << 20,
        "the extension is a hole"
    );
    assert_eq!(s.ep.truncate(Path::new("f"), 0).expect("empty").size, 0);
    // Not a regular file, or not there: refused, nothing followed.
    symlink(s.outside.join("secret"), s.module.join("link")).expect("symlink");
    assert!(s.ep.truncate(Path::new("link"), 0).is_err());
    fs::create_dir(s.module.join("d")).expect("mkdir");
    assert!(s.ep.truncate(Path::new("d"), 0).is_err());
    assert!(s.ep.truncate(Path::new("missing"), 0).is_err());
    assert!(s.ep.truncate(Path::new("../outside/secret"), 0).is_err());
    s.outside_untouched();
    let names: Vec<_> = fs::read_dir(&s.module)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 4, "no temporary file left: {names:?}");
}
