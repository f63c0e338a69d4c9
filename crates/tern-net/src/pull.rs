//! Remote to remote: on a client's request, a daemon runs the transfer from
//! other daemons into one of its modules itself, so the data goes straight
//! from daemon to daemon and never through the client.
//!
//! Both daemons must allow it, and the client must be allowed to read the
//! source: the destination lists the source in its `pull_from`, pinned to
//! its key; the source grants the destination daemon's key (its
//! `[[clients]]`); and the client, logged in to the source, asks it for a
//! ticket (`GrantTicket`) that lets the destination's key read that path
//! for a few minutes. The destination presents it when it logs in, and the
//! source opens a read-only session confined to that path. The client must
//! hold a read-write grant on the destination, even for a check or a dry
//! run. No secret of the client is forwarded.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_core::engine::{Action, Mode, Observer, Options, Root, Summary};
use tern_core::filter::{Filter, Rule};
use tern_core::{Error, LocalEndpoint};
use tern_proto::{ErrorCode, ErrorMsg, Msg, PullExtra, PullRequest, RunEvent, RunOptions};

use crate::compress::Compression;

use crate::config::PullPeer;
use crate::error::{NetError, Result};
use crate::path::PathReport;
use crate::remote::{ConnectOptions, RemoteEndpoint, TransportChoice, PATHS_KEY};
use crate::stream::Stream;
use crate::trust::TrustPolicy;
use crate::url::RemoteSpec;
use crate::wire;

/// What a daemon may pull from, and the identity it pulls with.
#[derive(Debug, Clone)]
pub struct PullPolicy {
    /// Allowed source daemons, each pinned to its key (empty: none).
    pub allow: Vec<PullPeer>,
    /// The daemon's state directory: its identity is the client key it
    /// presents to sources.
    pub state_dir: PathBuf,
    /// Pulls that may run at once.
    pub max: usize,
    /// Pulls running now.
    pub running: Arc<std::sync::atomic::AtomicUsize>,
}

/// A running pull's place among [`PullPolicy::max`], given back when dropped.
struct Running(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engine options of `o`, for a [`PullRequest`].
pub fn run_options(o: &Options) -> RunOptions {
    RunOptions {
        check: o.mode == Mode::Check,
        delete: o.delete,
        dry_run: o.dry_run,
        checksum: o.checksum,
        rules: o
            .filter
            .rules()
            .iter()
            .map(|r| (r.pattern_bytes().to_vec(), r.is_include()))
            .collect(),
        jobs: o.jobs.min(64) as u32,
        fsync: o.fsync,
        verify: o.verify,
        chunk_size: o.chunk_size,
        hard_links: o.hard_links,
        xattrs: o.xattrs,
        bwlimit: o.bwlimit,
    }
}

/// Engine options from a request; refused if out of range.
fn options(r: &RunOptions, extra: PullExtra, cancel: Arc<AtomicBool>) -> std::result::Result<Options, ErrorMsg> {
    let bad = |m: String| ErrorMsg::new(ErrorCode::Protocol, m);
    if !(1024..=crate::server::MAX_CHUNK).contains(&r.chunk_size) || !r.chunk_size.is_power_of_two() {
        return Err(bad(format!("chunk size {} is not allowed", r.chunk_size)));
    }
    let mut filter = Filter::new();
    for (p, include) in &r.rules {
        let rule = Rule::from_bytes(p, *include)
            .map_err(|e| bad(format!("bad pattern {:?}: {e}", String::from_utf8_lossy(p))))?;
        filter.push(rule);
    }
    Ok(Options {
        mode: if r.check { Mode::Check } else { Mode::Transfer },
        delete: r.delete,
        delete_excluded: false,
        max_delete: None,
        prune_empty_dirs: false,
        dry_run: r.dry_run,
        checksum: r.checksum,
        filter,
        jobs: r.jobs.clamp(1, 64) as usize,
        fsync: r.fsync,
        verify: r.verify,
        chunk_size: r.chunk_size,
        hard_links: r.hard_links,
        xattrs: r.xattrs,
        bwlimit: r.bwlimit,
        // Its sources are other daemons, which plan the delta themselves.
        delta: extra.delta,
        // Not passed on yet: a client with rules set copies through itself.
        select: Default::default(),
        protect: Default::default(),
        cancel,
    })
}

/// Sends the engine's events down a channel.
struct Forward {
    tx: Mutex<Sender<RunEvent>>,
    /// The module root: local paths are passed on relative to it, so the
    /// client never learns where the module lives.
    root: PathBuf,
}

impl Forward {
    fn send(&self, e: RunEvent) {
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(e);
        }
    }
}

impl Observer for Forward {
    fn planned(&self, files: u64, bytes: u64) {
        self.send(RunEvent::Planned { files, bytes });
    }
    fn scan_done(&self) {
        self.send(RunEvent::ScanDone);
    }
    fn progress(&self, bytes: u64) {
        self.send(RunEvent::Progress(bytes));
    }
    fn file_done(&self) {
        self.send(RunEvent::FilesDone(1));
    }
    fn action(&self, action: Action, path: &std::path::Path, size: u64) {
        let action = serde_json::to_string(&action).unwrap_or_default();
        self.send(RunEvent::Action {
            action,
            path: wire::path_bytes(path),
            size,
        });
    }
    fn error(&self, e: &Error) {
        // A path in the module goes relative to it; any other error (a
        // source's) goes whole.
        let rel = e.path().and_then(|p| p.strip_prefix(&self.root).ok());
        self.send(match rel {
            Some(rel) => RunEvent::Failed {
                path: Some(wire::path_bytes(rel)),
                message: e.detail(),
            },
            None => RunEvent::Failed {
                path: None,
                message: e.to_string(),
            },
        });
    }
}

/// What the session serving a [`PullRequest`] provides.
pub(crate) struct Target<'a> {
    /// The module's confined endpoint.
    pub ep: &'a LocalEndpoint,
    /// The module's name, for logs.
    pub module: &'a str,
    /// The client may write.
    pub writable: bool,
    /// Checks a client path (plain, inside the module).
    pub path: &'a dyn Fn(&[u8]) -> std::result::Result<PathBuf, ErrorMsg>,
    /// Set when the daemon stops.
    pub shutdown: &'a Arc<AtomicBool>,
}

/// Serves a [`PullRequest`] on `s`: runs the transfer, sending its events
/// as it goes and its summary at the end, or an `Error` if it cannot start.
pub(crate) fn serve(
    policy: &PullPolicy,
    t: &Target,
    req: PullRequest,
    extra: PullExtra,
    tickets: Vec<tern_proto::Ticket>,
    s: &mut Stream,
) -> Result<()> {
    match start(policy, t, &req, extra, tickets) {
        Ok((roots, opts, transport, endpoints, _running)) => run(t, roots, opts, transport, &endpoints, s),
        Err(e) => {
            tracing::warn!(module = %t.module, reason = ?e.message, "pull refused");
            s.send(&Msg::Error(e))?;
            s.flush()
        }
    }
}

/// The roots, options, transport and source connections of a pull, and
/// its place among the pulls running.
type Started = (Vec<Root>, Options, String, Vec<Arc<RemoteEndpoint>>, Running);

fn start(
    policy: &PullPolicy,
    t: &Target,
    req: &PullRequest,
    extra: PullExtra,
    tickets: Vec<tern_proto::Ticket>,
) -> std::result::Result<Started, ErrorMsg> {
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = options(&req.opts, extra, cancel)?;
    // Even a check or a dry run makes this daemon connect elsewhere and
    // read: only a client that may write here may ask for that.
    if !t.writable {
        return Err(ErrorMsg::new(
            ErrorCode::Forbidden,
            format!(
                "module `{}` is read-only for this client, and a transfer from another daemon (even a check) \
                 needs a read-write grant",
                t.module
            ),
        ));
    }
    if req.sources.is_empty() || req.sources.len() > 64 || tickets.len() != req.sources.len() {
        return Err(ErrorMsg::new(
            ErrorCode::Protocol,
            "a pull needs 1 to 64 sources, each with its ticket",
        ));
    }
    let running = policy.running.fetch_add(1, Ordering::Relaxed);
    let place = Running(policy.running.clone());
    if running >= policy.max {
        return Err(ErrorMsg::new(
            ErrorCode::Unavailable,
            format!(
                "this daemon runs as many transfers from other daemons as it allows (max_pulls = {}); try again later",
                policy.max
            ),
        ));
    }
    let transport = match req.transport {
        1 => TransportChoice::Quic,
        2 => TransportChoice::Tcp,
        _ => TransportChoice::Auto,
    };
    let mut roots = Vec::new();
    let mut endpoints = Vec::new();
    let mut used = None;
    for (src, ticket) in req.sources.iter().zip(tickets) {
        let spec = RemoteSpec {
            host: src.host.clone(),
            port: src.port,
            module: src.module.clone(),
            path: wire::bytes_path(&src.path),
            trailing_slash: false,
        };
        let Some(pinned) = policy.allow.iter().find(|p| p.allows(&src.host, src.port)) else {
            return Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                format!(
                    "this daemon may not pull from {}: its configuration's pull_from does not list it",
                    spec.authority()
                ),
            ));
        };
        if crate::identity::normalize_fingerprint(&src.fingerprint).ok().as_ref() != Some(&pinned.fingerprint) {
            return Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                format!(
                    "the client saw another key at {} than this daemon's pull_from pins ({})",
                    spec.authority(),
                    pinned.fingerprint
                ),
            ));
        }
        if ticket.module != src.module || ticket.path != src.path {
            return Err(ErrorMsg::new(
                ErrorCode::Protocol,
                "a ticket for another module or path than its source",
            ));
        }
        let dst_rel = (t.path)(&src.dst_rel)?;
        if let Some(n) = dst_rel.file_name().filter(|n| tern_core::local::is_side_file(n)) {
            return Err(ErrorMsg::new(
                ErrorCode::Forbidden,
                format!(
                    "`{}` is a name tern reserves for its temporary files",
                    n.to_string_lossy()
                ),
            ));
        }
        let connect = ConnectOptions {
            transport,
            token: None,
            ticket: Some(ticket),
            trust: TrustPolicy {
                fingerprint: Some(pinned.fingerprint.clone()),
                accept_new: false,
                known_hosts: policy.state_dir.join("known_hosts"),
            },
            identity_dir: Some(policy.state_dir.clone()),
            timeout: Duration::from_secs(60),
            write: false,
            compress: Compression::from_wire(extra.compress)
                .ok_or_else(|| ErrorMsg::new(ErrorCode::Protocol, "a compression choice tern does not know"))?,
        };
        let ep = RemoteEndpoint::connect(&spec, &connect).map_err(|e| match e {
            // The source answered: what it said is no news about the network.
            NetError::Remote(m) if m.code == ErrorCode::Unauthorized || m.code == ErrorCode::Forbidden => {
                ErrorMsg::new(
                    m.code,
                    format!(
                        "the source {} refused this daemon: {} (grant this daemon's key, `tern fingerprint --server`, in the source's [[clients]])",
                        spec.display(),
                        m.message
                    ),
                )
            }
            // Anything else stays in this daemon's log: its clients learn
            // nothing about what else answers where.
            e => {
                tracing::info!(source = %spec.authority(), error = ?e.to_string(), "pull: source unreachable");
                ErrorMsg::new(
                    ErrorCode::Unavailable,
                    format!("cannot reach the source {}", spec.authority()),
                )
            }
        })?;
        used.get_or_insert_with(|| ep.transport().name().to_string());
        // Each worker reads on a stream of its own; one more for the walk.
        ep.open_streams_ahead(opts.jobs + 1);
        let ep = Arc::new(ep);
        endpoints.push(ep.clone());
        roots.push(Root { src: ep, dst_rel });
    }
    Ok((roots, opts, used.unwrap_or_default(), endpoints, place))
}

/// How often progress is passed on, and the longest silence (a heartbeat
/// keeps the client's wait from timing out during long steps).
const TICK: Duration = Duration::from_millis(200);
const HEARTBEAT: Duration = Duration::from_secs(5);

fn run(
    t: &Target,
    roots: Vec<Root>,
    opts: Options,
    transport: String,
    sources: &[Arc<RemoteEndpoint>],
    s: &mut Stream,
) -> Result<()> {
    let cancel = opts.cancel.clone();
    let (tx, rx) = channel();
    let obs = Arc::new(Forward {
        tx: Mutex::new(tx),
        root: t.ep.root().to_path_buf(),
    });
    let dest = Arc::new(t.ep.clone());
    tracing::info!(module = %t.module, sources = roots.len(), transport = %transport, "pull started");
    let engine = std::thread::spawn(move || tern_core::run(roots, dest, opts, obs));
    let mut bytes = 0u64;
    let mut files = 0u64;
    let mut last = Instant::now();
    let mut failed = None;
    loop {
        if t.shutdown.load(Ordering::Relaxed) {
            cancel.store(true, Ordering::Relaxed);
        }
        let mut out = Vec::new();
        let mut ended = false;
        let mut take = |e: RunEvent| match e {
            RunEvent::Progress(n) => bytes += n,
            RunEvent::FilesDone(n) => files += n,
            e => out.push(e),
        };
        match rx.recv_timeout(TICK) {
            Ok(e) => take(e),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => ended = true,
        }
        // Pass on everything waiting in one flush.
        while !ended {
            match rx.try_recv() {
                Ok(e) => take(e),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => ended = true,
            }
        }
        let due = ended || !out.is_empty() || last.elapsed() >= TICK;
        if due && failed.is_none() {
            if files > 0 {
                out.insert(0, RunEvent::FilesDone(std::mem::take(&mut files)));
            }
            if bytes > 0 || last.elapsed() >= HEARTBEAT {
                out.insert(0, RunEvent::Progress(std::mem::take(&mut bytes)));
            }
            if !out.is_empty() {
                let sent = out
                    .into_iter()
                    .try_for_each(|e| s.send(&Msg::RunEvent(e)))
                    .and_then(|()| s.flush());
                if let Err(e) = sent {
                    // The client is gone: stop, keeping partial files for a resume.
                    tracing::info!(module = %t.module, error = %e, "client left; stopping the pull");
                    cancel.store(true, Ordering::Relaxed);
                    failed = Some(e);
                }
                last = Instant::now();
            }
        }
        if ended {
            break;
        }
    }
    let summary: Summary = engine
        .join()
        .map_err(|_| NetError::Remote(ErrorMsg::new(ErrorCode::Server, "the transfer thread panicked")))?;
    tracing::info!(module = %t.module, copied = summary.copied, errors = summary.errors, "pull ended");
    if let Some(e) = failed {
        return Err(e);
    }
    let mut summary_json = serde_json::to_value(&summary).map_err(|e| NetError::Config(e.to_string()))?;
    let paths: Vec<PathReport> = sources.iter().map(|e| e.path_report()).collect();
    if let Some(o) = summary_json.as_object_mut() {
        o.insert(
            PATHS_KEY.into(),
            serde_json::to_value(paths).map_err(|e| NetError::Config(e.to_string()))?,
        );
    }
    let summary_json = summary_json.to_string();
    s.send(&Msg::RunDone {
        summary_json,
        transport,
    })?;
    s.flush()
}
