//! The training session: model + optimizer + step counter. One `train_step` is indivisible:
//! forward, cross-entropy, backward, clip and update all happen or none of the update does.

use super::optim::{AdamW, UpdateError};
use crate::model::{is_decayed, Llama};
use candle_core::Tensor;
use std::sync::Arc;
use std::time::Instant;

pub struct Session {
    pub model: Arc<Llama>,
    pub optim: AdamW,
    /// Optimizer steps taken over the whole run, resumes included.
    pub step: u64,
    pub tokens_seen: u64,
    /// Learning rate for the next step; the recipe sets it, the optimizer's lr is the default.
    pub lr: f64,
    pub last_loss: Option<f64>,
    pub last_grad_norm: Option<f64>,
    pub last_timing: StepTiming,
}

/// Milliseconds spent in each phase of the last step (the benchmark reports medians).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTiming {
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optim_ms: f64,
    /// Data-parallel: averaging the gradients over the ranks (0 alone).
    pub allreduce_ms: f64,
}

#[derive(Debug)]
pub enum StepError {
    /// Loss or gradient norm stopped being finite. The update was not applied.
    Diverged {
        step: u64,
        what: String,
    },
    Failed(candle_core::Error),
    /// Data-parallel: the other ranks did not answer while averaging the gradients.
    PeerLost(String),
    /// Data-parallel: a stop signal came while waiting on the other ranks, and they did not
    /// answer within the stop grace. The update was not applied.
    Interrupted,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepError::Diverged { step, what } => write!(
                f,
                "training diverged at step {step}: {what}; lower the learning rate or clip harder"
            ),
            StepError::Failed(e) => write!(f, "{e}"),
            StepError::PeerLost(m) => write!(f, "{m}"),
            StepError::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl From<candle_core::Error> for StepError {
    fn from(e: candle_core::Error) -> Self {
        StepError::Failed(e)
    }
}

/// A batch of packed token windows, (batch, seq+1), as the loaders produce them.
#[derive(Clone, Debug, Default)]
pub struct Windows {
    pub tokens: Vec<u32>,
    pub batch: usize,
    pub width: usize,
    /// Data-parallel: this is one rank's rows of a global batch of this many rows, whose
    /// tokens have this digest (the ranks compare it before the step). None: a whole batch.
    pub share_of: Option<(usize, u64)>,
}

impl Windows {
    /// Rows `rows` of the batch.
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Windows {
        Windows {
            tokens: self.tokens[rows.start * self.width..rows.end * self.width].to_vec(),
            batch: rows.len(),
            width: self.width,
            share_of: None,
        }
    }

    /// Data-parallel: this rank's share of the batch (`dist::my_rows`), which remembers the
    /// whole batch's size and digest. Alone, the batch itself.
    pub fn my_share(self) -> Result<Windows, String> {
        if crate::dist::group().size == 1 || self.share_of.is_some() {
            return Ok(self);
        }
        self.rank_rows()
    }

    /// This rank's rows of a whole batch (copied), remembering the batch's size and digest.
    fn rank_rows(&self) -> Result<Windows, String> {
        let rows = crate::dist::my_rows(self.batch)?;
        let mut share = self.rows(rows);
        share.share_of = Some((self.batch, crate::dist::digest_tokens(&self.tokens)));
        Ok(share)
    }

    /// Rows of the whole batch (all ranks together).
    pub fn global_rows(&self) -> usize {
        self.share_of.map_or(self.batch, |(rows, _)| rows)
    }

    /// Digest of the whole batch's tokens, the same on every rank that trains on it.
    pub fn global_digest(&self) -> u64 {
        self.share_of
            .map_or_else(|| crate::dist::digest_tokens(&self.tokens), |(_, d)| d)
    }

    pub fn to_tensor(&self, model: &Llama) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.tokens, (self.batch, self.width), model.device())
    }
}

impl Session {
    pub fn new(model: Arc<Llama>, optim: AdamW) -> Self {
        let lr = optim.config.lr;
        Session {
            model,
            optim,
            step: 0,
            tokens_seen: 0,
            lr,
            last_loss: None,
            last_grad_norm: None,
            last_timing: StepTiming::default(),
        }
    }

    pub fn check_windows(&self, w: &Windows) -> Result<(), String> {
        let vocab = self.model.config.vocab as u32;
        if w.width < 2 {
            return Err("a batch needs windows of at least 2 tokens".into());
        }
        if w.width - 1 > self.model.config.seq_len {
            return Err(format!(
                "batch windows hold {} tokens but the model's seq_len is {}; make the loader's seq_len at most the model's",
                w.width - 1,
                self.model.config.seq_len
            ));
        }
        if let Some(i) = w.tokens.iter().position(|&t| t >= vocab) {
            return Err(format!(
                "token id {} at row {}, column {} of the batch is outside the model's vocabulary of {vocab}; the model's vocab must match the tokenizer's",
                w.tokens[i],
                i / w.width + 1,
                i % w.width + 1
            ));
        }
        Ok(())
    }

    /// One optimizer step on `windows`; returns the loss before the update.
    pub fn train_step(&mut self, windows: &Windows) -> Result<f64, StepError> {
        self.check_windows(windows)
            .map_err(|m| StepError::Failed(candle_core::Error::msg(m)))?;
        let next_step = self.step + 1;
        let t0 = Instant::now();
        // Data-parallel: this rank trains on its share of the global batch's rows (a loader
        // hands out shares; a batch made by the recipe is shared out here).
        let global_tokens = (windows.global_rows() * (windows.width - 1)) as u64;
        let share;
        let windows = if crate::dist::group().size > 1 && windows.share_of.is_none() {
            share = windows
                .rank_rows()
                .map_err(|m| StepError::Failed(candle_core::Error::msg(m)))?;
            &share
        } else {
            windows
        };
        let (mut loss_value, mut grads, t1) = if self.model.has_cpu_step() {
            // Forward and backward in one hand-written pass (see model/cpu_step.rs).
            let r = self.model.cpu_loss_and_grads(
                &windows.tokens,
                windows.batch,
                windows.width,
                crate::dist::group().size == 1,
            )?;
            (r.loss, r.grads, r.forward_done)
        } else if self.model.uses_tensor_step() {
            // Forward and backward written out over tensors, no autograd graph.
            let r = crate::model::tensor_step::loss_and_grads(
                &self.model,
                &windows.tokens,
                windows.batch,
                windows.width,
            )?;
            (r.loss, r.grads, r.forward_done)
        } else {
            let input = windows.to_tensor(&self.model)?;
            let loss = self.model.loss(&input)?;
            let loss_value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            let t1 = Instant::now();
            let grads = if loss_value.is_finite() {
                let store = loss.backward()?;
                self.model
                    .params()
                    .iter()
                    .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
                    .collect()
            } else {
                Default::default()
            };
            (loss_value, grads, t1)
        };
        let t_avg = Instant::now();
        if crate::dist::group().size > 1 || crate::dist::reduces_on_gpu(self.model.device()) {
            average_over_ranks(&mut grads, &mut loss_value, self.model.compute_dtype())?;
        }
        let allreduce_ms = t_avg.elapsed().as_secs_f64() * 1e3;
        if !loss_value.is_finite() {
            return Err(StepError::Diverged {
                step: next_step,
                what: format!("loss is {loss_value}"),
            });
        }
        let t2 = Instant::now();
        let lr = self.lr;
        let stats = match self
            .optim
            .update(self.model.params(), &grads, lr, is_decayed)
        {
            Ok(s) => s,
            Err(UpdateError::NonFinite(n)) => {
                return Err(StepError::Diverged {
                    step: next_step,
                    what: format!("gradient norm is {n}"),
                })
            }
            Err(UpdateError::Candle(e)) => return Err(StepError::Failed(e)),
        };
        let t3 = Instant::now();
        self.step = next_step;
        self.tokens_seen += global_tokens;
        self.last_loss = Some(loss_value);
        self.last_grad_norm = Some(stats.grad_norm);
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        self.last_timing = StepTiming {
            forward_ms: ms(t0, t1),
            backward_ms: ms(t1, t2) - allreduce_ms,
            optim_ms: ms(t2, t3),
            allreduce_ms,
        };
        Ok(loss_value)
    }

    /// Mean loss of `windows` with no graph built and no state changed.
    pub fn eval_loss(&self, windows: &Windows) -> candle_core::Result<f64> {
        self.model
            .eval_loss(&windows.tokens, windows.batch, windows.width)
    }
}

/// Average the loss and every gradient over the ranks, as one flat buffer in name order (the
/// same order on every rank: the map is sorted): on the GPU through NCCL, without leaving it;
/// otherwise through host memory and MPI. On the GPU they travel in the run's compute dtype
/// (`--dtype bf16` halves the bytes; the sum of bf16 gradients is what DDP's bf16 runs do too)
/// and come back in their own.
fn average_over_ranks(
    grads: &mut std::collections::BTreeMap<String, Tensor>,
    loss: &mut f64,
    wire: candle_core::DType,
) -> Result<(), StepError> {
    let lost = |l: crate::dist::Lost| {
        if l.by_signal {
            StepError::Interrupted
        } else {
            StepError::PeerLost(l.message)
        }
    };
    let on_gpu = grads
        .values()
        .next()
        .is_some_and(|g| crate::dist::reduces_on_gpu(g.device()));
    if on_gpu {
        let parts = grads
            .values()
            .map(|g| g.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = Tensor::cat(&parts, 0)?.to_dtype(wire)?;
        crate::dist::average_on_gpu(&flat, loss).map_err(|e| match e {
            crate::dist::GpuReduceError::Lost(l) => lost(l),
            crate::dist::GpuReduceError::Failed(m) => StepError::Failed(candle_core::Error::Msg(m)),
        })?;
        let mut offset = 0;
        for g in grads.values_mut() {
            let len = g.elem_count();
            *g = flat
                .narrow(0, offset, len)?
                .reshape(g.shape())?
                .to_dtype(g.dtype())?;
            offset += len;
        }
        return Ok(());
    }
    let mut flat: Vec<f32> = Vec::new();
    let mut shapes = Vec::with_capacity(grads.len());
    for g in grads.values() {
        let v = g
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        shapes.push((v.len(), g.shape().clone(), g.dtype(), g.device().clone()));
        flat.extend_from_slice(&v);
    }
    crate::dist::average(&mut flat, loss).map_err(lost)?;
    let mut offset = 0;
    for (g, (len, shape, dtype, device)) in grads.values_mut().zip(shapes) {
        *g = Tensor::from_slice(&flat[offset..offset + len], shape, &device)?.to_dtype(dtype)?;
        offset += len;
    }
    Ok(())
}
