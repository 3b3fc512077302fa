//! CPU models and cross-host CPU checks (docs/cpu-compat.md), on this machine's KVM. What
//! the guest itself sees through CPUID is checked in the lab tier (`tests/linux.rs`): this
//! machine's emulating /dev/kvm answers a guest's CPUID from its own table.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Env;

fn start(env: &Env, vm: &str, cpu: &str, extra: &[(&str, &str)]) -> std::process::Output {
    let k = ferry_guests::dirtier();
    let c = env.console(vm);
    env.ferry_env(
        &[
            "vm",
            "start",
            vm,
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "64M",
            "--cpu",
            cpu,
            "--cmdline",
            "mb=2 rate=1000 beat_ms=100",
            "--console-log",
            c.to_str().unwrap(),
        ],
        extra,
    )
}

/// The beats of `log` whose self-check passed.
fn beats(log: &Path) -> usize {
    common::beats_in(log).iter().filter(|b| b.1).count()
}

use common::wait_beats;

fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// A host config hiding `features`, as `FERRY_HOST_CONFIG` wants it.
fn host_config(env: &Env, features: &[&str]) -> String {
    let p = env.dir.join("host.toml");
    let list: Vec<String> = features.iter().map(|f| format!("{f:?}")).collect();
    std::fs::write(&p, format!("[cpu]\nhide = [{}]\n", list.join(", "))).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn cpu_models_shape_what_the_vmm_gives_the_guest() {
    let env = Env::new("cpu-models");
    let host = env.json(&["host", "cpu"]);
    let host_features = names(&host["features"]);
    for model in ["host", "x86-64-v1", "x86-64-v2", "compat"] {
        let vm = format!("m-{}", model.replace('.', ""));
        let info = &host["models"][model];
        let o = start(&env, &vm, model, &[]);
        if model != "host" && info["available"] == false {
            // A model this host cannot honour is refused, naming what is missing.
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success());
            let lacks = names(&info["lacks"]);
            assert!(
                e.contains(&format!("cannot run CPU model {model}")) && e.contains(&lacks[0]),
                "{e}"
            );
            continue;
        }
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let st = env.json(&["vm", "status", &vm]);
        assert_eq!(st["cpu_model"], model);
        let seen = names(&st["cpu_features"]);
        let want = if model == "host" {
            host_features.clone()
        } else {
            names(&info["features"])
        };
        assert_eq!(seen, want, "{model}");
        if model != "host" {
            // Nothing outside the model's definition (docs/cpu-compat.md).
            for f in [
                "avx", "avx2", "avx512f", "aes", "sha", "umip", "clwb", "rdseed",
            ] {
                assert!(!seen.contains(&f.to_string()), "{model} shows {f}");
            }
        }
        wait_beats(&env.console(&vm), 1);
        env.ok(&["vm", "stop", &vm]);
    }
    let e = env.fails(&[
        "vm",
        "start",
        "x",
        "--kernel",
        "/bin/true",
        "--cpu",
        "pentium",
    ]);
    assert!(e.contains("unknown CPU model"), "{e}");
}

#[test]
fn a_host_that_hides_features_refuses_vms_that_saw_them_and_takes_portable_ones() {
    let env = Env::new("cpu-hosts");
    let host = env.json(&["host", "cpu"]);
    let full = names(&host["features"]);
    let v1 = names(&host["models"]["x86-64-v1"]["features"]);
    // A feature this host has beyond the baseline: host B pretends not to.
    let Some(extra) = full.iter().find(|f| !v1.contains(f)).cloned() else {
        eprintln!("this host offers nothing beyond x86-64-v1; nothing to hide");
        return;
    };
    let cfg = host_config(&env, &[&extra]);
    let b_env = [("FERRY_HOST_CONFIG", cfg.as_str())];

    // Host B's inventory no longer lists it.
    let o = env.ferry_env(&["host", "cpu", "--output", "json"], &b_env);
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!names(&b["features"]).contains(&extra));
    assert_eq!(names(&b["hidden"]), vec![extra.clone()]);

    // A `host`-model VM from A saw the feature: B refuses it before anything is sent.
    assert!(start(&env, "a", "host", &[]).status.success());
    wait_beats(&env.console("a"), 2);
    let recv = |name: &str| {
        let c = env.console(name);
        let o = env.ferry_env(
            &[
                "vm",
                "receive",
                name,
                "--listen",
                "127.0.0.1:0",
                "--console-log",
                c.to_str().unwrap(),
                "--output",
                "json",
            ],
            &b_env,
        );
        assert!(o.status.success());
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["listen"].as_str().unwrap().to_string()
    };
    let addr = recv("b");
    let e = env.fails(&["vm", "migrate", "a", "--to", &addr]);
    assert!(
        e.contains("refused") && e.contains(&format!("feature {extra}")),
        "{e}"
    );
    assert_eq!(env.json(&["vm", "status", "a"])["state"], "running");
    assert_eq!(env.json(&["migration", "status", "a"])["pages_sent"], 0);
    // The same for a quick migration: B cannot restore its state file.
    let state = env.dir.join("a.state");
    env.ok(&["vm", "save", "a", "--to", state.to_str().unwrap()]);
    let o = env.ferry_env(
        &["vm", "restore", state.to_str().unwrap(), "--name", "a2"],
        &b_env,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains(&format!("feature {extra}")),
        "{e}"
    );

    // A VM on the portable baseline moves to B and keeps running there.
    assert!(start(&env, "c", "x86-64-v1", &[]).status.success());
    wait_beats(&env.console("c"), 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.names().contains(&"b".to_string()) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr = recv("d");
    env.ok(&["vm", "migrate", "c", "--to", &addr]);
    let before = beats(&env.console("c"));
    wait_beats(&env.console("d"), 2);
    assert!(before >= 2);
    env.ok(&["vm", "stop", "d"]);

    // A host config naming an unknown feature is refused with the list of known ones.
    let bad = host_config(&env, &["avx3"]);
    let o = env.ferry_env(&["host", "cpu"], &[("FERRY_HOST_CONFIG", bad.as_str())]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("unknown CPU feature \"avx3\""),
        "{e}"
    );
}
