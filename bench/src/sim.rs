//! `ferry-bench sim`: the cluster's balancing and power policy (`ferry_cluster::balance`, the
//! code the coordinator runs) against a simulated cluster on a simulated clock — hosts with
//! cores and memory, VMs whose CPU demand follows a day with noise and bursts, live migrations
//! that take time in proportion to memory and dirty rate, under the coordinator's limits
//! (⌊hosts on/2⌋ at once, one per host), hosts that fail and are repaired, standby hosts that
//! take minutes to boot.
//!
//! Each simulated minute moves demand and finishes migrations, and a pass runs the policy over
//! the model and queues what it says (every minute: the coordinator's default balancing
//! interval, `[balance] interval_s = 60`). What it measures: the host-hours spent
//! switched off, the host-minutes any host that is on spent above 100 % of its cores, the
//! imbalance, the migrations per VM per day, and the slowest pass.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, Result};
use ferry_cluster::balance::{
    self, BalanceParams, Host, Model, Power, PowerParams, PowerWindow, Vm,
};

/// The simulation's size and seed.
#[derive(Clone, Debug)]
pub struct SimArgs {
    /// Hosts.
    pub hosts: usize,
    /// VMs.
    pub vms: usize,
    /// Simulated days.
    pub days: u64,
    /// Seed of every random draw.
    pub seed: u64,
}

/// xorshift64*: deterministic from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn f(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = self.f().max(1e-12);
        let v = self.f();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

const HOST_CORES: f64 = 32.0;
const HOST_MEMORY_MIB: u64 = 256 << 10;
/// Minutes between policy passes (the coordinator balances every 60 s by default).
const PASS_EVERY_MIN: u64 = 1;
/// Minutes a standby host takes to boot and join.
const BOOT_MIN: u64 = 5;
/// Minutes a failed host takes to be repaired (then it is standby).
const REPAIR_MIN: u64 = 120;
/// A VM is not moved again by balancing for this long after a move.
const COOLDOWN_MIN: u64 = 60;
/// Migration bandwidth, MiB per minute (~1 GiB/s).
const MIGRATION_MIB_MIN: f64 = 60.0 * 1024.0;

#[derive(Clone, Copy, Debug, PartialEq)]
enum HostState {
    On,
    /// Being emptied before it is switched off.
    Evacuating,
    Standby,
    Booting(u64),
    Failed(u64),
}

struct SimHost {
    name: String,
    state: HostState,
}

struct SimVm {
    name: String,
    vcpus: f64,
    memory_mib: u64,
    base: f64,
    amp: f64,
    /// Hour of the day its demand peaks.
    peak_h: f64,
    noise: f64,
    dirty_mib_s: f64,
    host: usize,
    burst_until: u64,
    /// A migration in flight: (arrives at minute, destination).
    moving: Option<(u64, usize)>,
    cooldown_until: u64,
    migrations: u64,
    demand: f64,
}

struct Sim {
    rng: Rng,
    hosts: Vec<SimHost>,
    vms: Vec<SimVm>,
    /// Evacuations waiting for the limits: (VM, destination), kept until done.
    queue: VecDeque<(usize, usize)>,
    /// Balancing's moves of the last pass (replaced by every pass, so none goes stale).
    moves: VecDeque<(usize, usize)>,
    window: PowerWindow,
    balance: BalanceParams,
    power: PowerParams,
    // Measures.
    off_host_min: u64,
    overload_host_min: u64,
    imbalance_sum: f64,
    imbalance_max: f64,
    samples: u64,
    migrations: u64,
    restarts: u64,
    failures: u64,
    pass_ms_max: f64,
    pass_ms_sum: f64,
    passes: u64,
    min_on: usize,
    /// `FERRY_SIM_TRACE`: print every pass's power decision and every overloaded host-minute.
    trace: bool,
    /// Migrations that emptied a host to switch it off (the rest balanced).
    evacuation_moves: u64,
}

impl Sim {
    fn new(a: &SimArgs) -> Sim {
        let mut rng = Rng(a.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let hosts = (0..a.hosts)
            .map(|i| SimHost {
                name: format!("h{i:02}"),
                state: HostState::On,
            })
            .collect();
        let mut vms = Vec::with_capacity(a.vms);
        for i in 0..a.vms {
            let vcpus = [1.0, 2.0, 2.0, 4.0, 4.0, 8.0][(rng.next() % 6) as usize];
            let memory_mib = (vcpus as u64) * 768 + (rng.next() % 4) * 256;
            vms.push(SimVm {
                name: format!("vm{i:04}"),
                vcpus,
                memory_mib,
                base: 0.02 + 0.05 * rng.f(),
                amp: 0.10 + 0.25 * rng.f(),
                // Most peak in office hours, some at night (batch).
                peak_h: if rng.f() < 0.8 {
                    11.0 + 6.0 * rng.f()
                } else {
                    1.0 + 4.0 * rng.f()
                },
                noise: 0.02 + 0.03 * rng.f(),
                dirty_mib_s: 5.0 + 60.0 * rng.f() * rng.f(),
                host: i % a.hosts.max(1),
                burst_until: 0,
                moving: None,
                cooldown_until: 0,
                migrations: 0,
                demand: 0.0,
            });
        }
        Sim {
            rng,
            hosts,
            vms,
            queue: VecDeque::new(),
            moves: VecDeque::new(),
            window: PowerWindow::default(),
            balance: BalanceParams {
                threshold: 3,
                max_moves: 16,
                ..Default::default()
            },
            power: PowerParams::default(),
            off_host_min: 0,
            overload_host_min: 0,
            imbalance_sum: 0.0,
            imbalance_max: 0.0,
            samples: 0,
            migrations: 0,
            restarts: 0,
            failures: 0,
            pass_ms_max: 0.0,
            pass_ms_sum: 0.0,
            passes: 0,
            min_on: 0,
            trace: std::env::var_os("FERRY_SIM_TRACE").is_some(),
            evacuation_moves: 0,
        }
    }

    fn up(&self, h: usize) -> bool {
        matches!(self.hosts[h].state, HostState::On | HostState::Evacuating)
    }

    /// The model the coordinator would read now.
    fn model(&self, now: u64) -> Model {
        // A booting host counts as on (its capacity is coming) but takes no VM yet; a failed one
        // is not there at all.
        let hosts = self
            .hosts
            .iter()
            .filter(|h| !matches!(h.state, HostState::Failed(_)))
            .map(|h| Host {
                name: h.name.clone(),
                cores: HOST_CORES,
                memory_mib: HOST_MEMORY_MIB,
                on: !matches!(h.state, HostState::Standby),
                accepts: h.state == HostState::On,
                switchable: true,
            })
            .collect();
        // A VM being moved, or queued to be, counts where it is going (as the coordinator's
        // model does): two decisions never count on the same room.
        let queued: std::collections::HashMap<usize, usize> = self.queue.iter().copied().collect();
        let vms = self
            .vms
            .iter()
            .enumerate()
            .map(|(i, v)| Vm {
                name: v.name.clone(),
                host: self.hosts[v
                    .moving
                    .map(|(_, to)| to)
                    .or_else(|| queued.get(&i).copied())
                    .unwrap_or(v.host)]
                .name
                .clone(),
                cpu: v.demand,
                memory_mib: v.memory_mib,
                dirty_mib_s: v.dirty_mib_s,
                movable: v.moving.is_none()
                    && !queued.contains_key(&i)
                    && now >= v.cooldown_until
                    && self.hosts[v.host].state == HostState::On,
                migrating: v.moving.is_some() || queued.contains_key(&i),
            })
            .collect();
        Model { hosts, vms }
    }

    fn host_index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    fn vm_index(&self, name: &str) -> Option<usize> {
        name.strip_prefix("vm")
            .and_then(|n| n.parse().ok())
            .filter(|&i: &usize| i < self.vms.len())
    }

    fn minute(&mut self, t: u64) {
        let day_frac = (t % 1440) as f64 / 1440.0;
        for v in &mut self.vms {
            // A burst: a few per VM per week, half an hour at full demand.
            if t >= v.burst_until && self.rng.f() < 1.0 / (7.0 * 1440.0) * 3.0 {
                v.burst_until = t + 30;
            }
            let phase = 2.0 * std::f64::consts::PI * (day_frac - v.peak_h / 24.0);
            let diurnal = v.base + v.amp * (0.5 + 0.5 * phase.cos()).powi(3);
            let frac = if t < v.burst_until {
                0.9
            } else {
                (diurnal + v.noise * self.rng.normal()).clamp(0.01, 1.0)
            };
            v.demand = frac * v.vcpus;
        }
        // Migrations that arrive now.
        for v in &mut self.vms {
            if let Some((at, to)) = v.moving {
                if t >= at {
                    v.host = to;
                    v.moving = None;
                }
            }
        }
        // Hosts: boots finish, repairs finish, failures (about one a week in the cluster).
        for h in 0..self.hosts.len() {
            match self.hosts[h].state {
                HostState::Booting(at) if t >= at => self.hosts[h].state = HostState::On,
                HostState::Failed(at) if t >= at => self.hosts[h].state = HostState::Standby,
                HostState::On | HostState::Evacuating
                    if self.rng.f() < 1.0 / (7.0 * 1440.0 * self.hosts.len() as f64) =>
                {
                    self.fail(h, t);
                }
                _ => {}
            }
        }
        // An evacuated host goes off.
        for h in 0..self.hosts.len() {
            if self.hosts[h].state == HostState::Evacuating
                && !self
                    .vms
                    .iter()
                    .any(|v| v.host == h || v.moving.is_some_and(|(_, to)| to == h))
            {
                self.hosts[h].state = HostState::Standby;
            }
        }
        self.admit(t);
        self.measure(t);
    }

    /// A host dies: its VMs restart elsewhere (HA), migrations to or from it are lost.
    fn fail(&mut self, h: usize, t: u64) {
        self.failures += 1;
        self.hosts[h].state = HostState::Failed(t + REPAIR_MIN);
        self.queue.retain(|&(_, to)| to != h);
        for i in 0..self.vms.len() {
            if self.vms[i].moving.is_some_and(|(_, to)| to == h) {
                self.vms[i].moving = None;
            }
        }
        let victims: Vec<usize> = (0..self.vms.len())
            .filter(|&i| self.vms[i].host == h)
            .collect();
        for i in victims {
            self.vms[i].moving = None;
            let dest = self.least_loaded_fitting(i);
            if let Some(d) = dest {
                self.vms[i].host = d;
                self.restarts += 1;
            }
        }
    }

    /// HA placement: the host that is on with the lowest load that has the memory.
    fn least_loaded_fitting(&self, vm: usize) -> Option<usize> {
        let mut cpu = vec![0.0; self.hosts.len()];
        let mut mem = vec![0u64; self.hosts.len()];
        for v in &self.vms {
            cpu[v.host] += v.demand;
            mem[v.host] += v.memory_mib;
        }
        (0..self.hosts.len())
            .filter(|&h| {
                self.hosts[h].state == HostState::On
                    && mem[h] + self.vms[vm].memory_mib <= HOST_MEMORY_MIB
            })
            .min_by(|&a, &b| cpu[a].total_cmp(&cpu[b]))
    }

    /// Starts queued migrations while the limits allow.
    fn admit(&mut self, t: u64) {
        let on = (0..self.hosts.len()).filter(|&h| self.up(h)).count();
        let max = (on / 2).max(1);
        let mut busy = vec![false; self.hosts.len()];
        let mut running = 0;
        for v in &self.vms {
            if let Some((_, to)) = v.moving {
                running += 1;
                busy[v.host] = true;
                busy[to] = true;
            }
        }
        let mut left = VecDeque::new();
        let evacuations = self.queue.len();
        let mut pending: VecDeque<(usize, usize)> = self.queue.drain(..).collect();
        pending.extend(self.moves.drain(..));
        let mut n = 0;
        while let Some((vm, to)) = pending.pop_front() {
            n += 1;
            let from = self.vms[vm].host;
            // Only to a host that takes VMs (not one being emptied since the move was planned).
            if self.vms[vm].moving.is_some()
                || from == to
                || self.hosts[to].state != HostState::On
                || !self.up(from)
            {
                continue;
            }
            if running >= max || busy[from] || busy[to] {
                if n <= evacuations {
                    left.push_back((vm, to));
                } else {
                    self.moves.push_back((vm, to));
                }
                continue;
            }
            let v = &mut self.vms[vm];
            let minutes =
                (v.memory_mib as f64 / MIGRATION_MIB_MIN * (1.0 + v.dirty_mib_s / 100.0)).ceil();
            v.moving = Some((t + (minutes as u64).max(1), to));
            v.cooldown_until = t + COOLDOWN_MIN;
            v.migrations += 1;
            self.migrations += 1;
            if n <= evacuations {
                self.evacuation_moves += 1;
            }
            busy[from] = true;
            busy[to] = true;
            running += 1;
        }
        self.queue = left;
    }

    fn measure(&mut self, t: u64) {
        let mut cpu = vec![0.0; self.hosts.len()];
        for v in &self.vms {
            cpu[v.host] += v.demand;
        }
        let mut on = 0;
        for (h, host) in self.hosts.iter().enumerate() {
            match host.state {
                HostState::On | HostState::Evacuating => {
                    on += 1;
                    if cpu[h] > HOST_CORES {
                        self.overload_host_min += 1;
                        if self.trace {
                            self.trace_overload(t, h, cpu[h]);
                        }
                    }
                }
                HostState::Standby | HostState::Booting(_) => self.off_host_min += 1,
                HostState::Failed(_) => {}
            }
        }
        self.min_on = if self.samples == 0 {
            on
        } else {
            self.min_on.min(on)
        };
        // The imbalance as the policy computes it: the spread of load over the hosts on.
        let loads: Vec<f64> = (0..self.hosts.len())
            .filter(|&h| self.up(h))
            .map(|h| cpu[h] / HOST_CORES)
            .collect();
        let n = loads.len().max(1) as f64;
        let mean = loads.iter().sum::<f64>() / n;
        let imb = (loads.iter().map(|l| (l - mean) * (l - mean)).sum::<f64>() / n).sqrt();
        self.imbalance_sum += imb;
        self.imbalance_max = self.imbalance_max.max(imb);
        self.samples += 1;
    }

    /// `FERRY_SIM_TRACE`: one line per overloaded host-minute, with what was going on there.
    fn trace_overload(&self, t: u64, h: usize, cpu: f64) {
        let on_h = || self.vms.iter().filter(move |v| v.host == h);
        eprintln!(
            "overload t={} hour={} host={} load={:.2} vms={} bursting={} leaving={} arriving={}",
            t,
            (t % 1440) / 60,
            self.hosts[h].name,
            cpu / HOST_CORES,
            on_h().count(),
            on_h().filter(|v| t < v.burst_until).count(),
            on_h().filter(|v| v.moving.is_some()).count(),
            self.vms
                .iter()
                .filter(|v| v.moving.is_some_and(|(_, to)| to == h))
                .count()
        );
    }

    /// One coordinator pass: power first (it may empty a host), then balance.
    fn pass(&mut self, t: u64) {
        let start = Instant::now();
        let model = self.model(t);
        let fits = |_: &Vm, _: &Host| true;
        let pressure = balance::pressure(&model);
        let load = pressure.load;
        // As the coordinator: nothing while a host is being switched on; a few hosts emptied
        // at once at most (the windows keep watching meanwhile).
        let way = self.window.observe(t * 60, &pressure, &self.power);
        let booting = self
            .hosts
            .iter()
            .any(|h| matches!(h.state, HostState::Booting(_)));
        let evacuating = self
            .hosts
            .iter()
            .filter(|h| h.state == HostState::Evacuating)
            .count();
        let on = (0..self.hosts.len()).filter(|&h| self.up(h)).count();
        let way =
            way.filter(|&on_way| !booting && (on_way || evacuating < balance::max_evacuating(on)));
        if let Some(way) = way {
            let advice = balance::power(&model, &self.power, way, fits);
            if self.trace {
                eprintln!("pass t={t} load={load:.2} way={way} -> {advice:?}");
            }
            match advice {
                Power::On { hosts, .. } => {
                    for host in hosts {
                        if let Some(h) = self.host_index(&host) {
                            if self.hosts[h].state == HostState::Standby {
                                self.hosts[h].state = HostState::Booting(t + BOOT_MIN);
                            }
                        }
                    }
                }
                Power::Off { host, moves, .. } => {
                    if let Some(h) = self.host_index(&host) {
                        self.hosts[h].state = HostState::Evacuating;
                        for m in moves {
                            if let (Some(v), Some(to)) =
                                (self.vm_index(&m.vm), self.host_index(&m.to))
                            {
                                self.queue.push_back((v, to));
                            }
                        }
                    }
                }
                Power::Hold => {}
            }
        }
        // VMs still on a host being emptied whose move was lost (its destination went away):
        // planned again.
        for i in 0..self.vms.len() {
            let h = self.vms[i].host;
            if self.hosts[h].state == HostState::Evacuating
                && self.vms[i].moving.is_none()
                && !self.queue.iter().any(|&(v, _)| v == i)
            {
                if let Some(d) = self.least_loaded_fitting(i) {
                    self.queue.push_back((i, d));
                }
            }
        }
        let model = self.model(t);
        self.moves.clear();
        for m in balance::balance(&model, &self.balance, fits) {
            if let (Some(v), Some(to)) = (self.vm_index(&m.vm), self.host_index(&m.to)) {
                self.moves.push_back((v, to));
            }
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        self.pass_ms_max = self.pass_ms_max.max(ms);
        self.pass_ms_sum += ms;
        self.passes += 1;
    }
}

/// Runs the simulation and prints its summary and the one line a script reads.
pub fn run(a: &SimArgs) -> Result<()> {
    if a.hosts < 2 || a.vms == 0 || a.days == 0 {
        bail!("sim needs at least 2 hosts, 1 VM and 1 day");
    }
    let wall = Instant::now();
    let mut sim = Sim::new(a);
    let minutes = a.days * 1440;
    let trace = sim.trace;
    println!(
        "# sim: {} hosts ({} cores, {} GiB each), {} VMs, {} days, seed {}",
        a.hosts,
        HOST_CORES,
        HOST_MEMORY_MIB >> 10,
        a.vms,
        a.days,
        a.seed
    );
    for t in 0..minutes {
        if t.is_multiple_of(PASS_EVERY_MIN) {
            sim.pass(t);
        }
        sim.minute(t);
        if trace && t % 60 == 0 {
            let m = sim.model(t);
            let over = {
                let mut cpu = std::collections::HashMap::new();
                for v in &m.vms {
                    *cpu.entry(v.host.clone()).or_insert(0.0) += v.cpu;
                }
                cpu.values().filter(|&&c| c > HOST_CORES).count()
            };
            eprintln!(
                "t={:>5}h on={} load={:.2} imb={:.3} over={} queue={} moves={} moving={}",
                t / 60,
                m.hosts.iter().filter(|h| h.on).count(),
                balance::cluster_load(&m),
                balance::imbalance(&m),
                over,
                sim.queue.len(),
                sim.moves.len(),
                sim.vms.iter().filter(|v| v.moving.is_some()).count()
            );
        }
        if t % 1440 == 1439 {
            let on = (0..sim.hosts.len()).filter(|&h| sim.up(h)).count();
            println!(
                "day {}: {} hosts on at midnight, {} migrations so far, {} host-minutes overloaded",
                t / 1440 + 1,
                on,
                sim.migrations,
                sim.overload_host_min
            );
        }
    }
    let host_min = (a.hosts as u64 * minutes) as f64;
    let off_pct = sim.off_host_min as f64 / host_min * 100.0;
    let per_vm_day = sim.migrations as f64 / a.vms as f64 / a.days as f64;
    println!(
        "host-hours off: {:.1} % ({} of {}), fewest hosts on: {}",
        off_pct,
        sim.off_host_min / 60,
        host_min as u64 / 60,
        sim.min_on
    );
    println!(
        "host-minutes above 100 % of cores: {}; imbalance mean {:.3}, max {:.3}",
        sim.overload_host_min,
        sim.imbalance_sum / sim.samples.max(1) as f64,
        sim.imbalance_max
    );
    println!(
        "migrations: {} ({per_vm_day:.2} per VM per day; {} to empty hosts, {} to balance); host failures {}, HA restarts {}",
        sim.migrations, sim.evacuation_moves, sim.migrations - sim.evacuation_moves, sim.failures, sim.restarts
    );
    println!(
        "coordinator pass: mean {:.2} ms, slowest {:.2} ms over {} passes; wall time {:.1} s",
        sim.pass_ms_sum / sim.passes.max(1) as f64,
        sim.pass_ms_max,
        sim.passes,
        wall.elapsed().as_secs_f64()
    );
    println!(
        "sim: hosts={} vms={} days={} off_host_hours_pct={:.1} overload_host_min={} migrations_per_vm_day={:.2} pass_ms={:.2}",
        a.hosts, a.vms, a.days, off_pct, sim.overload_host_min, per_vm_day, sim.pass_ms_max
    );
    Ok(())
}
