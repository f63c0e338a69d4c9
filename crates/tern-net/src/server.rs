//! The daemon: authentication, sessions and the request handler.
//!
//! Each accepted stream runs on its own blocking thread: Hello, then `Auth`
//! (which opens a session) or `Join` (which attaches the stream to one),
//! then requests in order until the client closes it. A session's files
//! being written are shared by all its streams, so the chunks of one large
//! file can arrive on several streams at once; requests that need all of
//! them (`FileMeta`, `Publish`) carry the number of chunks the client sent
//! and wait until that many have been applied.
//!
//! All file access goes through a confined [`LocalEndpoint`]: paths are
//! resolved beneath the module root by the kernel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use tern_core::delta::Signature;
use tern_core::endpoint::{BatchBody, BatchItem, BatchOptions, SmallFile};
use tern_core::{hash, Dest, Error, LocalEndpoint, ReadFile, Source, WriteFile};
use tern_proto::{negotiate, Batch, ErrorCode, ErrorMsg, Hello, Msg, PullExtra, Welcome, WriteChunk};

use crate::budget::{Budget, Permit};
use crate::config::{Access, ModuleConfig, ServerConfig};
use crate::error::{NetError, Result};
use crate::stream::Stream;
use crate::transport::Peer;
use crate::wire;

/// Largest `Read` or `Write` the server accepts (the engine's chunk size
/// is at most this).
pub const MAX_CHUNK: u64 = 64 << 20;
/// Failed authentications allowed per client address within
/// [`FAILURE_WINDOW`] before further attempts are refused unchecked.
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses the failed-login table remembers at most.
const MAX_FAILURE_ENTRIES: usize = 4096;
/// Entries per `Entries` reply, at most.
const LIST_BATCH: usize = 512;
/// How long a request waits for a file descriptor other clients hold,
/// well inside a client's request timeout.
const FD_WAIT: Duration = Duration::from_secs(20);
/// Files of a batch written and committed together, at most.
const BATCH_GROUP: usize = 256;

/// The descriptors transfers may hold: `configured`, or by default half
/// the open-file limit less 64 (the soft limit raised to the hard one
/// first, either way), never more than that.
fn descriptor_budget(configured: Option<usize>) -> usize {
    let room = tern_core::open_file_budget();
    match configured {
        Some(n) if n > room => {
            tracing::warn!(
                "max_open_files = {n} is more than the open-file limit leaves for transfers; using {room} \
                 (raise `ulimit -n` to allow more)"
            );
            room
        }
        Some(n) => n,
        None => room,
    }
}

/// The daemon's shared state.
pub struct Server {
    modules: HashMap<String, Module>,
    grants: Vec<crate::config::Grant>,
    sessions: Mutex<HashMap<u64, Weak<Session>>>,
    /// Failed logins by address key (IPv6 by /64).
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    /// What unauthenticated peers can make the daemon log.
    log_limit: crate::log::Limited,
    /// Set when the daemon is stopping.
    pub shutdown: Arc<AtomicBool>,
    next_session: AtomicU64,
    agent: String,
    pull: Arc<crate::pull::PullPolicy>,
    /// How long a request may wait for chunks announced on other streams
    /// (the configured idle timeout).
    idle: Duration,
    /// Descriptors all clients' transfers may hold at once.
    fds: Arc<Budget>,
    /// MiB the buffers of all requests in progress may hold at once.
    mem: Arc<Budget>,
    /// This machine's TCP sends with BBR (said in the Hello).
    tcp_bbr: bool,
    /// zstd containers may cross (the config's `compress`).
    compress: bool,
    /// The daemon's key fingerprint, which token proofs are bound to.
    fingerprint: String,
    /// Keys the MAC of the tickets this daemon grants.
    ticket_key: [u8; 32],
}

/// What a client authenticates with.
enum Credential {
    /// Its key alone (the TLS client certificate).
    None,
    /// A token sent as it is (clients before version 3).
    Token(blake3::Hash),
    /// A token proved (see `proof::token_proof`) over the TLS session
    /// whose exporter value is given.
    Proof([u8; 32], [u8; 32]),
}

/// Whether a TCP socket here gets BBR, as every connection the daemon
/// accepts asks for.
fn tcp_has_bbr() -> bool {
    use std::os::fd::AsRawFd;
    std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .is_ok_and(|l| crate::path::tune_tcp(l.as_raw_fd()) == "bbr")
}

struct Module {
    cfg: ModuleConfig,
    ep: LocalEndpoint,
}

impl Server {
    /// Opens every module's root.
    pub fn new(cfg: &ServerConfig, agent: &str) -> Result<Server> {
        let mut modules = HashMap::new();
        for (name, m) in &cfg.modules {
            // Every write of a client, also through a pull, goes through
            // this endpoint and so through the module's policy.
            let mut ep = LocalEndpoint::confined(&m.path)
                .map_err(|e| NetError::Config(e.to_string()))?
                .with_policy(m.meta_policy()?);
            if let Some(q) = m.quota {
                ep = ep.with_quota(tern_core::quota::Quota::new(name.clone(), q));
            }
            // SAFETY: geteuid has no preconditions.
            if (m.uid.is_some() || m.gid.is_some()) && unsafe { libc::geteuid() } != 0 {
                tracing::warn!(
                    module = %name,
                    "uid/gid take effect only for a daemon running as root; files are owned by the daemon's user"
                );
            }
            modules.insert(name.clone(), Module { cfg: m.clone(), ep });
        }
        Ok(Server {
            modules,
            grants: cfg.grants.clone(),
            sessions: Mutex::default(),
            failures: Mutex::default(),
            log_limit: crate::log::Limited::per_second(5),
            shutdown: Arc::default(),
            next_session: AtomicU64::new(1),
            agent: agent.to_string(),
            pull: Arc::new(crate::pull::PullPolicy {
                allow: cfg.pull_from.clone(),
                state_dir: cfg.state_dir.clone(),
                max: cfg.limits.max_pulls,
                running: Arc::default(),
            }),
            idle: cfg.limits.idle,
            fds: Budget::new(descriptor_budget(cfg.limits.open_files)),
            mem: Budget::new(mib(cfg.limits.request_memory) as usize),
            tcp_bbr: tcp_has_bbr(),
            compress: cfg.compress,
            fingerprint: String::new(),
            ticket_key: {
                let mut k = [0u8; 32];
                getrandom(&mut k)?;
                k
            },
        })
    }

    /// Binds token proofs to `id`'s key, and keys tickets with a secret
    /// derived from it (so they survive a restart).
    pub fn with_identity(mut self, id: &crate::identity::Identity) -> Server {
        self.fingerprint = id.fingerprint();
        self.ticket_key = id.derive_secret("tern 2026-12-02 ticket MAC key");
        self
    }

    /// Keys every module's resume journals with `key`, a secret of this
    /// daemon: journals planted by clients (or anyone without the key) are
    /// then ignored.
    pub fn with_journal_key(mut self, key: [u8; 32]) -> Server {
        for m in self.modules.values_mut() {
            m.ep = m.ep.clone().with_journal_key(key);
        }
        self
    }

    /// Removes from every module the partial files and journals older than
    /// `max_age` (see [`LocalEndpoint::expire_side_files`]; None: none),
    /// and counts again what modules with a quota hold.
    pub fn expire_partials(&self, max_age: Option<Duration>) {
        for (name, m) in &self.modules {
            let quota = m.ep.quota();
            if max_age.is_none() && quota.is_none() {
                continue;
            }
            if let Some(q) = quota {
                q.walking();
            }
            match m.ep.expire_side_files(max_age.unwrap_or(Duration::MAX)) {
                Ok(x) => {
                    if x.files > 0 {
                        tracing::info!(module = %name, files = x.files, bytes = x.bytes, "removed abandoned partial files");
                    }
                    if let Some(q) = quota {
                        q.walked(x.remaining);
                        tracing::info!(module = %name, used = q.used(), quota = q.limit(), "counted the module's bytes");
                    }
                }
                Err(e) => tracing::warn!(module = %name, error = %e, "could not look for abandoned partial files"),
            }
        }
    }

    /// Whether any module has a quota, which the walks of
    /// [`Server::expire_partials`] keep counted.
    pub fn has_quotas(&self) -> bool {
        self.modules.values().any(|m| m.ep.quota().is_some())
    }

    /// How many descriptors clients' transfers may hold open at once.
    pub fn open_file_budget(&self) -> usize {
        self.fds.total()
    }

    /// Number of sessions alive.
    pub fn active_sessions(&self) -> usize {
        self.sessions
            .lock()
            .map(|s| s.values().filter(|w| w.strong_count() > 0).count())
            .unwrap_or(0)
    }

    /// Aborts every file still being written, keeping partial data for a
    /// resume: the last step of a graceful stop.
    pub fn abort_all(&self) {
        let sessions: Vec<Arc<Session>> = match self.sessions.lock() {
            Ok(s) => s.values().filter_map(Weak::upgrade).collect(),
            Err(_) => return,
        };
        for s in sessions {
            s.abort_all();
        }
    }

    /// Serves one stream until the client closes it.
    pub fn handle(self: &Arc<Self>, mut s: Stream, peer: Peer) {
        match self.open_stream(&mut s, &peer) {
            Ok(None) => {
                let _ = s.flush();
            }
            Ok(Some(session)) => {
                if let Err(e) = self.serve_requests(&mut s, &session) {
                    match e {
                        NetError::Closed | NetError::Timeout(_) => {
                            tracing::debug!(peer = %peer.addr, error = ?e.to_string(), "stream ended")
                        }
                        e => {
                            session.stream_broke();
                            tracing::info!(peer = %peer.addr, error = ?e.to_string(), "stream failed");
                            let _ = s.send(&Msg::Error(ErrorMsg::new(ErrorCode::Protocol, e.to_string())));
                            let _ = s.flush();
                        }
                    }
                }
            }
            Err(e) => {
                let msg = match e {
                    NetError::Remote(m) => m,
                    e => ErrorMsg::new(ErrorCode::Protocol, e.to_string()),
                };
                let _ = s.send(&Msg::Error(msg));
                let _ = s.flush();
            }
        }
        let _ = s.finish();
    }

    /// The stream's session, or None when the stream asked for the module
    /// list, which is answered and ends it.
    fn open_stream(self: &Arc<Self>, s: &mut Stream, peer: &Peer) -> Result<Option<Arc<Session>>> {
        s.handshaking(peer.gate.deadline());
        let Some((session, features)) = self.handshake(s, peer)? else {
            return Ok(None);
        };
        peer.gate.admit().map_err(|full| {
            refuse(
                ErrorCode::Unavailable,
                format!(
                    "the daemon is serving as many connections as it allows (max_connections = {}); try again later",
                    full.0
                ),
            )
        })?;
        s.authenticated();
        // Only now: a container inflates to 2 MiB, more than a stranger's
        // stream is allowed to cost.
        s.agree(features, session.squeezed.clone());
        // As a client does: a long path is likely slower than compressing,
        // so what this side sends is compressed from the first byte, until
        // the link's rate says otherwise.
        if s.tcp_rtt().is_some_and(|r| r >= crate::remote::LAN_RTT) {
            session.squeezed.set_far(true);
        }
        s.send(&Msg::Welcome(session.welcome()))?;
        Ok(Some(session))
    }

    /// Hello, then Auth or Join: the session the stream belongs to. Or
    /// Hello and ListModules, answered here: None.
    fn handshake(self: &Arc<Self>, s: &mut Stream, peer: &Peer) -> Result<Option<(Arc<Session>, u64)>> {
        let theirs = match s.recv()? {
            Msg::Hello(h) => h,
            _ => return Err(proto("expected Hello")),
        };
        let mut ours = Hello::ours(&self.agent);
        if !self.tcp_bbr {
            ours.features &= !tern_proto::FEATURE_TCP_BBR;
        }
        if !self.compress {
            // Neither side then sends a container.
            ours.features = crate::compress::Compression::Never.offer(ours.features);
        }
        s.send(&Msg::Hello(ours.clone()))?;
        let agreed = negotiate(&ours, &theirs)?;
        tracing::debug!(peer = %peer.addr, version = agreed.version, agent = ?theirs.agent, "hello");
        let session = match s.recv()? {
            Msg::Auth(a) => {
                let cred = match &a.token {
                    Some(t) => Credential::Token(blake3::hash(t.as_bytes())),
                    None => Credential::None,
                };
                self.authenticate(&a.module, a.write, cred, peer)
            }
            Msg::Login(l) => match (&l.ticket, l.proof, s.exporter()) {
                (Some(t), _, _) => self.ticketed(&l, t, peer),
                (None, Some(p), Some(e)) => self.authenticate(&l.module, l.write, Credential::Proof(p, e), peer),
                (None, Some(_), None) => Err(proto("a token proof on a stream without a TLS session")),
                (None, None, _) => self.authenticate(&l.module, l.write, Credential::None, peer),
            },
            Msg::Join { session, secret } => {
                let found = self
                    .sessions
                    .lock()
                    .map_err(|_| proto("poisoned"))?
                    .get(&session)
                    .and_then(Weak::upgrade);
                match found {
                    // blake3::Hash compares in constant time.
                    Some(sess) if blake3::Hash::from(sess.secret) == blake3::Hash::from(secret) => Ok(sess),
                    Some(_) => {
                        self.note_failure(peer, "join with a wrong session secret");
                        Err(refuse(ErrorCode::Unauthorized, "unknown or expired session"))
                    }
                    // Normal after a restart of the daemon or an expired
                    // session: the client authenticates again. Not counted
                    // as a failed login (guessing a 256-bit secret is not a
                    // threat the rate limit addresses), else a client
                    // reconnecting after a restart would lock itself out.
                    None => {
                        if let Some(suppressed) = self.log_limit.allow() {
                            tracing::info!(peer = %peer.addr, session, suppressed, "join with an unknown session");
                        }
                        Err(refuse(ErrorCode::Unauthorized, "unknown or expired session"))
                    }
                }
            }
            Msg::ListModules { proof } => {
                let cred = match (proof, s.exporter()) {
                    (Some(p), Some(e)) => Credential::Proof(p, e),
                    (Some(_), None) => return Err(proto("a token proof on a stream without a TLS session")),
                    (None, _) => Credential::None,
                };
                let list = self.list_modules(&cred, peer)?;
                s.send(&Msg::Modules(list))?;
                return Ok(None);
            }
            _ => Err(proto("expected Auth or Join")),
        };
        Ok(Some((session?, agreed.features)))
    }

    /// The modules `cred` or the client's key may use, sorted by name, with
    /// whether each may be written. A token that opens none counts as a
    /// failed login, so listing is no faster oracle for guessing tokens.
    fn list_modules(&self, cred: &Credential, peer: &Peer) -> Result<Vec<tern_proto::ModuleInfo>> {
        self.may_try(peer)?;
        let mut list: Vec<tern_proto::ModuleInfo> = self
            .modules
            .iter()
            .filter_map(|(name, m)| {
                let write = self.granted(name, cred, peer)?;
                Some(tern_proto::ModuleInfo {
                    name: name.clone(),
                    comment: m.cfg.comment.clone().unwrap_or_default(),
                    write: write && m.cfg.access == Access::ReadWrite,
                })
            })
            .collect();
        if list.is_empty() && !matches!(cred, Credential::None) {
            self.note_failure(peer, "a module list with a credential that opens no module");
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
        tracing::debug!(peer = %peer.addr, modules = list.len(), "module list");
        Ok(list)
    }

    /// Whether `cred` or the client's key opens module `name`: None, or
    /// Some(whether a grant lets it write).
    fn granted(&self, name: &str, cred: &Credential, peer: &Peer) -> Option<bool> {
        let mut grants = self.grants.iter().filter(|g| g.covers(name)).filter(|g| {
            // blake3::Hash compares in constant time.
            let by_token = match (cred, g.token_hash) {
                (Credential::Token(t), Some(h)) => *t == h,
                (Credential::Proof(p, exporter), Some(h)) => {
                    blake3::Hash::from(crate::proof::token_proof(h.as_bytes(), &self.fingerprint, exporter))
                        == blake3::Hash::from(*p)
                }
                _ => false,
            };
            let by_key = matches!((&g.client, &peer.client), (Some(x), Some(y)) if x == y);
            by_token || by_key
        });
        let first = grants.next()?;
        Some(first.access == Access::ReadWrite || grants.any(|g| g.access == Access::ReadWrite))
    }

    fn note_failure(&self, peer: &Peer, why: &str) {
        if let Some(suppressed) = self.log_limit.allow() {
            tracing::warn!(peer = %peer.addr, client_key = ?peer.client, reason = ?why, suppressed, "authentication failed");
        }
        if let Ok(mut f) = self.failures.lock() {
            let now = Instant::now();
            if f.len() >= MAX_FAILURE_ENTRIES {
                f.retain(|_, (_, since)| now.duration_since(*since) <= FAILURE_WINDOW);
            }
            if f.len() >= MAX_FAILURE_ENTRIES {
                // Still full of live entries (a flood from many addresses):
                // forgetting them is the lesser harm than growing without
                // bound, and each address is limited again after five more.
                f.clear();
            }
            let e = f.entry(crate::transport::addr_key(peer.addr.ip())).or_insert((0, now));
            if now.duration_since(e.1) > FAILURE_WINDOW {
                *e = (0, now);
            }
            e.0 += 1;
        }
    }

    /// Refuses a login from an address with too many recent failures, or
    /// while the daemon stops.
    fn may_try(&self, peer: &Peer) -> Result<()> {
        if self.shutdown.load(Ordering::Relaxed) {
            return Err(refuse(ErrorCode::Unavailable, "the server is shutting down"));
        }
        if let Ok(f) = self.failures.lock() {
            if let Some((n, since)) = f.get(&crate::transport::addr_key(peer.addr.ip())) {
                let left = FAILURE_WINDOW.saturating_sub(since.elapsed());
                if *n >= MAX_FAILURES && !left.is_zero() {
                    if let Some(suppressed) = self.log_limit.allow() {
                        tracing::warn!(peer = %peer.addr, suppressed, "authentication refused: too many failed attempts");
                    }
                    return Err(refuse(
                        ErrorCode::Unauthorized,
                        format!(
                            "too many failed attempts from {}; try again in {} s",
                            peer.addr.ip(),
                            left.as_secs() + 1
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn authenticate(
        self: &Arc<Self>,
        module: &str,
        write: bool,
        cred: Credential,
        peer: &Peer,
    ) -> Result<Arc<Session>> {
        self.may_try(peer)?;
        let (name, write) = (module, write);
        let Some(module) = self.modules.get(name) else {
            self.note_failure(peer, "unknown module");
            return Err(refuse(
                ErrorCode::NotFound,
                format!("no module named `{name}` on this server"),
            ));
        };
        let Some(granted_write) = self.granted(name, &cred, peer) else {
            let why = match (&cred, &peer.client) {
                (Credential::Token(_) | Credential::Proof(..), _) => {
                    format!("the token is not valid for module `{name}`")
                }
                (Credential::None, Some(fp)) => format!(
                    "no token given, and this client's key ({fp}) is not authorized for module `{name}`; pass --token-file or set TERN_TOKEN"
                ),
                (Credential::None, None) => "authentication required: pass --token-file or set TERN_TOKEN".to_string(),
            };
            self.note_failure(peer, &why);
            return Err(refuse(ErrorCode::Unauthorized, why));
        };
        let writable = granted_write && module.cfg.access == Access::ReadWrite;
        if write && !writable {
            let why = if module.cfg.access != Access::ReadWrite {
                format!("module `{name}` is read-only")
            } else {
                format!("this client may only read module `{name}`")
            };
            tracing::warn!(peer = %peer.addr, module = %name, "write refused: {why}");
            return Err(refuse(ErrorCode::Forbidden, why));
        }
        self.open_session(name, module, writable, None, peer)
    }

    /// Opens a session on a ticket another client's session here granted
    /// (see [`Session::grant_ticket`]): read only, beneath the ticket's
    /// path, for the daemon whose key the ticket names.
    fn ticketed(self: &Arc<Self>, l: &tern_proto::Login, t: &tern_proto::Ticket, peer: &Peer) -> Result<Arc<Session>> {
        self.may_try(peer)?;
        let mac_ok = blake3::Hash::from(crate::proof::ticket_mac(t, &self.ticket_key)) == blake3::Hash::from(t.mac);
        let why = if !mac_ok {
            Some("the ticket was not granted by this daemon".to_string())
        } else if t.expires < crate::proof::now_secs() {
            Some("the ticket has expired; run the command again".to_string())
        } else if peer.client.as_deref() != Some(t.holder.as_str()) {
            Some(format!("the ticket is for the key {}, not this client's", t.holder))
        } else if t.module != l.module {
            Some(format!("the ticket is for module `{}`", t.module))
        } else if l.write {
            Some("a ticket grants reading only".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            self.note_failure(peer, &why);
            return Err(refuse(ErrorCode::Unauthorized, why));
        }
        let Some(module) = self.modules.get(&t.module) else {
            return Err(refuse(
                ErrorCode::NotFound,
                format!("no module named `{}` on this server", t.module),
            ));
        };
        // The ticket says the client may read; the daemon presenting it
        // must also be one this daemon's configuration lets in.
        let known = self
            .grants
            .iter()
            .any(|g| g.covers(&t.module) && g.client.as_deref() == Some(t.holder.as_str()));
        if !known {
            let why = format!(
                "the key of the daemon presenting the ticket ({}) is not authorized for module `{}`",
                t.holder, t.module
            );
            self.note_failure(peer, &why);
            return Err(refuse(ErrorCode::Unauthorized, why));
        }
        let scope = wire::bytes_path(&t.path);
        self.open_session(&t.module, module, false, Some(scope), peer)
    }

    fn open_session(
        self: &Arc<Self>,
        name: &str,
        module: &Module,
        writable: bool,
        scope: Option<PathBuf>,
        peer: &Peer,
    ) -> Result<Arc<Session>> {
        let mut secret = [0u8; 32];
        getrandom(&mut secret)?;
        let session = Arc::new(Session {
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
            secret,
            module: name.to_string(),
            ep: module.ep.clone(),
            writable,
            scope,
            ticket_key: self.ticket_key,
            writes: Mutex::default(),
            reads: Mutex::default(),
            squeezed: Arc::default(),
            deltas: Mutex::default(),
            cancel: self.shutdown.clone(),
            idle: self.idle,
            pull: self.pull.clone(),
            own_fds: Budget::new(half(&self.fds)),
            fds: self.fds.clone(),
            mem: self.mem.clone(),
            ops: Mutex::default(),
            ops_changed: Condvar::new(),
            broken: AtomicBool::new(false),
            backup_ep: std::sync::OnceLock::new(),
        });
        if let Ok(mut m) = self.sessions.lock() {
            m.retain(|_, w| w.strong_count() > 0);
            m.insert(session.id, Arc::downgrade(&session));
        }
        tracing::info!(
            peer = %peer.addr,
            module = %name,
            writable,
            scope = ?session.scope,
            transport = peer.transport.name(),
            client_key = peer.client.as_deref().unwrap_or("none"),
            "session opened"
        );
        Ok(session)
    }

    fn serve_requests(&self, s: &mut Stream, sess: &Session) -> Result<()> {
        let mut buf = Vec::new();
        let mut chunk = tern_core::AlignedBuf::default();
        // Set by `OpsStream`: changes on this stream are queued.
        let mut queued = false;
        while !self.shutdown.load(Ordering::Relaxed) {
            let Some(msg) = s.recv_opt()? else { return Ok(()) };
            match msg {
                Msg::Error(e) => return Err(NetError::Remote(e)),
                Msg::OpsStream => queued = true,
                Msg::After { ops } => sess.wait_ops(ops)?,
                Msg::Settle if queued => sess.settle(s)?,
                m @ (Msg::MakeDir { .. } | Msg::Symlink { .. } | Msg::SetMeta { .. } | Msg::Remove { .. })
                    if queued =>
                {
                    sess.queued_change(&m)
                }
                m => sess.request(s, m, &mut buf, &mut chunk)?,
            }
        }
        Ok(())
    }
}

/// Fault injection for the tests of the readers' checks, in debug builds
/// only: with `TERN_FAULT_FLIP_READS=1` in the daemon's environment, the
/// first byte of every range and small file it sends is flipped after its
/// hash is computed, as a corruption between the daemon's read and the
/// client would be.
fn flip_for_tests(_buf: &mut [u8]) {
    #[cfg(debug_assertions)]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *ON.get_or_init(|| std::env::var_os("TERN_FAULT_FLIP_READS").is_some_and(|v| v == "1")) {
            if let Some(b) = _buf.first_mut() {
                *b ^= 1;
            }
        }
    }
}

fn proto(m: &str) -> NetError {
    NetError::Proto(tern_proto::ProtoError::Malformed(m.into()))
}

fn refuse(code: ErrorCode, m: impl Into<String>) -> NetError {
    NetError::Remote(ErrorMsg::new(code, m))
}

/// Fills `buf` from the kernel's random source.
pub fn getrandom(buf: &mut [u8]) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: valid buffer of the given length.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// A file being written, shared by the streams of a session.
struct WHandle {
    file: RwLock<Option<Box<dyn WriteFile>>>,
    state: Mutex<WState>,
    changed: Condvar,
    size: u64,
    path: PathBuf,
    _fds: HandleFds,
}

#[derive(Default)]
struct WState {
    applied: u64,
    error: Option<ErrorMsg>,
}

impl WHandle {
    fn applied(&self, error: Option<ErrorMsg>) {
        if let Ok(mut st) = self.state.lock() {
            st.applied += 1;
            if st.error.is_none() {
                st.error = error;
            }
        }
        self.changed.notify_all();
    }

    /// Waits until `writes` chunks were applied; the first error if any.
    /// Once a stream of the session broke (`broken`), chunks it carried
    /// will never come: the wait then ends after [`LOST_CHUNK_GRACE`]
    /// without one arriving, well before the client's own timeout.
    fn wait(&self, writes: u64, limit: Duration, broken: &AtomicBool) -> std::result::Result<(), ErrorMsg> {
        let deadline = Instant::now() + limit;
        let mut progress = Instant::now();
        let mut st = self
            .state
            .lock()
            .map_err(|_| ErrorMsg::new(ErrorCode::Server, "poisoned lock"))?;
        let mut seen = st.applied;
        while st.applied < writes {
            if st.applied != seen {
                (seen, progress) = (st.applied, Instant::now());
            }
            let lost = broken.load(Ordering::Relaxed) && progress.elapsed() >= LOST_CHUNK_GRACE;
            let left = deadline.saturating_duration_since(Instant::now());
            if lost {
                return Err(ErrorMsg::new(
                    ErrorCode::Unavailable,
                    "a connection of this client broke with chunks of the file on it; kept for a resume",
                ));
            }
            if left.is_zero() {
                return Err(ErrorMsg::new(
                    ErrorCode::Protocol,
                    "chunks announced but never received",
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left.min(LOST_CHUNK_GRACE))
                .map_err(|_| ErrorMsg::new(ErrorCode::Server, "poisoned lock"))?
                .0;
        }
        match &st.error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// Memory a signature entry is charged, received or planned.
const SIGNATURE_ENTRY: u64 = 16;

/// How long a wait for chunks goes on without one arriving, once a stream
/// of the session broke.
const LOST_CHUNK_GRACE: Duration = Duration::from_secs(2);

/// A file open for reading, and the descriptor it takes from the budget.
type RHandle = (Arc<dyn ReadFile>, HandleFds);

/// A delta for a file open for reading (see [`Msg::DeltaBasis`]).
enum DeltaState {
    /// The client's signature, part by part.
    Receiving(tern_core::delta::Signature, Vec<Permit>),
    /// The plan, the file's size and grid, and the memory it holds.
    Planned {
        plan: Arc<tern_core::delta::Plan>,
        size: u64,
        chunk_size: u64,
        _held: Vec<Permit>,
    },
}

/// An authenticated client's use of one module.
struct Session {
    id: u64,
    secret: [u8; 32],
    module: String,
    ep: LocalEndpoint,
    /// `ep` keeping backups, once the client asked for them.
    backup_ep: std::sync::OnceLock<LocalEndpoint>,
    writable: bool,
    /// A session opened on a ticket may see only this part of the module.
    scope: Option<PathBuf>,
    /// Keys the tickets the session grants.
    ticket_key: [u8; 32],
    writes: Mutex<HashMap<u64, Arc<WHandle>>>,
    reads: Mutex<HashMap<u64, RHandle>>,
    /// What its streams compressed, and how fast their link drains.
    squeezed: Arc<crate::compress::Squeezed>,
    /// Per read handle, a client's basis signature being received, then
    /// the plan made against it; each holds its memory from the budget.
    deltas: Mutex<HashMap<u64, DeltaState>>,
    cancel: Arc<AtomicBool>,
    idle: Duration,
    pull: Arc<crate::pull::PullPolicy>,
    /// The daemon's descriptors for transfers.
    fds: Arc<Budget>,
    /// The most of them this session's open files may hold: half.
    own_fds: Arc<Budget>,
    /// The daemon's memory for request buffers, in MiB.
    mem: Arc<Budget>,
    /// Queued changes applied so far, and the failures not yet reported.
    ops: Mutex<OpsDone>,
    /// A stream of the session ended in the middle of things (a reset, a
    /// damaged record): chunks it carried are lost.
    broken: AtomicBool,
    ops_changed: Condvar,
}

/// What a session's queued changes came to.
#[derive(Default)]
struct OpsDone {
    applied: u64,
    failed: Vec<(Vec<u8>, ErrorMsg)>,
    more: u64,
}

/// Failures of queued changes kept for the next `Settle`; past this only
/// counted, so a client that never settles cannot grow the daemon's memory.
const MAX_OP_FAILURES: usize = 1000;
/// Directory listings streamed per `Listing` part.
const WALK_PART: usize = LIST_BATCH;

/// Descriptors held by a file a session keeps open: from the session's
/// own share and from the daemon's budget.
#[derive(Debug)]
struct HandleFds {
    _own: Permit,
    _all: Permit,
}

/// `bytes` in whole MiB, rounded up: the unit of the memory budget.
fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// A request buffer larger than this is given back once the request is
/// answered; up to this, a stream keeps it for the next one (a default
/// chunk fits).
const KEEP_BUFFER: usize = tern_core::engine::DEFAULT_CHUNK_SIZE as usize;

/// Half of `fds`: what one session's open files may hold, and the most a
/// group of a batch takes, so that a session whose files hold their share
/// still finds room for its batch.
fn half(fds: &Budget) -> usize {
    (fds.total() / 2).max(1)
}

/// Answers a [`Msg::Bench`]: filler data in blocks, then `Done`.
fn bench(s: &mut Stream, upload: bool, bytes: u64, buf: &mut Vec<u8>) -> Result<()> {
    if bytes > tern_proto::BENCH_MAX_BYTES {
        s.send(&Msg::Error(ErrorMsg::new(
            ErrorCode::Protocol,
            format!(
                "a bench request may move at most {} bytes, not {bytes}",
                tern_proto::BENCH_MAX_BYTES
            ),
        )))?;
        return s.flush();
    }
    let block = tern_proto::BENCH_BLOCK;
    buf.clear();
    buf.resize(block, 0);
    crate::compress::bench_filler(buf);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block as u64) as usize;
        if upload {
            s.recv_data(&mut buf[..n])?;
        } else {
            s.send_data(&buf[..n])?;
        }
        left -= n as u64;
    }
    s.send(&Msg::Done)?;
    s.flush()
}

impl Drop for Session {
    fn drop(&mut self) {
        self.abort_all();
    }
}

type Reply = std::result::Result<Msg, ErrorMsg>;

impl Session {
    fn welcome(&self) -> Welcome {
        Welcome {
            session: self.id,
            secret: self.secret,
            writable: self.writable,
            max_chunk: MAX_CHUNK,
            can_chown: self.ep.can_chown(),
        }
    }

    fn abort_all(&self) {
        let handles: Vec<_> = match self.writes.lock() {
            Ok(mut w) => w.drain().map(|(_, h)| h).collect(),
            Err(_) => return,
        };
        for h in handles {
            if let Some(f) = h.file.write().ok().and_then(|mut f| f.take()) {
                tracing::info!(module = %self.module, path = ?h.path, "kept partial file for a resume");
                f.abort(true);
            }
        }
    }

    /// A client path as a module-relative path; refused if it could name
    /// anything but an entry beneath the root.
    fn path(&self, b: &[u8]) -> std::result::Result<PathBuf, ErrorMsg> {
        let p = wire::bytes_path(b);
        let ok =
            !b.contains(&0) && p.components().all(|c| matches!(c, std::path::Component::Normal(_))) && b.len() <= 4096;
        if !ok {
            return Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                format!(
                    "path `{}` is not a plain path inside the module",
                    String::from_utf8_lossy(b)
                ),
            ));
        }
        if let Some(scope) = self.scope.as_ref().filter(|s| !p.starts_with(s)) {
            return Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                format!(
                    "path `{}` is outside what this session's ticket grants (`{}`)",
                    String::from_utf8_lossy(b),
                    scope.display()
                ),
            ));
        }
        Ok(p)
    }

    /// Answers `GrantTicket`: lets the daemon with key `holder` read `path`
    /// here for a while, on this client's behalf. The ticket says all the
    /// daemon checks when it comes back, under a MAC only it can make.
    fn grant_ticket(&self, holder: &str, path: &[u8]) -> Reply {
        if self.scope.is_some() {
            return Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                "a session opened on a ticket cannot grant one",
            ));
        }
        self.path(path)?;
        let holder = crate::identity::normalize_fingerprint(holder)
            .map_err(|e| ErrorMsg::new(ErrorCode::Protocol, e.to_string()))?;
        let mut t = tern_proto::Ticket {
            module: self.module.clone(),
            path: path.to_vec(),
            holder,
            expires: crate::proof::now_secs() + tern_proto::TICKET_LIFETIME,
            mac: [0; 32],
        };
        t.mac = crate::proof::ticket_mac(&t, &self.ticket_key);
        tracing::info!(module = %self.module, path = ?String::from_utf8_lossy(path), holder = %t.holder, "ticket granted");
        Ok(Msg::TicketReply(t))
    }

    /// Like [`Session::path`], for a new name: never the root, never one of
    /// tern's own temporary names, and only when writing is allowed.
    fn new_path(&self, b: &[u8]) -> std::result::Result<PathBuf, ErrorMsg> {
        self.may_write()?;
        let p = self.path(b)?;
        match p.file_name() {
            None => Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                "the module root cannot be replaced",
            )),
            Some(n) if tern_core::local::is_side_file(n) => Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                format!(
                    "`{}` is a name tern reserves for its temporary files",
                    n.to_string_lossy()
                ),
            )),
            Some(_) => Ok(p),
        }
    }

    /// The endpoint files are written through: keeping backups, if asked.
    fn wep(&self) -> &LocalEndpoint {
        self.backup_ep.get().unwrap_or(&self.ep)
    }

    /// `Backup`: from now on, what the session replaces or deletes is kept
    /// in `dir` (module-relative) at its path below `base`, or beside it,
    /// with `suffix` appended.
    fn keep_backups(&self, dir: Option<&[u8]>, base: &[u8], suffix: &[u8]) -> Reply {
        self.may_write()?;
        let bad = |why: &str| Err(ErrorMsg::new(ErrorCode::Forbidden, format!("backups: {why}")));
        if suffix.len() > 64 || suffix.contains(&b'/') || suffix.contains(&0) {
            return bad("the suffix must be at most 64 bytes, without `/`");
        }
        if dir.is_none() && suffix.is_empty() {
            return bad("a backup kept beside its file needs a suffix");
        }
        let dir = match dir {
            Some(d) => {
                let p = self.path(d)?;
                if p.as_os_str().is_empty() {
                    return bad("the backup directory cannot be the module's root");
                }
                if p.iter().any(tern_core::local::is_side_file) {
                    return bad("the backup directory's path has a name tern keeps for temporary files");
                }
                Some(p)
            }
            None => None,
        };
        let backup = tern_core::local::Backup {
            dir,
            base: self.path(base)?,
            suffix: wire::bytes_path(suffix).into_os_string(),
        };
        if let Some(b) = self.backup_ep.get() {
            return match b.backup() == Some(&backup) {
                true => Ok(Msg::Done),
                false => Err(ErrorMsg::new(
                    ErrorCode::Conflict,
                    "backups are already kept otherwise in this session",
                )),
            };
        }
        let busy = self.writes.lock().map_or(true, |w| !w.is_empty());
        if busy {
            return Err(ErrorMsg::new(
                ErrorCode::Conflict,
                "backups must be asked for before anything is written",
            ));
        }
        let _ = self.backup_ep.set(self.ep.clone().with_backup(backup));
        Ok(Msg::Done)
    }

    fn may_write(&self) -> std::result::Result<(), ErrorMsg> {
        if self.writable {
            Ok(())
        } else {
            Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                format!("module `{}` is read-only for this client", self.module),
            ))
        }
    }

    fn whandle(&self, h: u64) -> std::result::Result<Arc<WHandle>, ErrorMsg> {
        self.writes
            .lock()
            .ok()
            .and_then(|w| w.get(&h).cloned())
            .ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, format!("no file open as handle {h}")))
    }

    fn rhandle(&self, h: u64) -> std::result::Result<Arc<dyn ReadFile>, ErrorMsg> {
        self.reads
            .lock()
            .ok()
            .and_then(|r| r.get(&h).map(|(f, _)| f.clone()))
            .ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, format!("no file open for reading as handle {h}")))
    }

    /// How long a request waits for descriptors: well inside the idle
    /// timeout, so that the other streams of a client still holding files
    /// while it waits are not dropped as idle meanwhile.
    fn fd_wait(&self) -> Duration {
        FD_WAIT.min(self.idle / 4)
    }

    /// `n` descriptors for a file this session will keep open: from its
    /// own share (waiting for its other files to close), then from the
    /// daemon's budget (waiting for other clients).
    fn handle_fds(&self, n: usize) -> std::result::Result<HandleFds, ErrorMsg> {
        let deadline = Instant::now() + self.fd_wait();
        let own = self.own_fds.acquire(n, deadline, &self.cancel).ok_or_else(|| {
            ErrorMsg::new(
                ErrorCode::Unavailable,
                format!(
                    "this client's open files hold {} descriptors on the daemon, the most it allows one client, \
                     and none was given back within {} s",
                    self.own_fds.total(),
                    self.fd_wait().as_secs()
                ),
            )
        })?;
        let all = self.fd_permit(n, deadline)?;
        Ok(HandleFds { _own: own, _all: all })
    }

    /// `n` descriptors from the daemon's budget, waiting until `deadline`
    /// for other clients to give some back.
    fn fd_permit(&self, n: usize, deadline: Instant) -> std::result::Result<Permit, ErrorMsg> {
        self.fds.acquire(n, deadline, &self.cancel).ok_or_else(|| {
            ErrorMsg::new(
                ErrorCode::Unavailable,
                format!(
                    "the daemon has no file descriptor free (all {} it allows for transfers are in use); retry later",
                    self.fds.total()
                ),
            )
        })
    }

    /// Memory for a request buffer of `bytes`, waiting a while for other
    /// requests to give some back.
    fn mem_permit(&self, bytes: u64) -> std::result::Result<Permit, ErrorMsg> {
        let deadline = Instant::now() + self.fd_wait();
        self.mem
            .acquire(mib(bytes) as usize, deadline, &self.cancel)
            .ok_or_else(|| {
                ErrorMsg::new(
                    ErrorCode::Unavailable,
                    format!(
                    "the daemon's memory for requests is in use (all {} MiB of max_request_memory_mib); retry later",
                    self.mem.total()
                ),
                )
            })
    }

    /// Handles one request, replying on `s` where the request has a reply.
    /// `chunk` receives written chunks: aligned, so a large file's data
    /// goes to the disk with O_DIRECT without another copy.
    fn request(&self, s: &mut Stream, msg: Msg, buf: &mut Vec<u8>, chunk: &mut tern_core::AlignedBuf) -> Result<()> {
        let err = |e: Error| wire::error_msg(&e);
        let reply: Reply = match msg {
            Msg::Stat { path } => self.path(&path).and_then(|p| {
                self.ep
                    .stat(&p)
                    .map(|e| Msg::StatReply(e.as_ref().map(wire::entry)))
                    .map_err(err)
            }),
            Msg::ReadDir { path } => {
                let listed = self.path(&path).and_then(|p| self.ep.read_dir(&p).map_err(err));
                match listed {
                    Ok(entries) => {
                        let n = entries.len();
                        let mut sent = 0;
                        for part in entries.chunks(LIST_BATCH) {
                            sent += part.len();
                            s.send(&Msg::Entries {
                                entries: part.iter().map(wire::entry).collect(),
                                more: sent < n,
                            })?;
                        }
                        if n == 0 {
                            s.send(&Msg::Entries {
                                entries: Vec::new(),
                                more: false,
                            })?;
                        }
                        return Ok(());
                    }
                    Err(e) => Err(e),
                }
            }
            Msg::Xattrs { path } => self.path(&path).and_then(|p| {
                self.ep
                    .xattrs(&p)
                    .map(|x| Msg::XattrList(wire::xattrs(&x)))
                    .map_err(err)
            }),
            Msg::OpenRead { handle, path, expect } => self.path(&path).and_then(|p| {
                let e = wire::unentry(expect).ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "bad entry"))?;
                // A handle opened again gives back what it held first.
                if let Ok(mut r) = self.reads.lock() {
                    r.remove(&handle);
                }
                if let Ok(mut d) = self.deltas.lock() {
                    d.remove(&handle);
                }
                let fds = self.handle_fds(1)?;
                let f = self.ep.open(&p, &e).map_err(err)?;
                if let Ok(mut r) = self.reads.lock() {
                    r.insert(handle, (Arc::from(f), fds));
                }
                Ok(Msg::Done)
            }),
            Msg::Read { handle, offset, len } => {
                let read = self.rhandle(handle).and_then(|f| {
                    if len > MAX_CHUNK {
                        return Err(ErrorMsg::new(
                            ErrorCode::Protocol,
                            format!("read of {len} bytes is too large"),
                        ));
                    }
                    if !hash::valid_span(offset, len) {
                        return Err(ErrorMsg::new(
                            ErrorCode::Protocol,
                            format!("a read of {len} bytes at offset {offset} is not a whole BLAKE3 subtree"),
                        ));
                    }
                    let held = self.mem_permit(len)?;
                    buf.resize(len as usize, 0);
                    f.read_exact_at(offset, buf).map_err(err)?;
                    let cv = hash::cv_at(offset, buf);
                    flip_for_tests(buf);
                    Ok((cv, held))
                });
                match read {
                    Ok((cv, _held)) => {
                        s.send(&Msg::ReadReply { len, cv })?;
                        s.send_data(buf)?;
                        if buf.capacity() > KEEP_BUFFER {
                            *buf = Vec::new();
                        }
                        return Ok(());
                    }
                    Err(e) => Err(e),
                }
            }
            Msg::Ranges { handle, offset, len } => self
                .rhandle(handle)
                .and_then(|f| f.data_ranges(offset, len).map(Msg::RangesReply).map_err(err)),
            Msg::CheckUnchanged { handle } => self
                .rhandle(handle)
                .and_then(|f| f.check_unchanged().map(|()| Msg::Done).map_err(err)),
            Msg::CloseRead { handle } => {
                if let Ok(mut r) = self.reads.lock() {
                    r.remove(&handle);
                }
                if let Ok(mut d) = self.deltas.lock() {
                    d.remove(&handle);
                }
                return Ok(());
            }
            Msg::DeltaBasis {
                handle,
                avg,
                chunks,
                last,
                size,
                chunk_size,
            } => {
                let chunks = wire::SigPart::Full(chunks);
                return self.delta_basis(s, handle, (avg, chunks, last), (size, chunk_size));
            }
            Msg::ShortDeltaBasis {
                handle,
                avg,
                chunks,
                last,
                size,
                chunk_size,
            } => {
                let chunks = wire::SigPart::Short(chunks);
                return self.delta_basis(s, handle, (avg, chunks, last), (size, chunk_size));
            }
            Msg::ReadDelta { handle, index } => return self.read_delta(s, handle, index, buf),
            Msg::Hash { path, expect } => self.path(&path).and_then(|p| {
                let e = wire::unentry(expect).ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "bad entry"))?;
                let _fd = self.fd_permit(1, Instant::now() + self.fd_wait())?;
                let f = self.ep.open(&p, &e).map_err(err)?;
                let h = tern_core::hash_file(&*f, e.size, tern_core::engine::DEFAULT_CHUNK_SIZE, buf, &self.cancel)
                    .map_err(err)?;
                Ok(Msg::HashReply(*h.as_bytes()))
            }),
            Msg::Create { handle, path, spec } => self.new_path(&path).and_then(|p| {
                let spec = wire::unspec(&spec);
                if !hash::valid_chunk_size(spec.chunk_size) || spec.chunk_size > MAX_CHUNK {
                    return Err(ErrorMsg::new(ErrorCode::Protocol, "bad chunk size"));
                }
                // A handle created again gives back what it held first.
                let old = self.writes.lock().ok().and_then(|mut w| w.remove(&handle));
                if let Some(f) = old.and_then(|h| h.file.write().ok().and_then(|mut f| f.take())) {
                    f.abort(true);
                }
                let fds = self.handle_fds(LocalEndpoint::descriptors_for(&spec))?;
                let f = self.wep().create(&p, &spec).map_err(err)?;
                let resumed = f.resumed().into_iter().collect();
                let h = WHandle {
                    file: RwLock::new(Some(f)),
                    state: Mutex::default(),
                    changed: Condvar::new(),
                    size: spec.size,
                    path: p,
                    _fds: fds,
                };
                if let Ok(mut w) = self.writes.lock() {
                    if let Some(old) = w.insert(handle, Arc::new(h)) {
                        if let Some(f) = old.file.write().ok().and_then(|mut f| f.take()) {
                            f.abort(true);
                        }
                    }
                }
                Ok(Msg::Created { resumed })
            }),
            Msg::Write(wc) => return self.write(s, wc, chunk),
            Msg::BasisSignature { handle } => return self.basis_signature(s, handle),
            // Another file as the basis: one the session may name, not a
            // side file of some transfer.
            Msg::UseBasis { handle, path } => self.path(&path).and_then(|p| match p.file_name() {
                Some(n) if !tern_core::local::is_side_file(n) => {
                    let h = self.whandle(handle)?;
                    let f = h
                        .file
                        .read()
                        .map_err(|_| ErrorMsg::new(ErrorCode::Server, "poisoned lock"))?;
                    match f.as_ref() {
                        Some(f) => match f.use_basis(&p).map_err(|e| wire::error_msg(&e))? {
                            true => Ok(Msg::Done),
                            false => Err(ErrorMsg::new(
                                ErrorCode::NotFound,
                                "no regular file to build from there, or the file has a basis already",
                            )),
                        },
                        None => Err(ErrorMsg::new(ErrorCode::Protocol, "file already closed")),
                    }
                }
                _ => Err(ErrorMsg::new(ErrorCode::Forbidden, "not a file to build from")),
            }),
            Msg::WriteDelta {
                handle,
                index,
                offset,
                len,
                pieces,
                cv,
            } => return self.write_delta(s, handle, (index, offset, len), pieces, cv),
            Msg::Pull(_) => Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                "this daemon runs a transfer from another daemon only with tickets proving the client may read \
                 the source (protocol 3); upgrade this client",
            )),
            Msg::PullTicketed { req, tickets } => return self.pull(s, *req, PullExtra::default(), tickets),
            Msg::PullWith { req, tickets, extra } => return self.pull(s, *req, extra, tickets),
            Msg::GrantTicket { holder, path } => self.grant_ticket(&holder, &path),
            Msg::FileMeta {
                handle,
                writes,
                meta,
                owner,
                xattrs,
            } => self.whandle(handle).and_then(|h| {
                h.wait(writes, self.idle, &self.broken)?;
                let f = h
                    .file
                    .read()
                    .map_err(|_| ErrorMsg::new(ErrorCode::Server, "poisoned lock"))?;
                let f = f
                    .as_ref()
                    .ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "file already closed"))?;
                f.set_meta(&wire::unmeta(&meta), owner, &wire::unxattrs(xattrs))
                    .map(|()| Msg::Done)
                    .map_err(err)
            }),
            Msg::Sync { handle } => self.with_file(handle, |f| f.sync()),
            Msg::Verify { handle, hash } => self.with_file(handle, |f| f.verify(&blake3::Hash::from_bytes(hash))),
            Msg::Publish { handle, writes } => self.whandle(handle).and_then(|h| {
                h.wait(writes, self.idle, &self.broken)?;
                if let Ok(mut w) = self.writes.lock() {
                    w.remove(&handle);
                }
                let f = h.file.write().ok().and_then(|mut f| f.take());
                let f = f.ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "file already closed"))?;
                f.publish().map(|()| Msg::Done).map_err(err)
            }),
            Msg::Abort { handle, keep } => {
                let h = self.writes.lock().ok().and_then(|mut w| w.remove(&handle));
                if let Some(f) = h.and_then(|h| h.file.write().ok().and_then(|mut f| f.take())) {
                    f.abort(keep);
                }
                return Ok(());
            }
            Msg::HardLink { existing, path } => self.new_path(&path).and_then(|p| {
                let from = self.path(&existing)?;
                self.wep().hard_link(&from, &p).map(Msg::Linked).map_err(err)
            }),
            m @ (Msg::MakeDir { .. } | Msg::Symlink { .. } | Msg::SetMeta { .. } | Msg::Remove { .. }) => self
                .change(&m)
                .unwrap_or_else(|| Err(ErrorMsg::new(ErrorCode::Protocol, "not a change"))),
            Msg::Walk(w) => return self.walk(s, w),
            Msg::ReadFiles { items, xattrs } => return self.read_files(s, items, Vec::new(), xattrs, buf),
            Msg::ReadFilesDelta { items, bases, xattrs } => {
                if bases.len() != items.len() {
                    return Err(proto("a basis flag per file, or none"));
                }
                let sigs = self.recv_bases(s, &bases)?;
                return self.read_files(s, items, sigs, xattrs, buf);
            }
            Msg::BasisSignatures { items } => return self.basis_signatures(s, items),
            Msg::HashFiles { items } => self.hash_files(items, buf),
            Msg::Commit(c) => self.commit(c),
            Msg::OpsStream | Msg::After { .. } | Msg::Settle => {
                return Err(proto("queued operations outside their stream's loop"))
            }
            Msg::Bench { upload, bytes } => return bench(s, upload, bytes, buf),
            Msg::Barrier => self
                .may_write()
                .and_then(|()| self.ep.barrier().map(|()| Msg::Done).map_err(err)),
            Msg::Batch(b) => return self.batch(s, b),
            Msg::Backup { dir, base, suffix } => self.keep_backups(dir.as_deref(), &base, &suffix),
            Msg::Rename { from, to } => self.new_path(&from).and_then(|f| {
                let t = self.new_path(&to)?;
                self.wep()
                    .rename(&f, &t)
                    .map(|()| Msg::Done)
                    .map_err(|e| wire::error_msg(&e))
            }),
            Msg::Truncate { path, size } => self.new_path(&path).and_then(|p| {
                self.wep()
                    .truncate(&p, size)
                    .map(|e| Msg::StatReply(Some(wire::entry(&e))))
                    .map_err(|e| wire::error_msg(&e))
            }),
            Msg::Hello(_) | Msg::Auth(_) | Msg::Login(_) | Msg::Join { .. } | Msg::ListModules { .. } => {
                return Err(proto("handshake message in the middle of a stream"))
            }
            _ => return Err(proto("a reply where a request was expected")),
        };
        match reply {
            Ok(m) => s.send(&m),
            Err(e) => s.send(&Msg::Error(e)),
        }
    }

    /// Applies a change to the module named by `msg` (`MakeDir`, `Symlink`,
    /// `SetMeta`, `Remove`); `None` for any other message. Shared by
    /// requests answered one by one and by the queued operations stream.
    fn change(&self, msg: &Msg) -> Option<Reply> {
        let err = |e: Error| wire::error_msg(&e);
        Some(match msg {
            Msg::MakeDir { path } => self.may_write().and_then(|()| {
                // The root may be made (it is never replaced); any other name
                // is checked as a new one, so no directory takes a side file's.
                let p = match path.is_empty() {
                    true => self.path(path)?,
                    false => self.new_path(path)?,
                };
                self.ep.make_dir(&p).map(|()| Msg::Done).map_err(err)
            }),
            Msg::Symlink {
                path,
                target,
                meta,
                owner,
            } => self.new_path(path).and_then(|p| {
                let owner = *owner && self.ep.can_chown();
                self.wep()
                    .symlink(&p, &wire::bytes_path(target), &wire::unmeta(meta), owner)
                    .map(|()| Msg::Done)
                    .map_err(err)
            }),
            Msg::SetMeta {
                path,
                kind,
                meta,
                owner,
                xattrs,
            } => self.may_write().and_then(|()| {
                let p = self.path(path)?;
                if p.as_os_str().is_empty() {
                    return Err(ErrorMsg::new(
                        ErrorCode::Forbidden,
                        format!(
                            "the owner, permissions and attributes of module `{}`'s root are the daemon's to set",
                            self.module
                        ),
                    ));
                }
                let x = xattrs.clone().map(wire::unxattrs);
                let owner = *owner && self.ep.can_chown();
                self.ep
                    .set_meta(&p, wire::unkind(*kind), &wire::unmeta(meta), owner, x.as_ref())
                    .map(|()| Msg::Done)
                    .map_err(err)
            }),
            Msg::Remove { path } => self
                .new_path(path)
                .and_then(|p| self.wep().remove(&p).map(|()| Msg::Done).map_err(err)),
            _ => return None,
        })
    }

    /// Notes that a stream broke, and wakes the waits for chunks so they
    /// can tell.
    fn stream_broke(&self) {
        self.broken.store(true, Ordering::Relaxed);
        if let Ok(w) = self.writes.lock() {
            for h in w.values() {
                h.changed.notify_all();
            }
        }
    }

    /// Applies one queued change; its failure, if any, waits for `Settle`.
    fn queued_change(&self, m: &Msg) {
        let failed = match self.change(m) {
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(e),
            None => Some(ErrorMsg::new(ErrorCode::Protocol, "not a change")),
        };
        let path = match m {
            Msg::MakeDir { path } | Msg::Symlink { path, .. } | Msg::SetMeta { path, .. } | Msg::Remove { path } => {
                path.clone()
            }
            _ => Vec::new(),
        };
        if let Ok(mut o) = self.ops.lock() {
            o.applied += 1;
            if let Some(e) = failed {
                tracing::debug!(module = %self.module, path = ?String::from_utf8_lossy(&path), error = ?e.message, "queued change failed");
                if o.failed.len() < MAX_OP_FAILURES {
                    o.failed.push((path, e));
                } else {
                    o.more += 1;
                }
            }
        }
        self.ops_changed.notify_all();
    }

    /// Waits until `ops` queued changes are applied (they come on another
    /// stream, sent before the request that follows on this one).
    fn wait_ops(&self, ops: u64) -> Result<()> {
        let deadline = Instant::now() + self.idle;
        let mut o = self.ops.lock().map_err(|_| proto("poisoned lock"))?;
        while o.applied < ops {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.cancel.load(Ordering::Relaxed) {
                return Err(proto("queued changes announced but never received"));
            }
            o = self
                .ops_changed
                .wait_timeout(o, left.min(Duration::from_secs(1)))
                .map_err(|_| proto("poisoned lock"))?
                .0;
        }
        Ok(())
    }

    /// Answers `Settle`: the queued changes that failed since the last one.
    fn settle(&self, s: &mut Stream) -> Result<()> {
        let (failed, more) = match self.ops.lock() {
            Ok(mut o) => (std::mem::take(&mut o.failed), std::mem::take(&mut o.more)),
            Err(_) => return Err(proto("poisoned lock")),
        };
        s.send(&Msg::Settled { failed, more })
    }

    /// Answers `Walk`: every directory under the walk's top, depth-first,
    /// children in name order, as `Listing` parts, then `WalkDone`. The
    /// client reads them as its scan gets there; the transport's flow
    /// control keeps this thread at most a window ahead.
    fn walk(&self, s: &mut Stream, w: tern_proto::Walk) -> Result<()> {
        let top = match self.path(&w.path) {
            Ok(p) => p,
            Err(e) => return s.send(&Msg::Error(e)),
        };
        let mut filter = tern_core::filter::Filter::new();
        for (p, include) in &w.rules {
            match tern_core::filter::Rule::from_bytes(p, *include) {
                Ok(r) => filter.push(r),
                Err(e) => {
                    let m = format!("bad pattern {:?}: {e}", String::from_utf8_lossy(p));
                    return s.send(&Msg::Error(ErrorMsg::new(ErrorCode::Protocol, m)));
                }
            }
        }
        let prefix = wire::bytes_path(&w.prefix);
        let from = wire::bytes_path(&w.from);
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            if self.cancel.load(Ordering::Relaxed) {
                return s.send(&Msg::Error(ErrorMsg::new(
                    ErrorCode::Unavailable,
                    "the server is shutting down",
                )));
            }
            let dir = wire::path_bytes(&rel);
            // Ancestors of `from` are listed to find it, not sent.
            let wanted = rel >= from;
            match self.ep.read_dir(&top.join(&rel)) {
                Err(e) if wanted => s.send(&Msg::ListingFailed {
                    dir,
                    error: wire::error_msg(&e),
                })?,
                Err(_) => {}
                Ok(entries) => {
                    let subdirs: Vec<PathBuf> = entries
                        .iter()
                        .filter(|e| e.kind == tern_core::Kind::Dir)
                        .map(|e| rel.join(&e.name))
                        .filter(|c| (*c >= from || from.starts_with(c)) && filter.included(&prefix.join(c), true))
                        .collect();
                    if wanted {
                        let mut parts = entries.chunks(WALK_PART).peekable();
                        if parts.peek().is_none() {
                            s.send(&Msg::Listing {
                                dir: dir.clone(),
                                entries: Vec::new(),
                                more: false,
                            })?;
                        }
                        while let Some(part) = parts.next() {
                            s.send(&Msg::Listing {
                                dir: dir.clone(),
                                entries: part.iter().map(wire::entry).collect(),
                                more: parts.peek().is_some(),
                            })?;
                        }
                    }
                    stack.extend(subdirs.into_iter().rev());
                }
            }
        }
        s.send(&Msg::WalkDone)?;
        s.flush()
    }

    /// The signatures that follow a `ReadFilesDelta`, one per item whose
    /// flag is set, their memory taken from the budget as they arrive;
    /// `None` for the others.
    fn recv_bases(&self, s: &mut Stream, bases: &[bool]) -> Result<Vec<(Option<Signature>, Vec<Permit>)>> {
        if bases.len() > tern_proto::MAX_BATCH_FILES {
            return Err(proto("too many files in one request"));
        }
        let mut left = tern_core::delta::MAX_SIGNATURE_CHUNKS;
        let mut out = Vec::with_capacity(bases.len());
        for &b in bases {
            let mut held = Vec::new();
            let sig = match b {
                true => wire::recv_signature(s, left, &mut |n| {
                    held.push(self.mem_permit(n as u64 * SIGNATURE_ENTRY).map_err(NetError::Remote)?);
                    Ok(())
                })?,
                false => None,
            };
            left -= sig.as_ref().map_or(0, |g| g.chunks.len());
            out.push((sig, held));
        }
        Ok(out)
    }

    /// Answers `BasisSignatures`: each old version's signature, made here.
    fn basis_signatures(&self, s: &mut Stream, items: Vec<(Vec<u8>, u64)>) -> Result<()> {
        if items.len() > tern_proto::MAX_BATCH_FILES {
            return Err(proto("too many files in one request"));
        }
        // One file is open at a time.
        let fds = self.fd_permit(1, Instant::now() + self.fd_wait());
        for (path, size) in items {
            // Only where the session may write: the old version of a file
            // it is about to replace.
            let sig = match (&fds, self.may_write().and_then(|()| self.new_path(&path))) {
                (Ok(_), Ok(rel)) if size <= MAX_CHUNK => self.ep.basis_signatures(&[(&rel, size)]).pop().flatten(),
                _ => None,
            };
            wire::send_signature(s, sig.as_ref(), size)?;
        }
        s.flush()
    }

    /// Answers `ReadFiles` (and `ReadFilesDelta`, where `sigs` has the
    /// client's old versions' signatures): each file read whole, checked
    /// unchanged, sent as `FileData` and its bytes (or `FileDelta` and its
    /// literal bytes, where a delta pays), or `FileFailed`; one stream, no
    /// wait between files.
    fn read_files(
        &self,
        s: &mut Stream,
        items: Vec<(Vec<u8>, tern_proto::WireEntry)>,
        sigs: Vec<(Option<Signature>, Vec<Permit>)>,
        xattrs: bool,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        if items.len() > tern_proto::MAX_BATCH_FILES {
            return Err(proto("too many files in one request"));
        }
        let mut sigs = sigs.into_iter();
        // One file is open at a time.
        let fds = self.fd_permit(1, Instant::now() + self.fd_wait());
        for (path, expect) in items {
            let sig = sigs.next().and_then(|(sig, _held)| sig);
            let read = fds.as_ref().map_err(Clone::clone).and_then(|_| {
                let p = self.path(&path)?;
                let e =
                    wire::unentry_any_name(expect).ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "bad entry"))?;
                if e.size > MAX_CHUNK {
                    return Err(ErrorMsg::new(
                        ErrorCode::Protocol,
                        format!("a file of {} bytes is not small", e.size),
                    ));
                }
                // With a basis, its literals too.
                let held = self.mem_permit(e.size * (1 + u64::from(sig.is_some())))?;
                let f =
                    tern_core::endpoint::read_file_whole(&self.ep, &p, &e, xattrs).map_err(|e| wire::error_msg(&e))?;
                Ok((f.against(sig.as_ref()), e.size, held))
            });
            match read {
                Ok((
                    SmallFile {
                        data,
                        xattrs,
                        delta: Some(d),
                        ..
                    },
                    size,
                    _held,
                )) => {
                    s.send(&Msg::FileDelta {
                        size,
                        pieces: d.pieces.iter().map(|&p| wire::piece(p)).collect(),
                        literal: data.len() as u64,
                        hash: *d.hash.as_bytes(),
                        xattrs: wire::xattrs(&xattrs),
                    })?;
                    s.send_data(&data)?;
                }
                Ok((mut f, _, _held)) => {
                    s.send(&Msg::FileData {
                        size: f.data.len() as u64,
                        hash: *blake3::hash(&f.data).as_bytes(),
                        xattrs: wire::xattrs(&f.xattrs),
                        holes: f.holes.clone(),
                    })?;
                    if f.holes.is_empty() {
                        flip_for_tests(&mut f.data);
                    }
                    s.send_data(&pack_around_holes(&f.data, 0, &f.holes))?;
                    // Keep the larger buffer for the next file.
                    if f.data.capacity() > buf.capacity() {
                        *buf = f.data;
                    }
                }
                Err(e) => s.send(&Msg::FileFailed(e))?,
            }
        }
        if buf.capacity() > KEEP_BUFFER {
            *buf = Vec::new();
        }
        s.flush()
    }

    /// Answers `HashFiles`: each file's BLAKE3, computed here.
    fn hash_files(&self, items: Vec<(Vec<u8>, tern_proto::WireEntry)>, buf: &mut Vec<u8>) -> Reply {
        if items.len() > tern_proto::MAX_BATCH_FILES {
            return Err(ErrorMsg::new(ErrorCode::Protocol, "too many files in one request"));
        }
        let _fd = self.fd_permit(1, Instant::now() + self.fd_wait())?;
        let mut out = Vec::with_capacity(items.len());
        for (path, expect) in items {
            let h = self.path(&path).and_then(|p| {
                let e =
                    wire::unentry_any_name(expect).ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "bad entry"))?;
                let f = self.ep.open(&p, &e).map_err(|e| wire::error_msg(&e))?;
                tern_core::hash_file(&*f, e.size, tern_core::engine::DEFAULT_CHUNK_SIZE, buf, &self.cancel)
                    .map_err(|e| wire::error_msg(&e))
            });
            out.push(match h {
                Ok(h) => tern_proto::HashOutcome::Hash(*h.as_bytes()),
                Err(e) => tern_proto::HashOutcome::Failed(e),
            });
        }
        Ok(Msg::Hashes(out))
    }

    /// Answers `Commit`: metadata, sync, verify and publish in one request.
    /// On failure the file is given up (its data removed).
    fn commit(&self, c: tern_proto::Commit) -> Reply {
        let h = self.whandle(c.handle)?;
        let waited = h.wait(c.writes, self.idle, &self.broken);
        if let Ok(mut w) = self.writes.lock() {
            w.remove(&c.handle);
        }
        let f = h.file.write().ok().and_then(|mut f| f.take());
        let f = f.ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "file already closed"))?;
        if let Err(e) = waited {
            // Chunks that never came: what did arrive is journaled and
            // re-verified on a resume. A chunk that could not be written
            // (a full disk) ends the file as any other failure does.
            f.abort(e.code == ErrorCode::Unavailable);
            return Err(e);
        }
        let owner = c.owner && self.ep.can_chown();
        let err = |e: Error| wire::error_msg(&e);
        let ready = (|| {
            f.set_meta(&wire::unmeta(&c.meta), owner, &wire::unxattrs(c.xattrs))
                .map_err(err)?;
            if c.sync {
                f.sync().map_err(err)?;
            }
            if let Some(hash) = c.verify {
                f.verify(&blake3::Hash::from_bytes(hash)).map_err(err)?;
            }
            Ok(())
        })();
        match ready {
            Ok(()) => f.publish().map(|()| Msg::Done).map_err(err),
            Err(e) => {
                f.abort(false);
                Err(e)
            }
        }
    }

    fn with_file(&self, handle: u64, f: impl FnOnce(&dyn WriteFile) -> tern_core::Result<()>) -> Reply {
        let h = self.whandle(handle)?;
        let file = h
            .file
            .read()
            .map_err(|_| ErrorMsg::new(ErrorCode::Server, "poisoned lock"))?;
        let file = file
            .as_ref()
            .ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "file already closed"))?;
        f(&**file).map(|()| Msg::Done).map_err(|e| wire::error_msg(&e))
    }

    /// Receives a chunk's data and writes it if it hashes right. No reply:
    /// an error is kept for the handle's next replying request.
    fn write(&self, s: &mut Stream, wc: WriteChunk, chunk: &mut tern_core::AlignedBuf) -> Result<()> {
        let h = self.whandle(wc.handle).map_err(NetError::Remote)?;
        if wc.len > MAX_CHUNK || wc.offset.checked_add(wc.len).is_none_or(|end| end > h.size) {
            return Err(proto("chunk outside the file"));
        }
        if !hash::valid_span(wc.offset, wc.len) {
            return Err(proto("a chunk that is not a whole BLAKE3 subtree"));
        }
        let holes = check_holes(&wc.holes, wc.offset, wc.len).ok_or_else(|| proto("bad hole list"))?;
        // Without memory the data cannot be taken off the stream: the
        // stream ends, and the client retries the chunk on another.
        let _held = self.mem_permit(wc.len).map_err(NetError::Remote)?;
        if chunk.capacity() > KEEP_BUFFER && (wc.len as usize) <= KEEP_BUFFER {
            *chunk = tern_core::AlignedBuf::default();
        }
        let buf = chunk.slice(wc.len as usize)?;
        recv_around_holes(s, buf, wc.offset, &holes, false)?;
        let single = wc.offset == 0 && wc.len == h.size;
        let got = if single {
            *blake3::hash(buf).as_bytes()
        } else {
            hash::cv_at(wc.offset, buf)
        };
        if got != wc.cv {
            tracing::warn!(module = %self.module, path = ?h.path, offset = wc.offset, "chunk arrived corrupted");
            h.applied(Some(ErrorMsg::new(
                ErrorCode::Corrupt,
                format!(
                    "chunk at offset {} arrived corrupted (BLAKE3 mismatch); not written",
                    wc.offset
                ),
            )));
            return Ok(());
        }
        let r = match h.file.read() {
            Ok(f) => match f.as_ref() {
                Some(f) => f
                    .write_chunk(wc.index, wc.offset, buf, &holes, (!single).then_some(&wc.cv))
                    .map_err(|e| wire::error_msg(&e)),
                None => Err(ErrorMsg::new(ErrorCode::Protocol, "file already closed")),
            },
            Err(_) => Err(ErrorMsg::new(ErrorCode::Server, "poisoned lock")),
        };
        h.applied(r.err());
        Ok(())
    }

    /// Takes a part of a client's basis signature for the file open on
    /// `handle`; after the last, plans the file against it and sends the
    /// plan in parts. Memory for both comes from the daemon's budget.
    fn delta_basis(
        &self,
        s: &mut Stream,
        handle: u64,
        (avg, chunks, last): (u32, wire::SigPart, bool),
        (size, chunk_size): (u64, u64),
    ) -> Result<()> {
        use tern_core::delta::Params;
        const ENTRY: u64 = SIGNATURE_ENTRY;
        let f = self.rhandle(handle).map_err(NetError::Remote)?;
        if chunks.len() > tern_proto::SIGNATURE_PART || !(Params { avg }).valid() {
            return Err(proto(
                "a signature part too large, or of a chunk size tern does not cut with",
            ));
        }
        let held = self.mem_permit(chunks.len() as u64 * ENTRY).map_err(NetError::Remote)?;
        let (chunks, id_bytes) =
            wire::sig_part(chunks).ok_or_else(|| proto("a signature whose ids do not divide into its chunks"))?;
        let (sig, permits) = {
            let mut d = self.deltas.lock().map_err(|_| proto("poisoned lock"))?;
            match d.remove(&handle) {
                Some(DeltaState::Receiving(mut sig, mut permits)) if sig.avg == avg && sig.id_bytes == id_bytes => {
                    sig.chunks.extend(chunks);
                    permits.push(held);
                    (sig, permits)
                }
                Some(_) => return Err(proto("a signature of mixed parts, or after its plan")),
                None => (Signature { avg, chunks, id_bytes }, vec![held]),
            }
        };
        if sig.chunks.len() > tern_core::delta::MAX_SIGNATURE_CHUNKS {
            return Err(proto("a signature too large"));
        }
        if !last {
            if let Ok(mut d) = self.deltas.lock() {
                d.insert(handle, DeltaState::Receiving(sig, permits));
            }
            return Ok(());
        }
        if !chunk_size.is_power_of_two() || !(1024..=MAX_CHUNK).contains(&chunk_size) {
            return Err(proto("a plan over a grid tern does not use"));
        }
        let read = |off: u64, b: &mut [u8]| f.read_exact_at(off, b);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
        let plan = match tern_core::delta::plan_file(&read, size, &sig, threads, chunk_size, false) {
            Ok(Some(p)) => p,
            // An empty plan: not worth a delta, the client reads it plainly.
            Ok(None) => tern_core::delta::Plan::default(),
            Err(e) => {
                s.send(&Msg::Error(wire::error_msg(&e)))?;
                return s.flush();
            }
        };
        // The signature's memory goes back; the plan's is taken next.
        drop((sig, permits));
        let pieces: u64 = plan.chunks.iter().map(|c| c.len() as u64 + 1).sum();
        let held = self.mem_permit(pieces * ENTRY).map_err(NetError::Remote)?;
        let plan = Arc::new(plan);
        let mut first = 0usize;
        while first < plan.chunks.len() || first == 0 {
            let (mut end, mut n) = (first, 0usize);
            while end < plan.chunks.len() && (end == first || n + plan.chunks[end].len() <= tern_proto::MAX_PIECES) {
                n += plan.chunks[end].len();
                end += 1;
            }
            let part = plan.chunks[first..end]
                .iter()
                .map(|c| c.iter().map(|&p| wire::piece(p)).collect())
                .collect();
            s.send(&Msg::DeltaPlan {
                first: first as u64,
                chunks: part,
                last: end >= plan.chunks.len(),
            })?;
            if end >= plan.chunks.len() {
                break;
            }
            first = end;
        }
        if let Ok(mut d) = self.deltas.lock() {
            d.insert(
                handle,
                DeltaState::Planned {
                    plan,
                    size,
                    chunk_size,
                    _held: vec![held],
                },
            );
        }
        s.flush()
    }

    /// Sends chunk `index` of a planned file: its CV and its literal bytes.
    fn read_delta(&self, s: &mut Stream, handle: u64, index: u64, buf: &mut Vec<u8>) -> Result<()> {
        let f = self.rhandle(handle).map_err(NetError::Remote)?;
        let (pieces, offset, len) = {
            let d = self.deltas.lock().map_err(|_| proto("poisoned lock"))?;
            let Some(DeltaState::Planned {
                plan, size, chunk_size, ..
            }) = d.get(&handle)
            else {
                return Err(proto("a delta read of a file with no plan"));
            };
            let Some(pieces) = plan.chunks.get(index as usize) else {
                return Err(proto("a delta read past the plan"));
            };
            let offset = index * chunk_size;
            (pieces.clone(), offset, (*chunk_size).min(size - offset))
        };
        let read = self.mem_permit(len).and_then(|held| {
            buf.resize(len as usize, 0);
            f.read_exact_at(offset, buf).map_err(|e| wire::error_msg(&e))?;
            Ok(held)
        });
        let _held = match read {
            Ok(h) => h,
            Err(e) => {
                s.send(&Msg::Error(e))?;
                return s.flush();
            }
        };
        let cv = hash::chunk_cv(offset, buf);
        let literals = tern_core::delta::literals(&pieces, offset, buf);
        s.send(&Msg::DeltaRead {
            cv,
            literal: literals.len() as u64,
        })?;
        s.send_data(&literals)?;
        if buf.capacity() > KEEP_BUFFER {
            *buf = Vec::new();
        }
        s.flush()
    }

    /// Sends the signature of the basis of the file written on `handle`,
    /// in parts; one empty part when it has none.
    /// Runs a transfer from other daemons into this module (remote to
    /// remote), as `req` and `extra` say, on the tickets the sources gave.
    fn pull(
        &self,
        s: &mut Stream,
        req: tern_proto::PullRequest,
        extra: PullExtra,
        tickets: Vec<tern_proto::Ticket>,
    ) -> Result<()> {
        let path = |b: &[u8]| self.path(b);
        let t = crate::pull::Target {
            ep: &self.ep,
            module: &self.module,
            writable: self.writable,
            path: &path,
            shutdown: &self.cancel,
        };
        crate::pull::serve(&self.pull, &t, req, extra, tickets, s)
    }

    fn basis_signature(&self, s: &mut Stream, handle: u64) -> Result<()> {
        let sig = self.whandle(handle).and_then(|h| match h.file.read() {
            Ok(f) => match f.as_ref() {
                Some(f) => f
                    .basis_signature()
                    .map(|g| (g, h.size))
                    .map_err(|e| wire::error_msg(&e)),
                None => Err(ErrorMsg::new(ErrorCode::Protocol, "file already closed")),
            },
            Err(_) => Err(ErrorMsg::new(ErrorCode::Server, "poisoned lock")),
        });
        match sig {
            Ok((sig, size)) => wire::send_signature(s, sig.as_ref(), size)?,
            Err(e) => s.send(&Msg::Error(e))?,
        }
        s.flush()
    }

    /// Builds a chunk of the file on `handle` from its basis and the
    /// literal bytes that follow: see [`Msg::WriteDelta`].
    fn write_delta(
        &self,
        s: &mut Stream,
        handle: u64,
        (index, offset, len): (u64, u64, u64),
        pieces: Vec<tern_proto::WirePiece>,
        cv: [u8; 32],
    ) -> Result<()> {
        use tern_core::delta::Piece;
        let h = self.whandle(handle).map_err(NetError::Remote)?;
        if len > MAX_CHUNK || offset.checked_add(len).is_none_or(|end| end > h.size) {
            return Err(proto("chunk outside the file"));
        }
        if !hash::valid_span(offset, len) || pieces.len() > tern_proto::MAX_PIECES {
            return Err(proto(
                "a delta chunk that is not a whole BLAKE3 subtree, or of too many pieces",
            ));
        }
        let pieces: Vec<Piece> = pieces.into_iter().map(wire::unpiece).collect();
        let literal: u64 = pieces
            .iter()
            .filter(|p| matches!(p, Piece::Literal { .. }))
            .map(Piece::len)
            .sum();
        if literal > len {
            return Err(proto("a delta chunk with more literal bytes than the chunk"));
        }
        // The literals and the built chunk are both in memory at once.
        let _held = self.mem_permit(len + literal).map_err(NetError::Remote)?;
        let mut literals = vec![0u8; literal as usize];
        s.recv_data(&mut literals)?;
        let r = match h.file.read() {
            Ok(f) => match f.as_ref() {
                Some(f) => match f.write_delta(index, offset, len, &pieces, &literals, &cv) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(ErrorMsg::new(
                        ErrorCode::Changed,
                        format!("chunk at offset {offset} could not be built from the old version; not written"),
                    )),
                    Err(e) => Err(wire::error_msg(&e)),
                },
                None => Err(ErrorMsg::new(ErrorCode::Protocol, "file already closed")),
            },
            Err(_) => Err(ErrorMsg::new(ErrorCode::Server, "poisoned lock")),
        };
        h.applied(r.err());
        Ok(())
    }

    fn batch(&self, s: &mut Stream, b: Batch) -> Result<()> {
        // A session that may not write is refused before any data is
        // taken: the stream ends, since its data frames follow.
        if let Err(e) = self.may_write() {
            s.send(&Msg::Error(e))?;
            s.flush()?;
            return Err(NetError::Closed);
        }
        // The data comes whatever happens; receive it before deciding.
        let mut items = Vec::with_capacity(b.items.len());
        let mut early: Vec<Option<ErrorMsg>> = Vec::with_capacity(b.items.len());
        let mut total = 0u64;
        for it in &b.items {
            match it.body {
                tern_proto::BatchBody::File { size, .. } => total = total.saturating_add(size),
                // Its literals and the file built from them.
                tern_proto::BatchBody::Delta(ref d) | tern_proto::BatchBody::DeltaFrom { delta: ref d, .. } => {
                    total = total.saturating_add(d.size).saturating_add(d.literal)
                }
                tern_proto::BatchBody::Symlink { .. } => {}
            }
        }
        if total > 2 * MAX_CHUNK {
            return Err(proto("batch too large"));
        }
        let _held = self.mem_permit(total).map_err(NetError::Remote)?;
        let spec = |size: u64, meta: &tern_core::Meta, changed: (i64, u32)| tern_core::FileSpec {
            size,
            chunk_size: size.next_power_of_two().max(hash::MIN_CHUNK_SIZE),
            resumable: false,
            durable: b.sync,
            source_meta: meta.clone(),
            source_changed: tern_core::Time {
                sec: changed.0,
                nsec: changed.1.min(999_999_999),
            },
        };
        for it in b.items {
            let (from, body) = match it.body {
                tern_proto::BatchBody::DeltaFrom { basis, delta } => (Some(basis), tern_proto::BatchBody::Delta(delta)),
                body => (None, body),
            };
            match body {
                tern_proto::BatchBody::File {
                    size,
                    holes,
                    hash,
                    xattrs,
                    changed,
                } => {
                    let holes = check_holes(&holes, 0, size).ok_or_else(|| proto("bad hole list"))?;
                    // Zeroed pages the holes leave untouched are never
                    // materialised.
                    let mut data = vec![0u8; size as usize];
                    recv_around_holes(s, &mut data, 0, &holes, true)?;
                    let problem = self.new_path(&it.path).err().or_else(|| {
                        (*blake3::hash(&data).as_bytes() != hash).then(|| {
                            ErrorMsg::new(ErrorCode::Corrupt, "arrived corrupted (BLAKE3 mismatch); not written")
                        })
                    });
                    let meta = wire::unmeta(&it.meta);
                    items.push(BatchItem {
                        rel: wire::bytes_path(&it.path),
                        body: BatchBody::File {
                            spec: spec(size, &meta, changed),
                            data,
                            holes,
                            hash: blake3::Hash::from_bytes(hash),
                            xattrs: wire::unxattrs(xattrs),
                        },
                        meta,
                    });
                    early.push(problem);
                }
                tern_proto::BatchBody::Delta(tern_proto::WireDelta {
                    size,
                    pieces,
                    literal,
                    hash,
                    xattrs,
                    changed,
                }) => {
                    let recipe = wire::unrecipe(pieces, size).filter(|r| r.1 == literal);
                    let (pieces, literal) = recipe.ok_or_else(|| proto("a delta recipe that does not add up"))?;
                    let mut literals = vec![0u8; literal as usize];
                    s.recv_data(&mut literals)?;
                    // Another file as the basis: one the session may name,
                    // not a side file of some transfer.
                    let basis = from.map(|b| {
                        self.path(&b).and_then(|p| {
                            match p.file_name().is_some_and(|n| !tern_core::local::is_side_file(n)) {
                                true => Ok(p),
                                false => Err(ErrorMsg::new(ErrorCode::Forbidden, "not a file to build from")),
                            }
                        })
                    });
                    early.push(
                        self.new_path(&it.path)
                            .err()
                            .or_else(|| basis.as_ref().and_then(|b| b.as_ref().err().cloned())),
                    );
                    let meta = wire::unmeta(&it.meta);
                    items.push(BatchItem {
                        rel: wire::bytes_path(&it.path),
                        body: BatchBody::Delta {
                            basis: basis.and_then(|b| b.ok()),
                            spec: spec(size, &meta, changed),
                            pieces,
                            literals,
                            hash: blake3::Hash::from_bytes(hash),
                            xattrs: wire::unxattrs(xattrs),
                        },
                        meta,
                    });
                }
                // Made a `Delta` above.
                tern_proto::BatchBody::DeltaFrom { .. } => return Err(proto("a delta from another file")),
                tern_proto::BatchBody::Symlink { target } => {
                    early.push(self.new_path(&it.path).err());
                    items.push(BatchItem {
                        rel: wire::bytes_path(&it.path),
                        meta: wire::unmeta(&it.meta),
                        body: BatchBody::Symlink {
                            target: wire::bytes_path(&target),
                        },
                    });
                }
            }
        }
        let (ok_items, ok_idx): (Vec<_>, Vec<_>) = items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| early[*i].is_none())
            .map(|(i, it)| (it, i))
            .unzip();
        let opts = BatchOptions {
            owner: b.owner && self.ep.can_chown(),
            sync: b.sync,
            verify: b.verify,
            cancel: self.cancel.clone(),
        };
        // Each group's files stay open until it commits: a group takes
        // their descriptors from the daemon's budget, at most half of it,
        // all groups of the batch within one wait.
        let deadline = Instant::now() + self.fd_wait();
        let most = half(&self.fds);
        let cost = |it: &BatchItem| match &it.body {
            BatchBody::File { spec, .. } | BatchBody::Delta { spec, .. } => LocalEndpoint::descriptors_for(spec),
            BatchBody::Symlink { .. } => 0,
        };
        let mut results: Vec<Option<ErrorMsg>> = Vec::with_capacity(ok_items.len());
        let mut left = ok_items.into_iter().peekable();
        while left.peek().is_some() {
            let (mut group, mut fds) = (Vec::new(), 0);
            while let Some(it) =
                left.next_if(|it| group.is_empty() || (fds + cost(it) <= most && group.len() < BATCH_GROUP))
            {
                fds += cost(&it);
                group.push(it);
            }
            match self.fd_permit(fds, deadline) {
                Ok(_fds) => results.extend(
                    self.wep()
                        .write_batch(group, &opts)
                        .into_iter()
                        .map(|r| r.err().map(|e| wire::error_msg(&e))),
                ),
                // The files wait for another run; symlinks need no
                // descriptor and are made now.
                Err(e) => {
                    let start = results.len();
                    let mut links = Vec::new();
                    for (i, it) in group.into_iter().enumerate() {
                        match it.body {
                            BatchBody::Symlink { .. } => {
                                results.push(None);
                                links.push((start + i, it));
                            }
                            BatchBody::File { .. } | BatchBody::Delta { .. } => results.push(Some(e.clone())),
                        }
                    }
                    let (at, links): (Vec<_>, Vec<_>) = links.into_iter().unzip();
                    for (i, r) in at.into_iter().zip(self.wep().write_batch(links, &opts)) {
                        results[i] = r.err().map(|e| wire::error_msg(&e));
                    }
                }
            }
        }
        for (i, r) in ok_idx.into_iter().zip(results) {
            early[i] = r;
        }
        s.send(&Msg::BatchReply(early))
    }
}

/// Holes as absolute ranges inside `[offset, offset+len)`, sorted and
/// disjoint; `None` if the list is not that.
pub(crate) fn check_holes(holes: &[(u64, u64)], offset: u64, len: u64) -> Option<Vec<(u64, u64)>> {
    let mut pos = offset;
    for &(s, l) in holes {
        if s < pos || l == 0 || s.checked_add(l)? > offset + len {
            return None;
        }
        pos = s + l;
    }
    Some(holes.to_vec())
}

/// Receives the bytes of `buf` (at `offset` in the file) that are not in
/// `holes`, as one run of data frames, and zeroes the holes unless `buf`
/// is known to be zeroed already.
pub(crate) fn recv_around_holes(
    s: &mut Stream,
    buf: &mut [u8],
    offset: u64,
    holes: &[(u64, u64)],
    zeroed: bool,
) -> Result<()> {
    if holes.is_empty() {
        return s.recv_data(buf);
    }
    // Receive the data ranges contiguously, then spread them.
    let ranges = data_around(holes, offset, buf.len() as u64);
    let n: u64 = ranges.iter().map(|r| r.1).sum();
    let mut packed = vec![0u8; n as usize];
    s.recv_data(&mut packed)?;
    let mut at = 0usize;
    for (start, len) in ranges {
        let from = (start - offset) as usize;
        buf[from..from + len as usize].copy_from_slice(&packed[at..at + len as usize]);
        at += len as usize;
    }
    if zeroed {
        return Ok(());
    }
    for &(h, l) in holes {
        let from = (h - offset) as usize;
        buf[from..from + l as usize].fill(0);
    }
    Ok(())
}

/// The ranges of `[offset, offset+len)` outside `holes` (sorted, disjoint).
fn data_around(holes: &[(u64, u64)], offset: u64, len: u64) -> Vec<(u64, u64)> {
    let mut ranges = Vec::with_capacity(holes.len() + 1);
    let mut pos = offset;
    for &(h, l) in holes {
        if h > pos {
            ranges.push((pos, h - pos));
        }
        pos = h + l;
    }
    if pos < offset + len {
        ranges.push((pos, offset + len - pos));
    }
    ranges
}

/// The data bytes of `data` (at `offset`) outside `holes`, concatenated:
/// what goes on the wire for a chunk with holes.
pub fn pack_around_holes<'a>(data: &'a [u8], offset: u64, holes: &[(u64, u64)]) -> std::borrow::Cow<'a, [u8]> {
    if holes.is_empty() {
        return std::borrow::Cow::Borrowed(data);
    }
    let mut out = Vec::with_capacity(data.len());
    for (start, len) in data_around(holes, offset, data.len() as u64) {
        let from = (start - offset) as usize;
        out.extend_from_slice(&data[from..from + len as usize]);
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Gate, Transport};

    fn peer(addr: &str) -> Peer {
        Peer {
            addr: addr.parse().expect("address"),
            client: None,
            transport: Transport::Tcp,
            conn_id: 0,
            gate: Gate::standalone(Instant::now() + Duration::from_secs(10)),
        }
    }

    /// Issue 13 (low): the table of failed logins grew with every address
    /// that ever failed, and an IPv6 host rotating through its /64 was
    /// never limited.
    #[test]
    fn failed_logins_are_counted_by_64_in_a_table_of_bounded_size() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut cfg = ServerConfig::empty();
        cfg.add_module("data", d.path(), Access::Read, None).expect("module");
        let srv = Server::new(&cfg, "test").expect("server");
        for i in 0..MAX_FAILURES {
            assert!(srv.may_try(&peer(&format!("[2001:db8:0:1::{i:x}]:4000"))).is_ok());
            srv.note_failure(&peer(&format!("[2001:db8:0:1::{i:x}]:4000")), "test");
        }
        let e = srv
            .may_try(&peer("[2001:db8:0:1:ffff::9]:4000"))
            .expect_err("a new address of the same /64");
        assert!(e.to_string().contains("too many failed attempts"), "{e}");
        assert!(
            srv.may_try(&peer("[2001:db8:0:2::1]:4000")).is_ok(),
            "the next /64 is another host"
        );

        for i in 0..(MAX_FAILURE_ENTRIES as u32 + 100) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            srv.note_failure(&peer(&format!("{ip}:4000")), "test");
        }
        let n = srv.failures.lock().expect("lock").len();
        assert!(n <= MAX_FAILURE_ENTRIES, "{n} entries");
    }
}
