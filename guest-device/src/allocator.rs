//! The component's memory allocator: free lists per power-of-two size class
//! in front of the system allocator.
//!
//! Why not just the system allocator: inside the sandbox every wasm
//! instruction is fuel-metered and compiled by Cranelift, and wasi-libc's
//! dlmalloc spends 50–100 of them per `malloc`/`free`. A control command
//! allocates about ten small blocks (the parsed MAC lists, the effect and its
//! lists) and frees them after the call, which made allocation a quarter of
//! a command's time in the guest. Popping and pushing a free list is a
//! handful of instructions.
//!
//! Small blocks (up to [`LARGEST_CLASS`] bytes) are carved from chunks taken
//! from the system allocator and never given back: the device's live data is
//! small and bounded (a full MAC table, a 512-byte VLAN table), so what the
//! lists keep is bounded by the largest working set. Larger blocks go to the
//! system allocator directly. The memory cap of the sandbox applies to both,
//! because both grow the one linear memory.
//!
//! Single-threaded only: a component instance never runs two calls at once,
//! which is what lets the free lists live in `Cell`s.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr;

/// Smallest block: room for the free-list link on wasm32 and on 64-bit hosts.
const SMALLEST_SHIFT: u32 = 3;
/// Largest size served from the free lists.
pub const LARGEST_CLASS: usize = 2048;
const CLASSES: usize = (LARGEST_CLASS.trailing_zeros() - SMALLEST_SHIFT + 1) as usize;
/// Bytes taken from the system allocator at a time to carve small blocks.
const CHUNK: usize = 4096;

pub struct SizeClassAlloc {
    free: [Cell<*mut u8>; CLASSES],
}

impl SizeClassAlloc {
    pub const fn new() -> Self {
        Self {
            free: [const { Cell::new(ptr::null_mut()) }; CLASSES],
        }
    }

    /// The class serving `layout`, or none when it is too large. Blocks of
    /// class `c` are `8 << c` bytes and aligned to their size, which covers
    /// any alignment up to the block size.
    fn class(layout: Layout) -> Option<usize> {
        let size = layout.size().max(layout.align()).max(1 << SMALLEST_SHIFT);
        (size <= LARGEST_CLASS)
            .then(|| (size.next_power_of_two().trailing_zeros() - SMALLEST_SHIFT) as usize)
    }

    fn block_size(class: usize) -> usize {
        1 << (class as u32 + SMALLEST_SHIFT)
    }

    /// Takes a chunk from the system allocator and threads its blocks onto
    /// the free list of `class`. False when the system has no memory left.
    ///
    /// # Safety
    /// Must not run concurrently with any other use of `self`.
    unsafe fn refill(&self, class: usize) -> bool {
        let size = Self::block_size(class);
        let chunk_layout =
            Layout::from_size_align(CHUNK.max(size), size).expect("chunk sizes are powers of two");
        // SAFETY: the layout has a non-zero size.
        let chunk = unsafe { System.alloc(chunk_layout) };
        if chunk.is_null() {
            return false;
        }
        for offset in (0..chunk_layout.size()).step_by(size).rev() {
            // SAFETY: `offset + size` is within the chunk just allocated, and
            // the block is aligned for a pointer (sizes are at least 8 and the
            // chunk is aligned to the block size).
            unsafe { self.push(class, chunk.add(offset)) };
        }
        true
    }

    /// # Safety
    /// `block` is an unused block of `class`, aligned and large enough to
    /// hold a pointer.
    unsafe fn push(&self, class: usize, block: *mut u8) {
        // SAFETY: per the contract the block is ours to write.
        unsafe { block.cast::<*mut u8>().write(self.free[class].get()) };
        self.free[class].set(block);
    }

    /// # Safety
    /// Must not run concurrently with any other use of `self`.
    unsafe fn pop(&self, class: usize) -> *mut u8 {
        let head = self.free[class].get();
        if !head.is_null() {
            // SAFETY: `head` is a free block of this list; its first word is
            // the link written by `push`.
            self.free[class].set(unsafe { head.cast::<*mut u8>().read() });
        }
        head
    }
}

impl Default for SizeClassAlloc {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: small blocks come from chunks of the system allocator, aligned to
// their (power-of-two) size, which is at least the layout's size and
// alignment; a block is on a free list or handed out, never both. Large
// layouts are the system allocator's. Callers of the `GlobalAlloc` methods
// on one `SizeClassAlloc` must not overlap in time (see `Global`).
unsafe impl GlobalAlloc for SizeClassAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = Self::class(layout) else {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { System.alloc(layout) };
        };
        // SAFETY: not concurrent, per the trait impl's contract above.
        unsafe {
            let block = self.pop(class);
            if !block.is_null() || !self.refill(class) {
                return block;
            }
            self.pop(class)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match Self::class(layout) {
            // SAFETY: `ptr` came from `alloc` with this layout, so it is a
            // block of this class that the caller no longer uses.
            Some(class) => unsafe { self.push(class, ptr) },
            // SAFETY: large layouts were allocated by `System`.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` is valid for the alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::class(layout), Self::class(new_layout)) {
            // The block already has room: Vec growth within a class is free.
            (Some(old), Some(new)) if old == new => ptr,
            // Both large: the system allocator may grow in place.
            // SAFETY: forwarded with the caller's guarantees.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => {
                // SAFETY: allocate, copy the smaller of the two sizes, free
                // the old block: the usual realloc contract.
                unsafe {
                    let new = self.alloc(new_layout);
                    if !new.is_null() {
                        ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    new
                }
            }
        }
    }
}

/// The component's global allocator.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
pub struct Global(pub SizeClassAlloc);

// SAFETY: without the `atomics` target feature a wasm32 instance has one
// thread, so the free lists are never used concurrently.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl Sync for Global {}

// SAFETY: forwards to `SizeClassAlloc`, whose one requirement (no
// concurrent use) the single-threaded target guarantees.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static GLOBAL: Global = Global(SizeClassAlloc::new());

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn classes_cover_size_and_alignment() {
        assert_eq!(SizeClassAlloc::class(layout(1, 1)), Some(0));
        assert_eq!(SizeClassAlloc::class(layout(8, 8)), Some(0));
        assert_eq!(SizeClassAlloc::class(layout(9, 1)), Some(1));
        assert_eq!(SizeClassAlloc::class(layout(4, 64)), Some(3));
        assert_eq!(
            SizeClassAlloc::class(layout(LARGEST_CLASS, 1)),
            Some(CLASSES - 1)
        );
        assert_eq!(SizeClassAlloc::class(layout(LARGEST_CLASS + 1, 1)), None);
    }

    /// Many live blocks of mixed sizes: each aligned, none overlapping (each
    /// keeps its own fill pattern), and reused after being freed.
    #[test]
    fn blocks_are_aligned_distinct_and_reused() {
        let heap = SizeClassAlloc::new();
        let sizes = [1, 7, 8, 24, 100, 512, 2048, 2049, 10_000];
        let mut live = Vec::new();
        for round in 0..50u8 {
            for (i, &size) in sizes.iter().enumerate() {
                let l = layout(size, 1 << (i % 4));
                // SAFETY: non-zero size; freed below with the same layout.
                let p = unsafe { heap.alloc(l) };
                assert!(!p.is_null());
                assert_eq!(p as usize % l.align(), 0);
                // SAFETY: `p` points to `size` bytes we own.
                unsafe { ptr::write_bytes(p, round ^ i as u8, size) };
                live.push((p, l, round ^ i as u8));
            }
        }
        for &(p, l, fill) in &live {
            // SAFETY: still allocated, `l.size()` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(p, l.size()) };
            assert!(bytes.iter().all(|&b| b == fill), "block overwritten");
        }
        let first_small = live[0];
        for &(p, l, _) in live.iter().rev() {
            // SAFETY: allocated above with this layout, not yet freed.
            unsafe { heap.dealloc(p, l) };
        }
        // SAFETY: same layout as the first block, freed last, so on top.
        let again = unsafe { heap.alloc(first_small.1) };
        assert_eq!(again, first_small.0);
        // SAFETY: allocated just above.
        unsafe { heap.dealloc(again, first_small.1) };
    }

    #[test]
    fn realloc_keeps_contents_across_classes() {
        let heap = SizeClassAlloc::new();
        let mut l = layout(5, 1);
        // SAFETY: non-zero size.
        let mut p = unsafe { heap.alloc(l) };
        // SAFETY: 5 bytes owned.
        unsafe { ptr::copy_nonoverlapping(b"hello".as_ptr(), p, 5) };
        for new_size in [8, 100, 3000, 70_000, 6] {
            // SAFETY: `p` is live with layout `l`; new size non-zero.
            p = unsafe { heap.realloc(p, l, new_size) };
            assert!(!p.is_null());
            l = layout(new_size, 1);
            // SAFETY: at least 5 bytes live at `p`.
            assert_eq!(unsafe { std::slice::from_raw_parts(p, 5) }, b"hello");
        }
        // SAFETY: live with layout `l`.
        unsafe { heap.dealloc(p, l) };
    }
}
