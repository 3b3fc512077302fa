//! A snapshot of the cluster read from the store, and the placement policy over it: which
//! hosts take a VM and why the others do not, the best host, the migration limit and the
//! cluster CPU baseline. Pure: nothing here writes, so the policy is tested without a store.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::db::Db;
use crate::records::*;
use crate::ClusterError;

/// Memory a host keeps for itself beyond its VMs' RAM when placing.
pub const HOST_RESERVE_MIB: u64 = 256;

/// A snapshot of the cluster taken at the start of a pass.
pub struct View {
    /// Live hosts by name.
    pub hosts: HashMap<String, HostRecord>,
    /// Administrative state by host.
    pub admin: HashMap<String, HostAdmin>,
    /// VMs by name.
    pub vms: HashMap<String, VmRecord>,
    /// Every migration, by id.
    pub migrations: Vec<MigrationRecord>,
    /// Where each VM runs, by VM.
    pub running: HashMap<String, Vec<RunningRecord>>,
}

impl View {
    /// Reads the cluster.
    pub async fn read(db: &Db) -> Result<View, ClusterError> {
        let migrations = db
            .migrations()
            .await?
            .into_iter()
            .map(|(_, _, m)| m)
            .collect();
        let vms = db
            .vms()
            .await?
            .into_iter()
            .map(|(_, _, v)| (v.config.name.clone(), v))
            .collect();
        let hosts = db
            .hosts()
            .await?
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect();
        let admin = db
            .list::<HostAdmin>(&admin_prefix())
            .await?
            .into_iter()
            .map(|(k, _, v)| (k.rsplit('/').next().unwrap_or_default().to_string(), v))
            .collect();
        let mut running: HashMap<String, Vec<RunningRecord>> = HashMap::new();
        let all = running_prefix(None);
        for (k, _, r) in db.list::<RunningRecord>(&all).await? {
            let vm = k
                .trim_start_matches(&all)
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            running.entry(vm).or_default().push(r);
        }
        Ok(View {
            hosts,
            admin,
            vms,
            migrations,
            running,
        })
    }

    /// Whether host `h` is alive and takes VMs.
    pub fn accepts(&self, h: &str) -> bool {
        self.hosts.get(h).is_some_and(|r| !r.fenced)
            && !self
                .admin
                .get(h)
                .is_some_and(|a| a.paused || a.draining || a.power != PowerState::On)
    }

    /// Memory promised to the VMs owned by host `h` (running or about to).
    pub fn committed_mib(&self, h: &str) -> u64 {
        let owned: u64 = self
            .vms
            .values()
            .filter(|v| v.owner.as_deref() == Some(h) && v.desired == Desired::Running)
            .map(|v| v.config.memory_mib)
            .sum();
        let arriving: u64 = self
            .migrations
            .iter()
            .filter(|m| m.to == h && !m.state.done())
            .filter_map(|m| self.vms.get(&m.vm))
            .map(|v| v.config.memory_mib)
            .sum();
        owned + arriving
    }

    /// Why host `h` cannot take VM `v`, if it cannot (`extra_mib` already promised to it
    /// during this pass).
    pub fn unfit(&self, h: &str, v: &VmRecord, extra_mib: u64) -> Option<String> {
        let Some(host) = self.hosts.get(h) else {
            return Some(format!("host {h} is not in the cluster (down or unknown)"));
        };
        if host.fenced {
            return Some(format!("host {h} has fenced itself"));
        }
        if let Some(a) = self.admin.get(h) {
            if a.power != PowerState::On {
                return Some(format!(
                    "host {h} is {} (power consolidation)",
                    match a.power {
                        PowerState::Evacuating => "being emptied to be switched off",
                        PowerState::Waking | PowerState::Wake => "being switched on",
                        _ => "in standby",
                    }
                ));
            }
            if a.paused || a.draining {
                return Some(format!("host {h} is paused for maintenance"));
            }
        }
        let model = v.config.cpu.name();
        if !host.cpu_models.iter().any(|m| m == model) {
            return Some(format!("host {h} cannot run CPU model {model}"));
        }
        if let Some(owner) = v.owner.as_deref().and_then(|o| self.hosts.get(o)) {
            if owner.cpu_vendor != host.cpu_vendor {
                return Some(format!(
                    "host {h} is {} and the VM runs on {}",
                    host.cpu_vendor, owner.cpu_vendor
                ));
            }
        }
        if let Some(seen) = self.running_features(v) {
            let lacks: Vec<&str> = seen
                .iter()
                .filter(|f| !host.cpu_features.contains(f))
                .map(String::as_str)
                .collect();
            if !lacks.is_empty() {
                return Some(format!(
                    "host {h} lacks CPU features the VM sees: {} (a VM of CPU model compat, x86-64-v*, or cluster can move)",
                    lacks.join(" ")
                ));
            }
        }
        if let Some(n) = v
            .config
            .nics
            .iter()
            .find(|n| !host.bridges.contains(&n.bridge))
        {
            return Some(format!(
                "host {h} has no bridge {} for the VM's NIC {}",
                n.bridge, n.mac
            ));
        }
        let need = v.config.memory_mib + HOST_RESERVE_MIB;
        let room = host
            .memory_mib
            .saturating_sub(self.committed_mib(h) + extra_mib);
        if room < need {
            return Some(format!(
                "host {h} has {room} MiB uncommitted, the VM needs {need} MiB"
            ));
        }
        None
    }

    /// The best host for `v` other than `except`: the one with the most uncommitted memory
    /// that fits (ties: fewest VMs, then name).
    pub fn best_host(
        &self,
        v: &VmRecord,
        except: Option<&str>,
        extra: &HashMap<String, u64>,
    ) -> Result<String, String> {
        let mut best: Option<(u64, usize, String)> = None;
        let mut why = Vec::new();
        let mut names: Vec<&String> = self.hosts.keys().collect();
        names.sort();
        for h in names {
            if Some(h.as_str()) == except {
                continue;
            }
            let ext = extra.get(h).copied().unwrap_or(0);
            if let Some(r) = self.unfit(h, v, ext) {
                why.push(r);
                continue;
            }
            let room = self.hosts[h]
                .memory_mib
                .saturating_sub(self.committed_mib(h) + ext);
            let count = self
                .vms
                .values()
                .filter(|x| x.owner.as_deref() == Some(h.as_str()))
                .count();
            let better = match &best {
                None => true,
                Some((r, c, _)) => room > *r || (room == *r && count < *c),
            };
            if better {
                best = Some((room, count, h.clone()));
            }
        }
        best.map(|(_, _, h)| h).ok_or_else(|| {
            if why.is_empty() {
                "no other host is in the cluster".to_string()
            } else {
                format!("no host fits: {}", why.join("; "))
            }
        })
    }

    /// The CPU features a running VM's guest sees (from its owner's report).
    pub fn running_features(&self, v: &VmRecord) -> Option<&Vec<String>> {
        let owner = v.owner.as_ref()?;
        self.running
            .get(&v.config.name)?
            .iter()
            .find(|r| &r.host == owner)
            .map(|r| &r.cpu_features)
            .filter(|f| !f.is_empty())
    }

    /// The migration limit: the configured one, or half the live hosts (at least one).
    pub fn max_migrations(&self, configured: u32) -> usize {
        if configured > 0 {
            configured as usize
        } else {
            (self.hosts.len() / 2).max(1)
        }
    }

    /// The unfinished migration of VM `name`, if any.
    pub fn active_migration(&self, name: &str) -> Option<&MigrationRecord> {
        self.migrations
            .iter()
            .find(|m| m.vm == name && !m.state.done())
    }
}

/// The common features of the live hosts, and what each host missing some feature lacks.
pub fn baseline(view: &View) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let mut all: BTreeSet<&String> = Default::default();
    for h in view.hosts.values() {
        all.extend(h.cpu_features.iter());
    }
    let common: Vec<String> = all
        .iter()
        .filter(|f| view.hosts.values().all(|h| h.cpu_features.contains(f)))
        .map(|f| (*f).clone())
        .collect();
    let mut limits = BTreeMap::new();
    for h in view.hosts.values() {
        let lacks: Vec<String> = all
            .iter()
            .filter(|f| !h.cpu_features.contains(f))
            .map(|f| (*f).clone())
            .collect();
        if !lacks.is_empty() {
            limits.insert(h.name.clone(), lacks);
        }
    }
    (common, limits)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn host(name: &str, bridges: &[&str]) -> HostRecord {
        HostRecord {
            name: name.into(),
            api: String::new(),
            migration_ip: String::new(),
            cpu_vendor: "AuthenticAMD".into(),
            cpu_model: String::new(),
            cpu_features: Vec::new(),
            cpu_models: vec![vmm::cpuid::CpuModel::default().name().to_string()],
            cores: 2,
            bridges: bridges.iter().map(|b| b.to_string()).collect(),
            memory_mib: 4096,
            free_mib: 4096,
            load: 0.0,
            vm_memory_mib: 0,
            vms: Vec::new(),
            vm_usage: Vec::new(),
            updated: 0,
            fenced: false,
        }
    }

    pub(crate) fn vm_with_nic(bridge: &str) -> VmRecord {
        let mut n: vmm::config::NicSpec = format!("bridge={bridge}").parse().unwrap();
        n.fill_mac(0);
        VmRecord {
            config: vmm::VmConfig {
                name: "a".into(),
                vcpus: 1,
                memory_mib: 64,
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
                cpu: Default::default(),
                cpu_hide: Vec::new(),
                disks: Vec::new(),
                nics: vec![n],
                scsi: None,
            },
            ha: true,
            desired: Desired::Running,
            owner: None,
            epoch: 0,
            note: None,
            cluster_cpu: false,
        }
    }

    pub(crate) fn view(hosts: Vec<HostRecord>) -> View {
        View {
            hosts: hosts.into_iter().map(|h| (h.name.clone(), h)).collect(),
            admin: HashMap::new(),
            vms: HashMap::new(),
            migrations: Vec::new(),
            running: HashMap::new(),
        }
    }

    #[test]
    fn a_vm_with_a_nic_goes_only_where_its_bridge_is() {
        let v = view(vec![host("h1", &["br-other"]), host("h2", &["br-lan"])]);
        let vm = vm_with_nic("br-lan");
        let why = v.unfit("h1", &vm, 0).unwrap();
        assert!(why.contains("no bridge br-lan"), "{why}");
        assert_eq!(v.unfit("h2", &vm, 0), None);
        assert_eq!(v.best_host(&vm, None, &HashMap::new()).unwrap(), "h2");
        let nowhere = v.best_host(&vm, Some("h2"), &HashMap::new()).unwrap_err();
        assert!(nowhere.contains("no bridge br-lan"), "{nowhere}");
    }
}
