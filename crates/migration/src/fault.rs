//! Fault injection for the end-to-end failure tests (cargo feature `fault-injection`, which
//! only the test builds turn on; without it every function here does nothing).
//!
//! `FERRY_FAULT` in a worker's environment:
//! - `hold:<point>` — on reaching `<point>` (`setup`: ACCEPT received; `precopy`: round 0
//!   sent; `stop-and-copy`: VM paused, nothing of the last pages sent yet; `ready`: READY
//!   received, COMMIT not sent; `gated`: the cluster's commit gate answered commit, COMMIT
//!   not sent; `committed`: COMMIT sent, RESUMED not read; and in a
//!   receiving worker `dest-committed`: COMMIT received, VM not resumed), create the file
//!   named by `FERRY_FAULT_MARK` and wait there while it exists (up to 120 s, or until the
//!   migration is cancelled), so that a test can kill a process, cut the link or cancel at
//!   that moment and then let the migration go on by removing the file;
//! - `corrupt-batch:<n>` — flip one byte of the n-th PAGES frame of a migration (counting from
//!   1, from each migration's start) after its checksum was computed, as a bad link or a bug
//!   would.
//!
//! With `FERRY_FAULT_FILE` set, the setting is that file's content instead, read each time it
//! is consulted (none while the file is missing or empty): the soak gives every host one and
//! arms a fault for one migration at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[cfg(feature = "fault-injection")]
fn setting() -> Option<String> {
    match std::env::var_os("FERRY_FAULT_FILE") {
        Some(f) => std::fs::read_to_string(f)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        None => std::env::var("FERRY_FAULT").ok(),
    }
}

#[cfg(not(feature = "fault-injection"))]
fn setting() -> Option<String> {
    None
}

/// Holds at `point` if told to.
pub(crate) fn hold(point: &str, cancel: &AtomicBool) {
    if setting().as_deref() != Some(&format!("hold:{point}")) {
        return;
    }
    tracing::warn!(point, "fault injection: holding");
    let Some(mark) = std::env::var_os("FERRY_FAULT_MARK") else {
        return;
    };
    let mark = std::path::PathBuf::from(mark);
    let _ = std::fs::write(&mark, point);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while mark.exists() && !cancel.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    tracing::warn!(point, "fault injection: going on");
}

static BATCHES: AtomicU64 = AtomicU64::new(0);

/// A migration starts: `corrupt-batch:<n>` counts its frames from here.
pub(crate) fn begin() {
    BATCHES.store(0, Ordering::Relaxed);
}

/// Whether a corruption is set up (the sender then builds every batch in one buffer).
pub(crate) fn active() -> bool {
    setting().is_some_and(|s| s.starts_with("corrupt-batch:"))
}

/// Whether to damage the PAGES frame being sent now.
pub(crate) fn corrupt_this_batch() -> bool {
    let Some(n) = setting()
        .as_deref()
        .and_then(|s| s.strip_prefix("corrupt-batch:"))
        .and_then(|n| n.parse::<u64>().ok())
    else {
        return false;
    };
    BATCHES.fetch_add(1, Ordering::Relaxed) + 1 == n
}
