//! `tern sync` and `tern check`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

fn paths(v: &[&str]) -> Vec<PathBuf> {
    v.iter().map(PathBuf::from).collect()
}

fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}

#[test]
fn sync_writes_only_what_changed_and_delete_mirrors() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("same.txt"), b"same");
    write(&src.join("changed.txt"), b"v1");
    write(&src.join("dir/inner.txt"), b"inner");
    let dst = t.path().join("dst");
    expect(0, &[&"sync", &"-q", &src, &dst]);
    assert_eq!(tree(&dst), paths(&["changed.txt", "dir", "dir/inner.txt", "same.txt"]));

    write(&src.join("changed.txt"), b"v2 is longer");
    write(&dst.join("extra.txt"), b"only in dst");
    write(&dst.join("olddir/x"), b"x");
    write(&dst.join("keep.log"), b"excluded, so kept");
    let out = expect(0, &[&"sync", &"--json", &"--exclude", &"*.log", &src, &dst]);
    let s = json(&out);
    assert_eq!(s["copied"], 1, "only the changed file is written");
    assert_eq!(s["unchanged"], 2);
    assert_eq!(s["deleted"], 0, "nothing deleted without --delete");
    assert!(dst.join("extra.txt").exists());

    let out = expect(
        0,
        &[
            &"sync",
            &"--json",
            &"--delete",
            &"--exclude",
            &"*.log",
            &slash(&src),
            &dst,
        ],
    );
    let s = json(&out);
    assert_eq!(s["deleted"], 2);
    assert_eq!(s["copied"], 0);
    assert_eq!(
        tree(&dst),
        paths(&["changed.txt", "dir", "dir/inner.txt", "keep.log", "same.txt"])
    );
    assert_eq!(fs::read(dst.join("changed.txt")).expect("read"), b"v2 is longer");
}

#[test]
fn sync_delete_dry_run_deletes_nothing() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("a"), b"a");
    let dst = t.path().join("dst");
    write(&dst.join("b"), b"b");
    let out = expect(0, &[&"sync", &"-n", &"--delete", &src, &dst]);
    assert!(out.contains("delete   b"), "{out}");
    assert!(out.contains("new      a"), "{out}");
    assert_eq!(tree(&dst), paths(&["b"]));
}

#[test]
fn sync_replaces_entries_of_the_wrong_kind_only_with_delete() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("x/inside"), b"in");
    write(&src.join("other"), b"other");
    let dst = t.path().join("dst");
    write(&dst.join("x"), b"a file where the source has a directory");

    let o = run(&[&"sync", &src, &dst]);
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("dst/x") && err.contains("destination is a file"), "{err}");
    assert_eq!(fs::read(dst.join("other")).expect("other files go on"), b"other");
    assert_eq!(
        fs::read(dst.join("x")).expect("kept"),
        b"a file where the source has a directory"
    );

    expect(0, &[&"sync", &"-q", &"--delete", &slash(&src), &dst]);
    assert_eq!(fs::read(dst.join("x/inside")).expect("read"), b"in");
}

#[test]
fn check_finds_a_one_byte_difference() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    let big = data(300_000, 3);
    write(&src.join("big.bin"), &big);
    write(&src.join("sub/small.txt"), b"small");
    write(&src.join("only-src"), b"s");
    let dst = t.path().join("dst");
    expect(0, &[&"copy", &"-q", &slash(&src), &dst]);
    fs::remove_file(dst.join("only-src")).expect("rm");
    write(&dst.join("only-dst"), b"d");
    let same = expect(4, &[&"check", &src, &dst]);
    assert!(
        same.contains("missing  only-src") && same.contains("extra    only-dst"),
        "{same}"
    );
    assert!(!same.contains("big.bin"), "{same}");

    // Same size, same mtime, one byte flipped: only a content check sees it.
    let mut flipped = big.clone();
    flipped[123_456] ^= 1;
    let mtime = fs::metadata(dst.join("big.bin"))
        .expect("stat")
        .modified()
        .expect("mtime");
    fs::write(dst.join("big.bin"), &flipped).expect("write");
    fs::File::options()
        .write(true)
        .open(dst.join("big.bin"))
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
    let out = expect(4, &[&"check", &"--json", &src, &dst]);
    let s = json(&out);
    assert_eq!(s["differences"], 3);
    let listed = expect(4, &[&"check", &src, &dst]);
    assert!(listed.contains("differ   big.bin"), "{listed}");

    // sync's quick check misses it; --checksum finds and fixes it.
    let s = json(&expect(0, &[&"sync", &"--json", &src, &dst]));
    assert_eq!(s["copied"], 1, "only-src is copied, big.bin looks unchanged");
    let s = json(&expect(0, &[&"sync", &"--json", &"-c", &src, &dst]));
    assert_eq!(s["copied"], 1, "checksum mode rewrites big.bin");
    assert_eq!(b3(&dst.join("big.bin")), b3(&src.join("big.bin")));
    fs::remove_file(dst.join("only-dst")).expect("rm");
    expect(0, &[&"check", &"-q", &src, &dst]);
}

#[test]
fn sync_delete_of_a_file_onto_a_directory_never_wipes_the_directory() {
    let t = tempfile::tempdir().expect("tempdir");
    let file = t.path().join("report.txt");
    write(&file, b"report");
    let dst = t.path().join("backup");
    write(&dst.join("precious"), b"keep me");
    expect(0, &[&"sync", &"-q", &"--delete", &file, &dst]);
    assert_eq!(fs::read(dst.join("precious")).expect("kept"), b"keep me");
    assert_eq!(fs::read(dst.join("report.txt")).expect("copied inside"), b"report");
}
