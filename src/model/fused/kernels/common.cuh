// Shared by every kernel file: storage types to and from f32, 16- and 4-element packs, warp
// reductions. Included once, by kernels.cu.

#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// 16 bytes of T: one vector load or store.
template <typename T> struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

// Four values of T: a lane's share of a row-per-warp kernel's vector loads.
template <typename T> struct alignas(4 * sizeof(T)) Pack4 {
    T v[4];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Mean and 1/σ of a row of n values held in a warp's registers, v[i] being element lane + 32 i
// (slots past the row end are skipped; a row of exactly 32·NV values may sit in the lanes in any
// order). Two passes (mean, then squared deviations), as PyTorch computes it, not E[x²] − mean².
template <int NV>
__device__ __forceinline__ void row_stats(const float (&v)[NV], int n, float eps, float& mean,
                                          float& inv) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++)
        if (lane + 32 * i < n) s += v[i];
    mean = warp_sum(s) / n;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++)
        if (lane + 32 * i < n) {
            const float d = v[i] - mean;
            q += d * d;
        }
    inv = rsqrtf(warp_sum(q) / n + eps);
}
