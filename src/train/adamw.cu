// AdamW on the GPU, the same two passes as the CPU path in optim.rs (and the same f32
// arithmetic, in the same order): the moments from the gradient, then the parameter from the
// moments. Elementwise, so results do not depend on the launch shape. Compiled to PTX by
// build.rs in the CUDA build only.

extern "C" __global__ void adamw_moment(
    float *m, const float *g, float beta, float scale, int square, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float gi = g[i] * scale;
        float x = square ? gi * gi : gi;
        // Written as the CPU writes it; no fused multiply-add, so both round alike.
        m[i] = __fadd_rn(__fmul_rn(beta, m[i]), __fmul_rn(1.0f - beta, x));
    }
}

extern "C" __global__ void adamw_param(
    float *p, const float *m, const float *v, float decay, float lr, float bc1, float bc2,
    float eps, unsigned long long n) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float step = __fdiv_rn(__fdiv_rn(m[i], bc1), __fadd_rn(__fsqrt_rn(__fdiv_rn(v[i], bc2)), eps));
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(lr, step));
    }
}
