//! The control messages, typed: one enum, written by [`send`] and read by [`recv`] — the only
//! place that knows their payloads. Page data is not a message: PAGES and ZERO_PAGES frames
//! are read as [`Received::Pages`] and handed to [`super::pages::PageReader`] by the caller.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::frame::{self, Header, Kind};
use super::{MigrationError, MAGIC, MIN_VERSION, VERSION};

/// What the source tells the destination in setup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// The VM's config and boot kind (JSON, the state file's CONF section).
    pub config_json: Vec<u8>,
    /// The CPUID the guest sees (vCPU 0), for the destination's compatibility check.
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// Connections the memory travels over (1 = only this one).
    pub connections: u8,
    /// Identifies this migration's additional connections (their JOIN).
    pub session: [u8; 16],
}

/// What the destination says when the state is loaded (READY).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Microseconds from the last byte of STATE to READY: decoding the state and building
    /// the VM (KVM VM, vCPUs, irqchip, devices, disks opened).
    pub restore_us: u64,
}

/// What the destination says once the VM runs there (RESUMED).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// When the first vCPU entered the guest on the destination (µs since the Unix epoch;
    /// 0: not seen, e.g. the VM was taken over paused).
    pub first_entry_us: u64,
    /// Microseconds from COMMIT received to the vCPUs let go.
    pub resume_us: u64,
}

/// Every control message of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Source → destination: the VM to receive.
    Setup(Box<Setup>),
    /// Destination → source: ready to receive.
    Accept,
    /// Destination → source: refused, with the reason.
    Refuse(String),
    /// Source → destination, first on each additional connection.
    Join {
        /// The migration's session id (from SETUP).
        session: [u8; 16],
        /// This connection's index (1 … connections − 1).
        lane: u8,
    },
    /// Source → destination: end of a pre-copy round.
    RoundEnd(u32),
    /// Source → destination, on each additional connection: no more pages on it.
    DataEnd,
    /// Source → destination: the postcard-encoded `VmSnapshot` (vCPUs, irqchip, clock,
    /// devices), kept encoded so that the receiver can time its decoding as restore work.
    State(Vec<u8>),
    /// Destination → source: everything loaded, vCPUs created and paused.
    Ready(Ready),
    /// Source → destination: ownership moves now; how long to watch for the guest's first
    /// console line (ms).
    Commit {
        /// Watch time in ms (≤ [`crate::dest::MAX_OUTPUT_WATCH_MS`]).
        watch_ms: u32,
    },
    /// Destination → source: resumed.
    Resumed(Resumed),
    /// Destination → source, after RESUMED: when the guest's first console line there ended
    /// (µs since the Unix epoch), or `None` when none came within the watch time.
    FirstOutput(Option<u64>),
    /// Source → destination: discard everything (the reason).
    Cancel(String),
    /// Either way: failing (the reason).
    Error(String),
    /// Source → destination, right before COMMIT: are you still there?
    Ping,
    /// Destination → source: yes.
    Pong,
}

/// What [`recv`] read: a control message, or the header of a page frame whose body the
/// caller reads (into guest memory).
#[derive(Debug)]
pub enum Received {
    /// A control message.
    Message(Message),
    /// A PAGES or ZERO_PAGES frame, its body still on the connection.
    Pages(Header),
}

fn postcard<T: Serialize>(v: &T) -> Result<Vec<u8>, MigrationError> {
    postcard::to_stdvec(v).map_err(|e| MigrationError::Protocol(format!("encoding: {e}")))
}

fn depostcard<'a, T: Deserialize<'a>>(kind: Kind, b: &'a [u8]) -> Result<T, MigrationError> {
    postcard::from_bytes(b).map_err(|e| MigrationError::Corrupt(format!("{kind:?}: {e}")))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fixed<const N: usize>(kind: Kind, b: &[u8]) -> Result<[u8; N], MigrationError> {
    <[u8; N]>::try_from(b).map_err(|_| {
        MigrationError::Corrupt(format!(
            "{kind:?} payload of {} bytes, {N} expected",
            b.len()
        ))
    })
}

impl Message {
    /// The frame kind this message travels in.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Setup(_) => Kind::Setup,
            Message::Accept => Kind::Accept,
            Message::Refuse(_) => Kind::Refuse,
            Message::Join { .. } => Kind::Join,
            Message::RoundEnd(_) => Kind::RoundEnd,
            Message::DataEnd => Kind::DataEnd,
            Message::State(_) => Kind::State,
            Message::Ready(_) => Kind::Ready,
            Message::Commit { .. } => Kind::Commit,
            Message::Resumed(_) => Kind::Resumed,
            Message::FirstOutput(_) => Kind::FirstOutput,
            Message::Cancel(_) => Kind::Cancel,
            Message::Error(_) => Kind::Error,
            Message::Ping => Kind::Ping,
            Message::Pong => Kind::Pong,
        }
    }

    /// The payload (the state is not copied: it is the largest message, sent in the downtime).
    fn encode(&self) -> Result<std::borrow::Cow<'_, [u8]>, MigrationError> {
        if let Message::State(s) = self {
            return Ok(std::borrow::Cow::Borrowed(s));
        }
        Ok(std::borrow::Cow::Owned(match self {
            Message::Setup(s) => postcard(s.as_ref())?,
            Message::Accept | Message::DataEnd | Message::Ping | Message::Pong => Vec::new(),
            Message::Refuse(r) | Message::Cancel(r) | Message::Error(r) => r.as_bytes().to_vec(),
            Message::Join { session, lane } => {
                let mut b = session.to_vec();
                b.push(*lane);
                b
            }
            Message::RoundEnd(r) => r.to_le_bytes().to_vec(),
            Message::State(_) => Vec::new(), // borrowed above
            Message::Ready(r) => postcard(r)?,
            Message::Commit { watch_ms } => watch_ms.to_le_bytes().to_vec(),
            Message::Resumed(r) => postcard(r)?,
            Message::FirstOutput(t) => t.unwrap_or(0).to_le_bytes().to_vec(),
        }))
    }

    /// The message of a `kind` frame with payload `b` (not a page frame).
    fn decode(kind: Kind, b: &[u8]) -> Result<Message, MigrationError> {
        Ok(match kind {
            Kind::Setup => Message::Setup(Box::new(depostcard(kind, b)?)),
            Kind::Accept => Message::Accept,
            Kind::Refuse => Message::Refuse(text(b)),
            Kind::Join => {
                let j: [u8; 17] = fixed(kind, b)?;
                let mut session = [0u8; 16];
                session.copy_from_slice(&j[..16]);
                Message::Join {
                    session,
                    lane: j[16],
                }
            }
            Kind::RoundEnd => Message::RoundEnd(u32::from_le_bytes(fixed(kind, b)?)),
            Kind::DataEnd => Message::DataEnd,
            Kind::State => Message::State(b.to_vec()),
            Kind::Ready => Message::Ready(depostcard(kind, b)?),
            Kind::Commit => Message::Commit {
                watch_ms: u32::from_le_bytes(fixed(kind, b)?),
            },
            Kind::Resumed => Message::Resumed(depostcard(kind, b)?),
            Kind::FirstOutput => {
                let t = u64::from_le_bytes(fixed(kind, b)?);
                Message::FirstOutput((t != 0).then_some(t))
            }
            Kind::Cancel => Message::Cancel(text(b)),
            Kind::Error => Message::Error(text(b)),
            Kind::Ping => Message::Ping,
            Kind::Pong => Message::Pong,
            Kind::Hello | Kind::Pages | Kind::ZeroPages => {
                return Err(MigrationError::Corrupt(format!(
                    "{kind:?} is not a control message"
                )))
            }
        })
    }

    /// The message's name as the protocol document spells it.
    pub fn name(&self) -> String {
        format!("{:?}", self.kind()).to_uppercase()
    }
}

/// Writes `m` (not flushed); returns the bytes it took on the wire.
pub fn send<W: Write>(w: &mut W, m: &Message) -> Result<u64, MigrationError> {
    let payload = m.encode()?;
    frame::write(w, m.kind(), 0, &[&payload])?;
    Ok((frame::HEADER_LEN + payload.len() + frame::TRAILER_LEN) as u64)
}

/// Reads the next frame: a control message whole, or a page frame's header. `buf` is reused.
pub fn recv<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<Received, MigrationError> {
    let head = frame::read_header(r)?;
    if matches!(head.kind, Kind::Pages | Kind::ZeroPages) {
        return Ok(Received::Pages(head));
    }
    frame::read_body(r, head, buf)?;
    Ok(Received::Message(Message::decode(head.kind, buf)?))
}

/// Reads the next frame, which must be a control message.
pub fn recv_message<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<Message, MigrationError> {
    match recv(r, buf)? {
        Received::Message(m) => Ok(m),
        Received::Pages(h) => Err(MigrationError::Corrupt(format!(
            "unexpected {:?} frame",
            h.kind
        ))),
    }
}

/// The error for a message that has no place at this point of the exchange.
pub fn unexpected(expected: &str, got: &Message) -> MigrationError {
    match got {
        Message::Error(why) => MigrationError::Peer(why.clone()),
        Message::Refuse(why) => MigrationError::Refused(why.clone()),
        m => MigrationError::Corrupt(format!("expected {expected}, got {}", m.name())),
    }
}

/// Sends HELLO and checks the peer's.
pub fn handshake<S: Read + Write>(s: &mut S) -> Result<(), MigrationError> {
    let mut hello = Vec::with_capacity(12);
    hello.extend_from_slice(&MAGIC);
    hello.extend_from_slice(&VERSION.to_le_bytes());
    hello.extend_from_slice(&MIN_VERSION.to_le_bytes());
    frame::write(s, Kind::Hello, 0, &[&hello])?;
    s.flush()?;
    // The header by hand first: a peer of another protocol gets a clear error, not a
    // checksum complaint.
    let mut head = [0u8; frame::HEADER_LEN];
    s.read_exact(&mut head)?;
    if head[0] == 0x16 && head[1] == 0x03 {
        return Err(MigrationError::Protocol(
            "the peer opened a TLS session but this side runs without TLS (--insecure)".into(),
        ));
    }
    if head[0] != Kind::Hello as u8
        || head[1..4] != [0, 0, 0]
        || u32::from_le_bytes([head[4], head[5], head[6], head[7]]) != 12
    {
        return Err(MigrationError::Protocol(
            "the peer did not start with a Ferry HELLO".into(),
        ));
    }
    let mut buf = vec![0u8; 12];
    s.read_exact(&mut buf)?;
    let mut h = Header {
        kind: Kind::Hello,
        flags: 0,
        len: 12,
    }
    .hasher();
    h.update(&buf);
    if frame::check_trailer(s, h, Kind::Hello).is_err() || buf[..8] != MAGIC {
        return Err(MigrationError::Protocol("bad HELLO".into()));
    }
    let peer = u16::from_le_bytes([buf[8], buf[9]]);
    let peer_min = u16::from_le_bytes([buf[10], buf[11]]);
    if peer < MIN_VERSION || peer_min > VERSION {
        return Err(MigrationError::Protocol(format!(
            "peer speaks version {peer} (accepts {peer_min}+), this side speaks {VERSION} (accepts {MIN_VERSION}+)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Message> {
        vec![
            Message::Setup(Box::new(Setup {
                config_json: b"{}".to_vec(),
                cpuid: Vec::new(),
                connections: 3,
                session: [9; 16],
            })),
            Message::Accept,
            Message::Refuse("no room".into()),
            Message::Join {
                session: [7; 16],
                lane: 2,
            },
            Message::RoundEnd(12),
            Message::DataEnd,
            Message::State(vec![1, 2, 3]),
            Message::Ready(Ready { restore_us: 1234 }),
            Message::Commit { watch_ms: 500 },
            Message::Resumed(Resumed {
                first_entry_us: 1_700_000_000_000_000,
                resume_us: 80,
            }),
            Message::FirstOutput(Some(42)),
            Message::FirstOutput(None),
            Message::Cancel("by request".into()),
            Message::Error("disk in use".into()),
            Message::Ping,
            Message::Pong,
        ]
    }

    #[test]
    fn every_message_round_trips_through_one_frame() {
        for m in every_message() {
            let mut wire = Vec::new();
            let n = send(&mut wire, &m).unwrap();
            assert_eq!(n, wire.len() as u64);
            let mut buf = Vec::new();
            let got = recv_message(&mut wire.as_slice(), &mut buf).unwrap();
            assert_eq!(got, m);
        }
    }

    #[test]
    fn payloads_of_the_wrong_size_are_refused() {
        for kind in [Kind::Join, Kind::RoundEnd, Kind::Commit, Kind::FirstOutput] {
            let mut wire = Vec::new();
            frame::write(&mut wire, kind, 0, &[&[1, 2, 3]]).unwrap();
            assert!(matches!(
                recv_message(&mut wire.as_slice(), &mut Vec::new()),
                Err(MigrationError::Corrupt(_))
            ));
        }
        let mut wire = Vec::new();
        frame::write(&mut wire, Kind::Setup, 0, &[&[0xff; 5]]).unwrap();
        assert!(matches!(
            recv_message(&mut wire.as_slice(), &mut Vec::new()),
            Err(MigrationError::Corrupt(_))
        ));
    }

    #[test]
    fn a_page_frame_is_left_to_the_caller() {
        let mut wire = Vec::new();
        frame::write(&mut wire, Kind::ZeroPages, 0, &[&[0, 0, 0, 0]]).unwrap();
        match recv(&mut wire.as_slice(), &mut Vec::new()).unwrap() {
            Received::Pages(h) => assert_eq!(h.kind, Kind::ZeroPages),
            m => panic!("{m:?}"),
        }
    }

    /// A stream that replays a peer's bytes and swallows what this side writes.
    struct Peer(std::io::Cursor<Vec<u8>>);
    impl Read for Peer {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(b)
        }
    }
    impl Write for Peer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn hello(version: u16, min: u16) -> Vec<u8> {
        let mut p = MAGIC.to_vec();
        p.extend_from_slice(&version.to_le_bytes());
        p.extend_from_slice(&min.to_le_bytes());
        let mut wire = Vec::new();
        frame::write(&mut wire, Kind::Hello, 0, &[&p]).unwrap();
        wire
    }

    #[test]
    fn hello_accepts_this_version_and_refuses_older_peers_clearly() {
        handshake(&mut Peer(std::io::Cursor::new(hello(VERSION, MIN_VERSION)))).unwrap();
        match handshake(&mut Peer(std::io::Cursor::new(hello(4, 4)))) {
            Err(MigrationError::Protocol(m)) => {
                assert!(m.contains("peer speaks version 4"), "{m}")
            }
            r => panic!("{r:?}"),
        }
        let tls = vec![0x16, 0x03, 0x01, 0, 0, 0, 0, 0];
        assert!(matches!(
            handshake(&mut Peer(std::io::Cursor::new(tls))),
            Err(MigrationError::Protocol(m)) if m.contains("TLS")
        ));
        let mut bad = hello(VERSION, MIN_VERSION);
        bad[10] ^= 1;
        assert!(matches!(
            handshake(&mut Peer(std::io::Cursor::new(bad))),
            Err(MigrationError::Protocol(m)) if m.contains("bad HELLO")
        ));
    }
}
