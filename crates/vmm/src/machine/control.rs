//! What the controlling thread, the vCPU threads and the devices' I/O threads share: the
//! target run state they all follow, the counts of parked and exited vCPUs, and the devices.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::{RunState, StopReason};
use crate::device_manager::DeviceManager;

/// The run state the threads follow and where they are.
#[derive(Debug)]
pub(super) struct Control {
    pub(super) target: RunState,
    pub(super) parked: usize,
    pub(super) exited: usize,
    pub(super) reason: Option<StopReason>,
    /// When the last vCPU to park did so (µs since the Unix epoch; 0: never).
    pub(super) last_parked_us: u64,
    /// When the first vCPU entered the guest after the last resume (0: none yet).
    pub(super) first_entry_us: u64,
}

/// Shared by every thread of a machine.
pub(super) struct Shared {
    /// Percent of time vCPUs are kept out of the guest (auto-converge), 0 = none.
    pub(super) throttle: std::sync::atomic::AtomicU8,
    pub(super) ctl: Mutex<Control>,
    pub(super) cv: Condvar,
    /// Every device.
    pub(super) devices: DeviceManager,
    /// The eventfds that wake the devices' I/O threads: a stop ends them at once, a resume
    /// lets them watch their queues and inputs again.
    pub(super) io_wakes: Mutex<Vec<EventFd>>,
    pub(super) nvcpus: usize,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Control> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds for the control state, or `timeout` passes; returns the
    /// locked state and whether `done` held.
    pub(super) fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&Control) -> bool,
    ) -> (MutexGuard<'_, Control>, bool) {
        let deadline = Instant::now() + timeout;
        let mut c = self.lock();
        while !done(&c) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (c, false);
            }
            c = self
                .cv
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        (c, true)
    }

    pub(super) fn request_stop(&self, reason: StopReason) {
        let mut c = self.lock();
        if c.target != RunState::Stopped {
            c.target = RunState::Stopped;
            c.reason.get_or_insert(reason);
            self.wake_io_threads();
        }
        self.cv.notify_all();
    }

    /// A throttled vCPU's rest: until `until`, or sooner when the VM is no longer running
    /// (a pause or stop must not wait out the period) or the throttle is lifted.
    pub(super) fn rest_until(&self, until: Instant) {
        let _ = self.wait_for(until.saturating_duration_since(Instant::now()), |c| {
            c.target != RunState::Running
                || self.throttle.load(std::sync::atomic::Ordering::SeqCst) == 0
        });
    }

    pub(super) fn wake_io_threads(&self) {
        for w in self
            .io_wakes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = w.write(1);
        }
    }
}
