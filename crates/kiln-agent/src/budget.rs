//! A budget for warnings about what a guest sends: a guest that repeats one bad frame (or a
//! QEMU that repeats one bad line) forever must not flood kilnd's log. At most `burst`
//! warnings per `window` are written; the rest are counted and reported in one line when
//! the next window opens.

use std::time::{Duration, Instant};

/// How many warnings may pass per window, and what was held back.
#[derive(Debug)]
pub struct WarnBudget {
    burst: u32,
    window: Duration,
    opened: Option<Instant>,
    used: u32,
    suppressed: u64,
}

/// What to do with one warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; `suppressed` earlier ones were held back since the last one written.
    Write {
        /// Warnings held back before this one.
        suppressed: u64,
    },
    /// Count it, write nothing.
    Suppress,
}

impl WarnBudget {
    /// `burst` warnings per `window`.
    pub const fn new(burst: u32, window: Duration) -> WarnBudget {
        WarnBudget {
            burst,
            window,
            opened: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Decides on one warning arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let expired = self
            .opened
            .is_none_or(|at| now.saturating_duration_since(at) >= self.window);
        if expired {
            self.opened = Some(now);
            self.used = 0;
        }
        if self.used >= self.burst {
            self.suppressed = self.suppressed.saturating_add(1);
            return Verdict::Suppress;
        }
        self.used += 1;
        let suppressed = std::mem::take(&mut self.suppressed);
        Verdict::Write { suppressed }
    }
}

/// Writes `message` as a warning within `budget`, saying how many were held back before it.
#[macro_export]
macro_rules! warn_within {
    ($budget:expr, $($arg:tt)+) => {
        match $budget.check(std::time::Instant::now()) {
            $crate::budget::Verdict::Write { suppressed: 0 } => tracing::warn!($($arg)+),
            $crate::budget::Verdict::Write { suppressed } => {
                tracing::warn!(suppressed, "{} more like the next were not logged", suppressed);
                tracing::warn!($($arg)+)
            }
            $crate::budget::Verdict::Suppress => {}
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_when_a_flood_arrives_then_burst_pass_per_window_and_the_rest_are_counted() {
        let mut budget = WarnBudget::new(3, Duration::from_secs(60));
        let t0 = Instant::now();

        let first: Vec<Verdict> = (0..1000).map(|_| budget.check(t0)).collect();
        let next_window = budget.check(t0 + Duration::from_secs(61));

        assert_eq!(
            first
                .iter()
                .filter(|v| matches!(v, Verdict::Write { .. }))
                .count(),
            3
        );
        assert_eq!(next_window, Verdict::Write { suppressed: 997 });
    }
}
