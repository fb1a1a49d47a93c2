//! The training step with an explicit backward over candle tensors, for devices without a
//! step of their own (the GPU): the forward and backward of `cpu/layer.rs`, written with
//! tensor ops — products through candle's matmul (cuBLAS on a GPU) in the compute dtype with
//! everything else in f32, the causal softmax as one op — and no autograd graph: the backward
//! keeps exactly the activations it needs, by name, and nothing else.
//!
//! Opt-in on GPUs (`WICK_GPU_STEP=tensor`) until a GPU run has checked it; tested here on the
//! CPU against the hand-written CPU step.

use super::causal_softmax::{causal_softmax, causal_softmax_backward};
use super::cpu::step::StepResult;
use super::Llama;
use candle_core::{DType, Result, Tensor, D};
use std::collections::BTreeMap;

/// Whether GPU training steps take this path (`WICK_GPU_STEP=tensor`).
pub fn enabled() -> bool {
    std::env::var("WICK_GPU_STEP").is_ok_and(|v| v == "tensor")
}

/// What every block of one step shares.
struct Pass {
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    eps: f64,
    scale: f32,
    /// Dtype of the matrix products (f32 or bf16); everything else is f32.
    cd: DType,
    cos: Tensor, // (T, D/2)
    sin: Tensor, // (T, D/2)
}

/// a·b with both operands in the compute dtype, the result in f32.
fn mm(p: &Pass, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.to_dtype(p.cd)?
        .matmul(&b.to_dtype(p.cd)?)?
        .to_dtype(DType::F32)
}

/// y (N, out) = x (N, in) · wᵀ for w (out, in).
fn linear(p: &Pass, x: &Tensor, w: &Tensor) -> Result<Tensor> {
    mm(p, x, &w.t()?)
}

/// RMSNorm of the rows of x (N, C): (x·rstd·w, rstd (N, 1)).
fn rmsnorm(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok((x.broadcast_mul(&rstd)?.broadcast_mul(w)?, rstd))
}

/// RMSNorm backward: dx = rstd·(w·dh − x̂·mean(w·dh·x̂)), dw = Σ dh·x̂ (x̂ = x·rstd).
fn rmsnorm_backward(
    dh: &Tensor,
    x: &Tensor,
    rstd: &Tensor,
    w: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let xhat = x.broadcast_mul(rstd)?;
    let wdh = dh.broadcast_mul(w)?;
    let mean = (&wdh * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = (wdh - xhat.broadcast_mul(&mean)?)?.broadcast_mul(rstd)?;
    let dw = (dh * &xhat)?.sum(0)?;
    Ok((dx, dw))
}

/// Rotary embedding of (B, H, T, D) heads, half-split layout; `inverse` rotates back (the
/// backward of the rotation).
fn rope(p: &Pass, x: &Tensor, inverse: bool) -> Result<Tensor> {
    let half = p.hd / 2;
    let (x1, x2) = (x.narrow(3, 0, half)?, x.narrow(3, half, half)?);
    let sin = if inverse { p.sin.neg()? } else { p.sin.clone() };
    let a = (x1.broadcast_mul(&p.cos)? - x2.broadcast_mul(&sin)?)?;
    let b = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&p.cos)?)?;
    Tensor::cat(&[a, b], 3)
}

/// (N, heads·D) token-major → (B, heads, T, D).
fn heads_first(p: &Pass, x: &Tensor, heads: usize) -> Result<Tensor> {
    x.reshape((p.b, p.t, heads, p.hd))?
        .transpose(1, 2)?
        .contiguous()
}

/// (B, heads, T, D) → (N, heads·D).
fn tokens_first(p: &Pass, x: &Tensor) -> Result<Tensor> {
    let heads = x.dim(1)?;
    x.transpose(1, 2)?
        .contiguous()?
        .reshape((p.b * p.t, heads * p.hd))
}

/// Key/value heads repeated for the query heads that share them (GQA): head h reads kv head
/// h / rep, as on the CPU.
fn repeat_kv(p: &Pass, x: &Tensor) -> Result<Tensor> {
    let rep = p.heads / p.kv_heads;
    if rep == 1 {
        return Ok(x.clone());
    }
    x.unsqueeze(2)?
        .expand((p.b, p.kv_heads, rep, p.t, p.hd))?
        .reshape((p.b, p.heads, p.t, p.hd))
}

/// The backward of `repeat_kv`: the query heads' gradients summed per kv head.
fn sum_kv(p: &Pass, dx: &Tensor) -> Result<Tensor> {
    let rep = p.heads / p.kv_heads;
    if rep == 1 {
        return Ok(dx.clone());
    }
    dx.reshape((p.b, p.kv_heads, rep, p.t, p.hd))?.sum(2)
}

/// One block's weights, by role.
struct Weights {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
}

/// A parameter's value with no autograd tracking: this step builds no graph.
fn param(model: &Llama, name: &str) -> Result<Tensor> {
    model
        .params()
        .get(name)
        .map(|v| v.as_tensor().detach())
        .ok_or_else(|| candle_core::Error::msg(format!("model has no parameter {name}")))
}

impl Weights {
    fn of(model: &Llama, layer: usize) -> Result<Weights> {
        let w = |name: &str| param(model, &format!("layers.{layer}.{name}.weight"));
        Ok(Weights {
            attn_norm: w("attention_norm")?,
            wq: w("attention.wq")?,
            wk: w("attention.wk")?,
            wv: w("attention.wv")?,
            wo: w("attention.wo")?,
            ffn_norm: w("ffn_norm")?,
            w1: w("feed_forward.w1")?,
            w2: w("feed_forward.w2")?,
            w3: w("feed_forward.w3")?,
        })
    }
}

/// What the backward needs from one block's forward.
struct Acts {
    x_in: Tensor,  // (N, C) block input
    rstd1: Tensor, // (N, 1)
    h1: Tensor,    // (N, C) normed input of the attention
    q: Tensor,     // (B, H, T, D) rotated queries
    k: Tensor,     // (B, H, T, D) rotated keys, repeated for the query heads
    v: Tensor,     // (B, H, T, D) values, repeated
    y: Tensor,     // (N, C) attention output before wo
    x_mid: Tensor, // (N, C) residual stream after the attention
    rstd2: Tensor, // (N, 1)
    h2: Tensor,    // (N, C) normed input of the feed-forward
    gate: Tensor,  // (N, F)
    up: Tensor,    // (N, F)
    act: Tensor,   // (N, F) silu(gate)·up
}

/// Causal attention probabilities (B, H, T, T), f32, of rotated queries and keys. The
/// backward computes them again instead of keeping them: one product and one softmax per layer
/// against B·H·T² floats held per layer (4.8 GB for a 124M model at batch 8 × 1024).
fn attention_probs(p: &Pass, q: &Tensor, k: &Tensor) -> Result<Tensor> {
    causal_softmax(&mm(p, q, &k.t()?)?, p.scale, 0, DType::F32)
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// One block forward: returns its output and what the backward needs.
fn forward(p: &Pass, w: &Weights, x: Tensor) -> Result<(Tensor, Acts)> {
    let (h1, rstd1) = rmsnorm(&x, &w.attn_norm, p.eps)?;
    let q = rope(p, &heads_first(p, &linear(p, &h1, &w.wq)?, p.heads)?, false)?;
    let k = rope(
        p,
        &heads_first(p, &linear(p, &h1, &w.wk)?, p.kv_heads)?,
        false,
    )?;
    let v = heads_first(p, &linear(p, &h1, &w.wv)?, p.kv_heads)?;
    let (k, v) = (repeat_kv(p, &k)?, repeat_kv(p, &v)?);
    let y = tokens_first(p, &mm(p, &attention_probs(p, &q, &k)?, &v)?)?;
    let x_mid = (&x + linear(p, &y, &w.wo)?)?;
    let (h2, rstd2) = rmsnorm(&x_mid, &w.ffn_norm, p.eps)?;
    let gate = linear(p, &h2, &w.w1)?;
    let up = linear(p, &h2, &w.w3)?;
    let act = (gate.silu()? * &up)?;
    let out = (&x_mid + linear(p, &act, &w.w2)?)?;
    let acts = Acts {
        x_in: x,
        rstd1,
        h1,
        q,
        k,
        v,
        y,
        x_mid,
        rstd2,
        h2,
        gate,
        up,
        act,
    };
    Ok((out, acts))
}

/// One block backward: d(block output) → d(block input), and the block's gradients by role.
fn backward(
    p: &Pass,
    w: &Weights,
    a: Acts,
    dx: Tensor,
) -> Result<(Tensor, Vec<(&'static str, Tensor)>)> {
    // Feed-forward: x_out = x_mid + w2·(silu(w1·h2) ⊙ w3·h2).
    let dw2 = mm(p, &dx.t()?, &a.act)?;
    let dact = mm(p, &dx, &w.w2)?;
    let sg = sigmoid(&a.gate)?;
    let silu = (&a.gate * &sg)?;
    let dsilu = (&sg * ((&a.gate * (sg.neg()? + 1.0)?)? + 1.0)?)?;
    let dgate = ((&dact * &a.up)? * dsilu)?;
    let dup = (&dact * silu)?;
    let dw1 = mm(p, &dgate.t()?, &a.h2)?;
    let dw3 = mm(p, &dup.t()?, &a.h2)?;
    let dh2 = (mm(p, &dgate, &w.w1)? + mm(p, &dup, &w.w3)?)?;
    let (dx_norm, d_ffn_norm) = rmsnorm_backward(&dh2, &a.x_mid, &a.rstd2, &w.ffn_norm)?;
    let dx = (dx + dx_norm)?; // d(x_mid)

    // Attention: x_mid = x_in + wo·attn(rope(wq·h1), rope(wk·h1), wv·h1).
    let dwo = mm(p, &dx.t()?, &a.y)?;
    let dy = heads_first(p, &mm(p, &dx, &w.wo)?, p.heads)?;
    let probs = attention_probs(p, &a.q, &a.k)?; // recomputed: see attention_probs
    let dprobs = mm(p, &dy, &a.v.t()?)?;
    let dscores = causal_softmax_backward(&probs, &dprobs, p.scale)?;
    let dq = mm(p, &dscores, &a.k)?;
    let dk = sum_kv(p, &mm(p, &dscores.t()?, &a.q)?)?;
    let dv = sum_kv(p, &mm(p, &probs.t()?, &dy)?)?;
    let dq = tokens_first(p, &rope(p, &dq, true)?)?;
    let dk = tokens_first(p, &rope(p, &dk, true)?)?;
    let dv = tokens_first(p, &dv)?;
    let dwq = mm(p, &dq.t()?, &a.h1)?;
    let dwk = mm(p, &dk.t()?, &a.h1)?;
    let dwv = mm(p, &dv.t()?, &a.h1)?;
    let dh1 = ((mm(p, &dq, &w.wq)? + mm(p, &dk, &w.wk)?)? + mm(p, &dv, &w.wv)?)?;
    let (dx_norm, d_attn_norm) = rmsnorm_backward(&dh1, &a.x_in, &a.rstd1, &w.attn_norm)?;
    let dx = (dx + dx_norm)?; // d(x_in)
    let grads = vec![
        ("attention_norm", d_attn_norm),
        ("attention.wq", dwq),
        ("attention.wk", dwk),
        ("attention.wv", dwv),
        ("attention.wo", dwo),
        ("ffn_norm", d_ffn_norm),
        ("feed_forward.w1", dw1),
        ("feed_forward.w2", dw2),
        ("feed_forward.w3", dw3),
    ];
    Ok((dx, grads))
}

/// Mean next-token cross-entropy of `tokens` (batch rows of `width` tokens) and the gradient of
/// every parameter, on the model's device.
pub fn loss_and_grads(
    model: &Llama,
    tokens: &[u32],
    batch: usize,
    width: usize,
) -> Result<StepResult> {
    let c = &model.config;
    let dev = model.device();
    let t = width - 1;
    let n = batch * t;
    if let Some(bad) = tokens.iter().find(|&&id| id as usize >= c.vocab) {
        candle_core::bail!(
            "token id {bad} is outside the model's vocabulary of {}",
            c.vocab
        );
    }
    let windows = Tensor::from_slice(tokens, (batch, width), dev)?;
    let inputs = windows.narrow(1, 0, t)?.flatten_all()?; // (N) u32
    let targets = windows.narrow(1, 1, t)?.flatten_all()?; // (N) u32
    let p = Pass {
        b: batch,
        t,
        heads: c.n_heads,
        kv_heads: c.n_kv_heads,
        hd: c.head_dim(),
        eps: c.norm_eps,
        scale: 1.0 / (c.head_dim() as f32).sqrt(),
        cd: model.compute_dtype,
        cos: model.cos.narrow(0, 0, t)?.to_dtype(DType::F32)?,
        sin: model.sin.narrow(0, 0, t)?.to_dtype(DType::F32)?,
    };

    // ---- forward ----
    let emb = param(model, "tok_embeddings.weight")?;
    let head_name = if c.tie_embeddings {
        "tok_embeddings.weight"
    } else {
        "output.weight"
    };
    let head = param(model, head_name)?;
    let norm = param(model, "norm.weight")?;
    let mut x = emb.index_select(&inputs, 0)?; // (N, C) residual stream
    let mut acts = Vec::with_capacity(c.n_layers);
    let mut weights = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let w = Weights::of(model, l)?;
        let (out, a) = forward(&p, &w, x)?;
        x = out;
        acts.push(a);
        weights.push(w);
    }
    let (hf, rstdf) = rmsnorm(&x, &norm, p.eps)?;
    let logits = linear(&p, &hf, &head)?; // (N, V) f32
    let max = logits.max_keepdim(1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(1)?;
    let lse = (sum.log()? + &max)?; // (N, 1)
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    let loss = (lse - picked)?
        .mean_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    drop(logits); // the backward needs only e and sum
    let forward_done = std::time::Instant::now();

    // ---- backward ----
    // (softmax − onehot)/N: the probabilities with 1 taken off at each target.
    let minus_one = Tensor::full(-1f32, (n, 1), dev)?;
    let dlogits = (e
        .broadcast_div(&sum)?
        .scatter_add(&targets.unsqueeze(1)?, &minus_one, 1)?
        / n as f64)?;
    drop(e);
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let d_head = mm(&p, &dlogits.t()?, &hf)?; // (V, C)
    let dhf = mm(&p, &dlogits, &head)?; // (N, C)
    let (mut dx, d_norm) = rmsnorm_backward(&dhf, &x, &rstdf, &norm)?;
    grads.insert("norm.weight".into(), d_norm);
    for (l, (a, w)) in acts.into_iter().zip(&weights).enumerate().rev() {
        let (d, layer_grads) = backward(&p, w, a, dx)?;
        dx = d;
        for (role, g) in layer_grads {
            grads.insert(format!("layers.{l}.{role}.weight"), g);
        }
    }
    let d_emb = Tensor::zeros((c.vocab, c.dim), DType::F32, dev)?.index_add(&inputs, &dx, 0)?;
    let d_emb = if c.tie_embeddings {
        (d_emb + d_head)?
    } else {
        grads.insert("output.weight".into(), d_head);
        d_emb
    };
    grads.insert("tok_embeddings.weight".into(), d_emb);
    let grads = model
        .params()
        .iter()
        .map(|(name, var)| {
            let g = grads.remove(name).ok_or_else(|| {
                candle_core::Error::msg(format!("no gradient computed for {name}"))
            })?;
            Ok((name.clone(), g.to_dtype(var.dtype())?.contiguous()?))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    Ok(StepResult {
        loss,
        grads,
        forward_done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
        let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        let diff: f64 = g
            .iter()
            .zip(&w)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
        (diff / norm.max(1e-30)).sqrt()
    }

    /// The tensor step's loss and every gradient equal the hand-written CPU step's on three
    /// odd shapes (head sizes 20, 48 and 16; GQA 3:1 and 3:1; tied and untied heads; T not a
    /// multiple of any block): ≤ 1e-4 relative.
    #[test]
    fn matches_the_cpu_step_on_odd_shapes() {
        for (c, batch, width) in crate::model::config::odd_test_shapes() {
            let (dim, heads, kv, vocab) = (c.dim, c.n_heads, c.n_kv_heads, c.vocab);
            let model = Llama::new(c, 5, &Device::Cpu).unwrap();
            let mut rng = crate::util::rng::Rng::new(dim as u64);
            let tokens: Vec<u32> = (0..batch * width)
                .map(|_| (rng.next_f64() * vocab as f64) as u32 % vocab as u32)
                .collect();
            let want = model
                .cpu_loss_and_grads(&tokens, batch, width, true)
                .unwrap();
            let got = loss_and_grads(&model, &tokens, batch, width).unwrap();
            let shape = format!("dim {dim} heads {heads}/{kv}");
            assert!(
                (got.loss - want.loss).abs() <= 1e-5 * want.loss,
                "{shape}: loss {} vs {}",
                got.loss,
                want.loss
            );
            assert_eq!(got.grads.len(), want.grads.len());
            let mut worst = 0f64;
            for (name, w) in &want.grads {
                let err = relative_error(&got.grads[name], w);
                assert!(err < 1e-4, "{shape}: {name}: relative error {err}");
                worst = worst.max(err);
            }
            eprintln!(
                "{shape}: loss {:.3e} relative, worst gradient {worst:.3e} over {} tensors",
                (got.loss - want.loss).abs() / want.loss,
                want.grads.len()
            );
        }
    }
}
