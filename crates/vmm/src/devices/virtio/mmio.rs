//! The virtio-mmio transport (virtio 1.x, register layout version 2): feature negotiation,
//! queue setup, notifications and the interrupt status, in front of a [`VirtioDevice`].
//!
//! Guest accesses of the wrong width, to unknown registers or to queue registers of a live
//! queue are ignored (reads return zero) and logged once, as the spec lets a device do; a
//! driver that breaks the protocol gets `DEVICE_NEEDS_RESET` set in the status.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceState, QueueSnapshot, VirtioDevice, F_VERSION_1};
use crate::memory::GuestRam;
use crate::persist::Persist;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Vendor ID reported to the guest ("FRRY").
const VENDOR: u32 = 0x5952_5246;

/// Offset of the queue notify register: the driver writes a queue's index there when it has
/// made buffers available (KVM turns such writes into the queue's ioeventfd).
pub const QUEUE_NOTIFY: u64 = 0x50;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;
const STATUS_FAILED: u32 = 128;

/// Interrupt status bit: a used buffer was added.
const INT_VRING: u32 = 1;
/// Interrupt status bit: the config space changed.
const INT_CONFIG: u32 = 2;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A saved queue that `virtio-queue` does not accept.
    #[error("invalid saved virtqueue {index}: {reason}")]
    BadQueue {
        /// Queue index.
        index: usize,
        /// Why.
        reason: String,
    },
    /// Saved state for another device or layout.
    #[error("saved virtio state does not match the device: {0}")]
    Mismatch(String),
    /// The device's own state does not fit it.
    #[error(transparent)]
    Device(#[from] super::DeviceStateError),
}

/// Saved state of a transport and its queues.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// virtio device ID, checked on restore.
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Feature word selectors.
    pub device_features_sel: u32,
    /// Driver feature word selector.
    pub driver_features_sel: u32,
    /// Selected queue.
    pub queue_sel: u32,
    /// Interrupt status register.
    pub interrupt_status: u32,
    /// Config generation.
    pub config_generation: u32,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: DeviceState,
}

/// One virtio-mmio device: registers at `base`, interrupts through `irq` (an irqfd).
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    ram: Arc<GuestRam>,
    irq: EventFd,
    queues: Vec<Queue>,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    warned: bool,
}

impl MmioTransport {
    /// Puts `device` behind a transport.
    pub fn new(device: Box<dyn VirtioDevice>, ram: Arc<GuestRam>, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .filter_map(|&n| Queue::new(n).ok())
            .collect();
        MmioTransport {
            device,
            ram,
            irq,
            queues,
            status: 0,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            warned: false,
        }
    }

    fn warn(&mut self, what: &str) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                device = self.device.device_type(),
                "virtio-mmio: {what} (ignored; further ones not logged)"
            );
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.device.reset();
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        let i = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(i)
    }

    /// A guest read of `data.len()` bytes at `offset` into the device's window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            self.warn("register read that is not 32 bits wide");
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.device.features() | F_VERSION_1;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => {
                self.warn("read of an unknown register");
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at `offset` into the device's window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            self.warn("write to the read-only config space");
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.warn("register write that is not 32 bits wide");
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configuring = self.status & STATUS_FEATURES_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && self.status & STATUS_FAILED == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & STATUS_FEATURES_OK != 0 {
                    self.warn("feature change after FEATURES_OK");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                if !configuring {
                    self.warn("queue setup outside the driver's configuration phase");
                    return;
                }
                self.write_queue_register(offset, v);
            }
            QUEUE_NOTIFY => self.notify(v),
            0x64 => self.interrupt_status &= !v,
            0x70 => self.write_status(v),
            _ => self.warn("write to an unknown register"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, v: u32) {
        let ram = Arc::clone(&self.ram);
        let Some(q) = self.selected() else {
            self.warn("setup of a queue the device does not have");
            return;
        };
        if q.ready() && offset != 0x44 {
            self.warn("setup of a queue that is live");
            return;
        }
        match offset {
            0x38 => q.set_size(u16::try_from(v).unwrap_or(0)),
            0x44 => {
                q.set_ready(v == 1);
                // (`is_valid` also requires the queue to be ready.)
                if v == 1 && !q.is_valid(ram.memory()) {
                    q.set_ready(false);
                    self.status |= STATUS_NEEDS_RESET;
                    self.warn("queue enabled with an invalid size or ring address");
                }
            }
            0x80 => q.set_desc_table_address(Some(v), None),
            0x84 => q.set_desc_table_address(None, Some(v)),
            0x90 => q.set_avail_ring_address(Some(v), None),
            0x94 => q.set_avail_ring_address(None, Some(v)),
            0xa0 => q.set_used_ring_address(Some(v), None),
            0xa4 => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let set = v & !self.status;
        if v & self.status != self.status {
            self.warn("status bits cleared without a reset");
            return;
        }
        if set & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features() | F_VERSION_1;
            if self.driver_features & !offered != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Leaving FEATURES_OK unset tells the driver the features were not accepted.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        if set & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            self.warn("DRIVER_OK before FEATURES_OK");
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        self.status = v;
        if set & STATUS_DRIVER_OK != 0 {
            self.device.activate(self.driver_features);
        }
    }

    fn notify(&mut self, index: u32) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            self.warn("notify before DRIVER_OK");
            return;
        }
        let Some(i) = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.queues.len())
        else {
            self.warn("notify of a queue the device does not have");
            return;
        };
        self.run_queue(i);
    }

    /// Runs queue `i` if the driver has it live, interrupting the guest if buffers were used.
    fn run_queue(&mut self, i: usize) {
        if !self.queues.get(i).is_some_and(|q| q.ready()) {
            return;
        }
        let used = self
            .device
            .process_queue(i, &mut self.queues[i], self.ram.as_ref());
        if used {
            let q = &mut self.queues[i];
            // The used ring was written by the VMM: the dirty log must hear of it.
            let ring_len = 6 + 8 * u64::from(q.size());
            self.ram.mark_dirty(q.used_ring(), ring_len);
            if q.needs_notification(self.ram.memory()).unwrap_or(true) {
                self.signal();
            }
        }
    }

    fn signal(&mut self) {
        self.raise(INT_VRING);
    }

    fn raise(&mut self, why: u32) {
        self.interrupt_status |= why;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio interrupt not delivered: {e}");
        }
    }

    /// Takes what arrived on the device's input `input` (its I/O thread saw that descriptor
    /// readable).
    pub fn poll_input(&mut self, input: usize) {
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            let q = self.device.input_queue(input);
            self.run_queue(q);
        }
    }

    /// What the device's I/O thread watches (see [`VirtioDevice::poll_fds`]).
    pub fn poll_fds(&self) -> Option<(Vec<std::os::fd::RawFd>, EventFd)> {
        self.device.poll_fds()
    }

    /// Whether the I/O thread should watch input `input` now: never before the driver is
    /// ready (input waiting then would wake the I/O thread again and again, since
    /// [`MmioTransport::poll_input`] leaves it where it is); the device wakes the thread when
    /// the driver becomes ready.
    pub fn wants_input(&self, input: usize) -> bool {
        self.status & STATUS_DRIVER_OK != 0
            && self.status & STATUS_NEEDS_RESET == 0
            && self.device.wants_input(input)
    }

    /// Tells the network where the VM is (see [`VirtioDevice::announce`]): the device's own
    /// announcement goes out whatever the guest's driver does; a device that asks the driver
    /// to announce too gets its config-change interrupt here.
    pub fn announce(&mut self) {
        if self.device.announce() && self.status & STATUS_DRIVER_OK != 0 {
            self.config_generation = self.config_generation.wrapping_add(1);
            self.raise(INT_CONFIG);
        }
    }

    /// The guest notified queue `q` (seen by the device's I/O thread on the queue's
    /// ioeventfd): runs it, as a write of `q` to the notify register would.
    pub fn queue_notified(&mut self, q: usize) {
        self.notify(u32::try_from(q).unwrap_or(u32::MAX));
    }

    /// Runs every live queue once, if the driver is ready (after a pause: a notify that came
    /// meanwhile was set aside).
    pub fn run_live_queues(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            for i in 0..self.queues.len() {
                self.run_queue(i);
            }
        }
    }

    /// Lets go of the device's backend (see [`VirtioDevice::release`]).
    pub fn release(&mut self) -> Result<(), super::BackendError> {
        self.device.release()
    }

    /// Takes the backend back (see [`VirtioDevice::reacquire`]).
    pub fn reacquire(&mut self) -> Result<(), super::BackendError> {
        self.device.reacquire()
    }

    /// Whether the backend is released.
    pub fn released(&self) -> bool {
        self.device.released()
    }

    /// Runs queue `i` now if the driver is ready (the device has something for the guest
    /// that does not wait for a notify: a hot-plug event).
    pub fn kick_queue(&mut self, i: usize) {
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            self.run_queue(i);
        }
    }

    /// The device behind the transport, for a run-time operation on it.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The transport's state (the VM must be paused).
    fn save_state(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
            device: self.device.save_state(),
        }
    }

    /// Takes over saved state (before the vCPUs run). A pending interrupt is raised again.
    /// Nothing changes when the state does not fit.
    pub fn load(&mut self, s: &MmioState) -> Result<(), MmioError> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(MmioError::Mismatch(format!(
                "device type {} with {} queues saved, {} with {} here",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::new();
        for (index, (q, max)) in s
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            if q.max_size != *max {
                return Err(MmioError::Mismatch(format!(
                    "queue {index} holds {} entries, here {max}",
                    q.max_size
                )));
            }
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            let queue = Queue::try_from(state).map_err(|e| MmioError::BadQueue {
                index,
                reason: e.to_string(),
            })?;
            if queue.ready() && !queue.is_valid(self.ram.memory()) {
                return Err(MmioError::BadQueue {
                    index,
                    reason: "rings outside guest memory".into(),
                });
            }
            queues.push(queue);
        }
        self.device.restore_state(&s.device)?;
        self.queues = queues;
        self.status = s.status;
        self.driver_features = s.driver_features;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.queue_sel = s.queue_sel;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.device.activate(self.driver_features);
        }
        if self.interrupt_status != 0 {
            let _ = self.irq.write(1);
        }
        Ok(())
    }
}

impl Persist for MmioTransport {
    type State = MmioState;
    /// The device (its backend open), guest RAM and the interrupt eventfd (an irqfd).
    type Args<'a> = (Box<dyn VirtioDevice>, Arc<GuestRam>, EventFd);
    type Error = MmioError;

    fn save(&self) -> MmioState {
        self.save_state()
    }

    fn restore((device, ram, irq): Self::Args<'_>, state: &MmioState) -> Result<Self, MmioError> {
        let mut t = MmioTransport::new(device, ram, irq);
        t.load(state)?;
        Ok(t)
    }
}
