//! What the daemon-facing fuzz targets and the seed generator share: the
//! module fixture, a daemon configured for fuzzing, and feeding a client's
//! bytes to its stream handler.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tern_net::config::{Access, Grant, ServerConfig};
use tern_net::server::Server;
use tern_net::stream::Stream;
use tern_net::transport::{Peer, Transport};
use tern_proto::{WireEntry, WireKind, WireMeta};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The mtime of the fixture `sub/f`, fixed so that a request can name the
/// file as listed (the daemon checks size and mtime).
pub const FIXTURE_MTIME: i64 = 1_000_000_000;

/// Writes the fixture `module/sub/f`: 5 bytes, mtime [`FIXTURE_MTIME`].
pub fn write_fixture(module: &Path) {
    std::fs::create_dir_all(module.join("sub")).expect("mkdir");
    std::fs::write(module.join("sub/f"), b"hello").expect("write");
    let f = std::fs::File::options()
        .write(true)
        .open(module.join("sub/f"))
        .expect("open");
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(FIXTURE_MTIME as u64))
        .expect("set mtime");
}

/// A regular file's entry as a client lists it.
pub fn file_entry(name: &[u8], size: u64, mtime: i64) -> WireEntry {
    WireEntry {
        name: name.to_vec(),
        kind: WireKind::File,
        size,
        meta: WireMeta {
            mtime: (mtime, 0),
            ..WireMeta::default()
        },
        target: None,
        file_id: None,
        nlink: 1,
        allocated: 0,
        changed: (0, 0),
    }
}

/// A daemon exporting `module` read-write as `data` to the token `t`, its
/// state in `state`; `idle` bounds requests waiting for chunks that never
/// come. The caller may change more before [`start`].
pub fn config(module: &Path, state: &Path, idle: Duration) -> ServerConfig {
    let mut cfg = ServerConfig::empty();
    cfg.state_dir = state.to_path_buf();
    cfg.add_module("data", module, Access::ReadWrite, None).expect("module");
    cfg.limits.idle = idle;
    cfg.grants.push(Grant {
        token_hash: Some(blake3::hash(b"t")),
        client: None,
        modules: vec!["*".into()],
        access: Access::ReadWrite,
    });
    cfg
}

/// The daemon's request handler for `cfg`, with a runtime for the pipes.
pub fn start(cfg: &ServerConfig) -> (tokio::runtime::Runtime, Arc<Server>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = Arc::new(Server::new(cfg, "fuzz").expect("server"));
    (rt, server)
}

/// Runs the daemon's handler on one stream whose client sends `input` and
/// closes, its replies drained. Returns once both ends are done, so that
/// nothing of this input outlives it.
pub fn serve(rt: &tokio::runtime::Runtime, server: &Arc<Server>, input: Vec<u8>) {
    let (client, server_side) = tokio::io::duplex(1 << 16);
    let (srd, swr) = tokio::io::split(server_side);
    let (mut crd, mut cwr) = tokio::io::split(client);
    let writer = rt.spawn(async move {
        let _ = cwr.write_all(&input).await;
        let _ = cwr.shutdown().await;
    });
    let drain = rt.spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = crd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let s = Stream::new(
        rt.handle().clone(),
        Box::pin(srd),
        Box::pin(swr),
        Duration::from_millis(200),
    );
    let peer = Peer {
        addr: "127.0.0.1:9".parse().expect("addr"),
        client: None,
        transport: Transport::Tcp,
        conn_id: 0,
        gate: tern_net::transport::Gate::standalone(std::time::Instant::now() + Duration::from_secs(1)),
    };
    server.handle(s, peer);
    // The handler has dropped its stream: both ends finish.
    let _ = rt.block_on(writer);
    let _ = rt.block_on(drain);
}
