//! Interruptions and failures: resume after kill -9 and Ctrl-C, a source
//! changing underneath, a full disk, unreadable files.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::server::{is_root, tern_as_nobody};
use common::*;

const MIB: usize = 1 << 20;

/// Starts a throttled copy of `src` to `dst` (1 MiB chunks) and waits until
/// its journal holds at least `chunks` records.
fn start_slow_copy(src: &Path, dst: &Path, chunks: u64) -> std::process::Child {
    start_slow_copy_with(src, dst, chunks, "-q")
}

/// As [`start_slow_copy`], with `flag` instead of `-q`.
fn start_slow_copy_with(src: &Path, dst: &Path, chunks: u64, flag: &str) -> std::process::Child {
    let child = tern()
        .args(["copy", flag, "--chunk-size", "1M", "--bwlimit", "4M", "-j", "2"])
        .arg(src)
        .arg(dst)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let journal = dst.with_file_name(format!(
        ".{}.tern.journal",
        dst.file_name().and_then(|n| n.to_str()).unwrap_or("")
    ));
    wait_until("journaled chunks", Duration::from_secs(60), || {
        journal_records(&journal) >= chunks
    });
    child
}

#[test]
fn kill_9_then_rerun_resumes_and_rewrites_less() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("big.bin");
    let size = 24 * MIB;
    write(&src, &data(size, 11));
    let dst = t.path().join("copy.bin");

    let mut child = start_slow_copy(&src, &dst, 4);
    kill9(&mut child);
    assert!(!dst.exists(), "a partial file appeared at the final name");
    assert_eq!(
        side_files(t.path()).len(),
        2,
        "temp file and journal stay for the resume"
    );

    let out = expect(0, &[&"copy", &"--json", &"--chunk-size", &"1M", &src, &dst]);
    let s = json(&out);
    let resumed = s["bytes_resumed"].as_u64().expect("number");
    let written = s["bytes_written"].as_u64().expect("number");
    assert!(resumed >= 4 * MIB as u64, "resumed only {resumed} bytes");
    assert_eq!(resumed + written, size as u64);
    assert!(written < size as u64, "rewrote everything");
    assert_eq!(b3(&dst), b3(&src));
    assert!(side_files(t.path()).is_empty(), "journal and temp removed on success");
}

#[test]
fn a_corrupted_resumed_chunk_is_detected_and_rewritten() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("big.bin");
    write(&src, &data(12 * MIB, 5));
    let dst = t.path().join("copy.bin");
    let mut child = start_slow_copy(&src, &dst, 3);
    kill9(&mut child);

    // Damage the first journaled chunk's bytes in the temporary file.
    let tmp = t.path().join(".copy.bin.tern.tmp");
    let jbytes = fs::read(t.path().join(".copy.bin.tern.journal")).expect("journal");
    let first = u64::from_le_bytes(jbytes[64..72].try_into().expect("8 bytes"));
    let f = fs::OpenOptions::new().write(true).open(&tmp).expect("open tmp");
    std::os::unix::fs::FileExt::write_all_at(&f, b"garbage", first * MIB as u64 + 100).expect("write");
    drop(f);

    let s = json(&expect(0, &[&"copy", &"--json", &"--chunk-size", &"1M", &src, &dst]));
    let resumed = s["bytes_resumed"].as_u64().expect("number");
    assert!(resumed >= MIB as u64, "the undamaged chunks are kept");
    assert_eq!(b3(&dst), b3(&src), "the damaged chunk was not trusted");
}

#[test]
fn sigint_stops_cleanly_with_exit_130_and_resumes() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("big.bin");
    write(&src, &data(16 * MIB, 2));
    let dst = t.path().join("copy.bin");
    let child = start_slow_copy_with(&src, &dst, 2, "--no-progress");
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    // The summary says what the stop kept, not only that no file is done.
    assert!(
        err.contains("copied 0 of 1 file") && err.contains("MiB written in all") && err.contains("INTERRUPTED"),
        "{err}"
    );
    assert!(!dst.exists());
    assert_eq!(side_files(t.path()).len(), 2);
    let s = json(&expect(0, &[&"copy", &"--json", &"--chunk-size", &"1M", &src, &dst]));
    assert!(s["bytes_resumed"].as_u64().expect("number") >= 2 * MIB as u64);
    assert_eq!(b3(&dst), b3(&src));
}

#[test]
fn a_source_changed_during_copy_is_reported_not_mixed() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("big.bin");
    write(&src, &data(16 * MIB, 9));
    let dst = t.path().join("copy.bin");
    write(&dst, b"the previous version");
    let child = start_slow_copy(&src, &dst, 2);
    let f = fs::OpenOptions::new().append(true).open(&src).expect("open");
    std::io::Write::write_all(&mut &f, b"appended while copying").expect("append");
    drop(f);
    let o = child.wait_with_output().expect("wait");
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("big.bin") && err.contains("changed while being copied"),
        "{err}"
    );
    assert_eq!(fs::read(&dst).expect("read"), b"the previous version");
    assert!(side_files(t.path()).is_empty());
    // A rerun copies the new version.
    expect(0, &[&"copy", &"-q", &src, &dst]);
    assert_eq!(b3(&dst), b3(&src));
}

#[test]
fn a_full_disk_is_a_clear_error_and_the_old_file_survives() {
    let t = tempfile::tempdir().expect("tempdir");
    let mnt = t.path().join("mnt");
    if !mount_tmpfs(&mnt, "2M") {
        skipped("cannot mount a tmpfs here (needs root)");
        return;
    }
    let _guard = Unmount(&mnt);
    write(&mnt.join("small.bin"), b"old small");
    write(&mnt.join("large.bin"), b"old large");
    let small = t.path().join("small.bin");
    write(&small, &data(3 * MIB, 1));
    let large = t.path().join("large.bin");
    write(&large, &data(6 * MIB, 2));

    for (src, chunk) in [(&small, "8M"), (&large, "1M")] {
        let name = src.file_name().expect("name");
        let o = run(&[&"copy", &"--chunk-size", &chunk, src, &mnt.join(name)]);
        let (code, _, err) = outcome(&o);
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("no space left on device"), "{err}");
        assert!(err.contains(&*name.to_string_lossy()), "error names the file: {err}");
    }
    assert_eq!(fs::read(mnt.join("small.bin")).expect("read"), b"old small");
    assert_eq!(fs::read(mnt.join("large.bin")).expect("read"), b"old large");
    assert!(
        side_files(&mnt).is_empty(),
        "temporary data removed: {:?}",
        side_files(&mnt)
    );
}

#[test]
fn unreadable_files_fail_alone() {
    let t = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let src = t.path().join("src");
    write(&src.join("ok.txt"), b"fine");
    write(&src.join("secret.txt"), b"hidden");
    fs::set_permissions(src.join("secret.txt"), fs::Permissions::from_mode(0o000)).expect("chmod");
    let out = t.path().join("out");
    fs::create_dir(&out).expect("mkdir");
    fs::set_permissions(&out, fs::Permissions::from_mode(0o777)).expect("chmod");
    let dst = out.join("dst");

    // Root reads anything: run as nobody where we are root.
    let mut c = match tern_as_nobody() {
        Some(c) => c,
        None if !is_root() => tern(),
        None => {
            skipped("setpriv not available");
            return;
        }
    };
    let o = c
        .args(["copy", "--no-progress"])
        .arg(format!("{}/", src.display()))
        .arg(&dst)
        .output()
        .expect("run tern");
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("secret.txt") && err.contains("Permission denied"), "{err}");
    assert_eq!(
        fs::read(dst.join("ok.txt")).expect("the other file was copied"),
        b"fine"
    );
    assert!(!dst.join("secret.txt").exists());
    assert!(side_files(&dst).is_empty());
}

#[test]
fn reflink_where_the_file_system_can() {
    let t = tempfile::tempdir().expect("tempdir");
    let img = t.path().join("xfs.img");
    let mnt = t.path().join("mnt");
    fs::File::create(&img)
        .and_then(|f| f.set_len(512 << 20))
        .expect("image");
    let made = Command::new("mkfs.xfs")
        .arg("-q")
        .arg(&img)
        .stderr(Stdio::null())
        .status();
    if !made.is_ok_and(|s| s.success()) {
        skipped("mkfs.xfs not available");
        return;
    }
    fs::create_dir(&mnt).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt)
        .stderr(Stdio::null())
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        skipped("cannot mount a loop device here (needs root)");
        return;
    }
    let _guard = Unmount(&mnt);
    let src = mnt.join("big.bin");
    write(&src, &data(20 * MIB + 7, 4));
    let dst = mnt.join("copy.bin");
    let s = json(&expect(0, &[&"copy", &"--json", &"--verify", &src, &dst]));
    assert_eq!(s["bytes_cloned"], 20 * MIB + 7);
    assert_eq!(s["bytes_written"], 0);
    assert_eq!(s["verified"], true);
    assert_eq!(b3(&dst), b3(&src));
    assert!(side_files(&mnt).is_empty());
}

#[test]
fn a_low_open_file_limit_does_not_fail_many_small_files() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    for i in 0..600 {
        write(&src.join(format!("d{}/f{i}", i % 7)), &data(100 + i, i as u64));
    }
    let dst = t.path().join("dst");
    let o = Command::new("prlimit")
        .arg("--nofile=200:200")
        .arg(env!("CARGO_BIN_EXE_tern"))
        .args(["copy", "-q", "-j", "8"])
        .arg(format!("{}/", src.display()))
        .arg(&dst)
        .output();
    let Ok(o) = o else {
        skipped("prlimit not available");
        return;
    };
    let (code, _, err) = outcome(&o);
    assert_eq!(code, 0, "{err}");
    assert_eq!(b3(&dst.join("d3/f500")), b3(&src.join("d3/f500")));
    expect(0, &[&"check", &src, &dst]);
}
