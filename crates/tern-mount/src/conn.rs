//! The connection to the daemon, made again when it breaks.

use std::sync::{Arc, Mutex, RwLock};

use tern_core::{Error, Result};
use tern_net::remote::RemoteEndpoint;

/// Opens a connection to the mounted tree (the CLI's credentials, trust and
/// transport choices inside).
pub type Connect = Box<dyn Fn() -> Result<RemoteEndpoint> + Send + Sync>;

/// The endpoint in use and the number of its connection: a handle opened
/// on an earlier connection is opened again on the current one.
pub struct Conn {
    current: RwLock<(u64, RemoteEndpoint)>,
    /// Held while reconnecting, so that one thread does it.
    reconnecting: Mutex<()>,
    connect: Connect,
}

impl Conn {
    /// Connects for the first time.
    pub fn new(connect: Connect) -> Result<Arc<Conn>> {
        let ep = connect()?;
        Ok(Arc::new(Conn {
            current: RwLock::new((1, ep)),
            reconnecting: Mutex::new(()),
            connect,
        }))
    }

    /// The endpoint in use, and its connection's number.
    pub fn current(&self) -> (u64, RemoteEndpoint) {
        match self.current.read() {
            Ok(c) => (c.0, c.1.clone()),
            Err(p) => {
                let c = p.into_inner();
                (c.0, c.1.clone())
            }
        }
    }

    /// Runs `f` on the endpoint; if it fails because the connection broke,
    /// once more on a new connection. Every wait inside is bounded by the
    /// connection's timeout, so this returns an error rather than hang.
    pub fn run<T>(&self, f: impl Fn(&RemoteEndpoint, u64) -> Result<T>) -> Result<T> {
        let (gen, ep) = self.current();
        match f(&ep, gen) {
            Err(e) if ep.connection_lost() => {
                tracing::info!(error = %e, "connection lost; connecting again");
                let (gen, ep) = self.reconnect(gen)?;
                f(&ep, gen)
            }
            r => r,
        }
    }

    /// A new connection, unless another thread made one since `seen`.
    fn reconnect(&self, seen: u64) -> Result<(u64, RemoteEndpoint)> {
        let _one = self
            .reconnecting
            .lock()
            .map_err(|_| Error::Internal("reconnect lock poisoned".into()))?;
        let (gen, ep) = self.current();
        if gen != seen && !ep.connection_lost() {
            return Ok((gen, ep));
        }
        let fresh = (self.connect)()?;
        let mut c = self
            .current
            .write()
            .map_err(|_| Error::Internal("connection lock poisoned".into()))?;
        *c = (gen + 1, fresh.clone());
        tracing::info!(connection = gen + 1, "connected again");
        Ok((gen + 1, fresh))
    }
}
