//! A counting global allocator for the memory tests (`attention_memory`, `vae_tiling`,
//! `vae_attention_memory`): each binary that declares `mod common;` installs it and measures a
//! closure's heap high-water mark with [`measured_peak`]. The tests of one binary share the one
//! counter, so each measuring test holds [`SERIAL`] while it runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Taken by every test that measures, so no other test's allocations land in its peak.
pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

// A global allocator is the one way to see every heap byte candle's CPU kernels take; the trait
// is unsafe by definition.
// SAFETY: every call is forwarded to `System` unchanged; only counters are updated beside it.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes `f` peaks at beyond what was live when it started.
pub(crate) fn measured_peak<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    let peak = PEAK.load(Ordering::SeqCst);
    (out, (peak - base) as u64)
}
