//! ztseg enforcer: loads the kernel data plane, pins it, attaches it to workload interfaces and
//! cgroups, and writes policy into its maps.
//!
//! Everything lives under one bpffs pin directory per enforcer instance, so several instances
//! coexist on a machine and a restarted process picks up the maps and links its predecessor
//! left: enforcement never has a gap and no state is lost. See `docs/datapath.md`.

pub mod addr;
pub mod datapath;
pub mod error;
pub mod events;
pub mod holder;
pub mod link;
pub mod netns;
mod ring;
pub mod time;
pub mod writer;

pub use datapath::{Datapath, DatapathOptions, TcHook};
pub use error::Error;
pub use events::{EventReader, FlowEvent};
pub use writer::{AdminRule, EventRateLimit, RangeKey, Rule, RuleHandle, Workload};

/// The eBPF object built from `enforcer-ebpf`, embedded at compile time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztseg"));
