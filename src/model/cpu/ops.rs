//! Row-wise building blocks of the CPU step over plain f32 buffers: products with a weight
//! matrix (forward and both backward products), RMSNorm, rotary embedding, parallel zeroing.
//! Every reduction runs in fixed row chunks, so results do not depend on the thread count.

use super::kernels::{rmsnorm_backward_row, rmsnorm_row};
use super::matmul::{
    matmul_into, matmul_new, matmul_new_shared_a, matmul_new_shared_b, Precision, Threads,
};
use super::Dims;
use rayon::prelude::*;

/// Rows per parallel task for row-wise ops and for the partial sums of norm-weight gradients.
pub const ROWS: usize = 32;

/// (rows, inp, out) of a product with a weight matrix (out×inp as stored).
pub type Shape = (usize, usize, usize);

/// How a sum over the batch's rows (a weight gradient, a norm weight's gradient) is taken:
/// whole, or as (first half of the rows) + (second half). A run of one process sums in halves,
/// so that it adds the same two numbers as a 2-rank data-parallel run whose ranks each sum their
/// half and whose all-reduce adds the two (a + b = b + a): the two runs then train bit for bit
/// alike. Each rank of a data-parallel run sums its rows whole.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reduce {
    Whole,
    Halves,
}

impl Reduce {
    /// Halves for `rows` rows of `batch` sequences when the batch splits into two equal halves.
    pub fn for_batch(halves: bool, batch: usize) -> Reduce {
        if halves && batch >= 2 && batch.is_multiple_of(2) {
            Reduce::Halves
        } else {
            Reduce::Whole
        }
    }
}

/// y (rows×out) = x (rows×inp) · wᵀ, w being (out×inp) as stored.
pub fn linear(x: &[f32], w: &[f32], (rows, inp, out): Shape, p: Precision) -> Vec<f32> {
    matmul_new((x, inp, 1), (w, 1, inp), (rows, out, inp), p)
}

/// y_i (rows×out_i) = x · w_iᵀ for every (w_i, out_i): one input by several weights (q, k, v;
/// gate, up), the input packed once.
pub fn linear_shared(
    x: &[f32],
    ws: &[(&[f32], usize)],
    (rows, inp): (usize, usize),
    p: Precision,
) -> Vec<Vec<f32>> {
    let bs: Vec<_> = ws.iter().map(|&(w, out)| ((w, 1, inp), out)).collect();
    matmul_new_shared_a((x, inp, 1), (rows, inp), &bs, p)
}

/// dw_i (out_i×inp) = dy_iᵀ · x for every (dy_i, out_i): the weight gradients of weights that
/// read one input, the input packed once; summed over the rows as `r` says.
pub fn linear_dw_shared(
    dys: &[(&[f32], usize)],
    x: &[f32],
    (rows, inp): (usize, usize),
    p: Precision,
    r: Reduce,
) -> Vec<Vec<f32>> {
    let whole = |dys: &[(&[f32], usize)], x: &[f32], rows: usize| {
        let a_s: Vec<_> = dys.iter().map(|&(dy, out)| ((dy, 1, out), out)).collect();
        matmul_new_shared_b((x, inp, 1), (inp, rows), &a_s, p)
    };
    match r {
        Reduce::Whole => whole(dys, x, rows),
        Reduce::Halves => {
            let h = rows / 2;
            let first: Vec<_> = dys.iter().map(|&(dy, o)| (&dy[..h * o], o)).collect();
            let second: Vec<_> = dys.iter().map(|&(dy, o)| (&dy[h * o..], o)).collect();
            let mut sums = whole(&first, &x[..h * inp], h);
            let rest = whole(&second, &x[h * inp..], rows - h);
            for (a, b) in sums.iter_mut().zip(&rest) {
                add_in_place(a, b);
            }
            sums
        }
    }
}

/// dx (rows×inp) = dy (rows×out) · w.
pub fn linear_dx(dy: &[f32], w: &[f32], (rows, inp, out): Shape, p: Precision) -> Vec<f32> {
    matmul_new((dy, out, 1), (w, inp, 1), (rows, inp, out), p)
}

/// dx += dy · w.
pub fn linear_dx_add(dx: &mut [f32], dy: &[f32], w: &[f32], (rows, inp, out): Shape, p: Precision) {
    matmul_into(
        dx,
        inp,
        (dy, out, 1),
        (w, inp, 1),
        (rows, inp, out),
        true,
        Threads::All,
        p,
    );
}

/// dw (out×inp) = dyᵀ · x, summed over the rows as `r` says.
pub fn linear_dw(
    dy: &[f32],
    x: &[f32],
    (rows, inp, out): Shape,
    p: Precision,
    r: Reduce,
) -> Vec<f32> {
    let whole = |dy: &[f32], x: &[f32], rows: usize| {
        matmul_new((dy, 1, out), (x, inp, 1), (out, inp, rows), p)
    };
    match r {
        Reduce::Whole => whole(dy, x, rows),
        Reduce::Halves => {
            let h = rows / 2;
            let mut sum = whole(&dy[..h * out], &x[..h * inp], h);
            add_in_place(&mut sum, &whole(&dy[h * out..], &x[h * inp..], rows - h));
            sum
        }
    }
}

/// RMSNorm forward: out = x · rstd · w per row; rstd saved for the backward.
pub fn rmsnorm(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c * ROWS)
        .zip(rstd.par_chunks_mut(ROWS))
        .zip(x.par_chunks(c * ROWS))
        .for_each(|((out, rstd), x)| {
            for ((o, r), x) in out.chunks_mut(c).zip(rstd.iter_mut()).zip(x.chunks(c)) {
                *r = rmsnorm_row(o, x, w, eps);
            }
        });
}

/// RMSNorm backward: dx += rstd·(w·dy − x̂·mean(w·dy·x̂)), dw = Σ dy·x̂ (x̂ = x·rstd).
#[allow(clippy::too_many_arguments)] // the backward's inputs, outputs and how to sum
pub fn rmsnorm_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    rstd: &[f32],
    w: &[f32],
    c: usize,
    r: Reduce,
) {
    match r {
        Reduce::Whole => rmsnorm_backward_rows(dx, dw, dy, x, rstd, w, c),
        Reduce::Halves => {
            let h = rstd.len() / 2;
            let (dx0, dx1) = dx.split_at_mut(h * c);
            let mut rest = vec![0f32; c];
            rmsnorm_backward_rows(dx0, dw, &dy[..h * c], &x[..h * c], &rstd[..h], w, c);
            rmsnorm_backward_rows(dx1, &mut rest, &dy[h * c..], &x[h * c..], &rstd[h..], w, c);
            for (a, b) in dw.iter_mut().zip(rest) {
                *a += b;
            }
        }
    }
}

/// The backward over rows; dw = the sum of fixed 32-row partial sums, in order.
fn rmsnorm_backward_rows(
    dx: &mut [f32],
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    rstd: &[f32],
    w: &[f32],
    c: usize,
) {
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(c * ROWS)
        .zip(dy.par_chunks(c * ROWS))
        .zip(x.par_chunks(c * ROWS))
        .zip(rstd.par_chunks(ROWS))
        .map(|(((dx, dy), x), rstd)| {
            let mut dw = vec![0f32; c];
            for (((dx, dy), x), &r) in dx
                .chunks_mut(c)
                .zip(dy.chunks(c))
                .zip(x.chunks(c))
                .zip(rstd)
            {
                rmsnorm_backward_row(dx, &mut dw, dy, x, w, r);
            }
            dw
        })
        .collect();
    dw.fill(0.0);
    for p in partials {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
}

/// a += b, on all threads, in chunks whose inner loops vectorize (a per-element parallel
/// iterator does not).
pub fn add_in_place(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    a.par_chunks_mut(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .for_each(|(a, b)| {
            for (a, b) in a.iter_mut().zip(b) {
                *a += b;
            }
        });
}

/// A zero-filled buffer, filled on all threads: `vec![0.0; len]` zeroes on the calling
/// thread alone, which left the other core idle for ≈ 3 % of a step.
pub fn zeros(len: usize) -> Vec<f32> {
    if len < 1 << 16 {
        return vec![0.0; len];
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 15)
        .for_each(|chunk| {
            for x in chunk {
                x.write(0.0);
            }
        });
    // SAFETY: every element of the first `len` was written above.
    unsafe { v.set_len(len) };
    v
}

/// Rotate one head vector in place (half-split layout).
#[inline]
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        let (c, s) = (cos[i], if inverse { -sin[i] } else { sin[i] });
        x[i] = a * c - b * s;
        x[i + half] = a * s + b * c;
    }
}

/// Rotary embedding applied in place to every head of a token-major (n × heads·d) matrix;
/// `inverse` applies the transpose, which is the backward of the rotation.
pub fn rope_in_place(
    x: &mut [f32],
    heads: usize,
    g: &Dims,
    (cos, sin): (&[f32], &[f32]),
    inverse: bool,
) {
    let (t, d, half) = (g.seq, g.head_dim, g.head_dim / 2);
    let width = heads * d;
    x.par_chunks_mut(width * ROWS)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (r, row) in rows.chunks_mut(width).enumerate() {
                let ti = (chunk * ROWS + r) % t;
                let (cos, sin) = (
                    &cos[ti * half..(ti + 1) * half],
                    &sin[ti * half..(ti + 1) * half],
                );
                for head in row.chunks_mut(d) {
                    rotate(head, cos, sin, inverse);
                }
            }
        });
}
