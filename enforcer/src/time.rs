//! `CLOCK_MONOTONIC`, the clock `bpf_ktime_get_ns` reads: grant expiry is computed here and
//! compared in the kernel.

use std::time::Duration;

use crate::Error;

/// Current `CLOCK_MONOTONIC` time in nanoseconds.
pub fn monotonic_ns() -> Result<u64, Error> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    if rc != 0 {
        return Err(Error::Clock(std::io::Error::last_os_error()));
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    Ok(secs * 1_000_000_000 + nanos)
}

/// Monotonic deadline `ttl` from now.
pub fn deadline(ttl: Duration) -> Result<u64, Error> {
    let ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
    Ok(monotonic_ns()?.saturating_add(ttl).max(1))
}

/// Expiry for an optional TTL: a monotonic deadline, or 0 (never).
pub fn expiry(ttl: Option<Duration>) -> Result<u64, Error> {
    ttl.map_or(Ok(0), deadline)
}
