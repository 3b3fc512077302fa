//! Builds the bare-metal test guests with the machine's `gcc` and places them both in
//! `OUT_DIR` (for the tests, via `ferry_guests::path`) and in `target/guests/<name>.elf`.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: &[(&str, &[&str])] = &[("dirtier", &["dirtier/start.S", "dirtier/dirtier.c"])];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out.
    let target_dir = out.ancestors().nth(4).map(Path::to_path_buf);
    for (name, sources) in GUESTS {
        let elf = out.join(format!("{name}.elf"));
        let mut cmd = Command::new(std::env::var("FERRY_GUEST_CC").unwrap_or("gcc".into()));
        cmd.args([
            "-O2",
            "-m64",
            "-ffreestanding",
            "-fno-pic",
            "-fno-pie",
            "-no-pie",
            "-nostdlib",
            "-nostartfiles",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-fno-stack-protector",
            "-static",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wl,--build-id=none",
            "-Wl,--no-warn-rwx-segments",
        ]);
        cmd.arg(format!(
            "-Wl,-T,{}",
            manifest.join(name).join("link.ld").display()
        ));
        cmd.arg("-o").arg(&elf);
        for s in *sources {
            cmd.arg(manifest.join(s));
            println!("cargo:rerun-if-changed={s}");
        }
        println!("cargo:rerun-if-changed={name}/link.ld");
        let status = cmd
            .status()
            .unwrap_or_else(|e| panic!("cannot run gcc for guest {name}: {e}"));
        assert!(status.success(), "building guest {name} failed");
        if let Some(t) = &target_dir {
            let dir = t.join("guests");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(&elf, dir.join(format!("{name}.elf")));
        }
        println!(
            "cargo:rustc-env=FERRY_GUEST_{}={}",
            name.to_uppercase(),
            elf.display()
        );
    }
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_CC");
}
