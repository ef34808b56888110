//! [`StepAlloc`]: a global allocator for processes that train, which keeps
//! a training step's large tensors out of the C heap.
//!
//! A training step allocates and frees the same large tensors every step
//! (activations, gradients, packed operands: 0.25 to 7 MB each for the
//! zoo CNN). In glibc's heap they fragment it: where a block lands depends
//! on what compiling the step left behind (tract's optimizer iterates hash
//! maps, so the layout differs from run to run), and the CNN's peak
//! resident memory moved between 81 and 128 MiB over runs of the same
//! configuration. Left to `mmap` (a low `M_MMAP_THRESHOLD`), every block
//! is mapped, faulted in page by page and unmapped again each step, which
//! cost 12-18% of the CNN step.
//!
//! Here a block of [`LARGE_BYTES`] or more gets its own anonymous mapping,
//! and a freed one is kept in a small cache, keyed by its length in pages,
//! instead of being unmapped: the next step asks for the same lengths and
//! gets the same pages back, already resident. Resident memory is then the
//! step's large tensors (at most, per length, as many as one step holds at
//! once) plus a C heap that holds only small blocks, the same in every run;
//! after the first step nothing is faulted in. Smaller blocks, and every
//! block off Linux and Android, go to the system allocator unchanged.
//!
//! The cache holds at most [`CACHE_BLOCKS`] blocks and [`CACHE_BYTES_MAX`]
//! bytes (a block that does not fit is unmapped). [`step_done`], which the
//! CPU executor calls after every step, unmaps the cached blocks that a
//! whole step went by without taking (what compiling or loading left), so
//! that the cache holds only the steps' own pattern. [`trim`] empties it
//! and returns the C heap's free pages to the system (glibc), for the
//! points where a program is done with a phase (the step is compiled and
//! its parameters loaded).
//!
//! Install it in a binary:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: fedge_engine::alloc::StepAlloc = fedge_engine::alloc::StepAlloc;
//!
//! fn main() {}
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of this many bytes or more are mapped and cached.
pub const LARGE_BYTES: usize = 256 << 10;
/// The most freed blocks the cache keeps.
pub const CACHE_BLOCKS: usize = 128;
/// The most bytes the cache keeps.
pub const CACHE_BYTES_MAX: usize = 256 << 20;

/// The global allocator (see the module docs).
pub struct StepAlloc;

/// Empty the cache of freed large blocks (unmapping them) and return the
/// C heap's free pages to the system (glibc's `malloc_trim`). A no-op
/// where [`StepAlloc`] maps nothing.
pub fn trim() {
    imp::trim();
}

/// Mark the end of a training step: cached blocks that were freed before
/// it and not taken during it are unmapped, so that the cache holds only
/// what the steps reuse (not, say, the buffers compiling the step left).
/// Cheap: a pass over at most [`CACHE_BLOCKS`] entries.
pub fn step_done() {
    imp::step_done();
}

/// Bytes of freed large blocks the cache holds now.
pub fn cached_bytes() -> usize {
    imp::cached_bytes()
}

/// Bytes of large blocks mapped now (in use or cached), and the most
/// since [`reset_peak_mapped`].
pub fn mapped_bytes() -> (usize, usize) {
    imp::mapped_bytes()
}

/// Start [`mapped_bytes`]'s peak again from the bytes mapped now.
pub fn reset_peak_mapped() {
    imp::reset_peak_mapped()
}

#[cfg(any(target_os = "linux", target_os = "android"))]
mod imp {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{CACHE_BLOCKS, CACHE_BYTES_MAX, LARGE_BYTES};

    const PAGE: usize = 4096;
    const PROT_READ: i32 = 1;
    const PROT_WRITE: i32 = 2;
    const MAP_PRIVATE: i32 = 2;
    const MAP_ANONYMOUS: i32 = 0x20;
    const MAP_FAILED: *mut u8 = !0usize as *mut u8;

    unsafe extern "C" {
        fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: isize) -> *mut u8;
        fn munmap(addr: *mut u8, len: usize) -> i32;
    }

    /// A freed block: its address, length, and the step it was freed in.
    #[derive(Clone, Copy)]
    struct Block {
        addr: usize,
        len: usize,
        step: u64,
    }

    /// Freed blocks, oldest first.
    struct Cache {
        blocks: [Block; CACHE_BLOCKS],
        n: usize,
        bytes: usize,
        /// Counts [`step_done`] calls.
        step: u64,
    }

    static CACHE: Mutex<Cache> = Mutex::new(Cache {
        blocks: [Block {
            addr: 0,
            len: 0,
            step: 0,
        }; CACHE_BLOCKS],
        n: 0,
        bytes: 0,
        step: 0,
    });
    static MAPPED: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    fn cache() -> std::sync::MutexGuard<'static, Cache> {
        // Nothing panics while holding the lock; a poisoned one is whole.
        CACHE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mapped length of a block, if it is one this allocator maps.
    pub fn mapped_len(size: usize, align: usize) -> Option<usize> {
        (size >= LARGE_BYTES && align <= PAGE).then(|| size.div_ceil(PAGE) * PAGE)
    }

    /// A block of `len` bytes (a multiple of the page): a cached one of
    /// that length, else a fresh mapping (zeroed); null when mapping fails.
    /// The flag says whether it came from the cache.
    pub fn take(len: usize) -> (*mut u8, bool) {
        {
            let mut c = cache();
            let n = c.n;
            if let Some(i) = c.blocks[..n].iter().rposition(|b| b.len == len) {
                let addr = c.blocks[i].addr;
                c.blocks.copy_within(i + 1..n, i);
                c.n -= 1;
                c.bytes -= len;
                return (addr as *mut u8, true);
            }
        }
        // SAFETY: an anonymous private mapping of `len` bytes, no fixed
        // address; the result is checked.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == MAP_FAILED {
            return (std::ptr::null_mut(), false);
        }
        let now = MAPPED.fetch_add(len, Ordering::Relaxed) + len;
        PEAK.fetch_max(now, Ordering::Relaxed);
        (p, false)
    }

    fn unmap(addr: usize, len: usize) {
        // SAFETY: `addr` is a whole mapping of `len` bytes that `take`
        // made and nobody uses any more.
        unsafe { munmap(addr as *mut u8, len) };
        MAPPED.fetch_sub(len, Ordering::Relaxed);
    }

    /// Keep a freed block for reuse, or unmap it when the cache is full.
    pub fn give(p: *mut u8, len: usize) {
        {
            let mut c = cache();
            if c.n < CACHE_BLOCKS && c.bytes + len <= CACHE_BYTES_MAX {
                let (n, step) = (c.n, c.step);
                c.blocks[n] = Block {
                    addr: p as usize,
                    len,
                    step,
                };
                c.n += 1;
                c.bytes += len;
                return;
            }
        }
        unmap(p as usize, len);
    }

    /// Take the cached blocks `keep` does not want out of the cache.
    fn evict(keep: impl Fn(&Block) -> bool) -> ([Block; CACHE_BLOCKS], usize) {
        let mut out = [Block {
            addr: 0,
            len: 0,
            step: 0,
        }; CACHE_BLOCKS];
        let mut m = 0;
        let mut c = cache();
        let mut kept = 0;
        for i in 0..c.n {
            let b = c.blocks[i];
            if keep(&b) {
                c.blocks[kept] = b;
                kept += 1;
            } else {
                out[m] = b;
                m += 1;
                c.bytes -= b.len;
            }
        }
        c.n = kept;
        (out, m)
    }

    pub fn step_done() {
        let step = {
            let mut c = cache();
            c.step += 1;
            c.step
        };
        // Blocks freed before the step that just ended and not taken in
        // it are not part of the step's pattern.
        let (out, m) = evict(|b| b.step + 1 >= step);
        for b in &out[..m] {
            unmap(b.addr, b.len);
        }
    }

    pub fn trim() {
        let (out, m) = evict(|_| false);
        for b in &out[..m] {
            unmap(b.addr, b.len);
        }
        #[cfg(target_env = "gnu")]
        {
            unsafe extern "C" {
                fn malloc_trim(pad: usize) -> i32;
            }
            // SAFETY: malloc_trim only returns free heap pages.
            unsafe { malloc_trim(0) };
        }
    }

    pub fn cached_bytes() -> usize {
        cache().bytes
    }

    pub fn mapped_bytes() -> (usize, usize) {
        (MAPPED.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed))
    }

    pub fn reset_peak_mapped() {
        PEAK.store(MAPPED.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod imp {
    pub fn mapped_len(_size: usize, _align: usize) -> Option<usize> {
        None
    }

    pub fn take(_len: usize) -> (*mut u8, bool) {
        unreachable!("nothing is mapped here")
    }

    pub fn give(_p: *mut u8, _len: usize) {
        unreachable!("nothing is mapped here")
    }

    pub fn trim() {}

    pub fn step_done() {}

    pub fn cached_bytes() -> usize {
        0
    }

    pub fn mapped_bytes() -> (usize, usize) {
        (0, 0)
    }

    pub fn reset_peak_mapped() {}
}

// SAFETY: large blocks are whole page-aligned mappings of at least their
// size (alignment up to a page); each is handed out to one owner at a time
// and returned to the cache or unmapped only on dealloc. Everything else
// is the system allocator's.
unsafe impl GlobalAlloc for StepAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match imp::mapped_len(layout.size(), layout.align()) {
            Some(len) => imp::take(len).0,
            // SAFETY: the caller's layout, passed through.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match imp::mapped_len(layout.size(), layout.align()) {
            Some(len) => {
                let (p, cached) = imp::take(len);
                if cached {
                    // SAFETY: a block of at least `layout.size()` bytes.
                    unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            // SAFETY: as above.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match imp::mapped_len(layout.size(), layout.align()) {
            Some(len) => imp::give(ptr, len),
            // SAFETY: `ptr` came from System with this layout.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = imp::mapped_len(layout.size(), layout.align());
        let new = imp::mapped_len(new_size, layout.align());
        match (old, new) {
            // SAFETY: both small: System's block, System's realloc.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            // The same mapping still fits.
            (Some(a), Some(b)) if a == b => ptr,
            _ => {
                // SAFETY: `new_size` with the old alignment is a valid
                // layout (the caller's contract).
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                // SAFETY: a fresh block, then the old one's bytes that fit,
                // then the old one freed (by the path that made it).
                unsafe {
                    let p = self.alloc(new_layout);
                    if !p.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    p
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache is process-wide: one test at a time uses it.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn blocks_round_trip_through_every_path() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let a = StepAlloc;
        for (size, align) in [
            (64, 8),
            (LARGE_BYTES - 1, 16),
            (LARGE_BYTES, 64),
            (3 << 20, 128),
        ] {
            let layout = Layout::from_size_align(size, align).unwrap();
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                std::ptr::write_bytes(p, 7, size);
                // Grow across the threshold and back, keeping the bytes.
                let q = a.realloc(p, layout, size * 2 + 1);
                assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 7));
                let big = Layout::from_size_align(size * 2 + 1, align).unwrap();
                let r = a.realloc(q, big, size / 2 + 1);
                assert!(
                    std::slice::from_raw_parts(r, size / 2 + 1)
                        .iter()
                        .all(|&b| b == 7)
                );
                a.dealloc(r, Layout::from_size_align(size / 2 + 1, align).unwrap());
                // A cached block comes back zeroed when asked so.
                let p = a.alloc(layout);
                std::ptr::write_bytes(p, 9, size);
                a.dealloc(p, layout);
                let p = a.alloc_zeroed(layout);
                assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                a.dealloc(p, layout);
            }
        }
        trim();
        assert_eq!(cached_bytes(), 0);
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_block_no_step_took_again_is_unmapped() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        trim();
        let a = StepAlloc;
        let layout = Layout::from_size_align(LARGE_BYTES + 777, 64).unwrap();
        let len = (LARGE_BYTES + 777).div_ceil(4096) * 4096;
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(p, layout);
        }
        // Freed in the step that just ended: kept for the next one.
        step_done();
        assert_eq!(cached_bytes(), len);
        // Not taken in that one: gone.
        step_done();
        assert_eq!(cached_bytes(), 0);
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_freed_large_block_is_reused_for_the_same_length() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let a = StepAlloc;
        let layout = Layout::from_size_align(LARGE_BYTES + 12345, 64).unwrap();
        unsafe {
            let p = a.alloc(layout);
            a.dealloc(p, layout);
            let q = a.alloc(layout);
            assert_eq!(p, q);
            a.dealloc(q, layout);
        }
    }
}
