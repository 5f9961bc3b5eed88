//! Loading, pinning and attaching the data plane.
//!
//! Maps are pinned by name in the pin directory and reused when they already exist; links are
//! pinned under `links/`, so the programs stay attached after this process exits or is killed.
//! Removing a link's pin file (see [`Datapath::detach_tc`], [`Datapath::uninstall`]) is the
//! only way enforcement goes away.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
    },
};
use enforcer_common::{ABI_VERSION, Config, map_names, program_names};

use crate::{Error, writer::Writer};

/// Filesystem magic of bpffs (`statfs.f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Directory under the pin directory that holds pinned links.
const LINKS_DIR: &str = "links";

/// Map sizes chosen at creation. They only take effect when the maps do not exist yet; pinned
/// maps keep the size they were created with.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    pub policy_entries: u32,
    pub rule_slots: u32,
    pub conntrack_entries: u32,
    pub identity_entries: u32,
    /// Range keys (port ranges per peer pair, protocol and direction).
    pub range_entries: u32,
    /// Emit an event for every new allowed flow (drops and audits are always reported).
    pub flow_events: bool,
    /// Local delivery between workloads on this host (see `docs/datapath.md`).
    pub local_delivery: bool,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            policy_entries: 65_536,
            rule_slots: 65_536,
            conntrack_entries: 131_072,
            identity_entries: 65_536,
            range_entries: 8192,
            flow_events: true,
            local_delivery: true,
        }
    }
}

/// Where a TC program sits relative to a workload's host-side interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    /// Packets the workload sends (host-side ingress): the workload's egress check.
    FromWorkload,
    /// Packets delivered to the workload (host-side egress): its ingress check.
    ToWorkload,
}

impl TcHook {
    fn program(self) -> &'static str {
        match self {
            TcHook::FromWorkload => program_names::TC_FROM_WORKLOAD,
            TcHook::ToWorkload => program_names::TC_TO_WORKLOAD,
        }
    }
    fn attach_type(self) -> TcAttachType {
        match self {
            TcHook::FromWorkload => TcAttachType::Ingress,
            TcHook::ToWorkload => TcAttachType::Egress,
        }
    }
    fn tag(self) -> &'static str {
        match self {
            TcHook::FromWorkload => "from",
            TcHook::ToWorkload => "to",
        }
    }
}

const CGROUP_PROGRAMS: [&str; 6] = [
    program_names::CGROUP_SKB_INGRESS,
    program_names::CGROUP_SKB_EGRESS,
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
];

/// A loaded data plane bound to one pin directory.
pub struct Datapath {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath").field("pin_dir", &self.pin_dir).finish_non_exhaustive()
    }
}

/// Mount bpffs at `/sys/fs/bpf` if nothing is mounted there yet.
pub fn ensure_bpffs(root: &Path) -> Result<(), Error> {
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).map_err(|source| Error::PinDir { path: root.into(), source })?;
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(root)
        .status()
        .map_err(|source| Error::PinDir { path: root.into(), source })?;
    if status.success() && is_bpffs(root) { Ok(()) } else { Err(Error::NotBpffs { path: root.into() }) }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &raw mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}

impl Datapath {
    /// Load the data plane for `pin_dir` (created if needed, must be on bpffs), reusing any
    /// maps already pinned there. Programs are loaded but not attached.
    pub fn open(pin_dir: &Path, opts: &DatapathOptions) -> Result<Self, Error> {
        fs::create_dir_all(pin_dir.join(LINKS_DIR))
            .map_err(|source| Error::PinDir { path: pin_dir.into(), source })?;
        if !is_bpffs(pin_dir) {
            return Err(Error::NotBpffs { path: pin_dir.into() });
        }
        let fresh = !pin_dir.join(map_names::CONFIG).exists();
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(pin_dir)
            .map_max_entries(map_names::POLICY, opts.policy_entries)
            .map_max_entries(map_names::RULES, opts.rule_slots)
            .map_max_entries(map_names::CONNTRACK4, opts.conntrack_entries)
            .map_max_entries(map_names::CONNTRACK6, opts.conntrack_entries)
            .map_max_entries(map_names::IDENTITY, opts.identity_entries)
            .map_max_entries(map_names::RANGES, opts.range_entries);
        let mut ebpf = loader.load(crate::EBPF_OBJECT).map_err(|e| Error::Load(Box::new(e)))?;

        // The layout version lives in the config map's first element, in a field userspace
        // owns; a mismatch means the pinned maps were made by an incompatible build.
        {
            let map = ebpf.map_mut(map_names::CONFIG).ok_or(Error::MissingMap { name: map_names::CONFIG })?;
            let mut cfg: Array<&mut MapData, Config> =
                Array::try_from(map).map_err(Error::map(map_names::CONFIG))?;
            let mut c = cfg.get(&0, 0).map_err(Error::map(map_names::CONFIG))?;
            if fresh || c.abi_version == 0 {
                c.abi_version = ABI_VERSION;
                c.flow_events = u32::from(opts.flow_events);
                c.local_delivery = u32::from(opts.local_delivery);
                cfg.set(0, c, 0).map_err(Error::map(map_names::CONFIG))?;
            } else if c.abi_version != ABI_VERSION {
                return Err(Error::AbiMismatch {
                    path: pin_dir.into(),
                    found: c.abi_version,
                    expected: ABI_VERSION,
                });
            }
        }

        for name in [
            program_names::TC_FROM_WORKLOAD,
            program_names::TC_TO_WORKLOAD,
            program_names::TC_DELIVER,
            program_names::TC_RELATED_FROM,
            program_names::TC_RELATED_TO,
        ] {
            let prog: &mut SchedClassifier = program_mut(&mut ebpf, name)?;
            prog.load().map_err(Error::program(name))?;
        }
        for (array, slot, name) in [
            (map_names::DELIVER, 0, program_names::TC_DELIVER),
            (map_names::RELATED, 0, program_names::TC_RELATED_FROM),
            (map_names::RELATED, 1, program_names::TC_RELATED_TO),
        ] {
            set_tail_call(&mut ebpf, pin_dir, array, slot, name)?;
        }
        for name in [
            program_names::CGROUP_SKB_INGRESS,
            program_names::CGROUP_SKB_EGRESS,
            program_names::CGROUP_RELATED_EGRESS,
            program_names::CGROUP_RELATED_INGRESS,
        ] {
            let prog: &mut CgroupSkb = program_mut(&mut ebpf, name)?;
            prog.load().map_err(Error::program(name))?;
        }
        for (array, name) in [
            (map_names::RELATED_CG_EGRESS, program_names::CGROUP_RELATED_EGRESS),
            (map_names::RELATED_CG_INGRESS, program_names::CGROUP_RELATED_INGRESS),
        ] {
            set_tail_call(&mut ebpf, pin_dir, array, 0, name)?;
        }
        for name in &CGROUP_PROGRAMS[2..] {
            let prog: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            prog.load().map_err(Error::program(name))?;
        }
        let writer = Writer::open(&mut ebpf, pin_dir, fresh)?;
        Ok(Self { pin_dir: pin_dir.into(), ebpf, writer: Mutex::new(writer) })
    }

    /// Take the event reader (once).
    pub fn events(&mut self) -> Result<crate::EventReader, Error> {
        let m = self.ebpf.take_map(map_names::EVENTS).ok_or(Error::MissingMap { name: map_names::EVENTS })?;
        let aya::maps::Map::RingBuf(data) = m else {
            return Err(Error::MissingMap { name: map_names::EVENTS });
        };
        Ok(crate::EventReader::new(crate::ring::Ring::new(data, map_names::EVENTS)?))
    }

    /// Capacity of a pinned map of this data plane.
    pub fn map_capacity(&self, name: &'static str) -> Result<u32, Error> {
        let info = aya::maps::MapInfo::from_pin(self.pin_dir.join(name)).map_err(Error::map(name))?;
        Ok(info.max_entries())
    }

    /// Maps whose pinned capacity differs from `opts` (pinned maps keep the size they were
    /// created with): (map, wanted, pinned).
    pub fn capacity_mismatches(
        &self,
        opts: &DatapathOptions,
    ) -> Result<Vec<(&'static str, u32, u32)>, Error> {
        let mut out = Vec::new();
        for (name, want) in [
            (map_names::POLICY, opts.policy_entries),
            (map_names::RULES, opts.rule_slots),
            (map_names::CONNTRACK4, opts.conntrack_entries),
            (map_names::CONNTRACK6, opts.conntrack_entries),
            (map_names::IDENTITY, opts.identity_entries),
            (map_names::RANGES, opts.range_entries),
        ] {
            let have = self.map_capacity(name)?;
            if have != want {
                out.push((name, want, have));
            }
        }
        Ok(out)
    }

    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The map writer. One writer per process; it serialises its own updates.
    pub fn writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The loaded program `name`, for test runs.
    pub fn program_mut(&mut self, name: &'static str) -> Result<&mut aya::programs::Program, Error> {
        self.ebpf.program_mut(name).ok_or(Error::MissingProgram { name })
    }

    fn tc_link_path(&self, ifindex: u32, hook: TcHook) -> PathBuf {
        self.pin_dir.join(LINKS_DIR).join(format!("tc-{ifindex}-{}", hook.tag()))
    }

    /// Attach a TC program to interface `ifname` (TCX) and pin the link. An existing pinned
    /// link for the same interface and hook is kept as it is (no detach, no gap).
    ///
    /// Attaching the ingress check ([`TcHook::ToWorkload`]) also records whether the interface
    /// is a veth or netkit device with its peer in another namespace: only such an interface
    /// can receive local deliveries. The fact is read in the calling thread's namespace.
    ///
    /// A pinned link whose program is no longer attached at that interface and hook (the
    /// interface was deleted and its index reused) is replaced: the new link is attached
    /// before the stale pin goes.
    pub fn attach_tc(&mut self, ifname: &str, hook: TcHook) -> Result<(), Error> {
        let ifindex = ifindex(ifname)?;
        let path = self.tc_link_path(ifindex, hook);
        if path.exists() && tc_link_in_place(&path, ifname, hook) {
            return self.record_link(ifindex, hook);
        }
        let name = hook.program();
        let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, name)?;
        let id = prog.attach(ifname, hook.attach_type()).map_err(Error::program(name))?;
        let link = prog.take_link(id).map_err(Error::program(name))?;
        let link = FdLink::try_from(link).map_err(|e| Error::Pin {
            what: "tc link",
            path: path.clone(),
            source: Box::new(e),
        })?;
        let _ = fs::remove_file(&path);
        link.pin(&path).map_err(|e| Error::Pin { what: "tc link", path, source: Box::new(e) })?;
        self.record_link(ifindex, hook)
    }

    fn record_link(&self, ifindex: u32, hook: TcHook) -> Result<(), Error> {
        if hook != TcHook::ToWorkload {
            return Ok(());
        }
        // Local delivery is an optimisation: an interface whose facts cannot be read is simply
        // never a target (the kernel path serves it), rather than failing the attachment.
        let peer = crate::link::facts(ifindex).is_ok_and(|f| f.has_foreign_peer());
        self.writer().set_link_flags(ifindex, if peer { enforcer_common::LINK_F_PEER } else { 0 })
    }

    /// Whether a pinned TC link exists for `ifname` and `hook`.
    pub fn tc_attached(&self, ifname: &str, hook: TcHook) -> Result<bool, Error> {
        Ok(self.tc_link_path(ifindex(ifname)?, hook).exists())
    }

    /// Detach the TC program from `ifname` by removing its pinned link.
    pub fn detach_tc(&self, ifname: &str, hook: TcHook) -> Result<(), Error> {
        let ifindex = ifindex(ifname)?;
        if hook == TcHook::ToWorkload {
            // No more local deliveries to an interface whose ingress check is going away.
            self.writer().set_link_flags(ifindex, 0)?;
        }
        remove_link(&self.tc_link_path(ifindex, hook))
    }

    /// Attach the `cgroup_skb` and `sock_addr` programs to the cgroup v2 directory `cgroup` and
    /// pin the links. Returns the cgroup id to register the workload under.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<u64, Error> {
        let dir = fs::File::open(cgroup).map_err(|source| Error::Cgroup { path: cgroup.into(), source })?;
        let cgid = dir.metadata().map_err(|source| Error::Cgroup { path: cgroup.into(), source })?.ino();
        for (i, name) in CGROUP_PROGRAMS.iter().enumerate() {
            let path = self.pin_dir.join(LINKS_DIR).join(format!("cg-{cgid}-{name}"));
            if path.exists() && PinnedLink::from_pin(&path).is_ok() {
                continue;
            }
            let _ = fs::remove_file(&path);
            // Cgroup links take no attach flags (Single = 0) and always coexist with other
            // programs on the same cgroup.
            let link: FdLink = if i < 2 {
                let prog: &mut CgroupSkb = program_mut(&mut self.ebpf, name)?;
                let ty = if i == 0 { CgroupSkbAttachType::Ingress } else { CgroupSkbAttachType::Egress };
                let id = prog.attach(&dir, ty, CgroupAttachMode::Single).map_err(Error::program(name))?;
                let link = prog.take_link(id).map_err(Error::program(name))?;
                FdLink::try_from(link).map_err(|e| Error::Pin {
                    what: "cgroup link",
                    path: path.clone(),
                    source: Box::new(e),
                })?
            } else {
                let prog: &mut CgroupSockAddr = program_mut(&mut self.ebpf, name)?;
                let id = prog.attach(&dir, CgroupAttachMode::Single).map_err(Error::program(name))?;
                let link = prog.take_link(id).map_err(Error::program(name))?;
                FdLink::try_from(link).map_err(|e| Error::Pin {
                    what: "cgroup link",
                    path: path.clone(),
                    source: Box::new(e),
                })?
            };
            link.pin(&path).map_err(|e| Error::Pin { what: "cgroup link", path, source: Box::new(e) })?;
        }
        Ok(cgid)
    }

    /// Detach every program attached to the cgroup with id `cgid`.
    pub fn detach_cgroup(&self, cgid: u64) -> Result<(), Error> {
        for name in CGROUP_PROGRAMS {
            let path = self.pin_dir.join(LINKS_DIR).join(format!("cg-{cgid}-{name}"));
            if path.exists() {
                remove_link(&path)?;
            }
        }
        Ok(())
    }

    /// Remove every pinned link and map of this instance: enforcement stops.
    pub fn uninstall(pin_dir: &Path) -> Result<(), Error> {
        if !pin_dir.exists() {
            return Ok(());
        }
        let links = pin_dir.join(LINKS_DIR);
        if let Ok(entries) = fs::read_dir(&links) {
            for e in entries.flatten() {
                remove_link(&e.path())?;
            }
        }
        fs::remove_dir_all(pin_dir).map_err(|source| Error::PinDir { path: pin_dir.into(), source })
    }
}

fn remove_link(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::PinDir { path: path.into(), source }),
    }
}

/// Put the loaded program `name` into slot `slot` of the program array `array`. The tail-called
/// programs of a load replace those in the pinned arrays; a replacement is atomic, and a
/// program attached by an earlier load uses them too.
fn set_tail_call(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    array: &'static str,
    slot: u32,
    name: &'static str,
) -> Result<(), Error> {
    let prog = ebpf.program(name).ok_or(Error::MissingProgram { name })?;
    let fd = prog.fd().map_err(Error::program(name))?.try_clone().map_err(|e| Error::Pin {
        what: "program fd",
        path: pin_dir.into(),
        source: Box::new(e),
    })?;
    let map = ebpf.map_mut(array).ok_or(Error::MissingMap { name: array })?;
    let mut jump: ProgramArray<&mut MapData> = ProgramArray::try_from(map).map_err(Error::map(array))?;
    jump.set(slot, &fd, 0).map_err(Error::map(array))
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(Error::MissingProgram { name })?;
    p.try_into().map_err(Error::program(name))
}

/// Interface index of `name` in the caller's network namespace.
pub fn ifindex(name: &str) -> Result<u32, Error> {
    let c = std::ffi::CString::new(name).map_err(|_| Error::Interface {
        name: name.into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: NUL-terminated string we own.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(Error::Interface { name: name.into(), source: std::io::Error::last_os_error() })
    } else {
        Ok(idx)
    }
}

/// Whether the link pinned at `path` still has its program attached at `ifname`'s `hook`.
fn tc_link_in_place(path: &Path, ifname: &str, hook: TcHook) -> bool {
    let Ok(pinned) = PinnedLink::from_pin(path) else { return false };
    let Ok(info) = FdLink::from(pinned).info() else { return false };
    let prog = info.program_id();
    SchedClassifier::query_tcx(ifname, hook.attach_type())
        .is_ok_and(|(_, attached)| attached.iter().any(|p| p.id() == prog))
}
