//! A hostile driver against virtio-net: the input picks a queue (receive, transmit or
//! control) and describes descriptor tables, available rings and their contents (frames,
//! control commands). Needs root for the TAP. The device must not panic, touch memory
//! outside guest RAM, or use more buffers than it was given (checked by the driver).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::net::Net;
use vmm::devices::virtio::tap::Tap;
use vmm::devices::virtio::testing::Driver;

fuzz_target!(|data: &[u8]| {
    let name = format!("fez{}", std::process::id() % 1_000_000);
    let queues = 1 + usize::from(data.first().is_some_and(|b| b & 0x80 != 0));
    let tap = Tap::create(&name, [0xfe, 0, 0, 0, 0, 9], 1500, None, queues).expect("tap");
    let net = Net::new(tap, [0x52, 0x54, 0, 0, 0, 9], 1500, true).expect("net");
    let mut d = Driver::new("fuzz-net", Box::new(net), |f| f);
    let queue = u16::from(data.first().copied().unwrap_or(0) & 0x7f) % (2 * queues as u16 + 1);
    d.fuzz(queue, data.get(1..).unwrap_or_default());
    d.t.poll_input(0);
});
