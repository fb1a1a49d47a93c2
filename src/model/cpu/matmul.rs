//! Matrix products over plain f32 slices through the `gemm` crate: operands given as
//! (slice, row stride, column stride), so transposed views cost nothing, and destinations
//! written without a zeroing pass when they are fresh.
//!
//! Multi-threaded products split the destination's rows into contiguous bands (two per
//! thread), each a single-threaded gemm call: measured 0–15 % faster than gemm's own threading on the
//! training step's shapes (mostly on the weight gradients, whose rows are few and long), and
//! each output element is still summed by one call in one fixed order.

use super::amx::Part;
use rayon::prelude::*;

/// A matrix operand: (elements, row stride, column stride).
pub type Operand<'a> = (&'a [f32], usize, usize);

/// Whether a product runs on all threads or on the calling one only (inside tasks that
/// already run in parallel).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
}

/// How a product multiplies: in f32, or with operands rounded to bf16 and f32 accumulation
/// (on AMX tiles where the CPU has them; elsewhere such products run in f32).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Precision {
    F32,
    Bf16,
}

/// The kernel `Precision::Bf16` products run on here, as benchmarks report it.
pub fn bf16_kernel() -> &'static str {
    if super::amx::available() {
        "amx-bf16"
    } else {
        "f32 (no AMX on this CPU)"
    }
}

/// A new (m × n) matrix a·b on all threads. gemm writes it straight into fresh memory: with
/// read_dst false it never reads the destination, so the zeroing pass of `vec![0.0; ..]` is
/// skipped.
pub fn matmul_new(
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    precision: Precision,
) -> Vec<f32> {
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: the destination is the Vec's own capacity (m·n elements, row stride n), every
    // element of which gemm writes without reading it (read_dst = false) before the length
    // is set; matmul_ptr checks the operands.
    unsafe {
        product(
            c.as_mut_ptr(),
            n,
            a,
            b,
            (m, n, k),
            false,
            Threads::All,
            precision,
        );
        c.set_len(m * n);
    }
    c
}

/// New matrices a·b_i (m × n_i), one per (b_i, n_i): one input by several weights. In bf16
/// on AMX the input is packed once for all of them.
pub fn matmul_new_shared_a(
    a: Operand,
    (m, k): (usize, usize),
    bs: &[(Operand, usize)],
    precision: Precision,
) -> Vec<Vec<f32>> {
    if !(precision == Precision::Bf16 && super::amx::available()) {
        return bs
            .iter()
            .map(|&(b, n)| matmul_new(a, b, (m, n, k), precision))
            .collect();
    }
    let mut outs: Vec<Vec<f32>> = bs.iter().map(|&(_, n)| Vec::with_capacity(m * n)).collect();
    let parts: Vec<Part> = outs
        .iter_mut()
        .zip(bs)
        .map(|(c, &(b, n))| {
            check_operands(a, b, (m, n, k));
            Part {
                c: Rows(c.as_mut_ptr()),
                ldc: n,
                operand: b,
                extent: n,
            }
        })
        .collect();
    // SAFETY: each destination is its Vec's own capacity (m·n_i, row stride n_i), every
    // element of which the kernel writes without reading it before the length is set; the
    // operands were checked.
    unsafe {
        super::amx::matmul_shared_a(a, (m, k), &parts, false, Threads::All);
        for (c, &(_, n)) in outs.iter_mut().zip(bs) {
            c.set_len(m * n);
        }
    }
    outs
}

/// New matrices a_i·b (m_i × n), one per (a_i, m_i): several products of one right-hand
/// operand (the weight gradients of weights that read one input). In bf16 on AMX, b is
/// packed once for all of them.
pub fn matmul_new_shared_b(
    b: Operand,
    (n, k): (usize, usize),
    a_s: &[(Operand, usize)],
    precision: Precision,
) -> Vec<Vec<f32>> {
    if !(precision == Precision::Bf16 && super::amx::available()) {
        return a_s
            .iter()
            .map(|&(a, m)| matmul_new(a, b, (m, n, k), precision))
            .collect();
    }
    let mut outs: Vec<Vec<f32>> = a_s
        .iter()
        .map(|&(_, m)| Vec::with_capacity(m * n))
        .collect();
    let parts: Vec<Part> = outs
        .iter_mut()
        .zip(a_s)
        .map(|(c, &(a, m))| {
            check_operands(a, b, (m, n, k));
            Part {
                c: Rows(c.as_mut_ptr()),
                ldc: n,
                operand: a,
                extent: m,
            }
        })
        .collect();
    // SAFETY: as in matmul_new_shared_a, with (m_i × n) destinations.
    unsafe {
        super::amx::matmul_shared_b(b, (n, k), &parts, Threads::All);
        for (c, &(_, m)) in outs.iter_mut().zip(a_s) {
            c.set_len(m * n);
        }
    }
    outs
}

/// c (m×n, row stride `ldc`: a block of a wider matrix) = a·b, or c += a·b with `accumulate`.
#[allow(clippy::too_many_arguments)] // the product's shape, destination and how to run it
pub fn matmul_into(
    c: &mut [f32],
    ldc: usize,
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
    precision: Precision,
) {
    assert!(m > 0 && c.len() >= (m - 1) * ldc + n);
    // SAFETY: the assert keeps every write inside `c` (product checks the operands and
    // n <= ldc); `c` is borrowed mutably, so nothing else touches it or overlaps it.
    unsafe {
        product(
            c.as_mut_ptr(),
            ldc,
            a,
            b,
            (m, n, k),
            accumulate,
            threads,
            precision,
        )
    }
}

/// `matmul_ptr` in the given precision.
///
/// # Safety
/// As for `matmul_ptr`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product(
    c: *mut f32,
    ldc: usize,
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
    precision: Precision,
) {
    if precision == Precision::Bf16 && super::amx::available() {
        check_operands(a, b, (m, n, k));
        assert!(n <= ldc);
        super::amx::matmul(c, ldc, a, b, (m, n, k), accumulate, threads)
    } else {
        matmul_ptr(c, ldc, a, b, (m, n, k), accumulate, threads)
    }
}

fn check_operands(a: Operand, b: Operand, (m, n, k): (usize, usize, usize)) {
    assert!(m > 0 && n > 0 && k > 0);
    assert!(a.0.len() > (m - 1) * a.1 + (k - 1) * a.2);
    assert!(b.0.len() > (k - 1) * b.1 + (n - 1) * b.2);
}

/// A destination pointer that may cross to the pool's threads: each writes its own band
/// (rows here, blocks in `amx`).
#[derive(Clone, Copy)]
pub(super) struct Rows(pub(super) *mut f32);
// SAFETY: the products hand each thread a disjoint part of one destination.
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    /// The pointer, through a method so that closures capture the whole (Send) wrapper.
    pub(super) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// c (m×n at `c`, row stride `ldc`) = a·b, or c += a·b with `accumulate`; also for
/// destinations that parallel tasks share (each writing its own columns).
///
/// # Safety
/// `c` must be valid for writes (and reads, when accumulating) of that matrix, which no one
/// else reads or writes during the call and which does not overlap `a` or `b`.
pub unsafe fn matmul_ptr(
    c: *mut f32,
    ldc: usize,
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
) {
    check_operands(a, b, (m, n, k));
    assert!(n <= ldc);
    // Two bands per thread, of at least 64 rows (one gemm micro-panel): when another process
    // takes part of a core, the thread on the free core steals the slowed one's second band
    // (busy-neighbour throughput +5 %; no change on a quiet machine). Smaller products stay
    // on one thread.
    //
    // gemm sums k in blocks whose size depends only on k and the CPU's caches — except on
    // its small-product path (≤ 64 × 64 outputs, k blocks of 512), which a band could take
    // where the whole product does not: such products stay whole, so results do not depend
    // on the thread count.
    let parts = match threads {
        Threads::All if n > 64 || k <= 512 => (rayon::current_num_threads() * 2).min(m / 64),
        _ => 1,
    };
    if parts < 2 {
        return gemm_call(c, ldc, a, b, (m, n, k), accumulate);
    }
    let band = m.div_ceil(parts).next_multiple_of(16);
    let c = Rows(c);
    (0..parts).into_par_iter().for_each(|p| {
        let (r0, r1) = (p * band, ((p + 1) * band).min(m));
        if r0 < r1 {
            // SAFETY: rows r0..r1 of c and of a lie inside the matrices the caller vouched
            // for; bands do not overlap.
            unsafe {
                gemm_call(
                    c.ptr().add(r0 * ldc),
                    ldc,
                    (&a.0[r0 * a.1..], a.1, a.2),
                    b,
                    (r1 - r0, n, k),
                    accumulate,
                )
            }
        }
    });
}

/// # Safety
/// As for `matmul_ptr`, with the operands already checked.
unsafe fn gemm_call(
    c: *mut f32,
    ldc: usize,
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a.0.as_ptr(),
        a.2 as isize,
        a.1 as isize,
        b.0.as_ptr(),
        b.2 as isize,
        b.1 as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}
