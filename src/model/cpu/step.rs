//! The whole model on the CPU: token embedding, the blocks, the final norm, the output head
//! and the cross-entropy loss — as a training step (loss and every gradient) or forward only
//! (evaluation loss, logits for sampling).

use super::kernels::cross_entropy_row;
use super::layer::{self, Pass};
use super::ops::{
    add_in_place, linear, linear_dw, linear_dx, rmsnorm, rmsnorm_backward, zeros, Reduce,
};
use super::weights::{ModelWeights, ParamStorage};
use super::Dims;
use crate::model::Llama;
use crate::util::pool::on_pool;
use candle_core::{Result, Tensor};
use rayon::prelude::*;
use std::collections::BTreeMap;

pub struct StepResult {
    pub loss: f64,
    /// Gradient of the mean loss for every parameter, by name.
    pub grads: BTreeMap<String, Tensor>,
    /// When the forward pass (through the loss) ended and the backward began.
    pub forward_done: std::time::Instant,
}

/// Inputs and next-token targets of windows (batch rows of `width` tokens), checked against
/// the vocabulary.
fn inputs_and_targets(tokens: &[u32], g: &Dims, width: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let at = |i: usize, shift: usize| tokens[(i / g.seq) * width + i % g.seq + shift] as usize;
    let inputs: Vec<usize> = (0..g.tokens).map(|i| at(i, 0)).collect();
    let targets: Vec<usize> = (0..g.tokens).map(|i| at(i, 1)).collect();
    if let Some(bad) = inputs.iter().chain(&targets).find(|&&t| t >= g.vocab) {
        candle_core::bail!(
            "token id {bad} is outside the model's vocabulary of {}",
            g.vocab
        );
    }
    Ok((inputs, targets))
}

/// Rotary tables as plain slices.
fn rope_tables(model: &Llama) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((
        model.cos.flatten_all()?.to_vec1::<f32>()?,
        model.sin.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// Embedding rows of `ids`: (N, C).
fn embed(w: &ModelWeights, ids: &[usize], c: usize) -> Vec<f32> {
    let mut x = zeros(ids.len() * c);
    x.par_chunks_mut(c)
        .zip(ids)
        .for_each(|(row, &id)| row.copy_from_slice(&w.embedding[id * c..(id + 1) * c]));
    x
}

/// Mean cross-entropy of `logits` (N, V) against `targets`; each row is replaced in place by
/// d(loss)/d(logits) = (softmax − onehot)/N.
fn cross_entropy(logits: &mut [f32], targets: &[usize], v: usize) -> f64 {
    let inv_n = 1.0 / targets.len() as f32;
    let row_losses: Vec<f32> = logits
        .par_chunks_mut(v)
        .zip(targets)
        .map(|(row, &t)| cross_entropy_row(row, t, inv_n))
        .collect();
    row_losses.iter().map(|&l| l as f64).sum::<f64>() / targets.len() as f64
}

/// Mean next-token cross-entropy of `tokens` (batch rows of `width` tokens) and the gradient of
/// every parameter. `halves`: take the sums over rows as two halves of the batch (a run of one process; see
/// `Reduce`), or whole (a rank of a data-parallel run).
pub fn loss_and_grads(
    model: &Llama,
    tokens: &[u32],
    batch: usize,
    width: usize,
    halves: bool,
) -> Result<StepResult> {
    on_pool(|| step(model, tokens, batch, width, halves))
}

fn step(
    model: &Llama,
    tokens: &[u32],
    batch: usize,
    width: usize,
    halves: bool,
) -> Result<StepResult> {
    let cfg = &model.config;
    let g = Dims::new(cfg, batch, width - 1);
    let (n, c, v) = (g.tokens, g.dim, g.vocab);
    let storage = ParamStorage::lock(model)?;
    let w = ModelWeights::resolve(&storage, cfg.n_layers, cfg.tie_embeddings)?;
    let (cos, sin) = rope_tables(model)?;
    let pass = Pass {
        g,
        rope: (&cos, &sin),
        eps: cfg.norm_eps as f32,
        scale: 1.0 / (g.head_dim as f32).sqrt(),
        precision: model.cpu_precision(),
        reduce: Reduce::for_batch(halves, batch),
    };
    let (inputs, targets) = inputs_and_targets(tokens, &g, width)?;

    // ---- forward ----
    let mut x = embed(&w, &inputs, c); // (N, C) residual stream
    let mut acts = Vec::with_capacity(cfg.n_layers);
    for lw in &w.layers {
        acts.extend(layer::forward(&pass, lw, &mut x, true));
    }
    let mut hf = zeros(n * c); // (N, C) final norm's output
    let mut rstdf = zeros(n); // (N)
    rmsnorm(&mut hf, &mut rstdf, &x, w.norm, c, pass.eps);
    let mut logits = linear(&hf, w.head, (n, c, v), pass.precision); // (N, V), then d(logits)
    let loss = cross_entropy(&mut logits, &targets, v);
    let dlogits = logits;
    let forward_done = std::time::Instant::now();

    // ---- backward ----
    let mut grads: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    // Tied, the head's gradient and the embedding rows' add into one tensor: with halves, each
    // half's head gradient meets that half's rows before the halves are added (as a rank adds
    // its own), so the head is taken per half here; untied, as `pass.reduce` says.
    let whole = std::iter::once(0..n).collect::<Vec<_>>();
    let (head_spans, head_reduce) = match (w.tied, pass.reduce) {
        (true, Reduce::Halves) => (vec![0..n / 2, n / 2..n], Reduce::Whole),
        (true, Reduce::Whole) => (whole, Reduce::Whole),
        (false, r) => (whole, r),
    };
    let head_parts: Vec<(Vec<f32>, std::ops::Range<usize>)> = head_spans
        .into_iter()
        .map(|r| {
            let (lo, hi) = (r.start, r.end);
            let d = linear_dw(
                &dlogits[lo * v..hi * v],
                &hf[lo * c..hi * c],
                (hi - lo, c, v),
                pass.precision,
                head_reduce,
            ); // (V, C)
            (d, r)
        })
        .collect();
    let dhf = linear_dx(&dlogits, w.head, (n, c, v), pass.precision); // (N, C)
    drop(dlogits);
    let mut dx = zeros(n * c); // (N, C) d(residual stream)
    let mut d_norm = vec![0f32; c];
    rmsnorm_backward(
        &mut dx,
        &mut d_norm,
        &dhf,
        &x,
        &rstdf,
        w.norm,
        c,
        pass.reduce,
    );
    grads.insert("norm.weight".into(), d_norm);
    for (l, lw) in w.layers.iter().enumerate().rev() {
        let a = acts
            .pop()
            .ok_or_else(|| candle_core::Error::msg("missing activations"))?;
        grads.extend(layer::backward(&pass, lw, a, &mut dx).named(l));
    }
    // Embedding rows, in token order (a fixed order: ids repeat); with halves, each half's
    // rows on their own, then the halves added (ids the second half touches only).
    let scatter = |d_emb: &mut [f32], rows: std::ops::Range<usize>| {
        for (row, &id) in dx[rows.start * c..rows.end * c]
            .chunks(c)
            .zip(&inputs[rows.clone()])
        {
            for (a, b) in d_emb[id * c..(id + 1) * c].iter_mut().zip(row) {
                *a += b;
            }
        }
    };
    let d_emb = if w.tied {
        let mut parts = head_parts.into_iter();
        let (mut first, r) = parts
            .next()
            .ok_or_else(|| candle_core::Error::msg("no head gradient"))?;
        scatter(&mut first, r);
        for (mut part, r) in parts {
            scatter(&mut part, r);
            add_in_place(&mut first, &part);
        }
        first
    } else {
        let (d_head, _) = head_parts
            .into_iter()
            .next()
            .ok_or_else(|| candle_core::Error::msg("no head gradient"))?;
        grads.insert("output.weight".into(), d_head);
        let mut d_emb = zeros(v * c);
        match pass.reduce {
            Reduce::Whole => scatter(&mut d_emb, 0..n),
            Reduce::Halves => {
                scatter(&mut d_emb, 0..n / 2);
                let second = scatter_sparse(&dx, &inputs, n / 2..n, c);
                for (id, row) in second {
                    for (a, b) in d_emb[id * c..(id + 1) * c].iter_mut().zip(row) {
                        *a += b;
                    }
                }
            }
        }
        d_emb
    };
    grads.insert("tok_embeddings.weight".into(), d_emb);
    drop(w);
    drop(storage);

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

/// The embedding gradient of `rows` alone, for the ids they touch: each id's rows summed in
/// order from zero, as a rank that trains only these rows sums them.
fn scatter_sparse(
    dx: &[f32],
    inputs: &[usize],
    rows: std::ops::Range<usize>,
    c: usize,
) -> BTreeMap<usize, Vec<f32>> {
    let mut out: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    for (row, &id) in dx[rows.start * c..rows.end * c]
        .chunks(c)
        .zip(&inputs[rows])
    {
        let acc = out.entry(id).or_insert_with(|| vec![0.0; c]);
        for (a, b) in acc.iter_mut().zip(row) {
            *a += b;
        }
    }
    out
}

/// Forward only, keeping no activations: the final norm's output (N, C) for `ids` laid out as
/// `batch` rows of `seq` tokens.
fn forward_hidden(
    model: &Llama,
    w: &ModelWeights,
    ids: &[usize],
    batch: usize,
) -> Result<Vec<f32>> {
    let cfg = &model.config;
    let g = Dims::new(cfg, batch, ids.len() / batch);
    let (cos, sin) = rope_tables(model)?;
    let pass = Pass {
        g,
        rope: (&cos, &sin),
        eps: cfg.norm_eps as f32,
        scale: 1.0 / (g.head_dim as f32).sqrt(),
        precision: model.cpu_precision(),
        reduce: Reduce::Whole,
    };
    let mut x = embed(w, ids, g.dim);
    for lw in &w.layers {
        layer::forward(&pass, lw, &mut x, false);
    }
    let mut hf = zeros(g.tokens * g.dim);
    let mut rstd = zeros(g.tokens);
    rmsnorm(&mut hf, &mut rstd, &x, w.norm, g.dim, pass.eps);
    Ok(hf)
}

/// Mean next-token cross-entropy of windows, forward only (evaluation): the same kernels and
/// the same numbers as the training step's loss.
pub fn eval_loss(model: &Llama, tokens: &[u32], batch: usize, width: usize) -> Result<f64> {
    on_pool(|| eval_loss_here(model, tokens, batch, width))
}

fn eval_loss_here(model: &Llama, tokens: &[u32], batch: usize, width: usize) -> Result<f64> {
    let cfg = &model.config;
    let g = Dims::new(cfg, batch, width - 1);
    let storage = ParamStorage::lock(model)?;
    let w = ModelWeights::resolve(&storage, cfg.n_layers, cfg.tie_embeddings)?;
    let (inputs, targets) = inputs_and_targets(tokens, &g, width)?;
    let hf = forward_hidden(model, &w, &inputs, batch)?;
    let mut logits = linear(
        &hf,
        w.head,
        (g.tokens, g.dim, g.vocab),
        model.cpu_precision(),
    );
    Ok(cross_entropy(&mut logits, &targets, g.vocab))
}

/// Logits (rows, V) of one sequence's last `rows` positions, forward only.
pub fn logits(model: &Llama, tokens: &[u32], rows: usize) -> Result<Vec<f32>> {
    on_pool(|| logits_here(model, tokens, rows))
}

fn logits_here(model: &Llama, tokens: &[u32], rows: usize) -> Result<Vec<f32>> {
    let cfg = &model.config;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab) {
        candle_core::bail!(
            "token id {bad} is outside the model's vocabulary of {}",
            cfg.vocab
        );
    }
    let storage = ParamStorage::lock(model)?;
    let w = ModelWeights::resolve(&storage, cfg.n_layers, cfg.tie_embeddings)?;
    let ids: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
    let hf = forward_hidden(model, &w, &ids, 1)?;
    let rows = rows.min(tokens.len());
    let last = &hf[(tokens.len() - rows) * cfg.dim..];
    Ok(linear(
        last,
        w.head,
        (rows, cfg.dim, cfg.vocab),
        model.cpu_precision(),
    ))
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
            let fast = loss_and_grads(&model, &tokens, batch, width, true).unwrap();
            model.use_cpu_step = false;
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

    fn random_tokens(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
        let mut rng = crate::util::rng::Rng::new(seed);
        (0..len).map(|_| rng.below(vocab as u64) as u32).collect()
    }

    /// Relative L2 distance of two gradients.
    fn relative_error(got: &[f32], want: &[f32]) -> f64 {
        let diff: f64 = got
            .iter()
            .zip(want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
        (diff / norm).sqrt()
    }

    /// The bf16 step (bf16 operands, f32 accumulation; attention's products too) against the
    /// f32 step on three odd shapes (`odd_test_shapes`). Measured: losses within 0.002 %, every
    /// gradient within 0.85 % (relative L2); the bounds are 0.1 % and 2 % (bf16 keeps 8
    /// significant bits: 0.4 % per rounding).
    #[test]
    fn bf16_step_matches_the_f32_step_within_bf16_tolerance() {
        if !crate::model::cpu::amx::available() {
            eprintln!("no AMX on this CPU: the bf16 step runs in f32, nothing to compare");
            return;
        }
        for (c, batch, width) in crate::model::config::odd_test_shapes() {
            let (dim, heads, kv, vocab) = (c.dim, c.n_heads, c.n_kv_heads, c.vocab);
            let f32_model = Llama::new(c.clone(), 11, &Device::Cpu).unwrap();
            let bf16_model = Llama::new(c, 11, &Device::Cpu)
                .unwrap()
                .with_compute_dtype(candle_core::DType::BF16);
            assert_eq!(bf16_model.step_path(), "cpu-bf16-amx");
            let tokens = random_tokens(batch * width, vocab, dim as u64);
            let want = loss_and_grads(&f32_model, &tokens, batch, width, true).unwrap();
            let got = loss_and_grads(&bf16_model, &tokens, batch, width, true).unwrap();
            let shape = format!("dim {dim} heads {heads}/{kv}");
            let mut worst = 0f64;
            assert!(
                (got.loss - want.loss).abs() <= 1e-3 * want.loss,
                "{shape}: loss {} vs {}",
                got.loss,
                want.loss
            );
            for (name, w) in &want.grads {
                let w: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
                let g: Vec<f32> = got.grads[name].flatten_all().unwrap().to_vec1().unwrap();
                let err = relative_error(&g, &w);
                assert!(err < 2e-2, "{shape}: {name}: relative error {err}");
                worst = worst.max(err);
            }
            eprintln!(
                "{shape}: loss {:.3e} relative, worst gradient {worst:.3e} relative L2",
                (got.loss - want.loss).abs() / want.loss
            );
        }
    }

    /// bf16 results are the same bits on 1 thread and on 3.
    #[test]
    fn bf16_step_does_not_depend_on_the_thread_count() {
        let mut c = config(2, false);
        c.dim = 64;
        c.hidden_dim = 160;
        c.seq_len = 100;
        let model = Llama::new(c, 3, &Device::Cpu)
            .unwrap()
            .with_compute_dtype(candle_core::DType::BF16);
        let tokens = random_tokens(4 * 97, 37, 8);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| loss_and_grads(&model, &tokens, 4, 97, true).unwrap())
        };
        let (one, three) = (run(1), run(3));
        assert_eq!(one.loss.to_bits(), three.loss.to_bits());
        for (name, g) in &one.grads {
            let a: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = three.grads[name].flatten_all().unwrap().to_vec1().unwrap();
            assert!(a == b, "{name} differs between 1 and 3 threads");
        }
        // Evaluation computes the step's loss with the same products.
        let eval = eval_loss(&model, &tokens, 4, 97).unwrap();
        assert_eq!(eval.to_bits(), one.loss.to_bits());
    }
}
