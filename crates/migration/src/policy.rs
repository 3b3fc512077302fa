//! The convergence policy of pre-copy: from one round's statistics to the next step.
//!
//! Pure: no clock, no VM, no socket. The sender measures each round and asks
//! [`Convergence::decide`] what to do; everything the decision rests on is in
//! [`RoundStats`] and the policy's own memory (throughput, throttle, stalled rounds).

use std::time::Duration;

use vmm::memory::PAGE_SIZE;

use crate::source::{MigrateOptions, TimeoutPolicy};

/// Fewest pages a round must move for its throughput to count; also the dirty set below
/// which the rest always goes in stop-and-copy (< 256 KiB is below any link's resolution,
/// and a throughput measured on a tiny round is latency, not bandwidth).
pub const MEASURE_PAGES: u64 = 64;

/// The throttle steps of auto-converge (percent of the vCPUs' time kept out of the guest), one
/// per stalled round. The last ones are closer together: going from 90% to 99% divides the
/// guest's speed by ten, and a guest rewriting a fixed working set each second only slows
/// once its share is below what the rewrite costs it (the vCPUs run in slices of
/// `vmm::throttle::PERIOD` at every step, so even 99% never stops the guest for long).
pub const THROTTLE_STEPS: [u8; 10] = [20, 30, 40, 50, 60, 70, 80, 90, 95, 99];
/// The most auto-converge throttles.
pub const THROTTLE_MAX: u8 = THROTTLE_STEPS[THROTTLE_STEPS.len() - 1];

/// What one pre-copy round measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundStats {
    /// The round just sent (0: the full pass).
    pub round: u32,
    /// Pages dirty now, at the end of that round (what the next round or the stop-and-copy
    /// would send).
    pub dirty_pages: u64,
    /// Pages the round moved with their data.
    pub moved_pages: u64,
    /// How long the round took.
    pub elapsed: Duration,
    /// Time since the migration started.
    pub since_start: Duration,
    /// Bytes of device and vCPU state expected at the switch-over.
    pub state_bytes: u64,
}

/// The policy's answer for one round.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Send the dirty pages in another round.
    Continue,
    /// Another round, with the vCPUs throttled to this percentage first.
    Throttle(u8),
    /// Pause the VM and send the rest.
    SwitchOver,
    /// Stop: the migration did not converge and the policy says cancel (the reason).
    GiveUp(String),
}

/// One decision and the estimate behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// What to do.
    pub decision: Decision,
    /// Expected downtime if the VM paused now.
    pub expected: Duration,
    /// Guest memory moved per second, as last measured (bytes/s).
    pub throughput: f64,
    /// Pages the guest dirtied per second during the round.
    pub dirty_rate: f64,
}

/// The policy with its memory across rounds.
#[derive(Clone, Debug)]
pub struct Convergence {
    target: Duration,
    max_rounds: u32,
    timeout: Duration,
    on_timeout: TimeoutPolicy,
    auto_converge: bool,
    throughput: f64,
    prev_dirty: Option<u64>,
    throttle: u8,
    max_throttle: u8,
}

impl Convergence {
    /// The policy of `opts`.
    pub fn new(opts: &MigrateOptions) -> Convergence {
        Convergence {
            target: Duration::from_millis(opts.downtime_ms),
            max_rounds: opts.max_rounds,
            timeout: Duration::from_secs(opts.timeout_s),
            on_timeout: opts.on_timeout,
            auto_converge: opts.auto_converge,
            throughput: 0.0,
            prev_dirty: None,
            throttle: 0,
            max_throttle: 0,
        }
    }

    /// The current throttle (percent).
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The highest throttle used so far.
    pub fn max_throttle(&self) -> u8 {
        self.max_throttle
    }

    /// Measured throughput in guest bytes per second (0 before any measurement).
    pub fn throughput(&self) -> f64 {
        self.throughput
    }

    /// Decides what follows the round `r`.
    pub fn decide(&mut self, r: &RoundStats) -> Step {
        let secs = r.elapsed.as_secs_f64().max(1e-3);
        // A round too small to measure keeps the last measurement (or makes the first).
        if r.moved_pages >= MEASURE_PAGES || self.throughput <= 0.0 {
            self.throughput = (r.moved_pages as f64 * PAGE_SIZE as f64 / secs).max(1.0);
        }
        let dirty_rate = r.dirty_pages as f64 / secs;
        let remaining = r.dirty_pages * PAGE_SIZE as u64 + r.state_bytes;
        let expected = Duration::from_secs_f64(remaining as f64 / self.throughput);
        let decision = self.decision(r, expected);
        if let Decision::Throttle(t) = decision {
            self.throttle = t;
            self.max_throttle = self.max_throttle.max(t);
        }
        self.prev_dirty = Some(r.dirty_pages);
        Step {
            decision,
            expected,
            throughput: self.throughput,
            dirty_rate,
        }
    }

    fn decision(&self, r: &RoundStats, expected: Duration) -> Decision {
        if expected <= self.target || r.dirty_pages < MEASURE_PAGES {
            return Decision::SwitchOver;
        }
        if r.since_start > self.timeout || r.round >= self.max_rounds {
            return match self.on_timeout {
                TimeoutPolicy::SwitchOver => Decision::SwitchOver,
                TimeoutPolicy::Cancel => Decision::GiveUp(format!(
                    "after {} rounds the guest still dirties {} pages per round (expected downtime {} ms, target {} ms)",
                    r.round,
                    r.dirty_pages,
                    expected.as_millis(),
                    self.target.as_millis()
                )),
            };
        }
        // A round that did not shrink the dirty set by a tenth: slow the guest down a step.
        let stalled = self
            .prev_dirty
            .is_some_and(|prev| r.dirty_pages.saturating_mul(10) >= prev.saturating_mul(9));
        if self.auto_converge && r.round >= 1 && stalled && self.throttle < THROTTLE_MAX {
            let next = THROTTLE_STEPS
                .into_iter()
                .find(|&t| t > self.throttle)
                .unwrap_or(THROTTLE_MAX);
            return Decision::Throttle(next);
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(round: u32, dirty: u64, moved: u64, ms: u64) -> RoundStats {
        RoundStats {
            round,
            dirty_pages: dirty,
            moved_pages: moved,
            elapsed: Duration::from_millis(ms),
            since_start: Duration::from_millis(ms * u64::from(round + 1)),
            state_bytes: 64 * 1024,
        }
    }

    #[test]
    fn switches_over_once_the_rest_fits_the_target() {
        let mut c = Convergence::new(&MigrateOptions::default());
        // 25,600 pages (100 MiB) in 1 s: 100 MiB/s. 10,000 dirty pages → ~390 ms: go on.
        let s = c.decide(&stats(0, 10_000, 25_600, 1000));
        assert_eq!(s.decision, Decision::Continue);
        assert!((380..400).contains(&s.expected.as_millis()), "{s:?}");
        // 2,000 dirty pages → ~78 ms + state: under 100 ms.
        let s = c.decide(&stats(1, 2_000, 10_000, 400));
        assert_eq!(s.decision, Decision::SwitchOver, "{s:?}");
    }

    #[test]
    fn a_tiny_dirty_set_switches_over_whatever_the_estimate() {
        let mut c = Convergence::new(&MigrateOptions::default());
        // One page moved in 1 s would predict seconds for anything: still switch over.
        let s = c.decide(&stats(0, MEASURE_PAGES - 1, 1, 1000));
        assert_eq!(s.decision, Decision::SwitchOver);
    }

    #[test]
    fn a_tiny_round_keeps_the_last_throughput() {
        let mut c = Convergence::new(&MigrateOptions::default());
        c.decide(&stats(0, 100_000, 25_600, 1000));
        let before = c.throughput();
        c.decide(&stats(1, 100_000, 10, 1000));
        assert_eq!(c.throughput(), before);
    }

    #[test]
    fn stalled_rounds_throttle_in_steps_up_to_the_limit() {
        let mut c = Convergence::new(&MigrateOptions::default());
        assert_eq!(
            c.decide(&stats(0, 50_000, 25_600, 1000)).decision,
            Decision::Continue
        );
        let mut seen = Vec::new();
        for round in 1..14 {
            if let Decision::Throttle(t) = c.decide(&stats(round, 50_000, 25_600, 1000)).decision {
                seen.push(t);
            }
        }
        assert_eq!(seen, vec![20, 30, 40, 50, 60, 70, 80, 90, 95, 99]);
        assert_eq!(c.max_throttle(), 99);
        assert_eq!(c.throttle(), 99);
    }

    #[test]
    fn shrinking_rounds_are_not_throttled() {
        let mut c = Convergence::new(&MigrateOptions::default());
        let mut dirty = 100_000;
        for round in 0..5 {
            let d = c.decide(&stats(round, dirty, 25_600, 1000)).decision;
            assert_eq!(d, Decision::Continue, "round {round}");
            dirty = dirty * 8 / 10;
        }
    }

    #[test]
    fn no_auto_converge_means_no_throttle() {
        let opts = MigrateOptions {
            auto_converge: false,
            ..Default::default()
        };
        let mut c = Convergence::new(&opts);
        for round in 0..5 {
            assert_eq!(
                c.decide(&stats(round, 50_000, 25_600, 1000)).decision,
                Decision::Continue
            );
        }
    }

    #[test]
    fn the_timeout_policy_applies_after_max_rounds() {
        let opts = MigrateOptions {
            max_rounds: 3,
            auto_converge: false,
            ..Default::default()
        };
        let mut c = Convergence::new(&opts);
        for round in 0..3 {
            assert_eq!(
                c.decide(&stats(round, 50_000, 25_600, 1000)).decision,
                Decision::Continue
            );
        }
        match c.decide(&stats(3, 50_000, 25_600, 1000)).decision {
            Decision::GiveUp(why) => assert!(why.contains("after 3 rounds"), "{why}"),
            d => panic!("{d:?}"),
        }
        let mut c = Convergence::new(&MigrateOptions {
            on_timeout: TimeoutPolicy::SwitchOver,
            ..opts
        });
        assert_eq!(
            c.decide(&stats(3, 50_000, 25_600, 1000)).decision,
            Decision::SwitchOver
        );
    }

    #[test]
    fn the_time_limit_counts_like_the_round_limit() {
        let mut c = Convergence::new(&MigrateOptions {
            timeout_s: 1,
            ..Default::default()
        });
        let mut r = stats(0, 50_000, 25_600, 1000);
        r.since_start = Duration::from_secs(2);
        assert!(matches!(c.decide(&r).decision, Decision::GiveUp(_)));
    }
}
