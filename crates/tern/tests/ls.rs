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
