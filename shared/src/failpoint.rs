//! Named fault-injection points, for the fail-point suite (`tests/failpoints.rs`).
//!
//! [`fail_point!`](crate::fail_point) marks a place where an operation can fail: a store
//! write, a seal phase, an upload's write or rename, a report. Built without the
//! `failpoints` feature (every release binary) it expands to nothing at all. Built with
//! it (the test-only `nexa-coordinator-failpoints`), the `FAILPOINTS` environment
//! variable arms points by name, with tikv's `fail` syntax:
//!
//! - `store.write=return`: every pass through the point fails the operation with an
//!   injected error, as a full disk or an I/O error would;
//! - `store.write=2*return`: only the first two passes fail;
//! - `seal.swap_in=1*return(crash)`: the first pass kills the process on the spot
//!   (SIGKILL: no destructor, no flush), as a power cut would;
//! - `planner.plan=panic`: every pass panics (a point with no error to return, such as
//!   the planner's, only panics, sleeps or pauses).
//!
//! Every point either fails its operation cleanly or is survived by a restart; the
//! suite checks each one both ways.

#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub use fail as __fail;

/// Arms the points named in `FAILPOINTS`, for the life of the process (a no-op without
/// the `failpoints` feature). Call once, first thing in `main`.
pub fn arm_from_env() {
    #[cfg(feature = "failpoints")]
    {
        let scenario = fail::FailScenario::setup();
        if let Ok(spec) = std::env::var("FAILPOINTS")
            && !spec.is_empty()
        {
            eprintln!("fail points armed: {spec}");
        }
        // Dropping the scenario would disarm every point.
        std::mem::forget(scenario);
    }
}

/// What an armed point does when it fires with argument `arg`: `crash` kills the process
/// at once; anything else lets the operation fail with the point's error.
#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub fn __fired(name: &str, arg: Option<&str>) {
    eprintln!("fail point {name} fired ({})", arg.unwrap_or("return"));
    if arg == Some("crash") {
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; should it not be delivered at once, do not go on.
        std::process::abort();
    }
}

/// A named fault-injection point: with the `failpoints` feature and the point armed,
/// the enclosing function returns `Err($err)` (or the process is killed, for
/// `return(crash)`); otherwise nothing happens. Without the feature it expands to
/// nothing.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! fail_point {
    ($name:literal) => {
        $crate::failpoint::__fail::fail_point!($name)
    };
    ($name:literal, $err:expr) => {
        $crate::failpoint::__fail::fail_point!($name, |arg: Option<String>| {
            $crate::failpoint::__fired($name, arg.as_deref());
            Err($err)
        })
    };
}

/// A named fault-injection point (compiled out: the `failpoints` feature is off).
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! fail_point {
    ($name:literal) => {};
    ($name:literal, $err:expr) => {};
}

/// The injected error for point `name`: an I/O error, as the disk would give.
pub fn injected(name: &str) -> std::io::Error {
    std::io::Error::other(format!("injected fault at fail point {name}"))
}
