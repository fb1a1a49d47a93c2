//! Causal softmax as one op with its own backward, for the composed model (the GPU path):
//! probs = softmax(scale · scores + causal mask) over the last dimension, in f32.
//!
//! Composed from tensor ops it took ten passes over the (B, H, T, N) scores forward (scale,
//! cast, mask add, max, subtract, exp, sum, divide, ...) and more backward, each allocating a
//! tensor that size; here it is one pass forward and one backward, on the CPU (the reference,
//! tested against the composed ops) and on CUDA (`causal_softmax.cu`, compiled to PTX by the
//! CUDA build; used with `WICK_GPU_KERNELS=1` until a GPU run has checked it).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// softmax(scale · s + mask) over the last dimension of scores (…, T, N), computed in `dtype`
/// (f32; f64 on the CPU for gradient checks): query row i (at position `past + i`) sees keys
/// 0..=past + i.
pub fn causal_softmax(scores: &Tensor, scale: f32, past: usize, dtype: DType) -> Result<Tensor> {
    if scores.device().is_cuda() && !crate::device::gpu_kernels() {
        return causal_softmax_composed(scores, scale, past, dtype);
    }
    scores
        .to_dtype(dtype)?
        .contiguous()?
        .apply_op1(CausalSoftmax { scale, past })
}

/// The backward of `causal_softmax` given its probabilities (f32) and their gradient:
/// d(scores) = scale · p ⊙ (dp − Σ dp ⊙ p) per row.
pub fn causal_softmax_backward(probs: &Tensor, dprobs: &Tensor, scale: f32) -> Result<Tensor> {
    let dprobs = dprobs.to_dtype(probs.dtype())?.contiguous()?;
    if probs.device().is_cuda() && !crate::device::gpu_kernels() {
        let dot = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
        return (probs * dprobs.broadcast_sub(&dot)?)? * scale as f64;
    }
    probs
        .contiguous()?
        .apply_op2(&dprobs, CausalSoftmaxBackward { scale })
}

/// The same from tensor ops, which candle's autograd differentiates: the reference the op is
/// tested against, and what GPUs run unless `WICK_GPU_KERNELS=1`.
pub fn causal_softmax_composed(
    scores: &Tensor,
    scale: f32,
    past: usize,
    dtype: DType,
) -> Result<Tensor> {
    let (t, n) = (scores.dim(D::Minus2)?, scores.dim(D::Minus1)?);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..n).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, n), scores.device())?.to_dtype(dtype)?;
    let scaled = (scores.to_dtype(dtype)? * scale as f64)?;
    super::softmax_last(&scaled.broadcast_add(&mask)?)
}

struct CausalSoftmax {
    scale: f32,
    past: usize,
}

/// (rows, T, N) of contiguous scores shaped (…, T, N), and their element range.
fn geometry(l: &Layout) -> Result<(usize, usize, usize, std::ops::Range<usize>)> {
    let dims = l.shape().dims();
    if dims.len() < 2 {
        candle_core::bail!("causal softmax: scores need at least 2 dimensions, got {dims:?}");
    }
    let (t, n) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("causal softmax: expected contiguous scores");
    };
    Ok(((b - a) / n.max(1), t, n, a..b))
}

/// The float type the CPU passes run in (f32, or f64 for gradient checks).
trait Real:
    Copy
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::iter::Sum
{
    const NEG_INFINITY: Self;
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    fn of(x: f32) -> Self;
}

impl Real for f32 {
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn of(x: f32) -> Self {
        x
    }
}

impl Real for f64 {
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn of(x: f32) -> Self {
        x as f64
    }
}

fn forward<T: Real>(x: &[T], (t, n, past): (usize, usize, usize), scale: T) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    for (r, (o, x)) in out.chunks_mut(n).zip(x.chunks(n)).enumerate() {
        let k = visible(r, t, n, past);
        let max = x[..k].iter().fold(T::NEG_INFINITY, |m, &v| {
            let v = v * scale;
            if v > m {
                v
            } else {
                m
            }
        });
        let mut sum = T::ZERO;
        for (o, &v) in o[..k].iter_mut().zip(&x[..k]) {
            *o = (v * scale - max).exp();
            sum = sum + *o;
        }
        let inv = T::ONE / sum;
        for o in &mut o[..k] {
            *o = *o * inv;
        }
    }
    out
}

fn backward<T: Real>(p: &[T], dp: &[T], n: usize, scale: T) -> Vec<T> {
    let mut out = vec![T::ZERO; p.len()];
    for ((o, p), dp) in out.chunks_mut(n).zip(p.chunks(n)).zip(dp.chunks(n)) {
        let dot: T = p.iter().zip(dp).map(|(&p, &d)| p * d).sum();
        for ((o, &p), &d) in o.iter_mut().zip(p).zip(dp) {
            *o = scale * p * (d - dot);
        }
    }
    out
}

/// Keys row `r` of a (…, T, N) block sees: 0..=past + (r mod T), at most N.
fn visible(r: usize, t: usize, n: usize, past: usize) -> usize {
    (past + r % t + 1).min(n)
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, t, n, range) = geometry(l)?;
        let geom = (t, n, self.past);
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(forward(&x[range], geom, self.scale)),
            CpuStorage::F64(x) => CpuStorage::F64(forward(&x[range], geom, f64::of(self.scale))),
            _ => candle_core::bail!("causal softmax: expected f32 or f64 scores"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, t, n, range) = geometry(l)?;
        let out = gpu::rows_kernel(
            "causal_softmax_fwd",
            (s, range),
            rows,
            (t, n, self.past, self.scale),
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(causal_softmax_backward(res, grad_res, self.scale)?))
    }
}

/// d(scores) = scale · p ⊙ (dp − Σ dp ⊙ p) per row (masked entries have p = 0 and stay 0).
struct CausalSoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        sp: &CpuStorage,
        lp: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, n, rp) = geometry(lp)?;
        let (_, _, _, rd) = geometry(ld)?;
        if rp.len() != rd.len() {
            candle_core::bail!("causal softmax backward: shapes differ");
        }
        let out = match (sp, sd) {
            (CpuStorage::F32(p), CpuStorage::F32(d)) => {
                CpuStorage::F32(backward(&p[rp], &d[rd], n, self.scale))
            }
            (CpuStorage::F64(p), CpuStorage::F64(d)) => {
                CpuStorage::F64(backward(&p[rp], &d[rd], n, f64::of(self.scale)))
            }
            _ => candle_core::bail!("causal softmax backward: expected f32 or f64"),
        };
        Ok((out, lp.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sp: &candle_core::CudaStorage,
        lp: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, t, n, rp) = geometry(lp)?;
        let (_, _, _, rd) = geometry(ld)?;
        if rp.len() != rd.len() {
            candle_core::bail!("causal softmax backward: shapes differ");
        }
        let out = gpu::rows_kernel_2(
            "causal_softmax_bwd",
            (sp, rp),
            (sd, rd),
            rows,
            (t, n, 0, self.scale),
        )?;
        Ok((out, lp.shape().clone()))
    }
}

/// Launching `causal_softmax.cu` (PTX built by build.rs) on candle's stream: one block of
/// 256 threads per row.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/causal_softmax.ptx"));
    const THREADS: u32 = 256;

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// out (rows × n, new) = kernel(x): the forward.
    pub fn rows_kernel(
        name: &str,
        (x, range): (&CudaStorage, std::ops::Range<usize>),
        rows: usize,
        (t, n, past, scale): (usize, usize, usize, f32),
    ) -> Result<CudaStorage> {
        let dev = x.device().clone();
        let func = dev.get_or_load_custom_func(name, "wick_causal_softmax", PTX)?;
        let x = x.as_cuda_slice::<f32>()?.slice(range);
        // SAFETY: the kernel writes every element of every row.
        let out = unsafe { dev.alloc::<f32>(rows * n)? };
        let (t, n, past) = (t as u32, n as u32, past as u32);
        let mut b = func.builder();
        b.arg(&x).arg(&out).arg(&t).arg(&n).arg(&past).arg(&scale);
        if rows > 0 {
            // SAFETY: arguments in the kernel's order and types; one block per row.
            unsafe { b.launch(config(rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// out (rows × n, new) = kernel(p, dp): the backward.
    pub fn rows_kernel_2(
        name: &str,
        (p, rp): (&CudaStorage, std::ops::Range<usize>),
        (dp, rd): (&CudaStorage, std::ops::Range<usize>),
        rows: usize,
        (_, n, _, scale): (usize, usize, usize, f32),
    ) -> Result<CudaStorage> {
        let dev = p.device().clone();
        let func = dev.get_or_load_custom_func(name, "wick_causal_softmax", PTX)?;
        let p = p.as_cuda_slice::<f32>()?.slice(rp);
        let dp = dp.as_cuda_slice::<f32>()?.slice(rd);
        // SAFETY: the kernel writes every element of every row.
        let out = unsafe { dev.alloc::<f32>(rows * n)? };
        let n = n as u32;
        let mut b = func.builder();
        b.arg(&p).arg(&dp).arg(&out).arg(&n).arg(&scale);
        if rows > 0 {
            // SAFETY: arguments in the kernel's order and types; one block per row.
            unsafe { b.launch(config(rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The CUDA kernels against the CPU op on odd sizes (rows longer than a block of threads,
    /// a KV offset), forward and backward. Runs in the CUDA build's test binary on a machine
    /// with a GPU (`scripts/gpu-check.sh`); elsewhere it says it was skipped.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_kernels_match_the_cpu_op() {
        let Some(gpu) = crate::device::test_gpu() else {
            return;
        };
        for &(b, h, t, past) in &[
            (2, 3, 5, 0),
            (1, 2, 37, 0),
            (2, 1, 7, 4),
            (1, 1, 1, 0),
            (1, 2, 300, 700),
        ] {
            let n = past + t;
            let scores = Tensor::randn(0f32, 3.0, (b, h, t, n), &Device::Cpu).unwrap();
            let dprobs = Tensor::randn(0f32, 1.0, (b, h, t, n), &Device::Cpu).unwrap();
            let op = || CausalSoftmax { scale: 0.37, past };
            let cpu = scores.apply_op1(op()).unwrap();
            let cuda = scores.to_device(&gpu).unwrap().apply_op1(op()).unwrap();
            let fwd = max_diff(&cpu, &cuda.to_device(&Device::Cpu).unwrap());
            assert!(fwd < 1e-6, "forward {b}x{h}x{t}+{past}: {fwd}");
            let back = |p: &Tensor, d: &Tensor| {
                p.apply_op2(d, CausalSoftmaxBackward { scale: 0.37 })
                    .unwrap()
            };
            let cpu_d = back(&cpu, &dprobs);
            let cuda_d = back(&cuda, &dprobs.to_device(&gpu).unwrap());
            let bwd = max_diff(&cpu_d, &cuda_d.to_device(&Device::Cpu).unwrap());
            assert!(bwd < 1e-5, "backward {b}x{h}x{t}+{past}: {bwd}");
        }
    }

    /// Forward and backward equal the composed ops (mask add + softmax from tensor ops, through
    /// candle's autograd) on odd sizes, with and without earlier positions (a cache).
    #[test]
    fn matches_the_composed_ops_forward_and_backward() {
        let dev = Device::Cpu;
        for &(b, h, t, past) in &[(2, 3, 5, 0), (1, 2, 37, 0), (2, 1, 7, 4), (1, 1, 1, 0)] {
            let n = past + t;
            let scores =
                Var::from_tensor(&Tensor::randn(0f32, 3.0, (b, h, t, n), &dev).unwrap()).unwrap();
            let weights = Tensor::randn(0f32, 1.0, (b, h, t, n), &dev).unwrap();
            let scale = 0.37f32;
            let fused = causal_softmax(scores.as_tensor(), scale, past, DType::F32).unwrap();
            let reference =
                causal_softmax_composed(scores.as_tensor(), scale, past, DType::F32).unwrap();
            assert!(
                max_diff(&fused, &reference) < 1e-6,
                "forward {b}x{h}x{t}+{past}"
            );
            let grad = |probs: &Tensor| {
                let loss = (probs * &weights).unwrap().sum_all().unwrap();
                loss.backward()
                    .unwrap()
                    .get(scores.as_tensor())
                    .unwrap()
                    .clone()
            };
            let (g_fused, g_ref) = (grad(&fused), grad(&reference));
            assert!(
                max_diff(&g_fused, &g_ref) < 1e-5,
                "backward {b}x{h}x{t}+{past}"
            );
        }
    }
}
