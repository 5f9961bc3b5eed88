//! `ztseg-dataplane`: a minimal holder process for the data plane: loads it for a pin directory,
//! attaches TC programs to the given host-side interfaces, and keeps running until a signal.
//! Links are pinned, so stopping or killing this process leaves enforcement in place.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use enforcer::{Datapath, DatapathOptions, TcHook};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// bpffs directory holding this instance's pinned maps and links.
    #[arg(long)]
    pin_dir: PathBuf,
    /// Host-side workload interface to attach both TC programs to (repeatable).
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// Write this file once every program is attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    enforcer::datapath::ensure_bpffs(std::path::Path::new("/sys/fs/bpf"))?;
    let mut dp = Datapath::open(&args.pin_dir, &DatapathOptions::default())?;
    for iface in &args.ifaces {
        dp.attach_tc(iface, TcHook::FromWorkload)?;
        dp.attach_tc(iface, TcHook::ToWorkload)?;
    }
    let rules = dp.writer().rules().len();
    println!(
        "{{\"event\":\"ready\",\"pin_dir\":{:?},\"rules\":{rules}}}",
        args.pin_dir
    );
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"ready")?;
    }
    loop {
        std::thread::park();
    }
}
