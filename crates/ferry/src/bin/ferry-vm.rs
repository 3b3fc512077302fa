//! `ferry-vm`: the per-VM worker process. All of it lives in the `ferry-worker` crate.

fn main() {
    std::process::exit(ferry_worker::server::main());
}
