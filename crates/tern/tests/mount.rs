//! Issue 19: `tern mount` shows a daemon's module as a local folder, every
//! byte read checked, every file written published atomically.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::server::*;
use common::*;

/// A running `tern mount`, unmounted and ended when dropped.
struct Mount {
    child: Child,
    dir: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        if mounted(&self.dir) {
            let _ = tern().arg("unmount").arg(&self.dir).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a FUSE file system is mounted at `dir`, as /proc says.
fn mounted(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(4) == Some(&dir.to_str().expect("utf-8 dir")) && l.contains(" - fuse")
    })
}

/// Whether this machine lets the tests mount FUSE file systems.
fn can_mount() -> bool {
    if is_root() && Path::new("/dev/fuse").exists() {
        return true;
    }
    skipped("mounting needs root and /dev/fuse");
    false
}

/// Mounts the daemon's `path` at `t/mnt` with `extra` arguments.
fn mount(t: &Path, d: &Daemon, path: &str, extra: &[&str]) -> Mount {
    let dir = t.join("mnt");
    fs::create_dir_all(&dir).expect("mkdir");
    let log = fs::File::create(t.join("mount.log")).expect("log");
    let child = d
        .auth(
            client(t)
                .arg("mount")
                .arg("--staging-dir")
                .arg(t.join("staging"))
                .args(extra),
        )
        .arg(d.url(path))
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn mount");
    let mut m = Mount { child, dir };
    wait_until("the mount", Duration::from_secs(30), || {
        assert!(
            m.child.try_wait().expect("wait").is_none(),
            "tern mount ended: {}",
            fs::read_to_string(t.join("mount.log")).unwrap_or_default()
        );
        mounted(&m.dir)
    });
    m
}

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    let name = std::ffi::CString::new(name).expect("name");
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length given.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

#[test]
fn a_mount_shows_the_module_as_it_is() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    make_tree(&module.join("tree"));
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "tree", &["--read-only"]);
    let (src, mnt) = (module.join("tree"), m.dir.clone());
    // Names (a name that is not UTF-8 too), kinds, contents, link targets.
    same_tree(&src, &mnt);
    for p in tree(&src) {
        let (a, b) = (
            fs::symlink_metadata(src.join(&p)).expect("stat"),
            fs::symlink_metadata(mnt.join(&p)).expect("stat"),
        );
        assert_eq!(a.file_type(), b.file_type(), "{}", p.display());
        assert_eq!(a.mode() & 0o7777, b.mode() & 0o7777, "{}", p.display());
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "{}",
            p.display()
        );
        if a.is_file() {
            assert_eq!(a.len(), b.len(), "{}", p.display());
        }
    }
    // The whole-file hash, without reading the data.
    let big = mnt.join("big.bin");
    assert_eq!(
        xattr(&big, "user.tern.blake3").map(|v| String::from_utf8(v).expect("hex")),
        Some(b3(&src.join("big.bin")))
    );
    assert_eq!(xattr(&big, "user.other"), None);
    // Reads anywhere, of any length, across block boundaries.
    let want = fs::read(src.join("big.bin")).expect("read");
    let f = fs::File::open(&big).expect("open");
    for (off, len) in [
        (0u64, 1usize),
        (1 << 20, 4096),
        ((1 << 20) - 7, 100),
        (3_000_000, 1 << 20),
        (5 << 20, 200),
    ] {
        let mut buf = vec![0u8; len];
        let n = f.read_at(&mut buf, off).expect("read_at");
        let end = (off as usize + len).min(want.len());
        assert_eq!(&buf[..n], &want[off as usize..end], "at {off}");
    }
    // Read-only: nothing is written, made or removed.
    assert_eq!(errno_of(fs::write(mnt.join("new"), b"x")), Some(libc::EROFS));
    assert_eq!(errno_of(fs::create_dir(mnt.join("d"))), Some(libc::EROFS));
    assert_eq!(errno_of(fs::remove_file(mnt.join("small/f1"))), Some(libc::EROFS));
    assert_eq!(
        errno_of(fs::OpenOptions::new().write(true).open(&big)),
        Some(libc::EROFS)
    );
    assert_eq!(errno_of(fs::metadata(mnt.join("nope"))), Some(libc::ENOENT));
    // A listing of the mount is the directory's, `.` and `..` not among them.
    let listed = fs::read_dir(&mnt).expect("ls").count();
    assert_eq!(listed, fs::read_dir(&src).expect("ls").count());
}

#[test]
fn a_file_changed_at_the_daemon_is_seen_at_the_next_open() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("f"), b"first version");
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &["--attr-timeout", "0"]);
    assert_eq!(fs::read(m.dir.join("f")).expect("read"), b"first version");
    write(&module.join("f"), b"the second version, longer");
    assert_eq!(fs::read(m.dir.join("f")).expect("read"), b"the second version, longer");
    write(&module.join("g"), b"new");
    assert_eq!(fs::read(m.dir.join("g")).expect("read"), b"new");
    fs::remove_file(module.join("g")).expect("rm");
    assert_eq!(errno_of(fs::metadata(m.dir.join("g"))), Some(libc::ENOENT));
}

#[test]
fn an_open_file_reads_on_after_the_daemon_restarts_and_sigterm_unmounts() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    let body = data(6 << 20, 9);
    write(&module.join("f"), &body);
    let mut d = daemon(t.path(), &module, false);
    let port = d.port;
    let mut m = mount(t.path(), &d, "", &["--timeout", "5"]);
    let f = fs::File::open(m.dir.join("f")).expect("open");
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).expect("read");
    assert_eq!(head, body[..4096]);
    d.child.kill().expect("kill");
    d.child.wait().expect("wait");
    let _back = daemon_on(t.path(), &module, false, port);
    // The same handle, far from what was read ahead, on a new connection.
    let mut tail = vec![0u8; 8192];
    f.read_exact_at(&mut tail, (5 << 20) + 3)
        .expect("read after the restart");
    assert_eq!(tail, body[(5 << 20) + 3..(5 << 20) + 3 + 8192]);
    drop(f);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) };
    let status = m.child.wait().expect("wait");
    assert!(
        status.success(),
        "{status:?}: {}",
        fs::read_to_string(t.path().join("mount.log")).unwrap_or_default()
    );
    assert!(!mounted(&m.dir));
}

#[test]
fn a_daemon_that_is_gone_gives_errors_not_a_hang() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("f"), b"x");
    let mut d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &["--attr-timeout", "0", "--timeout", "2"]);
    assert!(fs::metadata(m.dir.join("f")).is_ok());
    d.child.kill().expect("kill");
    d.child.wait().expect("wait");
    assert_eq!(errno_of(fs::metadata(m.dir.join("f"))), Some(libc::EIO));
    assert!(fs::read(m.dir.join("f")).is_err());
    // Unmounting still works.
    let st = tern().arg("unmount").arg(&m.dir).status().expect("unmount");
    assert!(st.success());
    assert!(!mounted(&m.dir));
}

#[test]
fn files_written_through_the_mount_appear_whole_at_the_daemon() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    let old = data(3 << 20, 1);
    write(&module.join("old.bin"), &old);
    write(&module.join("dir/inner"), b"inner");
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &[]);
    let mnt = m.dir.clone();

    // A new file: nothing at the daemon until it is closed, then all of it.
    let body = data(20 << 20, 2);
    let mut f = fs::File::create(mnt.join("new.bin")).expect("create");
    std::io::Write::write_all(&mut f, &body[..9 << 20]).expect("write");
    assert!(
        !module.join("new.bin").exists(),
        "a half-written file is visible at the daemon"
    );
    std::io::Write::write_all(&mut f, &body[9 << 20..]).expect("write");
    f.sync_all().expect("fsync publishes");
    assert_eq!(b3(&module.join("new.bin")), b3_bytes(&body));
    drop(f);
    assert_eq!(fs::read(mnt.join("new.bin")).expect("read back"), body);

    // A change in the middle of an existing file, opened for reading and
    // writing: the old version stays whole until close.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("old.bin"))
        .expect("open rw");
    f.write_all_at(b"CHANGED", 1_000_000).expect("pwrite");
    let mut back = [0u8; 7];
    f.read_exact_at(&mut back, 1_000_000).expect("pread");
    assert_eq!(&back, b"CHANGED");
    assert_eq!(fs::read(module.join("old.bin")).expect("read"), old);
    drop(f);
    let mut want = old.clone();
    want[1_000_000..1_000_007].copy_from_slice(b"CHANGED");
    assert_eq!(fs::read(module.join("old.bin")).expect("read"), want);

    // Truncate, metadata, links, directories, renames, removals.
    fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("old.bin"))
        .and_then(|f| f.set_len(1000))
        .expect("truncate");
    assert_eq!(fs::read(module.join("old.bin")).expect("read"), want[..1000]);
    fs::set_permissions(mnt.join("old.bin"), fs::Permissions::from_mode(0o640)).expect("chmod");
    assert_eq!(
        fs::metadata(module.join("old.bin")).expect("stat").mode() & 0o777,
        0o640
    );
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options()
        .write(true)
        .open(mnt.join("dir/inner"))
        .and_then(|f| f.set_modified(when))
        .expect("utimens");
    assert_eq!(
        fs::metadata(module.join("dir/inner")).expect("stat").mtime(),
        1_000_000_000
    );
    std::os::unix::fs::symlink("../old.bin", mnt.join("dir/link")).expect("symlink");
    assert_eq!(
        fs::read_link(module.join("dir/link")).expect("readlink"),
        Path::new("../old.bin")
    );
    fs::create_dir(mnt.join("made")).expect("mkdir");
    assert!(module.join("made").is_dir());
    assert_eq!(errno_of(fs::remove_dir(mnt.join("dir"))), Some(libc::ENOTEMPTY));
    fs::rename(mnt.join("dir"), mnt.join("made/moved")).expect("rename a directory");
    assert_eq!(fs::read(module.join("made/moved/inner")).expect("read"), b"inner");
    assert_eq!(fs::read(mnt.join("made/moved/inner")).expect("read"), b"inner");
    fs::rename(mnt.join("new.bin"), mnt.join("made/moved/inner")).expect("rename over a file");
    assert_eq!(b3(&module.join("made/moved/inner")), b3_bytes(&body));
    assert!(!module.join("new.bin").exists());
    fs::remove_file(mnt.join("made/moved/link")).expect("unlink");
    fs::remove_file(mnt.join("made/moved/inner")).expect("unlink");
    fs::remove_dir(mnt.join("made/moved")).expect("rmdir");
    assert!(!module.join("made/moved").exists());
    // What is left at the daemon is exactly what the mount shows.
    same_tree(&module, &mnt);
    // Nothing staged stays behind once all is closed.
    assert_eq!(staged_files(&t.path().join("staging")), Vec::<PathBuf>::new());
}

fn b3_bytes(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

#[test]
fn a_publish_the_daemon_refuses_fails_fsync_and_leaves_nothing_there() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("keep"), b"kept");
    let d = daemon_with(t.path(), &module, false, 0, &["--quota".into(), "1M".into()]);
    let m = mount(t.path(), &d, "", &[]);
    let mut f = fs::File::create(m.dir.join("big")).expect("create");
    std::io::Write::write_all(&mut f, &data(3 << 20, 4)).expect("write");
    assert!(f.sync_all().is_err(), "an upload over the quota succeeded");
    drop(f);
    assert!(!module.join("big").exists());
    assert!(
        side_files(&module).is_empty(),
        "a partial upload was left: {:?}",
        side_files(&module)
    );
    assert_eq!(fs::read(module.join("keep")).expect("read"), b"kept");
}

#[test]
fn a_read_only_module_mounts_read_only() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("f"), b"x");
    let d = daemon(t.path(), &module, true);
    let m = mount(t.path(), &d, "", &[]);
    assert_eq!(fs::read(m.dir.join("f")).expect("read"), b"x");
    assert_eq!(errno_of(fs::write(m.dir.join("g"), b"y")), Some(libc::EROFS));
    assert_eq!(errno_of(fs::write(m.dir.join("f"), b"y")), Some(libc::EROFS));
    assert_eq!(fs::read(module.join("f")).expect("read"), b"x");
}

/// The `fsx` file system exerciser (crates.io `fsx`, which .ci/run
/// installs), if it is on PATH.
/// A program on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn fsx() -> Option<PathBuf> {
    on_path("fsx")
}

#[test]
fn fsx_finds_nothing_wrong_in_100000_operations() {
    if !can_mount() {
        return;
    }
    let Some(fsx) = fsx() else {
        skipped("fsx is not installed (cargo install --locked fsx)");
        return;
    };
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    fs::create_dir_all(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &[]);
    // Seeded: a failure reproduces with the same seed.
    let o = std::process::Command::new(&fsx)
        .args(["-N", "100000", "-S", "20261203", "-q", "-P"])
        .arg(t.path())
        .arg(m.dir.join("fsx.bin"))
        .output()
        .expect("run fsx");
    assert!(
        o.status.success(),
        "fsx failed (its logs are in {}):\n{}\n{}",
        t.path().display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // What fsx left is what the daemon has, byte for byte.
    let seen = fs::read(m.dir.join("fsx.bin")).expect("read through the mount");
    drop(m);
    assert_eq!(b3(&module.join("fsx.bin")), blake3::hash(&seen).to_hex().to_string());
}

#[test]
fn a_byte_flipped_after_the_daemon_read_it_is_eio_never_wrong_data() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("f"), &data(3 << 20, 5));
    // The daemon (a debug build, as the tests use) flips a byte of every
    // range it sends after hashing it.
    let mut c = tern();
    c.env("TERN_FAULT_FLIP_READS", "1");
    let d = spawn_daemon(c, t.path(), &module, true, 0, &[]);
    let m = mount(t.path(), &d, "", &[]);
    let f = fs::File::open(m.dir.join("f")).expect("open");
    let mut buf = vec![0u8; 4096];
    assert_eq!(errno_of(f.read_exact_at(&mut buf, 1 << 20)), Some(libc::EIO));
    assert_eq!(errno_of(fs::read(m.dir.join("f"))), Some(libc::EIO));
    // tern copy from it refuses the file too, and leaves nothing.
    let out = t.path().join("out");
    let o = go(d.auth(client(t.path()).arg("copy")).arg(d.url("f")).arg(&out));
    assert_ne!(o.status.code(), Some(0));
    assert!(!out.exists());
}

#[test]
fn a_mount_with_daemon_runs_in_the_background_until_unmounted() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("f"), b"background");
    let d = daemon(t.path(), &module, false);
    let dir = t.path().join("mnt");
    fs::create_dir_all(&dir).expect("mkdir");
    let o = go(d
        .auth(
            client(t.path())
                .args(["mount", "--daemon", "--staging-dir"])
                .arg(t.path().join("staging")),
        )
        .arg(d.url(""))
        .arg(&dir));
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 0, "{err}");
    // It returned once the mount was in place.
    assert!(mounted(&dir), "{err}");
    assert_eq!(fs::read(dir.join("f")).expect("read"), b"background");
    let pid: i32 = err
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {err:?}"));
    ok(tern().arg("unmount").arg(&dir));
    assert!(!mounted(&dir));
    wait_until("the background mount to end", Duration::from_secs(30), || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    });
    // A mount that cannot be made says why, and nothing stays behind.
    let o = go(d
        .auth(
            client(t.path())
                .args(["mount", "--daemon", "--staging-dir"])
                .arg(t.path().join("staging")),
        )
        .arg(format!("tern://127.0.0.1:{}/nomodule/", d.port))
        .arg(&dir));
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nomodule"), "{err}");
    assert!(!mounted(&dir));
}

#[test]
fn a_file_unlinked_or_renamed_while_open_is_published_only_where_it_is() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    fs::create_dir_all(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &[]);
    // Unlinked while open (a temporary file's usual life): written on,
    // closed, and never uploaded.
    let mut f = fs::File::create(m.dir.join("tmp")).expect("create");
    std::io::Write::write_all(&mut f, b"scratch").expect("write");
    fs::remove_file(m.dir.join("tmp")).expect("unlink");
    std::io::Write::write_all(&mut f, b" more").expect("write after unlink");
    f.sync_all().expect("fsync");
    drop(f);
    assert!(!module.join("tmp").exists(), "an unlinked file was uploaded");
    // Renamed while open: it lands under its new name only.
    let mut f = fs::File::create(m.dir.join("a")).expect("create");
    std::io::Write::write_all(&mut f, b"first part, ").expect("write");
    fs::rename(m.dir.join("a"), m.dir.join("b")).expect("rename");
    std::io::Write::write_all(&mut f, b"second part").expect("write after rename");
    drop(f);
    assert_eq!(fs::read(module.join("b")).expect("read"), b"first part, second part");
    assert!(!module.join("a").exists());
    assert_eq!(fs::read(m.dir.join("b")).expect("read"), b"first part, second part");
}

#[test]
fn a_staging_or_cache_directory_inside_the_mount_is_refused() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    fs::create_dir_all(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let dir = t.path().join("mnt");
    fs::create_dir_all(&dir).expect("mkdir");
    fails(
        d.auth(client(t.path()).args(["mount", "--staging-dir"]).arg(dir.join("stage")))
            .arg(d.url(""))
            .arg(&dir),
        2,
        "inside the mount point",
    );
    fails(
        d.auth(client(t.path()).args(["mount", "--cache-dir"]).arg(dir.join("cache")))
            .arg(d.url(""))
            .arg(&dir),
        2,
        "the cache directory",
    );
    assert!(!mounted(&dir));
}

/// The staging files (and manifests) beneath `dir`.
fn staged_files(dir: &Path) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    tree(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "staged" || x == "manifest"))
        .collect()
}

/// Writes `body` to `name` through a mount, then kills the mount before
/// the file is closed, and unmounts what is left of it.
fn write_then_crash(t: &Path, d: &Daemon, name: &str, body: &[u8]) {
    let mut m = mount(t, d, "", &[]);
    let mut f = fs::File::create(m.dir.join(name)).expect("create");
    std::io::Write::write_all(&mut f, body).expect("write");
    m.child.kill().expect("kill the mount");
    m.child.wait().expect("wait");
    // Closing on a dead mount fails; the data is in the staging file.
    drop(f);
    ok(tern().arg("unmount").arg(&m.dir));
    assert!(!mounted(&m.dir));
}

#[test]
fn a_mount_killed_before_close_uploads_what_it_staged_when_mounted_again() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("kept.txt"), b"old version");
    let d = daemon(t.path(), &module, false);
    let body = data(12 << 20, 8);
    write_then_crash(t.path(), &d, "new.bin", &body);
    assert!(!module.join("new.bin").exists());
    assert!(
        !staged_files(&t.path().join("staging")).is_empty(),
        "nothing was left staged"
    );
    // Mounted again: the upload is finished before the mount is in place.
    let m = mount(t.path(), &d, "", &[]);
    assert_eq!(b3(&module.join("new.bin")), blake3::hash(&body).to_hex().to_string());
    assert_eq!(fs::read(m.dir.join("new.bin")).expect("read"), body);
    assert_eq!(staged_files(&t.path().join("staging")), Vec::<PathBuf>::new());
    drop(m);

    // Changed at the daemon meanwhile: both versions are kept.
    let mut m = mount(t.path(), &d, "", &[]);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(m.dir.join("kept.txt"))
        .expect("open");
    f.write_all_at(b"NEW", 0).expect("write");
    m.child.kill().expect("kill the mount");
    m.child.wait().expect("wait");
    drop(f);
    ok(tern().arg("unmount").arg(&m.dir));
    write(&module.join("kept.txt"), b"changed at the daemon");
    let _m = mount(t.path(), &d, "", &[]);
    assert_eq!(
        fs::read(module.join("kept.txt")).expect("read"),
        b"changed at the daemon"
    );
    let aside: Vec<_> = fs::read_dir(&module)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("kept.txt.conflict-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(fs::read(module.join(&aside[0])).expect("read"), b"NEW version");
}

#[test]
fn write_back_uploads_a_tree_in_the_background_and_fsync_of_the_directory_waits() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    fs::create_dir_all(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &["--write-back"]);
    let tree = m.dir.join("tree");
    fs::create_dir(&tree).expect("mkdir");
    for i in 0..300 {
        write(&tree.join(format!("f{i}")), &data(100 + i * 7, i as u64));
    }
    write(&tree.join("big"), &data(9 << 20, 1));
    // Shown here at once, whether or not uploaded yet.
    assert_eq!(fs::read_dir(&tree).expect("ls").count(), 301);
    // fsync of the directory: everything closed before is at the daemon.
    fs::File::open(&tree)
        .and_then(|d| d.sync_all())
        .expect("fsync the directory");
    for i in 0..300 {
        assert_eq!(
            fs::read(module.join(format!("tree/f{i}"))).expect("read"),
            data(100 + i * 7, i as u64)
        );
    }
    assert_eq!(b3(&module.join("tree/big")), b3(&tree.join("big")));
    drop(m);
    assert_eq!(staged_files(&t.path().join("staging")), Vec::<PathBuf>::new());
}

#[test]
fn write_back_reports_a_failed_upload_on_fsync_of_the_directory() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    fs::create_dir_all(&module).expect("mkdir");
    let d = daemon_with(t.path(), &module, false, 0, &["--quota".into(), "64K".into()]);
    let m = mount(t.path(), &d, "", &["--write-back"]);
    // Closed without an error: the upload is yet to come.
    write(&m.dir.join("too-big"), &data(200 << 10, 3));
    let r = fs::File::open(&m.dir).and_then(|d| d.sync_all());
    assert_eq!(errno_of(r), Some(libc::EIO));
    assert!(!module.join("too-big").exists());
}

/// The block files under a mount's `--cache-dir`.
fn cached_blocks(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    out.sort();
    out
}

#[test]
fn cache_dir_serves_a_later_mount_and_a_damaged_block_is_fetched_again() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    let body = data((3 << 20) + 12_345, 21);
    write(&module.join("f"), &body);
    let cache = t.path().join("cache");
    let args = ["--read-only", "--cache-dir", cache.to_str().expect("utf-8")];
    let mut d = daemon(t.path(), &module, true);
    let port = d.port;
    {
        let m = mount(t.path(), &d, "", &args);
        assert_eq!(fs::read(m.dir.join("f")).expect("read"), body);
    }
    // Four blocks of 1 MiB, the last one short.
    let blocks = cached_blocks(&cache);
    assert_eq!(blocks.len(), 4, "{blocks:?}");
    d.child.kill().expect("kill");
    d.child.wait().expect("wait");
    // Every range this daemon sends now has a flipped byte: whatever reads
    // right came from the cache.
    let mut c = tern();
    c.env("TERN_FAULT_FLIP_READS", "1");
    let _flipping = spawn_daemon(c, t.path(), &module, true, port, &[]);
    {
        let m = mount(t.path(), &_flipping, "", &args);
        assert_eq!(fs::read(m.dir.join("f")).expect("read from the cache"), body);
    }
    // A byte of the second block damaged on the cache's disk: that block is
    // not used (the daemon's copy, flipped, is EIO), the others still are.
    let second = blocks
        .iter()
        .find(|p| p.to_string_lossy().ends_with("-1"))
        .expect("block 1");
    let f = fs::OpenOptions::new().write(true).open(second).expect("open block");
    f.write_all_at(b"?", 4_000).expect("damage");
    drop(f);
    let m = mount(t.path(), &_flipping, "", &args);
    let f = fs::File::open(m.dir.join("f")).expect("open");
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 2 << 20).expect("block 2 from the cache");
    assert_eq!(buf, body[2 << 20..(2 << 20) + 4096]);
    assert_eq!(errno_of(f.read_exact_at(&mut buf, (1 << 20) + 10)), Some(libc::EIO));
    assert!(!second.exists(), "the damaged block is dropped");
}

fn c_path(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path")
}

#[test]
fn truncate_is_done_at_the_daemon_without_the_data_crossing() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    let body = data(20 << 20, 31);
    write(&module.join("f"), &body);
    // Every byte this daemon sends is flipped: a truncate that fetched the
    // file to cut it would fail.
    let mut c = tern();
    c.env("TERN_FAULT_FLIP_READS", "1");
    let d = spawn_daemon(c, t.path(), &module, false, 0, &[]);
    let m = mount(t.path(), &d, "", &[]);
    let f = m.dir.join("f");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::truncate(c_path(&f).as_ptr(), (9 << 20) + 3) }, 0);
    assert_eq!(fs::metadata(&f).expect("stat").len(), (9 << 20) + 3);
    assert_eq!(fs::read(module.join("f")).expect("read"), body[..(9 << 20) + 3]);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::truncate(c_path(&f).as_ptr(), 30 << 20) }, 0);
    let now = fs::read(module.join("f")).expect("read");
    assert_eq!(now.len(), 30 << 20);
    assert!(now[(9 << 20) + 3..].iter().all(|&b| b == 0));
    // A directory cannot be truncated.
    fs::create_dir(m.dir.join("d")).expect("mkdir");
    // SAFETY: as above.
    assert_ne!(unsafe { libc::truncate(c_path(&m.dir.join("d")).as_ptr(), 0) }, 0);
}

#[test]
fn hard_links_unlinked_open_files_parent_times_and_posix_errors() {
    if !can_mount() {
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("a"), b"shared bytes");
    fs::create_dir_all(module.join("full/inside")).expect("mkdir");
    fs::create_dir_all(module.join("empty")).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &["--attr-timeout", "60"]);
    // link(2): one inode at the daemon; a name that is taken is EEXIST.
    fs::hard_link(m.dir.join("a"), m.dir.join("b")).expect("link");
    let (a, b) = (
        fs::metadata(module.join("a")).expect("stat"),
        fs::metadata(module.join("b")).expect("stat"),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(fs::read(m.dir.join("b")).expect("read"), b"shared bytes");
    // The new name's attributes are the daemon's (the old name's are
    // asked for again once the attribute timeout passes).
    assert_eq!(fs::metadata(m.dir.join("b")).expect("stat").nlink(), 2);
    assert_eq!(
        errno_of(fs::hard_link(m.dir.join("a"), m.dir.join("empty"))),
        Some(libc::EEXIST)
    );
    // An open file unlinked: no links, and its handle still reads and writes.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.dir.join("gone"))
        .expect("create");
    fs::remove_file(m.dir.join("gone")).expect("unlink");
    assert_eq!(f.metadata().expect("fstat").nlink(), 0);
    std::io::Write::write_all(&mut f, b"still here").expect("write");
    let mut back = [0u8; 10];
    f.read_exact_at(&mut back, 0).expect("read");
    assert_eq!(&back, b"still here");
    drop(f);
    assert!(!module.join("gone").exists());
    // A directory's times and link count follow what is done in it, even
    // within the attribute timeout.
    let before = fs::metadata(m.dir.join("empty")).expect("stat");
    fs::create_dir(m.dir.join("empty/sub")).expect("mkdir");
    let after = fs::metadata(m.dir.join("empty")).expect("stat");
    assert_eq!(after.nlink(), before.nlink() + 1);
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        {
            let at = fs::metadata(module.join("empty")).expect("stat");
            (at.mtime(), at.mtime_nsec())
        },
        "the directory's mtime is the daemon's"
    );
    // rename(2) onto a directory that is not empty, and names too long.
    let r = fs::rename(m.dir.join("empty"), m.dir.join("full"));
    assert!(
        matches!(errno_of(r), Some(libc::ENOTEMPTY | libc::EEXIST)),
        "a directory with entries is never replaced"
    );
    assert!(module.join("full/inside").is_dir() && module.join("empty/sub").is_dir());
    let long = "n".repeat(256);
    assert_eq!(errno_of(fs::create_dir(m.dir.join(&long))), Some(libc::ENAMETOOLONG));
    assert_eq!(errno_of(fs::metadata(m.dir.join(&long))), Some(libc::ENAMETOOLONG));
}

#[test]
fn pjdfstest_passes_but_for_its_versioned_list_of_expected_failures() {
    if !can_mount() {
        return;
    }
    let Some(pjd) = on_path("pjdfstest") else {
        skipped("pjdfstest is not installed (cargo install --locked pjdfstest --version 0.2.2)");
        return;
    };
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    fs::create_dir_all(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let m = mount(t.path(), &d, "", &[]);
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pjdfstest.toml");
    let o = std::process::Command::new(&pjd)
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(&m.dir)
        .current_dir(&m.dir)
        .output()
        .expect("run pjdfstest");
    let out = String::from_utf8_lossy(&o.stdout);
    let failed: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED") || l.contains("PASSED UNEXPECTEDLY"))
        .collect();
    assert!(
        o.status.success(),
        "pjdfstest: {}\n{}\n{}",
        out.lines().find(|l| l.starts_with("Summary")).unwrap_or("no summary"),
        failed.join("\n"),
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(m);
}

#[test]
fn allow_other_lets_other_users_in_with_the_permission_bits_checked() {
    if !can_mount() {
        return;
    }
    let as_nobody = |args: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", args])
            .stdin(Stdio::null())
            .output()
            .expect("setpriv")
    };
    if !as_nobody("true").status.success() {
        skipped("setpriv cannot run a command as nobody");
        return;
    }
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    write(&module.join("f"), b"readable by all");
    fs::set_permissions(module.join("f"), fs::Permissions::from_mode(0o644)).expect("chmod");
    write(&module.join("secret"), b"the owner's only");
    fs::set_permissions(module.join("secret"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let d = daemon(t.path(), &module, false);
    {
        // Without it, another user is refused at the door.
        let m = mount(t.path(), &d, "", &[]);
        let o = as_nobody(&format!("cat {}", m.dir.join("f").display()));
        assert!(!o.status.success());
    }
    let m = mount(t.path(), &d, "", &["--allow-other"]);
    let o = as_nobody(&format!("cat {}", m.dir.join("f").display()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, b"readable by all");
    // The bits the daemon reports decide: not nobody's to read or write.
    assert!(!as_nobody(&format!("cat {}", m.dir.join("secret").display()))
        .status
        .success());
    assert!(!as_nobody(&format!("echo x > {}", m.dir.join("f").display()))
        .status
        .success());
    assert_eq!(fs::read(module.join("f")).expect("read"), b"readable by all");
}
