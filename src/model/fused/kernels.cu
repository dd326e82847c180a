// prefixd's fused GPU kernels: everything between the matmuls of one encoder layer.
//
// Matmuls go to cuBLAS through candle; these kernels do the rest in as few passes over memory as
// the math allows, each reading its inputs once and writing its output once:
//   embed_ln            word + type + position embeddings, LayerNorm
//   split_tokens        Q/K/V + bias out of the fused QKV matmul, heads split, keys/values placed
//                       after the prefix slots
//   split_prefix        each row's own task prefix, read in place through a per-row pointer,
//                       into the first Pmax key/value slots
//   masked_softmax      scale, additive key mask, softmax over the P+S keys
//   bias_residual_ln    dense bias + residual + LayerNorm
//   bias_gelu           dense bias + exact (erf) GELU
// Storage is float, __half or __nv_bfloat16 (T); arithmetic is always float.

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

// Most values one lane holds in a row-per-warp kernel: rows up to 32 * MAXV wide (1024).
#define MAXV 32

// LayerNorm of one row held in a warp's registers: v[i] is element lane + 32 i. Two passes (mean,
// then squared deviations), as PyTorch computes it, not E[x²] − mean².
template <typename T>
__device__ __forceinline__ void ln_store(float (&v)[MAXV], int n, const T* gamma, const T* beta,
                                         float eps, T* out) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int j = lane + 32 * i;
        if (j < n) s += v[i];
    }
    const float mean = warp_sum(s) / n;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int j = lane + 32 * i;
        if (j < n) {
            float d = v[i] - mean;
            q += d * d;
        }
    }
    const float inv = rsqrtf(warp_sum(q) / n + eps);
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int j = lane + 32 * i;
        if (j < n) out[j] = from_f<T>((v[i] - mean) * inv * to_f(gamma[j]) + to_f(beta[j]));
    }
}

// One warp per row; blockDim.x = 32 * rows per block.
template <typename T>
__device__ void embed_ln(const uint32_t* ids, const uint32_t* types, const uint32_t* positions,
                         const T* word, const T* type_emb, const T* pos_emb, const T* gamma,
                         const T* beta, float eps, int rows, int n, T* out) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* w = word + (size_t)ids[row] * n;
    const T* t = type_emb + (size_t)types[row] * n;
    const T* p = pos_emb + (size_t)positions[row] * n;
    float v[MAXV];
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int j = lane + 32 * i;
        // The order of the two adds is transformers': (word + type) + position.
        v[i] = j < n ? (to_f(w[j]) + to_f(t[j])) + to_f(p[j]) : 0.f;
    }
    ln_store(v, n, gamma, beta, eps, out + (size_t)row * n);
}

// out = LayerNorm(x + bias + residual); one warp per row.
template <typename T>
__device__ void bias_residual_ln(const T* x, const T* bias, const T* residual, const T* gamma,
                                 const T* beta, float eps, int rows, int n, T* out) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* xr = x + (size_t)row * n;
    const T* rr = residual + (size_t)row * n;
    float v[MAXV];
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int j = lane + 32 * i;
        v[i] = j < n ? (to_f(xr[j]) + to_f(bias[j])) + to_f(rr[j]) : 0.f;
    }
    ln_store(v, n, gamma, beta, eps, out + (size_t)row * n);
}

// out = gelu(x + bias), exact erf form; grid-stride over rows × cols.
template <typename T>
__device__ void bias_gelu(const T* x, const T* bias, size_t total, int cols, T* out) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = to_f(x[i]) + to_f(bias[i % cols]);
        out[i] = from_f<T>(0.5f * v * (1.f + erff(v * 0.70710678118654752f)));
    }
}

// qkv: [B*S, 3*Hd] (queries | keys | values, head h at columns h*D .. h*D+D-1 of each).
// q: [B, H, S, D]; k, v: [B, H, Pmax + S, D] (tokens after the Pmax prefix slots).
template <typename T>
__device__ void split_tokens(const T* qkv, const T* bias, int batch, int seq, int heads,
                             int head_dim, int p_max, T* q, T* k, T* v) {
    const int hd = heads * head_dim;
    const int t = p_max + seq;
    const size_t total = (size_t)batch * seq * 3 * hd;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int c = (int)(i % (3 * hd));
        const size_t r = i / (3 * hd);
        const int b = (int)(r / seq), s = (int)(r % seq);
        const int which = c / hd, cc = c % hd;
        const int h = cc / head_dim, d = cc % head_dim;
        const T val = from_f<T>(to_f(qkv[i]) + to_f(bias[c]));
        const size_t bh = (size_t)b * heads + h;
        if (which == 0) {
            q[(bh * seq + s) * head_dim + d] = val;
        } else {
            T* dst = which == 1 ? k : v;
            dst[(bh * t + p_max + s) * head_dim + d] = val;
        }
    }
}

// row_ptr[b] points at row b's task prefix, [L, 2, H, P_b, D] with P_b = row_p[b]. Writes layer
// `layer`'s prefix keys and values right-aligned into slots 0 .. Pmax-1 of k and v, and zeros into
// the slots left of a shorter prefix (the key mask hides them, but 0 · NaN would not be 0).
template <typename T>
__device__ void split_prefix(const uint64_t* row_ptr, const int* row_p, int layer, int batch,
                             int seq, int heads, int head_dim, int p_max, T* k, T* v) {
    const int t = p_max + seq;
    const size_t per_kv = (size_t)batch * heads * p_max * head_dim;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < 2 * per_kv;
         i += (size_t)gridDim.x * blockDim.x) {
        const int kv = (int)(i / per_kv);
        size_t j = i % per_kv;
        const int d = (int)(j % head_dim);
        j /= head_dim;
        const int p = (int)(j % p_max);
        j /= p_max;
        const int h = (int)(j % heads);
        const int b = (int)(j / heads);
        const int pb = row_p[b];
        const int off = p - (p_max - pb);
        T val = from_f<T>(0.f);
        if (off >= 0) {
            const T* src = reinterpret_cast<const T*>(row_ptr[b]);
            val = src[((((size_t)layer * 2 + kv) * heads + h) * pb + off) * head_dim + d];
        }
        T* dst = kv == 0 ? k : v;
        dst[(((size_t)b * heads + h) * t + p) * head_dim + d] = val;
    }
}

// scores: [B, H, S, T]; mask: [B, T] additive f32 (0 or -inf). probs = softmax(scores * scale +
// mask) over T; one warp per row.
template <typename T>
__device__ void masked_softmax(const T* scores, const float* mask, float scale, int rows,
                               int rows_per_batch, int width, T* probs) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* x = scores + (size_t)row * width;
    const float* m = mask + (size_t)(row / rows_per_batch) * width;
    float v[MAXV];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int j = lane + 32 * i;
        v[i] = j < width ? to_f(x[j]) * scale + m[j] : -INFINITY;
        mx = fmaxf(mx, v[i]);
    }
    mx = warp_max(mx);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        // exp(-inf - mx) is 0: masked keys and the lanes past the row end add nothing.
        v[i] = expf(v[i] - mx);
        s += v[i];
    }
    const float inv = 1.f / warp_sum(s);
    T* out = probs + (size_t)row * width;
#pragma unroll
    for (int i = 0; i < MAXV; i++) {
        int j = lane + 32 * i;
        if (j < width) out[j] = from_f<T>(v[i] * inv);
    }
}

#define INSTANTIATE(T, SUF)                                                                      \
    extern "C" __global__ void embed_ln_##SUF(                                                   \
        const uint32_t* ids, const uint32_t* types, const uint32_t* positions, const T* word,    \
        const T* type_emb, const T* pos_emb, const T* gamma, const T* beta, float eps, int rows, \
        int n, T* out) {                                                                         \
        embed_ln<T>(ids, types, positions, word, type_emb, pos_emb, gamma, beta, eps, rows, n,   \
                    out);                                                                        \
    }                                                                                            \
    extern "C" __global__ void bias_residual_ln_##SUF(const T* x, const T* bias,                 \
                                                      const T* residual, const T* gamma,         \
                                                      const T* beta, float eps, int rows, int n, \
                                                      T* out) {                                  \
        bias_residual_ln<T>(x, bias, residual, gamma, beta, eps, rows, n, out);                  \
    }                                                                                            \
    extern "C" __global__ void bias_gelu_##SUF(const T* x, const T* bias, size_t total,         \
                                               int cols, T* out) {                               \
        bias_gelu<T>(x, bias, total, cols, out);                                                 \
    }                                                                                            \
    extern "C" __global__ void split_tokens_##SUF(const T* qkv, const T* bias, int batch,        \
                                                  int seq, int heads, int head_dim, int p_max,   \
                                                  T* q, T* k, T* v) {                            \
        split_tokens<T>(qkv, bias, batch, seq, heads, head_dim, p_max, q, k, v);                 \
    }                                                                                            \
    extern "C" __global__ void split_prefix_##SUF(const uint64_t* row_ptr, const int* row_p,     \
                                                  int layer, int batch, int seq, int heads,      \
                                                  int head_dim, int p_max, T* k, T* v) {         \
        split_prefix<T>(row_ptr, row_p, layer, batch, seq, heads, head_dim, p_max, k, v);        \
    }                                                                                            \
    extern "C" __global__ void masked_softmax_##SUF(const T* scores, const float* mask,          \
                                                    float scale, int rows, int rows_per_batch,   \
                                                    int width, T* probs) {                       \
        masked_softmax<T>(scores, mask, scale, rows, rows_per_batch, width, probs);              \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
