//! How many vCPUs a running MicroVM is granted. Its image booted it with four times its
//! baseline present and only the baseline online; every second its owner samples the CPU
//! time its cgroup counted and asks [`Sizing::observe`] whether to grow or shrink it by one.
//! The decision is a pure function of the samples ([`decide`]); the owner carries it out
//! (admission, the cgroup quota, the guest's online vCPUs, in that order).

use std::time::{Duration, Instant};

use kiln_vmm::VcpuRange;

/// When the sizer acts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Busy: the VM used at least this share of its granted vCPUs.
    pub grow_at: f64,
    /// Grow after this many busy samples in a row.
    pub grow_after: u32,
    /// Idle: it used less than this share of one vCPU fewer than it has.
    pub shrink_below: f64,
    /// Shrink after this many idle samples in a row.
    pub shrink_after: u32,
}

/// The thresholds kilnd uses: grow after 3 s at 85 % or more, shrink after 15 s under half
/// of one vCPU fewer.
pub const THRESHOLDS: Thresholds = Thresholds {
    grow_at: 0.85,
    grow_after: 3,
    shrink_below: 0.5,
    shrink_after: 15,
};

/// Samples closer together than this say too little about the load; they are skipped.
const MIN_INTERVAL: Duration = Duration::from_millis(500);

/// What to do with a MicroVM's vCPUs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave it as it is.
    Hold,
    /// Grant one more.
    Grow,
    /// Take one back.
    Shrink,
}

/// How many samples in a row were busy and idle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streaks {
    /// Busy samples in a row.
    pub busy: u32,
    /// Idle samples in a row.
    pub idle: u32,
}

/// The decision after one sample: `load` is the CPUs' worth the VM used since the last one
/// (its CPU time over the wall time between them), `granted` what it has now. Grows only
/// below the ceiling, shrinks only above the baseline; a decision starts the streaks anew.
pub fn decide(
    t: &Thresholds,
    streaks: Streaks,
    granted: u32,
    range: VcpuRange,
    load: f64,
) -> (Streaks, Decision) {
    if !load.is_finite() || load < 0.0 {
        return (Streaks::default(), Decision::Hold);
    }
    let busy = load >= t.grow_at * f64::from(granted);
    let idle = granted > range.baseline && load < t.shrink_below * f64::from(granted - 1);
    let next = Streaks {
        busy: if busy {
            streaks.busy.saturating_add(1)
        } else {
            0
        },
        idle: if idle {
            streaks.idle.saturating_add(1)
        } else {
            0
        },
    };
    if next.busy >= t.grow_after && granted < range.ceiling {
        (Streaks::default(), Decision::Grow)
    } else if next.idle >= t.shrink_after {
        (Streaks::default(), Decision::Shrink)
    } else {
        (next, Decision::Hold)
    }
}

/// The sizer's view of one running MicroVM.
#[derive(Debug)]
pub struct Sizing {
    /// Its baseline and ceiling.
    pub range: VcpuRange,
    /// What it is granted now (baseline + what its owner holds of growth).
    pub granted: u32,
    /// Whether it may change at all (it cannot grow, has no cgroup, or its guest cannot
    /// online vCPUs: then it keeps its baseline).
    pub fixed: bool,
    streaks: Streaks,
    last: Option<(Instant, Duration)>,
}

impl Sizing {
    /// A MicroVM at its baseline that may grow.
    pub fn at_baseline(range: VcpuRange) -> Sizing {
        Sizing {
            range,
            granted: range.baseline,
            fixed: !range.can_grow(),
            streaks: Streaks::default(),
            last: None,
        }
    }

    /// A MicroVM that keeps its baseline.
    pub fn fixed(range: VcpuRange) -> Sizing {
        Sizing {
            fixed: true,
            ..Sizing::at_baseline(range)
        }
    }

    /// Takes a sample: the VM's CPU time `used` so far, at `at`. The first sample (and one
    /// too close to the last) only records.
    pub fn observe(&mut self, at: Instant, used: Duration) -> Decision {
        if self.fixed {
            return Decision::Hold;
        }
        let Some((then, before)) = self.last else {
            self.last = Some((at, used));
            return Decision::Hold;
        };
        let wall = at.saturating_duration_since(then);
        if wall < MIN_INTERVAL {
            return Decision::Hold;
        }
        self.last = Some((at, used));
        let load = used.saturating_sub(before).as_secs_f64() / wall.as_secs_f64();
        let (streaks, decision) = decide(&THRESHOLDS, self.streaks, self.granted, self.range, load);
        self.streaks = streaks;
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RANGE: VcpuRange = VcpuRange {
        baseline: 1,
        ceiling: 4,
    };

    /// Feeds `loads` to [`decide`] from `granted`, applying each decision; the grants after
    /// each sample.
    fn run(granted: u32, loads: &[f64]) -> Vec<u32> {
        let (mut streaks, mut granted) = (Streaks::default(), granted);
        loads
            .iter()
            .map(|&load| {
                let (next, decision) = decide(&THRESHOLDS, streaks, granted, RANGE, load);
                streaks = next;
                match decision {
                    Decision::Grow => granted += 1,
                    Decision::Shrink => granted -= 1,
                    Decision::Hold => {}
                }
                granted
            })
            .collect()
    }

    #[test]
    fn decide_when_busy_for_three_samples_then_grows_one_at_a_time() {
        let grants = run(1, &[1.0; 7]);

        assert_eq!(grants, [1, 1, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn decide_when_busy_at_every_grant_then_stops_at_the_ceiling() {
        let grants = run(1, &[8.0; 20]);

        assert_eq!(grants.last(), Some(&4));
    }

    #[test]
    fn decide_when_busy_once_then_idle_then_nothing_changes() {
        let grants = run(1, &[1.0, 1.0, 0.1, 1.0, 1.0, 0.1]);

        assert_eq!(grants, [1; 6]);
    }

    #[test]
    fn decide_when_idle_long_enough_then_shrinks_back_to_the_baseline_only() {
        let grants = run(3, &[0.05; 40]);

        assert_eq!(grants[13], 3);
        assert_eq!(grants[14], 2);
        assert_eq!(grants.last(), Some(&1));
    }

    #[test]
    fn decide_when_the_load_is_nonsense_then_hold() {
        for load in [f64::NAN, f64::INFINITY, -1.0] {
            let (streaks, decision) = decide(&THRESHOLDS, Streaks::default(), 1, RANGE, load);

            assert_eq!((streaks, decision), (Streaks::default(), Decision::Hold));
        }
    }

    #[test]
    fn observe_when_samples_come_too_close_then_they_are_skipped() {
        let mut sizing = Sizing::at_baseline(RANGE);
        let t0 = Instant::now();

        sizing.observe(t0, Duration::ZERO);
        let decisions: Vec<Decision> = (1..=3)
            .map(|i| sizing.observe(t0 + Duration::from_millis(100 * i), Duration::from_secs(9)))
            .collect();

        assert_eq!(decisions, [Decision::Hold; 3]);
        assert_eq!(sizing.streaks, Streaks::default());
    }

    #[test]
    fn observe_when_fixed_then_never_changes() {
        let mut sizing = Sizing::fixed(RANGE);
        let t0 = Instant::now();

        let decisions: Vec<Decision> = (0..10u32)
            .map(|i| {
                sizing.observe(
                    t0 + Duration::from_secs(i.into()),
                    Duration::from_secs(4 * u64::from(i)),
                )
            })
            .collect();

        assert!(decisions.iter().all(|d| *d == Decision::Hold));
    }

    proptest! {
        #[test]
        fn decide_when_any_loads_then_the_grant_stays_within_the_range_and_moves_by_one(
            loads in proptest::collection::vec(prop_oneof![0.0f64..8.0, Just(f64::NAN)], 0..200),
            start in 1u32..=4,
        ) {
            let grants = run(start, &loads);

            let mut before = start;
            for g in grants {
                prop_assert!((RANGE.baseline..=RANGE.ceiling).contains(&g));
                prop_assert!(g.abs_diff(before) <= 1);
                before = g;
            }
        }
    }
}
