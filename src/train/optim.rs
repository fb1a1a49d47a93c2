//! AdamW of our own. Unlike candle-nn's, its state (moments and step count) is plain named
//! tensors that a checkpoint can save and restore, it decays only matrices, and it clips the
//! global gradient norm. Torch7's optim is the model: state is data.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
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
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        decayed: impl Fn(&str) -> bool + Send,
    ) -> std::result::Result<UpdateStats, UpdateError> {
        crate::util::pool::on_pool(|| self.update_here(params, grads, lr, decayed))
    }

    fn update_here(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        decayed: impl Fn(&str) -> bool,
    ) -> std::result::Result<UpdateStats, UpdateError> {
        let mut named: Vec<(&String, &Var, Tensor)> = Vec::with_capacity(params.len());
        let mut sq_sum = 0f64;
        // On a GPU the per-parameter sums stay there and are read back once: one
        // synchronisation per step instead of one per parameter.
        let mut device_sums = Vec::new();
        for (name, var) in params {
            if let Some(g) = grads.get(name) {
                match sum_squares_cpu(g) {
                    Some(s) => sq_sum += s,
                    None => device_sums.push(g.sqr()?.sum_all()?.to_dtype(DType::F64)?),
                }
                named.push((name, var, g.clone()));
            }
        }
        if !device_sums.is_empty() {
            sq_sum += Tensor::stack(&device_sums, 0)?
                .sum_all()?
                .to_scalar::<f64>()?;
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
        let fast = named.iter().all(|(_, var, g)| {
            let here =
                var.device().is_cpu() || (var.device().is_cuda() && crate::device::gpu_kernels());
            here && var.dtype() == DType::F32
                && g.dtype() == DType::F32
                && var.is_contiguous()
                && g.is_contiguous()
        });
        for (name, var, g) in named {
            if fast {
                // Passes over the tensors' own storage (multi-threaded on the CPU, one kernel
                // each on the GPU) instead of a dozen tensor ops, each allocating.
                let hyper = Hyper {
                    lr: lr as f32,
                    decay: if decayed(name) {
                        (1.0 - lr * c.weight_decay) as f32
                    } else {
                        1.0
                    },
                    beta1: c.beta1 as f32,
                    beta2: c.beta2 as f32,
                    bc1: bc1 as f32,
                    bc2: bc2 as f32,
                    eps: c.eps as f32,
                    scale: scale as f32,
                };
                let m = match self.m.get(name) {
                    Some(m) => m.clone(),
                    None => g.zeros_like()?,
                };
                let v = match self.v.get(name) {
                    Some(v) => v.clone(),
                    None => g.zeros_like()?,
                };
                update_in_place(var.as_tensor(), &g, &m, &v, &hyper)?;
                self.m.insert(name.clone(), m);
                self.v.insert(name.clone(), v);
                continue;
            }
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

/// The scalars of one AdamW update, in f32.
struct Hyper {
    lr: f32,
    decay: f32,
    beta1: f32,
    beta2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    scale: f32,
}

/// Sum of squares of a contiguous CPU f32 tensor, read in place (None for other tensors).
fn sum_squares_cpu(t: &Tensor) -> Option<f64> {
    let (storage, layout) = t.storage_and_layout();
    let (a, b) = layout.contiguous_offsets()?;
    match &*storage {
        // Partial sums over fixed chunks, added in chunk order: the same total on any
        // number of threads.
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
            let partial: Vec<f64> = v[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            Some(partial.iter().sum())
        }
        _ => None,
    }
}

/// The first moment (`square` false) or second moment (true) updated in place from the
/// gradient: m ← β·m + (1−β)·(g·scale)[²]. In parallel over fixed chunks: elementwise, so the
/// result does not depend on the thread count.
struct MomentUpdate {
    beta: f32,
    scale: f32,
    square: bool,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("AdamW: expected a contiguous f32 tensor"),
    }
}

fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("AdamW: expected a contiguous f32 tensor"),
    }
}

const CHUNK: usize = 1 << 14;

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (m, g) = (f32_slice_mut(s1, l1)?, f32_slice(s2, l2)?);
        let (beta, scale, square) = (self.beta, self.scale, self.square);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let gi = g * scale;
                    *m = beta * *m + (1.0 - beta) * if square { gi * gi } else { gi };
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let (m, g) = (gpu::range(l1)?, gpu::range(l2)?);
        let func = s2
            .device()
            .get_or_load_custom_func("adamw_moment", "wick_adamw", gpu::PTX)?;
        let g = s2.as_cuda_slice::<f32>()?.slice(g);
        let n = m.len() as u64;
        let mut m = s1.as_cuda_slice_mut::<f32>()?.slice_mut(m);
        let square = self.square as i32;
        let mut b = func.builder();
        b.arg(&mut m)
            .arg(&g)
            .arg(&self.beta)
            .arg(&self.scale)
            .arg(&square)
            .arg(&n);
        gpu::launch(b, n)
    }
}

/// The parameter step in place from the updated moments:
/// p ← p·decay − lr·(m/bc1)/(√(v/bc2) + eps).
struct ParamUpdate<'a>(&'a Hyper);

impl InplaceOp3 for ParamUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let h = self.0;
        let (p, m, v) = (
            f32_slice_mut(s1, l1)?,
            f32_slice(s2, l2)?,
            f32_slice(s3, l3)?,
        );
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let step = (m / h.bc1) / ((v / h.bc2).sqrt() + h.eps);
                    *p = *p * h.decay - h.lr * step;
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let h = self.0;
        let (p, m, v) = (gpu::range(l1)?, gpu::range(l2)?, gpu::range(l3)?);
        let func = s2
            .device()
            .get_or_load_custom_func("adamw_param", "wick_adamw", gpu::PTX)?;
        let m = s2.as_cuda_slice::<f32>()?.slice(m);
        let v = s3.as_cuda_slice::<f32>()?.slice(v);
        let n = p.len() as u64;
        let mut p = s1.as_cuda_slice_mut::<f32>()?.slice_mut(p);
        let mut b = func.builder();
        b.arg(&mut p)
            .arg(&m)
            .arg(&v)
            .arg(&h.decay)
            .arg(&h.lr)
            .arg(&h.bc1)
            .arg(&h.bc2)
            .arg(&h.eps)
            .arg(&n);
        gpu::launch(b, n)
    }
}

/// Launching the AdamW kernels of `adamw.cu` (PTX built by build.rs) on candle's stream.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{LaunchArgs, LaunchConfig};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::Layout;

    pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));

    /// The element range of a contiguous tensor in its storage.
    pub fn range(l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(a..b),
            None => candle_core::bail!("AdamW: expected a contiguous f32 tensor"),
        }
    }

    pub fn launch(mut b: LaunchArgs, n: u64) -> candle_core::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig::for_num_elems(n as u32);
        // SAFETY: the arguments match the kernel's parameters in order and type; one thread
        // per element, guarded by n.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// AdamW on a CPU parameter without allocating: the moments and the parameter are updated in
/// their own storage (three passes, no copies: candle's `Var::set` would copy the whole
/// parameter, and fresh buffers cost page faults every step).
fn update_in_place(
    p: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    h: &Hyper,
) -> candle_core::Result<()> {
    m.inplace_op2(
        g,
        &MomentUpdate {
            beta: h.beta1,
            scale: h.scale,
            square: false,
        },
    )?;
    v.inplace_op2(
        g,
        &MomentUpdate {
            beta: h.beta2,
            scale: h.scale,
            square: true,
        },
    )?;
    p.inplace_op3(m, v, &ParamUpdate(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fast CPU pass and the tensor-op reference agree.
    #[test]
    fn cpu_pass_matches_tensor_ops() {
        let dev = Device::Cpu;
        let p0 = Tensor::new(&[0.5f32, -1.0, 2.0, 0.0], &dev).unwrap();
        let g = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev).unwrap();
        let m0 = Tensor::new(&[0.01f32, 0.02, -0.03, 0.0], &dev).unwrap();
        let v0 = Tensor::new(&[0.001f32, 0.002, 0.003, 0.0], &dev).unwrap();
        let (b1, b2, lr, wd, eps, sc) = (0.9f64, 0.95f64, 1e-2f64, 0.1f64, 1e-8f64, 0.5f64);
        let (bc1, bc2) = (1.0 - b1.powi(3), 1.0 - b2.powi(3));
        let h = Hyper {
            lr: lr as f32,
            decay: (1.0 - lr * wd) as f32,
            beta1: b1 as f32,
            beta2: b2 as f32,
            bc1: bc1 as f32,
            bc2: bc2 as f32,
            eps: eps as f32,
            scale: sc as f32,
        };
        let (p, m, v) = (p0.copy().unwrap(), m0.copy().unwrap(), v0.copy().unwrap());
        update_in_place(&p, &g, &m, &v, &h).unwrap();
        let gs = (&g * sc).unwrap();
        let m_ref = ((&m0 * b1).unwrap() + (&gs * (1.0 - b1)).unwrap()).unwrap();
        let v_ref = ((&v0 * b2).unwrap() + (gs.sqr().unwrap() * (1.0 - b2)).unwrap()).unwrap();
        let step = ((&m_ref / bc1).unwrap()
            / ((&v_ref / bc2).unwrap().sqrt().unwrap() + eps).unwrap())
        .unwrap();
        let p_ref = ((&p0 * (1.0 - lr * wd)).unwrap() - (step * lr).unwrap()).unwrap();
        for (a, b) in [(p, p_ref), (m, m_ref), (v, v_ref)] {
            let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
    }

    /// The CUDA kernels give the CPU pass's bits (the same f32 operations, correctly rounded)
    /// on an odd length. Runs in the CUDA build's test binary on a machine with a GPU
    /// (`scripts/gpu-check.sh`); elsewhere it says it was skipped.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_adamw_kernels_match_the_cpu_pass_bit_for_bit() {
        let Some(gpu) = crate::device::test_gpu() else {
            return;
        };
        let n = 1_000_003;
        let mut rng = crate::util::rng::Rng::new(7);
        let mut random = |scale: f64| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|_| ((rng.next_f64() - 0.5) * scale) as f32)
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu).unwrap()
        };
        let (p, g, m) = (random(2.0), random(0.2), random(0.02));
        let v = random(0.002).abs().unwrap();
        let h = Hyper {
            lr: 3e-3,
            decay: 1.0 - 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            bc1: 0.271,
            bc2: 0.1426,
            eps: 1e-8,
            scale: 0.75,
        };
        let on = |d: &Device| {
            let t: Vec<Tensor> = [&p, &g, &m, &v]
                .iter()
                .map(|t| t.to_device(d).unwrap())
                .collect();
            update_in_place(&t[0], &t[1], &t[2], &t[3], &h).unwrap();
            [&t[0], &t[2], &t[3]]
                .map(|t| t.to_device(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap())
        };
        let (cpu, cuda) = (on(&Device::Cpu), on(&gpu));
        for (name, (a, b)) in ["param", "m", "v"].iter().zip(cpu.iter().zip(&cuda)) {
            let differ = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "{name}: {differ} of {n} elements differ between CPU and GPU"
            );
        }
    }
}
