//! Process-wide compute settings, made once at start: denormals flushed on every compute
//! thread, and freed step buffers kept in the process.

/// Flush denormals to zero on this thread (x86: FTZ + DAZ in MXCSR). A badly scaled value
/// otherwise makes a step 10× slower.
pub fn set_flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

/// A training step allocates and frees the same large buffers every time. glibc's defaults
/// return each one to the kernel (mmap above 128 KiB, heap trimming) and pay page faults to get
/// it back in the next step; keep freed memory in the process instead (up to glibc's 32 MiB
/// mmap ceiling per allocation). Peak memory is unchanged: it is the same buffers — provided
/// there is one arena. The step runs on whichever pool thread picks it up, and with an arena
/// per thread each kept its own copy of a step's buffers (small-bytes peak RSS 325 → 570 MB).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Denormal flushing on the main thread (threads spawned later inherit it) and on every rayon
/// worker (matmul runs there).
pub fn init_compute_threads() {
    set_flush_denormals();
    keep_freed_memory();
    pin_candle_thread_count();
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| set_flush_denormals())
        .build_global();
}

/// candle asks for its thread count before every CPU matrix product and, unless
/// RAYON_NUM_THREADS is set, works it out again by reading /proc/cpuinfo (≈ 55 reads per
/// sampled token of the small model, most of its time). Compute its answer once and pin it,
/// before rayon's pool is built, so both use the same count. Ranks of a data-parallel group
/// started on one machine share its cores.
fn pin_candle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = (candle_core::utils::get_num_threads() / crate::dist::local_size()).max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}
