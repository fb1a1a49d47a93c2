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
    causal_exp, causal_probs, cross_entropy_row, rmsnorm_backward_row, rmsnorm_row,
    softmax_backward, swiglu, swiglu_backward,
};
use super::matmul::{matmul_into, matmul_new, matmul_ptr, Threads};
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

/// Where one head's rows live in a token-major (rows × heads·d) matrix: its first element
/// and the row stride. Heads are column strips of the projections' outputs, so attention
/// reads and writes them in place: no copies into and out of a head-major layout.
#[derive(Clone, Copy)]
struct Strip {
    offset: usize,
    ld: usize,
}

/// A token-major matrix that parallel attention tasks write, each only its own heads'
/// column strips, through raw pointers (the strips interleave in memory, so they cannot be
/// handed out as separate `&mut` slices).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: tasks write disjoint strips; the buffer outlives the parallel loop that uses it.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// One head of causal attention: o = softmax(q·kᵀ·scale)·v, with each row's log-sum-exp
/// saved in `lse` so the backward recomputes probabilities in one pass. The exponentials are
/// multiplied by v unnormalised and the (t × d) output rows scaled afterwards, which is
/// cheaper than normalising (t × t) probabilities. q is read at `qs` (the output has the same
/// layout), k and v at `kvs`; p is (t × t) scratch.
///
/// # Safety
/// `o` must point to a matrix of q's shape, of which this call alone writes the strip `qs`.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_head(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (qs, kvs): (Strip, Strip),
    o: SharedOut,
    lse: &mut [f32],
    p: &mut [f32],
    t: usize,
    d: usize,
    scale: f32,
) {
    let mut inv = [0f32; BLOCK];
    let one = Threads::One;
    let (q, k, v) = (&q[qs.offset..], &k[kvs.offset..], &v[kvs.offset..]);
    let o = o.0.add(qs.offset);
    for (i0, i1) in blocks(t) {
        let rows = i1 - i0;
        let pb = &mut p[i0 * t..];
        matmul_into(
            pb,
            t,
            (&q[i0 * qs.ld..], qs.ld, 1),
            (k, 1, kvs.ld),
            (rows, i1, d),
            false,
            one,
        );
        causal_exp(pb, t, i0, rows, scale, &mut lse[i0..i1], &mut inv[..rows]);
        let ob = o.add(i0 * qs.ld);
        matmul_ptr(
            ob,
            qs.ld,
            (pb, t, 1),
            (v, kvs.ld, 1),
            (rows, d, i1),
            false,
            one,
        );
        for (r, &s) in inv[..rows].iter().enumerate() {
            for x in std::slice::from_raw_parts_mut(ob.add(r * qs.ld), d) {
                *x *= s;
            }
        }
    }
}

/// One head's saved forward values and output gradient: q, k, v, the attention output o,
/// d(o), all token-major, and the head's row log-sum-exps.
type HeadInputs<'a> = (
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
unsafe fn attention_head_backward(
    (q, k, v, o, dout, lse): HeadInputs,
    (qs, kvs): (Strip, Strip),
    (dq, dk, dv): (SharedOut, SharedOut, SharedOut),
    (p, ds): (&mut [f32], &mut [f32]),
    t: usize,
    d: usize,
    scale: f32,
) {
    let one = Threads::One;
    let (q, o, dout) = (&q[qs.offset..], &o[qs.offset..], &dout[qs.offset..]);
    let (k, v) = (&k[kvs.offset..], &v[kvs.offset..]);
    let (dq, dk, dv) = (
        dq.0.add(qs.offset),
        dk.0.add(kvs.offset),
        dv.0.add(kvs.offset),
    );
    let ld = qs.ld;
    for (i0, i1) in blocks(t) {
        let rows = i1 - i0;
        // Recomputing the probabilities (one small product per block) is faster than keeping
        // them from the forward: a head's (t × t) block stays in cache instead of streaming
        // b·h·t² floats per layer through memory.
        let pb = &mut p[i0 * t..];
        matmul_into(
            pb,
            t,
            (&q[i0 * ld..], ld, 1),
            (k, 1, kvs.ld),
            (rows, i1, d),
            false,
            one,
        );
        causal_probs(pb, t, i0, rows, scale, &lse[i0..i1]);
        let db = &mut ds[i0 * t..];
        matmul_into(
            db,
            t,
            (&dout[i0 * ld..], ld, 1),
            (v, 1, kvs.ld),
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
            &dout[i0 * ld..],
            &o[i0 * ld..],
            ld,
            d,
            scale,
        );
        matmul_ptr(
            dq.add(i0 * ld),
            ld,
            (db, t, 1),
            (k, kvs.ld, 1),
            (rows, d, i1),
            false,
            one,
        );
        matmul_ptr(
            dk,
            kvs.ld,
            (db, 1, t),
            (&q[i0 * ld..], ld, 1),
            (i1, d, rows),
            true,
            one,
        );
        matmul_ptr(
            dv,
            kvs.ld,
            (pb, 1, t),
            (&dout[i0 * ld..], ld, 1),
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
    matmul_into(
        dx,
        inp,
        (dy, out, 1),
        (w, inp, 1),
        (rows, inp, out),
        true,
        Threads::All,
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
                *r = rmsnorm_row(o, x, w, eps);
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

/// A zero-filled buffer, filled on all threads: `vec![0.0; len]` zeroes on the calling
/// thread alone, which left the other core idle for ≈ 3 % of a step.
fn zeros(len: usize) -> Vec<f32> {
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

impl Dims {
    /// Where query head `h` of batch row `b` and the key/value head it reads lie in the
    /// token-major q and k/v matrices.
    fn head_strips(&self, b: usize, h: usize) -> (Strip, Strip) {
        let kvc = self.kv * self.d;
        let kvh = h / (self.h / self.kv);
        (
            Strip {
                offset: b * self.t * self.c + h * self.d,
                ld: self.c,
            },
            Strip {
                offset: b * self.t * kvc + kvh * self.d,
                ld: kvc,
            },
        )
    }
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
fn rope_in_place(
    x: &mut [f32],
    heads: usize,
    g: Dims,
    (cos, sin): (&[f32], &[f32]),
    inverse: bool,
) {
    let (t, d, half) = (g.t, g.d, g.d / 2);
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

/// What the backward pass needs from one layer's forward.
struct LayerActs {
    x_in: Vec<f32>,
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    /// Projections, token-major; q and k rotated.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Log-sum-exp of each attention row, (b, h, t).
    lse: Vec<f32>,
    /// The attention output (token-major, before wo).
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
    let rope = (cos_t.as_slice(), sin_t.as_slice());
    // Attention scratch per task (t × t) and query heads per key/value head.
    let (tt, rep) = (g.t * g.t, g.h / g.kv);

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
    let mut x = zeros(n * c);
    x.par_chunks_mut(c)
        .zip(&inputs)
        .for_each(|(row, &id)| row.copy_from_slice(&emb[id * c..(id + 1) * c]));
    let mut acts = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| w.get(&format!("layers.{l}.{s}.weight"));
        let mut h1 = zeros(n * c);
        let mut rstd1 = zeros(n);
        rmsnorm(&mut h1, &mut rstd1, &x, p("attention_norm")?, c, eps);
        let mut q = linear(&h1, p("attention.wq")?, n, c, c);
        let mut k = linear(&h1, p("attention.wk")?, n, c, kvc);
        let vv = linear(&h1, p("attention.wv")?, n, c, kvc);
        rope_in_place(&mut q, g.h, g, rope, false);
        rope_in_place(&mut k, g.kv, g, rope, false);
        // y: the attention output, token-major, each head's strip written by its own task.
        let mut y = zeros(n * c);
        let mut lse = zeros(g.n * g.h);
        let out = SharedOut(y.as_mut_ptr());
        lse.par_chunks_mut(g.t).enumerate().for_each(|(bh, lse)| {
            let (b, h) = (bh / g.h, bh % g.h);
            let strips = g.head_strips(b, h);
            with_scratch(tt, |p, _| {
                // SAFETY: task bh alone writes head h of batch b's strip of y.
                unsafe { attention_head((&q, &k, &vv), strips, out, lse, p, g.t, g.d, scale) }
            })
        });
        let mut x_mid = linear(&y, p("attention.wo")?, n, c, c);
        x_mid.par_iter_mut().zip(&x).for_each(|(a, x)| *a += x);
        let mut h2 = zeros(n * c);
        let mut rstd2 = zeros(n);
        rmsnorm(&mut h2, &mut rstd2, &x_mid, p("ffn_norm")?, c, eps);
        let gate = linear(&h2, p("feed_forward.w1")?, n, c, f);
        let up = linear(&h2, p("feed_forward.w3")?, n, c, f);
        let mut act = zeros(n * f);
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
    let mut hf = zeros(n * c);
    let mut rstdf = zeros(n);
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
    let mut dx = zeros(n * c);
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
        let mut dq = zeros(n * c);
        let mut dk = zeros(n * kvc);
        let mut dv = zeros(n * kvc);
        let outs = (
            SharedOut(dq.as_mut_ptr()),
            SharedOut(dk.as_mut_ptr()),
            SharedOut(dv.as_mut_ptr()),
        );
        // One task per key/value head: the query heads sharing it add into its dk, dv in turn.
        (0..g.n / g.t * g.kv).into_par_iter().for_each(|bkv| {
            let (b, kvh) = (bkv / g.kv, bkv % g.kv);
            with_scratch(tt, |p, ds| {
                for h in kvh * rep..(kvh + 1) * rep {
                    let bh = b * g.h + h;
                    let strips = g.head_strips(b, h);
                    // SAFETY: task bkv alone writes batch b's strips of the key/value head
                    // kvh in dk, dv and of its query heads in dq.
                    unsafe {
                        attention_head_backward(
                            (
                                &a.q,
                                &a.k,
                                &a.v,
                                &a.y,
                                &dy,
                                &a.lse[bh * g.t..(bh + 1) * g.t],
                            ),
                            strips,
                            outs,
                            (p, ds),
                            g.t,
                            g.d,
                            scale,
                        )
                    }
                }
            })
        });
        drop(dy);
        rope_in_place(&mut dq, g.h, g, rope, true);
        rope_in_place(&mut dk, g.kv, g, rope, true);
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
        zeros(v * c)
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
