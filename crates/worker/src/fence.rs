//! Self-fencing: a worker of a cluster host runs its VM only until a deadline that its host
//! agent keeps moving forward after each renewal of the host's lease, and stops the VM by
//! itself when the deadline passes. An agent that is frozen (SIGSTOP, swapped out, stuck)
//! cannot fence its VMs; this way its workers fence themselves, before the host's lease can
//! expire and the cluster restarts the VMs elsewhere.
//!
//! Deadlines are instants of `CLOCK_BOOTTIME` in milliseconds: absolute, so that a renewal
//! delivered late (an agent frozen between computing and sending it) cannot extend the
//! deadline past what the lease guarantees, and counting time while the host is suspended
//! (the store's lease runs on regardless). Agent and worker share the host's clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Milliseconds of `CLOCK_BOOTTIME` now.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill; CLOCK_BOOTTIME always exists on
    // the Linux versions KVM needs.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1_000_000
}

/// How often the watchdog looks at the deadline: the most a fence can come late.
pub const CHECK_EVERY: Duration = Duration::from_millis(20);

/// A worker's fencing deadline.
#[derive(Debug)]
pub struct Deadline {
    until_ms: AtomicU64,
}

/// Why a renewal was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The deadline passed already: the worker is stopping its VM.
    #[error("the fencing deadline passed {0} ms ago: the VM is being stopped")]
    Passed(u64),
}

impl Deadline {
    /// A deadline at `until_ms` (CLOCK_BOOTTIME).
    pub fn new(until_ms: u64) -> Arc<Deadline> {
        Arc::new(Deadline {
            until_ms: AtomicU64::new(until_ms),
        })
    }

    /// The current deadline.
    pub fn until_ms(&self) -> u64 {
        self.until_ms.load(Ordering::SeqCst)
    }

    /// Moves the deadline to `until_ms` if that is later (an older renewal arriving after a
    /// newer one changes nothing); refused once the deadline has passed — from then on the
    /// VM is being stopped, and nothing may take that back.
    pub fn renew(&self, until_ms: u64) -> Result<u64, RenewError> {
        let now = boottime_ms();
        let mut cur = self.until_ms();
        loop {
            if now >= cur {
                return Err(RenewError::Passed(now - cur));
            }
            let next = cur.max(until_ms);
            match self
                .until_ms
                .compare_exchange(cur, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(next),
                Err(seen) => cur = seen,
            }
        }
    }

    /// Whether the deadline has passed.
    pub fn passed(&self) -> bool {
        boottime_ms() >= self.until_ms()
    }

    /// Starts the watchdog thread: once the deadline passes it calls `fence` (which must not
    /// return to a running VM: it stops the VM and ends the process).
    pub fn watch(
        self: &Arc<Self>,
        fence: impl FnOnce(u64) + Send + 'static,
    ) -> std::io::Result<()> {
        let d = Arc::clone(self);
        std::thread::Builder::new()
            .name("fence-deadline".into())
            .spawn(move || loop {
                let (now, until) = (boottime_ms(), d.until_ms());
                if now >= until {
                    return fence(now - until);
                }
                std::thread::sleep(CHECK_EVERY.min(Duration::from_millis(until - now)));
            })
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewals_only_move_the_deadline_forward_and_stop_once_it_passed() {
        let now = boottime_ms();
        let d = Deadline::new(now + 10_000);
        assert_eq!(d.renew(now + 20_000).unwrap(), now + 20_000);
        // A late, older renewal changes nothing.
        assert_eq!(d.renew(now + 15_000).unwrap(), now + 20_000);
        assert!(!d.passed());
        let gone = Deadline::new(now.saturating_sub(5));
        assert!(gone.passed());
        assert!(matches!(
            gone.renew(now + 60_000),
            Err(RenewError::Passed(_))
        ));
    }

    #[test]
    fn the_watchdog_fences_when_the_deadline_passes() {
        let d = Deadline::new(boottime_ms() + 50);
        let (tx, rx) = std::sync::mpsc::channel();
        d.watch(move |late| {
            let _ = tx.send(late);
        })
        .unwrap();
        let late = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(d.passed());
        assert!(late < 1000, "fenced {late} ms late");
    }
}
