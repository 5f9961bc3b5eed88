//! Consumer side of the BPF ring buffer (`BPF_MAP_TYPE_RINGBUF`), reading records in batches.
//!
//! The kernel maps a ring buffer as: one writable page holding the consumer position, then one
//! read-only page holding the producer position, then the data area mapped twice in a row so
//! that a record wrapping past the end is contiguous. Each record starts with an 8-byte header
//! (length with busy and discard bits, page offset) and is padded to 8 bytes.
//!
//! A consumer that publishes its position after every record moves that cache line to its own
//! core once per record, and every reservation on the packet path then has to fetch it back.
//! This reader publishes once per batch: the packet path pays for the line once per batch.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicUsize, Ordering},
};

use aya::maps::MapData;

use crate::Error;

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: usize = 8;

/// One `mmap`ed region, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, offset: usize, len: usize, prot: libc::c_int) -> Result<Self, std::io::Error> {
        let off =
            libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh shared mapping of a ring-buffer map fd; the kernel validates offset,
        // length and protection against the map's layout.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `new`, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Batch consumer of one ring-buffer map.
pub(crate) struct Ring {
    map: MapData,
    consumer: Mapping,
    /// Producer page followed by the data area mapped twice.
    producer: Mapping,
    page: usize,
    mask: usize,
    /// Our position: records before it have been handed out.
    pos: usize,
}

// SAFETY: the mappings are owned by this value; access goes through atomics or reads of
// committed records, which the kernel does not write until the consumer position passes them.
unsafe impl Send for Ring {}

impl Ring {
    pub(crate) fn new(map: MapData, name: &'static str) -> Result<Self, Error> {
        let size = map.info().map_err(Error::map(name))?.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let fd = map.fd().as_fd().as_raw_fd();
        let mmap_err = |e| Error::RingMap { name, source: e };
        let consumer = Mapping::new(fd, 0, page, libc::PROT_READ | libc::PROT_WRITE).map_err(mmap_err)?;
        let producer = Mapping::new(fd, page, page + 2 * size, libc::PROT_READ).map_err(mmap_err)?;
        let mut ring = Self { map, consumer, producer, page, mask: size - 1, pos: 0 };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicUsize {
        // SAFETY: the consumer page starts with the position, a naturally aligned usize the
        // kernel reads with acquire semantics; the mapping lives as long as `self`.
        unsafe { self.consumer.ptr.cast::<AtomicUsize>().as_ref() }
    }

    fn producer_pos(&self) -> usize {
        // SAFETY: as above, for the producer page, which the kernel writes with release
        // semantics after a record's header.
        unsafe { self.producer.ptr.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }

    /// Hand every committed record to `f`, then publish the new consumer position once.
    /// Returns the number of records read (discarded ones included).
    pub(crate) fn consume(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let end = self.producer_pos();
        let mut n = 0;
        while self.pos != end {
            let off = self.page + (self.pos & self.mask);
            // SAFETY: `off` is inside the first copy of the data area; headers are 8-byte
            // aligned. The kernel commits a record by clearing the busy bit (release).
            let header =
                unsafe { self.producer.ptr.add(off).cast::<AtomicU32>().as_ref() }.load(Ordering::Acquire);
            if header & BUSY_BIT != 0 {
                // Reserved but not yet submitted: stop here, it is next in order.
                break;
            }
            let len = (header & !(BUSY_BIT | DISCARD_BIT)) as usize;
            if len > self.mask {
                // A length the kernel cannot have written: stop rather than read past the ring.
                break;
            }
            if header & DISCARD_BIT == 0 {
                // SAFETY: the record is committed and lies within the doubly mapped data area
                // (len ≤ ring size), so it is contiguous; the kernel does not reuse it before
                // the consumer position passes it.
                let data = unsafe {
                    std::slice::from_raw_parts(self.producer.ptr.add(off + HEADER_BYTES).as_ptr(), len)
                };
                f(data);
            }
            self.pos = self.pos.wrapping_add((len + HEADER_BYTES).next_multiple_of(8));
            n += 1;
        }
        if n > 0 {
            // Release: our reads of the records happen before the kernel may reuse them.
            self.consumer_pos().store(self.pos, Ordering::Release);
        }
        n
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
