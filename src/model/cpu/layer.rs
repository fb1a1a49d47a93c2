//! One transformer block on the CPU: x → x + attention(norm(x)) → + feed_forward(norm(·)),
//! forward (keeping what the backward needs, or nothing when only evaluating) and backward.

use super::attention::{attention_head, attention_head_backward, with_scratch, SharedOut};
use super::kernels::{swiglu, swiglu_backward};
use super::matmul::Precision;
use super::ops::{
    add_in_place, linear, linear_dw, linear_dw_shared, linear_dx, linear_dx_add, linear_shared,
    rmsnorm, rmsnorm_backward, rope_in_place, zeros, Reduce, ROWS,
};
use super::weights::{LayerGrads, LayerWeights};
use super::Dims;
use rayon::prelude::*;

/// What every block of one pass shares.
pub struct Pass<'a> {
    pub g: Dims,
    /// Rotary tables, (seq_len, D/2) each.
    pub rope: (&'a [f32], &'a [f32]),
    pub eps: f32,
    /// 1/√D.
    pub scale: f32,
    /// How the products multiply: with the weight matrices and attention's, per head.
    pub precision: Precision,
    /// How sums over the batch's rows are taken (weight and norm-weight gradients).
    pub reduce: Reduce,
}

/// What the backward pass needs from one block's forward.
pub struct LayerActs {
    x_in: Vec<f32>,  // (N, C) block input
    rstd1: Vec<f32>, // (N) attention norm's 1/rms
    h1: Vec<f32>,    // (N, C) normed input of the attention
    q: Vec<f32>,     // (N, C) rotated queries, token-major
    k: Vec<f32>,     // (N, KV·D) rotated keys
    v: Vec<f32>,     // (N, KV·D) values
    lse: Vec<f32>,   // (B, H, T) log-sum-exp of each attention row
    y: Vec<f32>,     // (N, C) attention output before wo
    x_mid: Vec<f32>, // (N, C) residual stream after the attention
    rstd2: Vec<f32>, // (N) feed-forward norm's 1/rms
    h2: Vec<f32>,    // (N, C) normed input of the feed-forward
    gate: Vec<f32>,  // (N, F) w1·h2
    up: Vec<f32>,    // (N, F) w3·h2
    act: Vec<f32>,   // (N, F) silu(gate) ⊙ up
}

impl LayerActs {
    /// The block's rotated keys and values, token-major: (N, KV·D) each.
    pub fn keys_values(&self) -> (&[f32], &[f32]) {
        (&self.k, &self.v)
    }
}

/// Forward through one block; `x` (N, C) becomes the block's output. With `keep`, returns
/// the activations the backward needs.
pub fn forward(p: &Pass, w: &LayerWeights, x: &mut Vec<f32>, keep: bool) -> Option<LayerActs> {
    let g = &p.g;
    let (n, c, f, kvc) = (g.tokens, g.dim, g.hidden, g.kv_dim());
    let mut h1 = zeros(n * c);
    let mut rstd1 = zeros(n);
    rmsnorm(&mut h1, &mut rstd1, x, w.attn_norm, c, p.eps);
    let qkv = linear_shared(
        &h1,
        &[(w.wq, c), (w.wk, kvc), (w.wv, kvc)],
        (n, c),
        p.precision,
    );
    let [mut q, mut k, v]: [Vec<f32>; 3] = qkv.try_into().expect("three products");
    rope_in_place(&mut q, g.heads, g, p.rope, false);
    rope_in_place(&mut k, g.kv_heads, g, p.rope, false);
    let mut y = zeros(n * c);
    let mut lse = zeros(n * g.heads);
    let out = SharedOut(y.as_mut_ptr());
    lse.par_chunks_mut(g.seq).enumerate().for_each(|(bh, lse)| {
        let (b, h) = (bh / g.heads, bh % g.heads);
        let strips = g.head_strips(b, h);
        with_scratch(g.seq * g.seq, |scratch, _| {
            // SAFETY: task bh alone writes head h of batch b's strip of y.
            unsafe {
                attention_head(
                    (&q, &k, &v),
                    strips,
                    out,
                    lse,
                    scratch,
                    (g.seq, g.head_dim),
                    p.scale,
                    p.precision,
                )
            }
        })
    });
    let mut x_mid = linear(&y, w.wo, (n, c, c), p.precision);
    add_in_place(&mut x_mid, x);

    let mut h2 = zeros(n * c);
    let mut rstd2 = zeros(n);
    rmsnorm(&mut h2, &mut rstd2, &x_mid, w.ffn_norm, c, p.eps);
    let gate_up = linear_shared(&h2, &[(w.w1, f), (w.w3, f)], (n, c), p.precision);
    let [gate, up]: [Vec<f32>; 2] = gate_up.try_into().expect("two products");
    let mut act = zeros(n * f);
    act.par_chunks_mut(f * ROWS)
        .zip(gate.par_chunks(f * ROWS).zip(up.par_chunks(f * ROWS)))
        .for_each(|(a, (gt, u))| swiglu(a, gt, u));
    let mut x_out = linear(&act, w.w2, (n, f, c), p.precision);
    add_in_place(&mut x_out, &x_mid);
    let x_in = std::mem::replace(x, x_out);
    keep.then_some(LayerActs {
        x_in,
        rstd1,
        h1,
        q,
        k,
        v,
        lse,
        y,
        x_mid,
        rstd2,
        h2,
        gate,
        up,
        act,
    })
}

/// Backward through one block: `dx` (N, C) holds d(loss)/d(block output) and becomes
/// d(loss)/d(block input).
pub fn backward(p: &Pass, w: &LayerWeights, mut a: LayerActs, dx: &mut [f32]) -> LayerGrads {
    let (w1, w2, w3, ffn_norm) = feed_forward_backward(p, w, &mut a, dx);
    let (wq, wk, wv, wo, attn_norm) = attention_backward(p, w, a, dx);
    LayerGrads {
        attn_norm,
        wq,
        wk,
        wv,
        wo,
        ffn_norm,
        w1,
        w2,
        w3,
    }
}

type FfnGrads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// x_out = x_mid + w2·(silu(w1·h2) ⊙ w3·h2): returns (dw1, dw2, dw3, d ffn_norm); `dx` goes
/// from d(x_out) to d(x_mid).
fn feed_forward_backward(
    p: &Pass,
    w: &LayerWeights,
    a: &mut LayerActs,
    dx: &mut [f32],
) -> FfnGrads {
    let (n, c, f) = (p.g.tokens, p.g.dim, p.g.hidden);
    let dw2 = linear_dw(dx, &a.act, (n, f, c), p.precision, p.reduce);
    let mut dgate = linear_dx(dx, w.w2, (n, f, c), p.precision); // (N, F): d(act), then d(gate)
    let mut dup = std::mem::take(&mut a.up); // (N, F): up, then d(up) in place
    dgate
        .par_chunks_mut(f * ROWS)
        .zip(dup.par_chunks_mut(f * ROWS))
        .zip(a.gate.par_chunks(f * ROWS))
        .for_each(|((da, u), gt)| swiglu_backward(da, u, gt));
    let dw13 = linear_dw_shared(
        &[(&dgate, f), (&dup, f)],
        &a.h2,
        (n, c),
        p.precision,
        p.reduce,
    );
    let [dw1, dw3]: [Vec<f32>; 2] = dw13.try_into().expect("two products");
    let mut dh2 = linear_dx(&dgate, w.w1, (n, c, f), p.precision);
    linear_dx_add(&mut dh2, &dup, w.w3, (n, c, f), p.precision);
    let mut d_norm = vec![0f32; c];
    // The residual passes d(x_out) to x_mid unchanged, plus the norm's share.
    rmsnorm_backward(
        dx,
        &mut d_norm,
        &dh2,
        &a.x_mid,
        &a.rstd2,
        w.ffn_norm,
        c,
        p.reduce,
    );
    (dw1, dw2, dw3, d_norm)
}

type AttentionGrads = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// x_mid = x_in + wo·attn(rope(wq·h1), rope(wk·h1), wv·h1): returns (dwq, dwk, dwv, dwo,
/// d attention_norm); `dx` goes from d(x_mid) to d(x_in).
fn attention_backward(p: &Pass, w: &LayerWeights, a: LayerActs, dx: &mut [f32]) -> AttentionGrads {
    let g = &p.g;
    let (n, c, kvc) = (g.tokens, g.dim, g.kv_dim());
    let dwo = linear_dw(dx, &a.y, (n, c, c), p.precision, p.reduce);
    let dy = linear_dx(dx, w.wo, (n, c, c), p.precision); // (N, C)
    let mut dq = zeros(n * c);
    let mut dk = zeros(n * kvc);
    let mut dv = zeros(n * kvc);
    let outs = (
        SharedOut(dq.as_mut_ptr()),
        SharedOut(dk.as_mut_ptr()),
        SharedOut(dv.as_mut_ptr()),
    );
    let rep = g.heads / g.kv_heads;
    // One task per key/value head: the query heads sharing it add into its dk, dv in turn.
    (0..g.batch() * g.kv_heads).into_par_iter().for_each(|bkv| {
        let (b, kvh) = (bkv / g.kv_heads, bkv % g.kv_heads);
        with_scratch(g.seq * g.seq, |probs, dscores| {
            for h in kvh * rep..(kvh + 1) * rep {
                let bh = b * g.heads + h;
                let lse = &a.lse[bh * g.seq..(bh + 1) * g.seq];
                // SAFETY: task bkv alone writes batch b's strips of the key/value head kvh in
                // dk, dv and of its query heads in dq.
                unsafe {
                    attention_head_backward(
                        (&a.q, &a.k, &a.v, &a.y, &dy, lse),
                        g.head_strips(b, h),
                        outs,
                        (probs, dscores),
                        (g.seq, g.head_dim),
                        p.scale,
                        p.precision,
                    )
                }
            }
        })
    });
    drop(dy);
    rope_in_place(&mut dq, g.heads, g, p.rope, true);
    rope_in_place(&mut dk, g.kv_heads, g, p.rope, true);
    let dwqkv = linear_dw_shared(
        &[(&dq, c), (&dk, kvc), (&dv, kvc)],
        &a.h1,
        (n, c),
        p.precision,
        p.reduce,
    );
    let [dwq, dwk, dwv]: [Vec<f32>; 3] = dwqkv.try_into().expect("three products");
    let mut dh1 = linear_dx(&dq, w.wq, (n, c, c), p.precision);
    linear_dx_add(&mut dh1, &dk, w.wk, (n, c, kvc), p.precision);
    linear_dx_add(&mut dh1, &dv, w.wv, (n, c, kvc), p.precision);
    let mut d_norm = vec![0f32; c];
    rmsnorm_backward(
        dx,
        &mut d_norm,
        &dh1,
        &a.x_in,
        &a.rstd1,
        w.attn_norm,
        c,
        p.reduce,
    );
    (dwq, dwk, dwv, dwo, d_norm)
}
