//! The data-plane holder process: loads the data plane for a pin directory, attaches the TC
//! programs to the given host-side interfaces, and keeps running until a signal. Links are
//! pinned, so stopping or killing it leaves enforcement in place.

use std::path::PathBuf;

use crate::{Datapath, DatapathOptions, TcHook};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// bpffs directory holding this instance's pinned maps and links.
    #[arg(long)]
    pin_dir: PathBuf,
    /// Host-side workload interface to attach both TC programs to (repeatable).
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// Enter this network namespace first (e.g. /run/netns/host1): the interfaces live there.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Write this file once every program is attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// Parse the command line and run the holder (never returns on success).
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(ns) = &args.netns {
        crate::netns::enter(ns).map_err(|e| anyhow::anyhow!("entering {}: {e}", ns.display()))?;
    }
    crate::datapath::ensure_bpffs(std::path::Path::new("/sys/fs/bpf"))?;
    let mut dp = Datapath::open(&args.pin_dir, &DatapathOptions::default())?;
    for iface in &args.ifaces {
        dp.attach_tc(iface, TcHook::FromWorkload)?;
        dp.attach_tc(iface, TcHook::ToWorkload)?;
    }
    let rules = dp.writer().rules().len();
    println!("ztseg-dataplane ready: pin_dir={} rules={rules}", args.pin_dir.display());
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"ready")?;
    }
    loop {
        std::thread::park();
    }
}
