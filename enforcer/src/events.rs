//! Reading drop, audit and new-flow events from the ring buffer.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use enforcer_common::{DIR_EGRESS, Event, Reason, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP};

use crate::{Error, addr, ring::Ring};

/// Verdict of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Allow,
    Drop,
    Audit,
}

impl Verdict {
    /// From the kernel's `VERDICT_*` value.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            VERDICT_ALLOW => Some(Self::Allow),
            VERDICT_DROP => Some(Self::Drop),
            VERDICT_AUDIT => Some(Self::Audit),
            _ => None,
        }
    }

    /// `ALLOW`, `DROP` or `AUDIT`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Drop => "DROP",
            Self::Audit => "AUDIT",
        }
    }
}

/// A decoded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    pub ts_ns: u64,
    pub verdict: Verdict,
    pub reason: Option<Reason>,
    /// Cookie of the rule or grant behind the verdict (0 = none: default deny, malformed...).
    pub cookie: u32,
    pub local_identity: u32,
    pub peer_identity: u32,
    pub local_tenant: u32,
    pub peer_tenant: u32,
    pub ifindex: u32,
    pub egress: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    /// Destination port, or `ICMP_PORT_BASE | type` for ICMP.
    pub dport: u16,
    pub proto: u8,
}

impl FlowEvent {
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<Event>() {
            return None;
        }
        // SAFETY: length checked; Event is plain old data; the read is unaligned-safe.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) };
        let verdict = Verdict::from_u8(e.verdict)?;
        Some(Self {
            ts_ns: e.ts_ns,
            verdict,
            reason: Reason::from_u8(e.reason),
            cookie: e.cookie,
            local_identity: e.local_identity,
            peer_identity: e.peer_identity,
            local_tenant: e.local_tenant,
            peer_tenant: e.peer_tenant,
            ifindex: e.ifindex,
            egress: e.dir == DIR_EGRESS,
            src: addr::from_key(e.saddr),
            dst: addr::from_key(e.daddr),
            sport: e.sport,
            dport: e.dport,
            proto: e.proto,
        })
    }
}

/// Shortest time between two drains of a busy ring in [`EventReader::batch`]. A reader that
/// follows right behind the kernel's writer reads the cache lines the packet path is writing
/// next to, and each event then pays for moving lines between cores; a millisecond apart, the
/// lines it reads are finished. The 4 MiB ring holds about 47,600 events, several milliseconds
/// of one core writing events at full speed, so nothing is lost by waiting.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(1);

/// Consumer of the events ring buffer (one per pin directory at a time).
pub struct EventReader {
    ring: Ring,
    /// When the last non-empty batch was taken.
    last_batch: Option<Instant>,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader").finish_non_exhaustive()
    }
}

impl EventReader {
    pub(crate) fn new(ring: Ring) -> Self {
        Self { ring, last_batch: None }
    }

    /// The next batch of events: waits up to `timeout` for data, but never takes two
    /// non-empty batches less than [`BATCH_INTERVAL`] apart. The loop of a reader thread.
    pub fn batch(&mut self, timeout: Duration) -> Result<Vec<FlowEvent>, Error> {
        if let Some(rest) = self.last_batch.and_then(|t| BATCH_INTERVAL.checked_sub(t.elapsed())) {
            std::thread::sleep(rest);
        }
        self.wait(timeout)?;
        let out = self.drain();
        self.last_batch = (!out.is_empty()).then(Instant::now);
        Ok(out)
    }

    /// Every event ready now, in order (records of an unknown shape are skipped). The ring's
    /// consumer position is advanced once for the whole batch.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        let mut out = Vec::new();
        self.ring.consume(|bytes| out.extend(FlowEvent::decode(bytes)));
        out
    }

    /// Wait up to `timeout` for the ring to have data.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, Error> {
        let mut pfd = libc::pollfd { fd: self.ring.raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one pollfd we own.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            return Err(Error::Poll(std::io::Error::last_os_error()));
        }
        Ok(rc > 0)
    }

    /// The raw file descriptor, for async readiness (tokio `AsyncFd`).
    #[must_use]
    pub fn as_raw_fd(&self) -> i32 {
        self.ring.raw_fd()
    }
}
