//! A hostile driver against virtio-net: the input's first byte picks the features the driver
//! takes (multi-queue, offloads, guest announce) and a queue (a receive, transmit or control
//! queue, or one that is unused without multi-queue); the rest describes descriptor tables,
//! available rings and their contents (frames, control commands). One device on one TAP
//! (needs root) serves every input, reset and set up again in between as a reloading driver
//! would. The device must not panic, touch memory outside guest RAM, or use more buffers than
//! it was given (checked by the driver).
#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::tap::Tap;
use vmm::devices::virtio::testing::Driver;

static DEVICE: Mutex<Option<Driver>> = Mutex::new(None);

/// Feature bits the input may withhold.
const MQ: u64 = 1 << 22;
const OFFLOADS: u64 = 0b1_1001_1000_0011; // CSUM GUEST_CSUM GUEST_TSO4/6 HOST_TSO4/6
const GUEST_ANNOUNCE: u64 = 1 << 21;

fuzz_target!(|data: &[u8]| {
    let first = data.first().copied().unwrap_or(0);
    let accept = move |offered: u64| {
        let mut f = offered;
        for (bit, mask) in [(0x10, MQ), (0x20, OFFLOADS), (0x40, GUEST_ANNOUNCE)] {
            if first & bit != 0 {
                f &= !mask;
            }
        }
        f
    };
    let mut slot = DEVICE.lock().unwrap_or_else(|p| p.into_inner());
    let d = match slot.as_mut() {
        Some(d) => {
            d.reset(accept);
            d
        }
        None => {
            let name = format!("fez{}", std::process::id() % 1_000_000);
            let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 9], 1500, None, 2).expect("tap");
            let net = Net::new(tap, [0x52, 0x54, 0, 0, 0, 9], 1500, true).expect("net");
            slot.insert(Driver::new("fuzz-net", Box::new(net), accept))
        }
    };
    // rx0 tx0 rx1 tx1 ctrl (without multi-queue: rx0 tx0 ctrl, the rest unused).
    let queue = u16::from(first & 0x0f) % 5;
    d.fuzz(queue, data.get(1..).unwrap_or_default());
    d.t.poll_input(0);
    d.t.poll_input(1);
    d.t.announce();
});
