//! A real daemon's stream handler (Hello, Auth or Join, then requests)
//! reading arbitrary client bytes from an in-memory pipe: whatever comes, it
//! must end cleanly, without a panic or a hang, and write nothing outside
//! its module.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tern_net::config::{Access, Grant, ServerConfig};
use tern_net::server::Server;
use tern_net::stream::Stream;
use tern_net::transport::{Peer, Transport};
use tokio::io::AsyncWriteExt;

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
        std::fs::create_dir_all(module.join("sub")).expect("mkdir");
        std::fs::write(module.join("sub/f"), b"hello").expect("write");
        // A fixed mtime, so a seed can open the file for reading (the
        // daemon checks size and mtime against what the client listed).
        let f = std::fs::File::options()
            .write(true)
            .open(module.join("sub/f"))
            .expect("open");
        f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000))
            .expect("set mtime");
        let mut cfg = ServerConfig::empty();
        cfg.state_dir = dir.path().join("state");
        cfg.add_module("data", &module, Access::ReadWrite, None)
            .expect("module");
        // Requests waiting for chunks that never come (a mutated write) wait
        // this long: found as a 300 s hang when the wait ignored the setting.
        cfg.limits.idle = Duration::from_millis(500);
        cfg.grants.push(Grant {
            token_hash: Some(blake3::hash(b"t")),
            client: None,
            modules: vec!["*".into()],
            access: Access::ReadWrite,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let server = Arc::new(Server::new(&cfg, "fuzz").expect("server"));
        World { _dir: dir, rt, server }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let (client, server_side) = tokio::io::duplex(1 << 16);
    let (srd, swr) = tokio::io::split(server_side);
    let (_crd, mut cwr) = tokio::io::split(client);
    let input = data.to_vec();
    // The client writes everything and closes; its reads are never drained
    // beyond the pipe, so replies past 64 KiB would block: the stream's
    // timeout bounds that.
    w.rt.spawn(async move {
        let _ = cwr.write_all(&input).await;
        let _ = cwr.shutdown().await;
    });
    let s = Stream::new(
        w.rt.handle().clone(),
        Box::pin(srd),
        Box::pin(swr),
        Duration::from_millis(200),
    );
    let peer = Peer {
        addr: "127.0.0.1:9".parse().expect("addr"),
        client: None,
        transport: Transport::Tcp,
        conn_id: 0,
    };
    w.server.handle(s, peer);
});
