//! `--write-back`: files closed are uploaded by a thread of their own, the
//! small ones many to a request, so that a tree written file by file (an
//! archive extracted) does not wait for the daemon once per file. `fsync`
//! of a file still waits for its upload; `fsync` of a directory waits for
//! every upload queued before it, and says whether one failed.

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use crate::conn::Conn;
use crate::staged::Staged;

/// Files in one batch at most, as the engine's batches.
const BATCH_FILES: usize = 256;

#[derive(Default)]
struct State {
    /// Queued and not yet done.
    pending: usize,
    /// Uploads that failed since the last `wait`.
    failed: usize,
    /// Done (uploaded or failed), for the file system to take out of its
    /// map of staged paths.
    done: Vec<Arc<Staged>>,
}

/// The queue of files waiting for their upload.
pub struct WriteBack {
    tx: Mutex<mpsc::Sender<Arc<Staged>>>,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl WriteBack {
    /// Starts the uploading thread.
    pub fn start(conn: Arc<Conn>) -> std::io::Result<WriteBack> {
        let (tx, rx) = mpsc::channel::<Arc<Staged>>();
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let st = state.clone();
        std::thread::Builder::new()
            .name("tern-writeback".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < BATCH_FILES {
                        match rx.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    let failed = upload(&conn, &batch);
                    let (lock, cv) = &*st;
                    if let Ok(mut s) = lock.lock() {
                        s.pending = s.pending.saturating_sub(batch.len());
                        s.failed += failed;
                        s.done.extend(batch);
                    }
                    cv.notify_all();
                }
            })?;
        Ok(WriteBack {
            tx: Mutex::new(tx),
            state,
        })
    }

    /// Queues `s` for its upload; false if the thread is gone.
    pub fn queue(&self, s: Arc<Staged>) -> bool {
        if let Ok(mut st) = self.state.0.lock() {
            st.pending += 1;
        }
        let sent = self.tx.lock().is_ok_and(|tx| tx.send(s).is_ok());
        if !sent {
            if let Ok(mut st) = self.state.0.lock() {
                st.pending = st.pending.saturating_sub(1);
            }
        }
        sent
    }

    /// Waits until everything queued is done; the number of uploads that
    /// failed since the last wait.
    pub fn wait(&self) -> usize {
        let (lock, cv) = &*self.state;
        let Ok(mut st) = lock.lock() else { return 0 };
        while st.pending > 0 {
            st = match cv.wait(st) {
                Ok(g) => g,
                Err(_) => return 0,
            };
        }
        std::mem::take(&mut st.failed)
    }

    /// The files whose upload ended since the last call.
    pub fn take_done(&self) -> Vec<Arc<Staged>> {
        self.state
            .0
            .lock()
            .map(|mut s| std::mem::take(&mut s.done))
            .unwrap_or_default()
    }
}

/// Uploads a batch: the small files together, the others one by one, on a
/// new connection once if the one in use breaks. How many failed.
fn upload(conn: &Conn, batch: &[Arc<Staged>]) -> usize {
    // A file queued twice (closed twice) is uploaded once.
    let mut unique: Vec<Arc<Staged>> = Vec::with_capacity(batch.len());
    for s in batch {
        if !unique.iter().any(|u| Arc::ptr_eq(u, s)) {
            unique.push(s.clone());
        }
    }
    let (small, large): (Vec<_>, Vec<_>) = unique.iter().cloned().partition(|s| s.is_small());
    let mut failed = 0;
    if !small.is_empty() {
        let r = conn.run(|ep, _| match Staged::publish_batch(ep, &small) {
            // Broken connection: everything is tried again on a new one.
            (_, Some(e)) if ep.connection_lost() => Err(e),
            (n, e) => Ok((n, e)),
        });
        match r {
            Ok((n, e)) => {
                failed += n;
                if let Some(e) = e {
                    tracing::warn!(error = %e, failed = n, "uploads failed; kept staged");
                }
            }
            Err(e) => {
                failed += small.len();
                tracing::warn!(error = %e, files = small.len(), "uploads failed; kept staged");
            }
        }
    }
    for s in &large {
        if let Err(e) = conn.run(|ep, _| s.publish(ep)) {
            failed += 1;
            tracing::warn!(path = %s.rel().display(), error = %e, "upload failed; kept staged");
        }
    }
    failed
}
