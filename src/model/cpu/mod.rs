//! The model on the CPU in f32, written out by hand (llm.c's approach): a training step
//! (forward, cross-entropy, backward) and a forward-only pass for evaluation, `model:logits`
//! and sampling, over plain buffers.
//!
//! Why: candle's autograd on the CPU spends most of a step outside the matrix products — one
//! fresh, zeroed allocation per op, single-threaded elementwise kernels, broadcasting copies —
//! and ran at 0.2–0.45× PyTorch. Here every intermediate is computed once, in the layout the
//! next product wants, and the backward pass is the forward read in reverse. The composed
//! candle model (`Llama::forward` + autograd) stays the reference: tests compare this step's
//! loss and gradients with it. Other devices and dtypes use that path until they get a step of
//! their own, which would sit beside this folder with the same weights and gradients layout.
//!
//! Layout of the folder: `weights` (the parameters as named slices, resolved once per step),
//! `layer` (one transformer block forward and backward), `attention` (one head), `ops`
//! (row-wise blocks), `kernels` (vectorised rows), `matmul` (products), `step` (the whole
//! model: embedding, blocks, head, loss).
//!
//! Shapes in comments: B batch rows, T tokens per row, N = B·T, C model width, H query heads,
//! KV key/value heads, D head size, F feed-forward width, V vocabulary.
//!
//! Determinism: every reduction has a fixed order that does not depend on the thread count
//! (row chunks of a fixed size, partial sums added in chunk order; products split only the
//! output).

pub mod amx;
mod attention;
pub mod decode;
pub mod kernels;
mod layer;
pub mod matmul;
mod ops;
pub mod step;
mod weights;

use super::ModelConfig;

/// Geometry of one pass.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// T: tokens per batch row (the model's inputs, one less than a window).
    pub seq: usize,
    /// N = B·T: rows of every activation matrix.
    pub tokens: usize,
    /// C: model width.
    pub dim: usize,
    /// H: query heads.
    pub heads: usize,
    /// KV: key/value heads (H for multi-head, fewer for grouped-query attention).
    pub kv_heads: usize,
    /// D: size of one head (C / H).
    pub head_dim: usize,
    /// F: feed-forward width.
    pub hidden: usize,
    /// V: vocabulary.
    pub vocab: usize,
}

impl Dims {
    pub fn new(cfg: &ModelConfig, batch: usize, seq: usize) -> Dims {
        Dims {
            seq,
            tokens: batch * seq,
            dim: cfg.dim,
            heads: cfg.n_heads,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim(),
            hidden: cfg.hidden_dim,
            vocab: cfg.vocab,
        }
    }

    /// Batch rows.
    pub fn batch(&self) -> usize {
        self.tokens / self.seq
    }

    /// KV·D: width of the key and value projections.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Where query head `h` of batch row `b` and the key/value head it reads lie in the
    /// token-major q and k/v matrices.
    fn head_strips(&self, b: usize, h: usize) -> (attention::Strip, attention::Strip) {
        let kvh = h / (self.heads / self.kv_heads);
        (
            attention::Strip {
                offset: b * self.seq * self.dim + h * self.head_dim,
                ld: self.dim,
            },
            attention::Strip {
                offset: b * self.seq * self.kv_dim() + kvh * self.head_dim,
                ld: self.kv_dim(),
            },
        )
    }
}
