//! Fused causal attention for the CPU: softmax(q·kᵀ·scale + causal mask)·v per (batch, head),
//! without materialising the (batch, heads, seq, seq) score matrix, with its own backward pass.
//! Heads run in parallel on rayon; each head is computed sequentially, so results do not depend
//! on the thread count. The composed reference in `Llama::attention` stays the path for other
//! devices and dtypes and is what the tests compare against.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub struct CausalAttention {
    pub scale: f32,
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("causal attention: expected f32 tensors")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("causal attention: inputs must be contiguous"),
    }
}

/// Dot product with 8 independent accumulators: a plain `sum()` is one serial chain of adds
/// (floating point may not be reassociated), this vectorizes. The order is fixed, so results
/// stay deterministic.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Softmax weights of row `i` over keys 0..=i into `p` (length i+1).
#[inline]
fn row_probs(qi: &[f32], k: &[f32], i: usize, d: usize, scale: f32, p: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for (j, pj) in p.iter_mut().enumerate().take(i + 1) {
        *pj = dot(qi, &k[j * d..(j + 1) * d]) * scale;
        m = m.max(*pj);
    }
    let mut l = 0.0;
    for pj in p.iter_mut().take(i + 1) {
        *pj = (*pj - m).exp();
        l += *pj;
    }
    let inv = 1.0 / l;
    for pj in p.iter_mut().take(i + 1) {
        *pj *= inv;
    }
}

fn forward_head(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], t: usize, d: usize, scale: f32) {
    let mut p = vec![0f32; t];
    for i in 0..t {
        row_probs(&q[i * d..(i + 1) * d], k, i, d, scale, &mut p);
        let oi = &mut out[i * d..(i + 1) * d];
        oi.fill(0.0);
        for (j, &pj) in p.iter().enumerate().take(i + 1) {
            axpy(oi, pj, &v[j * d..(j + 1) * d]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn backward_head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    go: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    t: usize,
    d: usize,
    scale: f32,
) {
    let mut p = vec![0f32; t];
    for i in 0..t {
        let qi = &q[i * d..(i + 1) * d];
        row_probs(qi, k, i, d, scale, &mut p);
        let goi = &go[i * d..(i + 1) * d];
        let di = dot(goi, &o[i * d..(i + 1) * d]);
        for (j, &pj) in p.iter().enumerate().take(i + 1) {
            let kj = &k[j * d..(j + 1) * d];
            let dp = dot(goi, &v[j * d..(j + 1) * d]);
            let ds = pj * (dp - di) * scale;
            axpy(&mut dv[j * d..(j + 1) * d], pj, goi);
            axpy(&mut dq[i * d..(i + 1) * d], ds, kj);
            axpy(&mut dk[j * d..(j + 1) * d], ds, qi);
        }
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let (_, _, t, d) = l1.shape().dims4()?;
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!("causal attention: q, k, v shapes differ");
        }
        let mut out = vec![0f32; q.len()];
        let head = t * d;
        out.par_chunks_mut(head).enumerate().for_each(|(h, o)| {
            let r = h * head..(h + 1) * head;
            forward_head(&q[r.clone()], &k[r.clone()], &v[r], o, t, d, self.scale);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, t, d) = q.dims4()?;
        let flat =
            |x: &Tensor| -> Result<Vec<f32>> { x.contiguous()?.flatten_all()?.to_vec1::<f32>() };
        let (qv, kv, vv, ov, gv) = (flat(q)?, flat(k)?, flat(v)?, flat(res)?, flat(grad)?);
        let n = qv.len();
        let head = t * d;
        let mut dq = vec![0f32; n];
        let mut dk = vec![0f32; n];
        let mut dv = vec![0f32; n];
        dq.par_chunks_mut(head)
            .zip(dk.par_chunks_mut(head))
            .zip(dv.par_chunks_mut(head))
            .enumerate()
            .for_each(|(h, ((dq, dk), dv))| {
                let r = h * head..(h + 1) * head;
                backward_head(
                    &qv[r.clone()],
                    &kv[r.clone()],
                    &vv[r.clone()],
                    &ov[r.clone()],
                    &gv[r],
                    dq,
                    dk,
                    dv,
                    t,
                    d,
                    self.scale,
                );
            });
        let shape = q.shape();
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, shape, dev)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ))
    }
}
