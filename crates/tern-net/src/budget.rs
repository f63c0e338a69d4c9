//! The daemon's budgets: of file descriptors for transfers, and of memory
//! for the buffers of requests.
//!
//! Every client's open files, and the files of each group of a batch of
//! small files while it is written, come out of one daemon-wide count, so
//! that many clients at once slow each other down instead of failing with
//! "too many open files". Sockets, directories and short-lived opens use
//! the headroom left beside the budget. Likewise every chunk read or
//! written, and every batch of small files, holds its bytes (in MiB) from
//! one daemon-wide budget while it is in memory, so clients with a grant
//! cannot make the daemon allocate without bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A count of units (descriptors, MiB), handed out first come, first
/// served.
#[derive(Debug)]
pub struct Budget {
    total: usize,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug)]
struct State {
    free: usize,
    /// Tickets of the requests waiting, oldest first: only the oldest may
    /// take descriptors, so a request for many is not starved by a stream
    /// of requests for one.
    queue: VecDeque<u64>,
    next: u64,
}

/// Units taken from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
    n: usize,
}

/// How often a waiting request looks at the stop flag.
const CANCEL_POLL: Duration = Duration::from_millis(250);

impl Budget {
    /// A budget of `total` units (at least one).
    pub fn new(total: usize) -> Arc<Budget> {
        let total = total.max(1);
        Arc::new(Budget {
            total,
            state: Mutex::new(State {
                free: total,
                queue: VecDeque::new(),
                next: 0,
            }),
            changed: Condvar::new(),
        })
    }

    /// The size of the budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Units not held now.
    pub fn free(&self) -> usize {
        self.state.lock().map(|s| s.free).unwrap_or(0)
    }

    /// Takes `n` units (at most the whole budget) once the requests
    /// before it are served and that many are free. None at `deadline`, or
    /// when `cancel` turns true.
    pub fn acquire(self: &Arc<Self>, n: usize, deadline: Instant, cancel: &AtomicBool) -> Option<Permit> {
        let n = n.min(self.total);
        let mut st = self.state.lock().ok()?;
        let ticket = st.next;
        st.next += 1;
        st.queue.push_back(ticket);
        loop {
            if st.queue.front() == Some(&ticket) && st.free >= n {
                st.queue.pop_front();
                st.free -= n;
                drop(st);
                // The next in line may fit in what is left.
                self.changed.notify_all();
                return Some(Permit {
                    budget: self.clone(),
                    n,
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || cancel.load(Ordering::Relaxed) {
                st.queue.retain(|&t| t != ticket);
                drop(st);
                self.changed.notify_all();
                return None;
            }
            st = self.changed.wait_timeout(st, left.min(CANCEL_POLL)).ok()?.0;
        }
    }
}

impl Permit {
    /// How many units this permit holds.
    pub fn count(&self) -> usize {
        self.n
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        if let Ok(mut st) = self.budget.state.lock() {
            st.free += self.n;
        }
        self.budget.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    #[test]
    fn permits_are_counted_given_back_and_waited_for() {
        let no = AtomicBool::new(false);
        let b = Budget::new(8);
        let most = b.acquire(7, soon(0), &no).expect("all but one");
        assert_eq!(b.free(), 1);
        assert!(b.acquire(2, soon(20), &no).is_none(), "only one left");
        // A request larger than the budget takes all of it rather than
        // waiting forever.
        drop(most);
        let all = b.acquire(100, soon(0), &no).expect("clamped to the total");
        assert_eq!((all.count(), b.free()), (8, 0));
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(1, soon(30_000), &AtomicBool::new(false)).map(|p| p.count()))
        };
        drop(all);
        assert_eq!(waiter.join().expect("thread"), Some(1));
        assert_eq!(b.free(), 8);
    }

    #[test]
    fn a_large_request_is_served_before_later_small_ones() {
        let no = Arc::new(AtomicBool::new(false));
        let b = Budget::new(4);
        let held = b.acquire(3, soon(0), &no).expect("three");
        let (tx, rx) = std::sync::mpsc::channel();
        // The large request queues first (it cannot be served while three
        // are held); then a small one, which would fit at once, must wait
        // behind it.
        let big = {
            let (b, no, tx) = (b.clone(), no.clone(), tx.clone());
            std::thread::spawn(move || {
                let p = b.acquire(4, soon(30_000), &no);
                tx.send("big").expect("send");
                p.map(|p| p.count())
            })
        };
        while b.state.lock().expect("lock").queue.is_empty() {
            std::thread::yield_now();
        }
        assert!(b.acquire(1, soon(50), &no).is_none(), "the small one waits its turn");
        drop(held);
        assert_eq!(rx.recv().expect("recv"), "big");
        assert_eq!(big.join().expect("thread"), Some(4));
    }

    #[test]
    fn a_waiting_request_gives_up_when_cancelled() {
        let b = Budget::new(1);
        let _held = b.acquire(1, soon(0), &AtomicBool::new(false)).expect("one");
        let cancel = AtomicBool::new(true);
        let start = Instant::now();
        assert!(b.acquire(1, soon(60_000), &cancel).is_none());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "did not wait for the deadline"
        );
        assert!(b.state.lock().expect("lock").queue.is_empty(), "left the queue");
    }
}
