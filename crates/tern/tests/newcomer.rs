//! What a newcomer meets first: rsync's habits, and a mistyped port.

mod common;

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
