//! Socket settings of a migration connection.

use super::{MigrationError, IO_TIMEOUT};

/// Sets up a migration connection: no Nagle delay, read/write timeouts, and a TCP user
/// timeout so that data left unacknowledged (a cut link) fails the connection within
/// [`IO_TIMEOUT`] even while it still fits in the socket buffers.
pub fn tune(stream: &std::net::TcpStream) -> Result<(), MigrationError> {
    use std::os::fd::AsRawFd;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let ms = libc::c_uint::try_from(IO_TIMEOUT.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: setsockopt on a valid TCP socket fd with a pointer to a live c_uint and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            std::ptr::addr_of!(ms).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}
