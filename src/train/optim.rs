//! AdamW of our own. Unlike candle-nn's, its state (moments and step count) is plain named
//! tensors that a checkpoint can save and restore, it decays only matrices, and it clips the
//! global gradient norm. Torch7's optim is the model: state is data.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; None or 0 disables it.
    pub clip: Option<f64>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: Some(1.0),
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Number of updates applied (bias correction uses it).
    pub step: u64,
    /// First and second moments by parameter name, created lazily at the first update.
    pub m: BTreeMap<String, Tensor>,
    pub v: BTreeMap<String, Tensor>,
}

/// What one update saw, before anything was applied.
pub struct UpdateStats {
    pub grad_norm: f64,
}

pub enum UpdateError {
    /// Gradient norm not finite: nothing was applied.
    NonFinite(f64),
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for UpdateError {
    fn from(e: candle_core::Error) -> Self {
        UpdateError::Candle(e)
    }
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update at learning rate `lr`. Nothing is changed unless the gradient norm is finite,
    /// so a diverging step leaves the last good state in place.
    pub fn update(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &GradStore,
        lr: f64,
        decayed: impl Fn(&str) -> bool,
    ) -> std::result::Result<UpdateStats, UpdateError> {
        let mut named: Vec<(&String, &Var, Tensor)> = Vec::with_capacity(params.len());
        let mut sq_sum = 0f64;
        for (name, var) in params {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq_sum += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
                named.push((name, var, g.clone()));
            }
        }
        let grad_norm = sq_sum.sqrt();
        if !grad_norm.is_finite() {
            return Err(UpdateError::NonFinite(grad_norm));
        }
        let scale = match self.config.clip {
            Some(c) if c > 0.0 && grad_norm > c => c / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (name, var, g) in named {
            let g = if scale != 1.0 { (g * scale)? } else { g };
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?,
                None => (&g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let step = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let p = var.as_tensor();
            let p = if decayed(name) && c.weight_decay != 0.0 {
                (p * (1.0 - lr * c.weight_decay))?
            } else {
                p.clone()
            };
            var.set(&(p - (step * lr)?)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(UpdateStats { grad_norm })
    }
}
