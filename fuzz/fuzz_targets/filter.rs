//! Filter rules (rsync-style globs) from arbitrary bytes, matched against
//! arbitrary paths: no panic, and matching terminates quickly (a pattern of
//! many `*` must not take exponential time).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::filter::{Filter, Rule};

fuzz_target!(|data: &[u8]| {
    // Patterns, then paths, separated by NUL.
    let mut parts = data.split(|&b| b == 0);
    let Some(patterns) = parts.next() else { return };
    let mut f = Filter::new();
    for (i, p) in patterns.split(|&b| b == b'\n').enumerate() {
        if let Ok(r) = Rule::from_bytes(p, i % 2 == 1) {
            f.push(r);
        }
    }
    for path in parts {
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(path));
        let _ = f.included(p, path.ends_with(b"/"));
    }
});

use std::os::unix::ffi::OsStrExt;
