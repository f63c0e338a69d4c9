//! A real daemon on 127.0.0.1 with a random port, and clients for it.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::*;

/// A running `tern serve`, killed when dropped.
pub struct Daemon {
    /// The daemon process.
    pub child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its key fingerprint.
    pub fingerprint: String,
    /// The token file clients use.
    pub token: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a daemon exporting `module` (read-write unless `ro`), reading its
/// banner for the port and fingerprint.
pub fn daemon(dir: &Path, module: &Path, ro: bool) -> Daemon {
    daemon_on(dir, module, ro, 0)
}

pub fn daemon_on(dir: &Path, module: &Path, ro: bool, port: u16) -> Daemon {
    daemon_with(dir, module, ro, port, &[])
}

/// A daemon with more `tern serve` arguments; its log goes to `dir/log`.
pub fn daemon_with(dir: &Path, module: &Path, ro: bool, port: u16, extra: &[String]) -> Daemon {
    spawn_daemon(tern(), dir, module, ro, port, extra)
}

/// Whether this process runs as root (which reads and writes anything).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `tern` run as the unprivileged user `nobody` when we are root (where
/// permission bits would not apply); None without root or `setpriv`.
pub fn tern_as_nobody() -> Option<Command> {
    let have = Command::new("setpriv")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    if !is_root() || !have {
        return None;
    }
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_tern"))
        .env_remove("RUST_LOG");
    Some(c)
}

/// A daemon running as `nobody` (see [`tern_as_nobody`]); `dir` and its
/// state must be reachable by that user. None where that is not possible.
pub fn daemon_as_nobody(dir: &Path, module: &Path) -> Option<Daemon> {
    let c = tern_as_nobody()?;
    Some(spawn_daemon(c, dir, module, false, 0, &[]))
}

/// Starts `c` (a `tern` binary, perhaps behind a wrapper) as `tern serve`.
pub fn spawn_daemon(mut c: Command, dir: &Path, module: &Path, ro: bool, port: u16, extra: &[String]) -> Daemon {
    let token = dir.join("token");
    c.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--token-file"])
        .arg(&token)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--module")
        .arg(format!("data={}", module.display()));
    if !ro {
        c.arg("--read-write");
    }
    c.args(extra);
    fs::create_dir_all(dir).expect("mkdir");
    let log = fs::File::create(dir.join("log")).expect("log file");
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let (mut port, mut fp) = (0, String::new());
    // The banner is printed once the daemon listens: reading it is the
    // synchronisation.
    for line in BufReader::new(out).lines() {
        let line = line.expect("banner");
        if let Some(rest) = line.strip_prefix("tern daemon listening on 127.0.0.1:") {
            port = rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .expect("port");
        }
        if let Some(f) = line.strip_prefix("fingerprint: ") {
            fp = f.to_string();
        }
        if line.starts_with("try:") {
            break;
        }
    }
    assert!(port > 0 && fp.starts_with("b3:"), "daemon banner incomplete");
    Daemon {
        child,
        port,
        fingerprint: fp,
        token,
    }
}

/// A client command with its own config dir (known hosts, key).
pub fn client(dir: &Path) -> Command {
    let mut c = tern();
    c.env("TERN_CONFIG_DIR", dir.join("client"))
        .env_remove("TERN_TOKEN")
        .env_remove("TERN_FINGERPRINT");
    c.stdin(Stdio::null());
    c
}

pub fn go(c: &mut Command) -> Output {
    c.output().expect("run tern")
}

pub fn ok(c: &mut Command) -> String {
    let o = go(c);
    let (code, out, err) = outcome(&o);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    out
}

pub fn fails(c: &mut Command, code: i32, needle: &str) {
    let o = go(c);
    let (got, out, err) = outcome(&o);
    assert_eq!(got, code, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
}

/// A tree with a multi-chunk file, small files, a symlink, an empty
/// directory and a name that is not UTF-8.
pub fn make_tree(root: &Path) {
    write(&root.join("big.bin"), &data(5 * 1024 * 1024 + 123, 1));
    for i in 0..50 {
        write(&root.join(format!("small/f{i}")), &data(100 + i * 37, i as u64));
    }
    write(&root.join(OsStr::from_bytes(b"odd-\xff-name")), b"bytes");
    fs::create_dir_all(root.join("empty")).expect("mkdir");
    std::os::unix::fs::symlink("small/f1", root.join("link")).expect("symlink");
}

pub fn same_tree(a: &Path, b: &Path) {
    assert_eq!(tree(a), tree(b));
    for p in tree(a) {
        let (x, y) = (a.join(&p), b.join(&p));
        let m = fs::symlink_metadata(&x).expect("stat");
        if m.is_file() {
            assert_eq!(b3(&x), b3(&y), "{}", p.display());
        } else if m.file_type().is_symlink() {
            assert_eq!(fs::read_link(&x).expect("link"), fs::read_link(&y).expect("link"));
        }
    }
}

impl Daemon {
    pub fn url(&self, path: &str) -> String {
        format!("tern://127.0.0.1:{}/data/{path}", self.port)
    }

    /// Client args that trust and authenticate to this daemon.
    pub fn auth<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        c.arg("--fingerprint")
            .arg(&self.fingerprint)
            .arg("--token-file")
            .arg(&self.token)
    }
}

/// A daemon run as `nobody`, for permission bits to apply; its module is
/// `t/module`. None (the test skips) without root.
pub fn nobody_daemon(t: &Path) -> Option<(Daemon, PathBuf)> {
    fs::set_permissions(t, fs::Permissions::from_mode(0o755)).expect("chmod");
    let (home, module) = (t.join("daemon"), t.join("module"));
    for d in [&home, &module] {
        fs::create_dir_all(d).expect("mkdir");
        fs::set_permissions(d, fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let d = daemon_as_nobody(&home, &module);
    if d.is_none() {
        skipped("needs root and setpriv to run the daemon as nobody");
    }
    d.map(|d| (d, module))
}

/// The key fingerprint of the daemon whose state lives in `dir/state`.
pub fn server_fingerprint(dir: &Path) -> String {
    let out = ok(tern()
        .args(["fingerprint", "--server", "--state-dir"])
        .arg(dir.join("state")));
    out.trim().to_string()
}
