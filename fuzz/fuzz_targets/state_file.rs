//! A hostile state file against the restore path's reader (`ferry vm restore`): header,
//! CONF, the vCPU, VM and device sections, and MEMR into guest RAM of the size the file's
//! config declares — everything `Machine::restore` does before it creates a KVM VM. The reader
//! must not panic, write outside guest RAM, or allocate from a length it has not checked.
//!
//! The first byte picks the mode: even, the rest is the file as it is (header, section
//! lengths, checksums); odd, the rest is five `[len u16 LE][payload]` chunks that the harness
//! writes as the file's sections but END with a valid header and checksums, so that the fuzzer
//! reaches the decoders behind them.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use vmm::machine::{DeviceStates, SavedConfig, VmSnapshot};
use vmm::memory::GuestRam;
use vmm::snapshot::{SnapshotReader, SnapshotWriter, MAX_CONFIG, SECTIONS};

/// Larger guests are not built from fuzzer input (a real restore would: RAM is sparse).
const MAX_RAM: u64 = 64 << 20;

/// A state file of the six sections cut from `data`, with a valid header and checksums.
fn framed(mut data: &[u8]) -> Vec<u8> {
    let Ok(mut w) = SnapshotWriter::new(Vec::new()) else {
        return Vec::new();
    };
    // Every section but END, which `finish` writes.
    for &tag in &SECTIONS[..SECTIONS.len() - 1] {
        let len = match data {
            [a, b, rest @ ..] => {
                data = rest;
                usize::from(u16::from_le_bytes([*a, *b]))
            }
            _ => 0,
        };
        let payload = &data[..len.min(data.len())];
        data = &data[payload.len()..];
        if w.section(tag, payload).is_err() {
            break;
        }
    }
    w.finish().unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        framed(rest)
    };
    let Ok(mut r) = SnapshotReader::new(Cursor::new(&file[..])) else {
        return;
    };
    let Ok(conf) = r.section(MAX_CONFIG) else {
        return;
    };
    let Ok(saved) = SavedConfig::decode(&conf) else {
        return;
    };
    if saved.config.validate().is_err() {
        return;
    }
    let (Ok(vcpus), Ok(vm), Ok(devices)) = (r.decode(), r.decode(), r.decode::<DeviceStates>())
    else {
        return;
    };
    let snap = VmSnapshot { vcpus, vm, devices };
    if snap.check(&saved.config).is_err() {
        return;
    }
    let size = saved.config.memory_bytes();
    if size > MAX_RAM {
        return;
    }
    let Ok(ram) = GuestRam::new("fuzz", size) else {
        return;
    };
    if r.memory(&ram).is_ok() {
        let _ = r.finish();
    }
});
