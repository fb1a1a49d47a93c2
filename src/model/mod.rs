//! A trainable llama-style decoder: RMSNorm, rotary embeddings (Hugging Face's half-split
//! layout, so exports need no permutation), grouped-query attention and SwiGLU.
//!
//! `Llama` owns the parameters. Its composed candle forward (every op with a backward pass in
//! candle) is the reference and the path of other devices and dtypes; f32 on the CPU goes
//! through the hand-written passes in `cpu/` for training, evaluation and sampling alike.
//! Parameter names follow llama2.c.

pub mod causal_softmax;
mod config;
pub mod cpu;
pub mod generate;
pub mod hf;
pub mod tensor_step;

pub use config::{default_hidden_dim, ModelConfig, PRESET_NAMES};

use crate::util::rng::Rng;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use causal_softmax::causal_softmax;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Llama {
    pub config: ModelConfig,
    /// Sorted by name: iteration order is part of determinism (HashMap order is not stable).
    params: BTreeMap<String, Var>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Take the hand-written CPU passes where they apply (f32 on the CPU); off, everything goes
    /// through the composed reference (`WICK_ATTENTION=composed`, and tests).
    pub use_cpu_step: bool,
    /// Dtype of matrix products and attention. bf16 = mixed precision: parameters stay in
    /// their own dtype (the master weights) and are cast at each use, so gradients and AdamW
    /// stay f32; the residual stream, norms, softmax and the loss are computed in f32.
    compute_dtype: DType,
    /// Off while evaluating or sampling (see `no_grad`).
    track_grad: AtomicBool,
}

/// Which parameters AdamW decays: matrices of the blocks and the head, not norms or embeddings.
pub fn is_decayed(name: &str) -> bool {
    !(name.contains("norm") || name.starts_with("tok_embeddings"))
}

impl Llama {
    /// Seeded initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layers),
    /// norms at 1. Each parameter draws from its own stream derived from (seed, name), so the
    /// weights do not depend on the order parameters are created in.
    pub fn new(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::new_with_dtype(config, seed, device, DType::F32)
    }

    /// As `new`, with parameters in `dtype` (f64 for gradient checks).
    pub fn new_with_dtype(
        config: ModelConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let mut params = BTreeMap::new();
        for (name, shape) in Self::param_shapes(&config) {
            let numel: usize = shape.iter().product();
            let data: Vec<f32> = if name.contains("norm") {
                vec![1.0; numel]
            } else {
                let std = if name.ends_with("wo.weight") || name.ends_with("w2.weight") {
                    0.02 / (2.0 * config.n_layers as f64).sqrt()
                } else {
                    0.02
                };
                let mut rng = Rng::derive(seed, &name);
                (0..numel).map(|_| (rng.normal() * std) as f32).collect()
            };
            let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
            params.insert(name, Var::from_tensor(&t)?);
        }
        let (cos, sin) = rope_tables(&config, device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        Ok(Llama {
            config,
            params,
            cos,
            sin,
            device: device.clone(),
            track_grad: AtomicBool::new(true),
            compute_dtype: dtype,
            // WICK_ATTENTION=composed selects the reference ops (for benchmarks and debugging).
            use_cpu_step: std::env::var("WICK_ATTENTION")
                .map(|v| v != "composed")
                .unwrap_or(true),
        })
    }

    pub fn param_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
        let kv_dim = c.n_kv_heads * c.head_dim();
        let mut v = vec![("tok_embeddings.weight".to_string(), vec![c.vocab, c.dim])];
        for i in 0..c.n_layers {
            let p = format!("layers.{i}");
            v.push((format!("{p}.attention_norm.weight"), vec![c.dim]));
            v.push((format!("{p}.attention.wq.weight"), vec![c.dim, c.dim]));
            v.push((format!("{p}.attention.wk.weight"), vec![kv_dim, c.dim]));
            v.push((format!("{p}.attention.wv.weight"), vec![kv_dim, c.dim]));
            v.push((format!("{p}.attention.wo.weight"), vec![c.dim, c.dim]));
            v.push((format!("{p}.ffn_norm.weight"), vec![c.dim]));
            v.push((
                format!("{p}.feed_forward.w1.weight"),
                vec![c.hidden_dim, c.dim],
            ));
            v.push((
                format!("{p}.feed_forward.w2.weight"),
                vec![c.dim, c.hidden_dim],
            ));
            v.push((
                format!("{p}.feed_forward.w3.weight"),
                vec![c.hidden_dim, c.dim],
            ));
        }
        v.push(("norm.weight".to_string(), vec![c.dim]));
        if !c.tie_embeddings {
            v.push(("output.weight".to_string(), vec![c.vocab, c.dim]));
        }
        v
    }

    /// Compute in `dtype` (bf16 on a GPU); parameters keep theirs.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = dtype;
        self
    }

    /// The dtype products and activations compute in (`--dtype`).
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// The parameters' dtype (f32; f64 in gradient checks).
    fn master_dtype(&self) -> DType {
        self.cos.dtype()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    pub fn param_count(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    fn p(&self, name: &str) -> Result<Tensor> {
        let var = self
            .params
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("model has no parameter {name}")))?;
        // Detached parameters build no graph: evaluation and sampling keep no activations.
        Ok(if self.track_grad.load(Ordering::Relaxed) {
            var.as_tensor().clone()
        } else {
            var.as_tensor().detach()
        })
    }

    /// Run `f` with gradient tracking off (evaluation, generation).
    pub fn no_grad<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.track_grad.swap(false, Ordering::Relaxed);
        let out = f();
        self.track_grad.store(before, Ordering::Relaxed);
        out
    }

    /// Replace every parameter's value (shapes must match), e.g. from a checkpoint.
    pub fn load_params(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.params {
            let t = tensors.get(name).ok_or_else(|| {
                candle_core::Error::msg(format!("checkpoint has no tensor for parameter {name}"))
            })?;
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "parameter {name}: checkpoint shape {:?}, model shape {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_device(&self.device)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Whether passes take the hand-written CPU path (f32 master weights on the CPU, f32 or
    /// bf16 products, not switched off).
    pub fn has_cpu_step(&self) -> bool {
        self.use_cpu_step
            && self.device.is_cpu()
            && matches!(self.compute_dtype, DType::F32 | DType::BF16)
            && self.master_dtype() == DType::F32
    }

    /// Whether training steps take the explicit-backward tensor step (`tensor_step.rs`):
    /// opted into with `WICK_GPU_STEP=tensor` where the hand-written CPU step does not apply.
    pub fn uses_tensor_step(&self) -> bool {
        !self.has_cpu_step() && tensor_step::enabled()
    }

    /// Which code runs a training step, as benchmarks report it: "cpu-f32", "cpu-bf16-amx",
    /// "cpu-bf16-f32" (bf16 asked for on a CPU without AMX), "tensor" (`uses_tensor_step`) or
    /// "candle" (composed autograd: GPUs, and the reference).
    pub fn step_path(&self) -> &'static str {
        match (self.has_cpu_step(), self.cpu_precision()) {
            (false, _) if self.uses_tensor_step() => "tensor",
            (false, _) => "candle",
            (true, cpu::matmul::Precision::F32) => "cpu-f32",
            (true, cpu::matmul::Precision::Bf16) if cpu::amx::available() => "cpu-bf16-amx",
            (true, cpu::matmul::Precision::Bf16) => "cpu-bf16-f32",
        }
    }

    /// How the hand-written CPU step multiplies by weight matrices: bf16 operands with f32
    /// accumulation under `--dtype bf16`, else f32.
    pub fn cpu_precision(&self) -> cpu::matmul::Precision {
        if self.compute_dtype == DType::BF16 {
            cpu::matmul::Precision::Bf16
        } else {
            cpu::matmul::Precision::F32
        }
    }

    /// Loss and named gradients of one batch of windows (batch rows of `width` tokens), on the
    /// hand-written CPU path.
    /// `halves`: sum over the batch's rows in two halves, as a run of one process does so that
    /// it trains bit for bit like a 2-rank data-parallel run (see `cpu::ops::Reduce`); a rank
    /// of a data-parallel run sums its rows whole.
    pub fn cpu_loss_and_grads(
        &self,
        tokens: &[u32],
        batch: usize,
        width: usize,
        halves: bool,
    ) -> Result<cpu::step::StepResult> {
        cpu::step::loss_and_grads(self, tokens, batch, width, halves)
    }

    /// Mean next-token loss of windows (batch rows of `width` tokens), building no graph.
    pub fn eval_loss(&self, tokens: &[u32], batch: usize, width: usize) -> Result<f64> {
        if self.has_cpu_step() {
            return cpu::step::eval_loss(self, tokens, batch, width);
        }
        self.no_grad(|| {
            let input = Tensor::from_slice(tokens, (batch, width), &self.device)?;
            self.loss(&input)?.to_dtype(DType::F64)?.to_scalar::<f64>()
        })
    }

    /// Logits (rows, vocab) of the last `rows` positions of one sequence, building no graph.
    pub fn logits(&self, tokens: &[u32], rows: usize) -> Result<Vec<f32>> {
        if self.has_cpu_step() {
            return cpu::step::logits(self, tokens, rows);
        }
        self.no_grad(|| {
            let t = tokens.len();
            let rows = rows.min(t);
            let x = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
            self.forward(&x)?
                .squeeze(0)?
                .narrow(0, t - rows, rows)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        })
    }

    /// tokens: (batch, time) u32 → logits (batch, time, vocab).
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        self.forward_at(tokens, None)
    }

    /// The forward pass; with a cache, `tokens` follow the positions it holds and their keys
    /// and values are added to it (sampling on devices without a hand-written step).
    fn forward_at(&self, tokens: &Tensor, mut cache: Option<&mut KvTensors>) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = tokens.dims2()?;
        let past = cache.as_ref().map(|k| k.len).unwrap_or(0);
        if past + t > c.seq_len {
            candle_core::bail!(
                "sequence of {} tokens is longer than the model's seq_len {}",
                past + t,
                c.seq_len
            );
        }
        let emb = self.p("tok_embeddings.weight")?;
        let mut x = emb
            .embedding(&tokens.flatten_all()?)?
            .reshape((b, t, c.dim))?;
        let cd = self.compute_dtype;
        let cos = self.cos.narrow(0, past, t)?.to_dtype(cd)?;
        let sin = self.sin.narrow(0, past, t)?.to_dtype(cd)?;
        for i in 0..c.n_layers {
            let p = format!("layers.{i}");
            let h = rms_norm(
                &x,
                &self.p(&format!("{p}.attention_norm.weight"))?,
                c.norm_eps,
            )?;
            let slot = cache.as_deref_mut().map(|k| &mut k.layers[i]);
            let a = self.attention(&h, &p, (&cos, &sin), past, slot)?;
            let a = a.to_dtype(x.dtype())?;
            x = (x + a)?;
            let h = rms_norm(&x, &self.p(&format!("{p}.ffn_norm.weight"))?, c.norm_eps)?;
            let f = self.feed_forward(&h, &p)?;
            let f = f.to_dtype(x.dtype())?;
            x = (x + f)?;
        }
        if let Some(k) = cache {
            k.len += t;
        }
        let x = rms_norm(&x, &self.p("norm.weight")?, c.norm_eps)?;
        let head = if c.tie_embeddings {
            "tok_embeddings.weight"
        } else {
            "output.weight"
        };
        // Logits leave the model in the parameters' dtype (f32): the loss and sampling read them.
        self.linear(&x, head)?.to_dtype(self.master_dtype())
    }

    /// x @ w^T in the compute dtype.
    fn linear(&self, x: &Tensor, weight: &str) -> Result<Tensor> {
        let cd = self.compute_dtype;
        linear(&x.to_dtype(cd)?, &self.p(weight)?.to_dtype(cd)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        p: &str,
        (cos, sin): (&Tensor, &Tensor),
        past: usize,
        cached: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let hd = c.head_dim();
        let q = self.linear(x, &format!("{p}.attention.wq.weight"))?;
        let k = self.linear(x, &format!("{p}.attention.wk.weight"))?;
        let v = self.linear(x, &format!("{p}.attention.wv.weight"))?;
        let q = q
            .reshape((b, t, c.n_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let k = k
            .reshape((b, t, c.n_kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((b, t, c.n_kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        // With a cache: attend over every position held, this call's included.
        let (k, v) = match cached {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let (k, v) = if c.n_kv_heads != c.n_heads {
            let rep = c.n_heads / c.n_kv_heads;
            (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?)
        } else {
            (k, v)
        };
        let scale = 1.0 / (hd as f32).sqrt();
        // Scale, causal mask and softmax in f32 whatever the compute dtype (bf16 loses too
        // much in exp and the row sums), as one op with its own backward.
        let probs = causal_softmax(&q.matmul(&k.t()?)?, scale, past, self.master_dtype())?;
        let y = probs.to_dtype(v.dtype())?.matmul(&v)?; // (b, h, t, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, c.dim))?;
        self.linear(&y, &format!("{p}.attention.wo.weight"))
    }

    fn feed_forward(&self, x: &Tensor, p: &str) -> Result<Tensor> {
        let gate = self.linear(x, &format!("{p}.feed_forward.w1.weight"))?;
        let up = self.linear(x, &format!("{p}.feed_forward.w3.weight"))?;
        let h = (gate.silu()? * up)?;
        self.linear(&h, &format!("{p}.feed_forward.w2.weight"))
    }

    /// Mean cross-entropy of next-token prediction. windows: (batch, seq+1) u32.
    pub fn loss(&self, windows: &Tensor) -> Result<Tensor> {
        let (_, n) = windows.dims2()?;
        let input = windows.narrow(1, 0, n - 1)?;
        let target = windows.narrow(1, 1, n - 1)?;
        let logits = self.forward(&input)?.reshape(((), self.config.vocab))?;
        candle_nn::loss::cross_entropy(&logits, &target.flatten_all()?)
    }
}

/// x @ w^T for x of any rank ≥ 2 and w (out, in).
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    y.reshape(out)
}

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// Softmax over the last dimension from ops that all have a backward pass
/// (candle-nn's fused softmax has none).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Rotary embedding, half-split layout: (x1, x2) → (x1·cos − x2·sin, x1·sin + x2·cos).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x1.broadcast_mul(sin)? + x2.broadcast_mul(cos)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

fn rope_tables(c: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = c.head_dim();
    let half = hd / 2;
    let mut cos = Vec::with_capacity(c.seq_len * half);
    let mut sin = Vec::with_capacity(c.seq_len * half);
    for pos in 0..c.seq_len {
        for i in 0..half {
            let freq = 1.0 / c.rope_theta.powf((2 * i) as f64 / hd as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (c.seq_len, half), device)?,
        Tensor::from_vec(sin, (c.seq_len, half), device)?,
    ))
}

/// Keys and values of the positions so far, per layer (sampling with the composed model).
pub struct KvTensors {
    pub len: usize,
    layers: Vec<Option<(Tensor, Tensor)>>,
    tokens: Vec<u32>,
}

impl KvTensors {
    pub fn new(model: &Llama) -> KvTensors {
        KvTensors {
            len: 0,
            layers: vec![None; model.config.n_layers],
            tokens: Vec::new(),
        }
    }
}

impl Llama {
    /// The logits after `tokens`, appended to the cache (the prompt first, then one token per
    /// call). A full cache shifts: the newest half of the window is read again.
    pub fn next_logits_cached(&self, cache: &mut KvTensors, tokens: &[u32]) -> Result<Vec<f32>> {
        let seq_len = self.config.seq_len;
        cache.tokens.extend_from_slice(tokens);
        let feed: Vec<u32> = if cache.len + tokens.len() > seq_len {
            let keep = if cache.len == 0 { seq_len } else { seq_len / 2 };
            let window = cache.tokens[cache.tokens.len() - keep.min(cache.tokens.len())..].to_vec();
            *cache = KvTensors::new(self);
            cache.tokens = window.clone();
            window
        } else {
            tokens.to_vec()
        };
        self.no_grad(|| {
            let x = Tensor::new(feed.as_slice(), &self.device)?.unsqueeze(0)?;
            let t = feed.len();
            self.forward_at(&x, Some(cache))?
                .squeeze(0)?
                .narrow(0, t - 1, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        })
    }
}

fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, h, rep, t, d))?
        .reshape((b, h * rep, t, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{AdamW, AdamWConfig, Session, Windows};
    use std::sync::Arc;

    fn small() -> ModelConfig {
        ModelConfig {
            dim: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            hidden_dim: 32,
            vocab: 11,
            seq_len: 8,
            tie_embeddings: false,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
        }
    }

    fn batch(vocab: u32, b: usize, t: usize, salt: u32) -> Vec<u32> {
        (0..b * t)
            .map(|i| (i as u32 * 7 + salt * 3 + i as u32 / 5) % vocab)
            .collect()
    }

    #[test]
    fn every_parameter_gets_a_nonzero_gradient() {
        for tie in [false, true] {
            let mut c = small();
            c.tie_embeddings = tie;
            let m = Llama::new(c.clone(), 1, &Device::Cpu).unwrap();
            let w = Tensor::from_vec(batch(11, 2, 9, 0), (2, 9), &Device::Cpu).unwrap();
            let grads = m.loss(&w).unwrap().backward().unwrap();
            for (name, var) in m.params() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {name}"));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0, "zero gradient for {name} (tied={tie})");
            }
            assert_eq!(m.param_count(), c.param_count());
        }
    }

    #[test]
    fn gradients_match_finite_differences_in_f64() {
        let m = Llama::new_with_dtype(small(), 3, &Device::Cpu, DType::F64).unwrap();
        let w = Tensor::from_vec(batch(11, 2, 9, 1), (2, 9), &Device::Cpu).unwrap();
        let grads = m.loss(&w).unwrap().backward().unwrap();
        let eps = 1e-6;
        let mut checked = 0;
        for (name, var) in m.params() {
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            // A few entries of every parameter.
            for k in [0, orig.len() / 2, orig.len() - 1] {
                let loss_at = |delta: f64| {
                    let mut v = orig.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    m.loss(&w).unwrap().to_scalar::<f64>().unwrap()
                };
                let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let err = (numeric - g[k]).abs() / (numeric.abs() + g[k].abs()).max(1e-8);
                assert!(
                    err < 1e-4 || (numeric - g[k]).abs() < 1e-9,
                    "{name}[{k}]: analytic {} numeric {numeric}",
                    g[k]
                );
                checked += 1;
            }
        }
        assert!(checked > 30);
    }

    /// Evaluation and logits on the CPU go through the hand-written forward: they match the
    /// composed reference, and evaluation gives exactly the training step's loss (one set of
    /// kernels, one `exp`).
    #[test]
    fn forward_only_passes_match_the_composed_reference_and_the_step() {
        for tie in [false, true] {
            let mut c = small();
            c.tie_embeddings = tie;
            let tokens = batch(11, 3, 9, 4);
            let mut m = Llama::new(c, 9, &Device::Cpu).unwrap();
            assert!(m.has_cpu_step());
            let fast_eval = m.eval_loss(&tokens, 3, 9).unwrap();
            let step = m.cpu_loss_and_grads(&tokens, 3, 9, true).unwrap();
            assert_eq!(fast_eval.to_bits(), step.loss.to_bits(), "eval vs step");
            let fast_logits = m.logits(&tokens[..8], 8).unwrap();
            let fast_last = m.logits(&tokens[..8], 1).unwrap();
            assert_eq!(&fast_logits[7 * 11..], &fast_last[..], "last row alone");
            m.use_cpu_step = false;
            let ref_eval = m.eval_loss(&tokens, 3, 9).unwrap();
            let ref_logits = m.logits(&tokens[..8], 8).unwrap();
            assert!(
                (fast_eval - ref_eval).abs() < 1e-5 * ref_eval,
                "eval {fast_eval} vs reference {ref_eval}"
            );
            assert_eq!(fast_logits.len(), ref_logits.len());
            for (x, y) in fast_logits.iter().zip(&ref_logits) {
                assert!((x - y).abs() <= 1e-5 + 1e-4 * y.abs(), "logit {x} vs {y}");
            }
        }
    }

    #[test]
    fn overfitting_one_batch_drives_loss_near_zero() {
        let m = Arc::new(Llama::new(small(), 5, &Device::Cpu).unwrap());
        let cfg = AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        let mut s = Session::new(m, AdamW::new(cfg));
        let w = Windows {
            tokens: batch(11, 4, 9, 2),
            batch: 4,
            width: 9,
            share_of: None,
        };
        let first = s.train_step(&w).ok().unwrap();
        let mut last = first;
        for _ in 0..300 {
            last = s.train_step(&w).ok().unwrap();
        }
        assert!(first > 2.0, "starts near ln(11): {first}");
        assert!(last < 0.05, "overfits one batch: {last}");
    }

    #[test]
    fn same_seed_gives_bit_identical_weights_and_losses() {
        let run = |seed| {
            let m = Arc::new(Llama::new(small(), seed, &Device::Cpu).unwrap());
            let mut s = Session::new(m.clone(), AdamW::new(AdamWConfig::default()));
            let losses: Vec<u64> = (0..5)
                .map(|i| {
                    let w = Windows {
                        tokens: batch(11, 2, 9, i),
                        batch: 2,
                        width: 9,
                        share_of: None,
                    };
                    s.train_step(&w).ok().unwrap().to_bits()
                })
                .collect();
            let weights: Vec<f32> = m.params()["layers.1.attention.wq.weight"]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (
                losses,
                weights.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7).1, run(8).1);
    }

    #[test]
    fn init_follows_the_recipe() {
        let m = Llama::new(small(), 1, &Device::Cpu).unwrap();
        let std_of = |name: &str| {
            let v: Vec<f32> = m.params()[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (v.iter().map(|x| (x * x) as f64).sum::<f64>() / v.len() as f64).sqrt()
        };
        assert!((std_of("tok_embeddings.weight") - 0.02).abs() < 0.004);
        let resid = 0.02 / (4.0f64).sqrt();
        assert!((std_of("layers.0.feed_forward.w2.weight") - resid).abs() < 0.003);
        assert_eq!(std_of("norm.weight"), 1.0);
    }
}
