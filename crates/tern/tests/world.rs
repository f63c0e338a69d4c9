//! The world changing underneath a transfer, for a local copy, a push to a
//! daemon and a pull from one: a source file growing, shrinking or being
//! rewritten; the destination directory removed; a full disk; permission
//! denied; a partial file damaged before its resume. Each must give the
//! right error naming the file, complete everything else, and leave what
//! was stored before undamaged.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::server::*;
use common::*;

const MIB: usize = 1 << 20;

/// Where the source and the destination of a transfer are.
#[derive(Clone, Copy, Debug)]
enum Way {
    Local,
    Push(&'static str),
    Pull(&'static str),
}

/// A source tree and a destination, on this machine or behind a daemon.
struct Setup {
    t: tempfile::TempDir,
    way: Way,
    daemon: Option<Daemon>,
    /// The source tree, wherever it lives.
    src: PathBuf,
    /// The destination tree, wherever it lives.
    dst: PathBuf,
    /// A file system mounted at `dst` by the test.
    mounted: bool,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The daemon first: it keeps a directory of the mount open.
        drop(self.daemon.take());
        if self.mounted {
            let _ = Command::new("umount").arg(&self.dst).status();
        }
    }
}

impl Setup {
    fn new(way: Way) -> Setup {
        let t = tempfile::tempdir().expect("tempdir");
        let module = t.path().join("module");
        fs::create_dir(&module).expect("mkdir");
        let (src, dst) = match way {
            Way::Local => (t.path().join("src"), t.path().join("dst")),
            Way::Push(_) => (t.path().join("src"), module.join("dst")),
            Way::Pull(_) => (module.join("src"), t.path().join("dst")),
        };
        let daemon = match way {
            Way::Local => None,
            _ => Some(daemon(t.path(), &module, false)),
        };
        Setup {
            t,
            way,
            daemon,
            src,
            dst,
            mounted: false,
        }
    }

    /// Mounts a tmpfs of `size` at the destination, unmounted when the
    /// setup is dropped; false where mounting is not allowed.
    fn mount_tmpfs(&mut self, size: &str) -> bool {
        self.mounted = mount_tmpfs(&self.dst, size);
        self.mounted
    }

    /// `tern copy ARGS SRC/ DST` between this setup's trees.
    fn copy(&self, args: &[&str]) -> Command {
        let mut c = match self.daemon {
            Some(_) => client(self.t.path()),
            None => tern(),
        };
        c.arg("copy").args(args).stdin(Stdio::null());
        let (src, dst) = (format!("{}/", self.src.display()), self.dst.display().to_string());
        let (from, to) = match (self.way, &self.daemon) {
            (Way::Push(tr), Some(d)) => {
                d.auth(&mut c).args(["--transport", tr]);
                (src, d.url("dst"))
            }
            (Way::Pull(tr), Some(d)) => {
                d.auth(&mut c).args(["--transport", tr]);
                (d.url("src/"), dst)
            }
            _ => (src, dst),
        };
        c.arg(from).arg(to);
        c
    }

    /// A throttled copy (1 MiB chunks, 8 MiB/s) that has journaled at least
    /// two chunks of `rel` at the destination.
    fn slow_copy(&self, rel: &str) -> Child {
        let child = self
            .copy(&["--no-progress", "--chunk-size", "1M", "--bwlimit", "8M"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let p = Path::new(rel);
        let journal = self.dst.join(p.parent().unwrap_or(Path::new(""))).join(format!(
            ".{}.tern.journal",
            p.file_name().and_then(|n| n.to_str()).unwrap_or("")
        ));
        wait_until("journaled chunks", Duration::from_secs(60), || {
            journal_records(&journal) >= 2
        });
        child
    }

    /// Runs a full-speed copy that must succeed, then compares the trees.
    fn rerun_completes(&self) {
        let o = self.copy(&["-q"]).output().expect("run tern");
        let (code, out, err) = outcome(&o);
        assert_eq!(code, 0, "{:?} rerun:\n{out}\n{err}", self.way);
        same_tree(&self.src, &self.dst);
        assert!(side_files(&self.dst).is_empty());
    }
}

/// A 16 MiB file `big` and twenty small ones under `small/`.
fn big_and_small(root: &Path) {
    write(&root.join("big"), &data(16 * MIB, 3));
    for i in 0..20 {
        write(&root.join(format!("small/f{i}")), &data(300 + i * 11, i as u64));
    }
}

fn assert_small_files_landed(s: &Setup, o: &Output) {
    for i in 0..20 {
        let rel = format!("small/f{i}");
        assert_eq!(
            fs::read(s.dst.join(&rel)).ok(),
            fs::read(s.src.join(&rel)).ok(),
            "{:?}: {rel} did not land: {}",
            s.way,
            outcome(o).2
        );
    }
}

/// A change made to a file while it is being copied.
#[derive(Clone, Copy, Debug)]
enum Change {
    Grow,
    Shrink,
    Rewrite,
}

fn change(path: &Path, how: Change) {
    let mut f = fs::OpenOptions::new().write(true).open(path).expect("open");
    match how {
        Change::Grow => {
            f.seek(SeekFrom::End(0)).expect("seek");
            f.write_all(b"appended while copying").expect("append");
        }
        Change::Shrink => f.set_len(5 * MIB as u64).expect("truncate"),
        // Same size, new bytes at the start (already sent) and the end.
        Change::Rewrite => {
            f.write_all(&data(MIB, 77)).expect("write");
            f.seek(SeekFrom::End(-(MIB as i64))).expect("seek");
            f.write_all(&data(MIB, 78)).expect("write");
        }
    }
}

fn source_changing(way: Way) {
    let s = Setup::new(way);
    big_and_small(&s.src);
    for how in [Change::Grow, Change::Shrink, Change::Rewrite] {
        write(&s.dst.join("big"), b"the previous version");
        let child = s.slow_copy("big");
        change(&s.src.join("big"), how);
        let o = child.wait_with_output().expect("wait");
        let (code, _, err) = outcome(&o);
        assert_eq!(code, 3, "{way:?} {how:?}: {err}");
        assert!(
            err.contains("big: source file changed while being copied"),
            "{way:?} {how:?}: {err}"
        );
        assert_eq!(
            fs::read(s.dst.join("big")).expect("read"),
            b"the previous version",
            "{way:?} {how:?}: the stored file is untouched"
        );
        assert_small_files_landed(&s, &o);
        assert!(
            side_files(&s.dst).is_empty(),
            "{way:?} {how:?}: {:?}",
            side_files(&s.dst)
        );
        s.rerun_completes();
        // Put the original back for the next change.
        big_and_small(&s.src);
    }
}

#[test]
fn a_source_file_changing_during_a_local_copy() {
    source_changing(Way::Local);
}

#[test]
fn a_source_file_changing_during_a_push() {
    source_changing(Way::Push("tcp"));
}

#[test]
fn a_source_file_changing_during_a_pull() {
    source_changing(Way::Pull("quic"));
}

/// A transfer killed part way, then bytes of a chunk its journal records
/// as written damaged in the temporary file: the rerun keeps the other
/// chunks, finds the damaged one by its hash and writes it again.
fn damaged_temporary_file(way: Way) {
    let s = Setup::new(way);
    write(&s.src.join("big"), &data(16 * MIB, 6));
    let mut child = s.slow_copy("big");
    kill9(&mut child);
    let (tmp, journal) = (s.dst.join(".big.tern.tmp"), s.dst.join(".big.tern.journal"));
    if let Way::Push(_) = way {
        // The daemon may still be finishing the chunk in flight: wait until
        // it has seen the client go and kept the partial file.
        wait_until("the daemon to keep the partial file", Duration::from_secs(60), || {
            fs::read_to_string(s.t.path().join("log")).is_ok_and(|l| l.contains("kept partial file for a resume"))
        });
    }
    let kept = journal_records(&journal);
    let records = fs::read(&journal).expect("journal");
    let first = u64::from_le_bytes(records[64..72].try_into().expect("8 bytes"));
    let f = fs::OpenOptions::new().write(true).open(&tmp).expect("open tmp");
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage", first * MIB as u64 + 100).expect("write");
    drop(f);

    let o = s.copy(&["--json", "--chunk-size", "1M"]).output().expect("run");
    let (code, out, err) = outcome(&o);
    assert_eq!(code, 0, "{way:?}: {err}");
    let resumed = json(&out)["bytes_resumed"].as_u64().expect("number");
    assert_eq!(
        resumed,
        (kept - 1) * MIB as u64,
        "{way:?}: every journaled chunk but the damaged one is kept: {out}"
    );
    assert_eq!(b3(&s.dst.join("big")), b3(&s.src.join("big")), "{way:?}");
    assert!(side_files(&s.dst).is_empty());
}

#[test]
fn a_damaged_temporary_file_is_found_on_resume_locally() {
    damaged_temporary_file(Way::Local);
}

#[test]
fn a_damaged_temporary_file_is_found_on_resume_behind_a_daemon() {
    damaged_temporary_file(Way::Push("tcp"));
}

#[test]
fn a_damaged_temporary_file_is_found_on_resume_of_a_pull() {
    damaged_temporary_file(Way::Pull("quic"));
}

/// The destination directory `a` holding the file in flight is removed:
/// that file fails, the files of `b` land, and a rerun completes.
fn destination_removed(way: Way) {
    let s = Setup::new(way);
    write(&s.src.join("a/big"), &data(16 * MIB, 5));
    for i in 0..10 {
        write(&s.src.join(format!("b/f{i}")), &data(200 + i, i as u64));
    }
    let child = s.slow_copy("a/big");
    fs::remove_dir_all(s.dst.join("a")).expect("rm -r");
    let o = child.wait_with_output().expect("wait");
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{way:?}: {err}");
    assert!(
        err.contains("a/big: its temporary file was removed while being written"),
        "{way:?}: {err}"
    );
    assert!(!err.contains("another tern process"), "{way:?}: {err}");
    for i in 0..10 {
        let rel = format!("b/f{i}");
        assert_eq!(b3(&s.dst.join(&rel)), b3(&s.src.join(&rel)), "{way:?}: {rel}");
    }
    assert!(!s.dst.join("a").exists(), "{way:?}: nothing recreated it");
    assert!(side_files(&s.dst).is_empty());
    s.rerun_completes();
}

#[test]
fn the_destination_directory_removed_during_a_local_copy() {
    destination_removed(Way::Local);
}

#[test]
fn the_destination_directory_removed_during_a_push() {
    destination_removed(Way::Push("quic"));
}

#[test]
fn the_destination_directory_removed_during_a_pull() {
    destination_removed(Way::Pull("tcp"));
}

/// The destination is a 2 MiB file system. Files that do not fit fail with
/// "no space left on device", the files stored there before are untouched,
/// no temporary data is left, and a file that fits still lands.
fn disk_full(way: Way) {
    let mut s = Setup::new(way);
    if !s.mount_tmpfs("2M") {
        skipped("cannot mount a tmpfs here (needs root)");
        return;
    }
    write(&s.dst.join("small.bin"), b"old small");
    write(&s.dst.join("large.bin"), b"old large");
    // One file at a time so that the failures do not depend on the order.
    for (name, len, chunk) in [("small.bin", 3 * MIB, "8M"), ("large.bin", 6 * MIB, "1M")] {
        let _ = fs::remove_dir_all(&s.src);
        write(&s.src.join(name), &data(len, len as u64));
        let o = s.copy(&["--no-progress", "--chunk-size", chunk]).output().expect("run");
        let (code, _, err) = outcome(&o);
        assert_eq!(code, 3, "{way:?}: {err}");
        assert!(
            err.contains(&format!("{name}: ")) && err.contains("no space left on device"),
            "{way:?}: {err}"
        );
    }
    assert_eq!(fs::read(s.dst.join("small.bin")).expect("read"), b"old small");
    assert_eq!(fs::read(s.dst.join("large.bin")).expect("read"), b"old large");
    assert!(side_files(&s.dst).is_empty(), "{way:?}: {:?}", side_files(&s.dst));
    let _ = fs::remove_dir_all(&s.src);
    write(&s.src.join("fits.bin"), &data(MIB, 9));
    let o = s.copy(&["-q"]).output().expect("run");
    assert_eq!(outcome(&o).0, 0, "{way:?}: the space was given back: {}", outcome(&o).2);
    assert_eq!(b3(&s.dst.join("fits.bin")), b3(&s.src.join("fits.bin")));
}

#[test]
fn a_full_disk_behind_a_daemon() {
    disk_full(Way::Push("tcp"));
}

#[test]
fn a_full_disk_under_a_pull() {
    disk_full(Way::Pull("quic"));
}

#[test]
fn files_the_daemon_may_not_read_fail_alone_in_a_pull() {
    let t = tempfile::tempdir().expect("tempdir");
    let Some((d, module)) = nobody_daemon(t.path()) else {
        return;
    };
    let src = module.join("src");
    big_and_small(&src);
    write(&src.join("secret/key"), b"hidden");
    fs::set_permissions(src.join("small/f3"), fs::Permissions::from_mode(0o000)).expect("chmod");
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o000)).expect("chmod");
    let dst = t.path().join("dst");
    let o = go(d
        .auth(client(t.path()).args(["copy", "--no-progress"]))
        .arg(d.url("src/"))
        .arg(&dst));
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("src/small/f3: ") && err.contains("Permission denied"),
        "{err}"
    );
    assert!(err.contains("src/secret"), "the unreadable directory is named: {err}");
    assert!(!dst.join("small/f3").exists() && !dst.join("secret/key").exists());
    assert_eq!(b3(&dst.join("big")), b3(&src.join("big")));
    for i in (0..20).filter(|&i| i != 3) {
        assert_eq!(
            b3(&dst.join(format!("small/f{i}"))),
            b3(&src.join(format!("small/f{i}")))
        );
    }
    assert!(side_files(&dst).is_empty());
}

#[test]
fn a_directory_the_daemon_may_not_write_fails_alone_in_a_push() {
    let t = tempfile::tempdir().expect("tempdir");
    let Some((d, module)) = nobody_daemon(t.path()) else {
        return;
    };
    let src = t.path().join("src");
    write(&src.join("open/new"), b"lands");
    write(&src.join("locked/new"), b"refused");
    write(&src.join("locked/old"), b"new version");
    write(&module.join("dst/locked/old"), b"stored before");
    for p in ["dst", "dst/locked"] {
        fs::set_permissions(module.join(p), fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    fs::set_permissions(module.join("dst/locked/old"), fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::set_permissions(module.join("dst/locked"), fs::Permissions::from_mode(0o555)).expect("chmod");
    let o = go(d
        .auth(client(t.path()).args(["copy", "--no-progress"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("dst")));
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("dst/locked/new: ") && err.contains("Permission denied"),
        "{err}"
    );
    assert!(err.contains("dst/locked/old: "), "{err}");
    assert_eq!(fs::read(module.join("dst/open/new")).expect("read"), b"lands");
    assert_eq!(fs::read(module.join("dst/locked/old")).expect("read"), b"stored before");
    assert!(!module.join("dst/locked/new").exists());
    assert!(side_files(&module).is_empty());
}

#[test]
fn a_file_the_client_may_not_read_fails_alone_in_a_push() {
    let t = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let Some(mut c) = tern_as_nobody() else {
        skipped("needs root and setpriv to run the client as nobody");
        return;
    };
    let module = t.path().join("module");
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let src = t.path().join("src");
    write(&src.join("ok.txt"), b"fine");
    write(&src.join("secret.txt"), b"hidden");
    fs::set_permissions(src.join("secret.txt"), fs::Permissions::from_mode(0o000)).expect("chmod");
    let home = t.path().join("client");
    fs::create_dir(&home).expect("mkdir");
    fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).expect("chmod");
    let token = fs::read_to_string(&d.token).expect("token");
    let o = c
        .env("TERN_CONFIG_DIR", &home)
        .env("TERN_TOKEN", token.trim())
        .args(["copy", "--no-progress", "--fingerprint", &d.fingerprint])
        .arg(format!("{}/", src.display()))
        .arg(d.url("dst"))
        .stdin(Stdio::null())
        .output()
        .expect("run tern");
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("secret.txt") && err.contains("Permission denied"), "{err}");
    assert_eq!(fs::read(module.join("dst/ok.txt")).expect("read"), b"fine");
    assert!(!module.join("dst/secret.txt").exists());
    assert!(side_files(&module).is_empty());
}
