//! The client's view of a module on a tern daemon: a [`Source`] and
//! [`Dest`] for the engine.
//!
//! Every engine worker takes a stream from a pool for each call, so as many
//! requests are in flight as there are workers. Chunk writes are not
//! acknowledged one by one: the transport's flow control is the window, and
//! a failed write is reported by the file's next request that has a reply.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blake3::hazmat::ChainingValue;
use tern_core::delta::Signature;
use tern_core::endpoint::{BatchBody, BatchItem, BatchOptions, SmallFile};
use tern_core::{Dest, Entry, Error, FileSpec, Kind, Meta, ReadFile, Source, WriteFile, Xattrs};
use tern_proto::{negotiate, Auth, Hello, Msg, Welcome, WriteChunk};

use crate::compress::{Compression, Squeezed};
use crate::error::{NetError, Result};
use crate::identity::{fingerprint, Identity};
use crate::path::PathReport;
use crate::server::pack_around_holes;
use crate::stream::Stream;
use crate::transport::{Connector, Transport};
use crate::trust::TrustPolicy;
use crate::url::RemoteSpec;
use crate::wire;

/// Which transport a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// Decide by the path: TCP on a LAN-like path, QUIC otherwise.
    Auto,
    /// QUIC.
    Quic,
    /// TCP+TLS.
    Tcp,
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Transport.
    pub transport: TransportChoice,
    /// Token to authenticate with (proved, never sent, to a daemon of
    /// protocol 3 or later).
    pub token: Option<String>,
    /// A ticket from the daemon, to log in with instead (a daemon pulling
    /// on a client's behalf).
    pub ticket: Option<tern_proto::Ticket>,
    /// Server trust.
    pub trust: TrustPolicy,
    /// The client's own identity (presented as a TLS client certificate).
    pub identity_dir: Option<PathBuf>,
    /// Bound on connecting and on every wait for the server.
    pub timeout: Duration,
    /// The client will write.
    pub write: bool,
    /// When data is compressed, both ways.
    pub compress: Compression,
}

/// One stream's share of a bench transfer.
fn bench_stream(s: &mut Stream, upload: bool, bytes: u64) -> Result<()> {
    s.send(&Msg::Bench { upload, bytes })?;
    s.flush()?;
    let block = tern_proto::BENCH_BLOCK;
    let mut buf = vec![0u8; block];
    crate::compress::bench_filler(&mut buf);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block as u64) as usize;
        if upload {
            s.send_data(&buf[..n])?;
        } else {
            s.recv_data(&mut buf[..n])?;
        }
        left -= n as u64;
    }
    match s.recv()? {
        Msg::Done => Ok(()),
        _ => Err(NetError::Proto(tern_proto::ProtoError::Malformed(
            "unexpected reply to a bench request".into(),
        ))),
    }
}

/// The key of the daemon's path reports in a pull's summary JSON.
pub const PATHS_KEY: &str = "paths";

/// How a daemon-to-daemon run ended.
#[derive(Debug)]
pub struct PullOutcome {
    /// The run's summary.
    pub summary: tern_core::Summary,
    /// The transport the daemon used to reach the sources.
    pub transport: String,
    /// The daemon's view of each path to a source.
    pub paths: Vec<PathReport>,
}

/// What a TCP connection to the daemon shows before anything is sent.
#[derive(Debug, Clone, Copy)]
pub struct PathProbe {
    /// The quicker of up to two TCP connects: about one round trip.
    pub connect: Duration,
    /// This machine's TCP got BBR on that connection.
    pub tcp_bbr: bool,
}

/// Times a TCP connect to `addr`, and a second one when the first did not
/// look like a LAN (a busy machine can be slow to schedule the first), so
/// a LAN is not taken for a long path. `None` when TCP does not connect.
pub fn probe_path(addr: SocketAddr, timeout: Duration) -> Option<PathProbe> {
    probe_keeping(addr, timeout).ok().map(|(p, _)| p)
}

/// [`probe_path`], keeping the quicker connection: a copy over TCP runs its
/// first TLS session on it rather than pay another round trip to connect.
/// A first connect of ten LAN round trips or more is taken as it is (a
/// stall that long is rarer than a long path), except on loopback.
/// The first connect's error when none connected.
fn probe_keeping(addr: SocketAddr, timeout: Duration) -> std::io::Result<(PathProbe, std::net::TcpStream)> {
    use std::os::fd::AsRawFd;
    let mut best: Option<(PathProbe, std::net::TcpStream)> = None;
    for _ in 0..2 {
        let start = Instant::now();
        let sock = match std::net::TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => s,
            Err(e) if best.is_none() => return Err(e),
            Err(_) => break,
        };
        let p = PathProbe {
            connect: start.elapsed(),
            tcp_bbr: crate::path::tune_tcp(sock.as_raw_fd()) == "bbr",
        };
        let again = p.connect >= LAN_RTT && (p.connect < 10 * LAN_RTT || addr.ip().is_loopback());
        if best.as_ref().is_none_or(|(b, _)| p.connect < b.connect) {
            best = Some((p, sock));
        }
        if !again {
            break;
        }
    }
    best.ok_or_else(|| std::io::Error::other("no connection"))
}

/// What `--transport auto` picks: TCP on a LAN-like path (connect time
/// under [`LAN_RTT`]), where it costs half QUIC's CPU; TCP too when the
/// side that sends (this machine for a push, the daemon for a pull, as its
/// Hello says) paces with BBR, which kept pace with or beat QUIC on every
/// emulated long path (bench/wan.sh); QUIC otherwise, since a sender stuck
/// with CUBIC collapses on a lossy path.
pub fn auto_transport(lan_like: bool, sender_bbr: bool) -> Transport {
    if lan_like || sender_bbr {
        Transport::Tcp
    } else {
        Transport::Quic
    }
}

/// Round trips below this look like a LAN, where parallel TCP streams are
/// the fastest; above it, QUIC with BBR copes better with distance and loss.
pub const LAN_RTT: Duration = Duration::from_millis(2);

/// Streams not in use, and how many more are being opened for the pool.
#[derive(Default)]
struct Pool {
    idle: Vec<Stream>,
    opening: usize,
}

/// Requests sent and the waits that nothing else overlapped.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    waits: AtomicU64,
    /// Requests sent whose replies are still due.
    in_flight: AtomicU64,
}

/// One request whose reply is due; the count drops when it is dropped.
struct InFlight(Arc<Counts>);

impl Counts {
    /// A request that waits for its reply starts: counted, and counted as
    /// a wait when it is the only one in flight.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.waits.fetch_add(1, Ordering::Relaxed);
        }
        InFlight(self.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The stream that carries queued changes (`MakeDir`, `SetMeta`, `Remove`):
/// sent without waiting, applied by the daemon in order, their failures
/// collected by `Settle`. Requests that depend on them (`Create`, `Batch`,
/// `HardLink`) are preceded by `After`, so the daemon applies them only
/// once the changes sent before have landed.
#[derive(Default)]
struct Ops {
    stream: Option<Stream>,
    /// Changes queued so far.
    sent: u64,
    /// Of those, how many have been flushed to the transport.
    flushed: u64,
    /// `sent` at the last `Settle`.
    settled: u64,
    /// Failures a `Settle` sent with the last `Barrier` brought back, for
    /// the next [`Dest::settle`].
    reported: Vec<(Vec<u8>, tern_proto::ErrorMsg)>,
    reported_more: u64,
}

/// A listing streaming ahead of the scan (`Walk`).
struct WalkAhead {
    /// Where the walk starts, relative to the endpoint's path.
    top: PathBuf,
    req: tern_proto::Walk,
    stream: Option<Stream>,
    /// The next directory's listing, read but not yet asked for.
    next: Option<(
        PathBuf,
        std::result::Result<Vec<tern_proto::WireEntry>, tern_proto::ErrorMsg>,
    )>,
    /// The walk is over (or given up): later listings are asked for one
    /// by one.
    done: bool,
    /// Times the walk was started again after its stream failed.
    restarts: u32,
    _in_flight: Option<InFlight>,
}

/// A walk's stream that fails (the daemon gave up on a scan that stalled
/// behind a long transfer, say) is started again from where the scan is,
/// at most this many times.
const WALK_RESTARTS: u32 = 8;

/// How long the root's entry from [`RemoteEndpoint::stat_root`] stands in
/// for the engine's first stat of it: the few moments between resolving
/// the command line and planning.
const ROOT_SEEN_FOR: Duration = Duration::from_secs(2);

/// Deferred steps of a file being committed with one `Commit` request.
#[derive(Default)]
struct PendingCommit {
    meta: Option<(Meta, bool, Xattrs)>,
    sync: bool,
    verify: Option<[u8; 32]>,
}

struct Inner {
    // Dropped last: the connection and streams need it to close.
    conn: Connector,
    pool: Mutex<Pool>,
    pool_changed: std::sync::Condvar,
    /// Bound on waiting for the daemon.
    timeout: Duration,
    welcome: Welcome,
    /// Protocol features both sides offer.
    features: u64,
    /// Both sides speak the pipelined requests (version 2).
    pipelined: bool,
    /// The protocol version agreed.
    version: u16,
    counts: Arc<Counts>,
    /// Compression as asked for, and what crossed compressed.
    compress: Compression,
    squeezed: Arc<Squeezed>,
    /// The stream of queued changes, once one was queued.
    ops: Mutex<Ops>,
    /// Listings streaming ahead of the scan.
    walks: Mutex<Vec<WalkAhead>>,
    /// The root's entry as [`RemoteEndpoint::stat_root`] found it, for the
    /// engine's own look at the root that follows.
    root_seen: Mutex<Option<(Instant, Option<Entry>)>>,
    next_handle: AtomicU64,
    spec: RemoteSpec,
    lost: AtomicBool,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut w) = self.walks.lock() {
            w.clear();
        }
        if let Ok(mut o) = self.ops.lock() {
            if let Some(mut s) = o.stream.take() {
                let _ = s.finish();
            }
        }
        if let Ok(mut p) = self.pool.lock() {
            for mut s in p.idle.drain(..) {
                let _ = s.finish();
            }
        }
        self.conn.close();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// A module (or a path inside one) on a tern daemon.
#[derive(Clone)]
pub struct RemoteEndpoint {
    inner: Arc<Inner>,
}

/// The daemon's address.
pub fn resolve(spec: &RemoteSpec) -> Result<SocketAddr> {
    (spec.host.as_str(), spec.port)
        .to_socket_addrs()
        .map_err(|e| NetError::Config(format!("{}: cannot resolve host: {e}", spec.host)))?
        .next()
        .ok_or_else(|| NetError::Config(format!("{}: host has no address", spec.host)))
}

/// The highest protocol version this client offers: [`tern_proto::VERSION_MAX`],
/// or lower when `TERN_PROTOCOL_MAX` says so (to check that a daemon still
/// serves older clients).
fn version_max() -> u16 {
    std::env::var("TERN_PROTOCOL_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(tern_proto::VERSION_MAX, |v: u16| {
            v.clamp(tern_proto::VERSION_MIN, tern_proto::VERSION_MAX)
        })
}

/// The root's entry as the daemon answered it with the login.
type RootSeen = Option<(Instant, Option<Entry>)>;

/// Checks the daemon's key, then logs in: Hello, Auth and a `Stat` of the
/// root sent at once, their answers read together. A daemon that refuses
/// the login never reads the `Stat`.
fn login(
    conn: &Connector,
    first: &mut Stream,
    spec: &RemoteSpec,
    opts: &ConnectOptions,
    squeezed: &Arc<Squeezed>,
) -> Result<(Welcome, tern_proto::Agreed, RootSeen)> {
    let fp = fingerprint(conn.server_cert());
    crate::trust::check(&opts.trust, &spec.authority(), &fp)?;
    first.send(&Msg::Hello(our_hello(opts.compress)))?;
    // The Hello and the login go together, before the daemon's version is
    // known: a token is proved, never sent, unless this client plays an
    // older one (TERN_PROTOCOL_MAX).
    let login = match (&opts.ticket, &opts.token) {
        (None, Some(token)) if version_max() < tern_proto::VERSION_LOGIN => Msg::Auth(Auth {
            module: spec.module.clone(),
            token: Some(token.clone()),
            write: opts.write,
        }),
        (None, None) => Msg::Auth(Auth {
            module: spec.module.clone(),
            token: None,
            write: opts.write,
        }),
        (ticket, token) => {
            let exporter = first
                .exporter()
                .ok_or_else(|| NetError::Tls("no TLS exporter for the login proof".into()))?;
            Msg::Login(tern_proto::Login {
                module: spec.module.clone(),
                write: opts.write,
                proof: token
                    .as_ref()
                    .filter(|_| ticket.is_none())
                    .map(|t| crate::proof::token_proof(blake3::hash(t.as_bytes()).as_bytes(), &fp, &exporter)),
                ticket: ticket.clone(),
            })
        }
    };
    let proved = matches!(login, Msg::Login(_));
    first.send(&login)?;
    first.send(&Msg::Stat {
        path: wire::path_bytes(&spec.path),
    })?;
    let (welcome, agreed) = handshake_reply(first, opts.compress, squeezed).map_err(|e| match e {
        // A daemon before version 3 cannot read a Login; the token is not
        // sent to it instead, which a daemon pretending to be old would
        // otherwise get.
        NetError::Remote(m) if proved && m.code == tern_proto::ErrorCode::Protocol => NetError::Config(format!(
            "{}: the daemon is older than this client and cannot check a token without being sent it, \
             which tern does not do; upgrade tern there ({})",
            spec.authority(),
            m.message
        )),
        e => e,
    })?;
    let root_seen = match first.recv() {
        Ok(Msg::StatReply(e)) => match e.map(wire::unentry_any_name) {
            None => Some((Instant::now(), None)),
            Some(Some(e)) => Some((Instant::now(), Some(e))),
            Some(None) => None,
        },
        // Asked again, and reported, when the run looks at the root.
        Ok(_) | Err(NetError::Remote(_)) => None,
        Err(e) => return Err(e),
    };
    Ok((welcome, agreed, root_seen))
}

/// A client's runtime of `workers` threads, the daemon's address and the
/// TLS configuration with this client's key.
fn client_setup(
    spec: &RemoteSpec,
    opts: &ConnectOptions,
    workers: usize,
) -> Result<(tokio::runtime::Runtime, SocketAddr, rustls::ClientConfig)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("tern-net")
        .build()?;
    let addr = resolve(spec)?;
    let identity = match &opts.identity_dir {
        Some(d) => Some(Identity::load_or_create(d)?),
        None => None,
    };
    Ok((rt, addr, crate::tls::client_config(identity.as_ref())?))
}

/// The modules of the daemon `spec` names (its module and path unused)
/// that this client may use, as the daemon's grants for its token or key
/// allow, sorted by name; over TCP unless QUIC is asked for.
pub fn list_modules(spec: &RemoteSpec, opts: &ConnectOptions) -> Result<Vec<tern_proto::ModuleInfo>> {
    let (rt, addr, tls) = client_setup(spec, opts, 1)?;
    let kind = match opts.transport {
        TransportChoice::Quic => Transport::Quic,
        _ => Transport::Tcp,
    };
    let (conn, mut s) =
        Connector::connect(rt.handle().clone(), kind, addr, tls, opts.timeout).map_err(|e| match e {
            NetError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => NetError::Refused(addr),
            e => e,
        })?;
    let fp = fingerprint(conn.server_cert());
    crate::trust::check(&opts.trust, &spec.authority(), &fp)?;
    let proof = match &opts.token {
        Some(t) => {
            let exporter = s
                .exporter()
                .ok_or_else(|| NetError::Tls("no TLS exporter for the token proof".into()))?;
            Some(crate::proof::token_proof(
                blake3::hash(t.as_bytes()).as_bytes(),
                &fp,
                &exporter,
            ))
        }
        None => None,
    };
    s.send(&Msg::Hello(our_hello(Compression::Never)))?;
    s.send(&Msg::ListModules { proof })?;
    s.flush()?;
    let theirs = match s.recv()? {
        Msg::Hello(h) => h,
        _ => {
            return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                "expected Hello".into(),
            )))
        }
    };
    let old = theirs.features & tern_proto::FEATURE_MODULES == 0;
    let reply = s.recv();
    let _ = s.finish();
    conn.close();
    match reply {
        Ok(Msg::Modules(list)) => Ok(list),
        Err(NetError::Remote(m)) if old && m.code == tern_proto::ErrorCode::Protocol => Err(NetError::Config(format!(
            "{}: this daemon cannot list its modules; name one (tern://{}/MODULE/) or upgrade tern there",
            spec.authority(),
            spec.authority()
        ))),
        Ok(_) => Err(NetError::Proto(tern_proto::ProtoError::Malformed(
            "expected the module list".into(),
        ))),
        Err(e) => Err(e),
    }
}

/// This client's Hello: compression offered as asked for.
fn our_hello(compress: Compression) -> Hello {
    let mut ours = Hello::ours(concat!("tern ", env!("CARGO_PKG_VERSION")));
    ours.version_max = version_max();
    ours.features = compress.offer(ours.features);
    ours
}

fn handshake(
    s: &mut Stream,
    second: Msg,
    compress: Compression,
    squeezed: &Arc<Squeezed>,
) -> Result<(Welcome, tern_proto::Agreed)> {
    s.send(&Msg::Hello(our_hello(compress)))?;
    s.send(&second)?;
    handshake_reply(s, compress, squeezed)
}

/// Reads the daemon's Hello and Welcome; the stream compresses from then on
/// as both agreed.
fn handshake_reply(
    s: &mut Stream,
    compress: Compression,
    squeezed: &Arc<Squeezed>,
) -> Result<(Welcome, tern_proto::Agreed)> {
    let ours = our_hello(compress);
    let theirs = match s.recv()? {
        Msg::Hello(h) => h,
        _ => {
            return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                "expected Hello".into(),
            )))
        }
    };
    let agreed = negotiate(&ours, &theirs)?;
    s.agree(agreed.features, squeezed.clone());
    match s.recv()? {
        Msg::Welcome(w) => Ok((w, agreed)),
        _ => Err(NetError::Proto(tern_proto::ProtoError::Malformed(
            "expected Welcome".into(),
        ))),
    }
}

impl RemoteEndpoint {
    /// Connects, checks the server's key, authenticates.
    pub fn connect(spec: &RemoteSpec, opts: &ConnectOptions) -> Result<RemoteEndpoint> {
        let (rt, addr, tls) = client_setup(spec, opts, 2)?;
        // `ask`: a pull on a long path, where the daemon sends. TCP serves
        // as well as QUIC there if the daemon's TCP has BBR, at about half
        // the CPU; its Hello says so, over the connection the probe made.
        let (kind, probed, ask) = match opts.transport {
            TransportChoice::Quic => (Transport::Quic, None, false),
            TransportChoice::Tcp => (Transport::Tcp, None, false),
            TransportChoice::Auto => match probe_keeping(addr, opts.timeout) {
                Ok((p, sock)) if opts.write => (auto_transport(p.connect < LAN_RTT, p.tcp_bbr), Some(sock), false),
                Ok((p, sock)) => match auto_transport(p.connect < LAN_RTT, false) {
                    Transport::Quic => (Transport::Tcp, Some(sock), true),
                    k => (k, Some(sock), false),
                },
                // A tern daemon listens on TCP and UDP alike: a refused TCP
                // connect means none is there, and QUIC would only wait
                // out its timeout to say so.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(NetError::Refused(addr)),
                // TCP may be filtered where UDP is not.
                Err(_) => (Transport::Quic, None, false),
            },
        };
        let probed = probed.filter(|_| kind == Transport::Tcp);
        let connected = Connector::connect_over(rt.handle().clone(), kind, addr, tls.clone(), opts.timeout, probed);
        let (mut conn, mut first) = match (connected, opts.transport) {
            (Ok(c), _) => c,
            // Auto falls back to TCP where UDP does not get through.
            (Err(e), TransportChoice::Auto) if kind == Transport::Quic => {
                tracing::info!(error = %e, "QUIC failed; trying TCP");
                Connector::connect(rt.handle().clone(), Transport::Tcp, addr, tls.clone(), opts.timeout)?
            }
            (Err(e), _) => return Err(e),
        };
        let squeezed = Arc::new(Squeezed::default());
        let (mut welcome, mut agreed, mut root_seen) = login(&conn, &mut first, spec, opts, &squeezed)?;
        if ask && agreed.features & tern_proto::FEATURE_TCP_BBR == 0 {
            // Its TCP may back off at every loss: this pull goes over QUIC,
            // unless UDP does not get through.
            let quic = Connector::connect(rt.handle().clone(), Transport::Quic, addr, tls, opts.timeout)
                .and_then(|(c, mut s)| Ok((login(&c, &mut s, spec, opts, &squeezed)?, c, s)));
            match quic {
                Ok(((w, a, r), c, s)) => {
                    let _ = first.finish();
                    conn.close();
                    (conn, first, welcome, agreed, root_seen) = (c, s, w, a, r);
                }
                Err(e) => tracing::info!(error = %e, "QUIC failed; staying on TCP"),
            }
        }
        tracing::debug!(
            transport = conn.kind().name(),
            session = welcome.session,
            version = agreed.version,
            "connected"
        );
        // A long path is likely slower than compressing: compress from the
        // first byte, until the link's rate says otherwise.
        let rtt_ms = conn.path_report().rtt_ms.unwrap_or(0.0);
        squeezed.set_far(rtt_ms >= LAN_RTT.as_secs_f64() * 1e3);
        let counts = Arc::new(Counts::default());
        // The login: Auth and the root's Stat, sent together and waited
        // for once.
        counts.requests.fetch_add(2, Ordering::Relaxed);
        counts.waits.fetch_add(1, Ordering::Relaxed);
        Ok(RemoteEndpoint {
            inner: Arc::new(Inner {
                conn,
                pool: Mutex::new(Pool {
                    idle: vec![first],
                    opening: 0,
                }),
                pool_changed: std::sync::Condvar::new(),
                timeout: opts.timeout,
                welcome,
                features: agreed.features,
                pipelined: agreed.version >= tern_proto::VERSION_PIPELINE,
                version: agreed.version,
                counts,
                compress: opts.compress,
                squeezed,
                ops: Mutex::default(),
                walks: Mutex::default(),
                root_seen: Mutex::new(root_seen),
                next_handle: AtomicU64::new(1),
                spec: spec.clone(),
                lost: AtomicBool::new(false),
                rt: Some(rt),
            }),
        })
    }

    /// The entry at the endpoint's root. The engine's first stat of the
    /// root, made right after to plan the run, is answered with this one
    /// rather than ask the same question again a round trip later.
    pub fn stat_root(&self) -> tern_core::Result<Option<Entry>> {
        // The answer that came with the login, if it came.
        let e = self.stat(Path::new(""))?;
        if let Ok(mut r) = self.inner.root_seen.lock() {
            *r = Some((Instant::now(), e.clone()));
        }
        Ok(e)
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.inner.conn.kind()
    }

    /// What the transport has seen of the path so far, with the requests
    /// sent and the waits with nothing else in flight.
    pub fn path_report(&self) -> PathReport {
        let mut r = self.inner.conn.path_report();
        r.requests = self.inner.counts.requests.load(Ordering::Relaxed);
        r.waits = self.inner.counts.waits.load(Ordering::Relaxed);
        r.bytes_compressed = self.inner.squeezed.raw.load(Ordering::Relaxed);
        r.bytes_compressed_wire = self.inner.squeezed.wire.load(Ordering::Relaxed);
        r
    }

    /// True once a request failed because the connection broke (worth a
    /// retry on a new connection).
    pub fn connection_lost(&self) -> bool {
        self.inner.lost.load(Ordering::Relaxed)
    }

    /// The location, for messages.
    pub fn spec(&self) -> &RemoteSpec {
        &self.inner.spec
    }

    /// The server's key fingerprint, as verified when connecting.
    pub fn server_fingerprint(&self) -> String {
        fingerprint(self.inner.conn.server_cert())
    }

    /// Whether the daemon's TCP sends with BBR, as its Hello said.
    pub fn daemon_tcp_bbr(&self) -> bool {
        self.inner.features & tern_proto::FEATURE_TCP_BBR != 0
    }

    /// Whether the daemon sets a file's length itself ([`Dest::truncate`]
    /// without the data crossing).
    pub fn supports_truncate(&self) -> bool {
        self.inner.features & tern_proto::FEATURE_TRUNCATE != 0
    }

    /// Whether the daemon answers bench requests (`tern bench`).
    pub fn supports_bench(&self) -> bool {
        self.inner.features & tern_proto::FEATURE_BENCH != 0
    }

    /// The round-trip time of a request, the least of `n` (each a stat of
    /// the module's root on one stream).
    pub fn ping(&self, n: usize) -> Result<Duration> {
        let mut s = self.open_stream()?;
        let mut best = Duration::MAX;
        for _ in 0..n.max(1) {
            let t = Instant::now();
            s.send(&Msg::Stat { path: Vec::new() })?;
            s.flush()?;
            match s.recv()? {
                Msg::StatReply(_) => {}
                _ => {
                    return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                        "unexpected reply to a stat".into(),
                    )))
                }
            }
            best = best.min(t.elapsed());
        }
        Ok(best)
    }

    /// Moves `bytes` of filler data to (`upload`) or from the daemon over
    /// `streams` streams at once, as a transfer's workers would; returns
    /// the time from the first byte to the last reply. Nothing is stored.
    pub fn bench_transfer(&self, upload: bool, bytes: u64, streams: usize) -> Result<Duration> {
        let streams = streams.clamp(1, 64);
        let mut opened = Vec::with_capacity(streams);
        for _ in 0..streams {
            opened.push(self.take_stream()?);
        }
        let n = streams as u64;
        let start = Instant::now();
        let results: Vec<Result<()>> = std::thread::scope(|sc| {
            let handles: Vec<_> = opened
                .iter_mut()
                .zip(0..n)
                .map(|(s, i)| {
                    let share = bytes * (i + 1) / n - bytes * i / n;
                    sc.spawn(move || bench_stream(s, upload, share))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(NetError::Closed)))
                .collect()
        });
        let took = start.elapsed();
        results.into_iter().collect::<Result<Vec<()>>>()?;
        for s in opened {
            self.put_stream(s);
        }
        Ok(took)
    }

    /// A ticket from this daemon letting the daemon whose key is `holder`
    /// read this endpoint's path (and what is under it) on this client's behalf,
    /// for a few minutes: what a remote-to-remote transfer hands the
    /// destination. A daemon older than version 3 grants none.
    pub fn ticket(&self, holder: &str) -> Result<tern_proto::Ticket> {
        if self.inner.version < tern_proto::VERSION_LOGIN {
            return Err(NetError::Remote(tern_proto::ErrorMsg::new(
                tern_proto::ErrorCode::Forbidden,
                "the source daemon is older than this client and grants no tickets",
            )));
        }
        let mut s = self.take_stream()?;
        s.send(&Msg::GrantTicket {
            holder: holder.to_string(),
            path: wire::path_bytes(&self.inner.spec.path),
        })?;
        let reply = s.recv();
        self.inner.counts.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.counts.waits.fetch_add(1, Ordering::Relaxed);
        self.put_stream(s);
        match reply? {
            Msg::TicketReply(t) => Ok(t),
            _ => Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                "expected a ticket".into(),
            ))),
        }
    }

    /// Asks the daemon to keep what this session replaces or deletes: in
    /// `dir` (relative to the module's root) at each file's path below
    /// `base` (module-relative too), or beside the file, with `suffix`
    /// appended to the name. Before anything is written.
    pub fn keep_backups(&self, dir: Option<&Path>, base: &Path, suffix: &std::ffi::OsStr) -> tern_core::Result<()> {
        if self.inner.features & tern_proto::FEATURE_BACKUP == 0 {
            return Err(Error::Other {
                path: self.shown(Path::new("")),
                message: "this daemon cannot keep backups (--backup); upgrade tern there".into(),
            });
        }
        self.done(
            Path::new(""),
            Msg::Backup {
                dir: dir.map(wire::path_bytes),
                base: wire::path_bytes(base),
                suffix: suffix.as_encoded_bytes().to_vec(),
            },
        )
    }

    /// Whether the daemon can run a transfer from other daemons itself.
    pub fn supports_pull(&self) -> bool {
        self.inner.features & tern_proto::FEATURE_PULL != 0
    }

    /// Asks the daemon to run `req` (sources on other daemons, destination
    /// in this session's module), passing its events to `obs` until it
    /// ends. Returns the run's summary, the transport the daemon used and
    /// its view of the paths to the sources.
    /// Setting `cancel` stops waiting and drops the stream, which stops the
    /// daemon's run (partial files stay for a resume).
    pub fn pull(
        &self,
        req: tern_proto::PullRequest,
        extra: tern_proto::PullExtra,
        tickets: Vec<tern_proto::Ticket>,
        obs: &dyn tern_core::engine::Observer,
        cancel: &AtomicBool,
    ) -> Result<PullOutcome> {
        use tern_proto::RunEvent;
        if self.inner.version < tern_proto::VERSION_LOGIN {
            return Err(NetError::Remote(tern_proto::ErrorMsg::new(
                tern_proto::ErrorCode::Forbidden,
                "the daemon is older than this client and takes no tickets",
            )));
        }
        let mut s = self.open_stream()?;
        // A daemon from before the extra options takes the request without
        // them: delta on, compression auto.
        let req = Box::new(req);
        s.send(&match self.inner.features & tern_proto::FEATURE_COPIES {
            0 => Msg::PullTicketed { req, tickets },
            _ => Msg::PullWith { req, tickets, extra },
        })?;
        s.flush()?;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Ok(PullOutcome {
                    summary: tern_core::Summary {
                        interrupted: true,
                        ..Default::default()
                    },
                    transport: String::new(),
                    paths: Vec::new(),
                });
            }
            match s.recv()? {
                Msg::RunEvent(e) => match e {
                    RunEvent::Planned { files, bytes } => obs.planned(files, bytes),
                    RunEvent::ScanDone => obs.scan_done(),
                    RunEvent::Progress(n) => obs.progress(n),
                    RunEvent::FilesDone(n) => (0..n).for_each(|_| obs.file_done()),
                    RunEvent::Action { action, path, size } => {
                        if let Ok(a) = serde_json::from_str(&action) {
                            obs.action(a, &wire::bytes_path(&path), size);
                        }
                    }
                    RunEvent::Failed { path: Some(p), message } => {
                        let p = wire::bytes_path(&p);
                        let rel = p.strip_prefix(&self.inner.spec.path).unwrap_or(&p);
                        obs.error(&Error::Other {
                            path: self.shown(rel),
                            message,
                        })
                    }
                    // Already names its path (a source's).
                    RunEvent::Failed { path: None, message } => obs.error(&Error::Usage(message)),
                },
                Msg::RunDone {
                    summary_json,
                    transport,
                } => {
                    let bad = |e: serde_json::Error| {
                        NetError::Proto(tern_proto::ProtoError::Malformed(format!("run summary: {e}")))
                    };
                    let mut v: serde_json::Value = serde_json::from_str(&summary_json).map_err(bad)?;
                    // The daemon's view of its paths to the sources rides in
                    // the summary (older daemons send none).
                    let paths = match v.as_object_mut().and_then(|o| o.remove(PATHS_KEY)) {
                        Some(p) => serde_json::from_value(p).map_err(bad)?,
                        None => Vec::new(),
                    };
                    let summary = serde_json::from_value(v).map_err(bad)?;
                    return Ok(PullOutcome {
                        summary,
                        transport,
                        paths,
                    });
                }
                Msg::Error(e) => return Err(NetError::Remote(e)),
                _ => {
                    return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                        "unexpected message during a pull".into(),
                    )))
                }
            }
        }
    }

    /// Queues a change on the operations stream (opened on first use); it
    /// is applied in order without a reply, its failure reported by
    /// [`Dest::settle`].
    fn queue(&self, rel: &Path, msg: Msg) -> tern_core::Result<()> {
        let mut ops = self
            .inner
            .ops
            .lock()
            .map_err(|_| Error::Internal("poisoned lock".into()))?;
        if ops.stream.is_none() {
            let mut s = self.take_stream().map_err(|e| self.err(rel, e))?;
            s.send(&Msg::OpsStream).map_err(|e| self.err(rel, e))?;
            ops.stream = Some(s);
        }
        let Some(s) = ops.stream.as_mut() else {
            return Err(Error::Internal("operations stream missing".into()));
        };
        s.send(&msg).map_err(|e| self.err(rel, e))?;
        ops.sent += 1;
        self.sent();
        Ok(())
    }

    /// Makes the daemon apply what follows on `s` only after every change
    /// queued so far, flushing them first.
    fn after_ops(&self, s: &mut Stream) -> Result<()> {
        let sent = {
            let Ok(mut ops) = self.inner.ops.lock() else {
                return Err(NetError::Closed);
            };
            if ops.flushed < ops.sent {
                if let Some(o) = ops.stream.as_mut() {
                    o.flush()?;
                }
                ops.flushed = ops.sent;
            }
            ops.sent
        };
        if sent > 0 {
            s.send(&Msg::After { ops: sent })?;
        }
        Ok(())
    }

    /// The listing of `rel` from a walk streaming ahead, if one covers it
    /// and has it; `None`: ask for it alone.
    fn walked_listing(&self, rel: &Path) -> Option<tern_core::Result<Vec<Entry>>> {
        let mut walks = self.inner.walks.lock().ok()?;
        let w = walks.iter_mut().find(|w| !w.done && rel.starts_with(&w.top))?;
        let want = rel.strip_prefix(&w.top).ok()?.to_path_buf();
        loop {
            if w.next.is_none() {
                match self.walk_next(w, &want) {
                    Some(n) => w.next = Some(n),
                    None => return None,
                }
            }
            let dir = w.next.as_ref().map(|n| n.0.clone())?;
            match dir.cmp(&want) {
                // Listed ahead but never asked for (filtered out, or not
                // entered on this side): passed over.
                std::cmp::Ordering::Less => w.next = None,
                std::cmp::Ordering::Equal => {
                    let (_, listed) = w.next.take()?;
                    return Some(match listed {
                        Ok(entries) => self.entries(rel, entries),
                        Err(m) => Err(wire::unerror(m, self.shown(rel))),
                    });
                }
                // Not in the walk (made since it was listed): ask alone.
                std::cmp::Ordering::Greater => return None,
            }
        }
    }

    /// Reads the walk's next directory; `None` at its end. A failed stream
    /// is started again from `want`, which the scan asks for now.
    fn walk_next(
        &self,
        w: &mut WalkAhead,
        want: &Path,
    ) -> Option<(
        PathBuf,
        std::result::Result<Vec<tern_proto::WireEntry>, tern_proto::ErrorMsg>,
    )> {
        loop {
            let Some(s) = w.stream.as_mut() else {
                if w.restarts >= WALK_RESTARTS {
                    w.done = true;
                    return None;
                }
                w.restarts += 1;
                let mut req = w.req.clone();
                req.from = wire::path_bytes(want);
                tracing::debug!(from = %want.display(), "walk started again");
                match self.start_walk(&req) {
                    Ok((s, f)) => {
                        w.stream = Some(s);
                        w._in_flight = Some(f);
                    }
                    Err(_) => {
                        w.done = true;
                        return None;
                    }
                }
                continue;
            };
            match read_listing(s) {
                Ok(Some(n)) => return Some(n),
                Ok(None) => {
                    if let Some(s) = w.stream.take() {
                        self.put_stream(s);
                    }
                    w._in_flight = None;
                    w.done = true;
                    return None;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "walk stream failed");
                    w.stream = None;
                    w._in_flight = None;
                    if matches!(e, NetError::Remote(_)) {
                        // The daemon refused the walk itself.
                        w.done = true;
                        return None;
                    }
                }
            }
        }
    }

    fn start_walk(&self, req: &tern_proto::Walk) -> Result<(Stream, InFlight)> {
        let mut s = self.take_stream()?;
        let f = self.inner.counts.begin();
        s.send(&Msg::Walk(req.clone()))?;
        s.flush()?;
        Ok((s, f))
    }

    /// The results of a batch whose request failed as a whole (`e`): one
    /// error, on its first file, says how many were not `what` and why;
    /// the others refer to it, so a dropped connection is one line, not
    /// one a file.
    fn batch_failed<'a, T>(
        &self,
        rels: impl Iterator<Item = &'a Path>,
        what: &str,
        e: &Error,
    ) -> Vec<tern_core::Result<T>> {
        let rels: Vec<&Path> = rels.collect();
        let others = rels.len().saturating_sub(1);
        let detail = e.detail();
        rels.iter()
            .enumerate()
            .map(|(i, rel)| {
                Err(match (i, others) {
                    (0, 0) => Error::Other {
                        path: self.shown(rel),
                        message: format!("not {what}: {detail}"),
                    },
                    (0, n) => Error::Other {
                        path: self.shown(rel),
                        message: format!("not {what}, nor {n} more files of its batch: {detail}"),
                    },
                    _ => Error::WithBatch(self.shown(rel)),
                })
            })
            .collect()
    }

    /// Entries as the engine takes them: valid names, in name order.
    fn entries(&self, rel: &Path, r: Vec<tern_proto::WireEntry>) -> tern_core::Result<Vec<Entry>> {
        let mut out = Vec::with_capacity(r.len());
        for w in r {
            out.push(wire::unentry(w).ok_or_else(|| self.unexpected(rel))?);
        }
        // The engine merges listings by name: the order must be right.
        if out
            .windows(2)
            .any(|w| w[0].name.as_encoded_bytes() >= w[1].name.as_encoded_bytes())
        {
            return Err(self.unexpected(rel));
        }
        Ok(out)
    }

    /// A file of a `ReadFiles` answer: `FileData` and its bytes (or, for
    /// `ReadFilesDelta`, `FileDelta` and its literal bytes).
    fn recv_small(&self, s: &mut Stream, rel: &Path, e: &Entry) -> Result<tern_core::Result<SmallFile>> {
        let malformed = |m: String| NetError::Proto(tern_proto::ProtoError::Malformed(m));
        let (size, holes, hash, xattrs) = match s.recv_opt()? {
            Some(Msg::FileData {
                size,
                holes,
                hash,
                xattrs,
            }) => (size, holes, hash, xattrs),
            Some(Msg::FileDelta {
                size,
                pieces,
                literal,
                hash,
                xattrs,
            }) => {
                let recipe = wire::unrecipe(pieces, size).filter(|r| r.1 == literal);
                let Some((pieces, literal)) = recipe.filter(|_| size == e.size && size <= crate::server::MAX_CHUNK)
                else {
                    return Err(malformed(format!(
                        "a delta of a file of {} bytes that does not add up",
                        e.size
                    )));
                };
                let mut data = vec![0u8; literal as usize];
                s.recv_data(&mut data)?;
                return Ok(Ok(SmallFile {
                    data,
                    holes: Vec::new(),
                    xattrs: wire::unxattrs(xattrs),
                    delta: Some(tern_core::endpoint::SmallDelta {
                        pieces,
                        hash: blake3::Hash::from_bytes(hash),
                    }),
                }));
            }
            Some(Msg::FileFailed(m)) => return Ok(Err(wire::unerror(m, self.shown(rel)))),
            Some(Msg::Error(m)) => return Err(NetError::Remote(m)),
            _ => {
                return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                    "expected FileData".into(),
                )))
            }
        };
        if size != e.size || size > crate::server::MAX_CHUNK {
            return Err(NetError::Proto(tern_proto::ProtoError::Malformed(format!(
                "file of {size} bytes where {} were listed",
                e.size
            ))));
        }
        let holes = crate::server::check_holes(&holes, 0, size)
            .ok_or_else(|| NetError::Proto(tern_proto::ProtoError::Malformed("bad hole list".into())))?;
        let mut data = vec![0u8; size as usize];
        crate::server::recv_around_holes(s, &mut data, 0, &holes, true)?;
        if *blake3::hash(&data).as_bytes() != hash {
            return Ok(Err(Error::Other {
                path: self.shown(rel),
                message: "arrived corrupted (BLAKE3 mismatch); not written".into(),
            }));
        }
        Ok(Ok(SmallFile {
            data,
            holes,
            xattrs: wire::unxattrs(xattrs),
            delta: None,
        }))
    }

    fn full(&self, rel: &Path) -> Vec<u8> {
        wire::path_bytes(&self.inner.spec.path.join(rel))
    }

    fn shown(&self, rel: &Path) -> PathBuf {
        let mut spec = self.inner.spec.clone();
        if !rel.as_os_str().is_empty() {
            spec.path = spec.path.join(rel);
        }
        PathBuf::from(spec.display())
    }

    /// Runs `f` on a pooled stream (opening one if none is free).
    fn with<T>(&self, rel: &Path, f: impl FnOnce(&mut Stream) -> Result<T>) -> tern_core::Result<T> {
        let mut s = self.take_stream().map_err(|e| {
            if matches!(&e, NetError::Remote(m) if m.code == tern_proto::ErrorCode::Unauthorized) {
                // The daemon no longer knows the session (it restarted):
                // a retry with a new connection authenticates again.
                self.inner.lost.store(true, Ordering::Relaxed);
            }
            self.err(rel, e)
        })?;
        let r = f(&mut s);
        self.put_stream(s);
        r.map_err(|e| self.err(rel, e))
    }

    /// An idle stream from the pool; one being opened for it if there is
    /// none (rather than open yet another); else a new one.
    fn take_stream(&self) -> Result<Stream> {
        let deadline = Instant::now() + self.inner.timeout;
        if let Ok(mut p) = self.inner.pool.lock() {
            loop {
                if let Some(s) = p.idle.pop() {
                    return Ok(s);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if p.opening == 0 || left.is_zero() {
                    break;
                }
                p = match self.inner.pool_changed.wait_timeout(p, left) {
                    Ok((p, _)) => p,
                    Err(_) => break,
                };
            }
        }
        self.open_stream()
    }

    /// Gives a stream back to the pool, unless an error left it out of step.
    fn put_stream(&self, s: Stream) {
        if s.is_broken() {
            return;
        }
        if let Ok(mut p) = self.inner.pool.lock() {
            p.idle.push(s);
        }
        self.inner.pool_changed.notify_one();
    }

    /// Opens streams in the background, all at once, until the pool has
    /// `n` (idle or being opened), so that a run's workers, its walks and
    /// its queued changes find one ready instead of each paying the round
    /// trips of opening it (over TCP, a TCP and a TLS handshake, then the
    /// join) when it first needs it.
    pub fn open_streams_ahead(&self, n: usize) {
        let add = match self.inner.pool.lock() {
            Ok(mut p) => {
                let add = n.saturating_sub(p.idle.len() + p.opening);
                p.opening += add;
                add
            }
            Err(_) => return,
        };
        for _ in 0..add {
            let ep = self.clone();
            let spawned = std::thread::Builder::new().name("tern-open".into()).spawn(move || {
                let opened = ep.open_stream();
                if let Ok(mut p) = ep.inner.pool.lock() {
                    p.opening -= 1;
                    match opened {
                        Ok(s) => p.idle.push(s),
                        Err(e) => tracing::debug!(error = %e, "stream opened ahead failed"),
                    }
                }
                ep.inner.pool_changed.notify_all();
            });
            if spawned.is_err() {
                if let Ok(mut p) = self.inner.pool.lock() {
                    p.opening -= 1;
                }
            }
        }
    }

    fn open_stream(&self) -> Result<Stream> {
        let mut s = self.inner.conn.open()?;
        handshake(
            &mut s,
            Msg::Join {
                session: self.inner.welcome.session,
                secret: self.inner.welcome.secret,
            },
            self.inner.compress,
            &self.inner.squeezed,
        )?;
        Ok(s)
    }

    fn err(&self, rel: &Path, e: NetError) -> Error {
        match e {
            NetError::Remote(m) => {
                if m.code == tern_proto::ErrorCode::Unavailable {
                    // The daemon asks for a later try (overloaded, or a
                    // connection of this run broke with chunks on it): the
                    // run is tried again, and resumes.
                    self.inner.lost.store(true, Ordering::Relaxed);
                }
                wire::unerror(m, self.shown(rel))
            }
            e => {
                if matches!(
                    e,
                    NetError::Io(_) | NetError::Closed | NetError::Timeout(_) | NetError::Quic(_) | NetError::Tls(_)
                ) {
                    self.inner.lost.store(true, Ordering::Relaxed);
                }
                let why = match &e {
                    // rustls's words for a TCP connection closed under TLS.
                    NetError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                        "the daemon closed the connection".to_string()
                    }
                    e => e.to_string(),
                };
                Error::Other {
                    path: self.shown(rel),
                    message: format!("connection to {}: {why}", self.inner.spec.authority()),
                }
            }
        }
    }

    fn call(&self, rel: &Path, req: Msg) -> tern_core::Result<Msg> {
        self.request(rel, |s| {
            s.send(&req)?;
            s.recv()
        })
    }

    /// [`Self::call`], applied by the daemon after every change queued so
    /// far (the changes a request depends on: a directory made, a file
    /// removed).
    fn after_queued(&self, rel: &Path, req: &Msg) -> tern_core::Result<Msg> {
        self.request(rel, |s| {
            self.after_ops(s)?;
            s.send(req)?;
            s.recv()
        })
    }

    /// Runs `f`, a request that waits for its reply, on a pooled stream,
    /// counted as one request (and as a wait when nothing else is in
    /// flight).
    fn request<T>(&self, rel: &Path, f: impl FnOnce(&mut Stream) -> Result<T>) -> tern_core::Result<T> {
        let _in_flight = self.inner.counts.begin();
        self.with(rel, f)
    }

    /// Counts a message that asks for no reply.
    fn sent(&self) {
        self.inner.counts.requests.fetch_add(1, Ordering::Relaxed);
    }

    fn done(&self, rel: &Path, req: Msg) -> tern_core::Result<()> {
        match self.call(rel, req)? {
            Msg::Done => Ok(()),
            _ => Err(self.unexpected(rel)),
        }
    }

    fn unexpected(&self, rel: &Path) -> Error {
        self.inner.lost.store(true, Ordering::Relaxed);
        Error::Other {
            path: self.shown(rel),
            message: "unexpected reply from the server".into(),
        }
    }

    fn handle(&self) -> u64 {
        self.inner.next_handle.fetch_add(1, Ordering::Relaxed)
    }
}

/// Reads one directory of a walk, all its parts; `None` at `WalkDone`.
#[allow(clippy::type_complexity)]
fn read_listing(
    s: &mut Stream,
) -> Result<
    Option<(
        PathBuf,
        std::result::Result<Vec<tern_proto::WireEntry>, tern_proto::ErrorMsg>,
    )>,
> {
    let mut got: Option<(Vec<u8>, Vec<tern_proto::WireEntry>)> = None;
    loop {
        match s.recv()? {
            Msg::Listing { dir, entries, more } => {
                let all = match &mut got {
                    Some((d, all)) if *d == dir => all,
                    Some(_) => {
                        return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                            "a listing ended early".into(),
                        )))
                    }
                    None => &mut got.insert((dir, Vec::new())).1,
                };
                all.extend(entries);
                if !more {
                    return Ok(got.map(|(d, all)| (wire::bytes_path(&d), Ok(all))));
                }
            }
            Msg::ListingFailed { dir, error } if got.is_none() => {
                return Ok(Some((wire::bytes_path(&dir), Err(error))))
            }
            Msg::WalkDone if got.is_none() => return Ok(None),
            _ => {
                return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                    "unexpected message in a walk".into(),
                )))
            }
        }
    }
}

impl Source for RemoteEndpoint {
    fn describe(&self, rel: &Path) -> String {
        self.shown(rel).display().to_string()
    }

    fn stat(&self, rel: &Path) -> tern_core::Result<Option<Entry>> {
        if rel.as_os_str().is_empty() {
            let seen = self.inner.root_seen.lock().ok().and_then(|mut r| r.take());
            if let Some((at, e)) = seen.filter(|(at, _)| at.elapsed() < ROOT_SEEN_FOR) {
                tracing::trace!(age = ?at.elapsed(), "root entry as seen when resolving");
                return Ok(e);
            }
        }
        match self.call(rel, Msg::Stat { path: self.full(rel) })? {
            Msg::StatReply(None) => Ok(None),
            Msg::StatReply(Some(e)) => wire::unentry_any_name(e).map(Some).ok_or_else(|| self.unexpected(rel)),
            _ => Err(self.unexpected(rel)),
        }
    }

    fn read_dir(&self, rel: &Path) -> tern_core::Result<Vec<Entry>> {
        if let Some(listed) = self.walked_listing(rel) {
            return listed;
        }
        let path = self.full(rel);
        let r = self.request(rel, |s| {
            s.send(&Msg::ReadDir { path })?;
            let mut out = Vec::new();
            loop {
                match s.recv()? {
                    Msg::Entries { entries, more } => {
                        out.extend(entries);
                        if !more {
                            return Ok(out);
                        }
                    }
                    _ => {
                        return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                            "expected Entries".into(),
                        )))
                    }
                }
            }
        })?;
        self.entries(rel, r)
    }

    fn open(&self, rel: &Path, expect: &Entry) -> tern_core::Result<Box<dyn ReadFile>> {
        let handle = self.handle();
        self.done(
            rel,
            Msg::OpenRead {
                handle,
                path: self.full(rel),
                expect: wire::entry(expect),
            },
        )?;
        Ok(Box::new(RemoteReadFile {
            ep: self.clone(),
            rel: rel.to_path_buf(),
            handle,
            sparse: expect.allocated < expect.size,
            size: expect.size,
            cvs: Mutex::default(),
        }))
    }

    fn xattrs(&self, rel: &Path) -> tern_core::Result<Xattrs> {
        match self.call(rel, Msg::Xattrs { path: self.full(rel) })? {
            Msg::XattrList(x) => Ok(wire::unxattrs(x)),
            _ => Err(self.unexpected(rel)),
        }
    }

    fn file_hash(&self, rel: &Path, expect: &Entry) -> Option<tern_core::Result<tern_core::hash::Hash>> {
        let r = self.call(
            rel,
            Msg::Hash {
                path: self.full(rel),
                expect: wire::entry(expect),
            },
        );
        Some(match r {
            Ok(Msg::HashReply(h)) => Ok(blake3::Hash::from_bytes(h)),
            Ok(_) => Err(self.unexpected(rel)),
            Err(e) => Err(e),
        })
    }

    fn file_hashes(&self, items: &[(&Path, &Entry)]) -> Option<Vec<tern_core::Result<tern_core::hash::Hash>>> {
        if !self.inner.pipelined {
            return None;
        }
        let mut out = Vec::with_capacity(items.len());
        for part in items.chunks(tern_proto::MAX_BATCH_FILES) {
            let req = Msg::HashFiles {
                items: part.iter().map(|(rel, e)| (self.full(rel), wire::entry(e))).collect(),
            };
            let first = part.first().map_or(Path::new(""), |(rel, _)| *rel);
            match self.call(first, req) {
                Ok(Msg::Hashes(v)) if v.len() == part.len() => {
                    out.extend(v.into_iter().zip(part).map(|(h, (rel, _))| match h {
                        tern_proto::HashOutcome::Hash(h) => Ok(blake3::Hash::from_bytes(h)),
                        tern_proto::HashOutcome::Failed(m) => Err(wire::unerror(m, self.shown(rel))),
                    }))
                }
                Ok(_) => out.extend(part.iter().map(|(rel, _)| Err(self.unexpected(rel)))),
                Err(e) => out.extend(self.batch_failed(part.iter().map(|(rel, _)| *rel), "hashed", &e)),
            }
        }
        Some(out)
    }

    fn read_files(
        &self,
        items: &[(&Path, &Entry)],
        bases: &[Option<&Signature>],
        xattrs: bool,
    ) -> Vec<tern_core::Result<SmallFile>> {
        if !self.inner.pipelined {
            return items
                .iter()
                .map(|(rel, e)| tern_core::endpoint::read_file_whole(self, rel, e, xattrs))
                .collect();
        }
        let delta = self.inner.features & tern_proto::FEATURE_BATCH_DELTA != 0;
        let mut out = Vec::with_capacity(items.len());
        for (k, part) in items.chunks(tern_proto::MAX_BATCH_FILES).enumerate() {
            let from = k * tern_proto::MAX_BATCH_FILES;
            let sigs: Vec<(&Signature, u64)> = match delta {
                true => (from..from + part.len())
                    .zip(part)
                    .filter_map(|(i, (_, e))| Some((bases.get(i).copied().flatten()?, e.size)))
                    .collect(),
                false => Vec::new(),
            };
            let wanted = part.iter().map(|(rel, e)| (self.full(rel), wire::entry(e))).collect();
            let req = match sigs.is_empty() {
                true => Msg::ReadFiles { items: wanted, xattrs },
                false => Msg::ReadFilesDelta {
                    items: wanted,
                    bases: (from..from + part.len())
                        .map(|i| bases.get(i).copied().flatten().is_some())
                        .collect(),
                    xattrs,
                },
            };
            let mut got = Vec::with_capacity(part.len());
            tracing::debug!(files = part.len(), deltas = sigs.len(), "reading a batch");
            let r = self.request(Path::new(""), |s| {
                s.send(&req)?;
                for &(sig, size) in &sigs {
                    wire::send_signature(s, Some(sig), size)?;
                }
                s.flush()?;
                for (rel, e) in part {
                    got.push(self.recv_small(s, rel, e)?);
                }
                Ok(())
            });
            tracing::debug!(files = part.len(), "batch read");
            let done = got.len();
            out.extend(got);
            let rest = part[done..].iter().map(|(rel, _)| *rel);
            match r {
                Ok(()) => out.extend(rest.map(|rel| Err(self.unexpected(rel)))),
                Err(e) => out.extend(self.batch_failed(rest, "read", &e)),
            }
        }
        out
    }

    fn walk_ahead(&self, rel: &Path, filter: &tern_core::filter::Filter, as_path: &Path) {
        if !self.inner.pipelined {
            return;
        }
        let req = tern_proto::Walk {
            path: self.full(rel),
            rules: filter
                .rules()
                .iter()
                .map(|r| (r.pattern_bytes().to_vec(), r.is_include()))
                .collect(),
            prefix: wire::path_bytes(as_path),
            from: Vec::new(),
        };
        let started = self.start_walk(&req);
        let Ok(mut walks) = self.inner.walks.lock() else { return };
        // An earlier walk of the same tree is over: the scan moved on.
        walks.retain(|w| !w.done && w.top != rel);
        match started {
            Ok((s, f)) => walks.push(WalkAhead {
                top: rel.to_path_buf(),
                req,
                stream: Some(s),
                next: None,
                done: false,
                restarts: 0,
                _in_flight: Some(f),
            }),
            Err(e) => tracing::debug!(error = %e, "walk not started; listing directory by directory"),
        }
    }
}

struct RemoteReadFile {
    ep: RemoteEndpoint,
    rel: PathBuf,
    handle: u64,
    sparse: bool,
    size: u64,
    /// Chaining values the server sent, by offset, until asked for.
    cvs: Mutex<HashMap<u64, ChainingValue>>,
}

impl Drop for RemoteReadFile {
    fn drop(&mut self) {
        let handle = self.handle;
        self.ep.sent();
        let _ = self.ep.with(&self.rel, |s| {
            s.send(&Msg::CloseRead { handle })?;
            s.flush()
        });
    }
}

impl ReadFile for RemoteReadFile {
    fn delta_plan(
        &self,
        sig: &tern_core::delta::Signature,
        chunk_size: u64,
    ) -> tern_core::Result<Option<tern_core::delta::Plan>> {
        if self.ep.inner.features & tern_proto::FEATURE_DELTA == 0 {
            return Ok(None);
        }
        let grid = tern_core::hash::chunk_count(self.size, chunk_size) as usize;
        self.ep.inner.counts.requests.fetch_add(1, Ordering::Relaxed);
        self.ep.inner.counts.waits.fetch_add(1, Ordering::Relaxed);
        self.ep.with(&self.rel, |s| {
            let parts: Vec<&[(u64, u32)]> = sig.chunks.chunks(tern_proto::SIGNATURE_PART).collect();
            let n = parts.len().max(1);
            let id_bytes = sig.id_bytes_for(self.size);
            for i in 0..n {
                let part = parts.get(i).copied().unwrap_or_default();
                let (handle, avg, last, size) = (self.handle, sig.avg, i + 1 == n, self.size);
                s.send(&match s.has(tern_proto::FEATURE_SHORT_IDS) {
                    true => Msg::ShortDeltaBasis {
                        handle,
                        avg,
                        chunks: tern_proto::ShortIds::new(id_bytes, part),
                        last,
                        size,
                        chunk_size,
                    },
                    false => Msg::DeltaBasis {
                        handle,
                        avg,
                        chunks: part.iter().map(|&c| wire::id(c)).collect(),
                        last,
                        size,
                        chunk_size,
                    },
                })?;
            }
            let bad = |m: &str| NetError::Proto(tern_proto::ProtoError::Malformed(m.into()));
            let mut plan = tern_core::delta::Plan::default();
            loop {
                let Msg::DeltaPlan { first, chunks, last } = s.recv()? else {
                    return Err(bad("expected a delta plan"));
                };
                if first != plan.chunks.len() as u64 || plan.chunks.len() + chunks.len() > grid {
                    return Err(bad("a delta plan out of order or too long"));
                }
                for c in chunks {
                    let i = plan.chunks.len() as u64;
                    let len = chunk_size.min(self.size - i * chunk_size);
                    let pieces: Vec<_> = c.into_iter().map(wire::unpiece).collect();
                    if pieces.iter().map(|p| p.len()).sum::<u64>() != len {
                        return Err(bad("a delta recipe that does not add up to its chunk"));
                    }
                    for p in &pieces {
                        match p {
                            tern_core::delta::Piece::Copy { .. } => plan.matched += p.len(),
                            tern_core::delta::Piece::Literal { .. } => plan.literal += p.len(),
                        }
                    }
                    plan.chunks.push(pieces);
                }
                if last {
                    break;
                }
            }
            // The source's side found it not worth a delta.
            if plan.chunks.is_empty() {
                return Ok(None);
            }
            if plan.chunks.len() != grid {
                return Err(bad("a delta plan that does not cover the file"));
            }
            Ok(Some(plan))
        })
    }

    fn read_delta(&self, index: u64, _offset: u64, len: u64) -> tern_core::Result<(ChainingValue, Vec<u8>)> {
        self.ep.inner.counts.requests.fetch_add(1, Ordering::Relaxed);
        self.ep.with(&self.rel, |s| {
            s.send(&Msg::ReadDelta {
                handle: self.handle,
                index,
            })?;
            let Msg::DeltaRead { cv, literal } = s.recv()? else {
                return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                    "expected a delta read".into(),
                )));
            };
            if literal > len {
                return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                    "more literal bytes than the chunk".into(),
                )));
            }
            let mut literals = vec![0u8; literal as usize];
            s.recv_data(&mut literals)?;
            Ok((cv, literals))
        })
    }

    fn describe(&self) -> PathBuf {
        self.ep.shown(&self.rel)
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> tern_core::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let handle = self.handle;
        let cv = self.ep.request(&self.rel, |s| {
            s.send(&Msg::Read { handle, offset, len })?;
            match s.recv()? {
                Msg::ReadReply { len: n, cv } if n == len => {
                    s.recv_data(buf)?;
                    Ok(cv)
                }
                _ => Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                    "bad read reply".into(),
                ))),
            }
        })?;
        if let Ok(mut m) = self.cvs.lock() {
            m.insert(offset, cv);
        }
        Ok(())
    }

    fn sent_cv(&self, offset: u64) -> Option<ChainingValue> {
        self.cvs.lock().ok().and_then(|mut m| m.remove(&offset))
    }

    fn data_ranges(&self, offset: u64, len: u64) -> tern_core::Result<Vec<(u64, u64)>> {
        if !self.sparse {
            return Ok(vec![(offset, len)]);
        }
        match self.ep.call(
            &self.rel,
            Msg::Ranges {
                handle: self.handle,
                offset,
                len,
            },
        )? {
            Msg::RangesReply(r) => {
                let end = offset + len;
                let mut pos = offset;
                for &(s, l) in &r {
                    if s < pos || s.checked_add(l).is_none_or(|e| e > end) {
                        return Err(self.ep.unexpected(&self.rel));
                    }
                    pos = s + l;
                }
                Ok(r)
            }
            _ => Err(self.ep.unexpected(&self.rel)),
        }
    }

    fn check_unchanged(&self) -> tern_core::Result<()> {
        self.ep.done(&self.rel, Msg::CheckUnchanged { handle: self.handle })
    }
}

impl Dest for RemoteEndpoint {
    fn make_dir(&self, rel: &Path) -> tern_core::Result<()> {
        let req = Msg::MakeDir { path: self.full(rel) };
        if self.inner.pipelined {
            return self.queue(rel, req);
        }
        self.done(rel, req)
    }

    fn create(&self, rel: &Path, spec: &FileSpec) -> tern_core::Result<Box<dyn WriteFile>> {
        let handle = self.handle();
        let req = Msg::Create {
            handle,
            path: self.full(rel),
            spec: wire::spec(spec),
        };
        // A daemon keeps a file locked for a connection it has not yet seen
        // die: a client killed mid-transfer over QUIC sends no close, so
        // the daemon learns of it only at the idle timeout. A rerun waits
        // that long rather than fail (found by tools/crash_resume.sh).
        let deadline = Instant::now() + crate::transport::QUIC_IDLE + Duration::from_secs(5);
        let r = loop {
            match self.after_queued(rel, &req) {
                Err(Error::Busy(_)) if Instant::now() < deadline => {
                    tracing::info!(path = %rel.display(), "the daemon still holds this file for an earlier connection; waiting");
                    std::thread::sleep(Duration::from_secs(1));
                }
                r => break r?,
            }
        };
        let Msg::Created { resumed } = r else {
            return Err(self.unexpected(rel));
        };
        Ok(Box::new(RemoteWriteFile {
            ep: self.clone(),
            rel: rel.to_path_buf(),
            handle,
            size: spec.size,
            writes: AtomicU64::new(0),
            resumed,
            pending: Mutex::default(),
        }))
    }

    fn symlink(&self, rel: &Path, target: &Path, meta: &Meta, owner: bool) -> tern_core::Result<()> {
        self.done(
            rel,
            Msg::Symlink {
                path: self.full(rel),
                target: wire::path_bytes(target),
                meta: wire::meta(meta),
                owner,
            },
        )
    }

    fn hard_link(&self, existing: &Path, rel: &Path) -> tern_core::Result<bool> {
        let req = Msg::HardLink {
            existing: self.full(existing),
            path: self.full(rel),
        };
        match self.after_queued(rel, &req)? {
            Msg::Linked(b) => Ok(b),
            _ => Err(self.unexpected(rel)),
        }
    }

    fn set_meta(
        &self,
        rel: &Path,
        kind: Kind,
        meta: &Meta,
        owner: bool,
        xattrs: Option<&Xattrs>,
    ) -> tern_core::Result<()> {
        let path = self.full(rel);
        if path.is_empty() {
            // The daemon refuses: its module's root is its administrator's.
            tracing::debug!(module = %self.inner.spec.module, "the module root's metadata is left to the daemon");
            return Ok(());
        }
        let req = Msg::SetMeta {
            path,
            kind: wire::kind(kind),
            meta: wire::meta(meta),
            owner,
            xattrs: xattrs.map(wire::xattrs),
        };
        if self.inner.pipelined {
            return self.queue(rel, req);
        }
        self.done(rel, req)
    }

    fn rename(&self, from: &Path, to: &Path) -> tern_core::Result<()> {
        if self.inner.features & tern_proto::FEATURE_RENAME == 0 {
            return Err(Error::Other {
                path: self.shown(from),
                message: "this daemon cannot rename entries; upgrade tern there".into(),
            });
        }
        self.done(
            from,
            Msg::Rename {
                from: self.full(from),
                to: self.full(to),
            },
        )
    }

    fn truncate(&self, rel: &Path, size: u64) -> tern_core::Result<Entry> {
        if self.inner.features & tern_proto::FEATURE_TRUNCATE == 0 {
            return Err(Error::Other {
                path: self.shown(rel),
                message: "this daemon cannot set a file's length; upgrade tern there".into(),
            });
        }
        let req = Msg::Truncate {
            path: self.full(rel),
            size,
        };
        match self.after_queued(rel, &req)? {
            Msg::StatReply(Some(e)) => wire::unentry_any_name(e).ok_or_else(|| self.unexpected(rel)),
            _ => Err(self.unexpected(rel)),
        }
    }

    fn remove(&self, rel: &Path) -> tern_core::Result<()> {
        let req = Msg::Remove { path: self.full(rel) };
        if self.inner.pipelined {
            return self.queue(rel, req);
        }
        self.done(rel, req)
    }

    fn barrier(&self) -> tern_core::Result<()> {
        // After the queued changes, on their stream: what it makes durable
        // includes them.
        if let Ok(mut ops) = self.inner.ops.lock() {
            let ops = &mut *ops;
            if let Some(s) = ops.stream.as_mut() {
                // The settle that follows the barrier travels with it.
                let _f = self.inner.counts.begin();
                let r = (|| {
                    s.send(&Msg::Barrier)?;
                    s.send(&Msg::Settle)?;
                    let done = s.recv()?;
                    Ok::<_, NetError>((done, s.recv()?))
                })();
                ops.flushed = ops.sent;
                return match r {
                    Ok((Msg::Done, Msg::Settled { failed, more })) => {
                        ops.settled = ops.sent;
                        ops.reported.extend(failed);
                        ops.reported_more += more;
                        Ok(())
                    }
                    Ok(_) => Err(self.unexpected(Path::new(""))),
                    Err(e) => {
                        ops.stream = None;
                        Err(self.err(Path::new(""), e))
                    }
                };
            }
        }
        self.done(Path::new(""), Msg::Barrier)
    }

    fn settle(&self) -> Vec<Error> {
        let Ok(mut ops) = self.inner.ops.lock() else {
            return vec![Error::Internal("poisoned lock".into())];
        };
        let ops = &mut *ops;
        let r = match ops.stream.as_mut() {
            Some(s) if ops.settled != ops.sent => {
                let _f = self.inner.counts.begin();
                let r = s.send(&Msg::Settle).and_then(|()| s.recv());
                ops.flushed = ops.sent;
                ops.settled = ops.sent;
                r
            }
            _ => Ok(Msg::Settled {
                failed: Vec::new(),
                more: 0,
            }),
        };
        match r {
            Ok(Msg::Settled { mut failed, mut more }) => {
                failed.splice(0..0, std::mem::take(&mut ops.reported));
                more += std::mem::take(&mut ops.reported_more);
                let mut errs: Vec<Error> = failed
                    .into_iter()
                    .map(|(path, m)| {
                        let p = wire::bytes_path(&path);
                        let rel = p.strip_prefix(&self.inner.spec.path).unwrap_or(&p);
                        wire::unerror(m, self.shown(rel))
                    })
                    .collect();
                if more > 0 {
                    errs.push(Error::Other {
                        path: self.shown(Path::new("")),
                        message: format!("{more} more changes failed"),
                    });
                }
                errs
            }
            Ok(_) => vec![self.unexpected(Path::new(""))],
            Err(e) => {
                ops.stream = None;
                vec![self.err(Path::new(""), e)]
            }
        }
    }

    fn can_chown(&self) -> bool {
        self.inner.welcome.can_chown
    }

    fn basis_signatures(&self, items: &[(&Path, u64)]) -> Vec<Option<Signature>> {
        if !self.inner.pipelined || self.inner.features & tern_proto::FEATURE_BATCH_DELTA == 0 {
            return items.iter().map(|_| None).collect();
        }
        let mut out = Vec::with_capacity(items.len());
        for part in items.chunks(tern_proto::MAX_BATCH_FILES) {
            let req = Msg::BasisSignatures {
                items: part.iter().map(|&(rel, size)| (self.full(rel), size)).collect(),
            };
            let start = out.len();
            let r = self.request(Path::new(""), |s| {
                s.send(&req)?;
                s.flush()?;
                for _ in part {
                    out.push(wire::recv_signature(
                        s,
                        tern_core::delta::MAX_SIGNATURE_CHUNKS,
                        &mut |_| Ok(()),
                    )?);
                }
                Ok(())
            });
            if let Err(e) = r {
                // The files are then sent whole.
                tracing::debug!(error = %e, "no signatures for a batch");
                out.truncate(start);
                out.extend(part.iter().map(|_| None));
            }
        }
        out
    }

    fn write_batch(&self, items: Vec<BatchItem>, opts: &BatchOptions) -> Vec<tern_core::Result<()>> {
        let copies = |it: &BatchItem| matches!(it.body, BatchBody::Delta { basis: Some(_), .. });
        if self.inner.features & tern_proto::FEATURE_BATCH_COPIES == 0 && items.iter().any(copies) {
            // A daemon that cannot build a file of a batch from another
            // fails those items, which are then sent whole.
            let unbuilt: Vec<Option<PathBuf>> = items.iter().map(|it| copies(it).then(|| it.rel.clone())).collect();
            let rest: Vec<BatchItem> = items.into_iter().filter(|it| !copies(it)).collect();
            let mut sent = match rest.is_empty() {
                true => Vec::new(),
                false => self.write_batch(rest, opts),
            }
            .into_iter();
            return unbuilt
                .into_iter()
                .map(|u| match u {
                    Some(rel) => Err(tern_core::Error::Other {
                        path: self.shown(&rel),
                        message: "the daemon cannot build it from a copy; not built".into(),
                    }),
                    None => sent
                        .next()
                        .unwrap_or_else(|| Err(tern_core::Error::Internal("a batch answered short".into()))),
                })
                .collect();
        }
        let n = items.len();
        let mut wire_items = Vec::with_capacity(n);
        let mut rels = Vec::with_capacity(n);
        for it in &items {
            let body = match &it.body {
                BatchBody::File {
                    data,
                    holes,
                    hash,
                    xattrs,
                    spec,
                } => tern_proto::BatchBody::File {
                    size: data.len() as u64,
                    holes: holes.clone(),
                    hash: *hash.as_bytes(),
                    xattrs: wire::xattrs(xattrs),
                    changed: (spec.source_changed.sec, spec.source_changed.nsec),
                },
                BatchBody::Symlink { target } => tern_proto::BatchBody::Symlink {
                    target: wire::path_bytes(target),
                },
                BatchBody::Delta {
                    basis,
                    pieces,
                    literals,
                    hash,
                    xattrs,
                    spec,
                } => {
                    let delta = tern_proto::WireDelta {
                        size: spec.size,
                        pieces: pieces.iter().map(|&p| wire::piece(p)).collect(),
                        literal: literals.len() as u64,
                        hash: *hash.as_bytes(),
                        xattrs: wire::xattrs(xattrs),
                        changed: (spec.source_changed.sec, spec.source_changed.nsec),
                    };
                    match basis {
                        None => tern_proto::BatchBody::Delta(delta),
                        Some(b) => tern_proto::BatchBody::DeltaFrom {
                            basis: self.full(b),
                            delta,
                        },
                    }
                }
            };
            wire_items.push(tern_proto::BatchItem {
                path: self.full(&it.rel),
                meta: wire::meta(&it.meta),
                body,
            });
            rels.push(it.rel.clone());
        }
        let batch = tern_proto::Batch {
            items: wire_items,
            owner: opts.owner,
            sync: opts.sync,
            verify: opts.verify,
        };
        let r = self.request(Path::new(""), |s| {
            self.after_ops(s)?;
            s.send(&Msg::Batch(batch))?;
            for it in &items {
                match &it.body {
                    BatchBody::File { data, holes, .. } => s.send_data(&pack_around_holes(data, 0, holes))?,
                    BatchBody::Delta { literals, .. } => s.send_data(literals)?,
                    BatchBody::Symlink { .. } => {}
                }
            }
            s.recv()
        });
        match r {
            Ok(Msg::BatchReply(results)) if results.len() == n => results
                .into_iter()
                .zip(rels)
                .map(|(r, rel)| match r {
                    None => Ok(()),
                    Some(m) => Err(wire::unerror(m, self.shown(&rel))),
                })
                .collect(),
            Ok(_) => rels.iter().map(|r| Err(self.unexpected(r))).collect(),
            Err(e) => self.batch_failed(rels.iter().map(PathBuf::as_path), "written", &e),
        }
    }
}

struct RemoteWriteFile {
    ep: RemoteEndpoint,
    rel: PathBuf,
    handle: u64,
    size: u64,
    writes: AtomicU64,
    resumed: Vec<(u64, [u8; 32])>,
    /// With the pipelined protocol, metadata, sync and verify wait for
    /// `publish`, which sends them as one `Commit`.
    pending: Mutex<PendingCommit>,
}

impl RemoteWriteFile {
    fn defer(&self, f: impl FnOnce(&mut PendingCommit)) -> tern_core::Result<()> {
        let mut p = self
            .pending
            .lock()
            .map_err(|_| Error::Internal("poisoned lock".into()))?;
        f(&mut p);
        Ok(())
    }
}

impl WriteFile for RemoteWriteFile {
    fn resumed(&self) -> Vec<(u64, ChainingValue)> {
        self.resumed.clone()
    }

    fn write_chunk(
        &self,
        index: u64,
        offset: u64,
        data: &[u8],
        holes: &[(u64, u64)],
        cv: Option<&ChainingValue>,
    ) -> tern_core::Result<()> {
        // A chunk that is the whole file is checked by the file's hash (the
        // root), whatever chaining value the engine made of it.
        let cv = match cv {
            _ if offset == 0 && data.len() as u64 == self.size => *blake3::hash(data).as_bytes(),
            Some(cv) => *cv,
            None => tern_core::hash::cv_at(offset, data),
        };
        let wc = WriteChunk {
            handle: self.handle,
            index,
            offset,
            len: data.len() as u64,
            holes: holes.to_vec(),
            cv,
        };
        self.ep.sent();
        self.ep.with(&self.rel, |s| {
            s.send(&Msg::Write(wc))?;
            s.send_data(&pack_around_holes(data, offset, holes))?;
            s.flush()
        })?;
        self.writes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn use_basis(&self, rel: &Path) -> tern_core::Result<bool> {
        if self.ep.inner.features & tern_proto::FEATURE_COPIES == 0 {
            return Ok(false);
        }
        // Answered before any chunk is built from it, on whichever stream.
        self.ep.done(
            &self.rel,
            Msg::UseBasis {
                handle: self.handle,
                path: self.ep.full(rel),
            },
        )?;
        Ok(true)
    }

    fn basis_signature(&self) -> tern_core::Result<Option<tern_core::delta::Signature>> {
        if self.ep.inner.features & tern_proto::FEATURE_DELTA == 0 {
            return Ok(None);
        }
        self.ep.inner.counts.requests.fetch_add(1, Ordering::Relaxed);
        self.ep.inner.counts.waits.fetch_add(1, Ordering::Relaxed);
        self.ep.with(&self.rel, |s| {
            s.send(&Msg::BasisSignature { handle: self.handle })?;
            s.flush()?;
            wire::recv_signature(s, tern_core::delta::MAX_SIGNATURE_CHUNKS, &mut |_| Ok(()))
        })
    }

    fn write_delta(
        &self,
        index: u64,
        offset: u64,
        len: u64,
        pieces: &[tern_core::delta::Piece],
        literals: &[u8],
        cv: &ChainingValue,
    ) -> tern_core::Result<bool> {
        let pieces = pieces.iter().map(|&p| wire::piece(p)).collect();
        self.ep.sent();
        self.ep.with(&self.rel, |s| {
            s.send(&Msg::WriteDelta {
                handle: self.handle,
                index,
                offset,
                len,
                pieces,
                cv: *cv,
            })?;
            s.send_data(literals)?;
            s.flush()
        })?;
        self.writes.fetch_add(1, Ordering::AcqRel);
        // Whether the daemon could build it is known when the file is
        // committed: a chunk it could not fails the file.
        Ok(true)
    }

    fn set_meta(&self, meta: &Meta, owner: bool, xattrs: &Xattrs) -> tern_core::Result<()> {
        if self.ep.inner.pipelined {
            return self.defer(|p| p.meta = Some((meta.clone(), owner, xattrs.clone())));
        }
        self.ep.done(
            &self.rel,
            Msg::FileMeta {
                handle: self.handle,
                writes: self.writes.load(Ordering::Acquire),
                meta: wire::meta(meta),
                owner,
                xattrs: wire::xattrs(xattrs),
            },
        )
    }

    fn sync(&self) -> tern_core::Result<()> {
        if self.ep.inner.pipelined {
            return self.defer(|p| p.sync = true);
        }
        self.ep.done(&self.rel, Msg::Sync { handle: self.handle })
    }

    fn verify(&self, expected: &tern_core::hash::Hash) -> tern_core::Result<()> {
        if self.ep.inner.pipelined {
            return self.defer(|p| p.verify = Some(*expected.as_bytes()));
        }
        self.ep.done(
            &self.rel,
            Msg::Verify {
                handle: self.handle,
                hash: *expected.as_bytes(),
            },
        )
    }

    fn publish(self: Box<Self>) -> tern_core::Result<()> {
        if self.ep.inner.pipelined {
            let p = std::mem::take(
                &mut *self
                    .pending
                    .lock()
                    .map_err(|_| Error::Internal("poisoned lock".into()))?,
            );
            let Some((meta, owner, xattrs)) = p.meta else {
                return Err(Error::Internal(format!(
                    "{}: published without metadata",
                    self.rel.display()
                )));
            };
            return self.ep.done(
                &self.rel,
                Msg::Commit(tern_proto::Commit {
                    handle: self.handle,
                    writes: self.writes.load(Ordering::Acquire),
                    meta: wire::meta(&meta),
                    owner,
                    xattrs: wire::xattrs(&xattrs),
                    sync: p.sync,
                    verify: p.verify,
                }),
            );
        }
        self.ep.done(
            &self.rel,
            Msg::Publish {
                handle: self.handle,
                writes: self.writes.load(Ordering::Acquire),
            },
        )
    }

    fn abort(self: Box<Self>, keep: bool) {
        let handle = self.handle;
        self.ep.sent();
        let _ = self.ep.with(&self.rel, |s| {
            s.send(&Msg::Abort { handle, keep })?;
            s.flush()
        });
    }
}
