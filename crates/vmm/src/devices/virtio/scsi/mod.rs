//! virtio-scsi: a SCSI controller with disks (LUNs 0 to 255 on target 0) that can be added and
//! removed while the VM runs.
//!
//! Queues: 0 control (task management, asynchronous-notification queries), 1 events, then one
//! request queue per vCPU. Requests run to completion on the device's I/O thread, so a task
//! management request finds nothing in flight: aborts and resets complete at once.
//!
//! Hot-plug: adding a LUN opens its disk under its lock before anything else happens, then
//! tells the guest through the event queue (`VIRTIO_SCSI_T_TRANSPORT_RESET`,
//! `VIRTIO_SCSI_EVT_RESET_RESCAN`; Linux's driver then scans that LUN). Removing one takes the
//! device lock, so the requests in flight have completed; the disk is flushed and closed (its
//! lock released) and the guest is told (`…_RESET_REMOVED`). An event that finds no buffer in
//! the event queue is not lost: the next buffer carries `VIRTIO_SCSI_T_EVENTS_MISSED`, on which
//! Linux rescans the whole controller.

pub mod commands;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_scsi as vs;
use virtio_queue::{DescriptorChain, Queue, QueueT};

use self::commands::{Context, Lun, Sense};
use super::{read_config_bytes, BackendError, DeviceState, DeviceStateError, VirtioDevice};
use crate::disk::{Disk, DiskError};
use crate::memory::{GuestMemoryMmap, GuestRam};
use crate::persist::Persist;

/// virtio device ID of a SCSI host.
pub const DEVICE_TYPE: u32 = 8;
/// LUNs a controller holds (0 to 255, on target 0).
pub const MAX_LUNS: u16 = 256;
/// The control queue.
pub const CONTROL_QUEUE: usize = 0;
/// The event queue.
pub const EVENT_QUEUE: usize = 1;
/// The first request queue.
pub const FIRST_REQUEST_QUEUE: usize = 2;
/// Most request queues (one per vCPU).
pub const MAX_REQUEST_QUEUES: u16 = 32;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 128;

/// `VIRTIO_SCSI_F_HOTPLUG`: the device reports LUNs added and removed.
const F_HOTPLUG: u64 = 1 << vs::VIRTIO_SCSI_F_HOTPLUG;

const CDB_SIZE: usize = vs::VIRTIO_SCSI_CDB_SIZE as usize;
const SENSE_SIZE: usize = vs::VIRTIO_SCSI_SENSE_SIZE as usize;
/// lun[8], id, task_attr, prio, crn, cdb.
const REQUEST_HEADER: usize = 8 + 8 + 3 + CDB_SIZE;
/// sense_len, residual, status_qualifier, status, response, sense.
const RESPONSE_HEADER: usize = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE;
/// Commands per LUN the guest may queue.
const CMD_PER_LUN: u32 = 128;

/// Response codes (`VIRTIO_SCSI_S_*`: all below 256).
const S_OK: u8 = vs::VIRTIO_SCSI_S_OK as u8;
const S_OVERRUN: u8 = vs::VIRTIO_SCSI_S_OVERRUN as u8;
const S_BAD_TARGET: u8 = vs::VIRTIO_SCSI_S_BAD_TARGET as u8;
const S_FAILURE: u8 = vs::VIRTIO_SCSI_S_FAILURE as u8;
const S_FUNCTION_REJECTED: u8 = vs::VIRTIO_SCSI_S_FUNCTION_REJECTED as u8;
const S_INCORRECT_LUN: u8 = vs::VIRTIO_SCSI_S_INCORRECT_LUN as u8;

/// Control request types.
const T_TMF: u32 = vs::VIRTIO_SCSI_T_TMF;
const T_AN_QUERY: u32 = vs::VIRTIO_SCSI_T_AN_QUERY;
const T_AN_SUBSCRIBE: u32 = vs::VIRTIO_SCSI_T_AN_SUBSCRIBE;
/// The last task management function (the ones before it are all answered).
const TMF_QUERY_TASK_SET: u32 = vs::VIRTIO_SCSI_T_TMF_QUERY_TASK_SET;

/// Events.
const T_TRANSPORT_RESET: u32 = vs::VIRTIO_SCSI_T_TRANSPORT_RESET;
const T_EVENTS_MISSED: u32 = vs::VIRTIO_SCSI_T_EVENTS_MISSED;
const EVT_RESET_RESCAN: u32 = vs::VIRTIO_SCSI_EVT_RESET_RESCAN;
const EVT_RESET_REMOVED: u32 = vs::VIRTIO_SCSI_EVT_RESET_REMOVED;
/// Events kept for the guest before they become one "events missed".
const MAX_PENDING_EVENTS: usize = 64;

/// A LUN as `disk list` shows it and a saved controller remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunInfo {
    /// The LUN (0 to 255).
    pub lun: u16,
    /// The image or host block device.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub readonly: bool,
    /// Size in bytes.
    pub size: u64,
}

/// A hot-plug event the guest has not been given yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScsiEvent {
    /// The LUN.
    pub lun: u16,
    /// Removed (otherwise added).
    pub removed: bool,
}

/// A controller's saved state: its LUNs and the events not yet delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScsiState {
    /// Request queues (one per vCPU).
    pub request_queues: u16,
    /// The LUNs, ascending.
    pub luns: Vec<LunInfo>,
    /// Events waiting for a buffer in the event queue.
    pub pending: Vec<ScsiEvent>,
    /// Events were dropped for want of buffers: the next buffer says so.
    pub missed: bool,
}

/// What adding or removing a LUN, or building a controller, can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ScsiError {
    /// The LUN is outside 0 to 255.
    #[error("LUN {0} is out of range: a controller has LUNs 0 to {max}", max = MAX_LUNS - 1)]
    BadLun(u16),
    /// The LUN holds a disk already.
    #[error("LUN {0} is taken by {1}")]
    LunTaken(u16, PathBuf),
    /// Every LUN holds a disk.
    #[error("the SCSI controller is full: all {MAX_LUNS} LUNs hold a disk")]
    Full,
    /// The disk is on the controller already.
    #[error("{0} is LUN {1} of this VM already")]
    AlreadyAttached(PathBuf, u16),
    /// No disk at that LUN.
    #[error("the SCSI controller has no LUN {0}")]
    NoSuchLun(u16),
    /// No LUN holds that disk.
    #[error("no LUN of the SCSI controller holds {0}")]
    NoSuchDisk(PathBuf),
    /// The disk could not be opened, flushed or closed.
    #[error("LUN {lun}: {source}")]
    Disk {
        /// The LUN.
        lun: u16,
        /// Why.
        #[source]
        source: DiskError,
    },
    /// A disk is not the size the saved controller knew.
    #[error("LUN {lun}: {path} changed size from {was} to {now} bytes")]
    Resized {
        /// The LUN.
        lun: u16,
        /// The disk.
        path: PathBuf,
        /// Size saved.
        was: u64,
        /// Size now.
        now: u64,
    },
    /// A request queue count outside 1 to the vCPU limit.
    #[error("{0} request queues: a controller has 1 to {MAX_REQUEST_QUEUES}")]
    BadQueues(u16),
}

/// A virtio-scsi controller.
pub struct Scsi {
    luns: BTreeMap<u16, Lun>,
    queue_sizes: Vec<u16>,
    config: [u8; 36],
    acked: u64,
    pending: VecDeque<ScsiEvent>,
    missed: bool,
    buf: Vec<u8>,
    /// Data read and written for the guest, all LUNs.
    io: super::IoTotals,
}

impl Scsi {
    /// A controller without LUNs, with `request_queues` request queues (1 to 32).
    pub fn new(request_queues: u16) -> Result<Scsi, ScsiError> {
        if !(1..=MAX_REQUEST_QUEUES).contains(&request_queues) {
            return Err(ScsiError::BadQueues(request_queues));
        }
        let mut config = [0u8; 36];
        let mut put = |at: usize, v: u32| config[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(0, u32::from(request_queues)); // num_queues
        put(4, u32::from(QUEUE_SIZE) - 2); // seg_max
        put(8, commands::MAX_TRANSFER); // max_sectors
        put(12, CMD_PER_LUN); // cmd_per_lun
        put(16, 16); // event_info_size
        put(20, SENSE_SIZE as u32); // sense_size
        put(24, CDB_SIZE as u32); // cdb_size
                                  // max_channel 0, max_target 0 (u16 each at 28, 30), max_lun:
        put(32, u32::from(MAX_LUNS - 1));
        Ok(Scsi {
            luns: BTreeMap::new(),
            queue_sizes: vec![QUEUE_SIZE; FIRST_REQUEST_QUEUE + usize::from(request_queues)],
            config,
            acked: 0,
            pending: VecDeque::new(),
            missed: false,
            buf: Vec::new(),
            io: super::IoTotals::default(),
        })
    }

    /// Request queues.
    pub fn request_queues(&self) -> u16 {
        u16::try_from(self.queue_sizes.len() - FIRST_REQUEST_QUEUE).unwrap_or(u16::MAX)
    }

    /// The LUNs, ascending.
    pub fn luns(&self) -> Vec<LunInfo> {
        self.luns.iter().map(|(&n, l)| l.info(n)).collect()
    }

    /// The LUN that holds `path`, if any.
    pub fn lun_of(&self, path: &Path) -> Option<u16> {
        self.luns
            .iter()
            .find(|(_, l)| l.path() == path)
            .map(|(&n, _)| n)
    }

    /// Checks `disk` can go to `lun` (the lowest free one if `None`) and says which LUN that is.
    pub fn check_add(&self, lun: Option<u16>, path: &Path) -> Result<u16, ScsiError> {
        if let Some(n) = self.lun_of(path) {
            return Err(ScsiError::AlreadyAttached(path.to_path_buf(), n));
        }
        match lun {
            Some(n) if n >= MAX_LUNS => Err(ScsiError::BadLun(n)),
            Some(n) => match self.luns.get(&n) {
                Some(l) => Err(ScsiError::LunTaken(n, l.path().to_path_buf())),
                None => Ok(n),
            },
            None => (0..MAX_LUNS)
                .find(|n| !self.luns.contains_key(n))
                .ok_or(ScsiError::Full),
        }
    }

    /// Puts `disk` at `lun` (the lowest free one if `None`) without telling the guest (a disk
    /// the VM starts with). Returns the LUN.
    pub fn attach(&mut self, lun: Option<u16>, disk: Disk) -> Result<u16, ScsiError> {
        let n = self.check_add(lun, disk.path())?;
        self.luns.insert(n, Lun::new(disk));
        Ok(n)
    }

    /// Adds `disk` at `lun` (the lowest free one if `None`) and queues the event that tells the
    /// guest; the transport delivers it (see [`super::mmio::MmioTransport::kick_queue`] on
    /// [`EVENT_QUEUE`]). Returns the LUN.
    pub fn plug(&mut self, lun: Option<u16>, disk: Disk) -> Result<u16, ScsiError> {
        let n = self.attach(lun, disk)?;
        self.queue_event(ScsiEvent {
            lun: n,
            removed: false,
        });
        Ok(n)
    }

    /// Removes LUN `lun`: its disk flushed and closed, its lock released, and the event queued.
    /// If the flush fails the LUN stays as it was.
    pub fn unplug(&mut self, lun: u16) -> Result<LunInfo, ScsiError> {
        let l = self.luns.get_mut(&lun).ok_or(ScsiError::NoSuchLun(lun))?;
        l.flush()
            .map_err(|source| ScsiError::Disk { lun, source })?;
        let info = l.info(lun);
        // Dropping it closes the disk, which releases the lock.
        self.luns.remove(&lun);
        self.queue_event(ScsiEvent { lun, removed: true });
        Ok(info)
    }

    fn queue_event(&mut self, e: ScsiEvent) {
        if self.acked & F_HOTPLUG == 0 {
            // The driver does not take events (or is not loaded): it scans when it starts.
            return;
        }
        if self.pending.len() >= MAX_PENDING_EVENTS {
            self.pending.clear();
            self.missed = true;
        } else {
            self.pending.push_back(e);
        }
    }

    /// Gives the guest what events there are buffers for; the rest become "missed".
    fn deliver_events(&mut self, queue: &mut Queue, ram: &GuestRam) -> bool {
        let mem = ram.memory();
        let mut used = false;
        while self.missed || !self.pending.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let (event, lun, reason) = if self.missed {
                (T_EVENTS_MISSED, 0, 0)
            } else {
                let Some(e) = self.pending.front().copied() else {
                    break;
                };
                let reason = if e.removed {
                    EVT_RESET_REMOVED
                } else {
                    EVT_RESET_RESCAN
                };
                (T_TRANSPORT_RESET, e.lun, reason)
            };
            let mut ev = [0u8; 16];
            ev[0..4].copy_from_slice(&event.to_le_bytes());
            ev[4] = 1;
            ev[7] = u8::try_from(lun).unwrap_or(u8::MAX);
            ev[12..16].copy_from_slice(&reason.to_le_bytes());
            let writable = super::WritableRanges::of(&chain);
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= ev.len() => w.write_all(&ev).is_ok(),
                _ => false,
            };
            writable.mark(ram);
            let len = if written { ev.len() as u32 } else { 0 };
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio-scsi: cannot return an event buffer: {e}");
                break;
            }
            used = true;
            if written {
                if self.missed {
                    self.missed = false;
                } else {
                    self.pending.pop_front();
                }
            }
        }
        if !self.pending.is_empty() {
            // No buffer for them: the guest will be told it missed events, and rescans.
            self.pending.clear();
            self.missed = true;
        }
        used
    }

    /// Runs one command request; returns the bytes written into the chain, or `None` when the
    /// chain has no room for a response.
    fn command(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, ram: &GuestRam) -> Option<u32> {
        let mem = ram.memory();
        let writable = super::WritableRanges::of(&chain);
        let mut r = chain.clone().reader(mem).ok()?;
        let mut w = chain.writer(mem).ok()?;
        if w.available_bytes() < RESPONSE_HEADER {
            return None;
        }
        let mut data_in = w.split_at(RESPONSE_HEADER).ok()?;
        let capacity_in = data_in.available_bytes();
        let mut resp = [0u8; RESPONSE_HEADER];
        let mut req = [0u8; REQUEST_HEADER];
        let (status, response, sense) = if r.read_exact(&mut req).is_err() {
            (0, S_OVERRUN, None)
        } else {
            let capacity_out = r.available_bytes();
            match address(&req[0..8]) {
                Address::BadTarget => (0, S_BAD_TARGET, None),
                Address::Lun(n) => {
                    let present: Vec<u16> = self.luns.keys().copied().collect();
                    let mut cx = Context {
                        buf: &mut self.buf,
                        present: &present,
                    };
                    let outcome = commands::execute(
                        self.luns.get(&n),
                        &req[19..19 + CDB_SIZE],
                        &mut r,
                        &mut data_in,
                        &mut cx,
                    );
                    // Data the device did not take (a write) or fill (a read).
                    let residual = if capacity_out > 0 {
                        r.available_bytes()
                    } else {
                        capacity_in - data_in.bytes_written()
                    };
                    resp[4..8].copy_from_slice(&u32::try_from(residual).unwrap_or(0).to_le_bytes());
                    if outcome.is_ok() {
                        let cdb = req[19];
                        if commands::is_read(cdb) {
                            self.io.disk_read_bytes += data_in.bytes_written() as u64;
                        } else if commands::is_write(cdb) {
                            self.io.disk_write_bytes +=
                                capacity_out.saturating_sub(r.available_bytes()) as u64;
                        }
                    }
                    match outcome {
                        Ok(()) => (commands::GOOD, S_OK, None),
                        Err(s) => (commands::CHECK_CONDITION, S_OK, Some(s)),
                    }
                }
            }
        };
        if let Some(s) = sense {
            let fixed = s.fixed();
            resp[0..4].copy_from_slice(&(fixed.len() as u32).to_le_bytes());
            resp[12..12 + fixed.len()].copy_from_slice(&fixed);
        }
        resp[10] = status;
        resp[11] = response;
        w.write_all(&resp).ok()?;
        let written = RESPONSE_HEADER + data_in.bytes_written();
        writable.mark(ram);
        u32::try_from(written).ok()
    }

    /// Runs one control request.
    fn control(&mut self, chain: DescriptorChain<&GuestMemoryMmap>, ram: &GuestRam) -> Option<u32> {
        let mem = ram.memory();
        let writable = super::WritableRanges::of(&chain);
        let mut r = chain.clone().reader(mem).ok()?;
        let mut w = chain.writer(mem).ok()?;
        let mut kind = [0u8; 4];
        r.read_exact(&mut kind).ok()?;
        let out: Vec<u8> = match u32::from_le_bytes(kind) {
            T_TMF => {
                // subtype, lun[8], tag; the response is one byte.
                let mut rest = [0u8; 4 + 8 + 8];
                r.read_exact(&mut rest).ok()?;
                let subtype = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let response = match address(&rest[4..12]) {
                    Address::BadTarget => S_BAD_TARGET,
                    Address::Lun(n) if !self.luns.contains_key(&n) => S_INCORRECT_LUN,
                    // Nothing is ever in flight: every abort or reset is already done, and
                    // no task is there to be found.
                    Address::Lun(_) if subtype <= TMF_QUERY_TASK_SET => S_OK,
                    Address::Lun(_) => S_FUNCTION_REJECTED,
                };
                vec![response]
            }
            T_AN_QUERY | T_AN_SUBSCRIBE => {
                // lun[8], event_requested; response: event_actual (none), response.
                let mut rest = [0u8; 8 + 4];
                r.read_exact(&mut rest).ok()?;
                let response = match address(&rest[0..8]) {
                    Address::BadTarget => S_BAD_TARGET,
                    Address::Lun(_) => S_OK,
                };
                vec![0, 0, 0, 0, response]
            }
            _ => vec![S_FAILURE],
        };
        if w.available_bytes() < out.len() {
            return None;
        }
        w.write_all(&out).ok()?;
        writable.mark(ram);
        u32::try_from(out.len()).ok()
    }

    fn state(&self) -> ScsiState {
        ScsiState {
            request_queues: self.request_queues(),
            luns: self.luns(),
            pending: self.pending.iter().copied().collect(),
            missed: self.missed,
        }
    }
}

/// Where a request is addressed.
enum Address {
    /// Not target 0 of this controller.
    BadTarget,
    /// LUN `n` of target 0 (present or not).
    Lun(u16),
}

/// Decodes virtio-scsi's 8-byte LUN field: 1, target, then a single-level LUN (peripheral or
/// flat addressing).
fn address(lun: &[u8]) -> Address {
    if lun[0] != 1 || lun[1] != 0 {
        return Address::BadTarget;
    }
    Address::Lun(u16::from(lun[2] & 0x3f) << 8 | u16::from(lun[3]))
}

impl VirtioDevice for Scsi {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        F_HOTPLUG
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn io(&self) -> super::IoTotals {
        self.io
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, ram: &GuestRam) -> bool {
        if index == EVENT_QUEUE {
            return self.deliver_events(queue, ram);
        }
        let mem = ram.memory();
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = if index == CONTROL_QUEUE {
                self.control(chain, ram)
            } else {
                self.command(chain, ram)
            };
            if let Err(e) = queue.add_used(mem, head, len.unwrap_or(0)) {
                tracing::warn!("virtio-scsi: cannot return a buffer: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn release(&mut self) -> Result<(), BackendError> {
        for l in self.luns.values_mut() {
            l.release()?;
        }
        Ok(())
    }

    fn reacquire(&mut self) -> Result<(), BackendError> {
        for l in self.luns.values_mut() {
            if let Some(now) = l.reacquire()? {
                return Err(BackendError::Resized {
                    path: l.path().to_path_buf(),
                    was: l.info(0).size,
                    now,
                });
            }
        }
        Ok(())
    }

    fn released(&self) -> bool {
        self.luns.values().any(Lun::released)
    }

    fn activate(&mut self, acked: u64) {
        self.acked = acked;
    }

    fn reset(&mut self) {
        // A driver starting over scans the controller: old events mean nothing to it.
        self.acked = 0;
        self.pending.clear();
        self.missed = false;
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Scsi(self.state())
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), DeviceStateError> {
        let DeviceState::Scsi(s) = state else {
            return Err(DeviceStateError::WrongKind {
                saved: state.kind(),
                device: "SCSI",
            });
        };
        let here: Vec<u16> = self.luns.keys().copied().collect();
        let saved: Vec<u16> = s.luns.iter().map(|l| l.lun).collect();
        if here != saved {
            return Err(DeviceStateError::LunSet { saved, here });
        }
        if s.pending.iter().any(|e| e.lun >= MAX_LUNS) || s.pending.len() > MAX_PENDING_EVENTS {
            return Err(DeviceStateError::OutOfRange {
                what: "pending SCSI events",
                value: s.pending.len() as u64,
                max: MAX_PENDING_EVENTS as u64,
            });
        }
        self.pending = s.pending.iter().copied().collect();
        self.missed = s.missed;
        Ok(())
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Persist for Scsi {
    type State = ScsiState;
    /// Nothing: the state names the disks, which are opened (under their locks) here.
    type Args<'a> = ();
    type Error = ScsiError;

    fn save(&self) -> ScsiState {
        self.state()
    }

    fn restore((): (), s: &ScsiState) -> Result<Scsi, ScsiError> {
        let mut scsi = Scsi::new(s.request_queues)?;
        for l in &s.luns {
            let disk = Disk::open(&l.path, l.readonly)
                .map_err(|source| ScsiError::Disk { lun: l.lun, source })?;
            if disk.size() != l.size {
                return Err(ScsiError::Resized {
                    lun: l.lun,
                    path: l.path.clone(),
                    was: l.size,
                    now: disk.size(),
                });
            }
            scsi.attach(Some(l.lun), disk)?;
        }
        // Events and the rest come with the transport's state (restore_state).
        Ok(scsi)
    }
}

/// Sense data of a command, for tests and tools that read a response.
pub fn sense_of(response: &[u8]) -> Option<Sense> {
    let len = u32::from_le_bytes(response.get(0..4)?.try_into().ok()?) as usize;
    let s = response.get(12..12 + len.min(SENSE_SIZE))?;
    (s.len() >= 14).then(|| Sense {
        key: s[2] & 0x0f,
        asc: s[12],
        ascq: s[13],
    })
}
