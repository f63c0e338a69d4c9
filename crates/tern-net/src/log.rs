//! Logging that a peer cannot flood: what unauthenticated peers can cause
//! (refused connections, failed logins) is logged a few times a second at
//! most, with a count of the lines left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A budget of log lines per second.
#[derive(Debug)]
pub struct Limited {
    per_second: u32,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    lines: u32,
    suppressed: u64,
}

impl Limited {
    /// At most `n` lines a second.
    pub fn per_second(n: u32) -> Limited {
        Limited {
            per_second: n,
            state: Mutex::new(Window {
                start: Instant::now(),
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(lines left out since the last one allowed)` when a line may be
    /// logged now; `None` when it must be left out.
    pub fn allow(&self) -> Option<u64> {
        let mut w = self.state.lock().ok()?;
        if w.start.elapsed() >= Duration::from_secs(1) {
            w.start = Instant::now();
            w.lines = 0;
        }
        if w.lines < self.per_second {
            w.lines += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_past_the_budget_are_counted_and_reported_with_the_next() {
        let l = Limited::per_second(2);
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        // A new window: the next line says how many were left out.
        l.state.lock().expect("lock").start -= Duration::from_secs(2);
        assert_eq!(l.allow(), Some(2));
        assert_eq!(l.allow(), Some(0));
    }
}
