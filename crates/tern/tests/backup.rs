//! Issue 20: `--backup`, `--backup-dir` and `--suffix` keep what a run
//! replaces or deletes, as rsync does, locally and on a daemon.

mod common;

use std::fs;
use std::path::Path;

use common::server::*;
use common::*;

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A destination with a file to replace, one to delete, a directory to
/// delete and one that stays; the source changes the first and drops the
/// others.
fn old_and_new(t: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (src, dst) = (t.join("src"), t.join("dst"));
    write(&src.join("a"), b"new a, longer than before");
    write(&src.join("same"), b"unchanged");
    write(&dst.join("a"), b"old a");
    write(&dst.join("same"), b"unchanged");
    write(&dst.join("gone"), b"old gone");
    write(&dst.join("olddir/inner"), b"old inner");
    // The same mtime as the source, so "same" is not replaced.
    let m = fs::metadata(src.join("same")).expect("stat").modified().expect("mtime");
    fs::File::options()
        .write(true)
        .open(dst.join("same"))
        .and_then(|f| f.set_modified(m))
        .expect("set mtime");
    (src, dst)
}

#[test]
fn backup_keeps_replaced_and_deleted_entries_beside_them() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = old_and_new(t.path());
    let s = src.join("");
    let out = expect(0, &[&"sync", &"--delete", &"-b", &"--json", &s, &dst]);
    let j = json(&out);
    assert_eq!(j["errors"], 0, "{j}");
    assert_eq!(read(&dst.join("a")), b"new a, longer than before");
    assert_eq!(read(&dst.join("a~")), b"old a");
    assert_eq!(read(&dst.join("gone~")), b"old gone");
    assert_eq!(read(&dst.join("olddir~/inner")), b"old inner");
    assert!(!dst.join("gone").exists() && !dst.join("olddir").exists());
    // What did not change has no backup.
    assert!(!dst.join("same~").exists());

    // The next sync --delete leaves the backups alone, and a second change
    // replaces the backup with the newer old version.
    write(&src.join("a"), b"third version of a");
    expect(0, &[&"sync", &"--delete", &"-b", &s, &dst]);
    assert_eq!(read(&dst.join("a~")), b"new a, longer than before");
    assert_eq!(read(&dst.join("gone~")), b"old gone");
    // check reports them as what they are: entries the source lacks.
    let c = json(&expect(4, &[&"check", &"--json", &s, &dst]));
    assert_eq!(c["differences"], 3, "{c}");

    // --delete-excluded takes the backups away, as rsync does.
    expect(0, &[&"sync", &"--delete", &"--delete-excluded", &"-b", &s, &dst]);
    assert!(!dst.join("gone~").exists() && !dst.join("olddir~").exists());
    assert_eq!(read(&dst.join("a")), b"third version of a");
}

#[test]
fn backup_suffix_names_the_backups() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = old_and_new(t.path());
    expect(0, &[&"copy", &"--suffix=.bak", &"-b", &src.join(""), &dst]);
    assert_eq!(read(&dst.join("a.bak")), b"old a");
    assert!(!dst.join("a~").exists());
    // Without --delete nothing is deleted, so nothing else is kept.
    assert!(dst.join("gone").exists() && !dst.join("gone.bak").exists());
}

#[test]
fn backup_dir_keeps_the_tree_shape_outside_and_inside_the_destination() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = old_and_new(t.path());
    write(&src.join("deep/x"), b"new x, not the same size");
    write(&dst.join("deep/x"), b"old x");
    let s = src.join("");
    // Relative to the destination: ../bk is beside it.
    expect(0, &[&"sync", &"--delete", &"--backup-dir=../bk", &s, &dst]);
    let bk = t.path().join("bk");
    assert_eq!(read(&bk.join("a")), b"old a");
    assert_eq!(read(&bk.join("deep/x")), b"old x");
    assert_eq!(read(&bk.join("gone")), b"old gone");
    assert_eq!(read(&bk.join("olddir/inner")), b"old inner");
    assert!(!dst.join("a~").exists());

    // Inside the destination, the backup directory is neither deleted by
    // --delete nor listed by a dry run as something to delete.
    write(&src.join("a"), b"again");
    expect(
        0,
        &[&"sync", &"--delete", &"--backup-dir=.old", &"--suffix=.1", &s, &dst],
    );
    assert_eq!(read(&dst.join(".old/a.1")), b"new a, longer than before");
    let dry = expect(0, &[&"sync", &"--delete", &"--backup-dir=.old", &"-n", &"-v", &s, &dst]);
    assert!(!dry.contains(".old"), "dry run lists the backups:\n{dry}");
    write(&src.join("a"), b"and again");
    expect(
        0,
        &[&"sync", &"--delete", &"--backup-dir=.old", &"--suffix=.1", &s, &dst],
    );
    assert_eq!(read(&dst.join(".old/a.1")), b"again");
    // Without the flags, a later sync --delete sees .old as extra.
    expect(0, &[&"sync", &"--delete", &s, &dst]);
    assert!(!dst.join(".old").exists());
}

#[test]
fn backup_flags_that_make_no_sense_are_refused_before_anything_changes() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = old_and_new(t.path());
    let s = src.join("");
    for (args, needle) in [
        (vec!["--suffix=.x"], "--suffix needs --backup"),
        (vec!["-b", "--suffix=a/b"], "cannot hold `/`"),
        (vec!["-b", "--suffix="], "cannot be empty"),
    ] {
        let mut c = tern();
        c.arg("copy").args(&args).arg(&s).arg(&dst);
        let (code, _, err) = outcome(&c.output().expect("run"));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(read(&dst.join("a")), b"old a");
    // A suffix that makes one of tern's own temporary names (`.a.tern.tmp`
    // belongs to `a`) is refused where the backup would be made, and the
    // old file stays.
    write(&src.join(".a"), b"new dot a");
    write(&dst.join(".a"), b"old");
    let (code, _, err) = outcome(&run(&[&"copy", &"-b", &"--suffix=.tern.tmp", &s, &dst]));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("temporary files"), "{err}");
    assert_eq!(read(&dst.join(".a")), b"old");
}

#[test]
fn backup_on_a_daemon_stays_inside_its_module() {
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    let (src, _) = old_and_new(t.path());
    for (name, body) in [
        ("a", &b"old a"[..]),
        ("gone", b"old gone"),
        ("olddir/inner", b"old inner"),
    ] {
        write(&module.join("tree").join(name), body);
    }
    let d = daemon(t.path(), &module, false);
    let s = src.join("");
    ok(d.auth(
        client(t.path())
            .args(["sync", "--delete", "-b"])
            .arg(&s)
            .arg(d.url("tree/")),
    ));
    let tree = module.join("tree");
    assert_eq!(read(&tree.join("a~")), b"old a");
    assert_eq!(read(&tree.join("gone~")), b"old gone");
    assert_eq!(read(&tree.join("olddir~/inner")), b"old inner");
    assert_eq!(read(&tree.join("a")), b"new a, longer than before");

    // A backup directory relative to the destination, inside the module.
    write(&src.join("a"), b"next a");
    ok(d.auth(
        client(t.path())
            .args(["sync", "--delete", "--backup-dir=../kept"])
            .arg(&s)
            .arg(d.url("tree/")),
    ));
    assert_eq!(read(&module.join("kept/a")), b"new a, longer than before");
    // The backups kept beside files before are extras now, and go there
    // too: nothing is lost.
    assert_eq!(read(&module.join("kept/gone~")), b"old gone");
    assert!(!tree.join("gone~").exists());

    // One that climbs out of the module, or is absolute, is refused and
    // nothing changes.
    write(&src.join("a"), b"refused a");
    fails(
        d.auth(
            client(t.path())
                .args(["copy", "--backup-dir=../../../out"])
                .arg(&s)
                .arg(d.url("tree/")),
        ),
        2,
        "outside module",
    );
    fails(
        d.auth(
            client(t.path())
                .args(["copy", "--backup-dir=/tmp/x"])
                .arg(&s)
                .arg(d.url("tree/")),
        ),
        2,
        "relative",
    );
    assert_eq!(read(&tree.join("a")), b"next a");
    assert!(!t.path().join("out").exists());
}

#[test]
fn backup_on_a_read_only_module_is_refused() {
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("a"), b"x");
    let src = t.path().join("src");
    write(&src.join("a"), b"y");
    let d = daemon(t.path(), &module, true);
    let o = go(d.auth(client(t.path()).args(["copy", "-b"]).arg(src.join("")).arg(d.url(""))));
    let (code, _, err) = outcome(&o);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("read-only") || err.contains("read only"), "{err}");
    assert_eq!(read(&module.join("a")), b"x");
}
