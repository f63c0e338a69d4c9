//! Issue 19: `tern mount` shows a daemon's module as a local folder, read
//! only for now, every byte checked.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
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
        .auth(client(t).arg("mount").args(extra))
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
    let m = mount(t.path(), &d, "tree", &[]);
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
