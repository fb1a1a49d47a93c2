//! Sampling on the CPU with a key/value cache: the prompt goes through the block forward once
//! (its rotated keys and values kept per layer), then each new token costs one pass of
//! matrix-vector products and attention over the cache, instead of the whole window again.
//! When the cache is full, the newest half of the window is kept and read again (a context
//! shift), so generation can run past seq_len.

use super::kernels::{axpy, dot, rmsnorm_row, swiglu};
use super::layer::{self, Pass};
use super::matmul::Precision;
use super::ops::{linear, rmsnorm, zeros};
use super::weights::{LayerWeights, ModelWeights, ParamStorage};
use super::Dims;
use crate::model::Llama;
use candle_core::Result;

/// Rotated keys and values of every position so far, per layer.
pub struct KvCache {
    /// Positions held.
    pub len: usize,
    k: Vec<Vec<f32>>, // per layer (seq_len, KV·D)
    v: Vec<Vec<f32>>, // per layer (seq_len, KV·D)
    /// The tokens whose keys are held (for a context shift).
    tokens: Vec<u32>,
}

impl KvCache {
    pub fn new(model: &Llama) -> KvCache {
        let c = &model.config;
        let size = c.seq_len * c.n_kv_heads * c.head_dim();
        KvCache {
            len: 0,
            k: (0..c.n_layers).map(|_| vec![0.0; size]).collect(),
            v: (0..c.n_layers).map(|_| vec![0.0; size]).collect(),
            tokens: Vec::new(),
        }
    }
}

/// y = W·x for W (out × in) row-major: the step's product with one row (gemm's small-m path
/// beats a hand-rolled dot loop here by about 2x).
fn matvec(w: &[f32], x: &[f32], out: usize) -> Vec<f32> {
    linear(x, w, (1, x.len(), out), Precision::F32)
}

fn rope_one(x: &mut [f32], heads: usize, d: usize, cos: &[f32], sin: &[f32]) {
    let half = d / 2;
    for head in x.chunks_mut(d).take(heads) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos[i] - b * sin[i];
            head[i + half] = a * sin[i] + b * cos[i];
        }
    }
}

fn softmax_in_place(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in s.iter_mut() {
        *v /= sum;
    }
}

/// One block for the token at position `pos`: `x` (C) is updated in place; its key and value
/// go into the cache.
#[allow(clippy::too_many_arguments)]
fn block_step(
    g: &Dims,
    w: &LayerWeights,
    (cache_k, cache_v): (&mut [f32], &mut [f32]),
    x: &mut [f32],
    pos: usize,
    (cos, sin): (&[f32], &[f32]),
    eps: f32,
    scale: f32,
) {
    let (c, kvc, d, f) = (g.dim, g.kv_dim(), g.head_dim, g.hidden);
    let mut h = vec![0.0; c];
    rmsnorm_row(&mut h, x, w.attn_norm, eps);
    let mut q = matvec(w.wq, &h, c);
    let mut k = matvec(w.wk, &h, kvc);
    let v = matvec(w.wv, &h, kvc);
    rope_one(&mut q, g.heads, d, cos, sin);
    rope_one(&mut k, g.kv_heads, d, cos, sin);
    cache_k[pos * kvc..(pos + 1) * kvc].copy_from_slice(&k);
    cache_v[pos * kvc..(pos + 1) * kvc].copy_from_slice(&v);
    let rep = g.heads / g.kv_heads;
    let mut y = vec![0.0; c];
    let mut scores = vec![0.0; pos + 1];
    for hd in 0..g.heads {
        let kvh = hd / rep;
        let qh = &q[hd * d..(hd + 1) * d];
        for (t, s) in scores.iter_mut().enumerate() {
            *s = dot(qh, &cache_k[t * kvc + kvh * d..t * kvc + (kvh + 1) * d]) * scale;
        }
        softmax_in_place(&mut scores);
        let yh = &mut y[hd * d..(hd + 1) * d];
        for (t, &p) in scores.iter().enumerate() {
            axpy(yh, p, &cache_v[t * kvc + kvh * d..t * kvc + (kvh + 1) * d]);
        }
    }
    let o = matvec(w.wo, &y, c);
    for (xi, oi) in x.iter_mut().zip(&o) {
        *xi += oi;
    }
    rmsnorm_row(&mut h, x, w.ffn_norm, eps);
    let gate = matvec(w.w1, &h, f);
    let up = matvec(w.w3, &h, f);
    let mut act = vec![0.0; f];
    swiglu(&mut act, &gate, &up);
    let down = matvec(w.w2, &act, c);
    for (xi, di) in x.iter_mut().zip(&down) {
        *xi += di;
    }
}

/// The logits after `tokens` (appended to the cache: the first call is the prompt, each later
/// call one sampled token). A full cache shifts: its newest half is read again.
pub fn next_logits(model: &Llama, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
    crate::util::pool::on_pool(|| next_logits_here(model, cache, tokens))
}

fn next_logits_here(model: &Llama, cache: &mut KvCache, tokens: &[u32]) -> Result<Vec<f32>> {
    let cfg = &model.config;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
        candle_core::bail!(
            "token id {bad} is outside the model's vocabulary of {}",
            cfg.vocab
        );
    }
    if tokens.is_empty() {
        candle_core::bail!("next_logits needs at least one token");
    }
    cache.tokens.extend_from_slice(tokens);
    if cache.len + tokens.len() > cfg.seq_len || (cache.len == 0 && tokens.len() > 1) {
        // Read the window (all of it, or after a shift its newest half) in one batched pass.
        let keep = if cache.len == 0 {
            cache.tokens.len().min(cfg.seq_len) // a long prompt: its last seq_len tokens
        } else {
            cfg.seq_len / 2 // a shift: the newest half of the window
        };
        let window: Vec<u32> = cache.tokens[cache.tokens.len() - keep..].to_vec();
        cache.tokens = window.clone();
        return prefill(model, cache, &window);
    }
    let storage = ParamStorage::lock(model)?;
    let w = ModelWeights::resolve(&storage, cfg.n_layers, cfg.tie_embeddings)?;
    let (cos, sin) = (
        model.cos.flatten_all()?.to_vec1::<f32>()?,
        model.sin.flatten_all()?.to_vec1::<f32>()?,
    );
    let g = Dims::new(cfg, 1, 1);
    let half = g.head_dim / 2;
    let eps = cfg.norm_eps as f32;
    let scale = 1.0 / (g.head_dim as f32).sqrt();
    let mut x = vec![0.0; g.dim];
    for &t in tokens {
        let pos = cache.len;
        let id = t as usize;
        x.copy_from_slice(&w.embedding[id * g.dim..(id + 1) * g.dim]);
        let rope = (
            &cos[pos * half..(pos + 1) * half],
            &sin[pos * half..(pos + 1) * half],
        );
        for (l, lw) in w.layers.iter().enumerate() {
            let kv = (&mut cache.k[l][..], &mut cache.v[l][..]);
            block_step(&g, lw, kv, &mut x, pos, rope, eps, scale);
        }
        cache.len += 1;
    }
    let mut h = vec![0.0; g.dim];
    rmsnorm_row(&mut h, &x, w.norm, eps);
    Ok(matvec(w.head, &h, g.vocab))
}

/// The window through the batched block forward, keeping every layer's keys and values.
fn prefill(model: &Llama, cache: &mut KvCache, window: &[u32]) -> Result<Vec<f32>> {
    let cfg = &model.config;
    let storage = ParamStorage::lock(model)?;
    let w = ModelWeights::resolve(&storage, cfg.n_layers, cfg.tie_embeddings)?;
    let (cos, sin) = (
        model.cos.flatten_all()?.to_vec1::<f32>()?,
        model.sin.flatten_all()?.to_vec1::<f32>()?,
    );
    let n = window.len();
    let g = Dims::new(cfg, 1, n);
    let pass = Pass {
        g,
        rope: (&cos, &sin),
        eps: cfg.norm_eps as f32,
        scale: 1.0 / (g.head_dim as f32).sqrt(),
        // Sampling multiplies in f32 whatever the training precision: one row at a time gains
        // nothing from tiles.
        precision: Precision::F32,
        reduce: super::ops::Reduce::Whole,
    };
    let mut x = zeros(n * g.dim);
    for (row, &id) in x.chunks_mut(g.dim).zip(window) {
        let id = id as usize;
        row.copy_from_slice(&w.embedding[id * g.dim..(id + 1) * g.dim]);
    }
    let kvc = g.kv_dim();
    for (l, lw) in w.layers.iter().enumerate() {
        let acts = layer::forward(&pass, lw, &mut x, true)
            .ok_or_else(|| candle_core::Error::msg("prefill kept no activations"))?;
        let (k, v) = acts.keys_values();
        cache.k[l][..n * kvc].copy_from_slice(k);
        cache.v[l][..n * kvc].copy_from_slice(v);
    }
    cache.len = n;
    let mut hf = zeros(n * g.dim);
    let mut rstd = zeros(n);
    rmsnorm(&mut hf, &mut rstd, &x, w.norm, g.dim, pass.eps);
    Ok(linear(
        &hf[(n - 1) * g.dim..],
        w.head,
        (1, g.dim, g.vocab),
        Precision::F32,
    ))
}
