//! A confined endpoint with a [`MetaPolicy`] applies it to whatever the
//! engine writes into it, as a daemon's pull does: no set-id bits, no
//! owner 0, no privileged extended attributes, the root's own metadata
//! left alone.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tern_core::engine::Quiet;
use tern_core::{Dest, Kind, LocalEndpoint, Meta, MetaPolicy, Options, Root, Source};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn names(ep: &LocalEndpoint, rel: &str) -> Vec<String> {
    let mut n: Vec<String> = ep
        .xattrs(Path::new(rel))
        .expect("xattrs")
        .into_iter()
        .map(|(n, _)| n.to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

#[test]
fn an_engine_run_into_a_policed_endpoint_gets_no_privileges() {
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    let module = t.path().join("module");
    fs::create_dir_all(src.join("dir")).expect("mkdir");
    fs::create_dir(&module).expect("mkdir");
    // Small (batched) and chunked (large) files, set-id, with attributes.
    fs::write(src.join("small"), b"abc").expect("write");
    fs::write(src.join("large"), vec![7u8; 300_000]).expect("write");
    symlink("small", src.join("link")).expect("symlink");
    let plain = LocalEndpoint::new(&src);
    let mut xattrs: tern_core::Xattrs = vec![("user.kept".into(), b"1".to_vec())];
    if is_root() {
        xattrs.push(("trusted.planted".into(), b"1".to_vec()));
    }
    for (name, kind, mode) in [
        ("small", Kind::File, 0o6755),
        ("large", Kind::File, 0o4755),
        ("dir", Kind::Dir, 0o6775),
        ("", Kind::Dir, 0o777),
    ] {
        let meta = Meta {
            mode,
            ..Meta::default()
        };
        // Some file systems (tmpfs before Linux 6.6) refuse user xattrs.
        let with = plain.set_meta(Path::new(name), kind, &meta, false, Some(&xattrs));
        if with.is_err() {
            plain
                .set_meta(Path::new(name), kind, &meta, false, None)
                .expect("chmod");
            xattrs.clear();
        }
    }
    let root_before = fs::metadata(&module).expect("stat");

    let ep = LocalEndpoint::confined(&module)
        .expect("confined")
        .with_policy(MetaPolicy::strict((0, 0)));
    let s = tern_core::run(
        vec![Root {
            src: Arc::new(LocalEndpoint::new(&src)),
            dst_rel: PathBuf::new(),
        }],
        Arc::new(ep.clone()),
        Options {
            chunk_size: 64 << 10,
            xattrs: true,
            ..Options::default()
        },
        Arc::new(Quiet),
    );
    assert_eq!(s.errors, 0, "{:?}", s.error_messages);
    let mode = |rel: &str| fs::symlink_metadata(module.join(rel)).expect("stat").mode() & 0o7777;
    assert_eq!(mode("small"), 0o755);
    assert_eq!(mode("large"), 0o755);
    assert_eq!(mode("dir"), 0o2775, "a directory keeps set-group-id only");
    let root_after = fs::metadata(&module).expect("stat");
    assert_eq!(root_after.permissions().mode(), root_before.permissions().mode());
    if !xattrs.is_empty() {
        for rel in ["small", "large", "dir"] {
            assert_eq!(names(&ep, rel), vec!["user.kept"], "{rel}");
        }
    }
    if is_root() {
        for rel in ["small", "large", "dir", "link"] {
            let md = fs::symlink_metadata(module.join(rel)).expect("stat");
            assert_eq!((md.uid(), md.gid()), (65534, 65534), "{rel} owned by root");
        }
        // What a policed endpoint shows: its namespaces only.
        if xattrs.is_empty() {
            return;
        }
        assert_eq!(
            names(&LocalEndpoint::new(&src), "small"),
            vec!["trusted.planted", "user.kept"]
        );
        let shown = LocalEndpoint::new(&src).with_policy(MetaPolicy::strict((0, 0)));
        assert_eq!(names(&shown, "small"), vec!["user.kept"]);
    } else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "the owner checks need root, as CI runs"
        );
    }
}
