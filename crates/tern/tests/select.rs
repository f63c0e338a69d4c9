//! Issue 20: rsync's transfer rules (`--size-only`, `--ignore-existing`,
//! `--update`, `--modify-window`, `--min-size`, `--max-size`): the files
//! they leave alone neither cross nor change, and `sync --delete` keeps
//! them.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::server::*;
use common::*;

/// Sets `p`'s modification time to `secs` after the epoch, plus `nanos`.
fn set_mtime(p: &Path, secs: u64, nanos: u32) {
    let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    let f = fs::File::options().write(true).open(p).expect("open");
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .expect("set times");
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).and_then(|m| m.modified()).expect("mtime")
}

/// `tern copy --json --no-fsync ARGS... SRC/ DST/`, which must succeed:
/// its summary.
fn run_copy(src: &Path, dst: &Path, args: &[&str]) -> serde_json::Value {
    let mut cmd = tern();
    cmd.args(["copy", "--json", "--no-fsync"]).args(args);
    cmd.arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()));
    let out = cmd.output().expect("run tern");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "tern copy {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&stdout)
}

#[test]
fn size_only_takes_a_file_of_the_same_size_as_unchanged_and_fixes_its_time() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write(&src.join("same"), b"source!");
    write(&dst.join("same"), b"destine");
    write(&src.join("other"), b"longer source");
    write(&dst.join("other"), b"short");
    set_mtime(&src.join("same"), 1_700_000_000, 0);
    set_mtime(&dst.join("same"), 1_600_000_000, 0);

    let j = run_copy(&src, &dst, &["--size-only"]);
    assert_eq!(
        (j["copied"].as_u64(), j["unchanged"].as_u64()),
        (Some(1), Some(1)),
        "{j}"
    );
    assert_eq!(fs::read(dst.join("same")).expect("read"), b"destine");
    assert_eq!(mtime(&dst.join("same")), mtime(&src.join("same")), "time not updated");
    assert_eq!(fs::read(dst.join("other")).expect("read"), b"longer source");

    // Without it the time differs, so the file is sent.
    let j = run_copy(&src, &dst, &[]);
    assert_eq!(j["copied"].as_u64(), Some(0), "{j}");
    set_mtime(&dst.join("same"), 1_600_000_000, 0);
    let j = run_copy(&src, &dst, &[]);
    assert_eq!(j["copied"].as_u64(), Some(1), "{j}");
    assert_eq!(fs::read(dst.join("same")).expect("read"), b"source!");
}

#[test]
fn ignore_existing_sends_only_new_files() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write(&src.join("old"), b"new content");
    write(&dst.join("old"), b"kept");
    write(&src.join("d/new"), b"fresh");
    let before = mtime(&dst.join("old"));

    let j = run_copy(&src, &dst, &["--ignore-existing"]);
    assert_eq!((j["copied"].as_u64(), j["skipped"].as_u64()), (Some(1), Some(1)), "{j}");
    assert_eq!(fs::read(dst.join("old")).expect("read"), b"kept");
    assert_eq!(mtime(&dst.join("old")), before, "its time was changed");
    assert_eq!(fs::read(dst.join("d/new")).expect("read"), b"fresh");
}

#[test]
fn update_leaves_files_newer_at_the_destination() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    for (name, s, d) in [
        ("newer-there", 100, 200),
        ("older-there", 200, 100),
        ("same-time", 150, 150),
    ] {
        write(&src.join(name), format!("src {name}").as_bytes());
        write(&dst.join(name), b"dst");
        set_mtime(&src.join(name), 1_700_000_000 + s, 0);
        set_mtime(&dst.join(name), 1_700_000_000 + d, 0);
    }
    let j = run_copy(&src, &dst, &["-u"]);
    assert_eq!((j["copied"].as_u64(), j["skipped"].as_u64()), (Some(2), Some(1)), "{j}");
    assert_eq!(fs::read(dst.join("newer-there")).expect("read"), b"dst");
    assert_eq!(fs::read(dst.join("older-there")).expect("read"), b"src older-there");
    // The same time but another size: sent, as rsync does.
    assert_eq!(fs::read(dst.join("same-time")).expect("read"), b"src same-time");
}

#[test]
fn modify_window_takes_times_within_it_as_equal() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write(&src.join("f"), b"source");
    write(&dst.join("f"), b"dest!!");
    set_mtime(&src.join("f"), 1_700_000_001, 500_000_000);
    set_mtime(&dst.join("f"), 1_700_000_000, 0);
    let before = mtime(&dst.join("f"));

    let j = run_copy(&src, &dst, &["--modify-window", "1"]);
    assert_eq!(
        (j["copied"].as_u64(), j["unchanged"].as_u64()),
        (Some(0), Some(1)),
        "{j}"
    );
    assert_eq!(fs::read(dst.join("f")).expect("read"), b"dest!!");
    assert_eq!(mtime(&dst.join("f")), before, "a time within the window was changed");
    // Two seconds apart is outside a window of one.
    set_mtime(&dst.join("f"), 1_699_999_999, 0);
    let j = run_copy(&src, &dst, &["-@", "1"]);
    assert_eq!(j["copied"].as_u64(), Some(1), "{j}");
    assert_eq!(fs::read(dst.join("f")).expect("read"), b"source");
    // By default a difference in nanoseconds alone is a change.
    set_mtime(&dst.join("f"), 1_700_000_001, 0);
    fs::write(dst.join("f"), b"dest!!").expect("write");
    set_mtime(&dst.join("f"), 1_700_000_001, 0);
    let j = run_copy(&src, &dst, &[]);
    assert_eq!(j["copied"].as_u64(), Some(1), "{j}");
}

#[test]
fn size_limits_leave_files_and_sync_delete_keeps_them() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write(&src.join("tiny"), &data(100, 1));
    write(&src.join("mid"), &data(5000, 2));
    write(&src.join("big"), &data(300 << 10, 3));
    write(&dst.join("big"), b"old big");
    write(&dst.join("gone"), b"not in the source");

    let out = expect(
        0,
        &[
            &"sync",
            &"--delete",
            &"--json",
            &"--min-size",
            &"1K",
            &"--max-size",
            &"100K",
            &format!("{}/", src.display()),
            &dst,
        ],
    );
    let j = json(&out);
    assert_eq!(
        (j["copied"].as_u64(), j["skipped"].as_u64(), j["deleted"].as_u64()),
        (Some(1), Some(2), Some(1)),
        "{j}"
    );
    assert!(!dst.join("tiny").exists(), "a file under --min-size was sent");
    assert_eq!(fs::read(dst.join("mid")).expect("read"), data(5000, 2));
    assert_eq!(fs::read(dst.join("big")).expect("read"), b"old big", "--max-size");
    assert!(!dst.join("gone").exists());
    // A bad size is refused before anything is done.
    let (code, _, err) = outcome(&run(&[&"copy", &"--max-size", &"12Q", &src, &dst]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-size") && err.contains("12Q"), "{err}");
}

/// The rules hold for a push to a daemon and a pull from one, where the
/// client compares the two sides.
#[test]
fn rules_hold_to_and_from_a_daemon() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    write(&src.join("old"), b"new content");
    write(&src.join("new"), b"fresh");
    write(&module.join("tree/old"), b"kept");
    let d = daemon(t.path(), &module, false);
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "--ignore-existing"]))
        .arg(format!("{}/", src.display()))
        .arg(d.url("tree/")));
    let j = json(&out);
    assert_eq!(
        (j["copied"].as_u64(), j["skipped"].as_u64()),
        (Some(1), Some(1)),
        "{out}"
    );
    assert_eq!(fs::read(module.join("tree/old")).expect("read"), b"kept");
    assert_eq!(fs::read(module.join("tree/new")).expect("read"), b"fresh");

    let back = t.path().join("back");
    write(&back.join("new"), b"local");
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "--max-size", "4"]))
        .arg(d.url("tree/"))
        .arg(format!("{}/", back.display())));
    let j = json(&out);
    // "kept" (4 bytes) comes; "fresh" (5) is left as it is here.
    assert_eq!(
        (j["copied"].as_u64(), j["skipped"].as_u64()),
        (Some(1), Some(1)),
        "{out}"
    );
    assert_eq!(fs::read(back.join("new")).expect("read"), b"local");
    assert_eq!(fs::read(back.join("old")).expect("read"), b"kept");

    // A list, pulled.
    let list = t.path().join("list");
    fs::write(
        &list, "new
",
    )
    .expect("write");
    let listed = t.path().join("listed");
    let out = ok(d
        .auth(client(t.path()).args(["copy", "--json", "--files-from"]).arg(&list))
        .arg(d.url("tree/"))
        .arg(format!("{}/", listed.display())));
    assert_eq!(json(&out)["copied"].as_u64(), Some(1), "{out}");
    assert_eq!(fs::read(listed.join("new")).expect("read"), b"fresh");
    assert!(!listed.join("old").exists());
}

/// `--files-from`: only the listed files and trees cross, the directories
/// on the way are made, the filters still apply, and `sync --delete`
/// deletes only within what the list names.
#[test]
fn files_from_sends_only_what_it_lists() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    for p in [
        "a/b/keep.txt",
        "a/b/not.txt",
        "a/skip.txt",
        "tree/x",
        "tree/deep/y",
        "tree/z.log",
        "top",
    ] {
        write(&src.join(p), p.as_bytes());
    }
    write(&dst.join("tree/stale"), b"stale");
    write(&dst.join("outside"), b"outside the list");
    let list = t.path().join("list");
    fs::write(&list, "# what to send\na/b/keep.txt\n./tree/\n/top\n").expect("write");
    let out = expect(
        0,
        &[
            &"sync",
            &"--delete",
            &"--json",
            &"--exclude",
            &"*.log",
            &"--files-from",
            &list,
            &format!("{}/", src.display()),
            &dst,
        ],
    );
    let j = json(&out);
    assert_eq!(
        (j["copied"].as_u64(), j["deleted"].as_u64()),
        (Some(4), Some(1)),
        "{out}"
    );
    for p in ["a/b/keep.txt", "tree/x", "tree/deep/y", "top"] {
        assert_eq!(fs::read(dst.join(p)).expect("read"), p.as_bytes(), "{p}");
    }
    for p in ["a/b/not.txt", "a/skip.txt", "tree/z.log", "tree/stale"] {
        assert!(!dst.join(p).exists(), "{p}");
    }
    assert_eq!(fs::read(dst.join("outside")).expect("read"), b"outside the list");

    // NUL-separated, from stdin, into a directory named after the source.
    let other = t.path().join("other");
    let mut cmd = tern();
    cmd.args(["copy", "--json", "--files-from", "-", "-0"])
        .arg(&src)
        .arg(&other);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), b"a/skip.txt\0top").expect("write");
    let o = child.wait_with_output().expect("wait");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read(other.join("src/a/skip.txt")).expect("read"), b"a/skip.txt");
    assert_eq!(fs::read(other.join("src/top")).expect("read"), b"top");
    assert!(!other.join("src/tree").exists());

    // A line that leaves the source is refused, by file and line.
    fs::write(&list, "top\n../etc/passwd\n").expect("write");
    let (code, _, err) = outcome(&run(&[&"copy", &"--files-from", &list, &src, &dst]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 2") && err.contains(&list.display().to_string()),
        "{err}"
    );
    let (code, _, err) = outcome(&run(&[&"copy", &"--files-from", &list, &src, &src, &dst]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("one source"), "{err}");
}

/// `--delete-excluded`: what the filters exclude goes from the destination
/// too, files and directories alike; plain `--delete` keeps it.
#[test]
fn delete_excluded_clears_what_the_filters_exclude() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write(&src.join("main.c"), b"int main;");
    write(&src.join("main.o"), b"object");
    write(&src.join("build/out"), b"built");
    write(&dst.join("main.o"), b"old object");
    write(&dst.join("build/out"), b"old build");
    write(&dst.join("lib/x.o"), b"stale object");
    let sync = |extra: &str| {
        let out = expect(
            0,
            &[
                &"sync",
                &"--json",
                &extra,
                &"--exclude",
                &"*.o",
                &"--exclude",
                &"/build/",
                &format!("{}/", src.display()),
                &dst,
            ],
        );
        json(&out)
    };
    let j = sync("--delete");
    assert_eq!(j["deleted"].as_u64(), Some(1), "{j}");
    assert!(dst.join("main.o").exists() && dst.join("build/out").exists());
    assert!(
        !dst.join("lib").exists(),
        "lib/ (only x.o, excluded) is not the source's"
    );
    write(&dst.join("lib/x.o"), b"stale object");
    let j = sync("--delete-excluded");
    assert_eq!(j["deleted"].as_u64(), Some(3), "{j}");
    for p in ["main.o", "build", "lib"] {
        assert!(!dst.join(p).exists(), "{p} kept");
    }
    assert_eq!(fs::read(dst.join("main.c")).expect("read"), b"int main;");
}

/// `--stats` prints rsync's statistics block on stdout, with the numbers
/// a script that parses rsync's reads: a delta's literal and matched data.
#[test]
fn stats_prints_rsyncs_block() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    let old = data(3 << 20, 5);
    let mut new = old.clone();
    new[1 << 20..(1 << 20) + 100].fill(1);
    write(&src.join("big"), &new);
    write(&dst.join("big"), &old);
    set_mtime(&dst.join("big"), 1_600_000_000, 0);
    write(&src.join("small"), b"12345");
    let out = expect(
        0,
        &[
            &"copy",
            &"--stats",
            &"--no-whole-file",
            &"--chunk-size",
            &"1M",
            &format!("{}/", src.display()),
            &dst,
        ],
    );
    let field = |name: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name:?} in {out}"));
        line[name.len()..]
            .trim()
            .trim_end_matches(" bytes")
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("{line}"))
    };
    assert_eq!(field("Number of regular files transferred:"), 2);
    assert_eq!(field("Total transferred file size:"), (3 << 20) + 5);
    let (literal, matched) = (field("Literal data:"), field("Matched data:"));
    assert_eq!(literal + matched, (3 << 20) + 5, "{out}");
    assert!(literal < 256 << 10, "{out}");
    assert_eq!(field("Total bytes sent:"), literal);
    assert_eq!(fs::read(dst.join("big")).expect("read"), new);
}

/// `--max-delete N`: past N entries (a directory's contents counted) the
/// run deletes nothing, fails, and says why; within it, all goes.
#[test]
fn max_delete_guards_against_deleting_too_much() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write(&src.join("keep"), b"k");
    write(&dst.join("extra"), b"e");
    for i in 0..3 {
        write(&dst.join(format!("old/f{i}")), b"o");
    }
    let sync = |max: &str| {
        run(&[
            &"sync",
            &"--delete",
            &"--json",
            &"--max-delete",
            &max,
            &format!("{}/", src.display()),
            &dst,
        ])
    };
    let (code, out, err) = outcome(&sync("4"));
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        err.contains("--max-delete 4") && err.contains("nothing was deleted"),
        "{err}"
    );
    assert_eq!(json(&out)["deleted"].as_u64(), Some(0));
    assert!(dst.join("extra").exists() && dst.join("old/f2").exists());
    assert_eq!(fs::read(dst.join("keep")).expect("read"), b"k", "the data still came");
    let (code, out, err) = outcome(&sync("5"));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&out)["deleted"].as_u64(), Some(2), "{out}");
    assert!(!dst.join("extra").exists() && !dst.join("old").exists());
}

/// `-i` prints rsync's change codes, one change a line on stdout.
#[test]
fn itemize_changes_prints_rsyncs_codes() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write(&src.join("d/new"), b"new");
    write(&src.join("changed"), b"longer now");
    write(&dst.join("changed"), b"short");
    write(&src.join("touched"), b"same");
    write(&dst.join("touched"), b"same");
    set_mtime(&dst.join("changed"), 1_600_000_000, 0);
    set_mtime(&dst.join("touched"), 1_600_000_000, 0);
    std::os::unix::fs::symlink("changed", src.join("link")).expect("symlink");
    write(&dst.join("gone"), b"x");
    let out = expect(
        0,
        &[
            &"sync",
            &"--delete",
            &"-i",
            &"--no-fsync",
            &format!("{}/", src.display()),
            &dst,
        ],
    );
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "*deleting   gone",
            ">f+++++++++ d/new",
            ">f..t...... touched",
            ">f.st...... changed",
            "cL+++++++++ link",
            "cd+++++++++ d/",
        ],
        "{out}"
    );
    // A time fixed alone, and nothing else to say.
    set_mtime(&dst.join("touched"), 1_600_000_000, 0);
    let out = expect(
        0,
        &[&"copy", &"-i", &"--size-only", &format!("{}/", src.display()), &dst],
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), [".f..t...... touched"], "{out}");

    // Sent to a daemon: `<`.
    let module = t.path().join("module");
    fs::create_dir(&module).expect("mkdir");
    let d = daemon(t.path(), &module, false);
    let out = ok(d
        .auth(client(t.path()).args(["copy", "-i"]))
        .arg(src.join("touched"))
        .arg(d.url("")));
    assert_eq!(out.trim(), "<f+++++++++ touched", "{out}");
}

/// Issue 20: a single file copied to a path whose parents are missing gets
/// them made, as directory copies do; a destination that cannot be is a
/// fatal error (exit 1) that says why.
#[test]
fn missing_parents_of_the_destination_are_made() {
    let t = tempfile::tempdir().expect("tempdir");
    let f = t.path().join("f");
    write(&f, b"file");
    let to = t.path().join("a/b/c.txt");
    expect(0, &[&"copy", &f, &to]);
    assert_eq!(fs::read(&to).expect("read"), b"file");
    // A dry run makes nothing.
    let dry = t.path().join("x/y/z");
    expect(0, &[&"copy", &"-n", &f, &dry]);
    assert!(!t.path().join("x").exists());
    // Under a file: exit 1, naming it.
    let (code, _, err) = outcome(&run(&[&"copy", &f, &f.join("under/it")]));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is not a directory") && err.contains(&f.display().to_string()),
        "{err}"
    );
}

/// `-m`: a filtered copy makes only the directories something lands in or
/// beneath; without it, every directory comes.
#[test]
fn prune_empty_dirs_makes_only_directories_that_hold_something() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("a/b/keep.txt"), b"k");
    write(&src.join("a/c/skip.log"), b"s");
    write(&src.join("d/e/skip.log"), b"s");
    fs::create_dir_all(src.join("empty/deeper")).expect("mkdir");
    let copy = |dst: &Path, extra: &[&str]| {
        let mut cmd = tern();
        cmd.args(["copy", "--json", "--exclude", "*.log"]).args(extra);
        cmd.arg(format!("{}/", src.display())).arg(dst);
        let out = cmd.output().expect("run");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        json(&String::from_utf8_lossy(&out.stdout))
    };
    let pruned = t.path().join("pruned");
    let j = copy(&pruned, &["-m"]);
    assert_eq!(tree(&pruned), tree_of(&["a", "a/b", "a/b/keep.txt"]), "{j}");
    assert_eq!(j["dirs_created"].as_u64(), Some(3), "the root, a and a/b: {j}");
    let all = t.path().join("all");
    copy(&all, &[]);
    for d in ["a/c", "d/e", "empty/deeper"] {
        assert!(all.join(d).is_dir(), "{d}");
    }
}

fn tree_of(paths: &[&str]) -> Vec<std::path::PathBuf> {
    paths.iter().map(std::path::PathBuf::from).collect()
}

/// Issue 20: `--json` answers on stdout even when the run cannot start.
#[test]
fn json_reports_a_run_that_could_not_start() {
    let t = tempfile::tempdir().expect("tempdir");
    let (code, out, err) = outcome(&run(&[
        &"copy",
        &"--json",
        &t.path().join("missing"),
        &t.path().join("d"),
    ]));
    assert_eq!(code, 1, "{err}");
    let j = json(&out);
    assert_eq!(j["exit"].as_u64(), Some(1), "{out}");
    assert!(j["error"].as_str().is_some_and(|e| e.contains("missing")), "{out}");
}

/// Issue 20: the defaults file's options come before the command line's:
/// a filter from it applies, a value typed wins, and `sync:` lines are
/// for sync alone.
#[test]
fn the_defaults_file_gives_options_the_command_line_can_override() {
    let t = tempfile::tempdir().expect("tempdir");
    let (src, conf) = (t.path().join("src"), t.path().join("conf"));
    write(&src.join("a.txt"), b"a");
    write(&src.join("b.tmp"), b"b");
    write(&src.join("big"), &data(5000, 1));
    write(
        &conf.join("defaults"),
        b"# mine\n--exclude *.tmp --max-size 1K\nsync: --delete\n",
    );
    let go = |args: &[&str], dst: &Path| {
        let mut cmd = tern();
        cmd.env("TERN_CONFIG_DIR", &conf).args(args);
        cmd.arg(format!("{}/", src.display())).arg(dst);
        let o = cmd.output().expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        json(&String::from_utf8_lossy(&o.stdout))
    };
    let d1 = t.path().join("d1");
    go(&["copy", "--json"], &d1);
    assert!(d1.join("a.txt").exists() && !d1.join("b.tmp").exists() && !d1.join("big").exists());
    // A value typed on the command line replaces the default.
    let d2 = t.path().join("d2");
    go(&["copy", "--json", "--max-size", "1M"], &d2);
    assert!(d2.join("big").exists() && !d2.join("b.tmp").exists());
    // sync gets --delete from its own line.
    write(&d2.join("stale"), b"s");
    let j = go(&["sync", "--json", "--max-size", "1M"], &d2);
    assert_eq!(j["deleted"].as_u64(), Some(1), "{j}");
}

/// Issue 20: `--progress` without a terminal prints progress lines (no
/// bar can be drawn), naming the file; without it, nothing of the kind.
#[test]
fn progress_without_a_terminal_prints_lines() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("one.bin"), &data(3 << 20, 1));
    write(&src.join("two.txt"), b"two");
    let (code, _, err) = outcome(&run(&[&"copy", &"--progress", &src, &t.path().join("a")]));
    assert_eq!(code, 0, "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("%)"))
        .unwrap_or_else(|| panic!("no progress line: {err}"));
    assert!(line.contains(" files ") || line.contains(" file "), "{line}");
    let (_, _, quiet) = outcome(&run(&[&"copy", &src, &t.path().join("b")]));
    assert!(!quiet.contains("%)"), "{quiet}");
}

/// Issue 20: `check --json` lists what differs, not only how many.
#[test]
fn check_json_lists_the_differences() {
    let t = tempfile::tempdir().expect("tempdir");
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    write(&a.join("same"), b"s");
    write(&b.join("same"), b"s");
    write(&a.join("differs"), b"one");
    write(&b.join("differs"), b"two");
    write(&a.join("only-a"), b"a");
    write(&b.join("only-b"), b"b");
    let (code, out, err) = outcome(&run(&[&"check", &"--json", &a, &b]));
    assert_eq!(code, 4, "{err}");
    let j = json(&out);
    let mut got: Vec<(String, String)> = j["changes"]
        .as_array()
        .unwrap_or_else(|| panic!("no changes: {out}"))
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap_or("").into(),
                c["path"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = [("differ", "differs"), ("extra", "only-b"), ("missing", "only-a")]
        .iter()
        .map(|(x, y)| (x.to_string(), y.to_string()))
        .collect();
    assert_eq!(got, want, "{out}");
}

/// Issue 20: a destination on a read-only file system fails the run at
/// once with exit 1 and says so, rather than failing each file (exit 3).
#[test]
fn a_destination_that_cannot_be_written_is_a_fatal_error() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    write(&src.join("a"), b"a");
    let ro = t.path().join("ro");
    if !mount_tmpfs(&ro, "1M") {
        return skipped("mounting a tmpfs needs root");
    }
    let remounted = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&ro)
        .status()
        .is_ok_and(|s| s.success());
    let result = remounted.then(|| outcome(&run(&[&"copy", &format!("{}/", src.display()), &ro])));
    let _ = std::process::Command::new("umount").arg(&ro).status();
    let Some((code, _, err)) = result else {
        return skipped("remounting the tmpfs read-only failed");
    };
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot be written") && err.contains("Read-only"), "{err}");
}
