//! A client that does not play by the rules, against an in-process daemon:
//! crafted paths, reserved names, writes without the right, unknown
//! versions and garbage frames. Each is refused, nothing outside the module
//! is touched, and the daemon keeps serving.

use std::fs;
use std::os::unix::fs::symlink;
use std::time::Duration;

use tern_net::config::{Access, Grant, PullPeer, ServerConfig};
use tern_net::daemon::Daemon;
use tern_net::identity::Identity;
use tern_net::stream::Stream;
use tern_net::transport::{Connector, Transport};
use tern_net::NetError;
use tern_proto::{
    Auth, Batch, BatchBody, BatchItem, ErrorCode, Hello, Msg, PullRequest, PullSource, RunOptions, WireMeta, WireSpec,
};

struct Setup {
    _t: tempfile::TempDir,
    root: std::path::PathBuf,
    daemon: Option<Daemon>,
    conns: std::sync::Mutex<Vec<Connector>>,
    rt: tokio::runtime::Runtime,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop(Duration::from_secs(1));
        }
    }
}

const TOKEN: &str = "good-token";
const RO_TOKEN: &str = "read-token";

fn setup() -> Setup {
    setup_with(|_| {})
}

/// [`setup`] with changes to the daemon's configuration.
fn setup_with(change: impl FnOnce(&mut ServerConfig)) -> Setup {
    let t = tempfile::tempdir().expect("tempdir");
    let root = t.path().to_path_buf();
    fs::create_dir_all(root.join("module/sub")).expect("mkdir");
    fs::create_dir_all(root.join("other")).expect("mkdir");
    fs::create_dir_all(root.join("outside")).expect("mkdir");
    fs::write(root.join("outside/secret"), b"secret").expect("write");
    symlink(root.join("outside"), root.join("module/out")).expect("symlink");
    let mut cfg = ServerConfig::empty();
    cfg.listen.push("127.0.0.1:0".parse().expect("addr"));
    cfg.state_dir = root.join("state");
    cfg.add_module("data", &root.join("module"), Access::ReadWrite, None)
        .expect("module");
    cfg.add_module("other", &root.join("other"), Access::ReadWrite, None)
        .expect("module");
    for (tok, access) in [(TOKEN, Access::ReadWrite), (RO_TOKEN, Access::Read)] {
        cfg.grants.push(Grant {
            token_hash: Some(blake3::hash(tok.as_bytes())),
            client: None,
            modules: vec!["data".into()],
            access,
        });
    }
    cfg.pull_from.push(PullPeer::Host("127.0.0.1".into(), None));
    change(&mut cfg);
    let id = Identity::load_or_create(&cfg.state_dir).expect("identity");
    let daemon = Daemon::start(&cfg, &id).expect("start");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("rt");
    Setup {
        _t: t,
        root,
        daemon: Some(daemon),
        conns: Default::default(),
        rt,
    }
}

impl Setup {
    fn stream(&self, kind: Transport) -> Stream {
        let addr = self.daemon.as_ref().expect("daemon").addrs()[0];
        let tls = tern_net::tls::client_config(None).expect("tls");
        let (c, s) =
            Connector::connect(self.rt.handle().clone(), kind, addr, tls, Duration::from_secs(10)).expect("connect");
        // The connection must outlive the stream (QUIC).
        self.conns.lock().expect("lock").push(c);
        s
    }

    /// A stream authenticated for `module` with `token`.
    fn session(&self, module: &str, token: &str, write: bool) -> Result<Stream, NetError> {
        let mut s = self.stream(Transport::Tcp);
        s.send(&Msg::Hello(Hello::ours("test")))?;
        s.send(&Msg::Auth(Auth {
            module: module.into(),
            token: Some(token.into()),
            write,
        }))?;
        assert!(matches!(s.recv()?, Msg::Hello(_)));
        match s.recv()? {
            Msg::Welcome(_) => Ok(s),
            m => panic!("unexpected {m:?}"),
        }
    }

    fn outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(self.root.join("outside"))
            .expect("list")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names, vec!["secret"]);
        assert_eq!(fs::read(self.root.join("outside/secret")).expect("read"), b"secret");
    }
}

fn refused(s: &mut Stream, req: Msg) -> ErrorCode {
    refusal(s, &req).code
}

/// The error a request got, which must be a refusal.
fn refusal(s: &mut Stream, req: &Msg) -> tern_proto::ErrorMsg {
    s.send(req).expect("send");
    match s.recv() {
        Err(NetError::Remote(e)) => e,
        other => panic!("{req:?} was not refused: {other:?}"),
    }
}

/// Starts writing `path` as `handle`; the daemon must accept.
fn create(s: &mut Stream, handle: u64, path: &[u8]) {
    s.send(&Msg::Create {
        handle,
        path: path.to_vec(),
        spec: spec(),
    })
    .expect("send");
    assert!(
        matches!(s.recv().expect("create"), Msg::Created { .. }),
        "{path:?} not created"
    );
}

/// The entry the daemon reports for `path`, which must exist.
fn stat_entry(s: &mut Stream, path: &[u8]) -> tern_proto::WireEntry {
    s.send(&Msg::Stat { path: path.to_vec() }).expect("send");
    match s.recv().expect("stat") {
        Msg::StatReply(Some(entry)) => entry,
        m => panic!("no entry for {path:?}: {m:?}"),
    }
}

fn spec() -> WireSpec {
    WireSpec {
        size: 3,
        chunk_size: 1024,
        resumable: true,
        durable: false,
        source_meta: WireMeta::default(),
        source_changed: (0, 0),
    }
}

#[test]
fn crafted_paths_never_leave_the_module() {
    let st = setup();
    let mut s = st.session("data", TOKEN, true).expect("session");
    let escapes: Vec<&[u8]> = vec![
        b"../outside/secret",
        b"sub/../../outside/secret",
        b"/etc/passwd",
        b"out/secret",
        b"out/../out/secret",
        b"a\0b",
        b"./sub",
    ];
    for p in &escapes {
        refused(&mut s, Msg::Stat { path: p.to_vec() });
        refused(&mut s, Msg::ReadDir { path: p.to_vec() });
        refused(&mut s, Msg::MakeDir { path: p.to_vec() });
        refused(&mut s, Msg::Remove { path: p.to_vec() });
        refused(
            &mut s,
            Msg::Create {
                handle: 1,
                path: p.to_vec(),
                spec: spec(),
            },
        );
    }
    // Over-long names, and the names tern keeps for itself.
    refused(&mut s, Msg::Stat { path: vec![b'a'; 5000] });
    for reserved in [&b".x.tern.tmp"[..], b".x.tern.journal", b"sub/.y.tern.tmp.lnk"] {
        refused(
            &mut s,
            Msg::Symlink {
                path: reserved.to_vec(),
                target: b"/etc/passwd".to_vec(),
                meta: WireMeta::default(),
                owner: false,
            },
        );
    }
    refused(&mut s, Msg::Remove { path: Vec::new() });
    // A hard link to something reached through the symlink out.
    refused(
        &mut s,
        Msg::HardLink {
            existing: b"out/secret".to_vec(),
            path: b"stolen".to_vec(),
        },
    );
    assert!(!st.root.join("module/stolen").exists());
    // The symlink itself is listed as a symlink, never followed.
    s.send(&Msg::Stat { path: b"out".to_vec() }).expect("send");
    match s.recv().expect("stat") {
        Msg::StatReply(Some(e)) => assert_eq!(e.kind, tern_proto::WireKind::Symlink),
        m => panic!("{m:?}"),
    }
    st.outside_untouched();
}

#[test]
fn writes_need_a_read_write_grant_and_tokens_are_per_module() {
    let st = setup();
    let mut ro = st.session("data", RO_TOKEN, false).expect("read session");
    assert_eq!(
        refused(&mut ro, Msg::MakeDir { path: b"new".to_vec() }),
        ErrorCode::Forbidden
    );
    let create = Msg::Create {
        handle: 1,
        path: b"f".to_vec(),
        spec: spec(),
    };
    assert_eq!(refused(&mut ro, create), ErrorCode::Forbidden);
    assert!(!st.root.join("module/new").exists());
    // Asking to write with a read token fails at once.
    match st.session("data", RO_TOKEN, true) {
        Err(NetError::Remote(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("write session with a read token: {:?}", other.is_ok()),
    }
    // The data token is not valid for the other module.
    match st.session("other", TOKEN, false) {
        Err(NetError::Remote(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("token used for another module: {:?}", other.is_ok()),
    }
}

#[test]
fn failed_logins_are_rate_limited() {
    let st = setup();
    let mut last = String::new();
    for _ in 0..7 {
        match st.session("data", "wrong", false) {
            Err(NetError::Remote(e)) => last = e.message,
            _ => panic!("wrong token accepted"),
        }
    }
    assert!(last.contains("too many failed attempts"), "{last}");
    // Even the right token waits out the window now.
    assert!(st.session("data", TOKEN, false).is_err());
}

/// What a client sees after the daemon restarted: its session ids are
/// unknown. Refused, but not counted as failed logins, so the client can
/// authenticate again at once (found by tools/crash_resume.sh: a restarted
/// daemon locked its client out for a minute).
#[test]
fn joins_to_unknown_sessions_do_not_lock_a_client_out() {
    let st = setup();
    for id in 1000..1010u64 {
        let mut s = st.stream(Transport::Tcp);
        s.send(&Msg::Hello(Hello::ours("test"))).expect("send");
        s.send(&Msg::Join {
            session: id,
            secret: [7; 32],
        })
        .expect("send");
        assert!(matches!(s.recv().expect("hello"), Msg::Hello(_)));
        match s.recv() {
            Err(NetError::Remote(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
            other => panic!("join to an unknown session: {other:?}"),
        }
    }
    st.session("data", TOKEN, false).expect("a fresh login still works");
}

/// A zero-length read at a non-zero offset (found by
/// tools/crash_resume.sh) once made the handler panic inside BLAKE3.
#[test]
fn a_zero_length_read_is_answered_not_a_panic() {
    let st = setup();
    fs::write(st.root.join("module/sub/f"), vec![7u8; 10_000]).expect("write");
    let mut s = st.session("data", TOKEN, true).expect("session");
    let entry = stat_entry(&mut s, b"sub/f");
    s.send(&Msg::OpenRead {
        handle: 1,
        path: b"sub/f".to_vec(),
        expect: entry,
    })
    .expect("send");
    assert!(matches!(s.recv().expect("open"), Msg::Done));
    s.send(&Msg::Read {
        handle: 1,
        offset: 4096,
        len: 0,
    })
    .expect("send");
    match s.recv().expect("reply") {
        Msg::ReadReply { len: 0, .. } => {}
        m => panic!("unexpected {m:?}"),
    }
    let mut empty = [0u8; 0];
    s.recv_data(&mut empty).expect("no data");
    // The stream still serves.
    s.send(&Msg::Stat { path: b"sub".to_vec() }).expect("send");
    assert!(matches!(s.recv().expect("stat"), Msg::StatReply(Some(_))));
}

#[test]
fn an_older_client_is_met_and_an_unknown_version_refused() {
    let st = setup();
    // An "older" client: speaks only version 1, knows no features.
    let mut s = st.stream(Transport::Quic);
    let older = Hello {
        features: 0,
        agent: "tern 0.0.1".into(),
        ..Hello::ours("x")
    };
    s.send(&Msg::Hello(older)).expect("send");
    s.send(&Msg::Auth(Auth {
        module: "data".into(),
        token: Some(TOKEN.into()),
        write: false,
    }))
    .expect("send");
    assert!(matches!(s.recv(), Ok(Msg::Hello(h)) if h.version_min <= 1));
    assert!(matches!(s.recv(), Ok(Msg::Welcome(_))));

    // A client from the future that no longer speaks version 1.
    let mut s = st.stream(Transport::Tcp);
    let future = Hello {
        version_min: 90,
        version_max: 99,
        ..Hello::ours("tern 9")
    };
    s.send(&Msg::Hello(future)).expect("send");
    s.send(&Msg::Barrier).expect("send");
    let _ = s.recv(); // the server's Hello
    match s.recv() {
        Err(NetError::Remote(e)) => assert!(e.message.contains("no common protocol version"), "{}", e.message),
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_and_unexpected_frames_end_only_their_stream() {
    let st = setup();
    for kind in [Transport::Tcp, Transport::Quic] {
        // Data where a Hello belongs.
        let mut s = st.stream(kind);
        s.send_data(&[0u8; 10]).expect("send");
        assert!(s.recv().is_err());
        // A Write for a handle never created.
        let mut s = st.stream(kind);
        s.send(&Msg::Hello(Hello::ours("x"))).expect("send");
        s.send(&Msg::Auth(Auth {
            module: "data".into(),
            token: Some(TOKEN.into()),
            write: true,
        }))
        .expect("send");
        assert!(s.recv().is_ok());
        assert!(s.recv().is_ok());
        s.send(&Msg::Write(tern_proto::WriteChunk {
            handle: 77,
            index: 0,
            offset: 0,
            len: 3,
            holes: vec![],
            cv: [0; 32],
        }))
        .expect("send");
        assert!(s.recv().is_err());
    }
    // Still serving.
    let mut s = st.session("data", TOKEN, false).expect("session after garbage");
    s.send(&Msg::Stat { path: Vec::new() }).expect("send");
    assert!(matches!(s.recv(), Ok(Msg::StatReply(Some(_)))));
}

fn pull(st: &Setup, host: &str, fingerprint: &str, dst_rel: &[u8], chunk_size: u64) -> Msg {
    let port = st.daemon.as_ref().expect("daemon").addrs()[0].port();
    Msg::Pull(Box::new(PullRequest {
        sources: vec![PullSource {
            host: host.into(),
            port,
            module: "data".into(),
            path: b"sub".to_vec(),
            fingerprint: fingerprint.into(),
            dst_rel: dst_rel.to_vec(),
        }],
        opts: RunOptions {
            check: false,
            delete: true,
            dry_run: false,
            checksum: false,
            rules: Vec::new(),
            jobs: 2,
            fsync: false,
            verify: false,
            chunk_size,
            hard_links: false,
            xattrs: false,
            bwlimit: None,
        },
        transport: 2,
    }))
}

#[test]
fn pull_requests_outside_what_the_daemon_allows_are_refused() {
    let st = setup();
    let fp = Identity::load_or_create(&st.root.join("state"))
        .expect("id")
        .fingerprint();
    let mut ro = st.session("data", RO_TOKEN, false).expect("read session");
    assert_eq!(
        refused(&mut ro, pull(&st, "127.0.0.1", &fp, b"x", 1 << 20)),
        ErrorCode::Forbidden
    );
    let mut s = st.session("data", TOKEN, true).expect("session");
    // Not in pull_from: refused before any connection is made.
    s.send(&pull(&st, "10.255.255.1", &fp, b"x", 1 << 20)).expect("send");
    match s.recv() {
        Err(NetError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::Forbidden);
            assert!(e.message.contains("pull_from"), "{}", e.message);
        }
        other => panic!("pull from an unlisted host: {other:?}"),
    }
    // A destination outside the module, and a bogus chunk size.
    for bad in [&b"../outside"[..], b"/etc", b"out/../../outside", b".x.tern.tmp"] {
        assert_eq!(
            refused(&mut s, pull(&st, "127.0.0.1", &fp, bad, 1 << 20)),
            ErrorCode::Forbidden
        );
    }
    assert_eq!(
        refused(&mut s, pull(&st, "127.0.0.1", &fp, b"x", 3)),
        ErrorCode::Protocol
    );
    // A source showing another key than the client saw is not used.
    let wrong = format!("b3:{}", "0".repeat(64));
    s.send(&pull(&st, "127.0.0.1", &wrong, b"x", 1 << 20)).expect("send");
    match s.recv() {
        Err(NetError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert!(e.message.contains("cannot reach the source"), "{}", e.message);
        }
        other => panic!("pull from a source with another key: {other:?}"),
    }
    assert!(!st.root.join("module/x").exists());
    st.outside_untouched();
}

#[test]
fn bench_requests_are_bounded_and_store_nothing() {
    let st = setup();
    let mut s = st.session("data", RO_TOKEN, false).expect("session");
    let too_much = Msg::Bench {
        upload: false,
        bytes: tern_proto::BENCH_MAX_BYTES + 1,
    };
    assert_eq!(refused(&mut s, too_much), ErrorCode::Protocol);
    // A download in whole and partial blocks, then the stream still serves.
    let bytes = tern_proto::BENCH_BLOCK as u64 + 5;
    s.send(&Msg::Bench { upload: false, bytes }).expect("send");
    let mut buf = vec![0u8; tern_proto::BENCH_BLOCK];
    s.recv_data(&mut buf).expect("first block");
    s.recv_data(&mut buf[..5]).expect("tail");
    assert!(matches!(s.recv().expect("done"), Msg::Done));
    // An upload is acknowledged once all its bytes have arrived.
    s.send(&Msg::Bench {
        upload: true,
        bytes: 10,
    })
    .expect("send");
    s.send_data(&[1u8; 10]).expect("data");
    s.flush().expect("flush");
    assert!(matches!(s.recv().expect("done"), Msg::Done));
    s.send(&Msg::Stat { path: b"sub".to_vec() }).expect("send");
    assert!(matches!(s.recv().expect("stat"), Msg::StatReply(Some(_))));
    let names: Vec<_> = fs::read_dir(st.root.join("module"))
        .expect("list")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names.len(), 2, "bench stored something: {names:?}");
    st.outside_untouched();
}

#[test]
fn a_chunk_whose_bytes_do_not_match_its_hash_is_not_written_or_published() {
    let st = setup();
    let mut s = st.session("data", TOKEN, true).expect("session");
    create(&mut s, 1, b"f");
    // The hash announces "abc"; one bit of the bytes flipped on the way.
    s.send(&Msg::Write(tern_proto::WriteChunk {
        handle: 1,
        index: 0,
        offset: 0,
        len: 3,
        holes: Vec::new(),
        cv: *blake3::hash(b"abc").as_bytes(),
    }))
    .expect("send");
    s.send_data(b"abb").expect("data");
    let publish = Msg::Publish { handle: 1, writes: 1 };
    s.send(&publish).expect("send");
    match s.recv() {
        Err(NetError::Remote(e)) => assert!(e.message.contains("corrupted"), "{}", e.message),
        other => panic!("a corrupted chunk was published: {other:?}"),
    }
    assert!(!st.root.join("module/f").exists(), "corrupted file at its final name");
    st.outside_untouched();
}

#[test]
fn replayed_and_truncated_handshakes_are_refused() {
    use std::io::{Read, Write};
    let st = setup();
    let addr = st.daemon.as_ref().expect("daemon").addrs()[0];
    // Half a TLS ClientHello, then silence on the write side: the daemon
    // hangs up rather than wait for the rest.
    let mut raw = std::net::TcpStream::connect(addr).expect("connect");
    raw.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03])
        .expect("write");
    raw.shutdown(std::net::Shutdown::Write).expect("shutdown");
    raw.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let mut rest = Vec::new();
    if let Err(e) = raw.read_to_end(&mut rest) {
        assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "the daemon kept a truncated handshake open"
        );
    }

    // A Hello and then the end of the stream: answered, then closed.
    let mut s = st.stream(Transport::Tcp);
    s.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    s.finish().expect("finish");
    assert!(matches!(s.recv(), Ok(Msg::Hello(_))));
    assert!(s.recv().is_err(), "a stream without Auth or Join was served");

    // An Auth replayed on a stream already logged in ends that stream.
    let mut s = st.session("data", TOKEN, true).expect("session");
    let again = Msg::Auth(Auth {
        module: "data".into(),
        token: Some(TOKEN.into()),
        write: true,
    });
    s.send(&again).expect("send");
    assert!(s.recv().is_err(), "a second Auth was accepted");

    // Joining a live session needs its secret: the id alone is refused.
    let mut s = st.stream(Transport::Tcp);
    s.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    s.send(&Msg::Auth(Auth {
        module: "data".into(),
        token: Some(TOKEN.into()),
        write: false,
    }))
    .expect("send");
    assert!(matches!(s.recv(), Ok(Msg::Hello(_))));
    let Ok(Msg::Welcome(w)) = s.recv() else {
        panic!("no welcome")
    };
    let mut forged = w.secret;
    forged[0] ^= 1;
    let mut j = st.stream(Transport::Tcp);
    j.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    j.send(&Msg::Join {
        session: w.session,
        secret: forged,
    })
    .expect("send");
    assert!(matches!(j.recv(), Ok(Msg::Hello(_))));
    match j.recv() {
        Err(NetError::Remote(e)) => assert_eq!(e.code, ErrorCode::Unauthorized),
        other => panic!("a join with a wrong secret: {other:?}"),
    }
    // The real secret still joins, and the session still serves.
    let mut j = st.stream(Transport::Tcp);
    j.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    j.send(&Msg::Join {
        session: w.session,
        secret: w.secret,
    })
    .expect("send");
    assert!(matches!(j.recv(), Ok(Msg::Hello(_))));
    assert!(matches!(j.recv(), Ok(Msg::Welcome(_))), "the real secret was refused");
    j.send(&Msg::Stat { path: b"sub".to_vec() }).expect("send");
    assert!(matches!(j.recv(), Ok(Msg::StatReply(Some(_)))));
    st.outside_untouched();
}

#[test]
fn a_directory_swapped_for_a_symlink_mid_transfer_leads_nowhere_outside() {
    let st = setup();
    let module = st.root.join("module");
    fs::write(module.join("sub/f"), b"inside").expect("write");
    fs::write(st.root.join("outside/f"), b"outside").expect("write");
    let mut s = st.session("data", TOKEN, true).expect("session");
    // The client looks at sub/f and starts a write in sub, as a transfer
    // would ...
    let entry = stat_entry(&mut s, b"sub/f");
    create(&mut s, 1, b"sub/new");
    // ... then `sub` becomes a symlink to the outside directory, which has
    // an `f` too.
    fs::rename(module.join("sub"), module.join("sub-moved")).expect("rename");
    symlink(st.root.join("outside"), module.join("sub")).expect("symlink");

    // Reads, listings, new files, links and removals through it are refused.
    s.send(&Msg::OpenRead {
        handle: 2,
        path: b"sub/f".to_vec(),
        expect: entry,
    })
    .expect("send");
    assert!(s.recv().is_err(), "a file was opened through the swapped symlink");
    let mut s = st.session("data", TOKEN, true).expect("session");
    refused(&mut s, Msg::ReadDir { path: b"sub".to_vec() });
    refused(
        &mut s,
        Msg::Stat {
            path: b"sub/f".to_vec(),
        },
    );
    refused(
        &mut s,
        Msg::Create {
            handle: 3,
            path: b"sub/planted".to_vec(),
            spec: spec(),
        },
    );
    refused(
        &mut s,
        Msg::MakeDir {
            path: b"sub/d".to_vec(),
        },
    );
    refused(
        &mut s,
        Msg::Remove {
            path: b"sub/f".to_vec(),
        },
    );
    refused(
        &mut s,
        Msg::HardLink {
            existing: b"sub/f".to_vec(),
            path: b"stolen".to_vec(),
        },
    );
    assert!(!module.join("stolen").exists());
    assert_eq!(fs::read(st.root.join("outside/f")).expect("read"), b"outside");
    let names: Vec<_> = fs::read_dir(st.root.join("outside"))
        .expect("list")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names.len(), 2, "something was planted outside: {names:?}");
}

#[test]
fn open_files_are_bounded_per_client_and_for_the_whole_daemon() {
    // 16 descriptors for transfers; a resumable file being written holds
    // 3 (file, directory, journal), a small file of a batch 2. Requests
    // wait a quarter of the idle timeout for descriptors.
    let st = setup_with(|c| {
        c.limits.open_files = Some(16);
        c.limits.idle = Duration::from_secs(4);
    });
    let mut a = st.session("data", TOKEN, true).expect("session");

    // One client's open files may hold half the budget: two files, and
    // a third waits, then is refused with the reason.
    for h in 1..=2 {
        create(&mut a, h, format!("open-{h}").as_bytes());
    }
    let third = Msg::Create {
        handle: 3,
        path: b"open-3".to_vec(),
        spec: spec(),
    };
    let e = refusal(&mut a, &third);
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(
        e.message.contains("this client's open files hold 8 descriptors"),
        "{}",
        e.message
    );

    // Thirty small files in one batch from that same client, while its
    // open files hold their share: written in groups of at most half the
    // budget, every one lands, and a symlink among them too.
    let file = |i: usize| BatchItem {
        path: format!("batch-{i}").into_bytes(),
        meta: WireMeta {
            mode: 0o644,
            ..WireMeta::default()
        },
        body: BatchBody::File {
            size: 3,
            holes: Vec::new(),
            hash: *blake3::hash(b"abc").as_bytes(),
            xattrs: Vec::new(),
            changed: (0, 0),
        },
    };
    let mut items: Vec<BatchItem> = (0..30).map(file).collect();
    items.insert(
        10,
        BatchItem {
            path: b"batch-link".to_vec(),
            meta: WireMeta::default(),
            body: BatchBody::Symlink {
                target: b"batch-0".to_vec(),
            },
        },
    );
    a.send(&Msg::Batch(Batch {
        items,
        owner: false,
        sync: true,
        verify: false,
    }))
    .expect("send");
    for _ in 0..30 {
        a.send_data(b"abc").expect("data");
    }
    match a.recv().expect("reply") {
        Msg::BatchReply(r) => assert!(r.len() == 31 && r.iter().all(Option::is_none), "{r:?}"),
        m => panic!("unexpected {m:?}"),
    }
    for i in 0..30 {
        assert_eq!(
            fs::read(st.root.join(format!("module/batch-{i}"))).expect("read"),
            b"abc"
        );
    }
    assert_eq!(
        fs::read_link(st.root.join("module/batch-link")).expect("link"),
        std::path::Path::new("batch-0")
    );

    // A file given back makes room for the client's next one.
    a.send(&Msg::Abort { handle: 1, keep: false }).expect("send");
    create(&mut a, 3, b"open-3");
    // Two more clients: the second finds the daemon's budget spent (a
    // and b hold 6 each, c takes 3 of the 4 left), waits, and is refused.
    let mut b = st.session("data", TOKEN, true).expect("session");
    for h in 1..=2 {
        create(&mut b, h, format!("b-open-{h}").as_bytes());
    }
    let mut c = st.session("data", TOKEN, true).expect("session");
    create(&mut c, 1, b"c-open-1");
    let e = refusal(
        &mut c,
        &Msg::Create {
            handle: 2,
            path: b"c-open-2".to_vec(),
            spec: spec(),
        },
    );
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(
        e.message.contains("the daemon has no file descriptor free"),
        "{}",
        e.message
    );
    // Once b is gone, its descriptors serve c (each try waits up to 1 s
    // for the daemon to see b's connection close).
    drop(b);
    let again = Msg::Create {
        handle: 2,
        path: b"c-open-2".to_vec(),
        spec: spec(),
    };
    for attempt in 1.. {
        c.send(&again).expect("send");
        match c.recv() {
            Ok(Msg::Created { .. }) => break,
            Err(NetError::Remote(e)) if e.code == ErrorCode::Unavailable && attempt < 30 => {}
            other => panic!("b's descriptors never came back: {other:?}"),
        }
    }
    st.outside_untouched();
}

/// Writes `bytes` as file `path` through Create, one Write and Publish.
fn push_file(s: &mut Stream, handle: u64, path: &[u8], bytes: &[u8]) -> Result<Msg, NetError> {
    s.send(&Msg::Create {
        handle,
        path: path.to_vec(),
        spec: WireSpec {
            size: bytes.len() as u64,
            ..spec()
        },
    })?;
    s.recv()?;
    s.send(&Msg::Write(tern_proto::WriteChunk {
        handle,
        index: 0,
        offset: 0,
        len: bytes.len() as u64,
        holes: Vec::new(),
        cv: *blake3::hash(bytes).as_bytes(),
    }))?;
    s.send_data(bytes)?;
    s.send(&Msg::Publish { handle, writes: 1 })?;
    s.recv()
}

#[test]
fn fifos_devices_and_planted_hard_links_are_never_read_or_written_through() {
    use std::os::unix::fs::MetadataExt;
    let st = setup();
    let module = st.root.join("module");
    let c = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: valid C strings.
    assert_eq!(
        unsafe { libc::mkfifo(c(&module.join("pipe")).as_ptr(), 0o666) },
        0,
        "mkfifo"
    );
    // A character device (the kernel's null device) where root may make one.
    // SAFETY: as above.
    let dev = unsafe {
        libc::mknod(
            c(&module.join("null")).as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    } == 0;
    if !dev {
        eprintln!("not testing a device node: mknod needs root");
    }
    // A hard link planted (by someone with access to both) to a file
    // outside the module.
    fs::hard_link(st.root.join("outside/secret"), module.join("victim")).expect("link");

    let mut s = st.session("data", TOKEN, true).expect("session");
    let mut specials = vec![&b"pipe"[..]];
    if dev {
        specials.push(b"null");
    }
    for name in specials {
        let e = stat_entry(&mut s, name);
        assert_eq!(e.kind, tern_proto::WireKind::Special, "{name:?}");
        // Looked at before being opened: a FIFO would block on its writer,
        // a device would be read for real. Not a file as listed, so
        // "changed".
        let open = Msg::OpenRead {
            handle: 1,
            path: name.to_vec(),
            expect: e.clone(),
        };
        assert_eq!(refused(&mut s, open), ErrorCode::Changed, "{name:?}");
        let hash = Msg::Hash {
            path: name.to_vec(),
            expect: e,
        };
        assert_eq!(refused(&mut s, hash), ErrorCode::Changed, "{name:?}");
        // A client allowed to write the name replaces the entry; nothing is
        // written into the FIFO or the device.
        assert!(matches!(push_file(&mut s, 2, name, b"data"), Ok(Msg::Done)), "{name:?}");
        let path = module.join(String::from_utf8_lossy(name).as_ref());
        assert!(fs::symlink_metadata(&path).expect("stat").is_file(), "{name:?}");
        assert_eq!(fs::read(&path).expect("read"), b"data");
    }
    // Writing the planted name replaces the link with a new file: the
    // file outside keeps its bytes, and loses the link.
    assert!(matches!(push_file(&mut s, 3, b"victim", b"replaced"), Ok(Msg::Done)));
    assert_eq!(fs::read(module.join("victim")).expect("read"), b"replaced");
    assert_eq!(fs::metadata(st.root.join("outside/secret")).expect("stat").nlink(), 1);
    st.outside_untouched();
}

/// Paths or names, as bytes.
type Names = Vec<Vec<u8>>;

/// Reads a walk's answer to its end: the directories listed, those that
/// failed, and every name seen.
fn walk_answer(s: &mut Stream) -> (Names, Names, Names) {
    let (mut dirs, mut failed, mut names) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        match s.recv().expect("walk reply") {
            Msg::Listing { dir, entries, more } => {
                names.extend(entries.into_iter().map(|e| e.name));
                if !more {
                    dirs.push(dir);
                }
            }
            Msg::ListingFailed { dir, .. } => failed.push(dir),
            Msg::WalkDone => return (dirs, failed, names),
            m => panic!("unexpected in a walk: {m:?}"),
        }
    }
}

fn walk(path: &[u8], from: &[u8]) -> Msg {
    Msg::Walk(tern_proto::Walk {
        path: path.to_vec(),
        rules: Vec::new(),
        prefix: Vec::new(),
        from: from.to_vec(),
    })
}

#[test]
fn pipelined_requests_stay_inside_the_module() {
    let st = setup();
    fs::write(st.root.join("module/sub/f"), b"abc").expect("write");
    let mut session = st.session("data", TOKEN, true).expect("session");
    let s = &mut session;
    // A walk lists the module and never follows the symlink out of it.
    s.send(&walk(b"", b"")).expect("send");
    let (dirs, failed, names) = walk_answer(s);
    assert_eq!(dirs, vec![b"".to_vec(), b"sub".to_vec()]);
    assert!(failed.is_empty());
    assert!(
        names.contains(&b"out".to_vec()) && !names.contains(&b"secret".to_vec()),
        "{names:?}"
    );
    // Resumed from `sub`: the root is passed over, `sub` still listed.
    s.send(&walk(b"", b"sub")).expect("send");
    assert_eq!(walk_answer(s).0, vec![b"sub".to_vec()]);
    // A walk through the symlink lists nothing; one above the root is refused.
    s.send(&walk(b"out", b"")).expect("send");
    let (dirs, failed, names) = walk_answer(s);
    assert!(dirs.is_empty() && failed == vec![b"".to_vec()] && names.is_empty());
    assert_eq!(refused(s, walk(b"..", b"")), ErrorCode::Forbidden);

    // Batched reads and hashes: each escaping path fails alone, the real
    // file is answered, and the stream stays in step.
    let f = stat_entry(s, b"sub/f");
    let items: Vec<_> = [&b"out/secret"[..], b"../outside/secret", b"sub/f"]
        .iter()
        .map(|p| {
            let mut e = f.clone();
            e.name = b"x".to_vec();
            (p.to_vec(), e)
        })
        .collect();
    s.send(&Msg::ReadFiles {
        items: items.clone(),
        xattrs: false,
    })
    .expect("send");
    for _ in 0..2 {
        assert!(matches!(s.recv().expect("reply"), Msg::FileFailed(_)));
    }
    match s.recv().expect("reply") {
        Msg::FileData { size, hash, .. } => {
            assert_eq!(size, 3);
            assert_eq!(hash, *blake3::hash(b"abc").as_bytes());
            let mut got = [0u8; 3];
            s.recv_data(&mut got).expect("data");
            assert_eq!(&got, b"abc");
        }
        m => panic!("sub/f not read: {m:?}"),
    }
    s.send(&Msg::HashFiles { items }).expect("send");
    match s.recv().expect("reply") {
        Msg::Hashes(h) => {
            assert!(matches!(h[0], tern_proto::HashOutcome::Failed(_)));
            assert!(matches!(h[1], tern_proto::HashOutcome::Failed(_)));
            assert_eq!(h[2], tern_proto::HashOutcome::Hash(*blake3::hash(b"abc").as_bytes()));
        }
        m => panic!("unexpected {m:?}"),
    }
    // Committing a handle that was never created is refused.
    let commit = Msg::Commit(tern_proto::Commit {
        handle: 99,
        writes: 0,
        meta: WireMeta::default(),
        owner: false,
        xattrs: Vec::new(),
        sync: false,
        verify: None,
    });
    assert_eq!(refused(s, commit), ErrorCode::Protocol);
    st.outside_untouched();
}

#[test]
fn queued_changes_keep_the_grant_and_their_failures_and_wait_boundedly() {
    let st = setup_with(|c| c.limits.idle = Duration::from_secs(1));
    // Read-only: queued changes are refused, each failure kept with its
    // path for the settle, nothing made.
    let mut ro = st.session("data", RO_TOKEN, false).expect("session");
    ro.send(&Msg::OpsStream).expect("send");
    ro.send(&Msg::MakeDir { path: b"made".to_vec() }).expect("send");
    ro.send(&Msg::Remove { path: b"sub".to_vec() }).expect("send");
    ro.send(&Msg::MakeDir {
        path: b"../outside/x".to_vec(),
    })
    .expect("send");
    ro.send(&Msg::Settle).expect("send");
    match ro.recv().expect("settled") {
        Msg::Settled { failed, more } => {
            let paths: Vec<_> = failed.iter().map(|(p, _)| p.clone()).collect();
            assert_eq!(paths, vec![b"made".to_vec(), b"sub".to_vec(), b"../outside/x".to_vec()]);
            assert!(failed.iter().all(|(_, e)| e.code == ErrorCode::Forbidden));
            assert_eq!(more, 0);
        }
        m => panic!("unexpected {m:?}"),
    }
    assert!(!st.root.join("module/made").exists() && st.root.join("module/sub").is_dir());
    // Read-write: queued changes apply; one escaping the module fails.
    let mut rw = st.session("data", TOKEN, true).expect("session");
    rw.send(&Msg::OpsStream).expect("send");
    rw.send(&Msg::MakeDir { path: b"made".to_vec() }).expect("send");
    rw.send(&Msg::MakeDir {
        path: b"out/x".to_vec(),
    })
    .expect("send");
    rw.send(&Msg::Settle).expect("send");
    match rw.recv().expect("settled") {
        Msg::Settled { failed, .. } => assert_eq!(failed.len(), 1, "{failed:?}"),
        m => panic!("unexpected {m:?}"),
    }
    assert!(st.root.join("module/made").is_dir());
    // Waiting for queued changes that never come ends at the idle timeout,
    // with an error, not a hang.
    let mut other = st.session("data", TOKEN, true).expect("session");
    other.send(&Msg::After { ops: 1_000 }).expect("send");
    other.send(&Msg::Stat { path: Vec::new() }).expect("send");
    match other.recv() {
        Err(NetError::Remote(e)) => assert!(e.message.contains("never received"), "{e:?}"),
        r => panic!("a wait for changes never sent ended with {r:?}"),
    }
    st.outside_untouched();
}

/// Whether this process is root, as the tests of what a root daemon does
/// need. CI runs as root: there, not being root fails the test rather
/// than letting it pass unchecked; elsewhere it is skipped with a note.
fn running_as_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{test} checks what a root daemon does and must run as root under CI"
    );
    eprintln!("{test}: skipped (not root)");
    false
}

/// A file capability (VFS_CAP_REVISION_2, effective) granting
/// CAP_NET_BIND_SERVICE.
const FILE_CAP: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// What a hostile client asks for: root's set-id program with a capability.
fn privileged_meta() -> WireMeta {
    WireMeta {
        mode: 0o6755,
        uid: 0,
        gid: 0,
        ..WireMeta::default()
    }
}

fn privileged_xattrs() -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b"security.capability".to_vec(), FILE_CAP.to_vec()),
        (b"trusted.planted".to_vec(), b"1".to_vec()),
        (b"user.kept".to_vec(), b"1".to_vec()),
    ]
}

/// Mode, owner, group and extended attribute names of `p` (not followed).
fn on_disk(p: &std::path::Path) -> (u32, u32, u32, Vec<String>) {
    use std::os::unix::fs::MetadataExt;
    use tern_core::Source;
    let md = fs::symlink_metadata(p).expect("stat");
    let mut names: Vec<String> = if md.file_type().is_symlink() {
        Vec::new()
    } else {
        tern_core::LocalEndpoint::new(p)
            .xattrs(std::path::Path::new(""))
            .expect("xattrs")
            .into_iter()
            .map(|(n, _)| n.to_string_lossy().into_owned())
            .collect()
    };
    names.sort();
    (md.mode() & 0o7777, md.uid(), md.gid(), names)
}

/// Uploads "abc" to `path` as `handle` and commits it with `meta`, owners
/// kept and `xattrs`.
fn upload(s: &mut Stream, handle: u64, path: &[u8], meta: WireMeta, xattrs: Vec<(Vec<u8>, Vec<u8>)>) {
    create_abc(s, handle, path);
    s.send(&Msg::Commit(tern_proto::Commit {
        handle,
        writes: 1,
        meta,
        owner: true,
        xattrs,
        sync: false,
        verify: None,
    }))
    .expect("send");
    assert!(matches!(s.recv().expect("commit"), Msg::Done), "{path:?} not committed");
}

/// Creates `path` as `handle` and writes "abc" into it.
fn create_abc(s: &mut Stream, handle: u64, path: &[u8]) {
    create(s, handle, path);
    s.send(&Msg::Write(tern_proto::WriteChunk {
        handle,
        index: 0,
        offset: 0,
        len: 3,
        holes: Vec::new(),
        cv: *blake3::hash(b"abc").as_bytes(),
    }))
    .expect("send");
    s.send_data(b"abc").expect("data");
}

/// Sends `req` and expects `Done`.
fn done(s: &mut Stream, req: Msg) {
    s.send(&req).expect("send");
    match s.recv() {
        Ok(Msg::Done) => {}
        other => panic!("{req:?}: {other:?}"),
    }
}

fn set_meta(path: &[u8], kind: tern_proto::WireKind, xattrs: Option<Vec<(Vec<u8>, Vec<u8>)>>) -> Msg {
    Msg::SetMeta {
        path: path.to_vec(),
        kind,
        meta: privileged_meta(),
        owner: true,
        xattrs,
    }
}

#[test]
fn a_root_daemon_publishes_no_set_id_root_owned_or_capable_file() {
    if !running_as_root("a_root_daemon_publishes_no_set_id_root_owned_or_capable_file") {
        return;
    }
    let st = setup();
    let m = st.root.join("module");
    // The module root belongs to root: what 0 becomes is nobody.
    let nobody = 65534;
    let plain_file = (0o755, nobody, nobody, vec!["user.kept".to_string()]);
    let mut s = st.session("data", TOKEN, true).expect("session");

    // Create + Write + Commit.
    upload(&mut s, 1, b"up", privileged_meta(), privileged_xattrs());
    assert_eq!(on_disk(&m.join("up")), plain_file, "committed upload");

    // Create + Write + FileMeta + Publish.
    create_abc(&mut s, 2, b"meta");
    done(
        &mut s,
        Msg::FileMeta {
            handle: 2,
            writes: 1,
            meta: privileged_meta(),
            owner: true,
            xattrs: privileged_xattrs(),
        },
    );
    done(&mut s, Msg::Publish { handle: 2, writes: 1 });
    assert_eq!(on_disk(&m.join("meta")), plain_file, "FileMeta upload");

    // A batch of a small file and a symlink, owners kept.
    s.send(&Msg::Batch(Batch {
        items: vec![
            BatchItem {
                path: b"batched".to_vec(),
                meta: privileged_meta(),
                body: BatchBody::File {
                    size: 3,
                    holes: Vec::new(),
                    hash: *blake3::hash(b"abc").as_bytes(),
                    xattrs: privileged_xattrs(),
                    changed: (0, 0),
                },
            },
            BatchItem {
                path: b"batched-link".to_vec(),
                meta: privileged_meta(),
                body: BatchBody::Symlink {
                    target: b"batched".to_vec(),
                },
            },
        ],
        owner: true,
        sync: false,
        verify: false,
    }))
    .expect("send");
    s.send_data(b"abc").expect("data");
    match s.recv().expect("reply") {
        Msg::BatchReply(r) => assert!(r.iter().all(Option::is_none), "{r:?}"),
        m => panic!("unexpected {m:?}"),
    }
    assert_eq!(on_disk(&m.join("batched")), plain_file, "batched file");
    let link = on_disk(&m.join("batched-link"));
    assert_eq!((link.1, link.2), (nobody, nobody), "batched symlink");

    // A symlink of its own, and a directory made then given metadata.
    done(
        &mut s,
        Msg::Symlink {
            path: b"link".to_vec(),
            target: b"up".to_vec(),
            meta: privileged_meta(),
            owner: true,
        },
    );
    let link = on_disk(&m.join("link"));
    assert_eq!((link.1, link.2), (nobody, nobody), "symlink");
    done(&mut s, Msg::MakeDir { path: b"dir".to_vec() });
    assert_eq!(on_disk(&m.join("dir")).1, nobody, "new directory");
    done(
        &mut s,
        set_meta(b"dir", tern_proto::WireKind::Dir, Some(privileged_xattrs())),
    );
    // A directory keeps set-group-id (group inheritance), never set-user-id.
    assert_eq!(
        on_disk(&m.join("dir")),
        (0o2755, nobody, nobody, vec!["user.kept".to_string()]),
        "directory"
    );

    // An existing file of root's, changed with SetMeta.
    fs::write(m.join("existing"), b"x").expect("write");
    done(
        &mut s,
        set_meta(b"existing", tern_proto::WireKind::File, Some(privileged_xattrs())),
    );
    assert_eq!(on_disk(&m.join("existing")), plain_file, "SetMeta");

    // The module root is not the client's, on either way of sending it.
    let before = on_disk(&m);
    let e = refusal(
        &mut s,
        &set_meta(b"", tern_proto::WireKind::Dir, Some(privileged_xattrs())),
    );
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.message.contains("root"), "{}", e.message);
    s.send(&Msg::OpsStream).expect("send");
    s.send(&set_meta(b"", tern_proto::WireKind::Dir, None)).expect("send");
    s.send(&Msg::Settle).expect("send");
    match s.recv().expect("settled") {
        Msg::Settled { failed, .. } => {
            assert!(
                failed.len() == 1 && failed[0].1.code == ErrorCode::Forbidden,
                "{failed:?}"
            )
        }
        m => panic!("unexpected {m:?}"),
    }
    assert_eq!(on_disk(&m), before, "module root changed");
    st.outside_untouched();
}

#[test]
fn a_read_only_client_sees_only_the_xattrs_its_module_allows() {
    if !running_as_root("a_read_only_client_sees_only_the_xattrs_its_module_allows") {
        return;
    }
    use tern_core::Dest;
    let st = setup();
    let f = st.root.join("module/labelled");
    fs::write(&f, b"abc").expect("write");
    let x: tern_core::Xattrs = vec![
        ("trusted.secret".into(), b"s".to_vec()),
        ("user.public".into(), b"p".to_vec()),
    ];
    let meta = tern_core::Meta {
        mode: 0o644,
        ..tern_core::Meta::default()
    };
    tern_core::LocalEndpoint::new(&f)
        .set_meta(std::path::Path::new(""), tern_core::Kind::File, &meta, false, Some(&x))
        .expect("label");
    assert_eq!(on_disk(&f).3, vec!["trusted.secret", "user.public"]);

    let mut s = st.session("data", RO_TOKEN, false).expect("session");
    let names = |x: &[(Vec<u8>, Vec<u8>)]| -> Vec<Vec<u8>> { x.iter().map(|(n, _)| n.clone()).collect() };
    s.send(&Msg::Xattrs {
        path: b"labelled".to_vec(),
    })
    .expect("send");
    match s.recv().expect("reply") {
        Msg::XattrList(x) => assert_eq!(names(&x), vec![b"user.public".to_vec()]),
        m => panic!("unexpected {m:?}"),
    }
    let expect = stat_entry(&mut s, b"labelled");
    s.send(&Msg::ReadFiles {
        items: vec![(b"labelled".to_vec(), expect)],
        xattrs: true,
    })
    .expect("send");
    match s.recv().expect("reply") {
        Msg::FileData { xattrs, .. } => {
            assert_eq!(names(&xattrs), vec![b"user.public".to_vec()]);
            let mut got = [0u8; 3];
            s.recv_data(&mut got).expect("data");
        }
        m => panic!("unexpected {m:?}"),
    }
}

#[test]
fn a_module_may_allow_set_id_root_owners_and_privileged_xattrs_or_fix_the_owner() {
    if !running_as_root("a_module_may_allow_set_id_root_owners_and_privileged_xattrs_or_fix_the_owner") {
        return;
    }
    // Opted in: what the client asks is applied, capability and all (so
    // the test above would see them if the daemon let them through).
    let st = setup_with(|c| {
        let m = c.modules.get_mut("data").expect("module");
        m.setid = true;
        m.root_owner = true;
        m.xattrs = vec!["user".into(), "trusted".into(), "security".into()];
    });
    let mut s = st.session("data", TOKEN, true).expect("session");
    upload(&mut s, 1, b"up", privileged_meta(), privileged_xattrs());
    assert_eq!(
        on_disk(&st.root.join("module/up")),
        (
            0o6755,
            0,
            0,
            vec![
                "security.capability".into(),
                "trusted.planted".into(),
                "user.kept".into()
            ]
        )
    );
    s.send(&Msg::Xattrs { path: b"up".to_vec() }).expect("send");
    assert!(matches!(s.recv().expect("reply"), Msg::XattrList(x) if x.len() == 3));

    // A fixed owner: everything written gets it, whatever the client asks.
    let st = setup_with(|c| {
        let m = c.modules.get_mut("data").expect("module");
        m.uid = Some(4321);
        m.gid = Some(4322);
    });
    // Clients are told owners are not theirs to choose.
    let mut w = st.stream(Transport::Tcp);
    w.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    w.send(&Msg::Auth(Auth {
        module: "data".into(),
        token: Some(TOKEN.into()),
        write: true,
    }))
    .expect("send");
    assert!(matches!(w.recv().expect("hello"), Msg::Hello(_)));
    assert!(matches!(w.recv().expect("welcome"), Msg::Welcome(w) if !w.can_chown));
    let mut s = st.session("data", TOKEN, true).expect("session");
    let asked = WireMeta {
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        ..WireMeta::default()
    };
    upload(&mut s, 1, b"up", asked, Vec::new());
    done(&mut s, Msg::MakeDir { path: b"dir".to_vec() });
    done(
        &mut s,
        Msg::Symlink {
            path: b"link".to_vec(),
            target: b"up".to_vec(),
            meta: WireMeta::default(),
            owner: false,
        },
    );
    for name in ["up", "dir", "link"] {
        let (_, uid, gid, _) = on_disk(&st.root.join("module").join(name));
        assert_eq!((uid, gid), (4321, 4322), "{name}");
    }
}
