// Causal softmax over rows of attention scores, forward and backward, f32: one block of 256
// threads per row (blockDim.x must be 256). The same arithmetic as the CPU reference in
// causal_softmax.rs, with reductions in a fixed order (per-thread strided partials, then a
// fixed tree), so results do not change from run to run. Compiled to PTX by build.rs in the
// CUDA build only.

#define THREADS 256

// Reduce v over the block with op (max or sum) in a fixed order; every thread gets the result.
template <bool IS_MAX>
__device__ float block_reduce(float v, float *shared) {
    for (int o = 16; o > 0; o >>= 1) {
        float w = __shfl_xor_sync(0xffffffff, v, o);
        v = IS_MAX ? fmaxf(v, w) : v + w;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < THREADS / 32 ? shared[lane] : (IS_MAX ? -INFINITY : 0.0f);
        for (int o = 16; o > 0; o >>= 1) {
            float w = __shfl_xor_sync(0xffffffff, v, o);
            v = IS_MAX ? fmaxf(v, w) : v + w;
        }
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float r = shared[0];
    __syncthreads();
    return r;
}

// Row r of (rows, n) scores in (…, t, n) blocks sees keys 0..=past + r mod t.
extern "C" __global__ void causal_softmax_fwd(
    const float *x, float *out, unsigned int t, unsigned int n, unsigned int past, float scale) {
    __shared__ float shared[THREADS / 32];
    unsigned long long row = blockIdx.x;
    const float *xr = x + row * n;
    float *orow = out + row * n;
    unsigned int k = min(past + (unsigned int)(row % t) + 1, n);
    float m = -INFINITY;
    for (unsigned int j = threadIdx.x; j < k; j += THREADS) m = fmaxf(m, __fmul_rn(xr[j], scale));
    m = block_reduce<true>(m, shared);
    float s = 0.0f;
    for (unsigned int j = threadIdx.x; j < k; j += THREADS) {
        float e = expf(__fsub_rn(__fmul_rn(xr[j], scale), m));
        orow[j] = e;
        s += e;
    }
    s = block_reduce<false>(s, shared);
    float inv = __fdiv_rn(1.0f, s);
    for (unsigned int j = threadIdx.x; j < n; j += THREADS) orow[j] = j < k ? __fmul_rn(orow[j], inv) : 0.0f;
}

// d(scores) = scale · p ⊙ (dp − Σ dp ⊙ p) per row.
extern "C" __global__ void causal_softmax_bwd(
    const float *p, const float *dp, float *out, unsigned int n, float scale) {
    __shared__ float shared[THREADS / 32];
    unsigned long long row = blockIdx.x;
    const float *pr = p + row * n, *dr = dp + row * n;
    float *orow = out + row * n;
    float dot = 0.0f;
    for (unsigned int j = threadIdx.x; j < n; j += THREADS) dot += __fmul_rn(pr[j], dr[j]);
    dot = block_reduce<false>(dot, shared);
    for (unsigned int j = threadIdx.x; j < n; j += THREADS)
        orow[j] = __fmul_rn(__fmul_rn(scale, pr[j]), __fsub_rn(dr[j], dot));
}
