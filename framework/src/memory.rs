//! Peak heap measurement for `mmpg bench`: a counting global allocator that a binary installs,
//! and a probe that reads the peak reached while a closure runs.
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: mmpg::memory::PeakAllocator = mmpg::memory::PeakAllocator;
//! ```
//!
//! Without the allocator installed, [`peak_during`] reports `None` rather than a wrong zero.
#![allow(unsafe_code)] // GlobalAlloc is an unsafe trait; this forwards to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static PROBE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The system allocator, counting live bytes and their high-water mark.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeakAllocator;

impl PeakAllocator {
    fn grew(size: usize) {
        let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call forwards to `System` with the caller's layout unchanged; the counters
// are side data and never affect the returned memory.
unsafe impl GlobalAlloc for PeakAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        INSTALLED.store(true, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as received.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            if new_size >= layout.size() {
                Self::grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        new
    }
}

/// Runs `f` and returns its result with the peak heap bytes allocated above what was live
/// when it started (process-wide: threads `f` spawns count too). `None` when the binary did
/// not install [`PeakAllocator`]. Concurrent probes run one after another, so none resets
/// another's peak; a probe must not nest inside another (it would wait for it forever).
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, Option<u64>) {
    let _guard = PROBE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    let peak = PEAK.load(Ordering::Relaxed);
    let installed = INSTALLED.load(Ordering::Relaxed);
    (out, installed.then(|| peak.saturating_sub(base) as u64))
}
