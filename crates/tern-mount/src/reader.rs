//! Reading an open file: aligned 1 MiB blocks, each checked against the
//! chaining value the daemon sent with it, fetched by a pool of threads, and
//! a read-ahead window per handle that doubles while reads are sequential.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock};

use fuser::Errno;
use tern_core::{Entry, ReadFile};

use crate::cache::{DiskCache, Version};
use crate::conn::Conn;

/// A block: a whole BLAKE3 subtree at any multiple of its size, so the
/// daemon can vouch for it with one chaining value.
pub const BLOCK: u64 = 1 << 20;
/// The read-ahead window's limit, in blocks.
const MAX_WINDOW: u64 = 16;
/// Blocks a handle keeps: the window ahead and as much behind.
const KEEP: usize = (2 * MAX_WINDOW + 2) as usize;
/// The longest a read waits for a block another thread fetches.
const WAIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

type Job = Box<dyn FnOnce() + Send>;

/// Threads that fetch blocks for every handle.
pub struct Pool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl Pool {
    /// `n` fetching threads.
    pub fn new(n: usize) -> std::io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("tern-fetch-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Pool { tx: Mutex::new(tx) })
    }

    fn run(&self, job: Job) -> bool {
        self.tx.lock().is_ok_and(|tx| tx.send(job).is_ok())
    }
}

enum Slot {
    Loading,
    Ready(Arc<Vec<u8>>),
    Failed(Errno),
}

#[derive(Default)]
struct State {
    blocks: BTreeMap<u64, Slot>,
    /// The block a sequential reader asks for next.
    next: u64,
    /// Blocks fetched ahead of it.
    window: u64,
}

/// An open file as the reads of its handle see it.
pub struct Reader {
    /// Its path below the mounted root.
    pub rel: PathBuf,
    /// The version opened.
    pub entry: Entry,
    /// The daemon's handle, and the connection it belongs to.
    file: RwLock<Option<(u64, Arc<dyn ReadFile>)>>,
    state: Mutex<State>,
    ready: Condvar,
    /// `--cache-dir`, and this version's name there.
    cache: Option<(Arc<DiskCache>, Version)>,
}

impl Reader {
    /// A reader of `entry` at `rel`, opened as `file` on connection `gen`,
    /// keeping its blocks in `cache` where one is given.
    pub fn new(rel: PathBuf, entry: Entry, opened: (u64, Arc<dyn ReadFile>), cache: Option<Arc<DiskCache>>) -> Reader {
        let cache = cache.and_then(|c| DiskCache::version(&entry).map(|v| (c, v)));
        Reader {
            cache,
            rel,
            entry,
            file: RwLock::new(Some(opened)),
            state: Mutex::new(State {
                window: 1,
                ..Default::default()
            }),
            ready: Condvar::new(),
        }
    }

    /// `[offset, offset+len)` of the file (already within its size).
    pub fn read(self: &Arc<Self>, conn: &Arc<Conn>, pool: &Pool, offset: u64, len: u64) -> Result<Vec<u8>, Errno> {
        let last_block = self.entry.size.saturating_sub(1) / BLOCK;
        let (first, last) = (offset / BLOCK, (offset + len - 1) / BLOCK);
        let mut st = self.state.lock().map_err(|_| Errno::EIO)?;
        // Sequential: the window doubles; a jump starts it again at one.
        st.window = if first == st.next || first + 1 == st.next {
            (st.window * 2).min(MAX_WINDOW)
        } else {
            1
        };
        st.next = last + 1;
        let ahead = (last + st.window).min(last_block);
        let mut fetch = Vec::new();
        for b in first..=ahead {
            // A block wanted now whose fetch failed is asked for again: the
            // cause may have passed.
            let wanted_now = b <= last;
            match st.blocks.get(&b) {
                None => {}
                Some(Slot::Failed(_)) if wanted_now => {}
                Some(_) => continue,
            }
            st.blocks.insert(b, Slot::Loading);
            fetch.push(b);
        }
        evict(&mut st.blocks, first);
        drop(st);
        for (n, &b) in fetch.iter().enumerate() {
            let (me, conn) = (self.clone(), conn.clone());
            let job: Job = Box::new(move || {
                let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.fetch(&conn, b)))
                    .unwrap_or(Err(Errno::EIO));
                me.settle(b, got);
            });
            if !pool.run(job) {
                // No thread will fill these: nobody may wait for them.
                for &b in &fetch[n..] {
                    self.settle(b, Err(Errno::EIO));
                }
                return Err(Errno::EIO);
            }
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut st = self.state.lock().map_err(|_| Errno::EIO)?;
        for b in first..=last {
            let data = loop {
                match st.blocks.get(&b) {
                    Some(Slot::Ready(d)) => break d.clone(),
                    Some(Slot::Failed(e)) => {
                        let e = *e;
                        // Asked again by the next read.
                        st.blocks.remove(&b);
                        return Err(e);
                    }
                    Some(Slot::Loading) => {
                        // Bounded: a fetch ends within the connection's
                        // deadlines, and this is the backstop.
                        let (g, waited) = self.ready.wait_timeout(st, WAIT_LIMIT).map_err(|_| Errno::EIO)?;
                        st = g;
                        if waited.timed_out() && matches!(st.blocks.get(&b), Some(Slot::Loading)) {
                            return Err(Errno::ETIMEDOUT);
                        }
                    }
                    // Evicted by reads elsewhere in the file meanwhile: this
                    // read fetches it, as the one fetch of it.
                    None => {
                        st.blocks.insert(b, Slot::Loading);
                        drop(st);
                        let got = self.fetch(conn, b);
                        self.settle(b, got);
                        st = self.state.lock().map_err(|_| Errno::EIO)?;
                    }
                }
            };
            let start = offset.max(b * BLOCK) - b * BLOCK;
            let end = (offset + len).min(b * BLOCK + data.len() as u64) - b * BLOCK;
            if start > end || end as usize > data.len() {
                return Err(Errno::EIO);
            }
            out.extend_from_slice(&data[start as usize..end as usize]);
        }
        Ok(out)
    }

    /// Records how the fetch of block `b` ended and wakes its readers.
    fn settle(&self, b: u64, got: Result<Vec<u8>, Errno>) {
        if let Ok(mut st) = self.state.lock() {
            st.blocks.insert(
                b,
                match got {
                    Ok(v) => Slot::Ready(Arc::new(v)),
                    Err(e) => Slot::Failed(e),
                },
            );
        }
        self.ready.notify_all();
    }

    /// Block `b`, from the disk cache or read from the daemon, and checked.
    fn fetch(&self, conn: &Conn, b: u64) -> Result<Vec<u8>, Errno> {
        let offset = b * BLOCK;
        let len = BLOCK.min(self.entry.size - offset) as usize;
        if let Some((cache, v)) = &self.cache {
            if let Some(data) = cache.get(*v, b, offset, len) {
                return Ok(data);
            }
        }
        let got = conn.run(|ep, gen| {
            let file = self.open_on(ep, gen)?;
            let mut buf = vec![0u8; len];
            file.read_exact_at(offset, &mut buf)?;
            let cv = tern_core::hash::cv_at(offset, &buf);
            if file.sent_cv(offset) != Some(cv) {
                return Err(tern_core::Error::Other {
                    path: self.rel.clone(),
                    message: format!(
                        "the {len} bytes at offset {offset} do not hash to what the daemon sent with them"
                    ),
                });
            }
            Ok((buf, cv))
        });
        match got {
            Ok((buf, cv)) => {
                if let Some((cache, v)) = &self.cache {
                    cache.put(*v, b, &cv, &buf);
                }
                Ok(buf)
            }
            Err(e) => {
                tracing::error!(error = %e, "read refused");
                Err(crate::fs::errno(&e, &self.rel))
            }
        }
    }

    /// The daemon's handle on connection `gen`, opened again where the one
    /// it was opened on is gone (the daemon checks the version is the one
    /// first opened).
    fn open_on(&self, ep: &tern_net::remote::RemoteEndpoint, gen: u64) -> tern_core::Result<Arc<dyn ReadFile>> {
        if let Ok(f) = self.file.read() {
            if let Some((g, file)) = f.as_ref() {
                if *g == gen {
                    return Ok(file.clone());
                }
            }
        }
        let file: Arc<dyn ReadFile> = Arc::from(tern_core::Source::open(ep, &self.rel, &self.entry)?);
        if let Ok(mut f) = self.file.write() {
            *f = Some((gen, file.clone()));
        }
        Ok(file)
    }
}

/// Drops the blocks furthest behind `first` (then the furthest ahead)
/// beyond what a handle keeps; never one still loading.
fn evict(blocks: &mut BTreeMap<u64, Slot>, first: u64) {
    while blocks.len() > KEEP {
        let behind = blocks
            .iter()
            .find(|(b, s)| **b < first && !matches!(s, Slot::Loading))
            .map(|(b, _)| *b);
        let ahead = || {
            blocks
                .iter()
                .rev()
                .find(|(b, s)| **b > first && !matches!(s, Slot::Loading))
                .map(|(b, _)| *b)
        };
        match behind.or_else(ahead) {
            Some(b) => {
                blocks.remove(&b);
            }
            None => return,
        }
    }
}
