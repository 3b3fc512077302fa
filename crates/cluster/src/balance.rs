//! Load balancing and power consolidation: pure decisions over a model of the cluster — hosts
//! with their capacity, VMs with their demand — so that the coordinator (over the store's view)
//! and the simulator (`ferry-bench sim`, over a simulated cluster) run the same code.
//!
//! **Balance** (after VMware DRS): a host's load is its VMs' CPU demand over its cores; the
//! cluster's imbalance is the standard deviation of that load over the hosts that are on. Above
//! the target of the chosen threshold (1 conservative … 5 aggressive), the move that lowers the
//! imbalance most for its cost — a VM's memory and dirty rate are what a live migration pays —
//! is taken, the model updated, and so on, until the target is met, no move gains enough, or
//! the pass's budget of moves is spent. A move never puts a host above the high-load mark or
//! past its memory, never goes where the VM does not fit (the caller's rule: CPU features,
//! bridges, maintenance), and never touches a VM that is not movable (migrating, cooling down).
//!
//! **Power** (after VMware DPM): hosts are kept between a low and a high cluster load, near
//! the band's middle. When for the power-off window the load has been below the low mark, or
//! the hosts but one could have carried it at no more than the middle, the host whose VMs fit
//! on the others with the least memory moved is emptied and switched off — never below the minimum of hosts on, and only if
//! the hosts left could still take in the busiest one's VMs (the HA reserve). Above the high
//! mark for the power-on window, or when a host is overloaded, a standby host is switched on.

use std::collections::HashMap;

/// A host as the policy sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    /// Its name.
    pub name: String,
    /// CPU capacity, in cores.
    pub cores: f64,
    /// Memory for VMs, MiB.
    pub memory_mib: u64,
    /// Powered on (not standby).
    pub on: bool,
    /// Takes VMs (on, up, not paused, draining or fenced).
    pub accepts: bool,
    /// Can be switched off and on again (it has a power driver).
    pub switchable: bool,
}

/// A VM as the policy sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Vm {
    /// Its name.
    pub name: String,
    /// The host it runs on.
    pub host: String,
    /// CPU demand, in cores.
    pub cpu: f64,
    /// Memory it is given, MiB.
    pub memory_mib: u64,
    /// How fast it dirties memory, MiB/s (a migration's cost grows with it).
    pub dirty_mib_s: f64,
    /// May be moved by balancing now (not migrating, not in its cool-down).
    pub movable: bool,
    /// Being migrated now (its host cannot be emptied meanwhile; a VM only cooling down after
    /// a move can still leave a host that is to be switched off).
    pub migrating: bool,
}

/// The cluster the policy decides over.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    /// Every host, standby ones included.
    pub hosts: Vec<Host>,
    /// Every running VM.
    pub vms: Vec<Vm>,
}

/// How eager balancing is.
#[derive(Clone, Debug, PartialEq)]
pub struct BalanceParams {
    /// 1 (only a gross imbalance is worth a move) to 5 (any imbalance is).
    pub threshold: u8,
    /// Most moves one pass proposes.
    pub max_moves: usize,
    /// No move may leave its destination above this load (a fraction of its cores).
    pub high: f64,
    /// A move must lower the imbalance by at least this much (small: in a large cluster one
    /// VM moves the spread little).
    pub min_gain: f64,
    /// A host above this load is relieved first, whatever the spread.
    pub relieve_above: f64,
}

impl Default for BalanceParams {
    fn default() -> Self {
        BalanceParams {
            threshold: 3,
            max_moves: 4,
            high: 0.8,
            min_gain: 0.0005,
            relieve_above: 0.9,
        }
    }
}

/// The imbalance a threshold tolerates.
pub fn target(threshold: u8) -> f64 {
    match threshold {
        0 | 1 => 0.30,
        2 => 0.20,
        3 => 0.10,
        4 => 0.05,
        _ => 0.02,
    }
}

/// A proposed migration and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    /// The VM.
    pub vm: String,
    /// From this host.
    pub from: String,
    /// To this one.
    pub to: String,
    /// Imbalance before the move (in the pass's model).
    pub before: f64,
    /// Imbalance after it.
    pub after: f64,
    /// In words: the loads that caused it and the expected gain.
    pub reason: String,
}

/// Load of each host that is on, by name: (CPU demand, memory used, cores, memory).
#[derive(Clone)]
struct Loads {
    index: HashMap<String, usize>,
    /// The hosts that are on, by index.
    names: Vec<String>,
    /// Whether each takes VMs.
    accepts: Vec<bool>,
    cpu: Vec<f64>,
    mem: Vec<u64>,
    cores: Vec<f64>,
    memory: Vec<u64>,
    /// Σ load and Σ load² over the hosts, for the imbalance in O(1) per candidate.
    sum: f64,
    sum_sq: f64,
}

impl Loads {
    fn of(m: &Model) -> Loads {
        let on: Vec<&Host> = m.hosts.iter().filter(|h| h.on).collect();
        let index = on
            .iter()
            .enumerate()
            .map(|(i, h)| (h.name.clone(), i))
            .collect::<HashMap<_, _>>();
        let mut cpu = vec![0.0; on.len()];
        let mut mem = vec![0u64; on.len()];
        for v in &m.vms {
            if let Some(&i) = index.get(&v.host) {
                cpu[i] += v.cpu;
                mem[i] += v.memory_mib;
            }
        }
        let cores: Vec<f64> = on.iter().map(|h| h.cores.max(f64::EPSILON)).collect();
        let memory = on.iter().map(|h| h.memory_mib).collect();
        let mut l = Loads {
            index,
            names: on.iter().map(|h| h.name.clone()).collect(),
            accepts: on.iter().map(|h| h.accepts).collect(),
            cpu,
            mem,
            cores,
            memory,
            sum: 0.0,
            sum_sq: 0.0,
        };
        for i in 0..l.cpu.len() {
            let x = l.load(i);
            l.sum += x;
            l.sum_sq += x * x;
        }
        l
    }

    fn load(&self, i: usize) -> f64 {
        self.cpu[i] / self.cores[i]
    }

    /// Whether host `i` may take `v` now: its memory, and no more load than `high`.
    fn takes(&self, i: usize, v: &Vm, high: f64) -> bool {
        self.mem[i] + v.memory_mib <= self.memory[i] && self.cpu[i] + v.cpu <= high * self.cores[i]
    }

    fn n(&self) -> f64 {
        self.cpu.len() as f64
    }

    fn stddev(sum: f64, sum_sq: f64, n: f64) -> f64 {
        if n < 1.0 {
            return 0.0;
        }
        let mean = sum / n;
        (sum_sq / n - mean * mean).max(0.0).sqrt()
    }

    fn imbalance(&self) -> f64 {
        Self::stddev(self.sum, self.sum_sq, self.n())
    }

    /// The imbalance if `cpu` cores of demand went from host `a` to host `b`.
    fn imbalance_after(&self, a: usize, b: usize, cpu: f64) -> f64 {
        let (la, lb) = (self.load(a), self.load(b));
        let (na, nb) = (
            (self.cpu[a] - cpu) / self.cores[a],
            (self.cpu[b] + cpu) / self.cores[b],
        );
        let sum = self.sum - la - lb + na + nb;
        let sum_sq = self.sum_sq - la * la - lb * lb + na * na + nb * nb;
        Self::stddev(sum, sum_sq, self.n())
    }

    /// Moves `v` from host `a` to host `b`.
    fn apply(&mut self, a: usize, b: usize, v: &Vm) {
        let (cpu, mem) = (v.cpu, v.memory_mib);
        let (la, lb) = (self.load(a), self.load(b));
        self.cpu[a] -= cpu;
        self.cpu[b] += cpu;
        self.mem[a] = self.mem[a].saturating_sub(mem);
        self.mem[b] += mem;
        let (na, nb) = (self.load(a), self.load(b));
        self.sum += na + nb - la - lb;
        self.sum_sq += na * na + nb * nb - la * la - lb * lb;
    }
}

/// The cluster's imbalance: the standard deviation of host load over the hosts that are on.
pub fn imbalance(m: &Model) -> f64 {
    Loads::of(m).imbalance()
}

/// The moves that bring the imbalance down towards the threshold's target, best first.
/// `fits(vm, host)`: whether the VM may run there at all (the caller's placement rules).
pub fn balance(m: &Model, p: &BalanceParams, fits: impl Fn(&Vm, &Host) -> bool) -> Vec<Move> {
    let mut loads = Loads::of(m);
    let goal = target(p.threshold);
    let by_name: HashMap<&str, &Host> = m.hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    // By the index of `loads` (the hot loop looks nothing up by name).
    let hosts: Vec<Option<&Host>> = loads
        .names
        .iter()
        .map(|n| by_name.get(n.as_str()).copied())
        .collect();
    let mut placed: Vec<Option<usize>> = m
        .vms
        .iter()
        .map(|v| loads.index.get(&v.host).copied())
        .collect();
    let mut moved = vec![false; m.vms.len()];
    let mut moves = Vec::new();
    while moves.len() < p.max_moves {
        let before = loads.imbalance();
        // A host above `relieve_above` is relieved whatever the spread (in a large cluster one
        // hot host hardly moves it): then only moves off such hosts count.
        let hot = (0..loads.cpu.len()).any(|i| loads.load(i) > p.relieve_above);
        // (With a margin for rounding: a spread exactly at the target is met.)
        if before <= goal + 1e-9 && !hot {
            break;
        }
        // (score, vm index, destination index, imbalance after)
        let mut best: Option<(f64, usize, usize, f64)> = None;
        for (vi, v) in m.vms.iter().enumerate() {
            if !v.movable || moved[vi] || v.cpu <= 0.0 {
                continue;
            }
            let Some(a) = placed[vi] else {
                continue;
            };
            // Only a move off a host above the mean lowers the spread.
            if if hot {
                loads.load(a) <= p.relieve_above
            } else {
                loads.load(a) <= loads.sum / loads.n()
            } {
                continue;
            }
            // What the move costs: its memory, more when it dirties fast (pre-copy rounds).
            let cost = (v.memory_mib as f64 / 1024.0).max(0.25) * (1.0 + v.dirty_mib_s / 100.0);
            for (b, dest) in hosts.iter().enumerate() {
                if b == a || !loads.accepts[b] {
                    continue;
                }
                if !loads.takes(b, v, p.high) {
                    continue;
                }
                let after = loads.imbalance_after(a, b, v.cpu);
                let gain = before - after;
                if gain < p.min_gain {
                    continue;
                }
                let score = gain / cost;
                // The caller's rule last: it is the dearest check, and only a better move needs it.
                if best.is_none_or(|(s, ..)| score > s) && dest.is_some_and(|h| fits(v, h)) {
                    best = Some((score, vi, b, after));
                }
            }
        }
        let Some((_, vi, b, after)) = best else {
            break;
        };
        let v = &m.vms[vi];
        let Some(a) = placed[vi] else {
            break;
        };
        let (from, to) = (loads.names[a].clone(), loads.names[b].clone());
        let reason = format!(
            "{from} at {:.0}% CPU, {to} at {:.0}%: imbalance {before:.2} → {after:.2} (target {goal:.2})",
            loads.load(a) * 100.0,
            loads.load(b) * 100.0
        );
        moves.push(Move {
            vm: v.name.clone(),
            from,
            to,
            before,
            after,
            reason,
        });
        loads.apply(a, b, v);
        placed[vi] = Some(b);
        moved[vi] = true;
    }
    moves
}

/// Hosts an idle cluster tries to empty in one pass, least memory first.
const MAX_CANDIDATES: usize = 8;

/// How power consolidation keeps the hosts that are on.
#[derive(Clone, Debug, PartialEq)]
pub struct PowerParams {
    /// Below this cluster load (demand over the cores that are on), hosts may be switched off.
    pub low: f64,
    /// Above it, a standby host is switched on; no host is filled past it by an evacuation.
    pub high: f64,
    /// Hosts always kept on.
    pub min_on: usize,
    /// How long the load must stay below `low`, or low enough for the others to carry it at
    /// the band's middle, before a host goes off, seconds.
    pub off_after_s: u64,
    /// How long it must stay above `high` before a host comes on, seconds.
    pub on_after_s: u64,
}

impl PowerParams {
    /// The middle of the band: the load consolidation packs to and waking aims at.
    pub fn target(&self) -> f64 {
        (self.low + self.high) / 2.0
    }
}

impl Default for PowerParams {
    fn default() -> Self {
        PowerParams {
            low: 0.45,
            high: 0.81,
            min_on: 2,
            off_after_s: 40 * 60,
            on_after_s: 5 * 60,
        }
    }
}

/// What power consolidation advises now.
#[derive(Clone, Debug, PartialEq)]
pub enum Power {
    /// Nothing to do.
    Hold,
    /// Empty this host with these moves, then switch it off.
    Off {
        /// The host.
        host: String,
        /// Where its VMs go.
        moves: Vec<Move>,
        /// Why.
        reason: String,
    },
    /// Switch these standby hosts on: as many as bring the cluster load back to the middle
    /// of the band (at least one).
    On {
        /// The hosts.
        hosts: Vec<String>,
        /// Why.
        reason: String,
    },
}

/// The cluster's load: demand over the cores of the hosts that are on.
pub fn cluster_load(m: &Model) -> f64 {
    let cores: f64 = m.hosts.iter().filter(|h| h.on).map(|h| h.cores).sum();
    let demand: f64 = m.vms.iter().map(|v| v.cpu).sum();
    if cores > 0.0 {
        demand / cores
    } else if demand > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// What the power windows watch, read off the model each pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pressure {
    /// Demand over the cores of the hosts that are on ([`cluster_load`]).
    pub load: f64,
    /// The load on the hosts that take VMs if the smallest of them that could be switched off
    /// were off (infinite when none could): hosts being emptied or paused do not count.
    pub without_one: f64,
    /// A host that is on carries more demand than it has cores ([`overloaded`]).
    pub overloaded: bool,
}

/// The [`Pressure`] of `m`.
pub fn pressure(m: &Model) -> Pressure {
    let cores: f64 = m
        .hosts
        .iter()
        .filter(|h| h.on && h.accepts)
        .map(|h| h.cores)
        .sum();
    let demand: f64 = m.vms.iter().map(|v| v.cpu).sum();
    let smallest = m
        .hosts
        .iter()
        .filter(|h| h.on && h.accepts && h.switchable)
        .map(|h| h.cores)
        .fold(f64::INFINITY, f64::min);
    let left = cores - smallest;
    Pressure {
        load: cluster_load(m),
        without_one: if smallest.is_finite() && left > 0.0 {
            demand / left
        } else {
            f64::INFINITY
        },
        overloaded: overloaded(m),
    }
}

/// How long the load has been out of the band, which the caller keeps between passes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PowerWindow {
    below_since: Option<u64>,
    above_since: Option<u64>,
}

impl PowerWindow {
    /// Records the pressure at `now` (seconds) and says which way it has stayed out of the
    /// band long enough: `Some(false)` off, `Some(true)` on. A host may go off when the load is
    /// below the band, or when the others could carry it at no more than the band's middle
    /// (DPM's target): the cluster is kept near the middle, not just above the low mark.
    pub fn observe(&mut self, now: u64, pr: &Pressure, p: &PowerParams) -> Option<bool> {
        let (load, overloaded) = (pr.load, pr.overloaded);
        if !overloaded && load <= p.high && (load < p.low || pr.without_one <= p.target()) {
            self.above_since = None;
            let since = *self.below_since.get_or_insert(now);
            return (now.saturating_sub(since) >= p.off_after_s).then_some(false);
        }
        self.below_since = None;
        if load > p.high || overloaded {
            let since = *self.above_since.get_or_insert(now);
            // An overloaded host does not wait out the window.
            return (overloaded || now.saturating_sub(since) >= p.on_after_s).then_some(true);
        }
        self.above_since = None;
        None
    }

    /// Starts both windows again (after the cluster acted).
    pub fn reset(&mut self) {
        *self = PowerWindow::default();
    }
}

/// Hosts that may be emptied to be switched off at the same time, with `on` hosts on: each
/// sends one migration at a time, so a large cluster needs several to consolidate within an
/// evening; an eighth keeps most of the migration slots for everything else.
pub fn max_evacuating(on: usize) -> usize {
    (on / 8).max(1)
}

/// Whether any host that is on carries more demand than it has cores.
pub fn overloaded(m: &Model) -> bool {
    let l = Loads::of(m);
    (0..l.cpu.len()).any(|i| l.load(i) > 1.0)
}

/// What to switch given `way` (from [`PowerWindow::observe`]): the host to empty and its
/// moves, or the standby host to wake.
pub fn power(m: &Model, p: &PowerParams, way: bool, fits: impl Fn(&Vm, &Host) -> bool) -> Power {
    if way {
        let demand: f64 = m.vms.iter().map(|v| v.cpu).sum();
        let mut cores: f64 = m.hosts.iter().filter(|h| h.on).map(|h| h.cores).sum();
        let mid = p.target();
        let mut hosts = Vec::new();
        for h in m.hosts.iter().filter(|h| !h.on && h.switchable) {
            if !hosts.is_empty() && cores * mid >= demand {
                break;
            }
            cores += h.cores;
            hosts.push(h.name.clone());
        }
        return match hosts.is_empty() {
            false => Power::On {
                hosts,
                reason: {
                    let load = cluster_load(m) * 100.0;
                    if load > p.high * 100.0 {
                        format!("cluster load {load:.0}% above {:.0}%", p.high * 100.0)
                    } else if overloaded(m) {
                        format!("a host is overloaded (cluster load {load:.0}%)")
                    } else {
                        format!("more capacity asked for (cluster load {load:.0}%)")
                    }
                },
            },
            true => Power::Hold,
        };
    }
    let on: Vec<&Host> = m.hosts.iter().filter(|h| h.on).collect();
    // Hosts that stay: a host being emptied (or paused) does not count towards the minimum.
    let staying = on.iter().filter(|h| h.accepts).count();
    if staying <= p.min_on {
        return Power::Hold;
    }
    let loads = Loads::of(m);
    // Candidates: the hosts with the least memory to move first.
    let mut candidates: Vec<usize> = (0..loads.cpu.len()).collect();
    candidates.sort_by_key(|&i| loads.mem[i]);
    let hosts: HashMap<&str, &Host> = m.hosts.iter().map(|h| (h.name.as_str(), h)).collect();
    let mut by_host: HashMap<&str, Vec<&Vm>> = HashMap::new();
    for v in &m.vms {
        by_host.entry(v.host.as_str()).or_default().push(v);
    }
    // The first few are enough: each further one moves more memory, and each costs a pass of
    // its VMs over every host.
    'candidate: for c in candidates.into_iter().take(MAX_CANDIDATES) {
        let cname = loads.names[c].clone();
        if !hosts
            .get(cname.as_str())
            .is_some_and(|h| h.switchable && h.accepts)
        {
            continue;
        }
        let mut after = loads.clone();
        let mut vms: Vec<&Vm> = by_host.get(cname.as_str()).cloned().unwrap_or_default();
        if vms.iter().any(|v| v.migrating) {
            continue;
        }
        vms.sort_by_key(|v| std::cmp::Reverse(v.memory_mib));
        let mut moves = Vec::new();
        for v in vms {
            // Best fit: the destination left least loaded after taking it.
            let mut best: Option<(f64, usize)> = None;
            for i in 0..after.cpu.len() {
                if i == c || !after.accepts[i] {
                    continue;
                }
                let Some(h) = hosts.get(after.names[i].as_str()) else {
                    continue;
                };
                if !after.takes(i, v, p.high) || !fits(v, h) {
                    continue;
                }
                let load = (after.cpu[i] + v.cpu) / after.cores[i];
                if best.is_none_or(|(l, _)| load < l) {
                    best = Some((load, i));
                }
            }
            let Some((_, i)) = best else {
                continue 'candidate;
            };
            after.apply(c, i, v);
            moves.push(Move {
                vm: v.name.clone(),
                from: cname.clone(),
                to: loads.names[i].clone(),
                before: 0.0,
                after: 0.0,
                reason: format!("consolidating: {cname} is to be switched off"),
            });
        }
        // The HA reserve: the hosts left must still take in the busiest one's VMs.
        let (cpu, mem) = (&after.cpu, &after.mem);
        // (Only hosts that take VMs: one being emptied is no reserve.)
        let left: Vec<usize> = (0..cpu.len())
            .filter(|&i| i != c && after.accepts[i])
            .collect();
        let spare_cpu: f64 = left.iter().map(|&i| loads.cores[i] * p.high - cpu[i]).sum();
        let spare_mem: u64 = left
            .iter()
            .map(|&i| loads.memory[i].saturating_sub(mem[i]))
            .sum();
        let worst_cpu = left.iter().map(|&i| cpu[i]).fold(0.0, f64::max);
        let worst_mem = left.iter().map(|&i| mem[i]).max().unwrap_or(0);
        let biggest = left
            .iter()
            .max_by(|&&a, &&b| cpu[a].total_cmp(&cpu[b]))
            .copied();
        let reserve_ok = biggest.is_some_and(|b| {
            spare_cpu - (loads.cores[b] * p.high - cpu[b]) >= worst_cpu
                && spare_mem.saturating_sub(loads.memory[b].saturating_sub(mem[b])) >= worst_mem
        });
        if !reserve_ok {
            continue;
        }
        return Power::Off {
            host: cname.clone(),
            reason: format!(
                "cluster load {:.0}%, {:.0}% on the hosts left (target {:.0}%): {} VM(s) move off {cname}, {} hosts stay on",
                cluster_load(m) * 100.0,
                {
                    let left: f64 = on.iter().filter(|h| h.name != cname).map(|h| h.cores).sum();
                    loads.cpu.iter().sum::<f64>() / left.max(f64::EPSILON) * 100.0
                },
                p.target() * 100.0,
                moves.len(),
                staying - 1
            ),
            moves,
        };
    }
    Power::Hold
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, cores: f64) -> Host {
        Host {
            name: name.into(),
            cores,
            memory_mib: 64 << 10,
            on: true,
            accepts: true,
            switchable: true,
        }
    }

    fn vm(name: &str, host: &str, cpu: f64, mem: u64) -> Vm {
        Vm {
            name: name.into(),
            host: host.into(),
            cpu,
            memory_mib: mem,
            dirty_mib_s: 0.0,
            movable: true,
            migrating: false,
        }
    }

    fn any(_: &Vm, _: &Host) -> bool {
        true
    }

    /// The model after `moves`.
    fn after(m: &Model, moves: &[Move]) -> Model {
        let mut m = m.clone();
        for mv in moves {
            let v = m.vms.iter_mut().find(|v| v.name == mv.vm).unwrap();
            assert_eq!(v.host, mv.from);
            v.host = mv.to.clone();
        }
        m
    }

    #[test]
    fn vms_on_one_host_spread_until_the_target_is_met() {
        let m = Model {
            hosts: vec![host("h1", 8.0), host("h2", 8.0), host("h3", 8.0)],
            vms: (0..6)
                .map(|i| vm(&format!("v{i}"), "h1", 1.0, 1024))
                .collect(),
        };
        assert!(imbalance(&m) > 0.3);
        let p = BalanceParams {
            max_moves: 10,
            ..Default::default()
        };
        let moves = balance(&m, &p, any);
        let end = after(&m, &moves);
        assert!(imbalance(&end) <= target(3), "{moves:#?}");
        // Each move lowered the imbalance and says so.
        for mv in &moves {
            assert!(mv.after < mv.before, "{mv:?}");
            assert!(mv.reason.contains("imbalance"), "{mv:?}");
        }
        assert_eq!(moves.len(), 4, "2 VMs to each other host: {moves:#?}");
        // Balanced already: nothing to do.
        assert!(balance(&end, &p, any).is_empty());
    }

    #[test]
    fn a_move_respects_fit_memory_the_high_mark_and_movability() {
        let mut m = Model {
            hosts: vec![host("h1", 4.0), host("h2", 4.0)],
            vms: vec![vm("big", "h1", 3.5, 1024), vm("small", "h1", 0.5, 1024)],
        };
        let p = BalanceParams::default();
        // "big" would leave h2 at 88% > 80%: only "small" can move.
        let moves = balance(&m, &p, any);
        assert_eq!(
            moves.iter().map(|m| m.vm.as_str()).collect::<Vec<_>>(),
            ["small"]
        );
        // Not where it does not fit.
        assert!(balance(&m, &p, |v, h| !(v.name == "small" && h.name == "h2")).is_empty());
        // Not past memory.
        m.hosts[1].memory_mib = 512;
        assert!(balance(&m, &p, any).is_empty());
        m.hosts[1].memory_mib = 64 << 10;
        // Not a VM that cannot move now, nor onto a host that takes none.
        m.vms[1].movable = false;
        assert!(balance(&m, &p, any).is_empty());
        m.vms[1].movable = true;
        m.hosts[1].accepts = false;
        assert!(balance(&m, &p, any).is_empty());
    }

    #[test]
    fn thresholds_order_from_conservative_to_aggressive_and_cost_weighs() {
        let m = Model {
            hosts: vec![host("h1", 10.0), host("h2", 10.0)],
            vms: vec![
                vm("a", "h1", 1.0, 1024),
                vm("b", "h1", 1.0, 1024),
                vm("c", "h1", 1.0, 16 << 10),
                vm("d", "h2", 1.0, 1024),
            ],
        };
        // Loads 0.3 and 0.1: imbalance 0.1.
        assert!((imbalance(&m) - 0.1).abs() < 1e-9);
        for t in 1..=3 {
            let p = BalanceParams {
                threshold: t,
                ..Default::default()
            };
            assert!(balance(&m, &p, any).is_empty(), "threshold {t}");
        }
        let p = BalanceParams {
            threshold: 5,
            ..Default::default()
        };
        let moves = balance(&m, &p, any);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_ne!(
            moves[0].vm, "c",
            "the 16 GiB VM costs more to move for the same gain"
        );
    }

    /// A pressure whose one-host-fewer load is far above any target (a small cluster).
    fn pr(load: f64, overloaded: bool) -> Pressure {
        Pressure {
            load,
            without_one: f64::INFINITY,
            overloaded,
        }
    }

    #[test]
    fn a_window_must_pass_before_power_changes_and_an_overload_does_not_wait() {
        let p = PowerParams::default();
        let mut w = PowerWindow::default();
        assert_eq!(w.observe(0, &pr(0.2, false), &p), None);
        assert_eq!(w.observe(p.off_after_s - 1, &pr(0.2, false), &p), None);
        assert_eq!(w.observe(p.off_after_s, &pr(0.2, false), &p), Some(false));
        // Back in the band: the window starts again.
        assert_eq!(w.observe(p.off_after_s + 1, &pr(0.5, false), &p), None);
        assert_eq!(w.observe(p.off_after_s + 2, &pr(0.2, false), &p), None);
        assert_eq!(w.observe(10_000, &pr(0.9, false), &p), None);
        assert_eq!(
            w.observe(10_000 + p.on_after_s, &pr(0.9, false), &p),
            Some(true)
        );
        w.reset();
        assert_eq!(w.observe(20_000, &pr(0.5, true), &p), Some(true));
    }

    #[test]
    fn a_host_goes_off_while_the_others_could_carry_the_load_at_the_band_s_middle() {
        let p = PowerParams::default();
        // Ten hosts of 10 cores at 55 %: inside the band, but nine would carry it at 61 %
        // (under the middle, 63 %).
        let m = Model {
            hosts: (0..10).map(|i| host(&format!("h{i}"), 10.0)).collect(),
            vms: (0..10)
                .map(|i| vm(&format!("v{i}"), &format!("h{i}"), 5.5, 1024))
                .collect(),
        };
        let pr = pressure(&m);
        assert!((pr.load - 0.55).abs() < 1e-9);
        assert!((pr.without_one - 55.0 / 90.0).abs() < 1e-9);
        let mut w = PowerWindow::default();
        assert_eq!(w.observe(0, &pr, &p), None);
        assert_eq!(w.observe(p.off_after_s, &pr, &p), Some(false));
        // At 60 % nine would be at 67 %: the cluster stays as it is.
        let mut m2 = m.clone();
        for v in &mut m2.vms {
            v.cpu = 6.0;
        }
        let mut w = PowerWindow::default();
        assert_eq!(w.observe(0, &pressure(&m2), &p), None);
        assert_eq!(w.observe(p.off_after_s, &pressure(&m2), &p), None);
        // Hosts that cannot be switched off do not count as the one to spare.
        let mut m3 = m.clone();
        for h in &mut m3.hosts {
            h.switchable = false;
        }
        assert_eq!(pressure(&m3).without_one, f64::INFINITY);
    }

    #[test]
    fn hosts_being_emptied_count_neither_towards_the_minimum_nor_the_reserve() {
        let p = PowerParams::default();
        let mut m = Model {
            hosts: (1..=3).map(|i| host(&format!("h{i}"), 8.0)).collect(),
            vms: vec![vm("a", "h2", 0.5, 1024), vm("b", "h3", 0.5, 1024)],
        };
        assert!(matches!(power(&m, &p, false, any), Power::Off { .. }));
        // h1 is being emptied: two stay, the minimum.
        m.hosts[0].accepts = false;
        assert_eq!(power(&m, &p, false, any), Power::Hold);
        // Nor is its spare room a reserve for what the others carry: with a fourth host, one
        // more may go only if the two left can take in the busiest's VMs.
        m.hosts.push(host("h4", 8.0));
        m.vms.push(vm("c", "h4", 3.0, 40 << 10));
        m.vms.push(vm("d", "h3", 3.0, 40 << 10));
        assert_eq!(power(&m, &p, false, any), Power::Hold, "{m:#?}");
        assert_eq!(pressure(&m).without_one, 7.0 / 16.0);
    }

    #[test]
    fn a_host_above_the_relief_mark_is_relieved_even_when_the_spread_is_met() {
        // Twenty hosts at 50 %, one at 95 %: the spread (≈ 0.1) is at threshold 3's target,
        // yet the hot host gets a move off it.
        let mut hosts: Vec<Host> = (0..20).map(|i| host(&format!("h{i}"), 10.0)).collect();
        hosts.push(host("hot", 10.0));
        let mut vms: Vec<Vm> = (0..20)
            .map(|i| vm(&format!("v{i}"), &format!("h{i}"), 5.0, 1024))
            .collect();
        vms.push(vm("a", "hot", 3.0, 1024));
        vms.push(vm("b", "hot", 3.0, 1024));
        vms.push(vm("c", "hot", 3.5, 1024));
        let m = Model { hosts, vms };
        assert!(imbalance(&m) <= target(3) + 1e-9, "{}", imbalance(&m));
        let p = BalanceParams::default();
        let moves = balance(&m, &p, any);
        assert_eq!(moves.len(), 1, "{moves:#?}");
        assert_eq!(moves[0].from, "hot");
        // Below the mark, nothing.
        let mut cool = m.clone();
        cool.vms.last_mut().unwrap().cpu = 2.5;
        assert!(balance(&cool, &p, any).is_empty());
    }

    #[test]
    fn an_idle_cluster_empties_its_smallest_host_but_keeps_the_reserve_and_the_minimum() {
        let mut hosts: Vec<Host> = (1..=4).map(|i| host(&format!("h{i}"), 8.0)).collect();
        let vms = vec![
            vm("a", "h1", 1.0, 4096),
            vm("b", "h2", 1.0, 4096),
            vm("c", "h3", 1.0, 4096),
            vm("d", "h4", 0.5, 1024),
        ];
        let m = Model {
            hosts: hosts.clone(),
            vms: vms.clone(),
        };
        let p = PowerParams::default();
        match power(&m, &p, false, any) {
            Power::Off {
                host,
                moves,
                reason,
            } => {
                assert_eq!(host, "h4", "the host with the least memory to move");
                assert_eq!(moves.len(), 1);
                assert_eq!(moves[0].vm, "d");
                assert!(reason.contains("on the hosts left"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // Two hosts on: the minimum.
        hosts[2].on = false;
        hosts[3].on = false;
        let m2 = Model {
            hosts: hosts.clone(),
            vms: vms[..2].to_vec(),
        };
        assert_eq!(power(&m2, &p, false, any), Power::Hold);
        // Waking: a standby host.
        match power(&m2, &p, true, any) {
            Power::On { hosts, .. } => assert_eq!(hosts, ["h3"], "one is enough for this load"),
            other => panic!("{other:?}"),
        }
        // A load far above the band wakes as many as it needs.
        let mut hot = m2.clone();
        for v in &mut hot.vms {
            v.cpu = 9.0;
        }
        match power(&hot, &p, true, any) {
            Power::On { hosts, .. } => assert_eq!(hosts, ["h3", "h4"]),
            other => panic!("{other:?}"),
        }
        // A VM being migrated keeps its host on; so does a full cluster (the reserve). One that
        // only cools down after a move does not: consolidation is not balancing.
        let mut m3 = m.clone();
        for v in &mut m3.vms {
            v.migrating = v.name == "d";
        }
        assert!(!matches!(power(&m3, &p, false, any), Power::Off { ref host, .. } if host == "h4"));
        for v in &mut m3.vms {
            v.migrating = false;
            v.movable = v.name != "d";
        }
        assert!(matches!(power(&m3, &p, false, any), Power::Off { ref host, .. } if host == "h4"));
        let busy = Model {
            hosts: (1..=3).map(|i| host(&format!("h{i}"), 4.0)).collect(),
            vms: vec![
                vm("a", "h1", 2.0, 1024),
                vm("b", "h2", 2.0, 1024),
                vm("c", "h3", 0.9, 1024),
            ],
        };
        assert_eq!(power(&busy, &p, false, any), Power::Hold);
    }

    #[test]
    fn only_hosts_with_a_power_driver_are_switched_off_or_on() {
        let mut hosts: Vec<Host> = (1..=4).map(|i| host(&format!("h{i}"), 8.0)).collect();
        // h4, the cheapest to empty, has no driver: the next cheapest goes instead.
        hosts[3].switchable = false;
        let vms = vec![
            vm("a", "h1", 1.0, 4096),
            vm("b", "h2", 1.0, 4096),
            vm("c", "h3", 1.0, 2048),
            vm("d", "h4", 0.5, 1024),
        ];
        let m = Model {
            hosts: hosts.clone(),
            vms: vms.clone(),
        };
        let p = PowerParams::default();
        match power(&m, &p, false, any) {
            Power::Off { host, .. } => assert_eq!(host, "h3"),
            other => panic!("{other:?}"),
        }
        // A paused or draining host (not taking VMs) is not chosen either.
        let mut paused = m.clone();
        paused.hosts[2].accepts = false;
        assert!(
            !matches!(power(&paused, &p, false, any), Power::Off { ref host, .. } if host == "h3")
        );
        // Standby hosts: only the one with a driver is woken.
        hosts[2].on = false;
        hosts[3].on = false;
        let hot = Model {
            hosts,
            vms: vec![vm("a", "h1", 9.0, 4096), vm("b", "h2", 9.0, 4096)],
        };
        match power(&hot, &p, true, any) {
            Power::On { hosts, .. } => assert_eq!(hosts, ["h3"]),
            other => panic!("{other:?}"),
        }
    }
}
