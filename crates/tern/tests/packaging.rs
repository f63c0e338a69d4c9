//! Issue 20: shell completions and man pages come from the same command
//! definition as `--help`, so they name every command and flag.

mod common;

use std::fs;
use std::process::Command;

use common::*;

#[test]
fn completions_name_the_commands_and_flags_and_parse_in_their_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = expect(0, &[&"completions", &shell]);
        for word in ["copy", "sync", "ls", "files-from", "itemize-changes"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    // bash itself takes the bash script.
    let t = tempfile::tempdir().expect("tempdir");
    let path = t.path().join("tern.bash");
    fs::write(&path, expect(0, &[&"completions", &"bash"])).expect("write");
    let o = Command::new("bash").arg("-n").arg(&path).output().expect("bash");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, _, err) = outcome(&run(&[&"completions", &"tcsh"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn man_pages_are_written_for_tern_and_each_command() {
    let page = expect(0, &[&"man"]);
    assert!(page.contains(".TH tern 1"), "{}", &page[..page.len().min(300)]);
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("man1");
    expect(0, &[&"man", &dir]);
    for name in ["tern", "tern-copy", "tern-sync", "tern-check", "tern-serve", "tern-ls"] {
        let p = fs::read_to_string(dir.join(format!("{name}.1"))).unwrap_or_else(|e| panic!("{name}.1: {e}"));
        assert!(p.contains(&format!(".TH {name} 1")), "{name}");
    }
    let copy = fs::read_to_string(dir.join("tern-copy.1")).expect("read");
    assert!(copy.contains("files\\-from"), "the copy page lacks its flags");
}
