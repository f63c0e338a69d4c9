//! `tern serve`'s quick start and the secrets it keeps: the token shown
//! once, short tokens refused, key and token files other users can read
//! refused or warned about.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use common::*;

/// Starts the quick start serving `dir/m` with the token file `dir/tok`
/// and the state in `dir/state`, then stops it once its banner is out
/// (reading the banner to its last line is the synchronisation). The
/// banner's lines, what it wrote to stderr, and whether it had to be
/// stopped (false: it exited on its own).
fn quick_start(dir: &Path) -> (Vec<String>, String, bool) {
    quick_start_with(dir, &["--read-write"])
}

/// [`quick_start`] with `flags` in place of `--read-write`.
fn quick_start_with(dir: &Path, flags: &[&str]) -> (Vec<String>, String, bool) {
    fs::create_dir_all(dir.join("m")).expect("mkdir");
    let mut child = tern()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(flags)
        .arg("--token-file")
        .arg(dir.join("tok"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--module")
        .arg(format!("data={}", dir.join("m").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = Vec::new();
    let mut running = false;
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("banner");
        let last = line.starts_with("try:");
        lines.push(line);
        if last {
            running = true;
            break;
        }
    }
    if running {
        child.kill().expect("stop the daemon");
    }
    let out = child.wait_with_output().expect("wait");
    (lines, String::from_utf8_lossy(&out.stderr).into_owned(), running)
}

#[test]
fn the_quick_start_prints_its_token_only_when_it_creates_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let (first, _, up) = quick_start(t.path());
    assert!(up, "the daemon did not start: {first:?}");
    let token = fs::read_to_string(t.path().join("tok")).expect("token file");
    let token = token.trim();
    assert!(token.len() >= 16, "{token:?}");
    let mode = fs::metadata(t.path().join("tok")).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the token file must be private");
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("token (created") && l.ends_with(token)),
        "{first:?}"
    );
    let (again, _, up) = quick_start(t.path());
    assert!(up, "the daemon did not start again: {again:?}");
    assert!(again.iter().all(|l| !l.contains(token)), "token shown again: {again:?}");
    let named = format!("token: in {}", t.path().join("tok").display());
    assert!(again.contains(&named), "{again:?}");
    // The example is a push to a writable module, a listing of a
    // read-only one.
    let try_line = |lines: &[String]| lines.last().cloned().unwrap_or_default();
    assert!(try_line(&again).starts_with("try: tern copy FILE tern://"), "{again:?}");
    let (ro, _, up) = quick_start_with(t.path(), &[]);
    assert!(up, "{ro:?}");
    assert!(try_line(&ro).starts_with("try: tern ls tern://"), "{ro:?}");
}

#[test]
fn a_short_token_file_is_refused() {
    let t = tempfile::tempdir().expect("tempdir");
    fs::write(t.path().join("tok"), "s3cret\n").expect("write");
    fs::set_permissions(t.path().join("tok"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let (banner, err, up) = quick_start(t.path());
    assert!(!up, "served with a 6-byte token: {banner:?}");
    assert!(err.contains("has 6 bytes; a token needs 16"), "{err}");
}

#[test]
fn a_token_file_others_can_read_is_warned_about_and_a_key_file_refused() {
    let t = tempfile::tempdir().expect("tempdir");
    let tok = t.path().join("tok");
    fs::write(&tok, "a-token-of-twenty-bytes\n").expect("write");
    fs::set_permissions(&tok, fs::Permissions::from_mode(0o644)).expect("chmod");
    let (banner, err, up) = quick_start(t.path());
    assert!(up, "{banner:?} {err}");
    assert!(
        err.contains(&format!("{}: the token file can be read", tok.display())) && err.contains("chmod 600"),
        "{err}"
    );

    let key = t.path().join("state/identity");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).expect("chmod");
    let (banner, err, up) = quick_start(t.path());
    assert!(!up, "served with a readable key: {banner:?}");
    assert!(
        err.contains(&key.display().to_string()) && err.contains("mode 0640") && err.contains("chmod 600"),
        "{err}"
    );
    // The client's own key likewise.
    let client_key = t.path().join("client/identity/identity");
    fs::create_dir_all(t.path().join("client")).expect("mkdir");
    let out = tern()
        .env("TERN_CONFIG_DIR", t.path().join("client"))
        .arg("fingerprint")
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    fs::set_permissions(&client_key, fs::Permissions::from_mode(0o604)).expect("chmod");
    let out = tern()
        .env("TERN_CONFIG_DIR", t.path().join("client"))
        .arg("fingerprint")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("chmod 600"), "{err}");
}
