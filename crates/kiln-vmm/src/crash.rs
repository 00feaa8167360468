//! Crash points: where the tests kill the supervisor in the middle of an operation.
//!
//! A kill -9 at a random moment rarely lands inside a 150 ms suspend, so the crash-safety tests
//! name the moment instead: with `KILN_CRASH_AT=<point>` in its environment, the process sends
//! itself SIGKILL when it reaches that point — no destructor, no flush, exactly as an operator's
//! `kill -9` would leave things. Without the variable a crash point costs one lookup.

/// The environment variable naming the crash point.
pub const CRASH_AT: &str = "KILN_CRASH_AT";

/// Kills this process with SIGKILL if `KILN_CRASH_AT` names `point`.
pub fn crash_point(point: &str) {
    if std::env::var_os(CRASH_AT).is_some_and(|v| v == point) {
        tracing::warn!(point, "{CRASH_AT}: killing this process here");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
