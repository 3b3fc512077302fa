//! A hostile migration source against the receiving side: the bytes a destination reads from
//! its connections (frames, page batches, ZERO_PAGES lists, control messages, SETUP's config
//! and STATE's encoded VM) go through the receiver's own parsers into a small guest RAM.
//!
//! The first byte picks the mode: even, the rest is the raw stream (the frame layer itself,
//! its lengths and CRCs); odd, the rest is a list of `[kind u8][flags u8][len u16 LE][payload]`
//! that the harness frames with valid CRCs first, so that the fuzzer reaches what lies behind
//! the checksum (page indexes, compression, postcard). The receiver must not panic, write
//! outside guest RAM, or allocate from a length it has not checked.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use migration::protocol::frame::{self, Kind};
use migration::protocol::message::recv;
use migration::protocol::pages::PageReader;
use migration::protocol::{Message, Received};
use vmm::machine::{SavedConfig, VmSnapshot};
use vmm::memory::GuestRam;

/// Guest RAM the pages land in (16 MiB, the smallest a VM has: page indexes beyond it must be
/// refused).
fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| GuestRam::new("fuzz", 16 << 20).expect("guest RAM for the fuzzer"))
}

/// Frames the chunks of `data` with valid headers and CRCs.
fn framed(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let (kind, flags) = (data[0], data[1]);
        let len = usize::from(u16::from_le_bytes([data[2], data[3]]));
        data = &data[4..];
        let payload = &data[..len.min(data.len())];
        data = &data[payload.len()..];
        let kind = Kind::from_u8(kind).unwrap_or(Kind::Pages);
        if frame::write(&mut out, kind, flags, &[payload]).is_err() {
            break;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        framed(rest)
    };
    let mut r = Cursor::new(stream);
    let mut buf = Vec::new();
    let mut pages = PageReader::default();
    let mut config = None;
    for _ in 0..64 {
        match recv(&mut r, &mut buf) {
            Ok(Received::Pages(head)) => {
                if pages.receive(&mut r, head, ram()).is_err() {
                    return;
                }
            }
            Ok(Received::Message(Message::Setup(s))) => {
                config = SavedConfig::decode(&s.config_json)
                    .ok()
                    .filter(|c| c.config.validate().is_ok());
            }
            Ok(Received::Message(Message::State(state))) => {
                // What the destination does with STATE before it touches KVM.
                if let Ok(snap) = postcard::from_bytes::<VmSnapshot>(&state) {
                    if let Some(c) = &config {
                        let _ = snap.check(&c.config);
                    }
                }
            }
            Ok(Received::Message(_)) => {}
            Err(_) => return,
        }
    }
});
