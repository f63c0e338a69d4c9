//! The daemon's budget of file descriptors for transfers.
//!
//! Every client's open files, and the files of each batch of small files
//! while it is written, come out of one daemon-wide count, so that many
//! clients at once slow each other down instead of failing with "too many
//! open files". Sockets, directories and short-lived opens use the
//! headroom left beside the budget.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A daemon-wide count of descriptors that transfers may hold.
#[derive(Debug)]
pub struct FdBudget {
    total: usize,
    free: Mutex<usize>,
    returned: Condvar,
}

/// Descriptors taken from an [`FdBudget`], given back when dropped.
#[derive(Debug)]
pub struct FdPermit {
    budget: Arc<FdBudget>,
    n: usize,
}

impl FdBudget {
    /// The smallest budget: room for a client's open files and a batch
    /// beside them.
    pub const MIN: usize = 8;

    /// A budget of `total` descriptors (at least [`FdBudget::MIN`]).
    pub fn new(total: usize) -> Arc<FdBudget> {
        let total = total.max(Self::MIN);
        Arc::new(FdBudget {
            total,
            free: Mutex::new(total),
            returned: Condvar::new(),
        })
    }

    /// The size of the budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Descriptors not held now.
    pub fn free(&self) -> usize {
        self.free.lock().map(|f| *f).unwrap_or(0)
    }

    /// Takes `n` descriptors (at most the whole budget), waiting up to
    /// `wait` for others to give them back. None when they did not.
    pub fn acquire(self: &Arc<Self>, n: usize, wait: Duration) -> Option<FdPermit> {
        let n = n.min(self.total);
        let deadline = Instant::now() + wait;
        let mut free = self.free.lock().ok()?;
        while *free < n {
            let left = deadline.checked_duration_since(Instant::now())?;
            free = self.returned.wait_timeout(free, left).ok()?.0;
        }
        *free -= n;
        Some(FdPermit {
            budget: self.clone(),
            n,
        })
    }
}

impl Drop for FdPermit {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        if let Ok(mut free) = self.budget.free.lock() {
            *free += self.n;
        }
        self.budget.returned.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_given_back_and_waited_for() {
        let b = FdBudget::new(FdBudget::MIN);
        let most = b.acquire(FdBudget::MIN - 1, Duration::ZERO).expect("all but one");
        assert_eq!(b.free(), 1);
        assert!(b.acquire(2, Duration::from_millis(20)).is_none(), "only one left");
        // A request larger than the budget takes all of it rather than
        // waiting forever.
        drop(most);
        let all = b.acquire(100, Duration::ZERO).expect("clamped to the total");
        assert_eq!(b.free(), 0);
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.acquire(1, Duration::from_secs(30)).map(|p| p.n))
        };
        drop(all);
        assert_eq!(waiter.join().expect("thread"), Some(1));
        assert_eq!(b.free(), FdBudget::MIN);
    }
}
