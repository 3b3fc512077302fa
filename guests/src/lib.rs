//! Ferry's bare-metal test guests.
//!
//! The guests are small freestanding C programs entered by the VMM in 64-bit long mode (see
//! `docs/boot.md`). `build.rs` compiles them with the machine's `gcc`; this crate only tells
//! where the images are.

use std::path::PathBuf;

/// Path of the bare-metal dirtier image (`target/guests/dirtier.elf` is a copy of it).
///
/// The dirtier prints `beat <n> ok` (or `beat <n> BAD <reason>`) on the serial port; its
/// parameters come from the command line: `mb=<MiB> rate=<pages/s> beat_ms=<ms>`.
pub fn dirtier() -> PathBuf {
    PathBuf::from(env!("FERRY_GUEST_DIRTIER"))
}

/// The complete lines of a console log: a guest still printing leaves a partial last line
/// (`beat 4 o`), which must not be read as a line of its own.
pub fn whole_lines(text: &str) -> std::str::Lines<'_> {
    text[..text.rfind('\n').map_or(0, |i| i + 1)].lines()
}

/// The dirtier's beats in a console log, in order: (counter, whether the guest found its memory
/// intact). Complete lines only.
pub fn beats(text: &str) -> Vec<(u64, bool)> {
    whole_lines(text)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "beat").then_some(())?;
            Some((w.next()?.parse().ok()?, w.next()? == "ok"))
        })
        .collect()
}

/// The dirtier's complaints (`beat <n> BAD <reason> …`), for failure messages.
pub fn bad_lines(text: &str) -> Vec<&str> {
    whole_lines(text)
        .filter(|l| l.starts_with("beat ") && l.contains(" BAD"))
        .collect()
}

/// Runs `ip ARGS…` (iproute2); panics if it fails (tests set up namespaces and bridges).
pub fn ip(args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "ip {args:?}: {st}");
}

/// A host bridge for one test, up; deleted again however the test ends.
pub struct TestBridge(String);

impl TestBridge {
    /// Creates bridge `name` (replacing one a killed run left) and brings it up.
    pub fn new(name: &str) -> TestBridge {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        ip(&["link", "add", name, "type", "bridge"]);
        ip(&["link", "set", name, "up"]);
        TestBridge(name.to_string())
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

/// A raw, non-blocking packet socket on host interface `ifname` for frames of `proto`
/// (an ethertype; tests use it to inject and watch frames). Panics on failure.
pub fn packet_socket(ifname: &str, proto: u16) -> std::os::fd::OwnedFd {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname}");
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto.to_be()),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto.to_be();
    sa.sll_ifindex = index as i32;
    // SAFETY: `sa` is a valid sockaddr_ll of the size given.
    let r = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            std::ptr::addr_of!(sa).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    fd
}

/// What every Linux test guest's /init starts with: a shell, /proc, /sys, /dev, and the
/// ready line.
pub const INIT_PREAMBLE: &str = r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "GUEST-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
"#;

/// The shared Linux guest's initramfs (`guest_dir/initramfs.cpio.gz`) with [`INIT_PREAMBLE`]
/// followed by `init_body` as its /init and `files` (path without the leading '/', mode,
/// contents) added: appended as a second archive, whose files win.
pub fn linux_initrd(
    guest_dir: &std::path::Path,
    init_body: &str,
    files: &[(&str, u32, &[u8])],
) -> std::io::Result<Vec<u8>> {
    let init = format!("{INIT_PREAMBLE}{init_body}");
    let mut initrd = std::fs::read(guest_dir.join("initramfs.cpio.gz"))?;
    while !initrd.len().is_multiple_of(4) {
        initrd.push(0);
    }
    let mut all = vec![("init", 0o100755, init.as_bytes())];
    all.extend_from_slice(files);
    initrd.extend(cpio(&all));
    Ok(initrd)
}

/// A newc cpio archive holding `files` (path without the leading '/', mode, contents).
pub fn cpio(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_partial_last_line_is_not_a_beat() {
        let text = "dirtier: start\nbeat 0 ok\nbeat 1 BAD checksum page=3\nbeat 2 o";
        assert_eq!(super::beats(text), vec![(0, true), (1, false)]);
        assert_eq!(super::bad_lines(text), vec!["beat 1 BAD checksum page=3"]);
        assert_eq!(super::beats("beat 2 ok\n"), vec![(2, true)]);
        assert!(super::beats("").is_empty());
    }
}
