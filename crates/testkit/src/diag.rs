//! What a process's threads are doing: for the failure message of a guest that went silent.
//! A vCPU looping inside KVM shows the same kernel stack sample after sample and keeps using
//! CPU; a vCPU blocked in the VMM shows a futex or a poll; a halted guest sleeps in KVM.

use std::fmt::Write as _;
use std::time::Duration;

/// `samples` rounds, `every` apart, of each thread of `pid`: name, state, user+system CPU
/// ticks, wait channel and kernel stack (the stack needs root). With `gdb`, then the userspace
/// stacks of every thread from `gdb`, when it is installed.
pub fn threads(pid: u32, samples: usize, every: Duration, gdb: bool) -> String {
    let mut out = String::new();
    for round in 0..samples {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"));
        let Ok(tasks) = tasks else {
            let _ = writeln!(out, "process {pid} is gone");
            return out;
        };
        for t in tasks.flatten() {
            let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
            let stat = read("stat");
            // Fields after the command name (which may hold spaces): state is the first,
            // utime and stime the 12th and 13th.
            let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = after.split_whitespace().collect();
            let _ = writeln!(
                out,
                "--- sample {round} thread {} ({}) state {} cpu {}+{} wchan {}\n{}",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                f.first().unwrap_or(&"?"),
                f.get(11).unwrap_or(&"?"),
                f.get(12).unwrap_or(&"?"),
                read("wchan").trim(),
                read("stack")
            );
        }
        std::thread::sleep(every);
    }
    if !gdb {
        return out;
    }
    match std::process::Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .output()
    {
        Ok(o) => {
            let _ = writeln!(
                out,
                "--- gdb: userspace stacks\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        Err(e) => {
            let _ = writeln!(out, "--- no userspace stacks (gdb: {e})");
        }
    }
    out
}

/// The processes whose command line names `path` (the workers writing a console log).
pub fn processes_naming(path: &std::path::Path) -> Vec<u32> {
    let needle = path.as_os_str().as_encoded_bytes();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if cmdline.windows(needle.len().max(1)).any(|w| w == needle) {
            out.push(pid);
        }
    }
    out
}

/// [`threads`] of every process writing console `log`, for a guest that went silent.
pub fn silent_guest(log: &std::path::Path) -> String {
    let pids = processes_naming(log);
    if pids.is_empty() {
        return format!("no process writes {}", log.display());
    }
    pids.into_iter()
        .map(|p| {
            format!(
                "=== worker {p}\n{}",
                threads(p, 3, Duration::from_millis(300), true)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_reads_this_process_s_threads() {
        let s = super::threads(std::process::id(), 1, std::time::Duration::ZERO, false);
        assert!(s.contains("--- sample 0 thread"), "{s}");
        assert!(s.contains("state "), "{s}");
    }

    #[test]
    fn it_finds_the_process_that_names_a_path() {
        let dir = crate::tmpdir("kit", "naming");
        let log = dir.join("x.console");
        // A shell that waits on its stdin (a builtin: no grandchild to outlive it) with the
        // path in its command line (`sleep 30 PATH` would exit at once: coreutils reads every
        // argument as an interval).
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line"])
            .arg(&log)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // `spawn` returns before the child has exec'd, and for a moment after the exec its
        // command line is still empty: ask until it is found or a deadline passes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut found = super::processes_naming(&log);
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
            found = super::processes_naming(&log);
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, vec![child.id()]);
    }
}
