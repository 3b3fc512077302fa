//! A device's I/O thread: the queues its guest driver notifies and the input it receives,
//! run off the vCPU threads.

use vmm_sys_util::eventfd::EventFd;

use super::control::Shared;
use super::RunState;

/// What a device's I/O thread watches besides its wake-up.
#[derive(Clone, Copy)]
enum IoSource {
    /// The guest notified queue `q` (its ioeventfd).
    Queue(usize),
    /// The device's input `i` (a TAP queue) is readable.
    Input(usize),
}

/// A device's I/O thread: runs the queues the guest notifies (through their ioeventfds) and
/// takes the device's input (each input while the device has guest buffers for it), never
/// while the VM is paused. Ends when the VM stops (the stop wakes it). Whatever changes what
/// is watched wakes it too: the VM resuming, a driver becoming ready or being reset, a receive
/// queue getting buffers again, the queue pairs in use changing.
pub(super) fn device_io_loop(
    shared: &Shared,
    index: usize,
    inputs: &[std::os::fd::RawFd],
    wake: &EventFd,
) {
    use std::os::fd::AsRawFd;
    let Some(slot) = shared.devices.slots().get(index) else {
        return;
    };
    let mut fds = Vec::with_capacity(1 + slot.notifiers.len() + inputs.len());
    let mut sources = Vec::with_capacity(fds.capacity());
    let mut ready = Vec::with_capacity(fds.capacity());
    let pollfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        if shared.lock().target == RunState::Stopped {
            return;
        }
        fds.clear();
        sources.clear();
        fds.push(pollfd(wake.as_raw_fd()));
        if !shared.devices.paused() {
            for (q, n) in slot.notifiers.iter().enumerate() {
                sources.push(IoSource::Queue(q));
                fds.push(pollfd(n.as_raw_fd()));
            }
            let d = slot.lock();
            for (input, &fd) in inputs.iter().enumerate() {
                if d.wants_input(input) {
                    sources.push(IoSource::Input(input));
                    fds.push(pollfd(fd));
                }
            }
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r <= 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let _ = wake.read();
        }
        ready.clear();
        for (source, pfd) in sources.iter().zip(&fds[1..]) {
            if pfd.revents == 0 {
                continue;
            }
            if let IoSource::Queue(q) = *source {
                // Consumed before the queue runs: a notify that comes while it runs is seen
                // on the next round.
                if let Some(n) = slot.notifiers.get(q) {
                    let _ = n.read();
                }
            }
            ready.push(*source);
        }
        let mut d = slot.lock();
        if shared.devices.paused() {
            // Set aside: resuming runs every live queue.
            continue;
        }
        for source in &ready {
            match *source {
                IoSource::Queue(q) => d.queue_notified(q),
                IoSource::Input(i) => d.poll_input(i),
            }
        }
    }
}
