//! A cap on the bytes an endpoint's writers may keep beneath its root: a
//! daemon's per-module quota.
//!
//! Usage is the apparent size of the regular files beneath the root,
//! temporary files and journals included (a partial upload takes its space
//! as much as a finished one). A walk counts it (at a daemon's start, then
//! with each expiry walk); between walks each file written is charged its
//! size when it is created and credited what it replaced when it is
//! published, and a deletion is credited what it removed. Writes by others
//! (not through the endpoint) are seen at the next walk.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The quota of one endpoint.
#[derive(Debug)]
pub struct Quota {
    name: String,
    limit: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// Charges less credits since the running walk started: added to what
    /// it counts, since the walk may not have seen them.
    since_walk: i128,
}

impl Quota {
    /// A quota of `limit` bytes for the tree called `name` in messages (a
    /// daemon's module), taken as empty until [`Quota::walked`] says more.
    pub fn new(name: impl Into<String>, limit: u64) -> Arc<Quota> {
        Arc::new(Quota {
            name: name.into(),
            limit,
            state: Mutex::default(),
        })
    }

    /// The cap, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes in use, as far as is known.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Marks the start of a walk that counts the tree.
    pub fn walking(&self) {
        self.lock().since_walk = 0;
    }

    /// What the walk since [`Quota::walking`] counted.
    pub fn walked(&self, bytes: u64) {
        let mut st = self.lock();
        st.used = (i128::from(bytes) + st.since_walk).clamp(0, i128::from(u64::MAX)) as u64;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two counters: one a panicking holder left is as
        // good as any.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `bytes` for the file at `shown`, or says why not. `held` of
    /// them are counted already (a partial file being resumed) and are
    /// taken over by the charge.
    pub(crate) fn charge(self: &Arc<Self>, bytes: u64, held: u64, shown: &Path) -> Result<Charge> {
        let mut st = self.lock();
        let held = held.min(st.used);
        if (st.used - held).saturating_add(bytes) > self.limit {
            return Err(Error::Other {
                path: shown.to_path_buf(),
                message: format!(
                    "over the quota of `{}`: this file needs {}, and {} of its {} are in use",
                    self.name,
                    size(bytes),
                    size(st.used),
                    size(self.limit)
                ),
            });
        }
        st.used = st.used - held + bytes;
        st.since_walk += i128::from(bytes) - i128::from(held);
        Ok(Charge {
            quota: self.clone(),
            bytes,
        })
    }

    /// Gives back `bytes` that are no longer in use.
    pub(crate) fn credit(&self, bytes: u64) {
        let mut st = self.lock();
        st.used = st.used.saturating_sub(bytes);
        st.since_walk -= i128::from(bytes);
    }
}

/// Bytes charged for a file being written: given back when dropped, unless
/// [`Charge::keep`] says the file stays.
#[derive(Debug)]
pub(crate) struct Charge {
    quota: Arc<Quota>,
    bytes: u64,
}

impl Charge {
    /// The file stays (published, or kept for a resume): its bytes stay
    /// charged. Returns the quota, to credit what the file replaced.
    pub(crate) fn keep(mut self) -> Arc<Quota> {
        self.bytes = 0;
        self.quota.clone()
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.quota.credit(self.bytes);
        }
    }
}

/// A size for a message, in binary units.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{v:.1} {}", UNITS[unit]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stop_at_the_limit_and_come_back_when_dropped() {
        let q = Quota::new("data", 100);
        let a = q.charge(60, 0, Path::new("a")).expect("fits");
        let e = q.charge(41, 0, Path::new("b")).expect_err("over");
        assert!(e.to_string().contains("over the quota of `data`"), "{e}");
        drop(a);
        assert_eq!(q.used(), 0);
        let kept = q.charge(100, 0, Path::new("c")).expect("fits").keep();
        assert_eq!(q.used(), 100);
        kept.credit(30);
        assert_eq!(q.used(), 70);
        // Resuming a partial file of 50 counted bytes takes them over.
        q.charge(80, 50, Path::new("d")).expect("fits").keep();
        assert_eq!(q.used(), 100);
    }

    #[test]
    fn a_walk_counts_the_tree_and_keeps_what_changed_meanwhile() {
        let q = Quota::new("data", 1000);
        q.walking();
        q.charge(10, 0, Path::new("new")).expect("fits").keep();
        q.walked(500);
        assert_eq!(q.used(), 510);
        q.walking();
        q.credit(20);
        q.walked(400);
        assert_eq!(q.used(), 380);
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3), "3 B");
    }
}
