//! Causal attention for one head on the CPU, forward and backward, over token-major
//! projections read and written in place (heads are column strips of the (N, heads·D)
//! matrices). Per-thread (T × T) scratch holds one head's probabilities block by block.

use super::amx::{self, PackedB};
use super::kernels::{causal_exp, causal_probs, softmax_backward};
use super::matmul::{product, Operand, Precision, Threads};

thread_local! {
    /// Per-thread (t × t) scratch for attention blocks, reused across heads, layers and steps.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Run `f` with two scratch buffers of `len` floats from this thread's pool: no allocation
/// and no zeroing per head. Their contents are stale; the attention kernels write every
/// element they read.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.0.len() < len {
            s.0.resize(len, 0.0);
            s.1.resize(len, 0.0);
        }
        let (a, b) = &mut *s;
        f(&mut a[..len], &mut b[..len])
    })
}

/// Query rows per causal block: block r multiplies only against keys 0..end of that block, so
/// the products skip most of the masked upper triangle.
const BLOCK: usize = 64;

fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(BLOCK)).map(move |r| (r * BLOCK, ((r + 1) * BLOCK).min(t)))
}

/// Where one head's rows live in a token-major (rows × heads·d) matrix: its first element
/// and the row stride. Heads are column strips of the projections' outputs, so attention
/// reads and writes them in place: no copies into and out of a head-major layout.
#[derive(Clone, Copy)]
pub struct Strip {
    pub offset: usize,
    pub ld: usize,
}

/// A token-major matrix that parallel attention tasks write, each only its own heads'
/// column strips, through raw pointers (the strips interleave in memory, so they cannot be
/// handed out as separate `&mut` slices).
#[derive(Clone, Copy)]
pub struct SharedOut(pub *mut f32);
// SAFETY: tasks write disjoint strips; the buffer outlives the parallel loop that uses it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// A right-hand operand one head multiplies every block of its rows by (its keys or
/// values): read in place in f32, or — for bf16 products on AMX — rounded and packed once per
/// head instead of once per block.
struct HeadB<'a> {
    b: Operand<'a>,
    packed: Option<PackedB>,
}

impl<'a> HeadB<'a> {
    /// b is (k × n).
    fn new(b: Operand<'a>, (k, n): (usize, usize), precision: Precision) -> HeadB<'a> {
        let packed =
            (precision == Precision::Bf16 && amx::available()).then(|| PackedB::new(b, k, n));
        HeadB { b, packed }
    }

    /// c (m×n, row stride `ldc`) = a·b[..k, ..n], or += with `accumulate`, on this thread.
    ///
    /// # Safety
    /// As for `matmul::matmul_ptr`.
    unsafe fn mul(
        &self,
        c: *mut f32,
        ldc: usize,
        a: Operand,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) {
        match &self.packed {
            Some(packed) => amx::matmul_packed(c, ldc, a, packed, (m, n, k), accumulate),
            None => product(
                c,
                ldc,
                a,
                self.b,
                (m, n, k),
                accumulate,
                Threads::One,
                Precision::F32,
            ),
        }
    }
}

/// One head of causal attention: o = softmax(q·kᵀ·scale)·v, with each row's log-sum-exp
/// saved in `lse` so the backward recomputes probabilities in one pass. The exponentials are
/// multiplied by v unnormalised and the (t × d) output rows scaled afterwards, which is
/// cheaper than normalising (t × t) probabilities. q is read at `qs` (the output has the same
/// layout), k and v at `kvs`; p is (t × t) scratch.
///
/// # Safety
/// `o` must point to a matrix of q's shape, of which this call alone writes the strip `qs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_head(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (qs, kvs): (Strip, Strip),
    o: SharedOut,
    lse: &mut [f32],
    p: &mut [f32],
    (t, d): (usize, usize),
    scale: f32,
    precision: Precision,
) {
    let mut inv = [0f32; BLOCK];
    let (q, k, v) = (&q[qs.offset..], &k[kvs.offset..], &v[kvs.offset..]);
    let keys_t = HeadB::new((k, 1, kvs.ld), (d, t), precision); // kᵀ: (d × t)
    let values = HeadB::new((v, kvs.ld, 1), (t, d), precision); // (t × d)
    let o = o.0.add(qs.offset);
    for (i0, i1) in blocks(t) {
        let rows = i1 - i0;
        let pb = &mut p[i0 * t..];
        keys_t.mul(
            pb.as_mut_ptr(),
            t,
            (&q[i0 * qs.ld..], qs.ld, 1),
            (rows, i1, d),
            false,
        );
        causal_exp(pb, t, i0, rows, scale, &mut lse[i0..i1], &mut inv[..rows]);
        let ob = o.add(i0 * qs.ld);
        values.mul(ob, qs.ld, (pb, t, 1), (rows, d, i1), false);
        for (r, &s) in inv[..rows].iter().enumerate() {
            for x in std::slice::from_raw_parts_mut(ob.add(r * qs.ld), d) {
                *x *= s;
            }
        }
    }
}

/// One head's saved forward values and output gradient: q, k, v, the attention output o,
/// d(o), all token-major, and the head's row log-sum-exps.
pub type HeadInputs<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
);

/// Backward of `attention_head`: dq = ds·k, dk += dsᵀ·q, dv += pᵀ·do, with
/// ds = p ⊙ (do·vᵀ − rowsum(do ⊙ o))·scale; p and ds are (t × t) scratch. dk and dv
/// accumulate, so query heads sharing a key/value head (GQA) add into them in turn.
///
/// # Safety
/// `dq` must point to a matrix of q's shape and `dk`, `dv` to matrices of k's, of which this
/// call alone writes the strips `qs` and `kvs`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention_head_backward(
    (q, k, v, o, dout, lse): HeadInputs,
    (qs, kvs): (Strip, Strip),
    (dq, dk, dv): (SharedOut, SharedOut, SharedOut),
    (p, ds): (&mut [f32], &mut [f32]),
    (t, d): (usize, usize),
    scale: f32,
    precision: Precision,
) {
    let (q, o, dout) = (&q[qs.offset..], &o[qs.offset..], &dout[qs.offset..]);
    let (k, v) = (&k[kvs.offset..], &v[kvs.offset..]);
    let (dq, dk, dv) = (
        dq.0.add(qs.offset),
        dk.0.add(kvs.offset),
        dv.0.add(kvs.offset),
    );
    let keys_t = HeadB::new((k, 1, kvs.ld), (d, t), precision); // kᵀ: (d × t)
    let values_t = HeadB::new((v, 1, kvs.ld), (d, t), precision); // vᵀ: (d × t)
    let keys = HeadB::new((k, kvs.ld, 1), (t, d), precision); // (t × d)
    let ld = qs.ld;
    for (i0, i1) in blocks(t) {
        let rows = i1 - i0;
        // Recomputing the probabilities (one small product per block) is faster than keeping
        // them from the forward: a head's (t × t) block stays in cache instead of streaming
        // b·h·t² floats per layer through memory.
        let pb = &mut p[i0 * t..];
        keys_t.mul(
            pb.as_mut_ptr(),
            t,
            (&q[i0 * ld..], ld, 1),
            (rows, i1, d),
            false,
        );
        causal_probs(pb, t, i0, rows, scale, &lse[i0..i1]);
        let db = &mut ds[i0 * t..];
        values_t.mul(
            db.as_mut_ptr(),
            t,
            (&dout[i0 * ld..], ld, 1),
            (rows, i1, d),
            false,
        );
        softmax_backward(
            db,
            pb,
            t,
            i0,
            rows,
            &dout[i0 * ld..],
            &o[i0 * ld..],
            ld,
            d,
            scale,
        );
        keys.mul(dq.add(i0 * ld), ld, (db, t, 1), (rows, d, i1), false);
        // The key and value gradients multiply by this block's own rows: packed per block.
        let one = Threads::One;
        let q_rows = (&q[i0 * ld..], ld, 1);
        product(
            dk,
            kvs.ld,
            (db, 1, t),
            q_rows,
            (i1, d, rows),
            true,
            one,
            precision,
        );
        let dout_rows = (&dout[i0 * ld..], ld, 1);
        product(
            dv,
            kvs.ld,
            (pb, 1, t),
            dout_rows,
            (i1, d, rows),
            true,
            one,
            precision,
        );
    }
}
