//! The process's allocator, tuned for tensor work.
//!
//! candle allocates a fresh buffer for every op's output. With glibc's defaults a
//! freed buffer of a few MB is handed back to the kernel (heap trimming, or munmap
//! once the mmap threshold has adapted), so the next op of the same shape takes page
//! faults and the kernel zeroes every page again: 15-25% of a 1024 px prior or decoder
//! call went to `clear_page` and page-fault handling (perf). Keeping freed memory in the
//! heap for reuse removes that; the memory a stage held is given back explicitly when
//! the stage is done ([`release_free_memory`]), so peak memory does not grow.

/// Makes glibc keep freed memory for reuse: every buffer the main thread allocates
/// comes from the heap (no mmap: Stage A's activations at 1024 px are 100-500 MB,
/// above any mmap threshold glibc allows, and their page faults took a quarter of a
/// decode: 22-27 s against 16-20 s in A/B runs), and the heap is never trimmed
/// implicitly. Worker threads' arenas still fall back to mmap for what their heaps
/// cannot hold. Call once at start-up; a no-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before heavy allocation.
    unsafe {
        glibc::mallopt(glibc::M_MMAP_THRESHOLD, 32 << 20);
        glibc::mallopt(glibc::M_MMAP_MAX, 0);
        glibc::mallopt(glibc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Returns the heap's free memory to the system (after a stage is dropped).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages.
    unsafe {
        glibc::malloc_trim(0);
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::ffi::c_int;
    pub const M_TRIM_THRESHOLD: c_int = -1;
    pub const M_MMAP_THRESHOLD: c_int = -3;
    pub const M_MMAP_MAX: c_int = -4;
    extern "C" {
        pub fn mallopt(param: c_int, value: c_int) -> c_int;
        pub fn malloc_trim(pad: usize) -> c_int;
    }
}
