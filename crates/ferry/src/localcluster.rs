//! `ferry cluster up|down`: a whole cluster on this one machine, for trying Ferry and for the
//! README's demo. Each host is a network namespace with its own `ferryd`, on two bridges (the
//! management network, where the API and etcd are, and a dedicated migration network); one
//! etcd in the root namespace; one shared directory. Needs root, `iproute2` and `etcd`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::output::print;
use crate::Output;

const API_PORT: u16 = 7400;
const ETCD_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
/// Hosts a local cluster may have: a failover cluster's sixteen nodes.
pub const MAX_HOSTS: u8 = 16;

/// The names and addresses of local cluster number `id` (0-9), so that several can coexist:
/// cluster 0 is `ferry-mgmt`, `ferry-mig`, `ferry-h1`… on 10.88.0.0/24 and 10.88.1.0/24;
/// cluster N is `ferryN-…` on 10.(88+N).0.0/24 and 10.(88+N).1.0/24.
#[derive(Clone, Copy)]
pub struct Net {
    id: u8,
}

impl Net {
    /// Local cluster `id`.
    pub fn new(id: u8) -> Result<Net> {
        if id > 9 {
            bail!("--id must be 0 to 9");
        }
        Ok(Net { id })
    }
    fn tag(self) -> String {
        if self.id == 0 {
            String::new()
        } else {
            self.id.to_string()
        }
    }
    fn mgmt_bridge(self) -> String {
        format!("ferry{}-mgmt", self.tag())
    }
    fn mig_bridge(self) -> String {
        format!("ferry{}-mig", self.tag())
    }
    fn mgmt_net(self) -> String {
        format!("10.{}.0", 88 + u16::from(self.id))
    }
    fn mig_net(self) -> String {
        format!("10.{}.1", 88 + u16::from(self.id))
    }
    /// The network namespace of host `h`.
    pub fn netns(self, h: &str) -> String {
        format!("ferry{}-{h}", self.tag())
    }
    /// The API URL of host number `i` (from 1).
    pub fn api(self, i: u8) -> String {
        format!("http://{}.{}:{API_PORT}", self.mgmt_net(), 10 + i)
    }
}

/// What `up` started, for `down`.
#[derive(Serialize, Deserialize)]
struct State {
    id: u8,
    hosts: Vec<LocalHost>,
    etcd_pid: u32,
}

#[derive(Serialize, Deserialize)]
struct LocalHost {
    name: String,
    netns: String,
    api: String,
    pid: u32,
}

/// The default directory of the local cluster.
pub fn default_dir(id: u8) -> PathBuf {
    if id == 0 {
        PathBuf::from("/var/tmp/ferry-local-cluster")
    } else {
        PathBuf::from(format!("/var/tmp/ferry-local-cluster-{id}"))
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip (install iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn quiet_ip(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate ferry")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!("{} is missing (build the whole ferry package)", p.display());
    }
    Ok(p)
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<u32> {
    let f = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot create {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(f)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    Ok(child.id())
}

/// `ferry cluster up`.
pub fn up(hosts: u8, dir: &Path, net: Net, out: Output) -> Result<()> {
    if !(1..=MAX_HOSTS).contains(&hosts) {
        bail!("--hosts must be 1 to {MAX_HOSTS}");
    }
    if dir.join("cluster.json").exists() {
        bail!(
            "a local cluster already runs from {} (ferry cluster down first)",
            dir.display()
        );
    }
    down_quietly(dir, net);
    std::fs::create_dir_all(dir.join("shared/images"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let s = |p: PathBuf| p.display().to_string();

    // The two networks.
    for (br, sub) in [
        (net.mgmt_bridge(), net.mgmt_net()),
        (net.mig_bridge(), net.mig_net()),
    ] {
        ip(&["link", "add", &br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{sub}.1/24"), "dev", &br])?;
        ip(&["link", "set", &br, "up"])?;
    }

    // etcd on the management network.
    let etcd_dir = dir.join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let client = format!("http://{}.1:{ETCD_PORT}", net.mgmt_net());
    let peer = format!("http://{}.1:{ETCD_PEER_PORT}", net.mgmt_net());
    let etcd_pid = spawn_logged(
        Command::new(std::env::var_os("FERRY_ETCD_BIN").unwrap_or_else(|| "etcd".into()))
            .args(["--name", "ferry-local", "--data-dir"])
            .arg(etcd_dir.join("member"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("ferry-local={peer}")]),
        &etcd_dir.join("etcd.log"),
    )
    .context("cannot start etcd (install Debian's etcd-server)")?;

    // The cluster's secrets.
    let token: String = {
        let mut b = [0u8; 24];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
            .context("cannot read /dev/urandom")?;
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    std::fs::write(dir.join("token"), &token)?;
    let ferry = std::env::current_exe()?;
    let run = |args: &[&str]| -> Result<()> {
        let o = Command::new(&ferry).args(args).output()?;
        if !o.status.success() {
            bail!(
                "ferry {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    };
    let ca = s(dir.join("pki/ca"));
    run(&["pki", "init", &ca, "--cluster", "local", "--host", "ca"])?;

    let ferryd = sibling("ferryd")?;
    let mut state = State {
        id: net.id,
        hosts: Vec::new(),
        etcd_pid,
    };
    for i in 1..=hosts {
        let h = format!("h{i}");
        let ns = net.netns(&h);
        let (mgmt_ip, mig_ip) = (
            format!("{}.{}", net.mgmt_net(), 10 + i),
            format!("{}.{}", net.mig_net(), 10 + i),
        );
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for (br, veth, inner, addr) in [
            (
                net.mgmt_bridge(),
                format!("fm{}-{h}", net.tag()),
                "eth0",
                &mgmt_ip,
            ),
            (
                net.mig_bridge(),
                format!("fg{}-{h}", net.tag()),
                "eth1",
                &mig_ip,
            ),
        ] {
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", inner, "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &br, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                inner,
            ])?;
            ip(&["-n", &ns, "link", "set", inner, "up"])?;
        }
        let pki = s(dir.join(format!("pki/{h}")));
        run(&["pki", "issue", "--ca", &ca, "--host", &h, &pki])?;
        let cfg = dir.join(format!("{h}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "host = \"{h}\"\nlisten = \"{mgmt_ip}:{API_PORT}\"\nmigration_ip = \"{mig_ip}\"\n\
                 shared_dir = \"{shared}\"\nrun_dir = \"{run}\"\ntoken_file = \"{tok}\"\n\
                 pki_dir = \"{pki}\"\nlease_ttl_s = 5\n\n[store]\nkind = \"etcd\"\nendpoints = [\"{client}\"]\n{drivers}",
                shared = s(dir.join("shared")),
                run = s(dir.join(format!("run-{h}"))),
                tok = s(dir.join("token")),
                drivers = power_drivers(&ferry, dir, net, hosts),
            ),
        )?;
        let pid = start_agent(&ferryd, dir, net, &h)?;
        state.hosts.push(LocalHost {
            name: h,
            netns: ns,
            api: net.api(i),
            pid,
        });
    }
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&state)?)?;

    // Wait until every host has joined and one coordinates.
    let api = state.hosts[0].api.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = ferry_cluster::peer::call(
            &format!("{api}/v1/cluster"),
            &token,
            ferry_cluster::peer::Method::Get,
            None,
        );
        if let Ok(v) = &v {
            if v["hosts"] == u64::from(hosts) && v["coordinator"].is_string() {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the local cluster did not come up within 60 s ({}); logs in {}",
                v.err().map(|e| e.to_string()).unwrap_or_default(),
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let rows = state
        .hosts
        .iter()
        .map(|h| vec![h.name.clone(), h.netns.clone(), h.api.clone()])
        .collect();
    print(
        out,
        &serde_json::json!({
            "api": api,
            "token_file": dir.join("token"),
            "shared_dir": dir.join("shared"),
            "hosts": state.hosts,
        }),
        &["HOST", "NETNS", "API"],
        rows,
    );
    if out == Output::Table {
        println!(
            "\nUse it:  export FERRY_API={api} FERRY_TOKEN_FILE={}\nShared directory: {}\nStop it: ferry cluster down",
            dir.join("token").display(),
            dir.join("shared").display()
        );
    }
    Ok(())
}

/// Starts host `h`'s ferryd in its namespace; its pid.
fn start_agent(ferryd: &Path, dir: &Path, net: Net, h: &str) -> Result<u32> {
    spawn_logged(
        Command::new("ip")
            .args(["netns", "exec", &net.netns(h)])
            .arg(ferryd)
            .arg("--config")
            .arg(dir.join(format!("{h}.toml"))),
        &dir.join(format!("{h}.log")),
    )
}

/// The local cluster's power drivers, the same table in every host's config (the coordinator
/// runs them): `ferry cluster host-power` stops and starts a host's ferryd.
fn power_drivers(ferry: &Path, dir: &Path, net: Net, hosts: u8) -> String {
    let mut t = String::from("\n# Power drivers: the local cluster switches a host off and on by stopping and starting its ferryd.\n");
    for i in 1..=hosts {
        for way in ["on", "off"] {
            if way == "on" {
                t.push_str(&format!("[power.hosts.h{i}]\n"));
            }
            t.push_str(&format!(
                "{way} = \"'{}' cluster host-power --dir '{}' --id {} h{i} {way}\"\n",
                ferry.display(),
                dir.display(),
                net.id
            ));
        }
    }
    t
}

/// `ferry cluster host-power HOST on|off`: the local cluster's power driver. `off` stops the
/// host's ferryd (it leaves the cluster, as a host switched off does); `on` starts it again in
/// its namespace.
pub fn host_power(dir: &Path, host: &str, on: bool, out: Output) -> Result<()> {
    let path = dir.join("cluster.json");
    let mut state: State = serde_json::from_slice(
        &std::fs::read(&path)
            .with_context(|| format!("no local cluster runs from {}", dir.display()))?,
    )
    .with_context(|| format!("{} is damaged", path.display()))?;
    let net = Net { id: state.id };
    let Some(i) = state.hosts.iter().position(|h| h.name == host) else {
        bail!(
            "the local cluster in {} has no host {host:?}",
            dir.display()
        );
    };
    let running = ferry_worker::client::process_alive(state.hosts[i].pid);
    let what = match (on, running) {
        (true, true) | (false, false) => "already",
        (true, false) => {
            state.hosts[i].pid = start_agent(&sibling("ferryd")?, dir, net, host)?;
            let tmp = dir.join("cluster.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
            std::fs::rename(&tmp, &path)?;
            "switched"
        }
        (false, true) => {
            signal(state.hosts[i].pid, libc::SIGTERM);
            "switched"
        }
    };
    let way = if on { "on" } else { "off" };
    print(
        out,
        &serde_json::json!({"host": host, "power": way, "pid": state.hosts[i].pid}),
        &["HOST", "POWER"],
        vec![vec![host.to_string(), format!("{what} {way}")]],
    );
    Ok(())
}

/// `ferry cluster down`.
pub fn down(dir: &Path, net: Net, out: Output) -> Result<()> {
    let had = dir.join("cluster.json").exists();
    down_quietly(dir, net);
    print(
        out,
        &serde_json::json!({"stopped": had, "dir": dir}),
        &["LOCAL CLUSTER", "STATE"],
        vec![vec![
            dir.display().to_string(),
            if had {
                "removed".into()
            } else {
                "was not running (cleaned up anyway)".into()
            },
        ]],
    );
    Ok(())
}

fn signal(pid: u32, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        // SAFETY: kill sends a signal; the pid comes from the state file `up` wrote.
        unsafe { libc::kill(p, sig) };
    }
}

fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while ferry_worker::client::process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops everything `up` may have started, whatever state it is in.
fn down_quietly(dir: &Path, net: Net) {
    let state: Option<State> = std::fs::read(dir.join("cluster.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let net = state.as_ref().map_or(net, |s| Net { id: s.id });
    if let Some(st) = &state {
        // The agents first: each stops its VMs as it leaves.
        for h in &st.hosts {
            signal(h.pid, libc::SIGTERM);
        }
        for h in &st.hosts {
            wait_gone(h.pid, Duration::from_secs(15));
            signal(h.pid, libc::SIGKILL);
        }
        signal(st.etcd_pid, libc::SIGTERM);
        wait_gone(st.etcd_pid, Duration::from_secs(10));
        signal(st.etcd_pid, libc::SIGKILL);
    }
    for i in 1..=MAX_HOSTS {
        quiet_ip(&["netns", "del", &net.netns(&format!("h{i}"))]);
        quiet_ip(&["link", "del", &format!("fm{}-h{i}", net.tag())]);
        quiet_ip(&["link", "del", &format!("fg{}-h{i}", net.tag())]);
    }
    quiet_ip(&["link", "del", &net.mgmt_bridge()]);
    quiet_ip(&["link", "del", &net.mig_bridge()]);
    let _ = std::fs::remove_dir_all(dir);
}
