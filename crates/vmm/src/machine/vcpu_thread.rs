//! A vCPU's thread: its `KVM_RUN` loop, parking on pause, the throttle's rests, the kick that
//! gets it out of the guest, and the dispatch of its exits to the devices.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Mutex, Once};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::control::Shared;
use super::{MachineError, RunState, StopReason};
use crate::device_manager::PioEffect;

pub(super) fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` is this thread's own kvm_run mapping, set by the vCPU thread before it
        // first runs and valid until the vCPU fd (which the thread keeps alive) is dropped; a
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
    }
}

pub(super) fn install_kick_handler() -> Result<(), MachineError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| MachineError::Threads(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

pub(super) fn kick_threads(threads: &Mutex<Vec<JoinHandle<()>>>) {
    let threads = threads.lock().unwrap_or_else(|p| p.into_inner());
    for t in threads.iter() {
        // SAFETY: the pthread handle belongs to a thread we spawned and have not joined
        // (joining takes this lock), so it is valid; the signal has a handler installed.
        unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
    }
}

fn is_interrupted(e: &kvm_ioctls::Error) -> bool {
    e.errno() == libc::EINTR || e.errno() == libc::EAGAIN
}

/// Completes pending I/O (KVM finishes an `in` instruction only on the next `KVM_RUN`) so that
/// the state read while parked is consistent.
fn flush_pending(fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
}

pub(super) fn vcpu_loop(id: usize, fd: &Mutex<VcpuFd>, shared: &Shared) {
    {
        let mut f = fd.lock().unwrap_or_else(|p| p.into_inner());
        let p: *mut kvm_run = f.get_kvm_run();
        KVM_RUN_PTR.with(|c| c.set(p));
    }
    let mut parked = false;
    let mut slices = crate::throttle::Slices::new(kick_signal());
    loop {
        {
            let mut c = shared.lock();
            loop {
                match c.target {
                    RunState::Running => break,
                    RunState::Paused => {
                        if !parked {
                            flush_pending(&mut fd.lock().unwrap_or_else(|p| p.into_inner()));
                            parked = true;
                            c.parked += 1;
                            c.last_parked_us = crate::devices::serial::unix_us();
                            shared.cv.notify_all();
                        }
                        c = shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                    RunState::Stopped => {
                        if parked {
                            c.parked -= 1;
                        }
                        c.exited += 1;
                        shared.cv.notify_all();
                        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
                        return;
                    }
                }
            }
            if parked {
                c.parked -= 1;
                parked = false;
            }
            if c.first_entry_us == 0 {
                c.first_entry_us = crate::devices::serial::unix_us();
                shared.cv.notify_all();
            }
        }
        let throttle = shared.throttle.load(std::sync::atomic::Ordering::Relaxed);
        slices.before_run(id, throttle);
        let mut f = fd.lock().unwrap_or_else(|p| p.into_inner());
        let mut rest = None;
        let stop = match f.run() {
            Ok(exit) => handle_exit(id, exit, shared),
            Err(e) if is_interrupted(&e) => {
                // A kick (pause, stop, throttle start) or the end of a throttle slice; either
                // way the top of the loop reads the target state before the next KVM_RUN.
                f.set_kvm_immediate_exit(0);
                rest = slices.rest_until(throttle);
                None
            }
            Err(e) => Some(StopReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        if matches!(stop, Some(StopReason::GuestShutdown | StopReason::Error(_))) {
            log_registers(id, &f);
        }
        drop(f);
        if let Some(reason) = stop {
            shared.request_stop(reason);
        }
        if let Some(until) = rest {
            shared.rest_until(until);
        }
    }
}

/// Logs where a vCPU was when the guest stopped on its own (a shutdown, a triple fault, an
/// error): enough to tell a guest's reboot from a VMM bug.
fn log_registers(id: usize, fd: &VcpuFd) {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => tracing::warn!(
            vcpu = id,
            "stopped at rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            s.cs.selector,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer
        ),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(vcpu = id, "stopped; its registers cannot be read: {e}")
        }
    }
}

/// Handles one exit: port and MMIO accesses go to the device on that address (nothing
/// there: reads see all ones); a reset or shutdown, an entry failure or an emulation failure
/// stops the VM.
fn handle_exit(id: usize, exit: VcpuExit<'_>, shared: &Shared) -> Option<StopReason> {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if shared.devices.pio_write(port, data) == PioEffect::Reset {
                tracing::warn!(vcpu = id, "the guest reset itself through the i8042");
                return Some(StopReason::GuestShutdown);
            }
            None
        }
        VcpuExit::IoIn(port, data) => {
            shared.devices.pio_read(port, data);
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            shared.devices.mmio_read(addr, data);
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            shared.devices.mmio_write(addr, data);
            None
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen => None,
        VcpuExit::Shutdown => {
            tracing::warn!(
                vcpu = id,
                "KVM_EXIT_SHUTDOWN: the guest triple-faulted (or its CPU was reset)"
            );
            Some(StopReason::GuestShutdown)
        }
        VcpuExit::SystemEvent(t, _) => {
            tracing::info!(vcpu = id, "guest system event {t}");
            Some(StopReason::GuestShutdown)
        }
        VcpuExit::FailEntry(reason, cpu) => Some(StopReason::Error(format!(
            "vCPU {id}: KVM entry failed (reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => Some(StopReason::Error(format!(
            "vCPU {id}: KVM internal error (emulation failed)"
        ))),
        other => {
            tracing::warn!(vcpu = id, "unhandled exit {other:?}");
            None
        }
    }
}
