//! Model shape: the plain data that names a model, is checked on resume and written to
//! checkpoints and exports.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub hidden_dim: usize,
    pub vocab: usize,
    pub seq_len: usize,
    pub tie_embeddings: bool,
    /// RMSNorm epsilon, stored so exports and resumes use the same value.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
}

fn default_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10000.0
}

/// llama2.c's rule for the SwiGLU width: 2/3 of 4·dim, rounded up to a multiple of 32.
pub fn default_hidden_dim(dim: usize) -> usize {
    let hidden = 2 * (4 * dim) / 3;
    hidden.div_ceil(32) * 32
}

pub const PRESET_NAMES: &[&str] = &["tiny", "small", "260k", "15m"];

impl ModelConfig {
    pub fn preset(name: &str) -> Option<ModelConfig> {
        let c = |dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab, seq_len| ModelConfig {
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            hidden_dim,
            vocab,
            seq_len,
            tie_embeddings: false,
            norm_eps: default_norm_eps(),
            rope_theta: default_rope_theta(),
        };
        Some(match name {
            // The benchmark shapes of shared/bench (byte vocab by default for recipes).
            "tiny" => c(64, 5, 8, 8, 192, 257, 256),
            "small" => c(288, 6, 6, 6, 768, 257, 256),
            // llama2.c's published TinyStories checkpoints.
            "260k" | "stories260k" => c(64, 5, 8, 4, 172, 512, 512),
            "15m" | "stories15m" => c(288, 6, 6, 6, 768, 32000, 256),
            _ => return None,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Shape problems a user can make, as one message each.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("hidden_dim", self.hidden_dim),
            ("vocab", self.vocab),
            ("seq_len", self.seq_len),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("model option '{name}' must be at least 1"));
            }
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!(
                "model dim {} is not divisible by n_heads {}",
                self.dim, self.n_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head size dim/n_heads = {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        Ok(())
    }

    /// Human-readable list of differences, for resume refusals.
    pub fn differences(&self, other: &ModelConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let mut out = Vec::new();
        if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
            for (k, va) in a {
                let vb = b.get(k).cloned().unwrap_or(serde_json::Value::Null);
                if *va != vb {
                    out.push(format!("{k}: checkpoint has {vb}, recipe asks for {va}"));
                }
            }
        }
        out
    }

    pub fn param_count(&self) -> usize {
        let kv_dim = self.n_kv_heads * self.head_dim();
        let per_layer = 2 * self.dim * self.dim
            + 2 * self.dim * kv_dim
            + 3 * self.dim * self.hidden_dim
            + 2 * self.dim;
        let emb = self.vocab * self.dim;
        let head = if self.tie_embeddings { 0 } else { emb };
        emb + head + self.n_layers * per_layer + self.dim
    }
}

/// Three odd model shapes that gradient tests check step against step: head sizes 20, 48 and
/// 16, grouped-query attention 3:1, a tied head, rows and windows off every block and tile
/// size. Each with the (batch, width) of windows to train on.
#[cfg(test)]
pub fn odd_test_shapes() -> Vec<(ModelConfig, usize, usize)> {
    // (dim, heads, kv_heads, hidden, vocab, batch, width, tied)
    [
        (40, 2, 2, 72, 37, 3, 13, false),
        (144, 3, 1, 200, 301, 2, 70, true),
        (96, 6, 2, 150, 64, 5, 33, false),
    ]
    .into_iter()
    .map(|(dim, heads, kv, hidden, vocab, batch, width, tied)| {
        let c = ModelConfig {
            dim,
            n_layers: 2,
            n_heads: heads,
            n_kv_heads: kv,
            hidden_dim: hidden,
            vocab,
            seq_len: 80,
            tie_embeddings: tied,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
        };
        (c, batch, width)
    })
    .collect()
}
