//! The training step on the CPU in f32, written out by hand: forward, cross-entropy and backward
//! over plain buffers, matrix products through `gemm`, everything else in parallel row chunks.
//!
//! Why: candle's autograd on the CPU spends most of a step outside the matrix products — one
//! fresh, zeroed allocation per op, single-threaded elementwise kernels, broadcasting copies —
//! and ran at 0.2–0.45× PyTorch. Here every intermediate is computed once, in the layout the
//! next product wants, and the backward pass is the forward read in reverse (llm.c's approach).
//! The composed candle model (`Llama::forward` + autograd) stays the reference: tests compare
//! gradients of this step against it. Other devices and dtypes use that path.
//!
//! Determinism: every reduction has a fixed order that does not depend on the thread count
//! (row chunks of a fixed size, partial sums added in chunk order; gemm splits only the output).

use super::kernels::{
    causal_exp, causal_probs, cross_entropy_row, softmax_backward, swiglu, swiglu_backward,
};
use super::Llama;
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Rows per parallel task for row-wise ops and for the partial sums of norm-weight gradients.
const ROWS: usize = 32;

pub struct StepResult {
    pub loss: f64,
    /// Gradient of the mean loss for every parameter, by name.
    pub grads: BTreeMap<String, Tensor>,
    /// When the forward pass (through the loss) ended and the backward began.
    pub forward_done: std::time::Instant,
}

/// Borrowed f32 views of the model's parameters (the read guards stay alive in `guards`).
struct Weights<'a> {
    #[allow(clippy::type_complexity)]
    guards: Vec<(
        &'a str,
        Box<dyn std::ops::Deref<Target = candle_core::Storage> + 'a>,
        (usize, usize),
    )>,
}

impl<'a> Weights<'a> {
    fn new(model: &'a Llama) -> Result<Self> {
        let mut guards: Vec<(
            &str,
            Box<dyn std::ops::Deref<Target = candle_core::Storage>>,
            _,
        )> = Vec::new();
        for (name, var) in model.params() {
            let (storage, layout) = var.storage_and_layout();
            let Some(range) = layout.contiguous_offsets() else {
                candle_core::bail!("parameter {name} is not contiguous");
            };
            guards.push((name.as_str(), Box::new(storage), range));
        }
        Ok(Weights { guards })
    }

    fn get(&self, name: &str) -> Result<&[f32]> {
        let Some((_, storage, (a, b))) = self.guards.iter().find(|(n, _, _)| *n == name) else {
            candle_core::bail!("model has no parameter {name}")
        };
        match &***storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => Ok(&v[*a..*b]),
            _ => candle_core::bail!("parameter {name} is not an f32 CPU tensor"),
        }
    }
}

/// c (m×n) = a (m×k) · b (k×n), or c += a·b with `accumulate`; matrices are given by pointer
/// and (row stride, column stride), so transposes cost nothing.
/// `matmul` with explicit parallelism (None inside tasks that already run in parallel).
fn matmul_on(
    c: &mut [f32],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    matmul_strided(c, n, a, b, (m, n, k), accumulate, parallelism)
}

/// A new (m × n) matrix a·b. gemm writes it straight into fresh memory: with read_dst false
/// it never reads the destination, so the zeroing pass of `vec![0.0; ..]` is skipped.
fn matmul_new(
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (m, n, k): (usize, usize, usize),
) -> Vec<f32> {
    check_operands(a, b, (m, n, k));
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: operands checked above; the destination is the Vec's own capacity (m·n
    // elements, row stride n), every element of which gemm writes without reading it
    // (read_dst = false) before the length is set.
    unsafe {
        gemm_raw(c.as_mut_ptr(), n, a, b, (m, n, k), false, threads());
        c.set_len(m * n);
    }
    c
}

fn threads() -> gemm::Parallelism {
    gemm::Parallelism::Rayon(rayon::current_num_threads())
}

fn check_operands(
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (m, n, k): (usize, usize, usize),
) {
    assert!(m > 0 && n > 0 && k > 0);
    assert!(a.0.len() > (m - 1) * a.1 + (k - 1) * a.2);
    assert!(b.0.len() > (k - 1) * b.1 + (n - 1) * b.2);
}

/// # Safety
/// `c` must be valid for writes (and reads, when accumulating) of an (m × n) matrix with row
/// stride `ldc`, not overlapping `a` or `b`, and the operands must hold their matrices.
unsafe fn gemm_raw(
    c: *mut f32,
    ldc: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
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
        parallelism,
    )
}

/// `matmul_on` into a destination with row stride `ldc` (a block of a wider matrix).
fn matmul_strided(
    c: &mut [f32],
    ldc: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    check_operands(a, b, (m, n, k));
    assert!(n <= ldc && c.len() >= (m - 1) * ldc + n);
    // SAFETY: the asserts keep every access inside the slices; `c` is borrowed mutably, so it
    // cannot overlap the operands.
    unsafe {
        gemm_raw(
            c.as_mut_ptr(),
            ldc,
            a,
            b,
            (m, n, k),
            accumulate,
            parallelism,
        )
    }
}

thread_local! {
    /// Per-thread (t × t) scratch for attention blocks, reused across heads, layers and steps.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new()))
    };
}

/// Run `f` with two scratch buffers of `len` floats from this thread's pool: no allocation
/// and no zeroing per head. Their contents are stale; the attention kernels write every
/// element they read.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
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

/// One head of causal attention: o = softmax(q·kᵀ·scale)·v, with each row's log-sum-exp
/// saved in `lse` so the backward recomputes probabilities in one pass. The exponentials are
/// multiplied by v unnormalised and the (t × d) output rows scaled afterwards, which is
/// cheaper than normalising (t × t) probabilities. q, k, v, o are (t × d); p is scratch.
#[allow(clippy::too_many_arguments)]
fn attention_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    lse: &mut [f32],
    p: &mut [f32],
    t: usize,
    d: usize,
    scale: f32,
) {
    let mut inv = [0f32; BLOCK];
    let one = gemm::Parallelism::None;
    for (i0, i1) in blocks(t) {
        let rows = i1 - i0;
        let pb = &mut p[i0 * t..];
        matmul_strided(
            pb,
            t,
            (&q[i0 * d..], d, 1),
            (k, 1, d),
            (rows, i1, d),
            false,
            one,
        );
        causal_exp(pb, t, i0, rows, scale, &mut lse[i0..i1], &mut inv[..rows]);
        let ob = &mut o[i0 * d..i1 * d];
        matmul_on(ob, (pb, t, 1), (v, d, 1), (rows, d, i1), false, one);
        for (row, &s) in ob.chunks_mut(d).zip(&inv[..rows]) {
            for x in row {
                *x *= s;
            }
        }
    }
}

/// One head's q, k, v, output, output gradient and row log-sum-exps.
type HeadSlices<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
    &'a [f32],
);

/// Backward of `attention_head`: dq = ds·k, dk += dsᵀ·q, dv += pᵀ·do, with
/// ds = p ⊙ (do·vᵀ − rowsum(do ⊙ o))·scale; p and ds are (t × t) scratch. dk and dv accumulate, so query heads
/// sharing a key/value head (GQA) add into them in turn.
#[allow(clippy::too_many_arguments)]
fn attention_head_backward(
    (q, k, v, o, dout, lse): HeadSlices,
    (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    (p, ds): (&mut [f32], &mut [f32]),
    t: usize,
    d: usize,
    scale: f32,
) {
    let one = gemm::Parallelism::None;
    for (i0, i1) in blocks(t) {
        let rows = i1 - i0;
        // Recomputing the probabilities (one small product per block) is faster than keeping
        // them from the forward: a head's (t × t) block stays in cache instead of streaming
        // b·h·t² floats per layer through memory.
        let pb = &mut p[i0 * t..];
        matmul_strided(
            pb,
            t,
            (&q[i0 * d..], d, 1),
            (k, 1, d),
            (rows, i1, d),
            false,
            one,
        );
        causal_probs(pb, t, i0, rows, scale, &lse[i0..i1]);
        let db = &mut ds[i0 * t..];
        matmul_strided(
            db,
            t,
            (&dout[i0 * d..], d, 1),
            (v, 1, d),
            (rows, i1, d),
            false,
            one,
        );
        softmax_backward(
            db,
            pb,
            t,
            i0,
            rows,
            &dout[i0 * d..i1 * d],
            &o[i0 * d..i1 * d],
            d,
            scale,
        );
        matmul_on(
            &mut dq[i0 * d..i1 * d],
            (db, t, 1),
            (k, d, 1),
            (rows, d, i1),
            false,
            one,
        );
        matmul_on(
            &mut dk[..i1 * d],
            (db, 1, t),
            (&q[i0 * d..], d, 1),
            (i1, d, rows),
            true,
            one,
        );
        matmul_on(
            &mut dv[..i1 * d],
            (pb, 1, t),
            (&dout[i0 * d..], d, 1),
            (i1, d, rows),
            true,
            one,
        );
    }
}

/// y (rows×out) = x (rows×inp) · wᵀ, w being (out×inp) as stored.
fn linear(x: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    matmul_new((x, inp, 1), (w, 1, inp), (rows, out, inp))
}

/// dx (rows×inp) = dy (rows×out) · w.
fn linear_dx(dy: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    matmul_new((dy, out, 1), (w, inp, 1), (rows, inp, out))
}

/// dx += dy · w.
fn linear_dx_add(dx: &mut [f32], dy: &[f32], w: &[f32], rows: usize, inp: usize, out: usize) {
    matmul_strided(
        dx,
        inp,
        (dy, out, 1),
        (w, inp, 1),
        (rows, inp, out),
        true,
        threads(),
    );
}

/// dw (out×inp) = dyᵀ · x.
fn linear_dw(dy: &[f32], x: &[f32], rows: usize, inp: usize, out: usize) -> Vec<f32> {
    matmul_new((dy, 1, out), (x, inp, 1), (out, inp, rows))
}

/// RMSNorm forward: out = x · rstd · w per row; rstd saved for the backward.
fn rmsnorm(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c * ROWS)
        .zip(rstd.par_chunks_mut(ROWS))
        .zip(x.par_chunks(c * ROWS))
        .for_each(|((out, rstd), x)| {
            for ((o, r), x) in out.chunks_mut(c).zip(rstd.iter_mut()).zip(x.chunks(c)) {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / c as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                    *o = x * *r * w;
                }
            }
        });
}

/// RMSNorm backward: dx += rstd·(w·dy − x̂·mean(w·dy·x̂)), dw = Σ dy·x̂ (x̂ = x·rstd).
fn rmsnorm_backward(
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
                let mut dot = 0f32;
                for i in 0..c {
                    let xh = x[i] * r;
                    dw[i] += dy[i] * xh;
                    dot += dy[i] * w[i] * xh;
                }
                let mean = dot / c as f32;
                for i in 0..c {
                    dx[i] += r * (dy[i] * w[i] - x[i] * r * mean);
                }
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

/// Geometry of one step.
#[derive(Clone, Copy)]
struct Dims {
    t: usize,
    n: usize,
    c: usize,
    h: usize,
    kv: usize,
    d: usize,
    f: usize,
    v: usize,
}

/// Rotate one head vector in place (half-split layout); `inverse` applies the transpose, which
/// is the backward of the rotation.
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

/// (n × heads·d) rows → (b, heads, t, d) blocks, rotating each head vector when `rope` is given.
fn to_heads(src: &[f32], heads: usize, g: Dims, rope: Option<(&[f32], &[f32])>) -> Vec<f32> {
    let (t, d) = (g.t, g.d);
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(t * d)
        .enumerate()
        .for_each(|(bh, block)| {
            let (b, h) = (bh / heads, bh % heads);
            for (ti, dst) in block.chunks_mut(d).enumerate() {
                let row = (b * t + ti) * heads * d + h * d;
                dst.copy_from_slice(&src[row..row + d]);
                if let Some((cos, sin)) = rope {
                    let half = d / 2;
                    rotate(
                        dst,
                        &cos[ti * half..(ti + 1) * half],
                        &sin[ti * half..(ti + 1) * half],
                        false,
                    );
                }
            }
        });
    out
}

/// The inverse of `to_heads`: (b, heads, t, d) → (n × heads·d), un-rotating for gradients.
fn from_heads(src: &[f32], heads: usize, g: Dims, rope: Option<(&[f32], &[f32])>) -> Vec<f32> {
    let (t, d) = (g.t, g.d);
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(row, dst)| {
            let (b, ti) = (row / t, row % t);
            for h in 0..heads {
                let block = ((b * heads + h) * t + ti) * d;
                let o = &mut dst[h * d..(h + 1) * d];
                o.copy_from_slice(&src[block..block + d]);
                if let Some((cos, sin)) = rope {
                    let half = d / 2;
                    rotate(
                        o,
                        &cos[ti * half..(ti + 1) * half],
                        &sin[ti * half..(ti + 1) * half],
                        true,
                    );
                }
            }
        });
    out
}

/// What the backward pass needs from one layer's forward.
struct LayerActs {
    x_in: Vec<f32>,
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    /// Log-sum-exp of each attention row, (b, h, t).
    lse: Vec<f32>,
    y: Vec<f32>,
    x_mid: Vec<f32>,
    rstd2: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

/// Mean next-token cross-entropy of `tokens` (batch rows of `width` tokens) and the gradient of
/// every parameter.
pub fn loss_and_grads(
    model: &Llama,
    tokens: &[u32],
    batch: usize,
    width: usize,
) -> Result<StepResult> {
    let cfg = &model.config;
    let g = Dims {
        t: width - 1,
        n: batch * (width - 1),
        c: cfg.dim,
        h: cfg.n_heads,
        kv: cfg.n_kv_heads,
        d: cfg.head_dim(),
        f: cfg.hidden_dim,
        v: cfg.vocab,
    };
    let (n, c, f, v) = (g.n, g.c, g.f, g.v);
    let kvc = g.kv * g.d;
    let eps = cfg.norm_eps as f32;
    let scale = 1.0 / (g.d as f32).sqrt();
    let w = Weights::new(model)?;
    let (cos_t, sin_t) = (
        model.cos.flatten_all()?.to_vec1::<f32>()?,
        model.sin.flatten_all()?.to_vec1::<f32>()?,
    );
    let rope = Some((cos_t.as_slice(), sin_t.as_slice()));

    let inputs: Vec<usize> = (0..n)
        .map(|i| tokens[(i / g.t) * width + i % g.t] as usize)
        .collect();
    let targets: Vec<usize> = (0..n)
        .map(|i| tokens[(i / g.t) * width + i % g.t + 1] as usize)
        .collect();
    if let Some(bad) = inputs.iter().chain(&targets).find(|&&t| t >= v) {
        candle_core::bail!("token id {bad} is outside the model's vocabulary of {v}");
    }

    // ---- forward ----
    let emb = w.get("tok_embeddings.weight")?;
    let mut x = vec![0f32; n * c];
    x.par_chunks_mut(c)
        .zip(&inputs)
        .for_each(|(row, &id)| row.copy_from_slice(&emb[id * c..(id + 1) * c]));
    let mut acts = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| w.get(&format!("layers.{l}.{s}.weight"));
        let mut h1 = vec![0f32; n * c];
        let mut rstd1 = vec![0f32; n];
        rmsnorm(&mut h1, &mut rstd1, &x, p("attention_norm")?, c, eps);
        let q = linear(&h1, p("attention.wq")?, n, c, c);
        let k = linear(&h1, p("attention.wk")?, n, c, kvc);
        let vv = linear(&h1, p("attention.wv")?, n, c, kvc);
        let q = to_heads(&q, g.h, g, rope);
        let k = to_heads(&k, g.kv, g, rope);
        let vv = to_heads(&vv, g.kv, g, None);
        let mut o = vec![0f32; n * c];
        let (td, tt, rep) = (g.t * g.d, g.t * g.t, g.h / g.kv);
        let head = |bh: usize, o: &mut [f32], lse: &mut [f32], p: &mut [f32]| {
            let (b, h) = (bh / g.h, bh % g.h);
            let kvb = (b * g.kv + h / rep) * td;
            let (q, k, v) = (
                &q[bh * td..(bh + 1) * td],
                &k[kvb..kvb + td],
                &vv[kvb..kvb + td],
            );
            attention_head(q, k, v, o, lse, p, g.t, g.d, scale);
        };
        let mut lse = vec![0f32; g.n * g.h];
        o.par_chunks_mut(td)
            .zip(lse.par_chunks_mut(g.t))
            .enumerate()
            .for_each(|(bh, (o, lse))| with_scratch(tt, |p, _| head(bh, o, lse, p)));
        let y = from_heads(&o, g.h, g, None);
        let mut x_mid = linear(&y, p("attention.wo")?, n, c, c);
        x_mid.par_iter_mut().zip(&x).for_each(|(a, x)| *a += x);
        let mut h2 = vec![0f32; n * c];
        let mut rstd2 = vec![0f32; n];
        rmsnorm(&mut h2, &mut rstd2, &x_mid, p("ffn_norm")?, c, eps);
        let gate = linear(&h2, p("feed_forward.w1")?, n, c, f);
        let up = linear(&h2, p("feed_forward.w3")?, n, c, f);
        let mut act = vec![0f32; n * f];
        act.par_chunks_mut(f * ROWS)
            .zip(gate.par_chunks(f * ROWS).zip(up.par_chunks(f * ROWS)))
            .for_each(|(a, (gt, u))| swiglu(a, gt, u));
        let mut x_out = linear(&act, p("feed_forward.w2")?, n, f, c);
        x_out.par_iter_mut().zip(&x_mid).for_each(|(a, x)| *a += x);
        let x_in = std::mem::replace(&mut x, x_out);
        acts.push(LayerActs {
            x_in,
            rstd1,
            h1,
            q,
            k,
            v: vv,
            o,
            lse,
            y,
            x_mid,
            rstd2,
            h2,
            gate,
            up,
            act,
        });
    }
    let mut hf = vec![0f32; n * c];
    let mut rstdf = vec![0f32; n];
    let norm_w = w.get("norm.weight")?;
    rmsnorm(&mut hf, &mut rstdf, &x, norm_w, c, eps);
    let head_name = if cfg.tie_embeddings {
        "tok_embeddings.weight"
    } else {
        "output.weight"
    };
    let head = w.get(head_name)?;
    let mut logits = linear(&hf, head, n, c, v);

    // ---- cross-entropy: loss, and d(loss)/d(logits) = (softmax − onehot)/n in place ----
    let inv_n = 1.0 / n as f32;
    let row_losses: Vec<f32> = logits
        .par_chunks_mut(v)
        .zip(&targets)
        .map(|(row, &t)| cross_entropy_row(row, t, inv_n))
        .collect();
    let loss = row_losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64;
    let dlogits = logits;
    let forward_done = std::time::Instant::now();

    // ---- backward ----
    let mut grads: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    let d_head = linear_dw(&dlogits, &hf, n, c, v);
    let dhf = linear_dx(&dlogits, head, n, c, v);
    drop(dlogits);
    let mut dx = vec![0f32; n * c];
    let mut d_norm = vec![0f32; c];
    rmsnorm_backward(&mut dx, &mut d_norm, &dhf, &x, &rstdf, norm_w, c);
    grads.insert("norm.weight".into(), d_norm);

    for l in (0..cfg.n_layers).rev() {
        let a = acts
            .pop()
            .ok_or_else(|| candle_core::Error::msg("missing activations"))?;
        let name = |s: &str| format!("layers.{l}.{s}.weight");
        let p = |s: &str| w.get(&name(s));
        // feed-forward: x_out = x_mid + w2·(silu(w1·h2) ⊙ w3·h2)
        let dw2 = linear_dw(&dx, &a.act, n, f, c);
        let mut dact = linear_dx(&dx, p("feed_forward.w2")?, n, f, c);
        // dact becomes d(gate) and `up` is overwritten with d(up): no extra buffers.
        let mut dup = a.up;
        dact.par_chunks_mut(f * ROWS)
            .zip(dup.par_chunks_mut(f * ROWS))
            .zip(a.gate.par_chunks(f * ROWS))
            .for_each(|((da, u), gt)| swiglu_backward(da, u, gt));
        let dgate = dact;
        let dw1 = linear_dw(&dgate, &a.h2, n, c, f);
        let dw3 = linear_dw(&dup, &a.h2, n, c, f);
        let mut dh2 = linear_dx(&dgate, p("feed_forward.w1")?, n, c, f);
        linear_dx_add(&mut dh2, &dup, p("feed_forward.w3")?, n, c, f);
        let mut d_ffn_norm = vec![0f32; c];
        // dx holds d(x_out); the residual passes it to x_mid unchanged, plus the norm's share.
        rmsnorm_backward(
            &mut dx,
            &mut d_ffn_norm,
            &dh2,
            &a.x_mid,
            &a.rstd2,
            p("ffn_norm")?,
            c,
        );
        grads.insert(name("feed_forward.w1"), dw1);
        grads.insert(name("feed_forward.w2"), dw2);
        grads.insert(name("feed_forward.w3"), dw3);
        grads.insert(name("ffn_norm"), d_ffn_norm);

        // attention: x_mid = x_in + wo·attn(rope(wq·h1), rope(wk·h1), wv·h1)
        let dwo = linear_dw(&dx, &a.y, n, c, c);
        let dy = linear_dx(&dx, p("attention.wo")?, n, c, c);
        let dout = to_heads(&dy, g.h, g, None);
        drop(dy);
        let (td, tt, rep) = (g.t * g.d, g.t * g.t, g.h / g.kv);
        let mut dq = vec![0f32; n * c];
        let mut dk = vec![0f32; n * kvc];
        let mut dv = vec![0f32; n * kvc];
        // One task per key/value head: the query heads sharing it add into its dk, dv in turn.
        dq.par_chunks_mut(rep * td)
            .zip(dk.par_chunks_mut(td))
            .zip(dv.par_chunks_mut(td))
            .enumerate()
            .for_each(|(bkv, ((dq, dk), dv))| {
                with_scratch(tt, |p, ds| {
                    let kv = bkv * td..(bkv + 1) * td;
                    for r in 0..rep {
                        let bh = bkv * rep + r;
                        let qh = bh * td..(bh + 1) * td;
                        attention_head_backward(
                            (
                                &a.q[qh.clone()],
                                &a.k[kv.clone()],
                                &a.v[kv.clone()],
                                &a.o[qh.clone()],
                                &dout[qh],
                                &a.lse[bh * g.t..(bh + 1) * g.t],
                            ),
                            (&mut dq[r * td..(r + 1) * td], &mut *dk, &mut *dv),
                            (p, ds),
                            g.t,
                            g.d,
                            scale,
                        );
                    }
                })
            });
        let dq = from_heads(&dq, g.h, g, rope);
        let dk = from_heads(&dk, g.kv, g, rope);
        let dv = from_heads(&dv, g.kv, g, None);
        let dwq = linear_dw(&dq, &a.h1, n, c, c);
        let dwk = linear_dw(&dk, &a.h1, n, c, kvc);
        let dwv = linear_dw(&dv, &a.h1, n, c, kvc);
        let mut dh1 = linear_dx(&dq, p("attention.wq")?, n, c, c);
        linear_dx_add(&mut dh1, &dk, p("attention.wk")?, n, c, kvc);
        linear_dx_add(&mut dh1, &dv, p("attention.wv")?, n, c, kvc);
        let mut d_attn_norm = vec![0f32; c];
        rmsnorm_backward(
            &mut dx,
            &mut d_attn_norm,
            &dh1,
            &a.x_in,
            &a.rstd1,
            p("attention_norm")?,
            c,
        );
        grads.insert(name("attention.wq"), dwq);
        grads.insert(name("attention.wk"), dwk);
        grads.insert(name("attention.wv"), dwv);
        grads.insert(name("attention.wo"), dwo);
        grads.insert(name("attention_norm"), d_attn_norm);
    }

    // embedding rows, in token order (a fixed order: ids repeat)
    let mut d_emb = if cfg.tie_embeddings {
        d_head
    } else {
        grads.insert("output.weight".into(), d_head);
        vec![0f32; v * c]
    };
    for (row, &id) in dx.chunks(c).zip(&inputs) {
        for (a, b) in d_emb[id * c..(id + 1) * c].iter_mut().zip(row) {
            *a += b;
        }
    }
    grads.insert("tok_embeddings.weight".into(), d_emb);

    let mut out = BTreeMap::new();
    for (name, var) in model.params() {
        let gvec = grads
            .remove(name)
            .ok_or_else(|| candle_core::Error::msg(format!("no gradient computed for {name}")))?;
        out.insert(
            name.clone(),
            Tensor::from_vec(gvec, var.shape(), var.device())?,
        );
    }
    Ok(StepResult {
        loss,
        grads: out,
        forward_done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use candle_core::Device;

    fn config(n_kv_heads: usize, tie_embeddings: bool) -> ModelConfig {
        ModelConfig {
            dim: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads,
            hidden_dim: 48,
            vocab: 37,
            seq_len: 16,
            tie_embeddings,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
        }
    }

    /// The hand-written step's loss and every gradient match candle's autograd through the
    /// composed reference model, for multi-head, grouped-query and multi-query attention,
    /// tied and untied heads, and windows shorter than seq_len.
    #[test]
    fn matches_the_autograd_reference() {
        // Windows longer than one causal block (64 rows) too.
        for (kv, tie, width) in [
            (4, false, 12),
            (2, true, 12),
            (1, false, 12),
            (2, false, 150),
            (4, true, 150),
        ] {
            let mut c = config(kv, tie);
            c.seq_len = 160;
            let mut model = Llama::new(c, 5, &Device::Cpu).unwrap();
            let batch = 3;
            let mut s = 12345u64;
            let tokens: Vec<u32> = (0..batch * width)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 33) % 37) as u32
                })
                .collect();
            let fast = loss_and_grads(&model, &tokens, batch, width).unwrap();
            model.fused_ops = false;
            let input = Tensor::from_slice(&tokens, (batch, width), &Device::Cpu).unwrap();
            let loss = model.loss(&input).unwrap();
            let reference = loss.to_scalar::<f32>().unwrap() as f64;
            assert!(
                (fast.loss - reference).abs() < 1e-5 * reference,
                "kv {kv} tie {tie}: loss {} vs {reference}",
                fast.loss
            );
            let store = loss.backward().unwrap();
            for (name, var) in model.params() {
                let want: Vec<f32> = store
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got: Vec<f32> = fast.grads[name].flatten_all().unwrap().to_vec1().unwrap();
                let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
                assert!(scale > 0.0, "{name}: zero reference gradient");
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 1e-4 * scale,
                    "kv {kv} tie {tie}: {name}: max error {err} for gradient scale {scale}"
                );
            }
        }
    }
}
