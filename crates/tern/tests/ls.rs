//! Issue 20: `tern ls` lists local and daemon paths alike, one entry a
//! line, names escaped as rsync does.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::server::*;
use common::*;

fn tree_for_listing(root: &Path) {
    write(&root.join("b.txt"), b"hello");
    write(&root.join("a/inner.bin"), &[7u8; 1234]);
    write(&root.join(OsStr::from_bytes(b"new\nline")), b"x");
    std::os::unix::fs::symlink("b.txt", root.join("link")).expect("symlink");
    fs::set_permissions(root.join("b.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
}

#[test]
fn ls_lists_a_local_tree_short_long_and_recursive() {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path().join("root");
    tree_for_listing(&root);
    let short = expect(0, &[&"ls", &root]);
    assert_eq!(
        short.lines().collect::<Vec<_>>(),
        ["a/", "b.txt", "link", "new\\#012line"]
    );
    let deep = expect(0, &[&"ls", &"-R", &root]);
    assert_eq!(
        deep.lines().collect::<Vec<_>>(),
        ["a/", "a/inner.bin", "b.txt", "link", "new\\#012line"]
    );
    let long = expect(0, &[&"ls", &"-l", &root]);
    let b = long.lines().find(|l| l.ends_with(" b.txt")).expect("b.txt listed");
    assert!(b.starts_with("-rw-r----- "), "{b}");
    let fields: Vec<&str> = b.split_whitespace().collect();
    assert_eq!(fields[1], "5", "{b}");
    assert_eq!(fields[2].len(), 10, "date: {b}");
    let link = long.lines().find(|l| l.contains("link")).expect("link listed");
    assert!(link.starts_with('l') && link.ends_with("link -> b.txt"), "{link}");
    // A file is listed as itself.
    let one = expect(0, &[&"ls", &root.join("b.txt")]);
    assert_eq!(one.trim(), "b.txt");
    // A path that is not there: exit 1, named.
    let (code, _, err) = outcome(&run(&[&"ls", &root.join("nope")]));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn ls_lists_a_daemon_path_as_it_lists_the_same_tree_here() {
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    tree_for_listing(&module.join("sub"));
    let d = daemon(t.path(), &module, true);
    for flags in [vec!["-R"], vec!["-l", "-R"]] {
        let there = ok(d.auth(client(t.path()).arg("ls").args(&flags)).arg(d.url("sub")));
        let mut here = tern();
        here.arg("ls").args(&flags).arg(module.join("sub"));
        let here = String::from_utf8(here.output().expect("run").stdout).expect("utf-8");
        assert_eq!(there, here, "{flags:?}");
        assert!(there.lines().count() == 5, "{there}");
    }
}

#[test]
fn ls_of_a_daemon_lists_the_modules_this_client_may_use() {
    let t = tempfile::tempdir().expect("tempdir");
    let module = t.path().join("module");
    fs::create_dir_all(&module).expect("mkdir");
    for m in ["pub", "hidden"] {
        fs::create_dir_all(t.path().join(m)).expect("mkdir");
    }
    let reader = t.path().join("reader.token");
    fs::write(&reader, "reader-token-0123456789abcdef\n").expect("token");
    let cfg = t.path().join("tern.toml");
    fs::write(
        &cfg,
        format!(
            "[modules.pub]\npath = {:?}\ncomment = \"public photos\"\n\
             [modules.hidden]\npath = {:?}\ncomment = \"not for readers\"\n\
             [[tokens]]\ntoken_file = {:?}\nmodules = [\"pub\"]\naccess = \"read\"\n",
            t.path().join("pub"),
            t.path().join("hidden"),
            reader
        ),
    )
    .expect("config");
    let d = daemon_with(
        t.path(),
        &module,
        false,
        0,
        &["--config".into(), cfg.display().to_string()],
    );
    let host = format!("tern://127.0.0.1:{}/", d.port);
    // The quick-start token opens the read-write module only.
    let out = ok(d.auth(client(t.path()).arg("ls")).arg(&host));
    assert_eq!(out.lines().collect::<Vec<_>>(), ["data  rw"], "{out}");
    // The reader's token: its module, read-only, with its comment; the
    // short form names the daemon too.
    let mut c = client(t.path());
    c.args(["ls", "--fingerprint", &d.fingerprint, "--token-file"])
        .arg(&reader)
        .arg(format!("127.0.0.1:{}:", d.port));
    let out = ok(&mut c);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["pub  ro  public photos"], "{out}");
    // A token that opens nothing: a clear failure, no module named.
    let wrong = t.path().join("wrong.token");
    fs::write(&wrong, "not-a-token-of-this-daemon-at-all\n").expect("token");
    let mut c = client(t.path());
    c.args(["ls", "--fingerprint", &d.fingerprint, "--token-file"])
        .arg(&wrong)
        .arg(&host);
    let o = go(&mut c);
    let (code, out, err) = outcome(&o);
    assert_eq!(code, 1, "{err}");
    assert!(
        out.is_empty() && !err.contains("hidden") && err.contains("no module"),
        "{out}{err}"
    );
    // A daemon whose key is not the pinned one is not asked at all.
    let mut c = client(t.path());
    c.args([
        "ls",
        "--fingerprint",
        "b3:0000000000000000000000000000000000000000000000000000000000000000",
    ])
    .arg(&host);
    let (code, out, err) = outcome(&go(&mut c));
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.is_empty(), "{out}");
}

#[test]
fn verbose_changes_escape_names_as_ls_does() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join(OsStr::from_bytes(b"new\nline")), b"x");
    write(&src.join(OsStr::from_bytes(b"bad-\xff")), b"y");
    let out = expect(0, &[&"copy", &"-v", &src.join(""), &t.path().join("dst")]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"new      new\\#012line"), "{out}");
    assert!(lines.contains(&"new      bad-\\#377"), "{out}");
    assert_eq!(lines.len(), 3, "one line a change:\n{out}");
}
