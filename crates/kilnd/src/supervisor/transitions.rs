//! The MicroVM state machine in one place: which requests a state accepts, where each
//! outcome leads, and what the owner must do on the way. The owner (`owner.rs`) asks this
//! table before every step and writes the state it names with a compare-and-swap on the
//! state it came from; nothing else decides a MicroVM's state.
//!
//! Also here, as pure functions of the time: when the idle policy or the maximum duration
//! ends a session, so that policy is tested on a virtual clock.

use std::time::Duration;

use kiln_api::shapes::microvm::{IdlePolicy, MicrovmState as S};

/// Something that happens to a MicroVM: a request (suspend, resume, terminate) or the
/// outcome of the work one started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// SuspendMicrovm, or the idle policy.
    Suspend,
    /// ResumeMicrovm, or a request at the endpoint with auto-resume.
    Resume,
    /// TerminateMicrovm, the maximum duration, or the suspended duration.
    Terminate,
    /// The restored guest answered and its run hook succeeded.
    Launched,
    /// The launch failed; nothing of it runs.
    LaunchFailed,
    /// The session is saved and published; its QEMU has ended.
    Saved,
    /// Saving failed and the guest was continued.
    SuspendFailed,
    /// Saving failed and QEMU died with the guest's memory.
    SuspendLost,
    /// The resumed guest runs.
    Resumed,
    /// Resuming failed; the saved session is whole and can be resumed again.
    ResumeFailed,
    /// The saved session cannot be opened at all, or the app refused it back (its resume
    /// hook failed).
    ResumeLost,
    /// Everything the MicroVM held is gone.
    Stopped,
}

impl Event {
    /// Every event, for exhaustive tests.
    pub const ALL: &'static [Event] = &[
        Event::Suspend,
        Event::Resume,
        Event::Terminate,
        Event::Launched,
        Event::LaunchFailed,
        Event::Saved,
        Event::SuspendFailed,
        Event::SuspendLost,
        Event::Resumed,
        Event::ResumeFailed,
        Event::ResumeLost,
        Event::Stopped,
    ];

    /// Whether a caller asks for this (as opposed to work reporting its outcome).
    pub fn is_request(self) -> bool {
        matches!(self, Event::Suspend | Event::Resume | Event::Terminate)
    }
}

/// What the owner does on a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Only the state changes.
    Record,
    /// Suspend hook, then save memory, devices and disks; QEMU ends.
    SaveSession,
    /// A new QEMU from the saved session, clock and entropy refreshed, then the resume hook.
    RestoreSession,
    /// Terminate hook (if it runs), stop QEMU, delete its directory and saved session.
    Stop,
    /// Give back the guest's memory reservation (the VM slot stays).
    ReleaseMemory,
    /// Give back the slot and the memory; delete what is left on disk.
    ReleaseAll,
}

/// Where an event leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The state to record (with a compare-and-swap on the state the step started from).
    pub to: S,
    /// What to do.
    pub effect: Effect,
}

/// Why an event changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The MicroVM is already where the request wants it: success, nothing to do.
    Already,
    /// The request cannot be served in this state (a `ConflictException` saying so).
    Conflict(String),
    /// This outcome cannot happen in this state (a bug in the owner; logged, ignored).
    Impossible,
}

fn go(to: S, effect: Effect) -> Result<Step, Refusal> {
    Ok(Step { to, effect })
}

fn conflict(from: S, wanted: &str) -> Result<Step, Refusal> {
    Err(Refusal::Conflict(format!(
        "the MicroVM is {from}; {wanted}"
    )))
}

/// The transition table.
pub fn next(from: S, event: Event) -> Result<Step, Refusal> {
    use Effect::*;
    use Event as E;
    match (from, event) {
        // A launch ends running or not at all.
        (S::Pending, E::Launched) => go(S::Running, Record),
        (S::Pending, E::LaunchFailed) => go(S::Terminated, ReleaseAll),
        (S::Pending, E::Terminate) => go(S::Terminating, Stop),

        (S::Running, E::Suspend) => go(S::Suspending, SaveSession),
        (S::Running, E::Resume) => Err(Refusal::Already),
        (S::Running, E::Terminate) => go(S::Terminating, Stop),

        (S::Suspending, E::Saved) => go(S::Suspended, ReleaseMemory),
        (S::Suspending, E::SuspendFailed) => go(S::Running, Record),
        (S::Suspending, E::SuspendLost) => go(S::Terminated, ReleaseAll),
        (S::Suspending, E::Terminate) => go(S::Terminating, Stop),

        (S::Suspended, E::Suspend) => Err(Refusal::Already),
        // Stays SUSPENDED until the guest runs: a failed resume leaves it resumable.
        (S::Suspended, E::Resume) => go(S::Suspended, RestoreSession),
        (S::Suspended, E::Resumed) => go(S::Running, Record),
        (S::Suspended, E::ResumeFailed) => go(S::Suspended, ReleaseMemory),
        (S::Suspended, E::ResumeLost) => go(S::Terminating, Stop),
        (S::Suspended, E::Terminate) => go(S::Terminating, Stop),

        (S::Terminating, E::Stopped) => go(S::Terminated, ReleaseAll),
        (S::Terminating | S::Terminated, E::Terminate) => Err(Refusal::Already),

        (from, E::Suspend) => conflict(from, "only a RUNNING MicroVM can be suspended"),
        (from, E::Resume) => conflict(from, "only a SUSPENDED MicroVM can be resumed"),
        (_, _) => Err(Refusal::Impossible),
    }
}

/// Why the owner ends or suspends a session on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// Past `maximumDurationInSeconds` (terminate).
    MaximumDuration,
    /// No endpoint traffic for this long (suspend).
    Idle(Duration),
    /// Suspended longer than `suspendedDurationSeconds` (terminate).
    SuspendedTooLong,
}

/// What a session's policy says is due now. `age` is the time since launch on the wall
/// clock; `idle` the time without inbound traffic while running; `suspended_for` the time
/// since it was suspended (or since kilnd started, so a session is never cut short).
pub fn due(
    state: S,
    age: Duration,
    max_duration: Duration,
    policy: Option<&IdlePolicy>,
    idle: Option<Duration>,
    suspended_for: Option<Duration>,
) -> Option<Expiry> {
    if matches!(state, S::Running | S::Suspended) && age >= max_duration {
        return Some(Expiry::MaximumDuration);
    }
    let policy = policy?;
    match state {
        S::Running => {
            let idle = idle?;
            (idle.as_secs() >= policy.max_idle_duration_seconds.max(0) as u64)
                .then_some(Expiry::Idle(idle))
        }
        S::Suspended => {
            let since = suspended_for?;
            (since.as_secs() >= policy.suspended_duration_seconds.max(0) as u64)
                .then_some(Expiry::SuspendedTooLong)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_when_any_state_meets_any_event_then_answer_is_defined_and_consistent() {
        for &from in S::ALL {
            for &event in Event::ALL {
                match next(from, event) {
                    Ok(step) => {
                        // Nothing leaves TERMINATED, and only Stop leads to TERMINATING.
                        assert_ne!(from, S::Terminated, "{from} on {event:?}");
                        assert_eq!(
                            step.to == S::Terminating,
                            step.effect == Effect::Stop,
                            "{from} on {event:?}"
                        );
                        // Outcomes are only expected in the state their work runs in.
                        if !event.is_request() {
                            assert!(
                                matches!(
                                    (from, event),
                                    (S::Pending, Event::Launched | Event::LaunchFailed)
                                        | (
                                            S::Suspending,
                                            Event::Saved
                                                | Event::SuspendFailed
                                                | Event::SuspendLost
                                        )
                                        | (
                                            S::Suspended,
                                            Event::Resumed
                                                | Event::ResumeFailed
                                                | Event::ResumeLost
                                        )
                                        | (S::Terminating, Event::Stopped)
                                ),
                                "{from} on {event:?}"
                            );
                        }
                    }
                    Err(Refusal::Already) => assert!(event.is_request(), "{from} {event:?}"),
                    Err(Refusal::Conflict(m)) => {
                        assert!(event.is_request(), "{from} {event:?}");
                        assert!(m.contains(from.as_str()), "{m}");
                    }
                    Err(Refusal::Impossible) => assert!(!event.is_request(), "{from} {event:?}"),
                }
            }
        }
    }

    #[test]
    fn terminate_when_in_any_live_state_then_ends_terminated_through_stop() {
        for &from in S::ALL {
            match next(from, Event::Terminate) {
                Ok(step) => {
                    assert_eq!(
                        step,
                        Step {
                            to: S::Terminating,
                            effect: Effect::Stop
                        }
                    );
                    let end = next(step.to, Event::Stopped).expect("stopped");
                    assert_eq!(end.to, S::Terminated);
                    assert_eq!(end.effect, Effect::ReleaseAll);
                }
                Err(r) => {
                    assert_eq!(r, Refusal::Already);
                    assert!(matches!(from, S::Terminating | S::Terminated));
                }
            }
        }
    }

    #[test]
    fn resume_when_terminated_then_conflict_and_suspend_when_suspended_then_already() {
        assert!(matches!(
            next(S::Terminated, Event::Resume),
            Err(Refusal::Conflict(m)) if m.contains("TERMINATED")
        ));
        assert_eq!(next(S::Suspended, Event::Suspend), Err(Refusal::Already));
        assert_eq!(next(S::Running, Event::Resume), Err(Refusal::Already));
        assert!(matches!(
            next(S::Pending, Event::Suspend),
            Err(Refusal::Conflict(_))
        ));
    }

    #[test]
    fn suspend_then_each_outcome_lands_in_one_state() {
        let save = next(S::Running, Event::Suspend).expect("suspend");
        assert_eq!(save.effect, Effect::SaveSession);
        assert_eq!(next(save.to, Event::Saved).map(|s| s.to), Ok(S::Suspended));
        assert_eq!(
            next(save.to, Event::SuspendFailed).map(|s| s.to),
            Ok(S::Running)
        );
        assert_eq!(
            next(save.to, Event::SuspendLost).map(|s| s.to),
            Ok(S::Terminated)
        );
        let restore = next(S::Suspended, Event::Resume).expect("resume");
        assert_eq!(
            restore,
            Step {
                to: S::Suspended,
                effect: Effect::RestoreSession
            }
        );
        assert_eq!(
            next(restore.to, Event::Resumed).map(|s| s.to),
            Ok(S::Running)
        );
        assert_eq!(
            next(restore.to, Event::ResumeFailed),
            Ok(Step {
                to: S::Suspended,
                effect: Effect::ReleaseMemory
            })
        );
        assert_eq!(
            next(restore.to, Event::ResumeLost).map(|s| s.to),
            Ok(S::Terminating)
        );
    }

    fn policy(idle: i32, suspended: i32) -> IdlePolicy {
        IdlePolicy {
            max_idle_duration_seconds: idle,
            suspended_duration_seconds: suspended,
            auto_resume_enabled: true,
        }
    }

    const H: Duration = Duration::from_secs(3600);

    #[test]
    fn due_when_virtual_clock_passes_each_limit_then_expiry_follows() {
        let p = policy(60, 120);
        let secs = Duration::from_secs;
        // Running: idle counts, 59 s is not enough, 60 s is.
        assert_eq!(
            due(S::Running, secs(100), H, Some(&p), Some(secs(59)), None),
            None
        );
        assert_eq!(
            due(S::Running, secs(100), H, Some(&p), Some(secs(60)), None),
            Some(Expiry::Idle(secs(60)))
        );
        // Suspended: the suspended duration counts.
        assert_eq!(
            due(S::Suspended, secs(100), H, Some(&p), None, Some(secs(119))),
            None
        );
        assert_eq!(
            due(S::Suspended, secs(100), H, Some(&p), None, Some(secs(120))),
            Some(Expiry::SuspendedTooLong)
        );
        // The maximum duration wins over everything, in both states.
        for state in [S::Running, S::Suspended] {
            assert_eq!(
                due(state, H, H, Some(&p), Some(secs(1)), Some(secs(1))),
                Some(Expiry::MaximumDuration)
            );
        }
        // Without a policy only the maximum duration applies.
        assert_eq!(due(S::Running, secs(10), H, None, Some(H), None), None);
        // Transitional states are never expired mid-way.
        for state in [S::Pending, S::Suspending, S::Terminating, S::Terminated] {
            assert_eq!(due(state, 2 * H, H, Some(&p), Some(H), Some(H)), None);
        }
        // A zero suspended duration ends a suspended session at once.
        assert_eq!(
            due(
                S::Suspended,
                secs(5),
                H,
                Some(&policy(60, 0)),
                None,
                Some(secs(0))
            ),
            Some(Expiry::SuspendedTooLong)
        );
    }
}
