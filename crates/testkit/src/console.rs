//! Guest consoles: the bare-metal dirtier's `beat <n> ok|BAD …` lines and the Linux guest's
//! `tick <n> <checksum>` lines, and waiting for them. A wait fails at once when the guest
//! reports damaged memory (`BAD`, `DIRTIER-ERROR`) or a kernel panic.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::KitError;

/// A console log's text (empty while it does not exist).
pub fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// The dirtier's beats in `log`: (counter, memory intact).
pub fn beats_in(log: &Path) -> Vec<(u64, bool)> {
    crate::beats(&read(log))
}

/// How many beats `log` holds now.
pub fn beats_now(log: &Path) -> usize {
    beats_in(log).len()
}

/// The Linux guest's `tick <n>` counters, whole lines only.
pub fn ticks(text: &str) -> Vec<u64> {
    crate::whole_lines(text)
        .filter_map(|l| {
            l.strip_prefix("tick ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// What in `text` says the guest is damaged, if anything.
pub fn damage(text: &str) -> Option<String> {
    if let Some(l) = crate::bad_lines(text).first() {
        return Some((*l).to_string());
    }
    for mark in ["DIRTIER-ERROR", "Kernel panic"] {
        if let Some(i) = text.find(mark) {
            let line = text[i..].lines().next().unwrap_or(mark);
            return Some(line.to_string());
        }
    }
    None
}

/// Waits until `cond` holds for `log`'s text, failing early on damage; the text.
pub fn wait_for(
    log: &Path,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&str) -> bool,
) -> Result<String, KitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = read(log);
        if let Some(d) = damage(&text) {
            return Err(KitError::Damaged(format!("{d} (in {})", log.display())));
        }
        if cond(&text) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            return Err(KitError::Timeout {
                what: format!("{what} in {}", log.display()),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 120 s) until `log` holds `count` beats: the beats.
pub fn try_wait_beats(log: &Path, count: usize) -> Result<Vec<(u64, bool)>, KitError> {
    let text = wait_for(
        log,
        &format!("{count} beats"),
        Duration::from_secs(120),
        |t| crate::beats(t).len() >= count,
    )?;
    Ok(crate::beats(&text))
}

/// [`try_wait_beats`], panicking on failure (tests).
pub fn wait_beats(log: &Path, count: usize) -> Vec<(u64, bool)> {
    try_wait_beats(log, count).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether the beats are one run of the guest: one counter, no restart, no gap.
pub fn one_run(beats: &[(u64, bool)]) -> bool {
    beats.windows(2).all(|w| w[1].0 == w[0].0 + 1)
}

/// The guest in `log` kept one beat counter (no restart, no gap) and every self-check passed.
pub fn assert_one_run_intact(log: &Path) {
    let text = read(log);
    let all = crate::beats(&text);
    assert!(one_run(&all), "counter restarted or skipped: {all:?}");
    assert!(
        all.iter().all(|x| x.1),
        "memory damaged: {:?} in {all:?}",
        crate::bad_lines(&text)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_is_found_in_either_guest_s_words() {
        assert_eq!(damage("beat 1 ok\nbeat 2 ok\n"), None);
        assert_eq!(
            damage("beat 1 ok\nbeat 2 BAD page 7\n").as_deref(),
            Some("beat 2 BAD page 7")
        );
        assert!(damage("tick 3 9\nDIRTIER-ERROR sum\n").is_some());
    }

    #[test]
    fn ticks_and_runs_read_whole_lines_only() {
        assert_eq!(ticks("tick 1 5\ntick 2 6\ntick 3"), vec![1, 2]);
        assert!(one_run(&[(4, true), (5, true), (6, true)]));
        assert!(!one_run(&[(4, true), (0, true)]));
    }
}
