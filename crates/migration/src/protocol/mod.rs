//! The migration wire protocol (version 5), in layers:
//!
//! - [`frame`]: a frame's header, payload and CRC — nothing about what a payload means;
//! - [`message`]: the control messages as one typed enum, written and read in one place, and
//!   the HELLO handshake;
//! - [`pages`]: the page codec — page batches, compression, and the receiver's path from a
//!   frame into guest memory;
//! - [`socket`]: how a migration connection's TCP socket is set up.
//!
//! `docs/migration-protocol.md` is the written form.

mod error;
pub mod frame;
pub mod message;
pub mod pages;
pub mod socket;

pub use error::MigrationError;
pub use frame::Kind;
pub use message::{handshake, Message, Ready, Received, Resumed, Setup};
pub use pages::{Compression, Packer};
pub use socket::tune;

/// Protocol magic in `HELLO`.
pub const MAGIC: [u8; 8] = *b"FERRYMIG";
/// Protocol version this build speaks.
pub const VERSION: u16 = 5;
/// Oldest version this build accepts from a peer.
pub const MIN_VERSION: u16 = 5;
/// Largest payload accepted.
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// How long either side waits for the peer to read or write before giving up (a cut link).
pub const IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Most connections one migration may use.
pub const MAX_CONNECTIONS: u8 = 16;
/// How long the source waits for PONG before committing; no answer in time means the
/// destination or the link is gone, and the VM stays on the source.
pub const PRECOMMIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Pages per `PAGES` frame.
pub const BATCH_PAGES: usize = 256;
