//! bf16 matrix products on Intel AMX tiles: f32 operands are rounded to bf16 (round to
//! nearest even) while packed into tile order, multiplied with `tdpbf16ps` (bf16 products,
//! f32 accumulation), and the f32 result written to the destination.
//!
//! Why by hand: no well-kept Rust crate drives AMX (the `gemm` crate stops at AVX-512, oneDNN
//! needs a C++ build and a download), and Rust's AMX intrinsics are unstable — but stable
//! `asm!` emits the tile instructions, and the kernel is small: eight tile registers of
//! 16 rows × 64 bytes, used as a 2×2 block of f32 accumulators (32×32 outputs) fed by two
//! A tiles (16 rows × 32 bf16) and two B tiles (16 pairs of rows × 16 columns, the "VNNI"
//! layout where each 4-byte column holds two consecutive k).
//!
//! Layout of the packed operands: tile after tile, each 1 KiB and contiguous, A as
//! [m-tile][k-tile][16 rows][32 k], B as [n-tile][k-tile][16 k-pairs][16 n][2], zero-padded
//! to whole 2×2 blocks and whole k-tiles, so the kernel has no edge cases; only the store of
//! an edge block goes through a scratch block. B is packed once per product (in parallel),
//! A a band of rows at a time by the task that uses it.
//!
//! Determinism: every 32×32 output block is summed by one thread over k-tiles in order, so
//! the result does not depend on the thread count or on how blocks are shared out.

use super::matmul::{Operand, Rows as Dest, Threads};
use rayon::prelude::*;
use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows (and bf16 pairs) of a tile.
const TILE_ROWS: usize = 16;
/// bf16 values along k in one A tile (64 bytes).
const TILE_K: usize = 32;
/// bf16 values in one tile.
const TILE_LEN: usize = TILE_ROWS * TILE_K;
/// Outputs along each side of the 2×2-tile block one kernel call computes.
const BLOCK: usize = 2 * TILE_ROWS;

/// Whether this CPU and kernel run AMX bf16 products (and `WICK_NO_AMX` does not turn them
/// off). Asks Linux for the tile state once (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`: without it the first tile instruction kills the process with SIGILL).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("WICK_NO_AMX").is_none_or(|v| v.is_empty() || v == "0")
            && cpu_has_amx_bf16()
            && request_tile_state()
    })
}

fn cpu_has_amx_bf16() -> bool {
    // CPUID leaf 7, sub-leaf 0: EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    // Leaf 7 only where the CPU has it.
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it fails cleanly (non-zero) on
    // kernels or VMs without AMX support.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// f32 → bf16 as the packing instruction (`vcvtne2ps2bf16`) rounds: to nearest even, with
/// denormal inputs read as zero, NaN kept NaN.
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((bits >> 16) & 0x8000) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 → f32 (exact).
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

const CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// An operand packed into tiles: `tiles` tiles along m (or n), each row of them `k_tiles` long.
struct Packed<'a> {
    data: &'a [u16],
    k_tiles: usize,
}

impl Packed<'_> {
    fn tile(&self, outer: usize, kt: usize) -> *const u16 {
        self.data[(outer * self.k_tiles + kt) * TILE_LEN..].as_ptr()
    }
}

/// Pack the operand `op` (element (i, kk) at `op[i·rs + kk·cs]`: A itself, or Bᵀ for B) from
/// row `i_base` on into `dst` — `outer_tiles` × `k_tiles` tiles, tile (o, kt) at
/// `o·k_tiles + kt`, zero past `rows` × `k` — rounding to bf16, on all threads or this one.
///
/// The tiles are visited in the order that reads memory front to back: along the rows when
/// the operand's rows run along k (cs = 1), else a k-tile's 32 rows at a time across all
/// tiles. Visiting transposed operands tile by tile instead walked down 64-byte columns of
/// matrices bigger than L2 and spent most of the packing time waiting on those loads.
#[allow(clippy::too_many_arguments)] // one operand, its extent and where the tiles go
fn pack_tiles(
    dst: &mut [u16],
    op: Operand,
    i_base: usize,
    (rows, k): (usize, usize),
    (outer_tiles, k_tiles): (usize, usize),
    layout: Layout,
    threads: Threads,
) {
    assert!(dst.len() >= outer_tiles * k_tiles * TILE_LEN);
    let out = PackOut(dst.as_mut_ptr());
    let pack = |o: usize, kt: usize| {
        let (i0, k0) = (i_base + o * TILE_ROWS, kt * TILE_K);
        let tile_rows = (i_base + rows).saturating_sub(i0).min(TILE_ROWS);
        let ks = k.saturating_sub(k0).min(TILE_K);
        // SAFETY: tile (o, kt) lies inside dst (the assert) and is written by this call
        // alone; AMX implies AVX-512 BW and BF16; the block lies inside the operand (the
        // callers' checks).
        unsafe {
            let tile = std::slice::from_raw_parts_mut(
                out.ptr().add((o * k_tiles + kt) * TILE_LEN),
                TILE_LEN,
            );
            tile_from(tile, op, (i0, k0), (tile_rows, ks), layout)
        }
    };
    let along_rows = op.2 == 1;
    let (lines, per_line) = if along_rows {
        (outer_tiles, k_tiles)
    } else {
        (k_tiles, outer_tiles)
    };
    let line = |l: usize| {
        for x in 0..per_line {
            if along_rows {
                pack(l, x)
            } else {
                pack(x, l)
            }
        }
    };
    if threads == Threads::All && lines > 1 {
        (0..lines).into_par_iter().for_each(line);
    } else {
        (0..lines).for_each(line);
    }
}

/// The packing destination, shared by the threads that each write their own tiles.
#[derive(Clone, Copy)]
struct PackOut(*mut u16);
// SAFETY: each tile is written by one task; the buffer outlives the parallel loop.
unsafe impl Send for PackOut {}
unsafe impl Sync for PackOut {}

impl PackOut {
    fn ptr(self) -> *mut u16 {
        self.0
    }
}

/// Where a tile keeps the bf16 pair (k = 2p, 2p+1) of operand row i (of Bᵀ's row, for B).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// A tiles: 16 rows i, each 16 pairs along k: 4-byte word i·16 + p.
    A,
    /// B tiles (VNNI): 16 rows of pairs p, each 16 columns: word p·16 + i.
    B,
}

/// One tile — 16 × 16 bf16 pairs along k, zero past (rows, ks) — from the operand block at
/// (i0, k0) of `op` (element (i, kk) at `op[i·rs + kk·cs]`).
///
/// # Safety
/// The CPU has AVX-512 BW and BF16; (rows × ks) from (i0, k0) lies inside the operand.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile_from(
    tile: &mut [u16],
    op: Operand,
    (i0, k0): (usize, usize),
    (rows, ks): (usize, usize),
    layout: Layout,
) {
    let (src, rs, cs) = op;
    let base = src.as_ptr();
    let out = tile.as_mut_ptr() as *mut u32;
    // 16 runs of 16 words, each along one index of the tile: its rows, or its columns
    // (then transposed in registers).
    let mut runs = [_mm512_setzero_si512(); 16];
    let as_rows = if cs == 1 {
        // Operand rows contiguous along k: one run of 32 values gives row i's 16 pairs.
        for (r, run) in runs.iter_mut().enumerate().take(rows) {
            *run = pairs_from_run(base.add((i0 + r) * rs + k0), ks);
        }
        layout == Layout::A
    } else {
        // Operand columns along i: two k at a time give pair p of the 16 rows.
        for (p, run) in runs.iter_mut().enumerate().take(ks.div_ceil(2)) {
            let row = |kk: usize| (kk < ks).then(|| base.add((k0 + kk) * cs + i0 * rs));
            *run = pairs_from_rows(row(2 * p), row(2 * p + 1), rows, rs);
        }
        layout == Layout::B
    };
    if !as_rows {
        transpose_words(&mut runs);
    }
    for (q, run) in runs.iter().enumerate() {
        _mm512_storeu_si512(out.add(q * 16) as *mut _, *run);
    }
}

/// Transpose a 16 × 16 matrix of 4-byte words held as 16 rows.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose_words(rows: &mut [__m512i; 16]) {
    // Within 128-bit lanes: pairs of rows, then quads: u[4g + c] holds, in lane l, column
    // 4l + c of rows 4g..4g+3.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b) = (t[4 * g], t[4 * g + 2]);
        let (c, d) = (t[4 * g + 1], t[4 * g + 3]);
        u[4 * g] = _mm512_unpacklo_epi64(a, b);
        u[4 * g + 1] = _mm512_unpackhi_epi64(a, b);
        u[4 * g + 2] = _mm512_unpacklo_epi64(c, d);
        u[4 * g + 3] = _mm512_unpackhi_epi64(c, d);
    }
    // Then a 4 × 4 transpose of lanes: output row 4l + c is lane l of u[c], u[4 + c],
    // u[8 + c], u[12 + c].
    for c in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[c], u[4 + c]);
        let v1 = _mm512_shuffle_i32x4::<0xEE>(u[c], u[4 + c]);
        let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + c], u[12 + c]);
        let v3 = _mm512_shuffle_i32x4::<0xEE>(u[8 + c], u[12 + c]);
        rows[c] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
        rows[4 + c] = _mm512_shuffle_i32x4::<0xDD>(v0, v2);
        rows[8 + c] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
        rows[12 + c] = _mm512_shuffle_i32x4::<0xDD>(v1, v3);
    }
}

use std::arch::x86_64::{
    __m512i, _mm512_cvtne2ps_pbh, _mm512_i32gather_ps, _mm512_mask_i32gather_ps,
    _mm512_maskz_loadu_ps, _mm512_permutexvar_epi16, _mm512_set_epi16, _mm512_set_epi32,
    _mm512_setzero_ps, _mm512_setzero_si512, _mm512_shuffle_i32x4, _mm512_storeu_si512,
    _mm512_unpackhi_epi32, _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64,
};

/// Mask of the first `count` (≤ 16) lanes.
#[inline(always)]
fn lanes(count: usize) -> u16 {
    if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    }
}

/// 32 consecutive values from `p` (zero past `count`) as 16 bf16 pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn pairs_from_run(p: *const f32, count: usize) -> __m512i {
    let lo = _mm512_maskz_loadu_ps(lanes(count), p);
    let hi = if count > 16 {
        _mm512_maskz_loadu_ps(lanes(count - 16), p.add(16))
    } else {
        _mm512_setzero_ps()
    };
    std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo))
}

/// Pairs (a[j], b[j]) for j < count, elements `stride` apart (zero past `count`, and zero
/// for a missing row).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn pairs_from_rows(
    a: Option<*const f32>,
    b: Option<*const f32>,
    count: usize,
    stride: usize,
) -> __m512i {
    let load = |p: Option<*const f32>| match p {
        None => _mm512_setzero_ps(),
        Some(p) if stride == 1 => _mm512_maskz_loadu_ps(lanes(count), p),
        Some(p) => {
            let s = stride as i32;
            let idx = _mm512_set_epi32(
                15 * s,
                14 * s,
                13 * s,
                12 * s,
                11 * s,
                10 * s,
                9 * s,
                8 * s,
                7 * s,
                6 * s,
                5 * s,
                4 * s,
                3 * s,
                2 * s,
                s,
                0,
            );
            if count >= 16 {
                _mm512_i32gather_ps::<4>(idx, p as *const u8 as *const _)
            } else {
                _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    lanes(count),
                    idx,
                    p as *const u8 as *const _,
                )
            }
        }
    };
    // [a0..a15, b0..b15] as bf16, then interleaved to a0 b0 a1 b1 ...
    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(load(b), load(a)));
    let interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    _mm512_permutexvar_epi16(interleave, both)
}

thread_local! {
    /// Packing buffers, kept between products (their pages stay mapped): B on the calling
    /// thread, a band of A on each thread that runs a task.
    static PACK: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    static TASK_A: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// c (m×n at `c`, row stride `ldc`) = a·b, or c += a·b with `accumulate`, with bf16
/// operands and f32 accumulation. Callers check `available()` first.
///
/// # Safety
/// As for `matmul::matmul_ptr`: `c` is valid for the matrix, unshared and not overlapping the
/// operands.
pub unsafe fn matmul(
    c: *mut f32,
    ldc: usize,
    a: Operand,
    b: Operand,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    threads: Threads,
) {
    let part = Part {
        c: Dest(c),
        ldc,
        operand: b,
        extent: n,
    };
    matmul_shared_a(a, (m, k), &[part], accumulate, threads)
}

/// One product of a group that shares an operand: its destination (row stride `ldc`) and
/// its own operand, B (k × `extent`) beside a shared A, or A (`extent` × k) beside a shared B.
pub(super) struct Part<'a> {
    pub(super) c: Dest,
    pub(super) ldc: usize,
    pub(super) operand: Operand<'a>,
    pub(super) extent: usize,
}

/// Rows of the packed-A bands tasks take: up to 4 block-rows (128 rows) and 2 MiB of packed
/// A, fewer when that leaves fewer than 4 tasks a thread. Each task packs its own rows of A
/// right before using them (no second parallel phase, and the band is still in cache when
/// the kernel reads it). Measured against packing all of A first: small +9–20 %, small-bytes
/// +1–7 %, tiny +1–4 % tokens/s.
fn band_blocks(m_blocks: usize, k_tiles: usize, threads: Threads) -> usize {
    let workers = match threads {
        Threads::All => rayon::current_num_threads(),
        Threads::One => 1,
    };
    let block_row_bytes = 2 * k_tiles * TILE_LEN * 2;
    (m_blocks / (4 * workers))
        .min((2 << 20) / block_row_bytes)
        .clamp(1, 4)
}

/// Run `tasks` tasks, in parallel where asked and worth it.
fn for_each_task(tasks: usize, threads: Threads, task: impl Fn(usize) + Sync + Send) {
    if threads == Threads::All && rayon::current_num_threads() > 1 && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Pack B (k × n) for the kernel into `buf` from `at` on; returns its length.
fn pack_b_at(
    buf: &mut [u16],
    at: usize,
    b: Operand,
    (k, n): (usize, usize),
    threads: Threads,
) -> usize {
    let k_tiles = k.div_ceil(TILE_K);
    let len = n.div_ceil(BLOCK) * 2 * k_tiles * TILE_LEN;
    let (src, rs, cs) = b;
    pack_tiles(
        &mut buf[at..at + len],
        (src, cs, rs),
        0,
        (n, k),
        (n.div_ceil(BLOCK) * 2, k_tiles),
        Layout::B,
        threads,
    );
    len
}

/// Pack rows `blocks` (in block-rows) of A (m × k) into this thread's band buffer and run `f`
/// on them.
fn with_a_band(
    a: Operand,
    (m, k): (usize, usize),
    blocks: &std::ops::Range<usize>,
    f: impl FnOnce(&Packed),
) {
    let k_tiles = k.div_ceil(TILE_K);
    let r0 = blocks.start * BLOCK;
    let rows = (blocks.len() * BLOCK).min(m - r0);
    TASK_A.with(|pa| {
        let mut pa = pa.borrow_mut();
        let a_len = blocks.len() * 2 * k_tiles * TILE_LEN;
        if pa.len() < a_len {
            pa.resize(a_len, 0);
        }
        pack_tiles(
            &mut pa[..a_len],
            a,
            r0,
            (rows, k),
            (blocks.len() * 2, k_tiles),
            Layout::A,
            Threads::One,
        );
        f(&Packed {
            data: &pa[..a_len],
            k_tiles,
        })
    })
}

/// c_i = a·b_i (or += with `accumulate`) for every part (its B and n): products by several
/// weights of one input pack each band of the input once.
///
/// # Safety
/// As for `matmul`, for every part's destination.
pub(super) unsafe fn matmul_shared_a(
    a: Operand,
    (m, k): (usize, usize),
    parts: &[Part],
    accumulate: bool,
    threads: Threads,
) {
    let k_tiles = k.div_ceil(TILE_K);
    let m_blocks = m.div_ceil(BLOCK);
    PACK.with(|pack| {
        let mut pb = pack.borrow_mut();
        let total: usize = parts
            .iter()
            .map(|p| p.extent.div_ceil(BLOCK) * 2 * k_tiles * TILE_LEN)
            .sum();
        if pb.len() < total {
            pb.resize(total, 0);
        }
        let mut at = 0;
        let mut spans = Vec::with_capacity(parts.len());
        for p in parts {
            let len = pack_b_at(&mut pb, at, p.operand, (k, p.extent), threads);
            spans.push(at..at + len);
            at += len;
        }
        let band = band_blocks(m_blocks, k_tiles, threads);
        let pb: &[u16] = &pb;
        for_each_task(m_blocks.div_ceil(band), threads, |t| {
            let blocks = t * band..((t + 1) * band).min(m_blocks);
            let r0 = blocks.start * BLOCK;
            let rows = (blocks.len() * BLOCK).min(m - r0);
            with_a_band(a, (m, k), &blocks, |pa| {
                for (p, span) in parts.iter().zip(&spans) {
                    let b = Packed {
                        data: &pb[span.clone()],
                        k_tiles,
                    };
                    // SAFETY: rows r0.. of the part's destination, which the caller vouched
                    // for; this task alone writes them.
                    let dest = Dest(unsafe { p.c.ptr().add(r0 * p.ldc) });
                    band_products(dest, p.ldc, pa, &b, (rows, p.extent), accumulate);
                }
            })
        });
    });
}

/// c_i = a_i·b for every part (its A and m): the weight gradients of several weights that
/// read one input pack that input once.
///
/// # Safety
/// As for `matmul`, for every part's destination.
pub(super) unsafe fn matmul_shared_b(
    b: Operand,
    (n, k): (usize, usize),
    parts: &[Part],
    threads: Threads,
) {
    let k_tiles = k.div_ceil(TILE_K);
    PACK.with(|pack| {
        let mut pb = pack.borrow_mut();
        let len = n.div_ceil(BLOCK) * 2 * k_tiles * TILE_LEN;
        if pb.len() < len {
            pb.resize(len, 0);
        }
        pack_b_at(&mut pb, 0, b, (k, n), threads);
        let pb = Packed {
            data: &pb[..len],
            k_tiles,
        };
        // Tasks: every part's bands, in order.
        let mut tasks = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let m_blocks = p.extent.div_ceil(BLOCK);
            let band = band_blocks(m_blocks, k_tiles, threads);
            for b0 in (0..m_blocks).step_by(band) {
                tasks.push((i, b0..(b0 + band).min(m_blocks)));
            }
        }
        for_each_task(tasks.len(), threads, |t| {
            let (i, blocks) = &tasks[t];
            let p = &parts[*i];
            let r0 = blocks.start * BLOCK;
            let rows = (blocks.len() * BLOCK).min(p.extent - r0);
            with_a_band(p.operand, (p.extent, k), blocks, |pa| {
                // SAFETY: rows r0.. of the part's destination, which the caller vouched for;
                // this task alone writes them.
                let dest = Dest(unsafe { p.c.ptr().add(r0 * p.ldc) });
                band_products(dest, p.ldc, pa, &pb, (rows, n), false);
            })
        });
    });
}

/// A B operand packed once and multiplied several times: attention packs a head's keys and
/// values once, then multiplies every block of queries by them.
pub struct PackedB {
    data: Vec<u16>,
    k: usize,
    n: usize,
    k_tiles: usize,
}

impl PackedB {
    /// B (k × n, element (kk, j) at `b[kk·rs + j·cs]`) rounded to bf16 and packed into tiles.
    /// Callers check `available()` first.
    pub fn new(b: Operand, k: usize, n: usize) -> PackedB {
        let (src, rs, cs) = b;
        assert!(k > 0 && n > 0 && src.len() > (k - 1) * rs + (n - 1) * cs);
        let k_tiles = k.div_ceil(TILE_K);
        let n_tiles = n.div_ceil(BLOCK) * 2;
        let mut data = vec![0u16; n_tiles * k_tiles * TILE_LEN];
        pack_tiles(
            &mut data,
            (src, cs, rs),
            0,
            (n, k),
            (n_tiles, k_tiles),
            Layout::B,
            Threads::One,
        );
        PackedB {
            data,
            k,
            n,
            k_tiles,
        }
    }
}

/// c (m×n, row stride `ldc`) = a·b, or c += a·b, on the calling thread, with b packed
/// already: `n` and `k` may be less than b's (its first columns, its first rows). A is packed
/// here; every output block is summed over k-tiles in order, as in `matmul`.
///
/// # Safety
/// As for `matmul`.
pub unsafe fn matmul_packed(
    c: *mut f32,
    ldc: usize,
    a: Operand,
    b: &PackedB,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    let (src, rs, cs) = a;
    assert!(m > 0 && n > 0 && k > 0 && n <= ldc && n <= b.n && k <= b.k);
    assert!(src.len() > (m - 1) * rs + (k - 1) * cs);
    let k_tiles = k.div_ceil(TILE_K);
    TASK_A.with(|pa| {
        let mut pa = pa.borrow_mut();
        let a_len = m.div_ceil(BLOCK) * 2 * k_tiles * TILE_LEN;
        if pa.len() < a_len {
            pa.resize(a_len, 0);
        }
        pack_tiles(
            &mut pa[..a_len],
            a,
            0,
            (m, k),
            (m.div_ceil(BLOCK) * 2, k_tiles),
            Layout::A,
            Threads::One,
        );
        // B's rows past k (inside its last k-tile) meet A's zero padding: they add nothing.
        let pa = Packed {
            data: &pa[..a_len],
            k_tiles,
        };
        let pb = Packed {
            data: &b.data,
            k_tiles: b.k_tiles,
        };
        band_products(Dest(c), ldc, &pa, &pb, (m, n), accumulate);
    });
}

/// One task's band of block-rows across all block-columns, in chunks of 8 block-columns
/// (their B panels stay in L2 while every block-row of the band passes over them).
///
/// What bounds it, measured on this machine's AMX: `tdpbf16ps` alone runs at ≈ 3 TFLOP/s per
/// core, but a `tileloadd` costs ≈ 16 ns (43 cycles) even from L1, so the 2×2 kernel (one load
/// per product) tops out near 1 TFLOP/s per core with its operands in L1 and reaches
/// 450–500 GFLOP/s streaming panels from L2 — `torch.mm` in bf16 gets ≈ 1.1 TFLOP/s per core.
fn band_products(
    dest: Dest,
    ldc: usize,
    pa: &Packed,
    pb: &Packed,
    (m, n): (usize, usize),
    accumulate: bool,
) {
    let (m_blocks, n_blocks) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    // SAFETY: AMX is available (the caller's contract); the band's blocks are this task's.
    unsafe {
        configure_tiles();
        for chunk in (0..n_blocks).step_by(8) {
            for mb in 0..m_blocks {
                for nb in chunk..(chunk + 8).min(n_blocks) {
                    block(dest.ptr(), ldc, pa, pb, (mb, nb), (m, n), accumulate);
                }
            }
        }
        release_tiles();
    }
}

/// Load the tile configuration on this thread.
///
/// # Safety
/// AMX must be `available()`.
unsafe fn configure_tiles() {
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
}

/// Return the tile state, so context switches stop saving 8 KiB for this thread.
///
/// # Safety
/// AMX must be `available()`.
unsafe fn release_tiles() {
    asm!("tilerelease", options(nostack, nomem));
}

/// One 32×32 output block (block-row `mb`, block-column `nb`) over all of k.
///
/// # Safety
/// Tiles configured on this thread; `c` valid for the m×n destination.
unsafe fn block(
    c: *mut f32,
    ldc: usize,
    pa: &Packed,
    pb: &Packed,
    (mb, nb): (usize, usize),
    (m, n): (usize, usize),
    accumulate: bool,
) {
    let (i0, j0) = (mb * BLOCK, nb * BLOCK);
    let whole = i0 + BLOCK <= m && j0 + BLOCK <= n;
    let mut scratch = [std::mem::MaybeUninit::<f32>::uninit(); BLOCK * BLOCK];
    let scratch = scratch.as_mut_ptr() as *mut f32;
    // Where the accumulators are loaded from and stored to: the destination itself, or the
    // scratch block at an edge.
    let (out, ld) = if whole {
        (c.add(i0 * ldc + j0), ldc)
    } else {
        if accumulate {
            for r in 0..(m - i0).min(BLOCK) {
                for s in 0..(n - j0).min(BLOCK) {
                    *scratch.add(r * BLOCK + s) = *c.add((i0 + r) * ldc + j0 + s);
                }
            }
        }
        (scratch, BLOCK)
    };
    let stride = ld * 4; // bytes between rows of the destination
                         // At the matrix's last block-row or block-column only one of the two tiles may hold
                         // outputs (a 288-wide layer is 4½ blocks, a head of 48 1½): the kernel then skips the
                         // empty tiles' products instead of multiplying zero padding.
    let (two_rows, two_cols) = (i0 + TILE_ROWS < m, j0 + TILE_ROWS < n);
    let c01 = out.add(TILE_ROWS);
    let c10 = out.add(TILE_ROWS * ld);
    let c11 = c10.add(TILE_ROWS);
    if accumulate {
        asm!("tileloadd tmm0, [{c} + {s}*1]", c = in(reg) out, s = in(reg) stride, options(nostack, readonly));
        if two_cols {
            asm!("tileloadd tmm1, [{c} + {s}*1]", c = in(reg) c01, s = in(reg) stride, options(nostack, readonly));
        }
        if two_rows {
            asm!("tileloadd tmm2, [{c} + {s}*1]", c = in(reg) c10, s = in(reg) stride, options(nostack, readonly));
        }
        if two_rows && two_cols {
            asm!("tileloadd tmm3, [{c} + {s}*1]", c = in(reg) c11, s = in(reg) stride, options(nostack, readonly));
        }
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    let tile_stride = TILE_K * 2; // bytes per packed tile row
    for kt in 0..pa.k_tiles {
        let (a0, a1) = (pa.tile(2 * mb, kt), pa.tile(2 * mb + 1, kt));
        let (b0, b1) = (pb.tile(2 * nb, kt), pb.tile(2 * nb + 1, kt));
        match (two_rows, two_cols) {
            (true, true) => asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                s = in(reg) tile_stride,
                options(nostack, readonly),
            ),
            (true, false) => asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                s = in(reg) tile_stride,
                options(nostack, readonly),
            ),
            (false, true) => asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                a0 = in(reg) a0, b0 = in(reg) b0, b1 = in(reg) b1,
                s = in(reg) tile_stride,
                options(nostack, readonly),
            ),
            (false, false) => asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                a0 = in(reg) a0, b0 = in(reg) b0,
                s = in(reg) tile_stride,
                options(nostack, readonly),
            ),
        }
    }
    asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) out, s = in(reg) stride, options(nostack));
    if two_cols {
        asm!("tilestored [{c} + {s}*1], tmm1", c = in(reg) c01, s = in(reg) stride, options(nostack));
    }
    if two_rows {
        asm!("tilestored [{c} + {s}*1], tmm2", c = in(reg) c10, s = in(reg) stride, options(nostack));
    }
    if two_rows && two_cols {
        asm!("tilestored [{c} + {s}*1], tmm3", c = in(reg) c11, s = in(reg) stride, options(nostack));
    }
    if !whole {
        for r in 0..(m - i0).min(BLOCK) {
            for s in 0..(n - j0).min(BLOCK) {
                *c.add((i0 + r) * ldc + j0 + s) = *scratch.add(r * BLOCK + s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of bf16-rounded operands, summed in f64: what AMX computes, up to the
    /// order of f32 additions.
    fn reference(a: Operand, b: Operand, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|kk| r(a.0[i * a.1 + kk * a.2]) * r(b.0[kk * b.1 + j * b.2]))
                    .sum();
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::util::rng::Rng::new(seed);
        (0..len).map(|_| rng.normal() as f32).collect()
    }

    #[test]
    fn words_transpose() {
        if !available() {
            return;
        }
        let mut m = [0u32; 256];
        for (i, x) in m.iter_mut().enumerate() {
            *x = i as u32;
        }
        unsafe {
            let mut rows = [_mm512_setzero_si512(); 16];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = std::arch::x86_64::_mm512_loadu_si512(m[r * 16..].as_ptr() as *const _);
            }
            transpose_words(&mut rows);
            for (r, row) in rows.iter().enumerate() {
                _mm512_storeu_si512(m[r * 16..].as_mut_ptr() as *mut _, *row);
            }
        }
        for r in 0..16 {
            for c in 0..16 {
                assert_eq!(m[r * 16 + c], (c * 16 + r) as u32);
            }
        }
    }

    #[test]
    fn packing_rounds_like_the_reference() {
        if !available() {
            return;
        }
        // Random bit patterns: normal numbers, denormals, infinities and NaNs.
        let mut rng = crate::util::rng::Rng::new(9);
        let mut x: Vec<f32> = (0..32 * 16)
            .map(|_| f32::from_bits(rng.next_u64() as u32))
            .collect();
        x[0] = 1e-40; // a denormal
        x[1] = -1e-41;
        let mut tile = vec![0u16; TILE_LEN];
        unsafe { tile_from(&mut tile, (&x, 32, 1), (0, 0), (16, 32), Layout::A) };
        for (i, (&got, &v)) in tile.iter().zip(&x).enumerate() {
            if v.is_nan() {
                assert!(from_bf16(got).is_nan(), "{i}");
            } else {
                assert_eq!(got, to_bf16(v), "{i}: {v:e}");
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between two bf16 values: rounds to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
    }

    #[test]
    fn products_match_the_bf16_reference_on_odd_shapes_and_layouts() {
        if !available() {
            eprintln!("no AMX on this CPU: kernel test skipped");
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (17, 33, 31),
            (40, 70, 65),
            (64, 64, 64),
            (100, 3, 300),
        ] {
            for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
                let a_data = random(m * k, 1);
                let b_data = random(k * n, 2);
                let a: Operand = if ta { (&a_data, 1, m) } else { (&a_data, k, 1) };
                let b: Operand = if tb { (&b_data, 1, k) } else { (&b_data, n, 1) };
                let want = reference(a, b, (m, n, k));
                for accumulate in [false, true] {
                    let ldc = n + 3;
                    let mut c = vec![0.5f32; m * ldc];
                    unsafe {
                        matmul(
                            c.as_mut_ptr(),
                            ldc,
                            a,
                            b,
                            (m, n, k),
                            accumulate,
                            Threads::All,
                        )
                    };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= n {
                                assert_eq!(got, 0.5, "wrote outside the destination");
                                continue;
                            }
                            let w = want[i * n + j] + if accumulate { 0.5 } else { 0.0 };
                            assert!(
                                (got - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f32).sqrt(),
                                "({m},{n},{k}) ta={ta} tb={tb} acc={accumulate} at ({i},{j}): {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_packed_b_serves_products_over_its_first_rows_and_columns() {
        if !available() {
            eprintln!("no AMX on this CPU: kernel test skipped");
            return;
        }
        // B packed once (k_full × n_full, both layouts), then used as attention uses it:
        // shorter k (a block's keys) and fewer columns (a block's causal prefix).
        let (k_full, n_full) = (100, 75);
        let b_data = random(k_full * n_full, 3);
        for tb in [false, true] {
            let b: Operand = if tb {
                (&b_data, 1, k_full)
            } else {
                (&b_data, n_full, 1)
            };
            let packed = PackedB::new(b, k_full, n_full);
            for &(m, n, k) in &[(1, 1, 1), (17, 75, 100), (40, 33, 64), (64, 64, 37)] {
                let a_data = random(m * k, 4);
                let want = reference((&a_data, k, 1), b, (m, n, k));
                for accumulate in [false, true] {
                    let ldc = n + 2;
                    let mut c = vec![0.25f32; m * ldc];
                    unsafe {
                        matmul_packed(
                            c.as_mut_ptr(),
                            ldc,
                            (&a_data, k, 1),
                            &packed,
                            (m, n, k),
                            accumulate,
                        )
                    };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j];
                            if j >= n {
                                assert_eq!(got, 0.25, "wrote outside the destination");
                                continue;
                            }
                            let w = want[i * n + j] + if accumulate { 0.25 } else { 0.0 };
                            assert!(
                                (got - w).abs() <= 1e-4 * (1.0 + w.abs()) * (k as f32).sqrt(),
                                "({m},{n},{k}) tb={tb} acc={accumulate} at ({i},{j}): {got} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        if !available() {
            return;
        }
        let (m, n, k) = (300, 200, 100);
        let a = random(m * k, 3);
        let b = random(k * n, 4);
        let run = |threads| {
            let mut c = vec![0f32; m * n];
            unsafe {
                matmul(
                    c.as_mut_ptr(),
                    n,
                    (&a, k, 1),
                    (&b, n, 1),
                    (m, n, k),
                    false,
                    threads,
                )
            };
            c
        };
        let one = run(Threads::One);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let three = pool.install(|| run(Threads::All));
        assert_eq!(one, three);
    }
}
