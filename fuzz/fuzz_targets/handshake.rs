//! A real daemon's stream handler (Hello, Auth or Join, then requests)
//! reading arbitrary client bytes from an in-memory pipe: whatever comes, it
//! must end cleanly, without a panic or a hang, and write nothing outside
//! its module.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_net::server::Server;

struct World {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    server: Arc<Server>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let module = dir.path().join("module");
        // `sub/f`, which the `read` seed opens.
        tern_fuzz::write_fixture(&module);
        // Requests waiting for chunks that never come (a mutated write) wait
        // this long: found as a 300 s hang when the wait ignored the setting.
        let cfg = tern_fuzz::config(&module, &dir.path().join("state"), Duration::from_millis(500));
        let (rt, server) = tern_fuzz::start(&cfg);
        World { _dir: dir, rt, server }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    tern_fuzz::serve(&w.rt, &w.server, data.to_vec());
});
