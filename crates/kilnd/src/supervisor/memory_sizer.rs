//! How much memory a running MicroVM is granted beyond its baseline. A `q35` MicroVM boots
//! with its baseline and a virtio-mem device up to four times that; every second its owner
//! asks the guest's agent what its kernel has available and [`MemorySizing::observe`] says
//! whether to plug more (the guest is short), take a step back (it has plenty to spare), or
//! leave it. The decision is a pure function of the samples ([`decide`]); the owner carries
//! it out (admission, the cgroup's memory limit, the device, in that order when growing; the
//! device first, the rest once the guest has given the memory back, when shrinking).
//!
//! The figures are the guest's word, so they decide only how far within its ceiling a MicroVM
//! grows — what the host's admission, the cgroup and the principal's usage all count.

use kiln_vmm::MemoryRange;

/// When the sizer acts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Short: available under this share of the guest's total.
    pub grow_below: f64,
    /// Grow after this many short samples in a row.
    pub grow_after: u32,
    /// Growth leaves at least this share of the (new) total available.
    pub grow_to: f64,
    /// Roomy: with a step taken back, at least this share of what is left is still available.
    pub shrink_above: f64,
    /// Shrink after this many roomy samples in a row.
    pub shrink_after: u32,
}

/// The thresholds kilnd uses: grow after 2 s with under 15 % available, to 30 % available;
/// give a step back after 15 s in which half would still be available without it.
pub const THRESHOLDS: Thresholds = Thresholds {
    grow_below: 0.15,
    grow_after: 2,
    grow_to: 0.30,
    shrink_above: 0.5,
    shrink_after: 15,
};

/// The granularity of growth and shrinking, MiB: a quarter of the baseline, at least 128 MiB
/// (whole 2 MiB device blocks).
pub fn step_mib(range: MemoryRange) -> u64 {
    (range.baseline / 4).max(128).div_ceil(2) * 2
}

/// What to do with a MicroVM's memory now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave it as it is.
    Hold,
    /// Have this much beyond the baseline, MiB (more than now).
    Grow(u64),
    /// Have this much beyond the baseline, MiB (less than now).
    Shrink(u64),
}

/// How many samples in a row were short and roomy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streaks {
    /// Short samples in a row.
    pub short: u32,
    /// Roomy samples in a row.
    pub roomy: u32,
}

/// One sample of the guest, KiB, as its agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Its total memory.
    pub total_kib: u64,
    /// What is available.
    pub available_kib: u64,
}

/// The decision after one sample: `target` is what the VM is asked to have beyond its
/// baseline now, `plugged` what its device has. Grows only below the ceiling, by at least a
/// step and enough to leave [`Thresholds::grow_to`] available; shrinks a step at a time, never
/// below the baseline and never while an earlier request is still under way (`plugged` is
/// not `target` yet). A decision starts the streaks anew.
pub fn decide(
    t: &Thresholds,
    streaks: Streaks,
    range: MemoryRange,
    target: u64,
    plugged: u64,
    sample: Sample,
) -> (Streaks, Decision) {
    let growable = range.ceiling.saturating_sub(range.baseline);
    if sample.total_kib == 0 || plugged != target {
        return (Streaks::default(), Decision::Hold);
    }
    // The guest's word, kept within what it could be.
    let total = sample.total_kib as f64 / 1024.0;
    let available = (sample.available_kib.min(sample.total_kib)) as f64 / 1024.0;
    let step = step_mib(range);
    let short = target < growable && available < t.grow_below * total;
    let roomy = target > 0 && {
        let back = step.min(target) as f64;
        available - back >= t.shrink_above * (total - back)
    };
    let next = Streaks {
        short: if short {
            streaks.short.saturating_add(1)
        } else {
            0
        },
        roomy: if roomy {
            streaks.roomy.saturating_add(1)
        } else {
            0
        },
    };
    if next.short >= t.grow_after {
        // x more leaves (available + x) / (total + x) ≥ grow_to.
        let needed = ((t.grow_to * total - available) / (1.0 - t.grow_to)).max(0.0);
        let steps = (needed / step as f64).ceil().max(1.0) as u64;
        let grown = target
            .saturating_add(steps.saturating_mul(step))
            .min(growable);
        (Streaks::default(), Decision::Grow(grown))
    } else if next.roomy >= t.shrink_after {
        (
            Streaks::default(),
            Decision::Shrink(target.saturating_sub(step)),
        )
    } else {
        (next, Decision::Hold)
    }
}

/// The sizer's view of one running MicroVM's memory.
#[derive(Debug)]
pub struct MemorySizing {
    /// Its baseline and ceiling.
    pub range: MemoryRange,
    /// What it is asked to have beyond its baseline now, MiB.
    pub target: u64,
    /// Whether it may change at all (no device to grow into, no cgroup to hold it to a
    /// grant, or a guest agent that cannot report its memory: then it keeps what it has).
    pub fixed: bool,
    streaks: Streaks,
}

impl MemorySizing {
    /// A MicroVM with `target` MiB beyond its baseline that may grow and shrink.
    pub fn at(range: MemoryRange, target: u64) -> MemorySizing {
        MemorySizing {
            range,
            target,
            fixed: !range.can_grow(),
            streaks: Streaks::default(),
        }
    }

    /// A MicroVM whose memory stays as it is.
    pub fn fixed(range: MemoryRange) -> MemorySizing {
        MemorySizing {
            fixed: true,
            ..MemorySizing::at(range, 0)
        }
    }

    /// Takes a sample of the guest, with `plugged` MiB on its device now.
    pub fn observe(&mut self, plugged: u64, sample: Sample) -> Decision {
        if self.fixed {
            return Decision::Hold;
        }
        let (streaks, decision) = decide(
            &THRESHOLDS,
            self.streaks,
            self.range,
            self.target,
            plugged,
            sample,
        );
        self.streaks = streaks;
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 512 MiB, growable to 2 GiB: steps of 128 MiB.
    const RANGE: MemoryRange = MemoryRange {
        baseline: 512,
        ceiling: 2048,
    };

    /// A guest with `target` plugged (settled) and `used` MiB of it taken.
    fn guest(target: u64, used: u64) -> Sample {
        let total = (RANGE.baseline + target) * 1024;
        Sample {
            total_kib: total,
            available_kib: total.saturating_sub(used * 1024),
        }
    }

    /// Feeds a guest using `used[i]` MiB to [`decide`], applying each decision at once (the
    /// device settles before the next sample); the targets after each sample.
    fn run(target: u64, used: &[u64]) -> Vec<u64> {
        let (mut streaks, mut target) = (Streaks::default(), target);
        used.iter()
            .map(|&u| {
                let (next, decision) = decide(
                    &THRESHOLDS,
                    streaks,
                    RANGE,
                    target,
                    target,
                    guest(target, u),
                );
                streaks = next;
                match decision {
                    Decision::Grow(t) | Decision::Shrink(t) => target = t,
                    Decision::Hold => {}
                }
                target
            })
            .collect()
    }

    #[test]
    fn step_when_any_baseline_then_a_quarter_of_it_and_at_least_128_mib() {
        let step = |baseline| {
            step_mib(MemoryRange {
                baseline,
                ceiling: 4 * baseline,
            })
        };

        assert_eq!(
            (step(256), step(512), step(2048), step(8192)),
            (128, 128, 512, 2048)
        );
    }

    #[test]
    fn decide_when_short_for_two_samples_then_grows_enough_to_leave_room() {
        // 480 of 512 MiB used: 32 available; 30 % of the new total needs 2 steps.
        let targets = run(0, &[480, 480, 480]);

        assert_eq!(targets, [0, 256, 256]);
        let after = guest(256, 480);
        assert!(after.available_kib as f64 >= 0.3 * after.total_kib as f64);
    }

    #[test]
    fn decide_when_short_once_then_nothing_changes() {
        let targets = run(0, &[480, 100, 480, 100]);

        assert_eq!(targets, [0; 4]);
    }

    #[test]
    fn decide_when_the_guest_takes_everything_then_stops_at_the_ceiling() {
        let targets = run(0, &[4096; 30]);

        assert_eq!(targets.last(), Some(&1536));
    }

    #[test]
    fn decide_when_roomy_long_enough_then_shrinks_a_step_at_a_time_to_the_baseline_only() {
        let targets = run(512, &[50; 80]);

        assert_eq!(targets[13], 512);
        assert_eq!(targets[14], 384);
        assert_eq!(targets.last(), Some(&0));
    }

    #[test]
    fn decide_when_in_use_then_keeps_what_it_needs() {
        // 700 MiB used of 1024: giving 128 back would leave under half available.
        let targets = run(512, &[700; 40]);

        assert_eq!(targets.last(), Some(&512));
    }

    #[test]
    fn decide_when_a_request_is_under_way_then_hold() {
        let (streaks, decision) = decide(
            &THRESHOLDS,
            Streaks { short: 5, roomy: 0 },
            RANGE,
            256,
            128,
            guest(128, 600),
        );

        assert_eq!((streaks, decision), (Streaks::default(), Decision::Hold));
    }

    #[test]
    fn decide_when_the_guest_reports_nonsense_then_nothing_beyond_the_ceiling() {
        let lies = [
            Sample {
                total_kib: 0,
                available_kib: 0,
            },
            Sample {
                total_kib: 1,
                available_kib: u64::MAX,
            },
            Sample {
                total_kib: u64::MAX,
                available_kib: 0,
            },
        ];
        for lie in lies {
            let mut sizing = MemorySizing::at(RANGE, 0);
            let decisions: Vec<Decision> = (0..5).map(|_| sizing.observe(0, lie)).collect();

            for d in decisions {
                match d {
                    Decision::Grow(t) | Decision::Shrink(t) => assert!(t <= 1536, "{lie:?}"),
                    Decision::Hold => {}
                }
            }
        }
    }

    #[test]
    fn observe_when_fixed_then_never_changes() {
        let mut sizing = MemorySizing::fixed(RANGE);

        let decisions: Vec<Decision> = (0..10).map(|_| sizing.observe(0, guest(0, 511))).collect();

        assert!(decisions.iter().all(|d| *d == Decision::Hold));
    }

    proptest! {
        #[test]
        fn decide_when_any_samples_then_the_target_stays_within_the_device_in_steps(
            samples in proptest::collection::vec((0u64..u64::MAX, 0u64..u64::MAX), 0..200),
            start in 0u64..=12,
        ) {
            let growable = RANGE.ceiling - RANGE.baseline;
            let step = step_mib(RANGE);
            let (mut streaks, mut target) = (Streaks::default(), start * step);
            for (total_kib, available_kib) in samples {
                let sample = Sample { total_kib: total_kib >> 20, available_kib: available_kib >> 20 };
                let (next, decision) = decide(&THRESHOLDS, streaks, RANGE, target, target, sample);
                streaks = next;
                match decision {
                    Decision::Grow(t) => {
                        prop_assert!(t > target && t <= growable);
                        target = t;
                    }
                    Decision::Shrink(t) => {
                        prop_assert!(t < target && target - t <= step);
                        target = t;
                    }
                    Decision::Hold => {}
                }
            }
        }
    }
}
