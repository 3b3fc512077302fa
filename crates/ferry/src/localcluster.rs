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

const MGMT_BRIDGE: &str = "ferry-mgmt";
const MIG_BRIDGE: &str = "ferry-mig";
const MGMT_NET: &str = "10.88.0";
const MIG_NET: &str = "10.88.1";
const API_PORT: u16 = 7400;
const ETCD_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// What `up` started, for `down`.
#[derive(Serialize, Deserialize)]
struct State {
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
pub fn default_dir() -> PathBuf {
    PathBuf::from("/var/tmp/ferry-local-cluster")
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
    let f =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
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
pub fn up(hosts: u8, dir: &Path, out: Output) -> Result<()> {
    if !(1..=9).contains(&hosts) {
        bail!("--hosts must be 1 to 9");
    }
    if dir.join("cluster.json").exists() {
        bail!(
            "a local cluster already runs from {} (ferry cluster down first)",
            dir.display()
        );
    }
    down_quietly(dir);
    std::fs::create_dir_all(dir.join("shared/images"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let s = |p: PathBuf| p.display().to_string();

    // The two networks.
    for (br, net) in [(MGMT_BRIDGE, MGMT_NET), (MIG_BRIDGE, MIG_NET)] {
        ip(&["link", "add", br, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", br])?;
        ip(&["link", "set", br, "up"])?;
    }

    // etcd on the management network.
    let etcd_dir = dir.join("etcd");
    std::fs::create_dir_all(&etcd_dir)?;
    let client = format!("http://{MGMT_NET}.1:{ETCD_PORT}");
    let peer = format!("http://127.0.0.1:{ETCD_PEER_PORT}");
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
        hosts: Vec::new(),
        etcd_pid,
    };
    for i in 1..=hosts {
        let h = format!("h{i}");
        let ns = format!("ferry-{h}");
        let (mgmt_ip, mig_ip) = (
            format!("{MGMT_NET}.{}", 10 + i),
            format!("{MIG_NET}.{}", 10 + i),
        );
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for (br, veth, inner, addr) in [
            (MGMT_BRIDGE, format!("fm-{h}"), "eth0", &mgmt_ip),
            (MIG_BRIDGE, format!("fg-{h}"), "eth1", &mig_ip),
        ] {
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", inner, "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", br, "up"])?;
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
                 pki_dir = \"{pki}\"\nlease_ttl_s = 5\n\n[store]\nkind = \"etcd\"\nendpoints = [\"{client}\"]\n",
                shared = s(dir.join("shared")),
                run = s(dir.join(format!("run-{h}"))),
                tok = s(dir.join("token")),
            ),
        )?;
        let pid = spawn_logged(
            Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&ferryd)
                .arg("--config")
                .arg(&cfg),
            &dir.join(format!("{h}.log")),
        )?;
        state.hosts.push(LocalHost {
            name: h,
            netns: ns,
            api: format!("http://{mgmt_ip}:{API_PORT}"),
            pid,
        });
    }
    std::fs::write(dir.join("cluster.json"), serde_json::to_vec_pretty(&state)?)?;

    // Wait until every host has joined and one coordinates.
    let api = state.hosts[0].api.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = ferry_cluster::api::call(&format!("{api}/v1/cluster"), &token, "GET", None);
        if let Ok(v) = &v {
            if v["hosts"] == u64::from(hosts) && v["coordinator"].is_string() {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the local cluster did not come up within 60 s ({}); logs in {}",
                v.err().unwrap_or_default(),
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

/// `ferry cluster down`.
pub fn down(dir: &Path, out: Output) -> Result<()> {
    let had = dir.join("cluster.json").exists();
    down_quietly(dir);
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
fn down_quietly(dir: &Path) {
    let state: Option<State> = std::fs::read(dir.join("cluster.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
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
    for i in 1..=9 {
        quiet_ip(&["netns", "del", &format!("ferry-h{i}")]);
        quiet_ip(&["link", "del", &format!("fm-h{i}")]);
        quiet_ip(&["link", "del", &format!("fg-h{i}")]);
    }
    quiet_ip(&["link", "del", MGMT_BRIDGE]);
    quiet_ip(&["link", "del", MIG_BRIDGE]);
    let _ = std::fs::remove_dir_all(dir);
}
