//! The binary's global allocator: the system allocator, except that freed large blocks are kept
//! and handed out again for the next allocation of the same size.
//!
//! The CPU backend allocates its activation and gradient buffers afresh for every step, and
//! glibc serves a large block from a new memory mapping that it unmaps on free (its mmap
//! threshold moves between 128 KiB and 32 MiB as blocks are freed): every page of the next
//! step's buffers then faults and is zeroed by the kernel (13–16 % of a `perf record` of a CPU
//! GRPO step of a 10M-parameter model, in `clear_page_erms`; the cache saves 7 % of its wall
//! time, and most of the demo's 45.5 → 32.0 s per 100 steps of 2026-11-28). A step allocates
//! the same sizes as the step before, so keeping the freed blocks removes that work.
//!
//! The cache never holds more than the program itself once needed: when an allocation misses,
//! least recently freed blocks are returned to the system until the live bytes, the cached bytes
//! and the new block together stay within the largest live total seen so far. Blocks below
//! `LARGE` bytes go straight to the system allocator (glibc reuses those itself). What it costs:
//! cached blocks stay resident between their uses, so the peak resident memory can grow (the
//! demo's curriculum runs: about 255 → 325–355 MiB); `THINKSHORT_BLOCK_CACHE=0` turns the cache
//! off (main.rs).
//!
//! A block the cache has to get from the system is advised for transparent huge pages
//! (`ask_for_huge_pages`), so the blocks it could not keep fault in 2 MiB at a time: `bench step`
//! of the 10M model (3 steps and the warm-up) took 570K page faults before, 94K after, and its
//! median step 2.41 → 2.30 s over three alternated rounds (2026-11-28).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Blocks of at least this many bytes are cached.
const LARGE: usize = 1 << 20;
/// At most this many blocks are kept. A GRPO update of the 10M-parameter bench model frees more
/// than 64 large blocks a step: with 64 slots a step still faulted 127K pages in, with 256 55K
/// (`bench step` 3.09 → 2.82 s, peak resident memory 1.54 → 1.59 GB; 2026-11-28).
const SLOTS: usize = 256;

pub struct BlockCache {
    state: Mutex<State>,
    /// false: freed blocks go back to the system at once (`set_enabled`).
    enabled: AtomicBool,
}

/// A freed block kept for reuse (its address as an integer: raw pointers are not `Send`).
#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    align: usize,
    /// When it was freed, by `State::clock`: the smallest is evicted first.
    freed_at: u64,
}

struct State {
    blocks: [Option<Block>; SLOTS],
    /// Bytes of large blocks handed out and not yet freed.
    live: usize,
    /// Bytes of the blocks in `blocks`.
    cached: usize,
    /// The largest `live` seen: live + cached stays within it (or within live + the new block).
    peak_live: usize,
    clock: u64,
}

/// What `BlockCache::stats` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCacheStats {
    pub live_bytes: usize,
    pub cached_bytes: usize,
    pub cached_blocks: usize,
    pub peak_live_bytes: usize,
}

impl State {
    /// Takes the cached block of exactly this size and alignment, if there is one.
    fn take(&mut self, layout: Layout) -> Option<*mut u8> {
        let slot = self
            .blocks
            .iter_mut()
            .find(|b| b.is_some_and(|b| b.size == layout.size() && b.align == layout.align()))?;
        let block = slot.take()?;
        self.cached -= block.size;
        Some(block.addr as *mut u8)
    }

    /// Removes the least recently freed block from the cache and returns it (to be freed).
    fn evict_oldest(&mut self) -> Option<Block> {
        let slot = self
            .blocks
            .iter_mut()
            .filter(|b| b.is_some())
            .min_by_key(|b| b.map_or(u64::MAX, |b| b.freed_at))?;
        let block = slot.take()?;
        self.cached -= block.size;
        Some(block)
    }

    /// Evicts the oldest blocks until live + cached + `extra` new bytes fit within the peak of
    /// live bytes (or within live + extra, when that is more).
    fn evict_beyond_peak(&mut self, extra: usize) {
        let bound = self.peak_live.max(self.live + extra);
        while self.live + self.cached + extra > bound {
            let Some(b) = self.evict_oldest() else { break };
            release(b);
        }
    }

    fn count_live(&mut self, size: usize) {
        self.live += size;
        self.peak_live = self.peak_live.max(self.live);
    }
}

impl BlockCache {
    pub const fn new() -> Self {
        BlockCache {
            state: Mutex::new(State {
                blocks: [None; SLOTS],
                live: 0,
                cached: 0,
                peak_live: 0,
                clock: 0,
            }),
            enabled: AtomicBool::new(true),
        }
    }

    /// Turns caching on or off; off gives every cached block back to the system.
    pub fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Relaxed);
        if !enabled {
            let mut s = self.lock();
            while let Some(b) = s.evict_oldest() {
                release(b);
            }
        }
    }

    pub fn stats(&self) -> BlockCacheStats {
        let s = self.lock();
        BlockCacheStats {
            live_bytes: s.live,
            cached_bytes: s.cached,
            cached_blocks: s.blocks.iter().flatten().count(),
            peak_live_bytes: s.peak_live,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding the lock, but an allocator must not panic on poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A large block: a cached one of the same layout, else a new one from the system after
    /// evicting what would take live + cached bytes past the bound.
    unsafe fn alloc_large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let mut s = self.lock();
        if let Some(ptr) = s.take(layout) {
            s.count_live(layout.size());
            drop(s);
            if zeroed {
                // SAFETY: the block is ours and layout.size() bytes long.
                unsafe { ptr.write_bytes(0, layout.size()) };
            }
            return ptr;
        }
        s.evict_beyond_peak(layout.size());
        let mut ptr = unsafe { new_block(layout, zeroed) };
        if ptr.is_null() {
            // Out of memory (or a huge `try_reserve`): give every cached block back and try
            // once more.
            while let Some(b) = s.evict_oldest() {
                release(b);
            }
            ptr = unsafe { new_block(layout, zeroed) };
        }
        if !ptr.is_null() {
            s.count_live(layout.size());
            drop(s);
            ask_for_huge_pages(ptr, layout.size());
        }
        ptr
    }
}

/// Gives an evicted block back to the system.
fn release(b: Block) {
    // SAFETY: the block came from System with this size and alignment (a valid layout then) and
    // has left the cache, so nothing else refers to it.
    unsafe {
        System.dealloc(
            b.addr as *mut u8,
            Layout::from_size_align_unchecked(b.size, b.align),
        )
    }
}

unsafe fn new_block(layout: Layout, zeroed: bool) -> *mut u8 {
    // SAFETY: forwarded from the caller's GlobalAlloc contract (layout.size() > 0).
    unsafe {
        if zeroed {
            System.alloc_zeroed(layout)
        } else {
            System.alloc(layout)
        }
    }
}

/// Asks Linux to back the whole 2 MiB pages inside a new block with transparent huge pages
/// (where `transparent_hugepage/enabled` is `madvise`, the common default, only advised memory
/// gets them): its pages then fault in 2 MiB at a time instead of 4 KiB. A refusal changes
/// nothing, so its result is ignored. Called outside the cache's lock (it is a system call).
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn ask_for_huge_pages(ptr: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    {
        // A transparent huge page (x86-64, and aarch64 with 4 KiB pages).
        const HUGE_PAGE: usize = 2 << 20;
        // Checked: an allocator must not panic, even on an address near the top.
        let addr = ptr as usize;
        let (Some(start), Some(end)) = (
            addr.checked_next_multiple_of(HUGE_PAGE),
            addr.checked_add(size),
        ) else {
            return;
        };
        let end = end / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the block the system allocator just handed us;
            // MADV_HUGEPAGE changes how its pages are backed, not their contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

impl Drop for BlockCache {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        while let Some(b) = s.evict_oldest() {
            release(b);
        }
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every block handed out is a System block of the requested layout (a cached block is
// reused only for exactly its own size and alignment), and every block is freed by System with
// the layout it was allocated with.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            return unsafe { System.alloc(layout) };
        }
        unsafe { self.alloc_large(layout, false) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE {
            return unsafe { System.alloc_zeroed(layout) };
        }
        unsafe { self.alloc_large(layout, true) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < LARGE {
            return unsafe { System.dealloc(ptr, layout) };
        }
        let mut s = self.lock();
        s.live = s.live.saturating_sub(layout.size());
        if !self.enabled.load(Ordering::Relaxed) {
            drop(s);
            return unsafe { System.dealloc(ptr, layout) };
        }
        s.clock += 1;
        let block = Block {
            addr: ptr as usize,
            size: layout.size(),
            align: layout.align(),
            freed_at: s.clock,
        };
        if s.blocks.iter().all(Option::is_some) {
            if let Some(b) = s.evict_oldest() {
                release(b);
            }
        }
        if let Some(slot) = s.blocks.iter_mut().find(|b| b.is_none()) {
            *slot = Some(block);
            s.cached += block.size;
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_large, new_large) = (layout.size() >= LARGE, new_size >= LARGE);
        if !old_large && !new_large {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // The system's realloc can grow a mapped block without copying it (mremap), so it does
        // the work; ours is the accounting of live bytes, and keeping the cache within the peak.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            let mut s = self.lock();
            if old_large {
                s.live = s.live.saturating_sub(layout.size());
            }
            if new_large {
                s.count_live(new_size);
            }
            s.evict_beyond_peak(0);
            drop(s);
            if new_large {
                ask_for_huge_pages(new, new_size);
            }
        }
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn layout(bytes: usize) -> Layout {
        Layout::from_size_align(bytes, 4).unwrap()
    }

    #[test]
    fn a_freed_large_block_is_handed_out_again_for_the_same_size() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(2 * MIB));
            a.write_bytes(0xAB, 2 * MIB);
            cache.dealloc(a, layout(2 * MIB));
            assert_eq!(cache.stats().cached_bytes, 2 * MIB);
            let b = cache.alloc(layout(2 * MIB));
            assert_eq!(b, a, "the cached block is reused");
            assert_eq!(cache.stats().cached_blocks, 0);
            cache.dealloc(b, layout(2 * MIB));
            // alloc_zeroed of a reused block clears what the last owner wrote.
            let c = cache.alloc_zeroed(layout(2 * MIB));
            assert_eq!(c, a);
            assert!(std::slice::from_raw_parts(c, 2 * MIB)
                .iter()
                .all(|&x| x == 0));
            cache.dealloc(c, layout(2 * MIB));
        }
    }

    #[test]
    fn a_disabled_cache_keeps_nothing() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(2 * MIB));
            cache.dealloc(a, layout(2 * MIB));
            assert_eq!(cache.stats().cached_blocks, 1);
            cache.set_enabled(false);
            assert_eq!(cache.stats().cached_blocks, 0);
            let b = cache.alloc(layout(2 * MIB));
            cache.dealloc(b, layout(2 * MIB));
        }
        let s = cache.stats();
        assert_eq!((s.live_bytes, s.cached_bytes), (0, 0));
    }

    #[test]
    fn small_blocks_go_straight_to_the_system() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(64 * 1024));
            cache.dealloc(a, layout(64 * 1024));
        }
        let s = cache.stats();
        assert_eq!((s.live_bytes, s.cached_bytes, s.peak_live_bytes), (0, 0, 0));
    }

    #[test]
    fn a_miss_evicts_the_oldest_blocks_to_stay_within_the_peak() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(4 * MIB));
            let b = cache.alloc(layout(2 * MIB));
            let c = cache.alloc(layout(2 * MIB + 4096));
            assert_eq!(cache.stats().peak_live_bytes, 8 * MIB + 4096);
            cache.dealloc(a, layout(4 * MIB));
            cache.dealloc(b, layout(2 * MIB));
            // live 2 MiB + cached 6 MiB + 1.5 MiB new would pass the 8 MiB peak: a (freed
            // first) goes, b stays.
            let d = cache.alloc(layout(MIB + MIB / 2));
            let s = cache.stats();
            assert_eq!((s.cached_blocks, s.cached_bytes), (1, 2 * MIB));
            assert!(s.live_bytes + s.cached_bytes <= s.peak_live_bytes);
            assert_eq!(cache.alloc(layout(2 * MIB)), b);
            for (p, bytes) in [(b, 2 * MIB), (c, 2 * MIB + 4096), (d, MIB + MIB / 2)] {
                cache.dealloc(p, layout(bytes));
            }
            let s = cache.stats();
            assert_eq!((s.live_bytes, s.cached_blocks), (0, 3));
        }
    }

    #[test]
    fn at_most_slots_blocks_are_kept_the_oldest_freed_first_out() {
        let cache = BlockCache::new();
        let sizes: Vec<usize> = (0..SLOTS + 1).map(|i| MIB + 4096 * i).collect();
        unsafe {
            let blocks: Vec<*mut u8> = sizes.iter().map(|&n| cache.alloc(layout(n))).collect();
            for (&p, &n) in blocks.iter().zip(&sizes) {
                cache.dealloc(p, layout(n));
            }
            let s = cache.stats();
            assert_eq!(s.cached_blocks, SLOTS);
            assert_eq!(s.cached_bytes, sizes[1..].iter().sum::<usize>());
        }
    }

    #[test]
    fn a_block_is_reused_only_for_its_own_alignment() {
        let cache = BlockCache::new();
        let aligned = Layout::from_size_align(2 * MIB, 4096).unwrap();
        unsafe {
            let a = cache.alloc(aligned);
            assert_eq!(a as usize % 4096, 0);
            cache.dealloc(a, aligned);
            let b = cache.alloc(layout(2 * MIB));
            assert_eq!(cache.stats().live_bytes, 2 * MIB);
            cache.dealloc(b, layout(2 * MIB));
            // whichever of the two blocks serves the aligned request, it is aligned
            let c = cache.alloc(aligned);
            assert_eq!(c as usize % 4096, 0);
            cache.dealloc(c, aligned);
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_counts_the_new_size() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(MIB / 2));
            a.write_bytes(7, MIB / 2);
            let b = cache.realloc(a, layout(MIB / 2), 3 * MIB);
            assert_eq!(cache.stats().live_bytes, 3 * MIB);
            assert!(std::slice::from_raw_parts(b, MIB / 2)
                .iter()
                .all(|&x| x == 7));
            let c = cache.realloc(b, layout(3 * MIB), 5 * MIB);
            assert_eq!(cache.stats().live_bytes, 5 * MIB);
            // back below LARGE: no longer counted
            let d = cache.realloc(c, layout(5 * MIB), MIB / 4);
            assert_eq!(cache.stats().live_bytes, 0);
            assert!(std::slice::from_raw_parts(d, MIB / 4)
                .iter()
                .all(|&x| x == 7));
            cache.dealloc(d, layout(MIB / 4));
        }
    }

    #[test]
    fn a_growing_realloc_keeps_the_cache_within_the_peak() {
        let cache = BlockCache::new();
        unsafe {
            let a = cache.alloc(layout(4 * MIB));
            let b = cache.alloc(layout(4 * MIB + 4096));
            cache.dealloc(a, layout(4 * MIB)); // peak 8 MiB + 4 KiB: live 4 + cached 4
            let c = cache.realloc(b, layout(4 * MIB + 4096), 6 * MIB);
            let s = cache.stats();
            assert_eq!((s.live_bytes, s.cached_blocks), (6 * MIB, 0));
            cache.dealloc(c, layout(6 * MIB));
        }
    }
}
