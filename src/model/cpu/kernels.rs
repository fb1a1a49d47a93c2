//! Row kernels for the CPU training step: exp, softmax, cross-entropy and SwiGLU rows.
//!
//! Why not `f32::exp` in a loop: glibc's expf is a scalar call (it was 14 % of a training step
//! with a 32k vocabulary), and serial sums cannot be vectorised because float addition is not
//! reassociated. Here exp is a Cephes-style polynomial in straight-line arithmetic, sums use 16
//! fixed lanes, and each kernel is compiled twice — for AVX-512 and for the baseline — picked
//! at run time. Both builds do the same operations in the same order (no FMA contraction), so
//! results are bit-identical whichever runs: determinism does not depend on the CPU.

const LANES: usize = 16;

/// Compile `$body` for AVX-512 and for the baseline; choose at run time.
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the features were detected just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

/// e^x to about 2 ulp for x in [-87, 88] (Cephes expf); below that it returns ~0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // n = round(x / ln 2) by the 1.5·2^23 trick (vectorises without SSE4.1 rounding). The
    // shifted value's low mantissa bits are n itself, so 2^n is built with integer ops: a
    // float→int `as` cast would saturate-check each lane and keep the loop scalar.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted - MAGIC;
    let n_bits = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for v in acc.iter().chain(rest) {
        m = if *v > m { *v } else { m };
    }
    m
}

/// Σ a·b·c over three rows (16 lanes, fixed order); `c` None means all ones.
#[inline(always)]
fn lanes_dot(a: &[f32], b: &[f32], c: Option<&[f32]>) -> f32 {
    let n = a.len();
    let mut acc = [0f32; LANES];
    let whole = n - n % LANES;
    for i in (0..whole).step_by(LANES) {
        for l in 0..LANES {
            let ab = a[i + l] * b[i + l];
            acc[l] += match c {
                Some(c) => ab * c[i + l],
                None => ab,
            };
        }
    }
    let mut rest = 0f32;
    for i in whole..n {
        let ab = a[i] * b[i];
        rest += match c {
            Some(c) => ab * c[i],
            None => ab,
        };
    }
    let mut total = 0f32;
    for v in acc {
        total += v;
    }
    total + rest
}

multiversion! {
    /// One RMSNorm row: out = x · rstd · w; returns rstd = 1/√(mean(x²) + eps).
    pub fn rmsnorm_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let r = 1.0 / (lanes_dot(x, x, None) / x.len() as f32 + eps).sqrt();
        for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
            *o = x * r * w;
        }
        r
    }
}

multiversion! {
    /// Backward of one RMSNorm row with saved rstd `r`: dx += r·(w·dy − x̂·mean(w·dy·x̂)) and
    /// dw += dy·x̂, where x̂ = x·r.
    pub fn rmsnorm_backward_row(dx: &mut [f32], dw: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], r: f32) {
        let mean = lanes_dot(dy, w, Some(x)) * r / x.len() as f32;
        for i in 0..x.len() {
            let xh = x[i] * r;
            dw[i] += dy[i] * xh;
            dx[i] += r * (dy[i] * w[i] - xh * mean);
        }
    }
}

/// x ← e^((x − m)·scale) in place; returns the sum (16 lanes, fixed order).
#[inline(always)]
fn exp_shift_sum(x: &mut [f32], m: f32, scale: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp((c[l] - m) * scale);
            acc[l] += c[l];
        }
    }
    let mut s = 0f32;
    for v in chunks.into_remainder() {
        *v = exp((*v - m) * scale);
        s += *v;
    }
    let mut total = 0f32;
    for a in acc {
        total += a;
    }
    total + s
}

multiversion! {
    /// One row of softmax cross-entropy: returns −log softmax(row)[target] and leaves
    /// (softmax(row) − onehot(target))·scale in `row` (the gradient of the mean loss when
    /// scale = 1/rows).
    pub fn cross_entropy_row(row: &mut [f32], target: usize, scale: f32) -> f32 {
        let z_target = row[target];
        let m = lanes_max(row);
        let s = exp_shift_sum(row, m, 1.0);
        let k = scale / s;
        for v in row.iter_mut() {
            *v *= k;
        }
        row[target] -= scale;
        m + s.ln() - z_target
    }
}

multiversion! {
    /// The forward half of a causal softmax, in place, for query rows first..first+rows of a
    /// score block whose rows are `stride` apart: row i becomes e^((s − m)·scale) over columns
    /// 0..=i (m its max), columns i+1..first+rows (the block's upper triangle, which the next
    /// product reads) become 0, lse[r] = m·scale + ln Σ and inv[r] = 1/Σ. Columns beyond the
    /// block are neither read nor written.
    pub fn causal_exp(
        s: &mut [f32],
        stride: usize,
        first: usize,
        rows: usize,
        scale: f32,
        lse: &mut [f32],
        inv: &mut [f32],
    ) {
        for r in 0..rows {
            let i = first + r;
            s[r * stride + i + 1..r * stride + first + rows].fill(0.0);
            let live = &mut s[r * stride..r * stride + i + 1];
            // max(s)·scale = max(s·scale) for scale > 0: the scaling folds into the exp pass.
            let m = lanes_max(live);
            let sum = exp_shift_sum(live, m, scale);
            lse[r] = m * scale + sum.ln();
            inv[r] = 1.0 / sum;
        }
    }
}

multiversion! {
    /// Causal softmax probabilities from saved log-sum-exps, in one pass: row i becomes
    /// e^(s·scale − lse_i) over columns 0..=i and 0 over the block's upper triangle.
    pub fn causal_probs(s: &mut [f32], stride: usize, first: usize, rows: usize, scale: f32, lse: &[f32]) {
        for r in 0..rows {
            let i = first + r;
            s[r * stride + i + 1..r * stride + first + rows].fill(0.0);
            let l = lse[r];
            for x in &mut s[r * stride..r * stride + i + 1] {
                *x = exp(*x * scale - l);
            }
        }
    }
}

multiversion! {
    /// Softmax backward for the same rows: ds ← p ⊙ (ds − rowsum(dout ⊙ o))·scale over the
    /// causal columns (0 in the block's upper triangle), where ds arrives holding dout·vᵀ.
    /// dout and o are (rows × d) with row stride `ld`.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_backward(
        ds: &mut [f32],
        p: &[f32],
        stride: usize,
        first: usize,
        rows: usize,
        dout: &[f32],
        o: &[f32],
        ld: usize,
        d: usize,
        scale: f32,
    ) {
        for r in 0..rows {
            let i = first + r;
            let mut di = 0f32;
            for (a, b) in dout[r * ld..r * ld + d].iter().zip(&o[r * ld..r * ld + d]) {
                di += a * b;
            }
            ds[r * stride + i + 1..r * stride + first + rows].fill(0.0);
            let row = &mut ds[r * stride..r * stride + i + 1];
            for (x, &pj) in row.iter_mut().zip(&p[r * stride..r * stride + i + 1]) {
                *x = pj * (*x - di) * scale;
            }
        }
    }
}

multiversion! {
    /// SwiGLU forward over a block: act = silu(gate) ⊙ up.
    pub fn swiglu(act: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((a, g), u) in act.iter_mut().zip(gate).zip(up) {
            *a = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

multiversion! {
    /// SwiGLU backward over a block: `d_act` becomes d(gate) and `up` becomes d(up).
    pub fn swiglu_backward(d_act: &mut [f32], up: &mut [f32], gate: &[f32]) {
        for ((da, u), g) in d_act.iter_mut().zip(up.iter_mut()).zip(gate) {
            let sig = 1.0 / (1.0 + exp(-*g));
            let d_gate = *da * *u * sig * (1.0 + *g * (1.0 - sig));
            *u = *da * (*g * sig);
            *da = d_gate;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_useful_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) >= 0.0);
    }

    #[test]
    fn cross_entropy_row_matches_the_definition() {
        let logits: Vec<f32> = (0..37).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.0).collect();
        let mut row = logits.clone();
        let loss = cross_entropy_row(&mut row, 5, 0.5);
        let lse = logits.iter().map(|&z| (z as f64).exp()).sum::<f64>().ln();
        assert!((loss as f64 - (lse - logits[5] as f64)).abs() < 1e-5);
        for (i, (&g, &z)) in row.iter().zip(&logits).enumerate() {
            let p = ((z as f64) - lse).exp();
            let want = (p - if i == 5 { 1.0 } else { 0.0 }) * 0.5;
            assert!((g as f64 - want).abs() < 1e-6, "{i}: {g} vs {want}");
        }
    }

    /// Rows of 37 (two 16-lane chunks and a remainder) against the f64 definitions.
    #[test]
    fn rmsnorm_rows_match_the_definition() {
        let c = 37;
        let x: Vec<f32> = (0..c).map(|i| ((i * 5) % 13) as f32 * 0.2 - 1.1).collect();
        let w: Vec<f32> = (0..c).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let dy: Vec<f32> = (0..c).map(|i| ((i * 3) % 11) as f32 * 0.1 - 0.4).collect();
        let eps = 1e-5f32;
        let mut out = vec![0f32; c];
        let r = rmsnorm_row(&mut out, &x, &w, eps);
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
        let r64 = 1.0 / (ms + eps as f64).sqrt();
        assert!((r as f64 - r64).abs() < 1e-6 * r64);
        for i in 0..c {
            let want = x[i] as f64 * r64 * w[i] as f64;
            assert!((out[i] as f64 - want).abs() < 1e-5, "out {i}");
        }
        // dx accumulates onto what is there; dw too.
        let (mut dx, mut dw) = (vec![1f32; c], vec![2f32; c]);
        rmsnorm_backward_row(&mut dx, &mut dw, &dy, &x, &w, r);
        let mean = (0..c)
            .map(|i| dy[i] as f64 * w[i] as f64 * x[i] as f64 * r64)
            .sum::<f64>()
            / c as f64;
        for i in 0..c {
            let xh = x[i] as f64 * r64;
            let want_dx = 1.0 + r64 * (dy[i] as f64 * w[i] as f64 - xh * mean);
            let want_dw = 2.0 + dy[i] as f64 * xh;
            assert!((dx[i] as f64 - want_dx).abs() < 1e-5, "dx {i}");
            assert!((dw[i] as f64 - want_dw).abs() < 1e-5, "dw {i}");
        }
    }
}

multiversion! {
    /// Σ a·b over two rows (16 lanes, fixed order).
    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        lanes_dot(a, b, None)
    }
}

multiversion! {
    /// y += a·x (16 lanes).
    pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi += a * xi;
        }
    }
}
