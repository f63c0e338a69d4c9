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
use tern_core::endpoint::{BatchBody, BatchItem, BatchOptions};
use tern_core::{Dest, Entry, Error, FileSpec, Kind, Meta, ReadFile, Source, WriteFile, Xattrs};
use tern_proto::{negotiate, Auth, Hello, Msg, Welcome, WriteChunk};

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
    /// Token to authenticate with.
    pub token: Option<String>,
    /// Server trust.
    pub trust: TrustPolicy,
    /// The client's own identity (presented as a TLS client certificate).
    pub identity_dir: Option<PathBuf>,
    /// Bound on connecting and on every wait for the server.
    pub timeout: Duration,
    /// The client will write.
    pub write: bool,
}

/// One stream's share of a bench transfer.
fn bench_stream(s: &mut Stream, upload: bool, bytes: u64) -> Result<()> {
    s.send(&Msg::Bench { upload, bytes })?;
    s.flush()?;
    let block = tern_proto::BENCH_BLOCK;
    let mut buf = vec![0x5au8; block];
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
    use std::os::fd::AsRawFd;
    let mut best: Option<PathProbe> = None;
    for _ in 0..2 {
        let start = Instant::now();
        let Ok(sock) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
            break;
        };
        let p = PathProbe {
            connect: start.elapsed(),
            tcp_bbr: crate::path::tune_tcp(sock.as_raw_fd()) == "bbr",
        };
        if best.is_none_or(|b| p.connect < b.connect) {
            best = Some(p);
        }
        if p.connect < LAN_RTT {
            break;
        }
    }
    best
}

/// What `--transport auto` picks: TCP on a LAN-like path (connect time
/// under [`LAN_RTT`]), where it costs half QUIC's CPU; TCP too when this
/// machine sends (`sends`) and its TCP paces with BBR, which kept pace
/// with or beat QUIC on every emulated long path (bench/wan.sh); QUIC
/// otherwise, since a sender stuck with CUBIC collapses on a lossy path.
pub fn auto_transport(lan_like: bool, sends: bool, tcp_bbr: bool) -> Transport {
    if lan_like || (sends && tcp_bbr) {
        Transport::Tcp
    } else {
        Transport::Quic
    }
}

/// Round trips below this look like a LAN, where parallel TCP streams are
/// the fastest; above it, QUIC with BBR copes better with distance and loss.
pub const LAN_RTT: Duration = Duration::from_millis(2);

struct Inner {
    // Dropped last: the connection and streams need it to close.
    conn: Connector,
    pool: Mutex<Vec<Stream>>,
    welcome: Welcome,
    /// Protocol features both sides offer.
    features: u64,
    next_handle: AtomicU64,
    spec: RemoteSpec,
    lost: AtomicBool,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.lock() {
            for mut s in p.drain(..) {
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

fn handshake(s: &mut Stream, second: Msg) -> Result<(Welcome, u64)> {
    let ours = Hello::ours(concat!("tern ", env!("CARGO_PKG_VERSION")));
    s.send(&Msg::Hello(ours.clone()))?;
    s.send(&second)?;
    let theirs = match s.recv()? {
        Msg::Hello(h) => h,
        _ => {
            return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                "expected Hello".into(),
            )))
        }
    };
    let agreed = negotiate(&ours, &theirs)?;
    match s.recv()? {
        Msg::Welcome(w) => Ok((w, agreed.features)),
        _ => Err(NetError::Proto(tern_proto::ProtoError::Malformed(
            "expected Welcome".into(),
        ))),
    }
}

impl RemoteEndpoint {
    /// Connects, checks the server's key, authenticates.
    pub fn connect(spec: &RemoteSpec, opts: &ConnectOptions) -> Result<RemoteEndpoint> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("tern-net")
            .build()?;
        let addr = resolve(spec)?;
        let identity = match &opts.identity_dir {
            Some(d) => Some(Identity::load_or_create(d)?),
            None => None,
        };
        let tls = crate::tls::client_config(identity.as_ref())?;
        let kind = match opts.transport {
            TransportChoice::Quic => Transport::Quic,
            TransportChoice::Tcp => Transport::Tcp,
            TransportChoice::Auto => match probe_path(addr, opts.timeout) {
                Some(p) => auto_transport(p.connect < LAN_RTT, opts.write, p.tcp_bbr),
                None => Transport::Quic,
            },
        };
        let connected = Connector::connect(rt.handle().clone(), kind, addr, tls.clone(), opts.timeout);
        let (conn, mut first) = match (connected, opts.transport) {
            (Ok(c), _) => c,
            // Auto falls back to TCP where UDP does not get through.
            (Err(e), TransportChoice::Auto) if kind == Transport::Quic => {
                tracing::info!(error = %e, "QUIC failed; trying TCP");
                Connector::connect(rt.handle().clone(), Transport::Tcp, addr, tls, opts.timeout)?
            }
            (Err(e), _) => return Err(e),
        };
        let fp = fingerprint(conn.server_cert());
        crate::trust::check(&opts.trust, &spec.authority(), &fp)?;
        let (welcome, features) = handshake(
            &mut first,
            Msg::Auth(Auth {
                module: spec.module.clone(),
                token: opts.token.clone(),
                write: opts.write,
            }),
        )?;
        tracing::debug!(transport = conn.kind().name(), session = welcome.session, "connected");
        Ok(RemoteEndpoint {
            inner: Arc::new(Inner {
                conn,
                pool: Mutex::new(vec![first]),
                welcome,
                features,
                next_handle: AtomicU64::new(1),
                spec: spec.clone(),
                lost: AtomicBool::new(false),
                rt: Some(rt),
            }),
        })
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.inner.conn.kind()
    }

    /// What the transport has seen of the path so far.
    pub fn path_report(&self) -> PathReport {
        self.inner.conn.path_report()
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
            let pooled = self.inner.pool.lock().ok().and_then(|mut p| p.pop());
            opened.push(match pooled {
                Some(s) => s,
                None => self.open_stream()?,
            });
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
        if let Ok(mut p) = self.inner.pool.lock() {
            p.extend(opened.into_iter().filter(|s| !s.is_broken()));
        }
        Ok(took)
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
        obs: &dyn tern_core::engine::Observer,
        cancel: &AtomicBool,
    ) -> Result<PullOutcome> {
        use tern_proto::RunEvent;
        let mut s = self.open_stream()?;
        s.send(&Msg::Pull(Box::new(req)))?;
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
        let pooled = self.inner.pool.lock().ok().and_then(|mut p| p.pop());
        let mut s = match pooled {
            Some(s) => s,
            None => self.open_stream().map_err(|e| {
                if matches!(&e, NetError::Remote(m) if m.code == tern_proto::ErrorCode::Unauthorized) {
                    // The daemon no longer knows the session (it restarted):
                    // a retry with a new connection authenticates again.
                    self.inner.lost.store(true, Ordering::Relaxed);
                }
                self.err(rel, e)
            })?,
        };
        let r = f(&mut s);
        if !s.is_broken() {
            if let Ok(mut p) = self.inner.pool.lock() {
                p.push(s);
            }
        }
        r.map_err(|e| self.err(rel, e))
    }

    fn open_stream(&self) -> Result<Stream> {
        let mut s = self.inner.conn.open()?;
        handshake(
            &mut s,
            Msg::Join {
                session: self.inner.welcome.session,
                secret: self.inner.welcome.secret,
            },
        )?;
        Ok(s)
    }

    fn err(&self, rel: &Path, e: NetError) -> Error {
        match e {
            NetError::Remote(m) => wire::unerror(m, self.shown(rel)),
            e => {
                if matches!(
                    e,
                    NetError::Io(_) | NetError::Closed | NetError::Timeout(_) | NetError::Quic(_) | NetError::Tls(_)
                ) {
                    self.inner.lost.store(true, Ordering::Relaxed);
                }
                Error::Other {
                    path: self.shown(rel),
                    message: format!("connection to {}: {e}", self.inner.spec.authority()),
                }
            }
        }
    }

    fn call(&self, rel: &Path, req: Msg) -> tern_core::Result<Msg> {
        self.with(rel, |s| {
            s.send(&req)?;
            s.recv()
        })
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

impl Source for RemoteEndpoint {
    fn describe(&self, rel: &Path) -> String {
        self.shown(rel).display().to_string()
    }

    fn stat(&self, rel: &Path) -> tern_core::Result<Option<Entry>> {
        match self.call(rel, Msg::Stat { path: self.full(rel) })? {
            Msg::StatReply(None) => Ok(None),
            Msg::StatReply(Some(e)) => wire::unentry_any_name(e).map(Some).ok_or_else(|| self.unexpected(rel)),
            _ => Err(self.unexpected(rel)),
        }
    }

    fn read_dir(&self, rel: &Path) -> tern_core::Result<Vec<Entry>> {
        let path = self.full(rel);
        let r = self.with(rel, |s| {
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
}

struct RemoteReadFile {
    ep: RemoteEndpoint,
    rel: PathBuf,
    handle: u64,
    sparse: bool,
    /// Chaining values the server sent, by offset, until asked for.
    cvs: Mutex<HashMap<u64, ChainingValue>>,
}

impl Drop for RemoteReadFile {
    fn drop(&mut self) {
        let handle = self.handle;
        let _ = self.ep.with(&self.rel, |s| {
            s.send(&Msg::CloseRead { handle })?;
            s.flush()
        });
    }
}

impl ReadFile for RemoteReadFile {
    fn describe(&self) -> PathBuf {
        self.ep.shown(&self.rel)
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> tern_core::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let handle = self.handle;
        let cv = self.ep.with(&self.rel, |s| {
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
        self.done(rel, Msg::MakeDir { path: self.full(rel) })
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
            match self.call(rel, req.clone()) {
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
        match self.call(
            rel,
            Msg::HardLink {
                existing: self.full(existing),
                path: self.full(rel),
            },
        )? {
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
        self.done(
            rel,
            Msg::SetMeta {
                path: self.full(rel),
                kind: wire::kind(kind),
                meta: wire::meta(meta),
                owner,
                xattrs: xattrs.map(wire::xattrs),
            },
        )
    }

    fn remove(&self, rel: &Path) -> tern_core::Result<()> {
        self.done(rel, Msg::Remove { path: self.full(rel) })
    }

    fn barrier(&self) -> tern_core::Result<()> {
        self.done(Path::new(""), Msg::Barrier)
    }

    fn can_chown(&self) -> bool {
        self.inner.welcome.can_chown
    }

    fn write_batch(&self, items: Vec<BatchItem>, opts: &BatchOptions) -> Vec<tern_core::Result<()>> {
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
        let r = self.with(Path::new(""), |s| {
            s.send(&Msg::Batch(batch))?;
            for it in &items {
                if let BatchBody::File { data, holes, .. } = &it.body {
                    s.send_data(&pack_around_holes(data, 0, holes))?;
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
            Err(e) => {
                let msg = e.to_string();
                rels.iter()
                    .map(|r| {
                        Err(Error::Other {
                            path: self.shown(r),
                            message: format!("not written: {msg}"),
                        })
                    })
                    .collect()
            }
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
        let cv = match cv {
            Some(cv) => *cv,
            None if offset == 0 && data.len() as u64 == self.size => *blake3::hash(data).as_bytes(),
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
        self.ep.with(&self.rel, |s| {
            s.send(&Msg::Write(wc))?;
            s.send_data(&pack_around_holes(data, offset, holes))?;
            s.flush()
        })?;
        self.writes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn set_meta(&self, meta: &Meta, owner: bool, xattrs: &Xattrs) -> tern_core::Result<()> {
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
        self.ep.done(&self.rel, Msg::Sync { handle: self.handle })
    }

    fn verify(&self, expected: &tern_core::hash::Hash) -> tern_core::Result<()> {
        self.ep.done(
            &self.rel,
            Msg::Verify {
                handle: self.handle,
                hash: *expected.as_bytes(),
            },
        )
    }

    fn publish(self: Box<Self>) -> tern_core::Result<()> {
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
        let _ = self.ep.with(&self.rel, |s| {
            s.send(&Msg::Abort { handle, keep })?;
            s.flush()
        });
    }
}
