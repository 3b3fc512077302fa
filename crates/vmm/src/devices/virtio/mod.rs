//! virtio devices on the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! The rings are `virtio-queue`'s: it walks descriptor chains with every address, length,
//! loop and indirect table checked against guest memory, so a device here only decides what a
//! well-formed chain means and answers anything else with an error status. Each device's
//! queues run on its own I/O thread ([`crate::machine`]), woken through one ioeventfd per queue
//! when the guest writes the notify register; a notify KVM does not match (a queue the device
//! lacks) reaches [`mmio::MmioTransport::write`] on the vCPU thread instead.

pub mod block;
pub mod mmio;
pub mod net;
pub mod scsi;
pub mod tap;
#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use crate::memory::GuestRam;

/// `VIRTIO_F_VERSION_1`: the device is virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;

/// Where the first virtio-mmio device sits (inside the MMIO gap below 4 GiB).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Bytes of MMIO space per device (registers + config space).
pub const MMIO_SIZE: u64 = 0x1000;
/// The ISA interrupt lines given to virtio devices, in order (edge-triggered through the
/// IOAPIC; the MP table routes 0 to 15). 4 is COM1.
pub const IRQS: [u32; 10] = [5, 6, 7, 9, 10, 11, 12, 13, 14, 15];
/// Most virtio devices a VM can have.
pub const MAX_DEVICES: usize = IRQS.len();

/// Guest address and interrupt line of virtio device `index`.
pub fn slot(index: usize) -> Option<(u64, u32)> {
    let irq = *IRQS.get(index)?;
    Some((MMIO_BASE + index as u64 * MMIO_SIZE, irq))
}

/// The kernel command-line fragment that tells Linux about a virtio-mmio device.
pub fn linux_cmdline(index: usize) -> Option<String> {
    let (base, irq) = slot(index)?;
    Some(format!("virtio_mmio.device=4K@{base:#x}:{irq}"))
}

/// Bytes a VM's devices moved since its worker started: disk data read and written for the
/// guest, frames received and sent (virtio headers included). Kept by each device, summed by
/// the device manager, reported in the worker's status for utilization.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoTotals {
    /// Disk data read for the guest (virtio-blk and SCSI LUNs).
    pub disk_read_bytes: u64,
    /// Disk data the guest wrote.
    pub disk_write_bytes: u64,
    /// Network frames delivered to the guest.
    pub net_rx_bytes: u64,
    /// Network frames the guest sent.
    pub net_tx_bytes: u64,
}

impl std::ops::AddAssign for IoTotals {
    fn add_assign(&mut self, o: IoTotals) {
        self.disk_read_bytes += o.disk_read_bytes;
        self.disk_write_bytes += o.disk_write_bytes;
        self.net_rx_bytes += o.net_rx_bytes;
        self.net_tx_bytes += o.net_tx_bytes;
    }
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// virtio device ID (2: block, 1: network).
    fn device_type(&self) -> u32;
    /// Largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (`F_VERSION_1` included).
    fn features(&self) -> u64;
    /// Reads `data.len()` bytes of the device's config space at `offset` (beyond it: zeros).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Takes the available buffers of queue `index`; returns whether any were used.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, ram: &GuestRam) -> bool;
    /// Lets go of what backs the device (a disk: flushed, then closed, its lock released) so
    /// that another process can take it over. The VM is paused; until
    /// [`VirtioDevice::reacquire`] requests fail.
    fn release(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Takes the backend back after [`VirtioDevice::release`] (nothing if it was not released).
    fn reacquire(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Whether the backend is released.
    fn released(&self) -> bool {
        false
    }
    /// The driver set DRIVER_OK having accepted `acked` (also called after a restore).
    fn activate(&mut self, _acked: u64) {}
    /// The driver reset the device: back to the state before feature negotiation.
    fn reset(&mut self) {}
    /// The device's own state beyond its transport and queues (the VM is paused).
    fn save_state(&self) -> DeviceState;
    /// Takes over saved device state (before [`VirtioDevice::activate`] on a restore); a
    /// state that does not fit the device is refused and nothing is changed.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError>;
    /// What the device has moved since it was made (not carried by save/restore: a new
    /// worker counts from zero).
    fn io(&self) -> IoTotals;
    /// The device as `Any`, for the device manager's run-time operations on a device of a
    /// known kind (adding a LUN to the SCSI controller).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
    /// Descriptors to watch for input (a TAP's queues) and an eventfd that wakes the watcher,
    /// for a device that receives on its own; the device's I/O thread then watches them too.
    /// The device signals the eventfd whenever [`VirtioDevice::wants_input`] may have turned
    /// true (the thread waits without a timeout).
    fn poll_fds(&self) -> Option<(Vec<std::os::fd::RawFd>, vmm_sys_util::eventfd::EventFd)> {
        None
    }
    /// Whether the I/O thread should watch input `input` now (false: no guest buffers for
    /// it, or not in use).
    fn wants_input(&self, _input: usize) -> bool {
        false
    }
    /// The queue that input `input` goes to.
    fn input_queue(&self, input: usize) -> usize {
        input
    }
    /// Tells the network where the VM now is (after a move). Returns whether the device's
    /// config space changed so the transport must interrupt the guest for it.
    fn announce(&mut self) -> bool {
        false
    }
}

/// A device's own saved state (see [`VirtioDevice::save_state`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// Nothing beyond the transport (virtio-blk).
    #[default]
    None,
    /// virtio-net.
    Net {
        /// Queue pairs the driver asked for (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; 1 before).
        active_pairs: u16,
        /// The config space's status field (link up; announce pending).
        status: u16,
    },
    /// virtio-scsi: the LUNs it has now and the events the guest has not been given.
    Scsi(scsi::ScsiState),
}

impl DeviceState {
    /// What kind of device the state is for, in words.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceState::None => "stateless",
            DeviceState::Net { .. } => "network",
            DeviceState::Scsi(_) => "SCSI",
        }
    }
}

/// Why a device's saved state does not fit the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// State of another kind of device.
    #[error("{saved} device state for a {device} device")]
    WrongKind {
        /// The saved state's kind.
        saved: &'static str,
        /// The device's.
        device: &'static str,
    },
    /// A saved value the device cannot take.
    #[error("saved {what} {value} does not fit the device (at most {max})")]
    OutOfRange {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
        /// The largest the device takes.
        max: u64,
    },
    /// The SCSI controller's saved LUN set is not the one it was built with.
    #[error("the saved LUN set {saved:?} is not the controller's {here:?}")]
    LunSet {
        /// The LUNs saved.
        saved: Vec<u16>,
        /// The LUNs here.
        here: Vec<u16>,
    },
}

/// What a device's backend can fail with.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The disk image.
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    /// The image is not the one the device was created with.
    #[error("disk {path} changed size from {was} to {now} bytes while released")]
    Resized {
        /// The image.
        path: std::path::PathBuf,
        /// Size before.
        was: u64,
        /// Size now.
        now: u64,
    },
}

/// The guest memory a chain lets the device write, to be marked dirty once written (the
/// dirty log a migration reads sees only what vCPUs write).
pub(crate) struct WritableRanges(Vec<(u64, u32)>);

impl WritableRanges {
    /// The chain's writable descriptors.
    pub(crate) fn of(
        chain: &virtio_queue::DescriptorChain<&crate::memory::GuestMemoryMmap>,
    ) -> Self {
        WritableRanges(
            chain
                .clone()
                .writable()
                .map(|d| (d.addr().0, d.len()))
                .collect(),
        )
    }

    /// Marks them dirty in `ram`.
    pub(crate) fn mark(&self, ram: &GuestRam) {
        for &(a, l) in &self.0 {
            ram.mark_dirty(a, u64::from(l));
        }
    }
}

/// Reads `data.len()` bytes at `offset` of `config` (zeros past its end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Saved state of one virtqueue (the ring addresses and positions; the rings themselves are
/// in guest memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// Whether the driver enabled it.
    pub ready: bool,
    /// Descriptor table, available ring, used ring (guest-physical).
    pub desc_table: u64,
    /// Available ring.
    pub avail_ring: u64,
    /// Used ring.
    pub used_ring: u64,
    /// Next available entry the device will take.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
    /// Whether `VIRTIO_F_RING_EVENT_IDX` is in use.
    pub event_idx: bool,
}
