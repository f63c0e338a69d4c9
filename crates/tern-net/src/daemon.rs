//! Running the daemon: listeners on every configured address, and a
//! graceful stop.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{ServerConfig, DEFAULT_PORT};
use crate::error::Result;
use crate::identity::Identity;
use crate::server::Server;
use crate::transport::{Handler, Listener, QuicKeys};

/// A running daemon.
pub struct Daemon {
    rt: tokio::runtime::Runtime,
    server: Arc<Server>,
    addrs: Vec<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Daemon {
    /// Binds every listen address and starts accepting.
    pub fn start(cfg: &ServerConfig, id: &Identity) -> Result<Daemon> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1024)
            .enable_all()
            .thread_name("tern-serve")
            .build()?;
        let server = Arc::new(
            Server::new(cfg, concat!("tern ", env!("CARGO_PKG_VERSION")))?
                .with_identity(id)
                .with_journal_key(id.derive_secret("tern 2026-12-02 journal key")),
        );
        let files = server.open_file_budget();
        tracing::info!(
            open_files = files,
            max_connections = cfg.limits.max_conns,
            "descriptors for transfers"
        );
        // The budget is half the limit less 64; sockets use the other half.
        if cfg.limits.open_files.is_none() && cfg.limits.max_conns > files {
            tracing::warn!(
                "the open-file limit leaves room for about {files} connections, fewer than max_connections = {}; \
                 raise `ulimit -n` or lower max_connections",
                cfg.limits.max_conns
            );
        }
        let listen = if cfg.listen.is_empty() {
            vec![SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))]
        } else {
            cfg.listen.clone()
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        if cfg.partial_max_age.is_some() || server.has_quotas() {
            rt.spawn(expire_partials(server.clone(), cfg.partial_max_age, stop_rx.clone()));
        }
        let mut addrs = Vec::new();
        for a in listen {
            let keys = quic_keys(id);
            let l = rt.block_on(Listener::bind(
                a,
                crate::tls::server_config(id)?,
                cfg.limits.clone(),
                keys,
            ))?;
            addrs.push(l.local_addr()?);
            let srv = server.clone();
            let handler: Handler = Arc::new(move |s, p| srv.handle(s, p));
            rt.spawn(l.run(handler, stop_rx.clone()));
        }
        Ok(Daemon {
            rt,
            server,
            addrs,
            stop,
        })
    }

    /// The addresses listened on.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Waits for SIGINT or SIGTERM, then stops: no new connections, no new
    /// requests; after at most `grace`, files still being written are
    /// aborted with their partial data and journal kept for a resume.
    pub fn run_until_signal(self, grace: Duration) -> Result<()> {
        self.rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            Ok::<_, std::io::Error>(())
        })?;
        tracing::info!("stopping: no new connections; waiting for requests in flight");
        self.stop(grace);
        Ok(())
    }

    /// Stops now (see [`Daemon::run_until_signal`]).
    pub fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        self.server.shutdown.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + grace;
        while self.server.active_sessions() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.server.abort_all();
        self.rt.shutdown_timeout(Duration::from_secs(1));
        tracing::info!("stopped");
    }
}

/// How often abandoned partial files are looked for.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(3600);

/// Removes abandoned partial files, and counts what modules with a quota
/// hold, now and then every
/// [`EXPIRY_INTERVAL`], until the daemon stops.
async fn expire_partials(server: Arc<Server>, age: Option<Duration>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut every = tokio::time::interval(EXPIRY_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => return,
        }
        // The walk is file system work: off the async threads.
        let s = server.clone();
        if tokio::task::spawn_blocking(move || s.expire_partials(age))
            .await
            .is_err()
        {
            tracing::warn!("the walk for abandoned partial files failed");
        }
    }
}

/// The QUIC endpoint's keys, each derived from the identity for its one use.
fn quic_keys(id: &Identity) -> QuicKeys {
    QuicKeys {
        reset: id.derive_secret("tern 2026-11-21 QUIC stateless reset key"),
        cid: id.derive_secret("tern 2026-12-02 QUIC connection ID tag key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_quic_key_has_its_own_derivation() {
        let d = tempfile::tempdir().expect("tempdir");
        let a = Identity::load_or_create(d.path()).expect("identity");
        let b = Identity::load_or_create(&d.path().join("b")).expect("identity");
        let (ka, kb) = (quic_keys(&a), quic_keys(&b));
        assert_ne!(ka.reset, ka.cid, "one key for resets and connection IDs");
        assert_ne!(ka.reset, kb.reset);
        assert_ne!(ka.cid, kb.cid);
        assert_eq!(quic_keys(&a).cid, ka.cid, "keys must survive a restart");
    }
}
