//! Round trips that do not grow with the tree: the requests a run sends to
//! a daemon, and the times it waits for one with nothing else in flight,
//! as the client counts them in `--json`. Counts, not times: a version-1
//! client (one request per directory and per file) shows what they catch.

mod common;

use std::fs;
use std::path::Path;
use std::process::Stdio;

use common::server::*;
use common::*;

/// 1,000 files of 1-16 KiB in 100 directories (10 of 10), two levels deep.
fn wide_tree(root: &Path) {
    for i in 0..1000u64 {
        let p = root.join(format!("d{}/s{}/f{i:04}", i / 100, (i / 10) % 10));
        write(&p, &data(1024 + (i as usize * 997) % 15360, i));
    }
}

/// Gives `p` and everything under it to uid and gid `id`.
fn give_away(p: &Path, id: u32) {
    std::os::unix::fs::lchown(p, Some(id), Some(id)).expect("chown");
    if p.is_dir() && !p.is_symlink() {
        for e in fs::read_dir(p).expect("list") {
            give_away(&e.expect("entry").path(), id);
        }
    }
}

const DIRS: u64 = 111; // the root, 10, and 100 below them

/// Waits that may not be hidden behind others: connecting, the two roots'
/// stats, making the destination root, settling queued changes and the
/// final barrier. Whatever the tree holds.
const MAX_WAITS: u64 = 12;

fn counts(out: &str) -> (u64, u64, serde_json::Value) {
    let j = json(out);
    assert_eq!(j["errors"], 0, "{out}");
    let r = j["requests"].as_u64().expect("requests in --json");
    let w = j["waits"].as_u64().expect("waits in --json");
    (r, w, j)
}

#[test]
fn waits_stay_constant_for_push_pull_check_and_sync() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    wide_tree(&src);
    if is_root() {
        // A daemon gives what a client asks to be root's to the module's
        // owner instead, so a tree of root's differs from its copy in owner
        // at every run (and is set again): not what this test counts.
        give_away(&src, 1000);
    }
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let run = |args: &[&str], from: &str, to: &str| {
        let out = ok(d.auth(client(t.path()).args(args).arg("--json")).arg(from).arg(to));
        counts(&out)
    };
    let s = format!("{}/", src.display());
    for tr in ["tcp", "quic"] {
        let up = d.url(&format!("up-{tr}/"));
        // Push into an empty module directory: every directory made and
        // every directory's times set are queued changes, not round trips.
        let (r, w, j) = run(&["copy", "--transport", tr], &s, &up);
        assert_eq!(j["copied"], 1000);
        assert!(w <= MAX_WAITS, "push over {tr}: {w} waits");
        assert!(r <= 2 * DIRS + 40, "push over {tr}: {r} requests");
        same_tree(&src, &module.join(format!("up-{tr}")));

        // Pull into an empty directory: one streamed listing, then a few
        // batched reads.
        let back = t.path().join(format!("back-{tr}"));
        let (r, w, j) = run(&["copy", "--transport", tr], &up, &format!("{}/", back.display()));
        assert_eq!(j["copied"], 1000);
        assert!(w <= MAX_WAITS, "pull over {tr}: {w} waits");
        assert!(r <= 30, "pull over {tr}: {r} requests");
        same_tree(&src, &back);
    }
    let up = d.url("up-tcp/");

    // Nothing changed: both listings stream, no file is touched.
    let (r, w, j) = run(&["sync", "--transport", "tcp"], &s, &up);
    assert_eq!((j["copied"].as_u64(), j["unchanged"].as_u64()), (Some(0), Some(1000)));
    assert!(w <= MAX_WAITS, "no-change sync: {w} waits");
    assert!(r <= DIRS + 30, "no-change sync: {r} requests");

    // check and sync -c hash a batch of files per request on each side.
    let (r, w, j) = run(&["check", "--transport", "tcp"], &s, &up);
    assert_eq!(j["differences"], 0);
    assert!(w <= MAX_WAITS, "check: {w} waits");
    assert!(r <= 30, "check: {r} requests");
    let (r, w, j) = run(&["sync", "-c", "--transport", "tcp"], &s, &up);
    assert_eq!(j["unchanged"], 1000);
    assert!(w <= MAX_WAITS, "sync -c: {w} waits");
    assert!(r <= DIRS + 30, "sync -c: {r} requests");

    // A dry run with --delete over changes on both sides plans all of them
    // from the two streamed listings, and changes nothing.
    for i in 0..20 {
        write(&module.join(format!("up-tcp/d{}/extra{i}", i % 10)), b"extra");
        write(&src.join(format!("d{}/s{}/new{i}", i % 10, i % 7)), b"new");
    }
    let (r, w, j) = run(&["sync", "-n", "--delete", "--transport", "tcp"], &s, &up);
    assert_eq!((j["copied"].as_u64(), j["deleted"].as_u64()), (Some(20), Some(20)));
    assert!(w <= MAX_WAITS, "dry run: {w} waits");
    assert!(r <= 30, "dry run: {r} requests");
    assert!(module.join("up-tcp/d3/extra3").exists());

    // The same, done: 20 files sent in a batch, 20 deletions queued.
    let (r, w, j) = run(&["sync", "--delete", "--transport", "tcp"], &s, &up);
    assert_eq!((j["copied"].as_u64(), j["deleted"].as_u64()), (Some(20), Some(20)));
    assert!(w <= MAX_WAITS, "sync --delete: {w} waits");
    assert!(r <= DIRS + 60, "sync --delete: {r} requests");
    same_tree(&src, &module.join("up-tcp"));
}

#[test]
fn a_version_1_client_still_works_with_this_daemon_one_request_at_a_time() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    wide_tree(&src);
    make_tree(&src.join("mixed"));
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let v1 = || {
        let mut c = client(t.path());
        c.env("TERN_PROTOCOL_MAX", "1");
        c
    };
    let s = format!("{}/", src.display());
    ok(d.auth(v1().args(["copy", "--no-progress"])).arg(&s).arg(d.url("v1/")));
    same_tree(&src, &module.join("v1"));
    let back = t.path().join("back");
    let out = ok(d
        .auth(v1().args(["copy", "--json"]))
        .arg(d.url("v1/"))
        .arg(format!("{}/", back.display())));
    same_tree(&src, &back);
    // The old protocol's cost, which the counts exist to show: at least
    // one request per file.
    let (r, _, _) = counts(&out);
    assert!(r > 1000, "a version-1 pull sent only {r} requests");
    write(&module.join("v1/d2/s2/f0222"), b"changed");
    let o = go(d.auth(v1().arg("check")).arg(&src).arg(d.url("v1")));
    let (code, out, _) = outcome(&o);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("d2/s2/f0222"), "{out}");
}

#[test]
fn a_queued_directory_that_cannot_be_made_is_reported_with_its_path() {
    let t = tempfile::tempdir().expect("tempdir");
    let Some((d, module)) = nobody_daemon(t.path()) else {
        return;
    };
    // The daemon (as nobody) may not write into `locked`.
    fs::create_dir(module.join("locked")).expect("mkdir");
    let src = t.path().join("src");
    write(&src.join("open/a"), b"a");
    write(&src.join("locked/inner/b"), b"b");
    write(&src.join("locked/inner/deeper/c"), b"c");
    let o = go(d
        .auth(client(t.path()).args(["copy", "--no-progress", "--transport", "tcp"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("")));
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("locked/inner") && err.contains("Permission denied"),
        "the failed directory is not named:\n{err}"
    );
    assert_eq!(fs::read(module.join("open/a")).expect("read"), b"a");
    assert!(!module.join("locked/inner").exists());
    assert!(side_files(&module).is_empty());
}

#[test]
fn a_daemon_pulling_from_another_waits_a_constant_number_of_times() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    let (src, dst) = (root.join("src"), root.join("dst"));
    wide_tree(&src);
    fs::create_dir(&dst).expect("mkdir");
    let client_fp = ok(client(root).arg("fingerprint")).trim().to_string();
    let b_fp = server_fingerprint(&root.join("b"));
    let a = daemon_with(
        &root.join("a"),
        &src,
        true,
        0,
        &["--allow-key".into(), client_fp, "--allow-key".into(), b_fp],
    );
    let b = daemon_with(
        &root.join("b"),
        &dst,
        false,
        0,
        &[
            "--pull-from".to_string(),
            format!("127.0.0.1:{}={}", a.port, a.fingerprint),
        ],
    );
    let hosts = format!(
        "127.0.0.1:{} {}\n127.0.0.1:{} {}\n",
        a.port, a.fingerprint, b.port, b.fingerprint
    );
    write(&root.join("client/known_hosts"), hosts.as_bytes());
    for tr in ["tcp", "quic"] {
        let out = ok(client(root)
            .args(["copy", "--json", "--transport", tr, "--token-file"])
            .arg(&b.token)
            .arg(a.url(""))
            .arg(b.url(&format!("d-{tr}/"))));
        // The counts are the destination daemon's, as it reached A.
        let (r, w, j) = counts(&out);
        assert_eq!(
            (j["direct"].as_bool(), j["copied"].as_u64()),
            (Some(true), Some(1000)),
            "{out}"
        );
        assert!(w <= MAX_WAITS, "daemon to daemon over {tr}: {w} waits");
        assert!(r <= 30, "daemon to daemon over {tr}: {r} requests");
        same_tree(&src, &dst.join(format!("d-{tr}")));
    }
}

#[test]
fn a_connection_lost_under_batched_reads_is_one_error_a_batch() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("dst"), t.path().join("module"));
    wide_tree(&module.join("tree"));
    let mut d = daemon(t.path(), &module, false);
    // Slowed, so the daemon dies with batches still to read.
    let mut c = client(t.path());
    d.auth(c.args(["copy", "--no-progress", "--retries", "0", "--bwlimit", "1M", "-j", "2"]))
        .arg(d.url("tree/"))
        .arg(format!("{}/", src.display()));
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    // The first batch is committed: its leaf directory holds files.
    let first = src.join("d0/s0");
    wait_until("the first files to land", std::time::Duration::from_secs(30), || {
        fs::read_dir(&first).is_ok_and(|mut d| d.next().is_some())
    });
    kill9(&mut d.child);
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    let errors = err.lines().filter(|l| l.starts_with("error:")).count();
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(errors >= 1, "the lost connection was not reported:\n{err}");
    // A batch is up to 256 files; each batch cut off is one line.
    assert!(errors <= 8, "{errors} error lines for one lost connection:\n{err}");
}
