//! What a newcomer meets first: rsync's habits, and a mistyped port.

mod common;

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use common::server::*;
use common::*;

#[test]
fn rsync_letters_are_accepted() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    make_tree(&src);
    let dst = t.path().join("dst");
    // -a and -r are what tern always does; -P asks for progress, which is
    // drawn only on a terminal, so here it changes nothing visible.
    let out = expect(0, &[&"copy", &"-avP", &src, &dst]);
    assert!(out.contains("small/f3"), "-v lists the files:\n{out}");
    same_tree(&src, &dst.join("src"));
    expect(0, &[&"sync", &"-rP", &"--delete", &src, &dst.join("src")]);
    expect(0, &[&"copy", &"-a", &"--partial", &src, &dst]);
}

#[test]
fn a_port_where_nothing_listens_fails_at_once_with_a_hint() {
    let t = tempfile::tempdir().expect("tempdir");
    write(&t.path().join("f"), b"x");
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    for tr in ["auto", "tcp"] {
        let o = go(client(t.path())
            .args(["copy", "--transport", tr, "--accept-new-host"])
            .arg(t.path().join("f"))
            .arg(format!("tern://127.0.0.1:{port}/m/")));
        let (code, _, err) = outcome(&o);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("is `tern serve` running"), "no hint:\n{err}");
        assert!(!err.contains("retrying"), "a refused connection was retried:\n{err}");
    }
}

#[test]
fn sync_delete_onto_a_directory_of_another_name_asks_what_is_meant() {
    let t = tempfile::tempdir().expect("tempdir");
    let (photos, backup) = (t.path().join("photos"), t.path().join("backup"));
    write(&photos.join("a"), b"a");
    write(&backup.join("x"), b"x");
    write(&backup.join("y/z"), b"z");
    // rsync would make backup/photos; tern would make backup be photos and
    // delete x and y: refused, with the count and both ways to say it.
    let o = run(&[&"sync", &"--delete", &photos, &backup]);
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("would delete 2 entries"), "{err}");
    assert!(
        err.contains("backup/photos --delete") && err.contains("photos/ "),
        "{err}"
    );
    assert_eq!(fs_read(&backup.join("x")), b"x");
    // A dry run shows it; either explicit form does it.
    expect(0, &[&"sync", &"-n", &"--delete", &photos, &backup]);
    expect(0, &[&"sync", &"--delete", &photos, &backup.join("photos")]);
    assert_eq!(fs_read(&backup.join("photos/a")), b"a");
    let slash = format!("{}/", photos.display());
    expect(0, &[&"sync", &"--delete", &slash, &backup]);
    assert!(!backup.join("x").exists() && backup.join("a").exists());
    // Same name, or nothing to delete: no question.
    expect(0, &[&"sync", &"--delete", &photos, &backup]);
}

fn fs_read(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).expect("read")
}

#[test]
fn a_connection_lost_and_recovered_prints_a_retry_not_errors() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    write(&src.join("big.bin"), &data(8 * 1024 * 1024, 3));
    for i in 0..20 {
        write(&src.join(format!("small/f{i}")), &data(1000 + i, i as u64));
    }
    fs::create_dir_all(&module).expect("mkdir");
    let mut d = daemon(t.path(), &module, false);
    let port = d.port;
    let child = d
        .auth(client(t.path()).args(["copy", "--no-progress", "--chunk-size", "1M", "--bwlimit", "4M"]))
        .arg(src.join(""))
        .arg(d.url("x/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let journal = module.join("x/.big.bin.tern.journal");
    wait_until("journaled chunks", Duration::from_secs(60), || {
        journal_records(&journal) >= 2
    });
    // The daemon dies mid-transfer and comes back on the same port.
    d.child.kill().expect("kill");
    d.child.wait().expect("wait");
    let _back = daemon_on(t.path(), &module, false, port);
    let o = child.wait_with_output().expect("wait");
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("the connection dropped") && err.contains("retrying in"),
        "{err}"
    );
    assert!(!err.contains("error:"), "errors a retry undid are printed:\n{err}");
    assert!(err.contains("after 1 retry"), "the summary hides the retry:\n{err}");
    assert_eq!(b3(&module.join("x/big.bin")), b3(&src.join("big.bin")));
}
