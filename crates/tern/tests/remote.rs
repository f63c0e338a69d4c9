//! End-to-end: the real daemon on 127.0.0.1 with a random port, driven by
//! the real client.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::server::*;
use common::*;

#[test]
fn push_pull_check_and_sync_over_both_transports() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    make_tree(&src);
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    for tr in ["tcp", "quic"] {
        // Push, with a small chunk size so the big file has many chunks on
        // several streams at once.
        let out = ok(d
            .auth(client(t.path()).args(["copy", "--json", "--chunk-size", "256K", "--transport", tr]))
            .arg(format!("{}/", src.display()))
            .arg(d.url(&format!("push-{tr}"))));
        let j = json(&out);
        assert_eq!(j["transport"], tr);
        assert_eq!(j["errors"], 0);
        same_tree(&src, &module.join(format!("push-{tr}")));
        assert!(side_files(&module).is_empty());

        // Pull it back.
        let back = t.path().join(format!("pull-{tr}"));
        ok(d.auth(client(t.path()).args(["copy", "--transport", tr]))
            .arg(d.url(&format!("push-{tr}/")))
            .arg(&back));
        same_tree(&src, &back);

        // Check by content: equal, then one difference found.
        ok(d.auth(client(t.path()).args(["check", "--transport", tr]))
            .arg(&src)
            .arg(d.url(&format!("push-{tr}"))));
        write(&module.join(format!("push-{tr}/small/f3")), b"changed");
        let o = go(d
            .auth(client(t.path()).args(["check", "--transport", tr]))
            .arg(&src)
            .arg(d.url(&format!("push-{tr}"))));
        assert_eq!(outcome(&o).0, 4, "{}", outcome(&o).2);
        assert!(outcome(&o).1.contains("small/f3"));

        // Sync with --delete repairs and removes extras.
        write(&module.join(format!("push-{tr}/extra")), b"x");
        ok(d.auth(client(t.path()).args(["sync", "--delete", "--transport", tr]))
            .arg(format!("{}/", src.display()))
            .arg(d.url(&format!("push-{tr}"))));
        same_tree(&src, &module.join(format!("push-{tr}")));
    }
}

#[test]
fn wrong_missing_and_read_only_credentials_are_refused_clearly() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    write(&src.join("a"), b"a");
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let bad = t.path().join("bad-token");
    fs::write(&bad, "not-the-token-of-this-daemon\n").expect("write");
    fails(
        client(t.path())
            .args(["copy", "--fingerprint", &d.fingerprint, "--token-file"])
            .arg(&bad)
            .arg(&src)
            .arg(d.url("")),
        1,
        "token is not valid",
    );
    fails(
        client(t.path())
            .args(["copy", "--fingerprint", &d.fingerprint])
            .arg(&src)
            .arg(d.url("")),
        1,
        "no token given",
    );
    fails(
        d.auth(client(t.path()).arg("copy"))
            .arg(&src)
            .arg(format!("tern://127.0.0.1:{}/nope/", d.port)),
        1,
        "no module named `nope`",
    );
    assert!(tree(&module).is_empty(), "nothing may be written");

    // A read-only module: reading works, writing is refused.
    let t2 = tempfile::tempdir().expect("tempdir");
    write(&t2.path().join("ro/file"), b"content");
    let ro = daemon(t2.path(), &t2.path().join("ro"), true);
    fails(
        ro.auth(client(t2.path()).arg("copy")).arg(&src).arg(ro.url("")),
        1,
        "read-only",
    );
    ok(ro
        .auth(client(t2.path()).arg("copy"))
        .arg(ro.url("file"))
        .arg(t2.path().join("got")));
    assert_eq!(fs::read(t2.path().join("got")).expect("read"), b"content");
}

#[test]
fn server_keys_are_pinned_on_first_use_and_a_change_is_a_hard_error() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    write(&src.join("a"), b"a");
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let tok = || d.token.clone();
    fails(
        client(t.path())
            .arg("copy")
            .arg("--token-file")
            .arg(tok())
            .arg(&src)
            .arg(d.url("x")),
        1,
        "not a known host",
    );
    ok(client(t.path())
        .args(["copy", "--accept-new-host", "--token-file"])
        .arg(tok())
        .arg(&src)
        .arg(d.url("x")));
    let kh = t.path().join("client/known_hosts");
    let pinned = fs::read_to_string(&kh).expect("known_hosts");
    assert!(pinned.contains(&d.fingerprint) && pinned.contains(&format!("127.0.0.1:{}", d.port)));
    // Now known: no flag needed.
    ok(client(t.path())
        .arg("copy")
        .arg("--token-file")
        .arg(tok())
        .arg(&src)
        .arg(d.url("y")));
    // The key this address presents no longer matches the pinned one.
    let other = format!("127.0.0.1:{} b3:{}\n", d.port, "0".repeat(64));
    fs::write(&kh, other).expect("write");
    fails(
        client(t.path())
            .arg("copy")
            .arg("--token-file")
            .arg(tok())
            .arg(&src)
            .arg(d.url("z")),
        1,
        "KEY HAS CHANGED",
    );
    fails(
        client(t.path())
            .args([
                "copy",
                "--fingerprint",
                &format!("b3:{}", "1".repeat(64)),
                "--token-file",
            ])
            .arg(tok())
            .arg(&src)
            .arg(d.url("z")),
        1,
        "not the expected",
    );
    assert!(!module.join("z").exists());
    // Issue 20: once the change is understood, forget-host drops the pin
    // (and only it), and the next connection pins the key it finds.
    let host = format!("127.0.0.1:{}", d.port);
    fs::write(
        &kh,
        format!(
            "# mine\n{host} b3:{}\nother:7373 b3:{}\n",
            "0".repeat(64),
            "2".repeat(64)
        ),
    )
    .expect("write");
    let out = ok(client(t.path()).args(["forget-host", &host]));
    assert!(out.contains("forgot") && out.contains(&host), "{out}");
    assert_eq!(
        fs::read_to_string(&kh).expect("read"),
        format!("# mine\nother:7373 b3:{}\n", "2".repeat(64))
    );
    fails(client(t.path()).args(["forget-host", &host]), 1, "no key pinned");
    ok(client(t.path())
        .args(["copy", "--accept-new-host", "--token-file"])
        .arg(tok())
        .arg(&src)
        .arg(d.url("z")));
    assert!(fs::read_to_string(&kh).expect("read").contains(&d.fingerprint));
}

#[test]
fn sixteen_clients_at_once() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    make_tree(&src);
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    push_at_once(t.path(), &d, &src, &module, 16, "2", |i| {
        if i % 2 == 0 {
            "tcp"
        } else {
            "quic"
        }
    });
}

/// Starts `n` clients at once, client `i` pushing `src` to `c{i}` with
/// `jobs` workers over `transport(i)`, and waits for them: each must
/// succeed and its copy in `module` equal `src`.
fn push_at_once(
    t: &Path,
    d: &Daemon,
    src: &Path,
    module: &Path,
    n: usize,
    jobs: &str,
    transport: impl Fn(usize) -> &'static str,
) {
    let children: Vec<Child> = (0..n)
        .map(|i| {
            d.auth(client(t).args(["copy", "-q", "-j", jobs, "--transport", transport(i)]))
                .stderr(Stdio::piped())
                .arg(format!("{}/", src.display()))
                .arg(d.url(&format!("c{i}")))
                .spawn()
                .expect("spawn")
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().expect("wait");
        assert!(
            o.status.success(),
            "client {i} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        same_tree(src, &module.join(format!("c{i}")));
    }
}

/// A daemon limited to 200 open files, and six clients pushing 600 small
/// files each over eight connections: every file lands, because batches
/// wait for descriptors from the daemon's budget instead of failing with
/// "too many open files" (which they did before the budget).
#[test]
fn many_clients_under_a_low_open_file_limit_all_land() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    for i in 0..600 {
        write(&src.join(format!("d{}/f{i}", i % 6)), &data(200 + i, i as u64));
    }
    fs::create_dir(&module).expect("mkdir");
    let mut limited = Command::new("prlimit");
    limited.arg("--nofile=200:200").arg(env!("CARGO_BIN_EXE_tern"));
    if Command::new("prlimit").arg("--version").output().is_err() {
        skipped("prlimit not available");
        return;
    }
    let d = spawn_daemon(limited, t.path(), &module, false, 0, &[]);
    push_at_once(t.path(), &d, &src, &module, 6, "8", |_| "tcp");
}

/// Starts a slow push of a 48 MiB file and waits until the daemon has
/// journaled some of its chunks.
fn slow_push(t: &Path, d: &Daemon, src: &Path, module: &Path, transport: &str) -> Child {
    let child = d
        .auth(client(t).args([
            "copy",
            "-q",
            "--chunk-size",
            "1M",
            "--bwlimit",
            "12M",
            "--transport",
            transport,
        ]))
        .arg(src)
        .arg(d.url("big"))
        .spawn()
        .expect("spawn");
    wait_until("journaled chunks", Duration::from_secs(60), || {
        journal_records(&module.join(".big.tern.journal")) >= 4
    });
    child
}

#[test]
fn kill_9_of_client_or_daemon_then_rerun_resumes_to_the_same_blake3() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("big"), t.path().join("module"));
    write(&src, &data(48 << 20, 9));
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);

    // The client dies.
    let mut c = slow_push(t.path(), &d, &src, &module, "tcp");
    kill9(&mut c);
    assert!(!module.join("big").exists(), "no partial file at the final name");
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "--chunk-size", "1M", "--transport", "quic"]))
        .arg(&src)
        .arg(d.url("big")));
    let j = json(&out);
    assert!(j["bytes_resumed"].as_u64().unwrap_or(0) >= 4 << 20, "{out}");
    assert_eq!(b3(&src), b3(&module.join("big")));
    assert!(side_files(&module).is_empty());

    // Over QUIC a killed client sends no close, and the daemon keeps the
    // file locked until the connection's idle timeout: an immediate rerun
    // waits for it rather than fail with "another tern process is writing
    // this file" (found by tools/crash_resume.sh).
    fs::remove_file(module.join("big")).expect("rm");
    let mut c = slow_push(t.path(), &d, &src, &module, "quic");
    kill9(&mut c);
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "--chunk-size", "1M", "--transport", "quic"]))
        .arg(&src)
        .arg(d.url("big")));
    assert_eq!(json(&out)["errors"], 0, "{out}");
    assert_eq!(b3(&src), b3(&module.join("big")));
    assert!(side_files(&module).is_empty());

    // The daemon dies, and comes back on the same port with the same key.
    fs::remove_file(module.join("big")).expect("rm");
    let port = d.port;
    let mut c = slow_push(t.path(), &d, &src, &module, "tcp");
    let mut d = d;
    kill9(&mut d.child);
    kill9(&mut c);
    assert!(!module.join("big").exists(), "no partial file at the final name");
    let d2 = daemon_on(t.path(), &module, false, port);
    assert_eq!(d2.fingerprint, d.fingerprint, "the identity persists");
    let out = ok(d2
        .auth(client(t.path()).args(["copy", "--json", "--chunk-size", "1M"]))
        .arg(&src)
        .arg(d2.url("big")));
    let j = json(&out);
    assert!(j["bytes_resumed"].as_u64().unwrap_or(0) >= 4 << 20, "{out}");
    assert_eq!(b3(&src), b3(&module.join("big")));
    assert!(side_files(&module).is_empty());
}

/// The key fingerprint of the daemon whose state is in `dir/state`
/// (created now, used by the daemon later).
#[test]
fn remote_to_remote_goes_daemon_to_daemon_when_both_allow_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path();
    let (src, dst, other) = (root.join("src"), root.join("dst"), root.join("other"));
    make_tree(&src);
    fs::create_dir(&dst).expect("mkdir");
    fs::create_dir(&other).expect("mkdir");
    let client_fp = ok(client(root).arg("fingerprint")).trim().to_string();
    let (b_fp, c_fp) = (server_fingerprint(&root.join("b")), server_fingerprint(&root.join("c")));
    // A exports the source to the client and to daemon B (not to C).
    let a = daemon_with(
        &root.join("a"),
        &src,
        true,
        0,
        &["--allow-key".into(), client_fp, "--allow-key".into(), b_fp.clone()],
    );
    let allow_a = vec![
        "--pull-from".to_string(),
        format!("127.0.0.1:{}={}", a.port, a.fingerprint),
    ];
    // B may pull from A; C may too, but A does not know C's key; D may not
    // pull at all.
    let b = daemon_with(&root.join("b"), &dst, false, 0, &allow_a);
    let c = daemon_with(&root.join("c"), &other, false, 0, &allow_a);
    let d = daemon_with(&root.join("d"), &other, false, 0, &[]);
    // The client knows every daemon's key and writes with each one's token.
    let hosts: String = [&a, &b, &c, &d]
        .iter()
        .map(|x| format!("127.0.0.1:{} {}\n", x.port, x.fingerprint))
        .collect();
    write(&root.join("client/known_hosts"), hosts.as_bytes());
    let to = |x: &Daemon, args: &[&str]| {
        let mut cmd = client(root);
        cmd.args(args).arg("--token-file").arg(&x.token);
        cmd
    };

    for tr in ["tcp", "quic"] {
        let run = format!("run-{tr}");
        let out = ok(to(&b, &["copy", "--json", "--chunk-size", "256K", "--transport", tr])
            .arg(a.url(""))
            .arg(b.url(&run)));
        let j = json(&out);
        assert_eq!(j["direct"], true, "{out}");
        assert_eq!(j["transport"], tr);
        assert_eq!(j["errors"], 0);
        same_tree(&src, &dst.join(&run));
        assert!(side_files(&dst).is_empty());
        // The data came from A to B on B's own session: A logged B's key.
        let log = fs::read_to_string(root.join("a/log")).expect("log");
        assert!(
            log.lines().any(|l| l.contains("session opened") && l.contains(&b_fp)),
            "A never saw B:\n{log}"
        );

        // check and sync run there too.
        ok(to(&b, &["check", "--transport", tr]).arg(a.url("")).arg(b.url(&run)));
        write(&dst.join(format!("{run}/small/f3")), b"changed");
        write(&dst.join(format!("{run}/extra")), b"x");
        let o = go(to(&b, &["check", "--transport", tr]).arg(a.url("")).arg(b.url(&run)));
        let (code, stdout, stderr) = outcome(&o);
        assert_eq!(code, 4, "{stderr}");
        assert!(stdout.contains("small/f3") && stdout.contains("extra"), "{stdout}");
        let out = ok(to(&b, &["sync", "--json", "--delete", "--transport", tr])
            .arg(a.url(""))
            .arg(b.url(&run)));
        assert_eq!(json(&out)["direct"], true);
        same_tree(&src, &dst.join(&run));
        // A large file changed on B: B rebuilds it from its old version and
        // what A sends of the difference.
        let mut changed = fs::read(src.join("big.bin")).expect("read");
        changed[1000..1100].fill(0);
        write(&dst.join(format!("{run}/big.bin")), &changed);
        let out = ok(to(&b, &["sync", "--json", "--chunk-size", "256K", "--transport", tr])
            .arg(a.url(""))
            .arg(b.url(&run)));
        let j = json(&out);
        assert!(j["bytes_matched"].as_u64().is_some_and(|n| n > 4 << 20), "{out}");
        same_tree(&src, &dst.join(&run));
    }

    // Where either side does not allow it, the data goes through the
    // client, which says so, and the copy still completes.
    let c_refused =
        format!("refused this daemon: the key of the daemon presenting the ticket ({c_fp}) is not authorized");
    for (x, why) in [(&c, c_refused.as_str()), (&d, "pull_from does not list it")] {
        let run = format!("relay-{}", x.port);
        let o = go(to(x, &["copy", "--json"]).arg(a.url("")).arg(x.url(&run)));
        let (code, stdout, stderr) = outcome(&o);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stderr.contains("the data goes through this machine") && stderr.contains(why),
            "{stderr}"
        );
        assert_eq!(json(&stdout)["direct"], false);
        same_tree(&src, &other.join(&run));
    }

    // Issue 20: transfer rules are applied by the client, so the data goes
    // through it, and it says so.
    write(&dst.join("rules/small/f3"), b"kept");
    let o = go(to(&b, &["copy", "--json", "--ignore-existing"])
        .arg(a.url(""))
        .arg(b.url("rules")));
    let (code, stdout, stderr) = outcome(&o);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("the data goes through this machine"), "{stderr}");
    let j = json(&stdout);
    assert_eq!(
        (j["direct"].as_bool(), j["skipped"].as_u64()),
        (Some(false), Some(1)),
        "{stdout}"
    );
    assert_eq!(fs::read(dst.join("rules/small/f3")).expect("read"), b"kept");
    assert_eq!(
        fs::read(dst.join("rules/big.bin")).expect("read"),
        fs::read(src.join("big.bin")).expect("read")
    );
}

/// A file large enough to be written with O_DIRECT, with a hole and a tail
/// that is not a whole block, through one stream so the receiver reuses its
/// chunk buffer (a chunk with a hole after one full of data).
#[test]
fn a_large_file_with_a_hole_and_an_odd_tail_arrives_intact_both_ways() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    fs::create_dir_all(&src).expect("mkdir");
    fs::create_dir(&module).expect("mkdir");
    let f = src.join("big.img");
    let size = (40 << 20) + 4321;
    {
        use std::os::unix::fs::FileExt;
        let file = fs::File::create(&f).expect("create");
        file.set_len(size as u64).expect("set_len");
        file.write_all_at(&data(8 << 20, 3), 0).expect("write");
        file.write_all_at(&data(size - (16 << 20), 4), 16 << 20).expect("write");
    }
    // Locally, with a read-back check.
    let local = t.path().join("local.img");
    ok(tern()
        .args(["copy", "--verify", "-j", "1", "--chunk-size", "4M"])
        .arg(&f)
        .arg(&local));
    assert_eq!(b3(&local), b3(&f));
    let d = daemon(t.path(), &module, false);
    for tr in ["tcp", "quic"] {
        let name = format!("big-{tr}.img");
        ok(
            d.auth(client(t.path()).args(["copy", "-j", "1", "--chunk-size", "4M", "--transport", tr]))
                .arg(&f)
                .arg(d.url(&name)),
        );
        assert_eq!(b3(&module.join(&name)), b3(&f), "push over {tr}");
        let back = t.path().join(format!("back-{tr}.img"));
        ok(
            d.auth(client(t.path()).args(["copy", "-j", "1", "--chunk-size", "4M", "--transport", tr]))
                .arg(d.url(&name))
                .arg(&back),
        );
        assert_eq!(b3(&back), b3(&f), "pull over {tr}");
    }
    assert!(side_files(&module).is_empty());
}

#[test]
fn bench_measures_the_disk_hashing_and_both_transports_and_leaves_nothing_behind() {
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    let disk = t.path().join("disk");
    fs::create_dir_all(&module).expect("mkdir");
    fs::create_dir_all(&disk).expect("mkdir");
    // A read-only grant is enough: nothing is stored.
    let d = daemon(&t.path().join("d"), &module, true);
    let mut c = client(t.path());
    d.auth(c.arg("bench"))
        .args([&d.url(""), "--json", "--disk-size", "4M", "--net-size", "3M", "-j", "3"]);
    let v = json(&ok(c.arg("--dir").arg(&disk)));
    assert_eq!(v["disk"]["bytes"], 4 << 20);
    assert!(v["disk"]["write_mib_s"].as_f64() > Some(0.0), "{v}");
    assert!(v["disk"]["read_mib_s"].as_f64() > Some(0.0), "{v}");
    assert!(v["hash"]["one_core_mib_s"].as_f64() > Some(0.0), "{v}");
    let remote = &v["remote"];
    // Loopback is a LAN-like path, unless this machine was too busy to
    // answer a TCP connect within 2 ms twice: then the rule for long paths
    // applies, a pull going over TCP only if the daemon's TCP has BBR,
    // which is this machine's too.
    let bbr = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .is_ok_and(|s| s.split_whitespace().any(|c| c == "bbr"));
    if remote["probe_connect_ms"].as_f64() < Some(2.0) {
        assert_eq!(remote["push_picks"], "tcp", "{v}");
        assert_eq!(remote["pull_picks"], "tcp", "{v}");
    } else {
        assert_eq!(remote["pull_picks"], if bbr { "tcp" } else { "quic" }, "{v}");
    }
    let transports = remote["transports"].as_array().cloned().unwrap_or_default();
    let names: Vec<_> = transports
        .iter()
        .map(|t| t["transport"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["tcp", "quic"]);
    for tr in &transports {
        assert!(
            tr["upload_mbit_s"].as_f64() > Some(0.0) && tr["download_mbit_s"].as_f64() > Some(0.0),
            "{tr}"
        );
        assert_eq!(tr["streams"], 3);
        // The data really crossed the wire, both ways.
        let path = &tr["path"];
        assert!(path["wire_bytes_sent"].as_u64() >= Some(3 << 20), "{tr}");
        assert!(path["wire_bytes_received"].as_u64() >= Some(3 << 20), "{tr}");
        assert!(path["rtt_ms"].as_f64().is_some(), "{tr}");
    }
    assert!(tree(&disk).is_empty(), "bench left files: {:?}", tree(&disk));
    assert!(tree(&module).is_empty(), "bench wrote into the module");

    // The human report says what a copy would do.
    let mut c = client(t.path());
    d.auth(c.arg("bench"))
        .args([&d.url(""), "--disk-size", "1M", "--net-size", "1M"]);
    let out = ok(c.arg("--dir").arg(&disk));
    assert!(out.contains("a push would use ") && out.contains(", a pull "), "{out}");
    assert!(out.contains("quic"), "{out}");

    // Bad input is refused with what was wrong.
    let mut c = client(t.path());
    fails(c.args(["bench", "--net-size", "2G"]), 2, "--net-size");
    let mut c = client(t.path());
    fails(c.args(["bench", "some/dir"]), 2, "not a daemon location");
    let mut c = client(t.path());
    fails(
        c.args(["bench", "--disk-size", "1M", "--dir"])
            .arg(t.path().join("nope")),
        1,
        "--dir",
    );
}

/// A TCP proxy to `port` that flips one bit in the byte stream of each of
/// its first `damaged` connections, `after` bytes in: client to server when
/// `upstream`, else server to client. Returns its port and how many bits it
/// has flipped.
fn flipping_proxy(
    port: u16,
    after: u64,
    damaged: usize,
    upstream: bool,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let proxy_port = l.local_addr().expect("addr").port();
    let flips = Arc::new(AtomicUsize::new(0));
    let f = flips.clone();
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().enumerate() {
            let Ok(down) = conn else { return };
            let Ok(up) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let pipe = move |mut from: TcpStream, mut to: TcpStream, flip: Option<Arc<AtomicUsize>>| {
                let mut buf = vec![0u8; 64 << 10];
                let mut seen = 0u64;
                loop {
                    let k = match from.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => k,
                    };
                    if let Some(c) = &flip {
                        if seen <= after && after < seen + k as u64 {
                            buf[(after - seen) as usize] ^= 0x10;
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    seen += k as u64;
                    if to.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            };
            let bad = (n < damaged).then(|| f.clone());
            let (d2, u2) = (down.try_clone().expect("clone"), up.try_clone().expect("clone"));
            let (a, b) = if upstream { (bad, None) } else { (None, bad) };
            std::thread::spawn(move || pipe(down, up, a));
            std::thread::spawn(move || pipe(u2, d2, b));
        }
    });
    (proxy_port, flips)
}

#[test]
fn bits_flipped_in_transit_are_caught_and_the_copy_still_lands_intact() {
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    let local = t.path().join("local");
    write(&module.join("down.bin"), &data(6 << 20, 31));
    write(&local.join("up.bin"), &data(6 << 20, 32));
    let d = daemon(&t.path().join("d"), &module, false);
    for push in [true, false] {
        // The first eight TCP connections (all the first attempt opens: the
        // login's and those opened ahead for the workers) each get one bit
        // flipped, 100 kB in, if they carry that much.
        let (port, flips) = flipping_proxy(d.port, 100_000, 8, push);
        let (src, dst) = if push {
            (
                local.join("up.bin").display().to_string(),
                format!("tern://127.0.0.1:{port}/data/pushed/"),
            )
        } else {
            (
                format!("tern://127.0.0.1:{port}/data/down.bin"),
                local.join("pulled").display().to_string() + "/",
            )
        };
        let mut c = client(t.path());
        d.auth(c.args([
            "copy",
            "--json",
            "--transport",
            "tcp",
            "--retries",
            "5",
            "--chunk-size",
            "256K",
        ]));
        let out = ok(c.args([&src, &dst]));
        assert!(
            flips.load(std::sync::atomic::Ordering::SeqCst) >= 1,
            "the proxy damaged nothing"
        );
        let s = json(&out);
        assert_eq!(s["errors"], 0, "{out}");
        // TLS refused the damaged records: nothing damaged was written.
        let (a, b) = if push {
            (local.join("up.bin"), module.join("pushed/up.bin"))
        } else {
            (module.join("down.bin"), local.join("pulled/down.bin"))
        };
        assert_eq!(b3(&a), b3(&b), "push={push}");
    }
    assert!(side_files(&module).is_empty() && side_files(&local).is_empty());
}

/// Issue 13 (low): `--quota` caps what clients keep in a module, what was
/// there before the daemon started included; a file that would go over is
/// refused with the module and the figures, nothing of it is left, and the
/// space a deletion frees can be used again.
#[test]
fn a_module_quota_refuses_what_would_go_over_it() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    write(&module.join("before.bin"), &data(40 << 10, 1));
    write(&src.join("big.bin"), &data(30 << 10, 2));
    write(&src.join("fits.bin"), &data(20 << 10, 3));
    let d = daemon_with(t.path(), &module, false, 0, &["--quota".into(), "64K".into()]);
    // The daemon counts the module in the background, then logs it.
    wait_until("the module counted", Duration::from_secs(20), || {
        fs::read_to_string(t.path().join("log")).is_ok_and(|l| l.contains("counted the module's bytes"))
    });
    fails(
        d.auth(client(t.path()).args(["copy"]))
            .arg(src.join("big.bin"))
            .arg(d.url("")),
        3,
        "over the quota of `data`: this file needs 30.0 KiB, and 40.0 KiB of its 64.0 KiB are in use",
    );
    assert!(!module.join("big.bin").exists());
    assert!(side_files(&module).is_empty(), "{:?}", side_files(&module));
    ok(d.auth(client(t.path()).args(["copy"]))
        .arg(src.join("fits.bin"))
        .arg(d.url("")));
    assert_eq!(b3(&module.join("fits.bin")), b3(&src.join("fits.bin")));
    // Deleting on the daemon's side (sync --delete) frees what it held.
    fs::remove_file(src.join("big.bin")).expect("rm");
    ok(d.auth(client(t.path()).args(["sync", "--delete"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("")));
    write(&src.join("big.bin"), &data(30 << 10, 2));
    assert!(!module.join("before.bin").exists());
    ok(d.auth(client(t.path()).args(["copy"]))
        .arg(src.join("big.bin"))
        .arg(d.url("")));
    assert_eq!(b3(&module.join("big.bin")), b3(&src.join("big.bin")));
}

/// Issue 15: a changed file pushed to a daemon crosses as its difference
/// from the daemon's old version, over both transports, and lands equal to
/// the source; `-W` sends it whole.
#[test]
fn a_changed_file_is_pushed_and_pulled_as_a_delta_unless_whole_file_is_asked() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    let old = data(20 << 20, 5);
    let mut new = data(256 << 10, 6);
    new.extend_from_slice(&old);
    new[(12 << 20)..(12 << 20) + 3000].fill(7);
    write(&src.join("f.bin"), &new);
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    for tr in ["tcp", "quic"] {
        write(&module.join(format!("{tr}.bin")), &old);
        fs::copy(src.join("f.bin"), src.join(format!("{tr}.bin"))).expect("copy");
        let out = ok(d
            .auth(client(t.path()).args(["copy", "--json", "--transport", tr]))
            .arg(src.join(format!("{tr}.bin")))
            .arg(d.url("")));
        let j = json(&out);
        assert_eq!(j["errors"], 0);
        assert_eq!(b3(&module.join(format!("{tr}.bin"))), b3(&src.join("f.bin")), "{tr}");
        let (sent, matched) = (j["bytes_written"].as_u64(), j["bytes_matched"].as_u64());
        assert!(sent.is_some_and(|n| n < 1 << 20), "{tr}: {out}");
        assert_eq!(sent.zip(matched).map(|(a, b)| a + b), Some(new.len() as u64));
        assert!(side_files(&module).is_empty());
    }
    // Pulled back onto a local old version: only the difference crosses.
    for tr in ["tcp", "quic"] {
        let back = t.path().join(format!("back-{tr}.bin"));
        write(&back, &old);
        let out = ok(d
            .auth(client(t.path()).args(["copy", "--json", "--transport", tr]))
            .arg(d.url(&format!("{tr}.bin")))
            .arg(&back));
        let j = json(&out);
        assert_eq!(b3(&back), b3(&src.join("f.bin")), "pull over {tr}");
        assert!(j["bytes_written"].as_u64().is_some_and(|n| n < 1 << 20), "{tr}: {out}");
        assert!(j["bytes_matched"].as_u64().is_some_and(|n| n > 19 << 20), "{tr}: {out}");
    }
    write(&module.join("w.bin"), &old);
    fs::copy(src.join("f.bin"), src.join("w.bin")).expect("copy");
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "-W"]))
        .arg(src.join("w.bin"))
        .arg(d.url("")));
    let j = json(&out);
    assert_eq!(
        (j["bytes_matched"].as_u64(), j["bytes_written"].as_u64()),
        (Some(0), Some(new.len() as u64))
    );
    assert_eq!(b3(&module.join("w.bin")), b3(&src.join("f.bin")));
}

/// Issue 15: `--compress always` sends compressible data in zstd
/// containers both ways and it lands intact; `never` sends none; and what
/// does not compress goes as it is, whatever is asked.
#[test]
fn compressible_data_crosses_compressed_when_asked_and_plainly_when_not() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    // Text-like files, small and large, and one of noise.
    let text: Vec<u8> = (0..(3 << 20))
        .map(|i: u32| b"fn main() { let x = 42; }\n"[(i % 26) as usize] ^ ((i / 4096 % 3) as u8))
        .collect();
    for k in 0..20 {
        write(&src.join(format!("small/{k}.rs")), &text[k * 1000..k * 1000 + 3000]);
    }
    write(&src.join("big.log"), &text);
    write(&src.join("noise.bin"), &data(2 << 20, 3));
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let digest = |root: &Path| -> Vec<(std::path::PathBuf, String)> {
        tree(root)
            .into_iter()
            .map(|p| {
                let h = if root.join(&p).is_file() {
                    b3(&root.join(&p))
                } else {
                    String::new()
                };
                (p, h)
            })
            .collect()
    };
    let squeezed = |j: &serde_json::Value| -> (u64, u64) {
        let paths = j["paths"].as_array().cloned().unwrap_or_default();
        let sum = |k: &str| paths.iter().filter_map(|p| p[k].as_u64()).sum();
        (sum("bytes_compressed"), sum("bytes_compressed_wire"))
    };
    for (mode, tr) in [("always", "tcp"), ("always", "quic"), ("never", "tcp")] {
        let dst = format!("{mode}-{tr}");
        let out = ok(d
            .auth(client(t.path()).args(["copy", "--json", "--compress", mode, "--transport", tr]))
            .arg(format!("{}/", src.display()))
            .arg(d.url(&dst)));
        let j = json(&out);
        assert_eq!(j["errors"], 0, "{out}");
        assert_eq!(digest(&module.join(&dst)), digest(&src), "push, {mode} over {tr}");
        let (raw, wire) = squeezed(&j);
        match mode {
            "never" => assert_eq!(raw, 0, "{out}"),
            _ => {
                // The text crossed compressed, well under half its size;
                // the noise did not count.
                assert!((3 << 20..5 << 20).contains(&raw), "{raw} compressed: {out}");
                assert!(wire * 4 < raw, "{raw} compressed to {wire}");
            }
        }
        // And back: the daemon compresses what it sends.
        let back = t.path().join(format!("back-{dst}"));
        let out = ok(d
            .auth(client(t.path()).args(["copy", "--json", "--compress", mode, "--transport", tr]))
            .arg(d.url(&format!("{dst}/")))
            .arg(&back));
        assert_eq!(digest(&back), digest(&src), "pull, {mode} over {tr}");
        let (raw, _) = squeezed(&json(&out));
        assert_eq!(raw == 0, mode == "never", "pull, {mode}: {raw} compressed");
    }
    // A daemon that never compresses: nothing crosses compressed, whatever
    // the client asks.
    let d = daemon_with(t.path(), &module, false, 0, &["--no-compress".to_string()]);
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "--compress", "always"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("refused")));
    assert_eq!(squeezed(&json(&out)), (0, 0), "{out}");
    assert_eq!(digest(&module.join("refused")), digest(&src));
}

/// Issue 15: ten copies of a file pushed to a daemon, or pulled from one,
/// cross once; the others are built at the destination from the first, and
/// each lands with the source's BLAKE3. `-W` sends them all.
#[test]
fn copies_of_a_file_cross_once() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    let one = data(12 << 20, 8);
    for k in 0..10 {
        write(&src.join(format!("d{}/copy{k}.img", k % 3)), &one);
    }
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let size = one.len() as u64;
    let landed_as_sent = |root: &Path| {
        for k in 0..10 {
            let rel = format!("d{}/copy{k}.img", k % 3);
            assert_eq!(
                b3(&root.join(&rel)),
                b3(&src.join(&rel)),
                "{}",
                root.join(&rel).display()
            );
        }
        assert!(side_files(root).is_empty());
    };
    for (flags, dst, written, dedup) in [(vec![], "once", size, 9 * size), (vec!["-W"], "whole", 10 * size, 0)] {
        let out = ok(d
            .auth(client(t.path()).args(["copy", "--json"]).args(&flags))
            .arg(format!("{}/", src.display()))
            .arg(d.url(dst)));
        let j = json(&out);
        assert_eq!(j["errors"], 0, "{out}");
        assert_eq!(
            (j["bytes_written"].as_u64(), j["bytes_deduplicated"].as_u64()),
            (Some(written), Some(dedup)),
            "{flags:?}: {out}"
        );
        landed_as_sent(&module.join(dst));
    }
    // Pulled into an empty directory: the daemon says each file's hash, and
    // only the first crosses.
    let back = t.path().join("back");
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json"]))
        .arg(d.url("once/"))
        .arg(&back));
    let j = json(&out);
    assert_eq!(
        (j["bytes_written"].as_u64(), j["bytes_deduplicated"].as_u64()),
        (Some(size), Some(9 * size)),
        "pull: {out}"
    );
    landed_as_sent(&back);
}

/// Issue 15: a large file renamed at the source crosses as what changed
/// against its old name, which only the destination has, in a push and a
/// pull; `sync --delete` removes the old name once the new one landed.
#[test]
fn a_renamed_file_crosses_as_its_changes_against_its_old_name() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    let big = data(12 << 20, 31);
    let mut edited = big.clone();
    edited[5 << 20..(5 << 20) + 4096].fill(9);
    write(&src.join("d/big.new"), &edited);
    write(&module.join("tree/d/big.old"), &big);
    let d = daemon(t.path(), &module, false);
    let size = big.len() as u64;
    let out = ok(d
        .auth(client(t.path()).args(["sync", "--delete", "--json"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("tree/")));
    let j = json(&out);
    assert_eq!(j["errors"], 0, "{out}");
    let (written, found) = (j["bytes_written"].as_u64(), j["bytes_deduplicated"].as_u64());
    assert!(written.is_some_and(|w| w < 256 << 10), "push: {out}");
    assert!(found.is_some_and(|f| f > size - (256 << 10)), "push: {out}");
    assert_eq!(b3(&module.join("tree/d/big.new")), b3(&src.join("d/big.new")));
    assert!(!module.join("tree/d/big.old").exists(), "the old name was kept");

    // Pulled back into a tree that has it under yet another name.
    let back = t.path().join("back");
    write(&back.join("d/big.older"), &big);
    let out = ok(d
        .auth(client(t.path()).args(["sync", "--delete", "--json"]))
        .arg(d.url("tree/"))
        .arg(format!("{}/", back.display())));
    let j = json(&out);
    let (written, found) = (j["bytes_written"].as_u64(), j["bytes_deduplicated"].as_u64());
    assert!(written.is_some_and(|w| w < 256 << 10), "pull: {out}");
    assert!(found.is_some_and(|f| f > size - (256 << 10)), "pull: {out}");
    assert_eq!(b3(&back.join("d/big.new")), b3(&src.join("d/big.new")));
    assert!(!back.join("d/big.older").exists(), "the old name was kept");
    assert!(side_files(&back).is_empty() && side_files(&module).is_empty());
}

/// Issue 15: copies of small files pushed to a daemon, or pulled from one,
/// cross once: the daemon builds a copy from the first that landed, and a
/// pull asks the daemon for the hashes of files that share a size before
/// reading them.
#[test]
fn copies_of_small_files_cross_once() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    let files: Vec<Vec<u8>> = (0..30).map(|k| data(3000 + 111 * k, k as u64)).collect();
    let unique: u64 = files.iter().map(|f| f.len() as u64).sum();
    for c in 0..6 {
        for (k, f) in files.iter().enumerate() {
            write(&src.join(format!("c{c}/f{k}")), f);
        }
    }
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let landed_as_sent = |root: &Path| {
        for c in 0..6 {
            for k in 0..files.len() {
                let rel = format!("c{c}/f{k}");
                assert_eq!(
                    b3(&root.join(&rel)),
                    b3(&src.join(&rel)),
                    "{}",
                    root.join(&rel).display()
                );
            }
        }
        assert!(side_files(root).is_empty());
    };
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("tree")));
    let j = json(&out);
    assert_eq!(j["errors"], 0, "{out}");
    let counted = |j: &serde_json::Value| (j["bytes_written"].as_u64(), j["bytes_deduplicated"].as_u64());
    assert_eq!(counted(&j), (Some(unique), Some(5 * unique)), "push: {out}");
    let wire = |j: &serde_json::Value, k: &str| j["paths"][0][k].as_u64().unwrap_or(u64::MAX);
    assert!(wire(&j, "wire_bytes_sent") < 2 * unique, "push: {out}");
    landed_as_sent(&module.join("tree"));

    let back = t.path().join("back");
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json"]))
        .arg(d.url("tree/"))
        .arg(&back));
    let j = json(&out);
    assert_eq!(counted(&j), (Some(unique), Some(5 * unique)), "pull: {out}");
    assert!(wire(&j, "wire_bytes_received") < 2 * unique, "pull: {out}");
    landed_as_sent(&back);
}

/// Issue 15: a delta interrupted by `kill -9` leaves the old version in
/// place; the rerun keeps the chunks already built and builds the rest
/// from the old version again, to the source's BLAKE3.
#[test]
fn an_interrupted_delta_resumes_as_a_delta() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("big"), t.path().join("module"));
    fs::create_dir(&module).expect("mkdir");
    let old = data(48 << 20, 21);
    write(&module.join("big"), &old);
    // Every other MiB rewritten: 24 MiB of literals.
    let mut new = old.clone();
    for k in (0..48).step_by(2) {
        new[k << 20..(k + 1) << 20].copy_from_slice(&data(1 << 20, 100 + k as u64));
    }
    write(&src, &new);
    let d = daemon(t.path(), &module, false);
    // The literals at 4 MB/s: killed well before the end.
    let mut c = d
        .auth(client(t.path()).args([
            "copy",
            "-q",
            "--chunk-size",
            "1M",
            "--bwlimit",
            "4M",
            "--transport",
            "tcp",
        ]))
        .arg(&src)
        .arg(d.url("big"))
        .spawn()
        .expect("spawn");
    wait_until("journaled chunks", Duration::from_secs(60), || {
        journal_records(&module.join(".big.tern.journal")) >= 4
    });
    kill9(&mut c);
    assert_eq!(
        b3(&module.join("big")),
        blake3::hash(&old).to_hex().to_string(),
        "the old version was touched"
    );
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "--chunk-size", "1M", "--transport", "tcp"]))
        .arg(&src)
        .arg(d.url("big")));
    let j = json(&out);
    let get = |k: &str| j[k].as_u64().unwrap_or(0);
    let resumed = get("bytes_resumed");
    assert!(resumed >= 4 << 20, "{out}");
    // Of the chunks not kept, about half (the unchanged ones) are built
    // from the old version.
    let rest = (48 << 20) - resumed;
    assert!(
        get("bytes_matched") + (2 << 20) >= rest / 2,
        "the rest not built from the old version: {out}"
    );
    // Nothing sent whole: at most the literals cross.
    assert!(get("bytes_written") <= 24 << 20, "{out}");
    assert_eq!(
        get("bytes_written") + get("bytes_matched") + get("bytes_resumed"),
        48 << 20,
        "{out}"
    );
    assert_eq!(b3(&module.join("big")), b3(&src));
    assert!(side_files(&module).is_empty());
}

/// Issue 15: files under a chunk go to a daemon as their difference, and
/// the ones for which a difference does not pay (rewritten through) go
/// whole on the same path, each to the source's BLAKE3, both ways.
#[test]
fn files_under_a_chunk_are_sent_as_a_delta_or_whole() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module, other) = (t.path().join("src"), t.path().join("module"), t.path().join("other"));
    fs::create_dir(&module).expect("mkdir");
    fs::create_dir(&other).expect("mkdir");
    let client_fp = ok(client(t.path()).arg("fingerprint")).trim().to_string();
    let d = daemon_with(t.path(), &module, false, 0, &["--allow-key".into(), client_fp]);
    let e = daemon(&t.path().join("e"), &other, false);
    write(
        &t.path().join("client/known_hosts"),
        format!(
            "127.0.0.1:{} {}\n127.0.0.1:{} {}\n",
            d.port, d.fingerprint, e.port, e.fingerprint
        )
        .as_bytes(),
    );
    // Files of a batch: 1 MiB and 20 KiB edited, 1 MiB rewritten, 8 KiB
    // edited (too small for a delta).
    let names = ["edited.bin", "small.bin", "rewritten.bin", "tiny.bin"];
    let olds = [
        data(1 << 20, 31),
        data(20 << 10, 33),
        data(1 << 20, 31),
        data(8 << 10, 34),
    ];
    let mut news = olds.clone();
    news[0][300_000..300_100].fill(9);
    news[1][10_000..10_010].fill(9);
    news[2] = data(1 << 20, 32);
    news[3][100] ^= 1;
    for (name, new) in names.iter().zip(&news) {
        write(&src.join(name), new);
    }
    let olden = |dir: &Path| {
        for (name, old) in names.iter().zip(&olds) {
            write(&dir.join(name), old);
            let f = fs::File::options().write(true).open(dir.join(name)).expect("open");
            f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1000))
                .expect("mtime");
        }
    };
    let total: u64 = news.iter().map(|n| n.len() as u64).sum();
    // The edits cost a few chunks each; the rewritten and tiny files
    // crossed whole.
    let whole = (1 << 20) + (8 << 10);
    let check = |out: &str, dir: &Path, what: &str| {
        let j = json(out);
        assert_eq!(
            (j["errors"].as_u64(), j["copied"].as_u64()),
            (Some(0), Some(4)),
            "{what}: {out}"
        );
        for name in names {
            assert_eq!(b3(&dir.join(name)), b3(&src.join(name)), "{what}: {name}");
        }
        let (written, matched) = (j["bytes_written"].as_u64().unwrap_or(0), j["bytes_matched"].as_u64());
        assert!((whole..whole + (64 << 10)).contains(&written), "{what}: {out}");
        assert_eq!(matched, Some(total - written), "{what}: {out}");
    };
    olden(&module);
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("")));
    check(&out, &module, "push");
    // And back onto old versions here.
    let back = t.path().join("back");
    olden(&back);
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json"]))
        .arg(d.url(""))
        .arg(&back));
    check(&out, &back, "pull");
    // From one daemon to another, through the client.
    olden(&other);
    let out = ok(client(t.path())
        .args(["copy", "--json", "--token-file"])
        .arg(&e.token)
        .arg(d.url(""))
        .arg(e.url("")));
    check(&out, &other, "remote to remote");
}
