//! Helpers for tests that drive the real `tern` binary.
#![allow(dead_code)]

pub mod server;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn tern() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern"));
    c.env_remove("RUST_LOG");
    // Not the user's own defaults, credentials or pinned keys (`client`
    // points it at a test's directory).
    c.env("TERN_CONFIG_DIR", "/nonexistent/tern-test-config");
    c
}

/// Runs tern with `args`; returns the output.
pub fn run(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = tern();
    for a in args {
        c.arg(a.as_ref());
    }
    c.stdin(Stdio::null()).output().expect("spawn tern")
}

/// Exit code, stdout and stderr as text, for assertions.
pub fn outcome(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs tern and asserts it exits with `code`; returns stdout.
pub fn expect(code: i32, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let o = run(args);
    let (c, out, err) = outcome(&o);
    assert_eq!(c, code, "tern exited {c}\nstdout:\n{out}\nstderr:\n{err}");
    out
}

/// Parses the `--json` summary.
pub fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON summary {out:?}: {e}"))
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes a file, creating parents.
pub fn write(path: &Path, content: &[u8]) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).expect("mkdir");
    }
    fs::write(path, content).expect("write");
}

/// BLAKE3 of a file, as `b3sum` prints it.
pub fn b3(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(path).expect("open")).expect("read");
    h.finalize().to_hex().to_string()
}

/// Every path under `root` (relative, sorted), with tern's side files marked.
pub fn tree(root: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").path())
            .collect();
        entries.sort();
        for p in entries {
            out.push(p.strip_prefix(root).expect("prefix").to_path_buf());
            if p.symlink_metadata().expect("lstat").is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// tern's temporary and journal files anywhere under `root`.
pub fn side_files(root: &Path) -> Vec<PathBuf> {
    tree(root)
        .into_iter()
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n.ends_with(".tern.tmp") || n.ends_with(".tern.journal")
        })
        .collect()
}

/// Waits (bounded) until `cond` holds, polling; panics on timeout.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Number of chunk records in a resume journal (header 64 bytes, 48 a record).
pub fn journal_records(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len().saturating_sub(64) / 48).unwrap_or(0)
}

/// Kills and reaps a child.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Bytes allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").blocks() * 512
}

/// Mounts a tmpfs of `size` at `dir`; false where mounting is not allowed.
pub fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    fs::create_dir_all(dir).expect("mkdir");
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Unmounts its path when dropped.
pub struct Unmount<'a>(pub &'a Path);
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

/// A test that cannot run here says why and returns. Under CI (`CI=true`),
/// where `.ci/run` installs what every test needs, not running is a
/// failure rather than a pass nobody notices.
pub fn skipped(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test cannot run here, and CI must run it: {why}"
    );
    eprintln!("skipping: {why}");
}
