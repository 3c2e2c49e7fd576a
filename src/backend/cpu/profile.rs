//! Time per op for `bench step --profile` (`Backend::start_op_profile`) on the CPU: its ops are
//! plain calls that return when their work is done, so an op's time is its call's wall time.
//!
//! Each call also brings its work (`Work`: FLOPs and f32 operand bytes), so the profile gives
//! the ops' rates.
//!
//! `CpuBackend` holds no state, so the profile is the process's. It records only the ops called
//! on the thread that started it (the command's), so that ops other threads run meanwhile (tests
//! beside it) do not mix in; the work an op hands to rayon's pool counts inside its call.

use crate::backend::{summarize_ops, OpSample, OpTime, Work};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::Instant;

/// The ops timed since `start`, on the thread that called it.
struct Profile {
    thread: ThreadId,
    samples: Vec<OpSample>,
}

static PROFILE: Mutex<Option<Profile>> = Mutex::new(None);
/// Whether a profile is being recorded: an op that is not profiled costs one load of it.
static RECORDING: AtomicBool = AtomicBool::new(false);

fn profile() -> MutexGuard<'static, Option<Profile>> {
    // A panic while the lock was held left at worst a sample less: the data stays usable.
    PROFILE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts recording the ops this thread calls; drops any profile in progress.
pub(super) fn start() {
    *profile() = Some(Profile {
        thread: thread::current().id(),
        samples: Vec::new(),
    });
    RECORDING.store(true, Ordering::Relaxed);
}

/// Stops recording and returns the time by op (largest first); empty when nothing was started.
pub(super) fn take() -> Vec<OpTime> {
    RECORDING.store(false, Ordering::Relaxed);
    profile()
        .take()
        .map_or_else(Vec::new, |p| summarize_ops(&p.samples))
}

/// Runs `f`, the op named `op`; while this thread records a profile, adds its wall time and
/// its `work` to it (the closure runs only then).
pub(super) fn timed<T>(op: &'static str, work: impl FnOnce() -> Work, f: impl FnOnce() -> T) -> T {
    if !RECORDING.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let out = f();
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = profile().as_mut() {
        if p.thread == thread::current().id() {
            p.samples.push((op, work(), seconds));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// One test for the whole module: the profile is the process's, so two tests of it running
    /// at once would stop each other's.
    #[test]
    fn records_the_calls_and_time_of_this_threads_ops_only() {
        let work = || Work::moving(8);
        assert_eq!(
            timed("before", work, || 7),
            7,
            "timed returns the op's value"
        );
        start();
        let sleep = |ms| timed("sleep", work, || thread::sleep(Duration::from_millis(ms)));
        sleep(30);
        sleep(20);
        assert_eq!(timed("add", work, || 2 + 3), 5);
        thread::spawn(move || {
            timed("other_thread", work, || {
                thread::sleep(Duration::from_millis(1))
            })
        })
        .join()
        .unwrap();
        let ops = take();
        let names: Vec<_> = ops
            .iter()
            .map(|o| (o.op.as_str(), o.calls, o.bytes))
            .collect();
        assert_eq!(names, [("sleep", 2, 16.0), ("add", 1, 8.0)], "{ops:?}");
        // The two sleeps' wall time, at least what was asked for; generous above for a busy CI.
        assert!((0.050..2.0).contains(&ops[0].seconds), "{ops:?}");
        assert!(ops[1].seconds < ops[0].seconds, "{ops:?}");

        timed("after", work, || ());
        assert!(take().is_empty(), "recorded after take");
    }
}
