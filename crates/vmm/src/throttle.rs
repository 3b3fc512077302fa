//! Auto-converge's vCPU throttle: a throttled vCPU runs in exact slices of a fixed period.
//!
//! At throttle `t` percent, each vCPU thread runs the guest for `(100 − t)`% of every
//! [`PERIOD`] and stays out for the rest. The slice is measured by a POSIX timer of the vCPU's
//! own thread (`SIGEV_THREAD_ID`, the kick signal), armed at the start of each period, so it
//! does not depend on another thread's kicks landing at the right moment, nor on how late the
//! rest's wake-up comes: the next period starts when the vCPU is back, and its slice is timed
//! afresh. The guest is therefore never stopped by the throttle for longer than one period.

use std::time::{Duration, Instant};

/// One run-and-rest period. Shorter than the default downtime target (100 ms), so a throttled
/// guest is never out of the guest longer than a switch-over would keep it.
pub const PERIOD: Duration = Duration::from_millis(50);

/// The highest throttle (percent): the guest keeps at least 1% of its time.
pub const MAX_PCT: u8 = 99;

/// How long the guest runs in each period at throttle `pct`.
pub fn run_slice(pct: u8) -> Duration {
    let pct = u32::from(pct.min(MAX_PCT));
    PERIOD * (100 - pct) / 100
}

/// A one-shot timer that sends `signal` to the thread that created it.
struct ThreadTimer {
    id: libc::timer_t,
}

// SAFETY: a timer id is a plain kernel handle; arming or deleting it from another thread is
// allowed (the timer's target thread is fixed at creation). The vCPU thread owns it anyway.
unsafe impl Send for ThreadTimer {}

impl ThreadTimer {
    /// A timer whose expiry sends `signal` to the calling thread.
    fn for_this_thread(signal: i32) -> std::io::Result<ThreadTimer> {
        // SAFETY: sigevent is a plain C struct for which all-zero bytes are a valid value.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = signal;
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `id` are valid for the call; the kernel writes the new id to `id`.
        let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut id) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ThreadTimer { id })
    }

    /// Fires once after `after` (zero disarms).
    fn arm(&self, after: Duration) -> std::io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `self.id` is a live timer (deleted only on drop); `spec` is valid for the
        // call and the old value is not asked for.
        let r = unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` came from timer_create and is deleted only here.
        unsafe { libc::timer_delete(self.id) };
    }
}

/// One vCPU thread's slicing: where its current period started and the timer ending its slice.
pub(crate) struct Slices {
    signal: i32,
    timer: Option<ThreadTimer>,
    period_start: Option<Instant>,
    /// Set once creating or arming the timer failed: the vCPU then runs unthrottled (logged).
    broken: bool,
}

impl Slices {
    /// Slicing for the calling (vCPU) thread, whose slice ends with `signal`.
    pub(crate) fn new(signal: i32) -> Slices {
        Slices {
            signal,
            timer: None,
            period_start: None,
            broken: false,
        }
    }

    /// Before entering the guest at throttle `pct`: starts a period (and arms the slice's
    /// timer) when none is running; disarms when the throttle is off.
    pub(crate) fn before_run(&mut self, id: usize, pct: u8) {
        if pct == 0 || self.broken {
            if self.period_start.take().is_some() {
                if let Some(t) = &self.timer {
                    let _ = t.arm(Duration::ZERO);
                }
            }
            return;
        }
        let now = Instant::now();
        if self.period_start.is_some_and(|s| now < s + PERIOD) {
            return;
        }
        if self.timer.is_none() {
            match ThreadTimer::for_this_thread(self.signal) {
                Ok(t) => self.timer = Some(t),
                Err(e) => return self.give_up(id, &e),
            }
        }
        if let Some(t) = &self.timer {
            if let Err(e) = t.arm(run_slice(pct)) {
                return self.give_up(id, &e);
            }
        }
        self.period_start = Some(now);
    }

    /// After the guest was interrupted at throttle `pct`: the instant to stay out until, when
    /// the slice is over (`None`: an interruption for another reason, or no throttle).
    pub(crate) fn rest_until(&self, pct: u8) -> Option<Instant> {
        if pct == 0 || self.broken {
            return None;
        }
        let start = self.period_start?;
        let now = Instant::now();
        (now >= start + run_slice(pct)).then_some(start + PERIOD)
    }

    fn give_up(&mut self, id: usize, e: &std::io::Error) {
        tracing::warn!(
            vcpu = id,
            "throttle timer unavailable, vCPU runs unthrottled: {e}"
        );
        self.broken = true;
        self.period_start = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_is_the_unthrottled_share_of_the_period() {
        assert_eq!(run_slice(0), PERIOD);
        assert_eq!(run_slice(20), PERIOD * 80 / 100);
        assert_eq!(run_slice(90), PERIOD / 10);
        assert_eq!(run_slice(99), PERIOD / 100);
        // Above the ceiling the guest still keeps 1%.
        assert_eq!(run_slice(100), PERIOD / 100);
    }
}
