//! Entering a network namespace (for enforcers of simulated hosts in the lab).
//!
//! `setns(CLONE_NEWNET)` changes the calling thread only, so call this before starting any
//! other thread (or a tokio runtime); the mount namespace is untouched, so bpffs stays visible.

use std::{fs::File, os::fd::AsRawFd as _, path::Path};

/// Move the calling thread into the network namespace at `path` (e.g. `/run/netns/NAME`).
pub fn enter(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: setns with a namespace fd we hold open; affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}
