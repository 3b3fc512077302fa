//! Where workers keep their sockets and logs.
//!
//! `$FERRY_RUN_DIR` when set; otherwise `/run/ferry` for root and `$XDG_RUNTIME_DIR/ferry` or
//! `/tmp/ferry-<uid>` for others. Each VM has `<run>/vms/<name>/` holding `control.sock`,
//! `worker.log` and, unless told otherwise, `console.log`.

use std::path::PathBuf;

/// The run directory.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_RUN_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/ferry");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("ferry"),
        None => PathBuf::from(format!("/tmp/ferry-{uid}")),
    }
}

/// The directory of VM `name`.
pub fn vm_dir(name: &str) -> PathBuf {
    run_dir().join("vms").join(name)
}

/// The control socket of VM `name`.
pub fn socket(name: &str) -> PathBuf {
    vm_dir(name).join("control.sock")
}
