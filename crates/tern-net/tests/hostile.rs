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
    Auth, Batch, BatchBody, BatchItem, ErrorCode, Hello, Msg, PullRequest, PullSource, RunOptions, Ticket, WireMeta,
    WireSpec,
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
    // The daemon may pull from itself, and lets its own key read `data`
    // (with a ticket), so that it can play both daemons of a pull.
    let id = Identity::load_or_create(&cfg.state_dir).expect("identity");
    cfg.pull_from.push(PullPeer {
        host: "127.0.0.1".into(),
        port: None,
        fingerprint: id.fingerprint(),
    });
    cfg.grants.push(Grant {
        token_hash: None,
        client: Some(id.fingerprint()),
        modules: vec!["data".into()],
        access: Access::Read,
    });
    change(&mut cfg);
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
    /// The daemon's key fingerprint.
    fn fingerprint(&self) -> String {
        Identity::load_or_create(&self.root.join("state"))
            .expect("identity")
            .fingerprint()
    }

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
        let theirs = match s.recv()? {
            Msg::Hello(h) => h,
            m => panic!("unexpected {m:?}"),
        };
        // As a client does: compressed both ways (always, as this Hello
        // asks), so every request here also crosses in containers.
        s.agree(theirs.features & tern_proto::FEATURES, Default::default());
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

/// Opens `path` for reading as `handle`; the daemon must accept.
fn open_read(s: &mut Stream, handle: u64, path: &[u8]) {
    let expect = stat_entry(s, path);
    s.send(&Msg::OpenRead {
        handle,
        path: path.to_vec(),
        expect,
    })
    .expect("send");
    assert!(matches!(s.recv().expect("open"), Msg::Done), "{path:?} not opened");
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
    open_read(&mut s, 1, b"sub/f");
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

/// A ticket from a session on `data`, for the daemon's own key to read
/// `sub`.
fn ticket(st: &Setup, s: &mut Stream) -> Ticket {
    s.send(&Msg::GrantTicket {
        holder: st.fingerprint(),
        path: b"sub".to_vec(),
    })
    .expect("send");
    match s.recv().expect("ticket") {
        Msg::TicketReply(t) => t,
        m => panic!("unexpected {m:?}"),
    }
}

fn pull_request(
    st: &Setup,
    host: &str,
    fingerprint: &str,
    dst_rel: &[u8],
    chunk_size: u64,
    check: bool,
) -> PullRequest {
    let port = st.daemon.as_ref().expect("daemon").addrs()[0].port();
    PullRequest {
        sources: vec![PullSource {
            host: host.into(),
            port,
            module: "data".into(),
            path: b"sub".to_vec(),
            fingerprint: fingerprint.into(),
            dst_rel: dst_rel.to_vec(),
        }],
        opts: RunOptions {
            check,
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
    }
}

fn pull(st: &Setup, t: &Ticket, host: &str, dst_rel: &[u8], chunk_size: u64) -> Msg {
    Msg::PullTicketed {
        req: Box::new(pull_request(st, host, &st.fingerprint(), dst_rel, chunk_size, false)),
        tickets: vec![t.clone()],
    }
}

/// The refusal a pull got, which must come before anything is written.
fn pull_refusal(s: &mut Stream, req: Msg) -> tern_proto::ErrorMsg {
    s.send(&req).expect("send");
    loop {
        match s.recv() {
            Err(NetError::Remote(e)) => return e,
            Ok(Msg::RunEvent(_)) => {}
            other => panic!("the pull was not refused: {other:?}"),
        }
    }
}

/// Issue 13, finding 1: a pull is run only for a client that may write
/// here and proves, with a ticket from the source, that it may read there;
/// the source is pinned by this daemon's configuration, not the client.
#[test]
fn pull_requests_outside_what_the_daemon_allows_are_refused() {
    let st = setup();
    let mut ro = st.session("data", RO_TOKEN, false).expect("read session");
    let t = ticket(&st, &mut ro);
    // A read-only client may not make the daemon read elsewhere, not even
    // for a check (which once listed the source's tree to it).
    let check = Msg::PullTicketed {
        req: Box::new(pull_request(&st, "127.0.0.1", &st.fingerprint(), b"x", 1 << 20, true)),
        tickets: vec![t.clone()],
    };
    let e = pull_refusal(&mut ro, check);
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.message.contains("read-write grant"), "{}", e.message);

    let mut s = st.session("data", TOKEN, true).expect("session");
    // The request of clients before tickets is refused, saying why.
    let old = Msg::Pull(Box::new(pull_request(
        &st,
        "127.0.0.1",
        &st.fingerprint(),
        b"x",
        1 << 20,
        false,
    )));
    let e = pull_refusal(&mut s, old);
    assert!(e.message.contains("tickets"), "{}", e.message);
    // Not in pull_from: refused before any connection is made.
    let e = pull_refusal(&mut s, pull(&st, &t, "10.255.255.1", b"x", 1 << 20));
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.message.contains("pull_from"), "{}", e.message);
    // A destination outside the module, and a bogus chunk size.
    for bad in [&b"../outside"[..], b"/etc", b"out/../../outside", b".x.tern.tmp"] {
        assert_eq!(
            pull_refusal(&mut s, pull(&st, &t, "127.0.0.1", bad, 1 << 20)).code,
            ErrorCode::Forbidden
        );
    }
    assert_eq!(
        pull_refusal(&mut s, pull(&st, &t, "127.0.0.1", b"x", 3)).code,
        ErrorCode::Protocol
    );
    // The client's idea of the source's key does not override the pin.
    let wrong = format!("b3:{}", "0".repeat(64));
    let req = Msg::PullTicketed {
        req: Box::new(pull_request(&st, "127.0.0.1", &wrong, b"x", 1 << 20, false)),
        tickets: vec![t.clone()],
    };
    let e = pull_refusal(&mut s, req);
    assert!(e.message.contains("pins"), "{}", e.message);
    // A ticket the source did not grant, or granted for another module or
    // holder, is refused by the source: a client cannot make this daemon
    // read what only this daemon's key may read.
    let mut forged = t.clone();
    forged.path = b"".to_vec();
    forged.mac[0] ^= 1;
    let mut req = pull_request(&st, "127.0.0.1", &st.fingerprint(), b"x", 1 << 20, false);
    req.sources[0].path = Vec::new();
    let e = pull_refusal(
        &mut s,
        Msg::PullTicketed {
            req: Box::new(req),
            tickets: vec![forged],
        },
    );
    assert_eq!(e.code, ErrorCode::Unauthorized, "{}", e.message);
    assert!(e.message.contains("not granted by this daemon"), "{}", e.message);
    s.send(&Msg::GrantTicket {
        holder: format!("b3:{}", "1".repeat(64)),
        path: b"sub".to_vec(),
    })
    .expect("send");
    let Msg::TicketReply(other) = s.recv().expect("ticket") else {
        panic!("no ticket")
    };
    let e = pull_refusal(&mut s, pull(&st, &other, "127.0.0.1", b"x", 1 << 20));
    assert!(e.message.contains("is for the key"), "{}", e.message);
    assert!(!st.root.join("module/x").exists());

    // With its ticket the same pull runs.
    s.send(&pull(&st, &t, "127.0.0.1", b"copied", 1 << 20)).expect("send");
    loop {
        match s.recv().expect("pull") {
            Msg::RunEvent(_) => {}
            Msg::RunDone { summary_json, .. } => {
                assert!(summary_json.contains("\"errors\":0"), "{summary_json}");
                break;
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    assert!(st.root.join("module/copied").is_dir());
    st.outside_untouched();
}

/// Issue 13, finding 1: what a ticket opens is read-only and confined to
/// its path, for the key it names only.
#[test]
fn a_ticket_opens_only_its_path_read_only_for_its_holder() {
    let st = setup();
    fs::write(st.root.join("module/top"), b"top").expect("write");
    let mut s = st.session("data", TOKEN, true).expect("session");
    let t = ticket(&st, &mut s);
    let login = |s: &mut Stream, t: &Ticket, write: bool| {
        s.send(&Msg::Hello(Hello::ours("test"))).expect("send");
        s.send(&Msg::Login(tern_proto::Login {
            module: "data".into(),
            write,
            proof: None,
            ticket: Some(t.clone()),
        }))
        .expect("send");
        assert!(matches!(s.recv().expect("hello"), Msg::Hello(_)));
        s.recv()
    };
    // Presented by a client without the holder's key: refused.
    let mut anon = st.stream(Transport::Tcp);
    match login(&mut anon, &t, false) {
        Err(NetError::Remote(e)) => assert!(e.message.contains("is for the key"), "{}", e.message),
        other => panic!("a ticket without its key: {other:?}"),
    }
    // With the holder's key: read only, and only beneath `sub`.
    let id = Identity::load_or_create(&st.root.join("state")).expect("id");
    let mut held = stream_as(&st, Transport::Tcp, Some(&id), Duration::from_secs(10)).expect("connect");
    match login(&mut held, &t, true) {
        Err(NetError::Remote(e)) => assert!(e.message.contains("reading only"), "{}", e.message),
        other => panic!("a ticket to write: {other:?}"),
    }
    let mut held = stream_as(&st, Transport::Tcp, Some(&id), Duration::from_secs(10)).expect("connect");
    assert!(matches!(login(&mut held, &t, false), Ok(Msg::Welcome(w)) if !w.writable));
    stat_entry(&mut held, b"sub");
    for outside in [&b""[..], b"top", b"out", b"subx"] {
        assert_eq!(
            refused(&mut held, Msg::Stat { path: outside.to_vec() }),
            ErrorCode::Forbidden
        );
    }
    let e = refusal(&mut held, &walk(b"", b""));
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert_eq!(
        refused(
            &mut held,
            Msg::MakeDir {
                path: b"sub/new".to_vec()
            }
        ),
        ErrorCode::Forbidden
    );
    let e = refusal(
        &mut held,
        &Msg::GrantTicket {
            holder: st.fingerprint(),
            path: b"sub".to_vec(),
        },
    );
    assert!(e.message.contains("cannot grant"), "{}", e.message);
}

/// Issue 13, finding 1: pulls are capped (here at none).
#[test]
fn pulls_beyond_max_pulls_are_refused() {
    let st = setup_with(|c| c.limits.max_pulls = 0);
    let mut s = st.session("data", TOKEN, true).expect("session");
    let t = ticket(&st, &mut s);
    let e = pull_refusal(&mut s, pull(&st, &t, "127.0.0.1", b"x", 1 << 20));
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("max_pulls = 0"), "{}", e.message);
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

/// A raw connection with its own wait bound (the streams of
/// [`Setup::stream`] wait 10 s).
fn raw_stream(st: &Setup, kind: Transport, wait: Duration) -> Result<Stream, NetError> {
    stream_as(st, kind, None, wait)
}

/// A stream to the daemon, presenting `id` as the client key.
fn stream_as(st: &Setup, kind: Transport, id: Option<&Identity>, wait: Duration) -> Result<Stream, NetError> {
    let addr = st.daemon.as_ref().expect("daemon").addrs()[0];
    let tls = tern_net::tls::client_config(id).expect("tls");
    let (c, s) = Connector::connect(st.rt.handle().clone(), kind, addr, tls, wait)?;
    st.conns.lock().expect("lock").push(c);
    Ok(s)
}

/// Hello and Auth on `s` for module `data`, which must be welcomed.
fn login(s: &mut Stream, token: &str, write: bool) -> tern_proto::Welcome {
    s.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    s.send(&Msg::Auth(Auth {
        module: "data".into(),
        token: Some(token.into()),
        write,
    }))
    .expect("send");
    assert!(matches!(s.recv().expect("hello"), Msg::Hello(_)));
    match s.recv().expect("welcome") {
        Msg::Welcome(w) => w,
        other => panic!("not welcomed: {other:?}"),
    }
}

/// Issue 13, finding 2: connections that complete TLS and never
/// authenticate (what `openssl s_client` left open does) once held the
/// daemon's connection slots for good. They now wait in a pool of their
/// own, only until one deadline for TLS, Hello and Auth, and real clients
/// get in meanwhile.
#[test]
fn connections_that_never_authenticate_neither_lock_clients_out_nor_stay() {
    let st = setup_with(|c| {
        c.limits.max_conns = 4;
        c.limits.handshake = Duration::from_secs(2);
    });
    let mut idle: Vec<Stream> = (0..8)
        .map(|i| {
            let kind = if i % 2 == 0 { Transport::Tcp } else { Transport::Quic };
            raw_stream(&st, kind, Duration::from_secs(60)).expect("TLS completes")
        })
        .collect();
    // All four connection slots are free for real clients.
    let mut real: Vec<Stream> = (0..4)
        .map(|_| st.session("data", TOKEN, false).expect("login"))
        .collect();
    for s in &mut real {
        s.send(&Msg::Stat { path: b"sub".to_vec() }).expect("send");
        assert!(matches!(s.recv().expect("stat"), Msg::StatReply(Some(_))));
    }
    // A fifth authenticated connection is one too many, and says so.
    match st.session("data", TOKEN, false) {
        Err(NetError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::Unavailable);
            assert!(e.message.contains("max_connections = 4"), "{}", e.message);
        }
        other => panic!("a fifth connection: {:?}", other.map(|_| ())),
    }
    // The silent ones are hung up on at the deadline, long before their
    // own 60 s wait would end (a QUIC one would otherwise be kept alive
    // by the daemon's keep-alives).
    for (i, s) in idle.iter_mut().enumerate() {
        match s.recv() {
            Err(NetError::Timeout(_)) | Ok(_) => panic!("idle connection {i} was kept"),
            Err(_) => {}
        }
    }
}

/// Issue 13, finding 2: one address may hold only its share of the
/// handshakes in progress.
#[test]
fn one_address_gets_only_its_share_of_the_handshakes() {
    let st = setup_with(|c| c.limits.max_handshakes_per_addr = 3);
    let _held: Vec<Stream> = (0..3)
        .map(|_| raw_stream(&st, Transport::Tcp, Duration::from_secs(10)).expect("TLS completes"))
        .collect();
    assert!(
        raw_stream(&st, Transport::Tcp, Duration::from_secs(10)).is_err(),
        "a fourth handshake from the same address was taken"
    );
    assert!(
        raw_stream(&st, Transport::Quic, Duration::from_secs(3)).is_err(),
        "a fourth handshake over QUIC was taken"
    );
}

/// Issue 13, finding 3: before it authenticates, a peer gets one stream per
/// QUIC connection and may send only small control messages, so streams
/// and announced Hellos cost the daemon no memory or threads to speak of.
#[test]
fn before_authentication_a_peer_gets_one_stream_and_small_messages() {
    let st = setup();
    let addr = st.daemon.as_ref().expect("daemon").addrs()[0];
    let tls = tern_net::tls::client_config(None).expect("tls");
    let (c, mut first) = Connector::connect(
        st.rt.handle().clone(),
        Transport::Quic,
        addr,
        tls,
        Duration::from_secs(2),
    )
    .expect("quic");
    // The stream is only known to the daemon once it carries a byte.
    first.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    first.flush().expect("flush");
    assert!(
        matches!(c.open(), Err(NetError::Timeout(_))),
        "a second stream was allowed before authentication"
    );
    first
        .send(&Msg::Auth(Auth {
            module: "data".into(),
            token: Some(TOKEN.into()),
            write: false,
        }))
        .expect("send");
    assert!(matches!(first.recv().expect("hello"), Msg::Hello(_)));
    first.agree(tern_proto::FEATURES, Default::default());
    assert!(matches!(first.recv().expect("welcome"), Msg::Welcome(_)));
    // Authenticated: more streams, and large messages.
    let mut second = c.open().expect("a second stream once authenticated");
    second.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    second.flush().expect("flush");
    let big = Msg::Stat {
        path: vec![b'a'; 8 << 10],
    };
    first.send(&big).expect("send");
    assert!(
        !matches!(first.recv(), Err(NetError::Proto(_)) | Err(NetError::Closed)),
        "an 8 KiB request after Auth"
    );
    c.close();

    // The same 8 KiB before Auth ends the stream.
    let mut s = raw_stream(&st, Transport::Tcp, Duration::from_secs(10)).expect("tcp");
    let mut hello = Hello::ours("test");
    hello.agent = "x".repeat(8 << 10);
    s.send(&Msg::Hello(hello)).expect("send");
    assert!(s.recv().is_err(), "an 8 KiB Hello was read");
    // A well-behaved client is still served.
    let mut ok = raw_stream(&st, Transport::Tcp, Duration::from_secs(10)).expect("tcp");
    login(&mut ok, TOKEN, false);
}

/// Issue 13, finding 3: a stream that stops after its Hello (or sooner)
/// once held a blocking thread until the handshake deadline, so a few
/// hundred such connections took hundreds of threads. The daemon now reads
/// a stream's first messages on its runtime and gives it a thread only
/// when Hello and Auth are both in.
#[test]
fn streams_stalled_before_authenticating_hold_no_thread() {
    let st = setup();
    // A first login, so that the blocking pool has what it keeps anyway.
    let mut warm = raw_stream(&st, Transport::Tcp, Duration::from_secs(10)).expect("tcp");
    login(&mut warm, TOKEN, false);
    let before = status_field("Threads:");
    let mut stalled = Vec::new();
    for i in 0..24 {
        let kind = if i % 2 == 0 { Transport::Tcp } else { Transport::Quic };
        let mut s = raw_stream(&st, kind, Duration::from_secs(10)).expect("connect");
        s.send(&Msg::Hello(Hello::ours("test"))).expect("send");
        s.flush().expect("flush");
        stalled.push(s);
    }
    // A client that logs in now is served after the stalled streams were
    // accepted (before the fix, each had its thread by then).
    let mut ok = raw_stream(&st, Transport::Tcp, Duration::from_secs(10)).expect("tcp");
    login(&mut ok, TOKEN, false);
    let mut quic = raw_stream(&st, Transport::Quic, Duration::from_secs(10)).expect("quic");
    login(&mut quic, TOKEN, false);
    let after = status_field("Threads:");
    assert!(
        after <= before + 4,
        "24 stalled handshakes took {} threads ({before} before, {after} after)",
        after - before
    );
    drop(stalled);
}

/// The daemon's resident memory, in MiB (the daemon runs in this process).
fn rss_mib() -> u64 {
    status_field("VmRSS:") >> 10
}

/// A number from this process's /proc status (the daemon runs here).
fn status_field(name: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
}

/// A batch of one file of `size` bytes, all of it a hole: a request of a
/// hundred bytes that names `size` bytes.
fn hollow_batch(path: &[u8], size: u64) -> Msg {
    Msg::Batch(Batch {
        items: vec![BatchItem {
            path: path.to_vec(),
            meta: WireMeta::default(),
            body: BatchBody::File {
                size,
                holes: vec![(0, size)],
                hash: *blake3::hash(&vec![0u8; size as usize]).as_bytes(),
                xattrs: Vec::new(),
                changed: (0, 0),
            },
        }],
        owner: false,
        sync: false,
        verify: false,
    })
}

/// Issue 13, finding 7: eight read-only streams sending a hundred-byte
/// Batch each took the daemon from 8 to 969 MiB: the files were allocated
/// and their holes zero-filled before the write permission was checked.
#[test]
fn a_batch_from_a_read_only_session_is_refused_before_anything_is_allocated() {
    let st = setup();
    let before = rss_mib();
    let mut streams: Vec<Stream> = (0..8)
        .map(|_| st.session("data", RO_TOKEN, false).expect("read-only session"))
        .collect();
    for s in &mut streams {
        let e = refusal(s, &hollow_batch(b"big", 120 << 20));
        assert_eq!(e.code, ErrorCode::Forbidden, "{}", e.message);
    }
    let grown = rss_mib().saturating_sub(before);
    assert!(grown < 64, "the daemon grew by {grown} MiB");
    assert!(!st.root.join("module/big").exists());
    // A writer's sparse batch is written without its holes being touched.
    let mut s = st.session("data", TOKEN, true).expect("session");
    let before = rss_mib();
    s.send(&hollow_batch(b"sparse", 100 << 20)).expect("send");
    s.send_data(&[]).expect("no data: all of it is a hole");
    match s.recv().expect("reply") {
        Msg::BatchReply(r) => assert_eq!(r, vec![None]),
        m => panic!("unexpected {m:?}"),
    }
    let grown = rss_mib().saturating_sub(before);
    assert!(grown < 64, "a sparse batch grew the daemon by {grown} MiB");
    assert_eq!(
        fs::metadata(st.root.join("module/sparse")).expect("written").len(),
        100 << 20
    );
}

/// Issue 13, finding 7: every request buffer comes out of one daemon-wide
/// budget; a request that finds it spent waits a while, then is told why.
#[test]
fn request_buffers_share_one_budget_for_the_whole_daemon() {
    let st = setup_with(|c| {
        c.limits.request_memory = 1 << 20;
        c.limits.idle = Duration::from_secs(4);
    });
    fs::write(st.root.join("module/sub/f"), vec![7u8; 1 << 20]).expect("write");
    let mut reader = st.session("data", TOKEN, false).expect("session");
    open_read(&mut reader, 1, b"sub/f");
    let read = Msg::Read {
        handle: 1,
        offset: 0,
        len: 1 << 20,
    };
    // A writer announces a 1 MiB chunk and never sends it: the daemon holds
    // the budget for it while it waits for the data.
    let mut writer = st.session("data", TOKEN, true).expect("session");
    let mut spec = spec();
    spec.size = 2 << 20;
    spec.chunk_size = 1 << 20;
    writer
        .send(&Msg::Create {
            handle: 10,
            path: b"held2".to_vec(),
            spec,
        })
        .expect("send");
    assert!(matches!(writer.recv().expect("create"), Msg::Created { .. }));
    writer
        .send(&Msg::Write(tern_proto::WriteChunk {
            handle: 10,
            index: 0,
            offset: 0,
            len: 1 << 20,
            holes: Vec::new(),
            cv: [0; 32],
        }))
        .expect("send");
    writer.flush().expect("flush");
    // The write may not have been taken yet when the first read arrives;
    // once it has, reads find the budget spent.
    let mut told = None;
    for _ in 0..20 {
        reader.send(&read).expect("send");
        match reader.recv() {
            Ok(Msg::ReadReply { len, .. }) => {
                let mut data = vec![0u8; len as usize];
                reader.recv_data(&mut data).expect("data");
            }
            Err(NetError::Remote(e)) => {
                told = Some(e);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let e = told.expect("a read was refused while the budget was held");
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert!(e.message.contains("memory for requests"), "{}", e.message);
    // The writer gone, the budget comes back.
    drop(writer);
    let mut fresh = st.session("data", TOKEN, false).expect("session");
    open_read(&mut fresh, 1, b"sub/f");
    fresh.send(&read).expect("send");
    assert!(matches!(fresh.recv().expect("read"), Msg::ReadReply { .. }));
}

/// Issue 13, low: a read or write whose offset and length are not a whole
/// BLAKE3 subtree panicked the handler; it is refused instead.
#[test]
fn reads_and_writes_that_are_not_whole_subtrees_are_refused_not_a_panic() {
    let st = setup();
    fs::write(st.root.join("module/sub/f"), vec![7u8; 16 << 10]).expect("write");
    let mut s = st.session("data", TOKEN, true).expect("session");
    open_read(&mut s, 1, b"sub/f");
    let e = refusal(
        &mut s,
        &Msg::Read {
            handle: 1,
            offset: 1024,
            len: 4096,
        },
    );
    assert!(e.message.contains("subtree"), "{}", e.message);
    s.send(&Msg::Stat { path: b"sub".to_vec() }).expect("send");
    assert!(matches!(s.recv().expect("still served"), Msg::StatReply(Some(_))));

    let mut spec = spec();
    spec.size = 16 << 10;
    s.send(&Msg::Create {
        handle: 2,
        path: b"w".to_vec(),
        spec,
    })
    .expect("send");
    assert!(matches!(s.recv().expect("create"), Msg::Created { .. }));
    s.send(&Msg::Write(tern_proto::WriteChunk {
        handle: 2,
        index: 1,
        offset: 1024,
        len: 4096,
        holes: Vec::new(),
        cv: [0; 32],
    }))
    .expect("send");
    assert!(s.recv().is_err(), "the stream carried on after a bad chunk");
    st.session("data", TOKEN, true).expect("the daemon still serves");
}

/// Issue 13, finding 6: with one token for every daemon of a command, a
/// source daemon once learned the destination's write token. The client
/// now proves a token, bound to the daemon's key and the TLS session: what
/// a daemon sees is of no use against another, nor against itself later.
#[test]
fn a_daemon_sees_a_token_proof_that_works_nowhere_else() {
    use std::sync::{Arc, Mutex};
    let st = setup();
    // A daemon that records the login it is sent, and refuses it.
    let seen: Arc<Mutex<Vec<Msg>>> = Arc::default();
    let fake_dir = st.root.join("fake");
    let fake_id = Identity::load_or_create(&fake_dir).expect("identity");
    let record = seen.clone();
    let handler: tern_net::transport::Handler = Arc::new(move |mut s: Stream, _peer| {
        if let Ok(Msg::Hello(_)) = s.recv() {
            let _ = s.send(&Msg::Hello(Hello::ours("fake")));
            if let Ok(m) = s.recv() {
                record.lock().expect("lock").push(m);
            }
            let _ = s.send(&Msg::Error(tern_proto::ErrorMsg::new(ErrorCode::Unauthorized, "no")));
            let _ = s.flush();
        }
    });
    let keys = tern_net::transport::QuicKeys {
        reset: [1; 32],
        cid: [2; 32],
    };
    let listener = st
        .rt
        .block_on(tern_net::transport::Listener::bind(
            "127.0.0.1:0".parse().expect("addr"),
            tern_net::tls::server_config(&fake_id).expect("tls"),
            tern_net::transport::Limits::default(),
            keys,
        ))
        .expect("bind");
    let fake_addr = listener.local_addr().expect("addr");
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    st.rt.spawn(listener.run(handler, stop_rx));
    let spec = tern_net::url::RemoteSpec {
        host: "127.0.0.1".into(),
        port: fake_addr.port(),
        module: "data".into(),
        path: Default::default(),
        trailing_slash: false,
    };
    let opts = tern_net::remote::ConnectOptions {
        transport: tern_net::remote::TransportChoice::Tcp,
        token: Some(TOKEN.into()),
        ticket: None,
        trust: tern_net::trust::TrustPolicy {
            fingerprint: Some(fake_id.fingerprint()),
            accept_new: false,
            known_hosts: st.root.join("known_hosts"),
        },
        identity_dir: None,
        timeout: Duration::from_secs(10),
        write: true,
        compress: tern_net::compress::Compression::Auto,
    };
    assert!(tern_net::remote::RemoteEndpoint::connect(&spec, &opts).is_err());
    let login = seen.lock().expect("lock").pop().expect("a login was sent");
    assert!(
        !format!("{login:?}").contains(TOKEN),
        "the token itself was sent: {login:?}"
    );
    let Msg::Login(l) = login else {
        panic!("not a Login: {login:?}")
    };
    assert!(l.proof.is_some() && l.ticket.is_none());
    // Replayed to the daemon the token is for: refused.
    let mut s = st.stream(Transport::Tcp);
    s.send(&Msg::Hello(Hello::ours("test"))).expect("send");
    s.send(&Msg::Login(l)).expect("send");
    assert!(matches!(s.recv().expect("hello"), Msg::Hello(_)));
    match s.recv() {
        Err(NetError::Remote(e)) => assert_eq!(e.code, ErrorCode::Unauthorized, "{}", e.message),
        other => panic!("a replayed proof: {other:?}"),
    }
    // And the same client logs in there with its own proof.
    let mut opts = opts;
    opts.trust.fingerprint = Some(st.fingerprint());
    let spec = tern_net::url::RemoteSpec {
        port: st.daemon.as_ref().expect("daemon").addrs()[0].port(),
        ..spec
    };
    tern_net::remote::RemoteEndpoint::connect(&spec, &opts).expect("a proof for this daemon");
}

/// The identity the daemon of `st` runs with.
fn daemon_identity(st: &Setup) -> Identity {
    Identity::load_or_create(&st.root.join("state")).expect("id")
}

/// The key the daemon of `st` MACs its resume journals with.
fn journal_key(st: &Setup) -> [u8; 32] {
    daemon_identity(st).derive_secret("tern 2026-12-02 journal key")
}

/// The names tern gives the temporary file, journal and link temporary of
/// an entry called `name`: `.NAME.tern.*`, or `.tern-HASH.*` for a name
/// over 240 bytes.
fn side_names_of(name: &[u8]) -> [Vec<u8>; 3] {
    let stem = if name.len() <= 240 {
        [b".", name, b".tern"].concat()
    } else {
        format!(".tern-{}", &blake3::hash(name).to_hex()[..32]).into_bytes()
    };
    [".tmp", ".journal", ".tmp.lnk"].map(|s| [&stem[..], s.as_bytes()].concat())
}

#[test]
fn every_form_of_side_file_name_is_refused_as_a_new_name() {
    let st = setup();
    fs::write(st.root.join("module/existing"), b"x").expect("write");
    let mut s = st.session("data", TOKEN, true).expect("session");
    let t = ticket(&st, &mut s);
    let long = vec![b'l'; 250];
    for name in side_names_of(b"short").into_iter().chain(side_names_of(&long)) {
        for path in [name.clone(), [&b"sub/"[..], &name].concat()] {
            let requests = [
                Msg::MakeDir { path: path.clone() },
                Msg::Create {
                    handle: 1,
                    path: path.clone(),
                    spec: spec(),
                },
                Msg::Symlink {
                    path: path.clone(),
                    target: b"existing".to_vec(),
                    meta: WireMeta::default(),
                    owner: false,
                },
                Msg::HardLink {
                    existing: b"existing".to_vec(),
                    path: path.clone(),
                },
                Msg::Remove { path: path.clone() },
                pull(&st, &t, "127.0.0.1", &path, 1 << 20),
            ];
            for r in requests {
                let e = refusal(&mut s, &r);
                assert_eq!(e.code, ErrorCode::Forbidden, "{r:?}: {}", e.message);
            }
            // In a batch the reserved item fails alone.
            let item = |path: &[u8]| BatchItem {
                path: path.to_vec(),
                meta: WireMeta::default(),
                body: BatchBody::File {
                    size: 3,
                    holes: Vec::new(),
                    hash: *blake3::hash(b"abc").as_bytes(),
                    xattrs: Vec::new(),
                    changed: (0, 0),
                },
            };
            s.send(&Msg::Batch(Batch {
                items: vec![item(&path), item(b"batch-ok")],
                owner: false,
                sync: false,
                verify: false,
            }))
            .expect("send");
            s.send_data(b"abc").expect("data");
            s.send_data(b"abc").expect("data");
            match s.recv().expect("reply") {
                Msg::BatchReply(r) => {
                    assert_eq!(r.len(), 2);
                    assert_eq!(r[0].as_ref().map(|e| e.code), Some(ErrorCode::Forbidden), "{path:?}");
                    assert!(r[1].is_none(), "{r:?}");
                }
                m => panic!("unexpected {m:?}"),
            }
        }
    }
    // Nothing with a side file's name was made, in any form.
    for dir in ["module", "module/sub"] {
        for e in fs::read_dir(st.root.join(dir)).expect("list") {
            let n = e.expect("entry").file_name();
            assert!(!tern_core::local::is_side_file(&n), "{dir}/{n:?} was created");
        }
    }
    st.outside_untouched();
}

/// The resume spec of a 3000-byte file as the daemon sees it for
/// [`spec`]-like requests with that size.
fn resume_spec() -> (WireSpec, tern_core::FileSpec) {
    let wire = WireSpec { size: 3000, ..spec() };
    let core = tern_core::FileSpec {
        size: 3000,
        chunk_size: 1024,
        resumable: true,
        durable: false,
        source_meta: tern_core::Meta::default(),
        source_changed: tern_core::Time::default(),
    };
    (wire, core)
}

#[test]
fn side_files_planted_in_a_module_are_neither_written_through_nor_trusted() {
    use std::os::unix::ffi::OsStrExt;
    let st = setup();
    let module = st.root.join("module");
    let os = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_os_string();
    let long = vec![b'p'; 250];
    let [tmp, journal, _] = side_names_of(&long);
    let mut s = st.session("data", TOKEN, true).expect("session");

    // Planted by someone with access to the module's directory (clients
    // cannot, as above): the long name's temporary file is another name of
    // a module file. Uploading the long name leaves that file alone.
    fs::write(module.join("precious"), b"precious").expect("write");
    fs::hard_link(module.join("precious"), module.join(os(&tmp))).expect("link");
    assert!(matches!(push_file(&mut s, 1, &long, b"new"), Ok(Msg::Done)));
    assert_eq!(fs::read(module.join(os(&long))).expect("read"), b"new");
    assert_eq!(fs::read(module.join("precious")).expect("read"), b"precious");

    // A partial file with a journal vouching for its first chunk, forged
    // without the daemon's secret: not reported as resumed.
    let (wire, core) = resume_spec();
    let data = vec![5u8; 3000];
    let cv = tern_core::hash::chunk_cv(0, &data[..1024]);
    let plant = |key: &[u8; 32]| {
        fs::write(module.join(os(&tmp)), &data).expect("write");
        tern_core::journal::Journal::create(&module.join(os(&journal)), &core, key, &[(0, cv)]).expect("journal");
    };
    let created = |s: &mut Stream, handle: u64| {
        s.send(&Msg::Create {
            handle,
            path: long.clone(),
            spec: wire.clone(),
        })
        .expect("send");
        match s.recv().expect("create") {
            Msg::Created { resumed } => resumed,
            m => panic!("unexpected {m:?}"),
        }
    };
    plant(&tern_core::journal::DEFAULT_KEY);
    assert!(
        created(&mut s, 2).is_empty(),
        "a journal forged without the key was trusted"
    );
    s.send(&Msg::Abort { handle: 2, keep: false }).expect("send");
    // Abort has no reply: a request that has one orders the planting after it.
    stat_entry(&mut s, &long);
    // The same journal keyed with the daemon's secret is its own: resumed.
    let key = journal_key(&st);
    plant(&key);
    assert_eq!(created(&mut s, 3), vec![(0, cv)]);
    st.outside_untouched();
}

#[test]
fn a_client_rehashes_what_the_daemon_reports_as_resumed_and_commits_its_source() {
    let st = setup();
    let module = st.root.join("module");
    let cs = 64u64 << 10;
    let data: Vec<u8> = (0..(3 * cs as usize + 500)).map(|i| (i % 241) as u8).collect();
    let src = st.root.join("src");
    fs::create_dir(&src).expect("mkdir");
    fs::write(src.join("victim.bin"), &data).expect("write");
    let e = tern_core::Source::stat(&tern_core::LocalEndpoint::new(&src), std::path::Path::new("victim.bin"))
        .expect("stat")
        .expect("exists");

    // A partial file whose chunk 1 is not the source's, with a journal the
    // daemon trusts (made with its own key, as a lying or compromised
    // daemon would report it): the daemon offers chunks 1 and 2 as kept.
    let mut planted = data.clone();
    planted[cs as usize..2 * cs as usize].fill(0xaa);
    fs::write(module.join("sub/.victim.bin.tern.tmp"), &planted).expect("plant");
    let cv = |i: usize| tern_core::hash::chunk_cv(i as u64 * cs, &planted[i * cs as usize..(i + 1) * cs as usize]);
    let core = tern_core::FileSpec {
        size: e.size,
        chunk_size: cs,
        resumable: true,
        durable: false,
        source_meta: e.meta.clone(),
        source_changed: e.changed,
    };
    let key = journal_key(&st);
    tern_core::journal::Journal::create(
        &module.join("sub/.victim.bin.tern.journal"),
        &core,
        &key,
        &[(1, cv(1)), (2, cv(2))],
    )
    .expect("journal");

    let port = st.daemon.as_ref().expect("daemon").addrs()[0].port();
    let fp = daemon_identity(&st).fingerprint();
    let remote = tern_net::remote::RemoteEndpoint::connect(
        &tern_net::url::RemoteSpec {
            host: "127.0.0.1".into(),
            port,
            module: "data".into(),
            path: "sub".into(),
            trailing_slash: false,
        },
        &tern_net::remote::ConnectOptions {
            transport: tern_net::remote::TransportChoice::Tcp,
            token: Some(TOKEN.into()),
            ticket: None,
            trust: tern_net::trust::TrustPolicy {
                fingerprint: Some(fp),
                accept_new: false,
                known_hosts: st.root.join("known_hosts"),
            },
            identity_dir: None,
            timeout: Duration::from_secs(10),
            write: true,
            compress: tern_net::compress::Compression::Auto,
        },
    )
    .expect("connect");
    let s = tern_core::run(
        vec![tern_core::Root {
            src: std::sync::Arc::new(tern_core::LocalEndpoint::new(&src)),
            dst_rel: std::path::PathBuf::new(),
        }],
        std::sync::Arc::new(remote),
        tern_core::Options {
            chunk_size: cs,
            jobs: 2,
            fsync: false,
            ..tern_core::Options::default()
        },
        std::sync::Arc::new(tern_core::engine::Quiet),
    );
    assert_eq!(s.errors, 0, "{:?}", s.error_messages);
    assert_eq!(
        blake3::hash(&fs::read(module.join("sub/victim.bin")).expect("read")),
        blake3::hash(&data),
        "the daemon holds bytes the source never had"
    );
    assert_eq!(s.bytes_resumed, cs, "only chunk 2, which matches the source, was kept");
    st.outside_untouched();
}

#[test]
fn the_daemon_removes_abandoned_partial_files_at_start() {
    let old = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    let st = setup_with(|cfg| {
        cfg.partial_max_age = Some(Duration::from_secs(2 * 86_400));
        let module = cfg.modules["data"].path.clone();
        for name in ["sub/.left.tern.tmp", "sub/.left.tern.journal", "sub/.recent.tern.tmp"] {
            fs::write(module.join(name), b"partial").expect("write");
        }
        for name in ["sub/.left.tern.tmp", "sub/.left.tern.journal", "sub/ordinary"] {
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(module.join(name))
                .expect("open");
            f.set_modified(old).expect("mtime");
        }
    });
    let sub = st.root.join("module/sub");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sub.join(".left.tern.tmp").exists() || sub.join(".left.tern.journal").exists() {
        assert!(std::time::Instant::now() < deadline, "abandoned partial files kept");
        // Polling for the walk the daemon starts on its own.
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        sub.join(".recent.tern.tmp").exists(),
        "a recent partial file was removed"
    );
    assert!(sub.join("ordinary").exists(), "an old ordinary file was removed");
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
    assert!(!login(&mut w, TOKEN, true).can_chown);
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

/// Issue 15: a client's delta recipe cannot make the daemon read outside
/// the basis, write a chunk that does not hash to what the client said, or
/// take more literal bytes than the chunk holds.
#[test]
fn delta_recipes_build_only_from_the_basis_and_only_what_they_promise() {
    use tern_proto::WirePiece;
    let st = setup();
    let module = st.root.join("module");
    let old: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    for n in 1..=3 {
        fs::write(module.join(format!("sub/b{n}")), &old).expect("write");
    }
    let delta_file = |s: &mut Stream, handle: u64, pieces: Vec<WirePiece>, literals: &[u8], cv: [u8; 32]| {
        s.send(&Msg::Create {
            handle,
            path: format!("sub/b{handle}").into_bytes(),
            spec: WireSpec { size: 2048, ..spec() },
        })
        .expect("send");
        assert!(matches!(s.recv().expect("create"), Msg::Created { .. }));
        s.send(&Msg::BasisSignature { handle }).expect("send");
        let mut chunks = 0;
        loop {
            let (lens, last) = signature_part(s.recv().expect("signature"));
            chunks += lens.len();
            if last {
                break;
            }
        }
        assert!(chunks > 0, "the basis has no signature");
        for (index, offset) in [(0u64, 0u64), (1, 1024)] {
            s.send(&Msg::WriteDelta {
                handle,
                index,
                offset,
                len: 1024,
                pieces: if index == 0 {
                    pieces.clone()
                } else {
                    vec![WirePiece::Copy {
                        offset: 1024,
                        len: 1024,
                    }]
                },
                cv: if index == 0 {
                    cv
                } else {
                    tern_core::hash::chunk_cv(1024, &old[1024..2048])
                },
            })
            .expect("send");
            s.send_data(if index == 0 { literals } else { &[] }).expect("send");
        }
        s.send(&Msg::Publish { handle, writes: 2 }).expect("send");
        s.recv()
    };
    let mut s = st.session("data", TOKEN, true).expect("session");
    // Built from the basis and literals, as promised: published.
    let mut want = old[..1024].to_vec();
    want[100..110].copy_from_slice(b"0123456789");
    let pieces = vec![
        WirePiece::Copy { offset: 0, len: 100 },
        WirePiece::Literal { len: 10 },
        WirePiece::Copy { offset: 110, len: 914 },
    ];
    let cv = tern_core::hash::chunk_cv(0, &want);
    assert!(matches!(
        delta_file(&mut s, 1, pieces, b"0123456789", cv),
        Ok(Msg::Done)
    ));
    want.extend_from_slice(&old[1024..2048]);
    assert_eq!(fs::read(module.join("sub/b1")).expect("read"), want);

    // Past the end of the basis: refused, nothing published.
    let outside = vec![WirePiece::Copy {
        offset: 3500,
        len: 1024,
    }];
    match delta_file(&mut s, 2, outside, b"", cv) {
        Err(NetError::Remote(e)) => assert!(e.message.contains("past the basis"), "{}", e.message),
        other => panic!("a recipe reading past the basis: {other:?}"),
    }
    // A chunk that does not hash to its CV: not written, the file fails.
    let lying = vec![WirePiece::Copy { offset: 0, len: 1024 }];
    match delta_file(&mut s, 3, lying, b"", cv) {
        Err(NetError::Remote(e)) => assert!(e.message.contains("could not be built"), "{}", e.message),
        other => panic!("a chunk that does not hash to its CV: {other:?}"),
    }
    assert_eq!(fs::read(module.join("sub/b2")).expect("read"), old);
    assert_eq!(fs::read(module.join("sub/b3")).expect("read"), old);

    // More literal bytes than the chunk: the stream ends.
    let mut s = st.session("data", TOKEN, true).expect("session");
    create(&mut s, 4, b"sub/other");
    s.send(&Msg::WriteDelta {
        handle: 4,
        index: 0,
        offset: 0,
        len: 3,
        pieces: vec![WirePiece::Literal { len: 1 << 30 }],
        cv,
    })
    .expect("send");
    s.send(&Msg::Publish { handle: 4, writes: 1 }).expect("send");
    assert!(s.recv().is_err(), "a recipe of a GiB of literals for 3 bytes was taken");
    st.outside_untouched();
}

/// Issue 15: a read-only client may have the daemon plan a file it reads
/// against its own signature, and read the planned chunks; a signature of
/// a chunk size tern does not cut with, or a read outside the plan, ends
/// the stream rather than reading anything else.
#[test]
fn delta_reads_stay_within_their_plan() {
    let st = setup();
    let module = st.root.join("module");
    let mut data = vec![0u8; 64 << 10];
    blake3::Hasher::new().finalize_xof().fill(&mut data);
    fs::write(module.join("sub/f"), &data).expect("write");
    // The client's old version differs in its last 1000 bytes.
    let mut old = data.clone();
    old[63 << 10..].fill(7);
    let read = |off: u64, b: &mut [u8]| {
        b.copy_from_slice(&old[off as usize..off as usize + b.len()]);
        Ok(())
    };
    let sig = tern_core::delta::signature(&read, old.len() as u64, 1).expect("signature");
    let mut s = st.session("data", TOKEN, false).expect("session");
    open_read(&mut s, 1, b"sub/f");
    let basis = |avg: u32| Msg::DeltaBasis {
        handle: 1,
        avg,
        chunks: sig.chunks.iter().map(|&(id, len)| (id.to_le_bytes(), len)).collect(),
        last: true,
        size: data.len() as u64,
        chunk_size: 1024,
    };
    s.send(&basis(sig.avg)).expect("send");
    let recipes = recv_plan(&mut s);
    assert_eq!(recipes.len(), 64, "one recipe per 1 KiB of 64 KiB");
    let last = 63u64;
    s.send(&Msg::ReadDelta { handle: 1, index: last }).expect("send");
    match s.recv().expect("read") {
        Msg::DeltaRead { cv, literal } => {
            let tail = &data[(last * 1024) as usize..];
            assert_eq!(cv, tern_core::hash::chunk_cv(last * 1024, tail));
            let mut lits = vec![0u8; literal as usize];
            s.recv_data(&mut lits).expect("data");
            assert_eq!(lits, tail, "the changed tail: all literal");
        }
        m => panic!("not a delta read: {m:?}"),
    }
    s.send(&Msg::ReadDelta { handle: 1, index: 64 }).expect("send");
    assert!(s.recv().is_err(), "a read past the plan was answered");

    // A signature that matches nothing: one empty part, read it plainly.
    let mut s = st.session("data", TOKEN, false).expect("session");
    open_read(&mut s, 1, b"sub/f");
    s.send(&Msg::DeltaBasis {
        handle: 1,
        avg: sig.avg,
        chunks: vec![([1; 8], 100)],
        last: true,
        size: data.len() as u64,
        chunk_size: 1024,
    })
    .expect("send");
    match s.recv().expect("plan") {
        Msg::DeltaPlan {
            first: 0,
            chunks,
            last: true,
        } => assert!(chunks.is_empty(), "{} recipes", chunks.len()),
        m => panic!("not one empty plan: {m:?}"),
    }
    let mut s = st.session("data", TOKEN, false).expect("session");
    open_read(&mut s, 1, b"sub/f");
    s.send(&basis(3000)).expect("send");
    assert!(s.recv().is_err(), "a chunk size tern does not cut with was taken");
    let mut s = st.session("data", TOKEN, false).expect("session");
    open_read(&mut s, 1, b"sub/f");
    s.send(&Msg::ReadDelta { handle: 1, index: 0 }).expect("send");
    assert!(s.recv().is_err(), "a delta read with no plan was answered");

    // The same signature with its ids cut to five bytes plans the same.
    let short = |ids: tern_proto::ShortIds| Msg::ShortDeltaBasis {
        handle: 1,
        avg: sig.avg,
        chunks: ids,
        last: true,
        size: data.len() as u64,
        chunk_size: 1024,
    };
    let mut s = st.session("data", TOKEN, false).expect("session");
    open_read(&mut s, 1, b"sub/f");
    s.send(&short(tern_proto::ShortIds::new(5, &sig.chunks))).expect("send");
    let again = recv_plan(&mut s);
    assert_eq!(again, recipes, "short ids planned otherwise");
    // Ids that do not divide into the chunks, or of no bytes at all, are a
    // protocol error.
    let mut ragged = tern_proto::ShortIds::new(5, &sig.chunks);
    ragged.ids.pop();
    let none = tern_proto::ShortIds {
        id_bytes: 0,
        ids: Vec::new(),
        lens: vec![1024],
    };
    for ids in [ragged, none] {
        let mut s = st.session("data", TOKEN, false).expect("session");
        open_read(&mut s, 1, b"sub/f");
        s.send(&short(ids)).expect("send");
        assert!(s.recv().is_err(), "malformed short ids were taken");
    }
    st.outside_untouched();
}

/// Issue 15: a container inflates to 2 MiB, more than a stranger's stream
/// may cost, so a daemon takes none before the login succeeded, even one
/// that holds a valid login.
#[test]
fn compressed_frames_before_authentication_are_refused() {
    let st = setup();
    // Large and repetitive enough that it goes in a container.
    let login = |s: &mut Stream| {
        s.send(&Msg::Hello(Hello::ours(&"test ".repeat(200)))).expect("send");
        s.send(&Msg::Auth(Auth {
            module: "data".into(),
            token: Some(TOKEN.into()),
            write: false,
        }))
        .expect("send");
    };
    let mut s = st.stream(Transport::Tcp);
    s.agree(tern_proto::FEATURES, Default::default());
    login(&mut s);
    match s.recv() {
        Err(NetError::Remote(m)) => assert!(m.message.contains("compressed"), "{}", m.message),
        r => panic!("a compressed login was answered: {r:?}"),
    }
    // The same login, plainly, is taken.
    let mut s = st.stream(Transport::Tcp);
    login(&mut s);
    assert!(matches!(s.recv().expect("hello"), Msg::Hello(_)));
    assert!(matches!(s.recv().expect("welcome"), Msg::Welcome(_)));
}

/// Issue 15: the basis a client names for a copy is a plain file of the
/// module the session may name: never through `..` or a symlink out of it,
/// never a side file of a transfer; the one it may name is what the
/// signature then describes.
#[test]
fn a_named_basis_stays_inside_the_module() {
    let st = setup();
    let module = st.root.join("module");
    let first: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(module.join("sub/first"), &first).expect("write");
    fs::write(module.join("sub/.x.tern.tmp"), &first).expect("write");
    let mut s = st.session("data", TOKEN, true).expect("session");
    s.send(&Msg::Create {
        handle: 1,
        path: b"sub/copy".to_vec(),
        spec: WireSpec { size: 3000, ..spec() },
    })
    .expect("send");
    assert!(matches!(s.recv().expect("create"), Msg::Created { .. }));
    for bad in [
        &b"../outside/secret"[..],
        b"out/secret",
        b"sub/.x.tern.tmp",
        b"/etc/passwd",
    ] {
        s.send(&Msg::UseBasis {
            handle: 1,
            path: bad.to_vec(),
        })
        .expect("send");
        match s.recv() {
            Err(NetError::Remote(_)) => {}
            r => panic!("{} taken as a basis: {r:?}", String::from_utf8_lossy(bad)),
        }
    }
    s.send(&Msg::UseBasis {
        handle: 1,
        path: b"sub/first".to_vec(),
    })
    .expect("send");
    assert!(matches!(s.recv().expect("use"), Msg::Done));
    s.send(&Msg::BasisSignature { handle: 1 }).expect("send");
    let mut len = 0u64;
    loop {
        let (lens, last) = signature_part(s.recv().expect("signature"));
        len += lens.iter().map(|&l| u64::from(l)).sum::<u64>();
        if last {
            break;
        }
    }
    assert_eq!(len, first.len() as u64, "the signature is not of the named file");
    st.outside_untouched();
}

/// The recipes of a `DeltaPlan` answer, its parts joined.
fn recv_plan(s: &mut Stream) -> Vec<Vec<tern_proto::WirePiece>> {
    let mut recipes = Vec::new();
    loop {
        match s.recv().expect("plan") {
            Msg::DeltaPlan { chunks, last, .. } => {
                recipes.extend(chunks);
                if last {
                    return recipes;
                }
            }
            m => panic!("not a plan: {m:?}"),
        }
    }
}

/// The chunk lengths of a signature part, whichever way its ids crossed,
/// and whether it is the last.
fn signature_part(m: Msg) -> (Vec<u32>, bool) {
    match m {
        Msg::Signature { chunks, last, .. } => (chunks.iter().map(|c| c.1).collect(), last),
        Msg::ShortSignature { chunks, last, .. } => {
            assert_eq!(chunks.entries().map(|e| e.len()), Some(chunks.lens.len()), "ragged ids");
            (chunks.lens, last)
        }
        m => panic!("not a signature: {m:?}"),
    }
}

/// The signatures of one `BasisSignatures` answer, in order: `None` for an
/// empty one.
fn basis_signatures(s: &mut Stream, items: &[(&[u8], u64)]) -> Vec<Option<usize>> {
    s.send(&Msg::BasisSignatures {
        items: items.iter().map(|&(p, n)| (p.to_vec(), n)).collect(),
    })
    .expect("send");
    let mut out = Vec::new();
    for _ in items {
        let mut chunks = 0;
        loop {
            let (lens, last) = signature_part(s.recv().expect("signature"));
            chunks += lens.len();
            if last {
                break;
            }
        }
        out.push((chunks > 0).then_some(chunks));
    }
    out
}

/// Issue 15: small files built in their batch from their old versions. A
/// client learns the signature only of a file it may replace, inside the
/// module; a recipe builds only from the old version at the item's own
/// path, only what it promised, or the item is refused and the old version
/// stays.
#[test]
fn batched_deltas_build_only_from_their_own_old_version() {
    use tern_proto::WirePiece;
    let st = setup();
    let module = st.root.join("module");
    let old: Vec<u8> = (0..32u32 << 10).map(|i| (i % 251) as u8).collect();
    for n in 1..=3 {
        fs::write(module.join(format!("sub/b{n}")), &old).expect("write");
    }
    let size = old.len() as u64;
    let secret = fs::metadata(st.root.join("outside/secret")).expect("stat").len();

    // Signatures: of a file the session may replace, and of nothing else.
    let mut ro = st.session("data", RO_TOKEN, false).expect("session");
    let asked: [(&[u8], u64); 1] = [(b"sub/b1", size)];
    assert_eq!(basis_signatures(&mut ro, &asked), vec![None], "a read-only session");
    let mut s = st.session("data", TOKEN, true).expect("session");
    let asked: [(&[u8], u64); 6] = [
        (b"sub/b1", size),
        (b"sub/b1", size - 1),
        (b"out/secret", secret),
        (b"../outside/secret", secret),
        (b"sub", 0),
        (b"sub/none", size),
    ];
    let got = basis_signatures(&mut s, &asked);
    assert!(got[0].is_some(), "{got:?}");
    assert!(got[1..].iter().all(Option::is_none), "{got:?}");

    let delta = |path: &str, pieces: Vec<WirePiece>, literal: u64, want: &[u8]| BatchItem {
        path: path.as_bytes().to_vec(),
        meta: WireMeta {
            mode: 0o644,
            ..WireMeta::default()
        },
        body: BatchBody::Delta(tern_proto::WireDelta {
            size,
            pieces,
            literal,
            hash: *blake3::hash(want).as_bytes(),
            xattrs: Vec::new(),
            changed: (0, 0),
        }),
    };
    let mut want = old.clone();
    want[100..110].copy_from_slice(b"0123456789");
    let edit = vec![
        WirePiece::Copy { offset: 0, len: 100 },
        WirePiece::Literal { len: 10 },
        WirePiece::Copy {
            offset: 110,
            len: size as u32 - 110,
        },
    ];
    let whole = vec![WirePiece::Copy {
        offset: 0,
        len: size as u32,
    }];
    let past = vec![WirePiece::Copy {
        offset: 100,
        len: size as u32,
    }];
    let items = vec![
        delta("sub/b1", edit.clone(), 10, &want),
        // The old version does not hash to what was promised.
        delta("sub/b2", whole.clone(), 0, &want),
        // Reads past the end of the old version.
        delta("sub/b3", past, 0, &want),
        // Builds from a file outside the module, through a symlink.
        delta("out/secret", whole.clone(), 0, &old),
        delta("../outside/g", edit, 10, &want),
    ];
    let n = items.len();
    s.send(&Msg::Batch(Batch {
        items,
        owner: false,
        sync: false,
        verify: true,
    }))
    .expect("send");
    for lit in [&b"0123456789"[..], b"", b"", b"", b"0123456789"] {
        s.send_data(lit).expect("data");
    }
    match s.recv().expect("reply") {
        Msg::BatchReply(r) => {
            assert_eq!(r.len(), n);
            assert!(r[0].is_none(), "{r:?}");
            assert!(r[1..].iter().all(Option::is_some), "{r:?}");
            let past = r[2].as_ref().map(|e| e.message.clone()).unwrap_or_default();
            assert!(past.contains("past the basis"), "{past}");
        }
        m => panic!("unexpected {m:?}"),
    }
    assert_eq!(fs::read(module.join("sub/b1")).expect("read"), want);
    for n in 2..=3 {
        assert_eq!(fs::read(module.join(format!("sub/b{n}"))).expect("read"), old);
    }
    assert!(!st.root.join("outside/g").exists());

    // A recipe that does not add up to its file: the stream ends.
    s.send(&Msg::Batch(Batch {
        items: vec![delta(
            "sub/b2",
            vec![WirePiece::Literal { len: 1 << 30 }],
            1 << 30,
            &want,
        )],
        owner: false,
        sync: false,
        verify: false,
    }))
    .expect("send");
    assert!(s.recv().is_err(), "a recipe of a GiB for a 32 KiB file was taken");
    assert_eq!(fs::read(module.join("sub/b2")).expect("read"), old);

    // Built from another file of the module: a copy of it lands; a basis
    // outside the module, through a symlink out of it, a transfer's side
    // file, or one that does not hash as promised builds nothing.
    fs::write(module.join("sub/.b1.tern.tmp"), &old).expect("write");
    let from = |path: &str, basis: &str, want: &[u8]| {
        let mut it = delta(path, whole.clone(), 0, want);
        let BatchBody::Delta(d) = it.body else {
            unreachable!("made as a delta");
        };
        it.body = BatchBody::DeltaFrom {
            basis: basis.as_bytes().to_vec(),
            delta: d,
        };
        it
    };
    let mut s = st.session("data", TOKEN, true).expect("session");
    let items = vec![
        from("sub/copy", "sub/b2", &old),
        from("sub/c1", "../outside/secret", &old),
        from("sub/c2", "out/secret", &old),
        from("sub/c3", "sub/.b1.tern.tmp", &old),
        from("sub/c4", "sub/b1", &old),
        from("sub/c5", "sub/none", &old),
    ];
    let n = items.len();
    s.send(&Msg::Batch(Batch {
        items,
        owner: false,
        sync: false,
        verify: true,
    }))
    .expect("send");
    for _ in 0..n {
        s.send_data(b"").expect("data");
    }
    match s.recv().expect("reply") {
        Msg::BatchReply(r) => {
            assert_eq!(r.len(), n);
            assert!(r[0].is_none(), "{r:?}");
            assert!(r[1..].iter().all(Option::is_some), "{r:?}");
        }
        m => panic!("unexpected {m:?}"),
    }
    assert_eq!(fs::read(module.join("sub/copy")).expect("read"), old);
    for c in 1..=5 {
        assert!(!module.join(format!("sub/c{c}")).exists(), "sub/c{c} was built");
    }
    st.outside_untouched();
}

/// Issue 15: a client reading small files may send its old versions'
/// signatures for the daemon to plan against; the daemon answers with the
/// recipe and the literal bytes only, and a request whose signatures do
/// not match its files ends the stream.
#[test]
fn small_files_read_as_deltas_carry_only_their_literals() {
    let st = setup();
    let module = st.root.join("module");
    let mut data = vec![0u8; 40 << 10];
    blake3::Hasher::new().finalize_xof().fill(&mut data);
    fs::write(module.join("sub/f"), &data).expect("write");
    let mut old = data.clone();
    old[20 << 10..(20 << 10) + 100].fill(7);
    let read = |off: u64, b: &mut [u8]| {
        b.copy_from_slice(&old[off as usize..off as usize + b.len()]);
        Ok(())
    };
    let sig = tern_core::delta::signature(&read, old.len() as u64, 1).expect("signature");
    let mut s = st.session("data", TOKEN, false).expect("session");
    let entry = stat_entry(&mut s, b"sub/f");
    s.send(&Msg::ReadFilesDelta {
        items: vec![(b"sub/f".to_vec(), entry.clone())],
        bases: vec![true],
        xattrs: false,
    })
    .expect("send");
    s.send(&Msg::Signature {
        avg: sig.avg,
        chunks: sig.chunks.iter().map(|&(id, len)| (id.to_le_bytes(), len)).collect(),
        last: true,
    })
    .expect("send");
    match s.recv().expect("reply") {
        Msg::FileDelta {
            size, literal, hash, ..
        } => {
            assert_eq!((size, hash), (data.len() as u64, *blake3::hash(&data).as_bytes()));
            assert!(literal > 0 && literal < 16 << 10, "{literal} literal bytes");
            let mut lits = vec![0u8; literal as usize];
            s.recv_data(&mut lits).expect("literals");
        }
        m => panic!("not a delta: {m:?}"),
    }
    // A basis flag per file, or the stream ends.
    s.send(&Msg::ReadFilesDelta {
        items: vec![(b"sub/f".to_vec(), entry)],
        bases: vec![true, true],
        xattrs: false,
    })
    .expect("send");
    assert!(s.recv().is_err(), "basis flags that are not one per file were taken");
}
