//! COM1: a 16550 UART from `vm-superio`, wired to IRQ 4 through an irqfd, writing the guest's
//! output to the console log (and the terminal in foreground mode).

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::persist::Persist;

/// COM1's first I/O port.
pub const COM1_BASE: u16 = 0x3f8;
/// IIR bit 0: set when no interrupt is pending.
const IIR_NO_INTERRUPT: u8 = 0x01;

/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The eventfd could not be created or cloned.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] std::io::Error),
    /// Saved state is not acceptable to the device model.
    #[error("invalid serial state: {0}")]
    BadState(String),
}

/// Signals the guest's interrupt line through an eventfd registered as an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Host timestamps of the guest's console lines: when the last one ended, and the largest gap
/// between two since [`LineClock::reset_gap`]. A migration uses them to measure the downtime
/// the guest itself shows (its heartbeats stop, then go on elsewhere).
#[derive(Debug, Default)]
pub struct LineClock {
    last_us: AtomicU64,
    last_gap_us: AtomicU64,
    max_gap_us: AtomicU64,
}

/// Microseconds since the Unix epoch (host wall clock).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl LineClock {
    fn mark(&self) {
        let now = unix_us();
        let prev = self.last_us.swap(now, Ordering::Relaxed);
        if prev != 0 {
            let gap = now.saturating_sub(prev);
            self.last_gap_us.store(gap, Ordering::Relaxed);
            self.max_gap_us.fetch_max(gap, Ordering::Relaxed);
        }
    }

    /// When the last console line ended (µs since the epoch), if any did.
    pub fn last_line_us(&self) -> Option<u64> {
        Some(self.last_us.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// The largest gap between two lines since the last reset (µs).
    pub fn max_gap_us(&self) -> u64 {
        self.max_gap_us.load(Ordering::Relaxed)
    }

    /// The gap between the last two lines (µs; 0 before the second line).
    pub fn last_gap_us(&self) -> u64 {
        self.last_gap_us.load(Ordering::Relaxed)
    }

    /// Starts a new largest-gap measurement.
    pub fn reset_gap(&self) {
        self.max_gap_us.store(0, Ordering::Relaxed);
    }
}

/// Where console output goes.
#[derive(Debug, Default)]
pub struct ConsoleOut {
    /// The console log file.
    pub log: Option<File>,
    /// Whether to copy to standard output too.
    pub stdout: bool,
    /// Timestamps of complete lines.
    pub clock: Arc<LineClock>,
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.contains(&b'\n') {
            self.clock.mark();
        }
        if let Some(f) = &mut self.log {
            // A console log that cannot be written must not stop the guest.
            let _ = f.write_all(buf);
        }
        if self.stdout {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(buf);
            let _ = o.flush();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Saved serial state (the registers and the receive FIFO).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// The COM1 device.
#[derive(Debug)]
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A new UART in its reset state; `irq` is the eventfd registered as an irqfd.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// The console's line timestamps.
    pub fn clock(&self) -> Arc<LineClock> {
        Arc::clone(&self.serial.writer().clock)
    }

    /// A guest read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    /// A guest write of register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.serial.write(offset, value) {
            tracing::debug!("serial write: {e:?}");
        }
    }

    /// Queues input for the guest (console input), as much as fits.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    /// The interrupt eventfd (an irqfd) and where the console goes.
    type Args<'a> = (EventFd, ConsoleOut);
    type Error = SerialError;

    /// A UART with saved registers.
    fn restore((irq, out): Self::Args<'_>, state: &SerialDeviceState) -> Result<Self, SerialError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let again = irq.try_clone().map_err(SerialError::EventFd)?;
        let serial = Serial::from_state(&s, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        // An interrupt the UART had raised may not have reached the interrupt controller's
        // saved state (an irqfd is delivered asynchronously), and a guest driver waiting for
        // "transmitter empty" would then wait forever. Raise it again: a spurious one is
        // harmless, the driver reads IIR.
        if state.interrupt_identification & IIR_NO_INTERRUPT == 0 {
            again.write(1).map_err(SerialError::EventFd)?;
        }
        Ok(SerialDevice { serial })
    }

    /// Captures the device state.
    fn save(&self) -> SerialDeviceState {
        let s = self.serial.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_with_pending_input() {
        let mut dev = SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOut::default(),
        );
        dev.write(3, 0x83); // DLAB on
        dev.write(0, 0x0c); // divisor low
        dev.write(3, 0x03);
        dev.write(7, 0x5a); // scratch
        dev.write(1, 0x01); // IER: receive interrupts
        assert_eq!(dev.enqueue_input(b"hi"), 2);
        let saved = dev.save();
        let mut back = SerialDevice::restore(
            (
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                ConsoleOut::default(),
            ),
            &saved,
        )
        .unwrap();
        assert_eq!(back.save(), saved);
        assert_eq!(back.read(7), 0x5a);
        assert_eq!(back.read(0), b'h');
        assert_eq!(saved.baud_divisor_low, 0x0c);
    }

    #[test]
    fn a_pending_interrupt_is_raised_again_after_a_restore() {
        let mut dev = SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOut::default(),
        );
        dev.write(1, 0x02); // IER: transmitter-empty interrupts
        dev.write(0, b'x'); // the guest sends: THRE interrupt pending
        let saved = dev.save();
        assert_eq!(saved.interrupt_identification & IIR_NO_INTERRUPT, 0);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let _back =
            SerialDevice::restore((irq.try_clone().unwrap(), ConsoleOut::default()), &saved)
                .unwrap();
        assert!(
            irq.read().is_ok(),
            "the pending interrupt was not raised again"
        );
        // Nothing pending: nothing raised.
        let quiet = SerialDevice::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleOut::default(),
        )
        .save();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let _q = SerialDevice::restore((irq.try_clone().unwrap(), ConsoleOut::default()), &quiet)
            .unwrap();
        assert!(irq.read().is_err());
    }
}
