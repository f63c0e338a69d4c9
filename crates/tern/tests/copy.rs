//! `tern copy`: path rules, what is preserved, filters, dry run, integrity.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::*;

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("cstr");
    let ts = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

fn paths(v: &[&str]) -> Vec<PathBuf> {
    v.iter().map(PathBuf::from).collect()
}

fn sample(root: &Path) {
    write(&root.join("a.txt"), b"alpha");
    write(&root.join("sub/b.txt"), b"beta");
    fs::create_dir_all(root.join("empty")).expect("mkdir");
}

#[test]
fn trailing_slash_copies_contents_and_no_slash_copies_the_directory() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    sample(&src);

    let d1 = t.path().join("d1");
    expect(0, &[&"copy", &"-q", &src, &d1]);
    assert_eq!(
        tree(&d1),
        paths(&["src", "src/a.txt", "src/empty", "src/sub", "src/sub/b.txt"])
    );

    let d2 = t.path().join("d2");
    let with_slash = format!("{}/", src.display());
    expect(0, &[&"copy", &"-q", &with_slash, &d2]);
    assert_eq!(tree(&d2), paths(&["a.txt", "empty", "sub", "sub/b.txt"]));
}

#[test]
fn several_sources_land_in_a_directory_and_a_file_can_be_renamed() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    sample(&src);
    write(&t.path().join("lone.txt"), b"lone");

    let d = t.path().join("d");
    expect(0, &[&"copy", &"-q", &src, &t.path().join("lone.txt"), &d]);
    assert_eq!(
        tree(&d),
        paths(&["lone.txt", "src", "src/a.txt", "src/empty", "src/sub", "src/sub/b.txt"])
    );

    // One file to a new name, and into an existing directory.
    let renamed = t.path().join("renamed.txt");
    expect(0, &[&"copy", &"-q", &t.path().join("lone.txt"), &renamed]);
    assert_eq!(fs::read(&renamed).expect("read"), b"lone");
    let into = t.path().join("into");
    fs::create_dir(&into).expect("mkdir");
    expect(0, &[&"copy", &"-q", &t.path().join("lone.txt"), &into]);
    assert_eq!(fs::read(into.join("lone.txt")).expect("read"), b"lone");

    // Several sources into an existing file is refused.
    let o = run(&[&"copy", &src, &t.path().join("lone.txt"), &renamed]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a directory"));
}

#[test]
fn metadata_symlinks_empty_dirs_and_odd_names_are_preserved() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    sample(&src);
    let odd = src.join(OsStr::from_bytes(b"caf\xe9 \n name"));
    write(&odd, b"latin-1 name");
    std::os::unix::fs::symlink("a.txt", src.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", src.join("abs-link")).expect("symlink");
    std::os::unix::fs::symlink("missing-target", src.join("dangling")).expect("symlink");
    fs::set_permissions(src.join("a.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
    fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o750)).expect("chmod");
    set_mtime(&src.join("a.txt"), 1_500_000_000, 123_456_789);
    set_mtime(&src.join("link"), 1_400_000_000, 5);
    set_mtime(&src.join("sub"), 1_300_000_000, 0);
    set_mtime(&src.join("empty"), 1_200_000_000, 42);

    let d = t.path().join("d");
    let from = format!("{}/", src.display());
    expect(0, &[&"copy", &"-q", &from, &d]);

    let a = fs::metadata(d.join("a.txt")).expect("stat");
    assert_eq!(a.mode() & 0o7777, 0o640);
    assert_eq!((a.mtime(), a.mtime_nsec()), (1_500_000_000, 123_456_789));
    let sub = fs::metadata(d.join("sub")).expect("stat");
    assert_eq!(sub.mode() & 0o7777, 0o750);
    assert_eq!(
        sub.mtime(),
        1_300_000_000,
        "directory mtime survives its contents being written"
    );
    let empty = fs::metadata(d.join("empty")).expect("stat");
    assert!(empty.is_dir());
    assert_eq!((empty.mtime(), empty.mtime_nsec()), (1_200_000_000, 42));

    for (name, target) in [
        ("link", "a.txt"),
        ("abs-link", "/etc/passwd"),
        ("dangling", "missing-target"),
    ] {
        let p = d.join(name);
        assert!(
            p.symlink_metadata().expect("lstat").file_type().is_symlink(),
            "{name} stays a symlink"
        );
        assert_eq!(fs::read_link(&p).expect("readlink"), Path::new(target));
    }
    let l = d.join("link").symlink_metadata().expect("lstat");
    assert_eq!((l.mtime(), l.mtime_nsec()), (1_400_000_000, 5));

    let odd_dst = d.join(OsStr::from_bytes(b"caf\xe9 \n name"));
    assert_eq!(fs::read(odd_dst).expect("non-UTF-8 name copied"), b"latin-1 name");
    assert!(side_files(&d).is_empty());

    // A second run finds everything up to date.
    let out = expect(0, &[&"copy", &"--json", &from, &d]);
    let s = json(&out);
    assert_eq!(s["copied"], 0);
    assert_eq!(s["unchanged"], 3);
    assert_eq!(s["symlinks"], 0);
}

#[test]
fn large_files_are_chunked_in_parallel_and_hash_like_b3sum() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("big.bin");
    // Not a multiple of the chunk size, several chunks per worker.
    write(&src, &data(5 * 1024 * 1024 + 4321, 7));
    let dst = t.path().join("copy.bin");
    let out = expect(
        0,
        &[
            &"copy",
            &"--json",
            &"--verify",
            &"--chunk-size",
            &"64K",
            &"-j",
            &"4",
            &src,
            &dst,
        ],
    );
    let s = json(&out);
    assert_eq!(s["verified"], true);
    assert_eq!(s["bytes_written"], 5 * 1024 * 1024 + 4321);
    assert_eq!(b3(&dst), b3(&src));
    if let Ok(o) = std::process::Command::new("b3sum").arg("--no-names").arg(&dst).output() {
        if o.status.success() {
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), b3(&src));
        }
    }
    assert!(side_files(t.path()).is_empty(), "journal and temp file removed");
}

#[test]
fn filters_follow_rsync_rules() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("keep.rs"), b"1");
    write(&src.join("drop.o"), b"2");
    write(&src.join("target/out.rs"), b"3");
    write(&src.join("deep/target/x.rs"), b"4");
    write(&src.join("deep/y.rs"), b"5");
    write(&src.join("notes.md"), b"6");
    let rules = t.path().join("rules");
    fs::write(&rules, "# comment\n*.md\n").expect("write");

    let d = t.path().join("d");
    let from = format!("{}/", src.display());
    expect(
        0,
        &[
            &"copy",
            &"-q",
            &"--exclude",
            &"*.o",
            &"--exclude",
            &"/target/",
            &"--exclude-from",
            &rules,
            &from,
            &d,
        ],
    );
    assert_eq!(
        tree(&d),
        paths(&["deep", "deep/target", "deep/target/x.rs", "deep/y.rs", "keep.rs"]),
        "anchored dir pattern excludes only the top target/ and everything in it"
    );

    // Include before exclude: first match wins.
    let d2 = t.path().join("d2");
    expect(
        0,
        &[
            &"copy",
            &"-q",
            &"--include",
            &"*/",
            &"--include",
            &"*.rs",
            &"--exclude",
            &"*",
            &from,
            &d2,
        ],
    );
    assert_eq!(
        tree(&d2),
        paths(&[
            "deep",
            "deep/target",
            "deep/target/x.rs",
            "deep/y.rs",
            "keep.rs",
            "target",
            "target/out.rs"
        ])
    );

    let o = run(&[&"copy", &"--exclude", &"[oops", &from, &t.path().join("d3")]);
    assert_eq!(o.status.code(), Some(2), "a bad pattern is a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("[oops"));
}

#[test]
fn dry_run_lists_the_plan_and_changes_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    sample(&src);
    let d = t.path().join("d");
    let out = expect(0, &[&"copy", &"-n", &src, &d]);
    assert!(!d.exists(), "dry run created the destination");
    for line in [
        "dir      src",
        "new      src/a.txt",
        "new      src/sub/b.txt",
        "dir      src/empty",
    ] {
        assert!(out.contains(line), "plan lacks {line:?}:\n{out}");
    }

    // Against an existing copy with one changed file.
    expect(0, &[&"copy", &"-q", &src, &d]);
    write(&src.join("a.txt"), b"alpha, longer now");
    let before = fs::read(d.join("src/a.txt")).expect("read");
    let out = expect(0, &[&"copy", &"-n", &"--json", &src, &d]);
    let s = json(&out);
    assert_eq!(s["copied"], 1);
    assert_eq!(s["dry_run"], true);
    assert_eq!(fs::read(d.join("src/a.txt")).expect("read"), before);
}

#[test]
fn hard_links_and_xattrs_are_kept_when_asked() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("one"), b"shared");
    fs::hard_link(src.join("one"), src.join("two")).expect("link");
    let c = std::ffi::CString::new(src.join("one").as_os_str().as_bytes()).expect("cstr");
    let name = c"user.tern-test";
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::setxattr(c.as_ptr(), name.as_ptr(), b"v1".as_ptr().cast(), 2, 0) };
    let have_xattrs = r == 0;

    let d = t.path().join("d");
    let from = format!("{}/", src.display());
    expect(0, &[&"copy", &"-q", &"-H", &"-X", &from, &d]);
    let (a, b) = (
        fs::metadata(d.join("one")).expect("stat"),
        fs::metadata(d.join("two")).expect("stat"),
    );
    assert_eq!(a.ino(), b.ino(), "-H keeps the two names on one inode");
    if have_xattrs {
        let c = std::ffi::CString::new(d.join("one").as_os_str().as_bytes()).expect("cstr");
        let mut buf = [0u8; 16];
        // SAFETY: valid strings and buffer.
        let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(n, 2, "-X copies extended attributes");
        assert_eq!(&buf[..2], b"v1");
    } else {
        skipped("xattr assertions: this file system refuses user xattrs");
    }

    // Without -H each name is its own file.
    let d2 = t.path().join("d2");
    expect(0, &[&"copy", &"-q", &from, &d2]);
    let (a, b) = (
        fs::metadata(d2.join("one")).expect("stat"),
        fs::metadata(d2.join("two")).expect("stat"),
    );
    assert_ne!(a.ino(), b.ino());
}

#[test]
fn a_hard_link_is_not_made_to_a_first_copy_that_failed() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("a"), b"new shared content");
    fs::hard_link(src.join("a"), src.join("b")).expect("link");
    let d = t.path().join("d");
    fs::create_dir_all(d.join("a")).expect("a directory where `a` must go");
    write(&d.join("b"), b"independent file");
    let from = format!("{}/", src.display());
    let o = run(&[&"copy", &"-H", &from, &d]);
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not hard-linked"), "{err}");
    assert_eq!(fs::read(d.join("b")).expect("b"), b"independent file");
}

#[test]
fn directory_times_are_restored_after_writing_into_them() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("sub/one"), b"1");
    set_mtime(&src.join("sub"), 1_600_000_000, 0);
    let d = t.path().join("d");
    let from = format!("{}/", src.display());
    expect(0, &[&"copy", &"-q", &from, &d]);
    // A new file, with the directory's time put back: the directory itself
    // looks unchanged to the scan, but writing into the copy moves its mtime.
    write(&src.join("sub/two"), b"2");
    set_mtime(&src.join("sub"), 1_600_000_000, 0);
    expect(0, &[&"copy", &"-q", &from, &d]);
    assert_eq!(fs::read(d.join("sub/two")).expect("copied"), b"2");
    assert_eq!(fs::metadata(d.join("sub")).expect("stat").mtime(), 1_600_000_000);
}

#[test]
fn tern_partial_files_in_a_source_are_not_copied() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("big"), b"real");
    write(&src.join(".big.tern.tmp"), b"someone else's partial copy");
    write(&src.join(".big.tern.journal"), b"journal");
    let d = t.path().join("d");
    let from = format!("{}/", src.display());
    expect(0, &[&"copy", &"-q", &from, &d]);
    assert_eq!(tree(&d), paths(&["big"]));
    expect(0, &[&"check", &src, &d]);
}

#[test]
fn sparse_6gib_file_stays_sparse() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("sparse.img");
    let f = fs::File::create(&src).expect("create");
    let size: u64 = 6 << 30;
    f.set_len(size).expect("set_len");
    use std::os::unix::fs::FileExt;
    let regions = [0u64, 1 << 30, (4 << 30) + 12345, size - 100];
    for (i, off) in regions.into_iter().enumerate() {
        f.write_all_at(&data(100, i as u64), off).expect("write");
    }
    drop(f);
    if allocated(&src) > 64 << 20 {
        skipped("this file system does not make sparse files");
        return;
    }
    let dst = t.path().join("copy.img");
    expect(0, &[&"copy", &"-q", &src, &dst]);
    assert_eq!(fs::metadata(&dst).expect("stat").len(), size);
    assert!(allocated(&dst) < 64 << 20, "copy allocated {} bytes", allocated(&dst));
    let g = fs::File::open(&dst).expect("open");
    for (i, off) in regions.into_iter().enumerate() {
        let mut buf = [0u8; 100];
        g.read_exact_at(&mut buf, off).expect("read");
        assert_eq!(&buf[..], &data(100, i as u64)[..], "data at {off}");
    }
    // Hashing 2 × 6 GiB in a test is slow; b3sum maps the files and is quick.
    if let Ok(o) = std::process::Command::new("b3sum")
        .arg("--no-names")
        .arg(&src)
        .arg(&dst)
        .output()
    {
        if o.status.success() {
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            let lines: Vec<_> = out.lines().collect();
            assert_eq!(lines.len(), 2);
            assert_eq!(lines[0], lines[1], "b3sum of source and copy");
        }
    }
}

#[test]
fn bad_arguments_are_usage_errors() {
    let t = tempfile::tempdir().expect("tempdir");
    for args in [
        vec!["copy", "--chunk-size", "1000", "a", "b"],
        vec!["copy", "--chunk-size", "12Q", "a", "b"],
        vec!["copy", "-j", "0", "a", "b"],
        vec!["copy", "only-one-path"],
    ] {
        let mut c = tern();
        c.args(&args).current_dir(t.path());
        let o = c.output().expect("spawn");
        assert_eq!(
            o.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = run(&[&"copy", &t.path().join("missing"), &t.path().join("d")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing"));
}

#[test]
fn copying_a_directory_into_itself_is_refused() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    sample(&src);
    let o = run(&[&"copy", &src, &src.join("sub")]);
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("into itself"), "{err}");
    assert_eq!(
        tree(&src),
        paths(&["a.txt", "empty", "sub", "sub/b.txt"]),
        "nothing was written"
    );
}

#[test]
fn a_destination_root_that_is_a_symlink_is_written_through() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    sample(&src);
    let real = t.path().join("real");
    fs::create_dir(&real).expect("mkdir");
    write(&real.join("old.txt"), b"old");
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    // The trailing slash: make `link` equal to `src`, whatever its name.
    let contents = format!("{}/", src.display());
    expect(0, &[&"sync", &"-q", &"--delete", &contents, &link]);
    assert!(
        link.symlink_metadata().expect("lstat").file_type().is_symlink(),
        "the link survives"
    );
    assert_eq!(tree(&real), paths(&["a.txt", "empty", "sub", "sub/b.txt"]));
}

/// Pages of `path` resident in the page cache, by mincore.
fn resident_pages(path: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(path).expect("open");
    let len = f.metadata().expect("stat").len() as usize;
    // SAFETY: a read-only shared mapping of an open file of `len` bytes,
    // unmapped before returning; mincore fills one byte per page.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap");
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        let r = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(r, 0, "mincore");
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }
}

/// Issue 14: `--no-fsync` writes a large file through the page cache, as
/// `cp` does (it is then resident); a durable copy writes it with O_DIRECT
/// where the file system takes it, leaving the cache alone.
#[test]
fn no_fsync_writes_through_the_page_cache_and_a_durable_copy_does_not() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("big");
    write(&src, &data(40 << 20, 9));
    let pages = (40 << 20) / 4096;
    let cached = t.path().join("cached");
    expect(0, &[&"copy", &"--no-fsync", &src, &cached]);
    let fast = resident_pages(&cached);
    assert_eq!(b3(&cached), b3(&src));
    assert!(fast > pages * 9 / 10, "{fast} of {pages} pages cached after --no-fsync");
    let durable = t.path().join("durable");
    expect(0, &[&"copy", &src, &durable]);
    // Before reading it back, which would bring it into the cache.
    let direct = resident_pages(&durable);
    assert_eq!(b3(&durable), b3(&src));
    // tmpfs and some file systems refuse O_DIRECT: then the cache is used.
    let takes_direct = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(t.path().join("big"))
            .is_ok()
    };
    if takes_direct {
        assert!(
            direct < pages / 10,
            "{direct} of {pages} pages cached after a durable copy"
        );
    }
}
