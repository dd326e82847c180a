#pragma once

#include "common.cuh"

// Training (f32): the backward passes of the fused ops, and dropout as a pure function of
// (key, element index) — the backward makes the forward's mask again from the same key instead of
// storing it. The hash is the CPU training path's (cpu_train/dropout.rs).
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// out[i] = x[i] · (kept ? scale : 0): element i is kept when its 24-bit uniform ≥ threshold.
extern "C" __global__ void dropout_f32(const float* x, uint32_t key, uint32_t threshold,
                                       float scale, uint32_t n, float* out) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        out[i] = (hash32(i ^ key) >> 8) >= threshold ? x[i] * scale : 0.f;
}

// dx of y = LayerNorm(x) with scale gamma, given dy; one warp per row:
// g = dy·γ, dx = (g − mean(g) − x̂·mean(g·x̂)) / σ.
template <int NV>
__device__ void ln_grad(const float* x, const float* dy, const float* gamma, float eps, int rows,
                        int n, float* dx) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const float* xr = x + (size_t)row * n;
    const float* dr = dy + (size_t)row * n;
    float v[NV], g[NV];
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        v[i] = j < n ? xr[j] : 0.f;
        g[i] = j < n ? dr[j] * gamma[j] : 0.f;
    }
    float mean, inv;
    row_stats<NV>(v, n, eps, mean, inv);
    float gs = 0.f, gx = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        v[i] = (v[i] - mean) * inv; // x̂ (0 past the row end: g is 0 there too)
        gs += g[i];
        gx += g[i] * v[i];
    }
    const float gm = warp_sum(gs) / n, gxm = warp_sum(gx) / n;
    float* out = dx + (size_t)row * n;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        if (j < n) out[j] = (g[i] - gm - v[i] * gxm) * inv;
    }
}

// dx of p = softmax(x · scale + mask) given dp; one warp per row: dx = scale · p (dp − Σ dp p).
template <int NV>
__device__ void softmax_grad(const float* p, const float* dp, float scale, int rows, int width,
                             float* dx) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const float* pr = p + (size_t)row * width;
    const float* dr = dp + (size_t)row * width;
    float a[NV], b[NV];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        a[i] = j < width ? pr[j] : 0.f;
        b[i] = j < width ? dr[j] : 0.f;
        s += a[i] * b[i];
    }
    s = warp_sum(s);
    float* out = dx + (size_t)row * width;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        if (j < width) out[j] = scale * a[i] * (b[i] - s);
    }
}

// dx of y = gelu(x + bias) (erf form) given dy; one block per row:
// dx = dy · (Φ(u) + u φ(u)), u = x + bias.
extern "C" __global__ void bias_gelu_grad_f32(const float* x, const float* bias, const float* dy,
                                              int cols, float* dx) {
    const size_t base = (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float u = x[base + c] + bias[c];
        const float cdf = 0.5f * (1.f + erff(u * 0.70710678118654752f));
        const float pdf = 0.39894228040143268f * expf(-0.5f * u * u);
        dx[base + c] = dy[base + c] * (cdf + u * pdf);
    }
}

#define GRAD_KERNELS(NV)                                                                         \
    extern "C" __global__ void ln_grad_##NV##_f32(const float* x, const float* dy,               \
                                                  const float* gamma, float eps, int rows, int n, \
                                                  float* dx) {                                   \
        ln_grad<NV>(x, dy, gamma, eps, rows, n, dx);                                             \
    }                                                                                            \
    extern "C" __global__ void softmax_grad_##NV##_f32(const float* p, const float* dp,          \
                                                       float scale, int rows, int width,         \
                                                       float* dx) {                              \
        softmax_grad<NV>(p, dp, scale, rows, width, dx);                                         \
    }
GRAD_KERNELS(1)
GRAD_KERNELS(2)
GRAD_KERNELS(4)
GRAD_KERNELS(8)
GRAD_KERNELS(12)
GRAD_KERNELS(16)
GRAD_KERNELS(24)
GRAD_KERNELS(32)
