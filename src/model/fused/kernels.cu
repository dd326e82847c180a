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
//   merge_heads         [B, H, S, D] attention output back to [B·S, H·D] rows
//   bias_residual_ln    dense bias + residual + LayerNorm
//   bias_gelu           dense bias + exact (erf) GELU
//   dropout, ln_grad, softmax_grad, bias_gelu_grad
//                       training (f32): dropout by hash, and the backward passes of the above
//   attention           (half precision) bias, prefix, q·Kᵀ, scale, mask, softmax and ·V on the
//                       tensor cores in one kernel, from the QKV matmul's rows straight into
//                       merged-head rows (in place of split_tokens, split_prefix and the rest)
// Storage is float, __half or __nv_bfloat16 (T); arithmetic is always float.
//
// Why the shapes of the launches: the first version indexed flat elements with 64-bit divisions
// per element and ran at half PyTorch's speed on large batches. Here a block owns a row (or a
// (row, head)), so the index arithmetic happens once per block in 32 bits, and threads move
// 16-byte packs (4 floats or 8 halves). Row-per-warp kernels (LayerNorm, softmax) hold a row in
// registers; NV, the values per lane, is a compile-time constant so the arrays stay in registers.
// Vectorized kernels need head_dim, hidden and intermediate sizes divisible by 8 (checked in Rust).

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

// LayerNorm of one row held in a warp's registers: v[i] is element lane + 32 i. Two passes (mean,
// then squared deviations), as PyTorch computes it, not E[x²] − mean².
template <typename T, int NV>
__device__ __forceinline__ void ln_store(float (&v)[NV], int n, const T* gamma, const T* beta,
                                         float eps, T* out) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++)
        if (lane + 32 * i < n) s += v[i];
    const float mean = warp_sum(s) / n;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++)
        if (lane + 32 * i < n) {
            const float d = v[i] - mean;
            q += d * d;
        }
    const float inv = rsqrtf(warp_sum(q) / n + eps);
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        if (j < n) out[j] = from_f<T>((v[i] - mean) * inv * to_f(gamma[j]) + to_f(beta[j]));
    }
}

// One warp per row; blockDim.x = 32 * rows per block.
template <typename T, int NV>
__device__ void embed_ln(const uint32_t* ids, const uint32_t* types, const uint32_t* positions,
                         const T* word, const T* type_emb, const T* pos_emb, const T* gamma,
                         const T* beta, float eps, int rows, int n, T* out) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* w = word + (size_t)ids[row] * n;
    const T* t = type_emb + (size_t)types[row] * n;
    const T* p = pos_emb + (size_t)positions[row] * n;
    float v[NV];
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        // The order of the two adds is transformers': (word + type) + position.
        v[i] = j < n ? (to_f(w[j]) + to_f(t[j])) + to_f(p[j]) : 0.f;
    }
    ln_store<T, NV>(v, n, gamma, beta, eps, out + (size_t)row * n);
}

// out = LayerNorm((x + bias) + residual); one warp per row.
template <typename T, int NV>
__device__ void bias_residual_ln(const T* x, const T* bias, const T* residual, const T* gamma,
                                 const T* beta, float eps, int rows, int n, T* out) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* xr = x + (size_t)row * n;
    const T* rr = residual + (size_t)row * n;
    float v[NV];
    if constexpr (NV % 4 == 0) {
        // A row of exactly 32·NV values (384, 768, 1024 …) moves as packs of four per lane: a
        // fifth of the load instructions of the scalar loop below (ncu at 512 × 128 bf16: the
        // scalar version reached 2.4 TB/s, 13% of a forward).
        if (n == 32 * NV) {
            constexpr int Q = NV / 4;
#pragma unroll
            for (int i = 0; i < Q; i++) {
                const int j = 4 * (lane + 32 * i);
                const Pack4<T> a = *reinterpret_cast<const Pack4<T>*>(xr + j);
                const Pack4<T> b = *reinterpret_cast<const Pack4<T>*>(bias + j);
                const Pack4<T> r = *reinterpret_cast<const Pack4<T>*>(rr + j);
#pragma unroll
                for (int e = 0; e < 4; e++)
                    v[4 * i + e] = (to_f(a.v[e]) + to_f(b.v[e])) + to_f(r.v[e]);
            }
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < NV; i++) s += v[i];
            const float mean = warp_sum(s) / n;
            float q = 0.f;
#pragma unroll
            for (int i = 0; i < NV; i++) q += (v[i] - mean) * (v[i] - mean);
            const float inv = rsqrtf(warp_sum(q) / n + eps);
            T* o = out + (size_t)row * n;
#pragma unroll
            for (int i = 0; i < Q; i++) {
                const int j = 4 * (lane + 32 * i);
                const Pack4<T> g = *reinterpret_cast<const Pack4<T>*>(gamma + j);
                const Pack4<T> be = *reinterpret_cast<const Pack4<T>*>(beta + j);
                Pack4<T> y;
#pragma unroll
                for (int e = 0; e < 4; e++)
                    y.v[e] = from_f<T>((v[4 * i + e] - mean) * inv * to_f(g.v[e]) + to_f(be.v[e]));
                *reinterpret_cast<Pack4<T>*>(o + j) = y;
            }
            return;
        }
    }
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        v[i] = j < n ? (to_f(xr[j]) + to_f(bias[j])) + to_f(rr[j]) : 0.f;
    }
    ln_store<T, NV>(v, n, gamma, beta, eps, out + (size_t)row * n);
}

// scores: [B, H, S, T]; mask: [B, T] additive f32 (0 or -inf). probs = softmax(scores * scale +
// mask) over T; one warp per row.
template <typename T, int NV>
__device__ void masked_softmax(const T* scores, const float* mask, float scale, int rows,
                               int rows_per_batch, int width, T* probs) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int lane = threadIdx.x & 31;
    const T* x = scores + (size_t)row * width;
    const float* m = mask + (size_t)(row / rows_per_batch) * width;
    float v[NV];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        v[i] = j < width ? to_f(x[j]) * scale + m[j] : -INFINITY;
        mx = fmaxf(mx, v[i]);
    }
    mx = warp_max(mx);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        // exp(-inf - mx) is 0: masked keys and the lanes past the row end add nothing.
        v[i] = expf(v[i] - mx);
        s += v[i];
    }
    const float inv = 1.f / warp_sum(s);
    T* out = probs + (size_t)row * width;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        if (j < width) out[j] = from_f<T>(v[i] * inv);
    }
}

// One block per token row of qkv [B*S, 3*Hd] (queries | keys | values, head h at columns
// h*D .. h*D+D-1 of each): adds the bias and writes q [B, H, S, D] and the token slots of
// k, v [B, H, Pmax + S, D].
template <typename T>
__device__ void split_tokens(const T* qkv, const T* bias, int seq, int heads, int head_dim,
                             int p_max, T* q, T* k, T* v) {
    constexpr int V = Pack<T>::N;
    const int hd = heads * head_dim, t = p_max + seq;
    const int row = blockIdx.x, b = row / seq, s = row - b * seq;
    const Pack<T>* src = reinterpret_cast<const Pack<T>*>(qkv + (size_t)row * 3 * hd);
    const Pack<T>* bsrc = reinterpret_cast<const Pack<T>*>(bias);
    const int per_head = head_dim / V, per_part = hd / V;
    for (int c = threadIdx.x; c < 3 * per_part; c += blockDim.x) {
        Pack<T> x = src[c];
        const Pack<T> bb = bsrc[c];
#pragma unroll
        for (int j = 0; j < V; j++) x.v[j] = from_f<T>(to_f(x.v[j]) + to_f(bb.v[j]));
        const int which = c / per_part, cc = c - which * per_part;
        const int h = cc / per_head, dp = cc - h * per_head;
        const size_t bh = (size_t)b * heads + h;
        T* dst = which == 0 ? q + (bh * seq + s) * head_dim
                            : (which == 1 ? k : v) + (bh * t + p_max + s) * head_dim;
        reinterpret_cast<Pack<T>*>(dst)[dp] = x;
    }
}

// One block per (row, head). row_ptr[b] points at row b's task prefix, [L, 2, H, P_b, D] with
// P_b = row_p[b]. Writes layer `layer`'s prefix keys and values right-aligned into slots
// 0 .. Pmax-1 of k and v, and zeros into the slots left of a shorter prefix (the key mask hides
// them, but 0 · NaN would not be 0).
template <typename T>
__device__ void split_prefix(const uint64_t* row_ptr, const int* row_p, int layer, int seq,
                             int heads, int head_dim, int p_max, T* k, T* v) {
    constexpr int V = Pack<T>::N;
    const int bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int t = p_max + seq, pb = row_p[b];
    const T* src = reinterpret_cast<const T*>(row_ptr[b]);
    const int per_head = head_dim / V, per_kv = p_max * per_head;
    for (int c = threadIdx.x; c < 2 * per_kv; c += blockDim.x) {
        const int kv = c / per_kv, r = c - kv * per_kv;
        const int p = r / per_head, dp = r - p * per_head;
        const int off = p - (p_max - pb);
        Pack<T> val;
#pragma unroll
        for (int j = 0; j < V; j++) val.v[j] = from_f<T>(0.f);
        if (off >= 0)
            val = reinterpret_cast<const Pack<T>*>(
                src + ((((size_t)layer * 2 + kv) * heads + h) * pb + off) * head_dim)[dp];
        T* dst = (kv == 0 ? k : v) + ((size_t)bh * t + p) * head_dim;
        reinterpret_cast<Pack<T>*>(dst)[dp] = val;
    }
}

// One block per token row: ctx [B, H, S, D] → out [B*S, H*D].
template <typename T>
__device__ void merge_heads(const T* ctx, int seq, int heads, int head_dim, T* out) {
    constexpr int V = Pack<T>::N;
    const int row = blockIdx.x, b = row / seq, s = row - b * seq;
    const int per_head = head_dim / V;
    Pack<T>* dst = reinterpret_cast<Pack<T>*>(out + (size_t)row * heads * head_dim);
    for (int c = threadIdx.x; c < heads * per_head; c += blockDim.x) {
        const int h = c / per_head, dp = c - h * per_head;
        dst[c] = reinterpret_cast<const Pack<T>*>(
            ctx + (((size_t)b * heads + h) * seq + s) * head_dim)[dp];
    }
}

// One block per row: out = gelu(x + bias), exact erf form.
template <typename T>
__device__ void bias_gelu(const T* x, const T* bias, int cols, T* out) {
    constexpr int V = Pack<T>::N;
    const size_t base = (size_t)blockIdx.x * cols;
    const Pack<T>* xs = reinterpret_cast<const Pack<T>*>(x + base);
    const Pack<T>* bs = reinterpret_cast<const Pack<T>*>(bias);
    Pack<T>* os = reinterpret_cast<Pack<T>*>(out + base);
    for (int c = threadIdx.x; c < cols / V; c += blockDim.x) {
        Pack<T> a = xs[c];
        const Pack<T> bb = bs[c];
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float u = to_f(a.v[j]) + to_f(bb.v[j]);
            a.v[j] = from_f<T>(0.5f * u * (1.f + erff(u * 0.70710678118654752f)));
        }
        os[c] = a;
    }
}

// Row-per-warp kernels, one instance per NV (values per lane: rows up to 32 * NV wide).
#define ROW_KERNELS(T, SUF, NV)                                                                  \
    extern "C" __global__ void embed_ln_##NV##_##SUF(                                            \
        const uint32_t* ids, const uint32_t* types, const uint32_t* positions, const T* word,    \
        const T* type_emb, const T* pos_emb, const T* gamma, const T* beta, float eps, int rows, \
        int n, T* out) {                                                                         \
        embed_ln<T, NV>(ids, types, positions, word, type_emb, pos_emb, gamma, beta, eps, rows,  \
                        n, out);                                                                 \
    }                                                                                            \
    extern "C" __global__ void bias_residual_ln_##NV##_##SUF(                                    \
        const T* x, const T* bias, const T* residual, const T* gamma, const T* beta, float eps,  \
        int rows, int n, T* out) {                                                               \
        bias_residual_ln<T, NV>(x, bias, residual, gamma, beta, eps, rows, n, out);              \
    }                                                                                            \
    extern "C" __global__ void masked_softmax_##NV##_##SUF(const T* scores, const float* mask,   \
                                                           float scale, int rows,                \
                                                           int rows_per_batch, int width,        \
                                                           T* probs) {                           \
        masked_softmax<T, NV>(scores, mask, scale, rows, rows_per_batch, width, probs);          \
    }

#define INSTANTIATE(T, SUF)                                                                      \
    ROW_KERNELS(T, SUF, 1)                                                                       \
    ROW_KERNELS(T, SUF, 2)                                                                       \
    ROW_KERNELS(T, SUF, 4)                                                                       \
    ROW_KERNELS(T, SUF, 8)                                                                       \
    ROW_KERNELS(T, SUF, 12)                                                                      \
    ROW_KERNELS(T, SUF, 16)                                                                      \
    ROW_KERNELS(T, SUF, 24)                                                                      \
    ROW_KERNELS(T, SUF, 32)                                                                      \
    extern "C" __global__ void bias_gelu_##SUF(const T* x, const T* bias, int cols, T* out) {    \
        bias_gelu<T>(x, bias, cols, out);                                                        \
    }                                                                                            \
    extern "C" __global__ void split_tokens_##SUF(const T* qkv, const T* bias, int seq,          \
                                                  int heads, int head_dim, int p_max, T* q,      \
                                                  T* k, T* v) {                                  \
        split_tokens<T>(qkv, bias, seq, heads, head_dim, p_max, q, k, v);                        \
    }                                                                                            \
    extern "C" __global__ void split_prefix_##SUF(const uint64_t* row_ptr, const int* row_p,     \
                                                  int layer, int seq, int heads, int head_dim,   \
                                                  int p_max, T* k, T* v) {                       \
        split_prefix<T>(row_ptr, row_p, layer, seq, heads, head_dim, p_max, k, v);               \
    }                                                                                            \
    extern "C" __global__ void merge_heads_##SUF(const T* ctx, int seq, int heads, int head_dim, \
                                                 T* out) {                                       \
        merge_heads<T>(ctx, seq, heads, head_dim, out);                                          \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

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
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++) {
        const int j = lane + 32 * i;
        v[i] = j < n ? xr[j] : 0.f;
        g[i] = j < n ? dr[j] * gamma[j] : 0.f;
        s += v[i];
    }
    const float mean = warp_sum(s) / n;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < NV; i++)
        if (lane + 32 * i < n) {
            const float d = v[i] - mean;
            q += d * d;
        }
    const float inv = rsqrtf(warp_sum(q) / n + eps);
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

// Fused attention for half precision on the tensor cores, FlashAttention-2 style, D = 32 or 64.
//
// Why: through cuBLAS, q·Kᵀ and probs·V are thousands of 128×148×32 products that cuBLAS runs
// on an old WMMA kernel, and the [B, H, S, P+S] scores cross memory three times (written, read
// and written by the softmax, read again): 46% of a 512 × 128 bf16 batch (ncu, H200). Here the
// scores never leave registers, and queries, keys and values are read where they already are —
// the QKV matmul's rows (bias added on the way in) and each row's task prefix through its
// pointer — so the split kernels and their [B, H, ·, D] copies are not needed either.
//
// Layout: one block takes up to 64 queries of one (row, head) (128 with eight warps, an option),
// one warp per 16 of them. Keys go
// through shared memory 64 at a time, values transposed (so that both tensor-core operands are
// read as 32-bit words), rows padded by 8 elements so that a warp's 32 reads hit 32 banks. Each
// warp multiplies its queries by the chunk's keys with `mma.sync.m16n8k16` (f32 accumulators),
// keeps a running max and sum per query (online softmax, in base 2), rescales its output
// accumulators when the max grows, and feeds the probabilities — rounded to T, straight from the
// accumulator registers, whose layout is the next product's A operand — into probs·V. The output
// goes to merged-head rows [B·S, H·D] once, divided by the sum.
//
// (It replaces a WMMA version that computed the scores twice and staged them through shared
// memory: 0.84× of the batched-matmul path.)
namespace fa {
constexpr int QROWS = 16, CHUNK = 64, PAD = 8;
}

// C[16×8] += A[16×16] · B[16×8], f32 accumulators; A and B as mma.sync fragments of T pairs.
template <typename T> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                     "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&h);
    }
};

__device__ __forceinline__ uint32_t word(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Fragment coordinates (PTX ISA, mma.m16n8k16): lane = 4 g + t. A holds rows g and g + 8,
// columns 2t, 2t + 1 and 2t + 8, 2t + 9; B holds column g, rows 2t, 2t + 1 and 2t + 8, 2t + 9;
// C holds rows g and g + 8, columns 2t and 2t + 1.
// a + b of two T pairs, in f32, rounded once: what split_tokens stores.
template <typename T> __device__ __forceinline__ uint32_t add_word(const T* a, const T* b) {
    return Mma<T>::pack(to_f(a[0]) + to_f(b[0]), to_f(a[1]) + to_f(b[1]));
}

// qkv: [B·S, 3·H·D] (queries | keys | values), bias [3·H·D] not yet added; row_ptr[b]: row b's
// task prefix [L, 2, H, P_b, D] with P_b = row_p[b], right-aligned into the first p_max key slots;
// mask: [B, p_max + S] additive f32; out: [B·S, H·D].
template <typename T, int D>
__device__ void attention(const T* qkv, const T* bias, const uint64_t* row_ptr, const int* row_p,
                          int layer, const float* mask, float scale, int heads, int seq,
                          int p_max, T* out) {
    using namespace fa;
    constexpr int KS = D + PAD, VS = CHUNK + PAD, V = Pack<T>::N, NT = CHUNK / 8;
    __shared__ __align__(16) T ks[CHUNK * KS];
    __shared__ __align__(16) T vt[D * VS];
    __shared__ float ms[CHUNK];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int warps = blockDim.x >> 5;
    const int bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int q0 = (blockIdx.y * warps + warp) * QROWS;
    const int hd = heads * D, stride = 3 * hd, keys = p_max + seq;
    // Row b's tokens: queries at column h·D of each qkv row, keys at hd + h·D, values at 2hd + h·D.
    const T* tok = qkv + (size_t)b * seq * stride + h * D;
    const T* qbias = bias + h * D;
    // Row b's prefix for this layer and head, and where its first slot sits among the p_max.
    const int pb = row_p[b], first = p_max - pb;
    const T* pk = reinterpret_cast<const T*>(row_ptr[b]) + (((size_t)layer * 2 * heads + h) * pb) * D;
    const T* pv = pk + (size_t)heads * pb * D;
    const float* mb = mask + (size_t)b * keys;
    // Scores in base 2: exp(x) = exp2(x · log2 e); the mask is 0 or −∞, unchanged by the factor.
    const float sl2 = scale * 1.4426950408889634f;

    // This warp's queries as A fragments, straight from global memory (zeros past the end).
    uint32_t qa[D / 16][4];
    {
        const bool in0 = q0 + g < seq, in1 = q0 + g + 8 < seq;
        const T* r0 = tok + (size_t)(q0 + g) * stride + 2 * t;
        const T* r1 = r0 + (size_t)8 * stride;
        const T* bq = qbias + 2 * t;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            const int c = kk * 16;
            qa[kk][0] = in0 ? add_word(r0 + c, bq + c) : 0u;
            qa[kk][1] = in1 ? add_word(r1 + c, bq + c) : 0u;
            qa[kk][2] = in0 ? add_word(r0 + c + 8, bq + c + 8) : 0u;
            qa[kk][3] = in1 ? add_word(r1 + c + 8, bq + c + 8) : 0u;
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    // Running max (base 2) and this lane's part of the running sum, for rows g and g + 8.
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    for (int c0 = 0; c0 < keys; c0 += CHUNK) {
        __syncthreads(); // the previous chunk is no longer read
        for (int i = threadIdx.x; i < CHUNK * D / V; i += blockDim.x) {
            const int r = i / (D / V), c = i - r * (D / V), j = c0 + r;
            Pack<T> x, y;
            if (j >= p_max && j < keys) { // a token: the matmul's output plus the bias
                const T* row = tok + (size_t)(j - p_max) * stride + hd + c * V;
                x = *reinterpret_cast<const Pack<T>*>(row);
                y = *reinterpret_cast<const Pack<T>*>(row + hd);
                const Pack<T> bk = reinterpret_cast<const Pack<T>*>(qbias + hd)[c];
                const Pack<T> bv = reinterpret_cast<const Pack<T>*>(qbias + 2 * hd)[c];
#pragma unroll
                for (int e = 0; e < V; e++) {
                    x.v[e] = from_f<T>(to_f(x.v[e]) + to_f(bk.v[e]));
                    y.v[e] = from_f<T>(to_f(y.v[e]) + to_f(bv.v[e]));
                }
            } else if (j >= first && j < p_max) { // the row's prefix
                x = reinterpret_cast<const Pack<T>*>(pk + (size_t)(j - first) * D)[c];
                y = reinterpret_cast<const Pack<T>*>(pv + (size_t)(j - first) * D)[c];
            } else { // past the last key, or a slot left of a shorter prefix (masked): zeros,
                     // since 0 · NaN would not be 0
#pragma unroll
                for (int e = 0; e < V; e++) x.v[e] = y.v[e] = from_f<T>(0.f);
            }
            *reinterpret_cast<Pack<T>*>(ks + r * KS + c * V) = x;
#pragma unroll
            for (int j = 0; j < V; j++) vt[(c * V + j) * VS + r] = y.v[j];
        }
        for (int i = threadIdx.x; i < CHUNK; i += blockDim.x)
            ms[i] = c0 + i < keys ? mb[c0 + i] : -INFINITY;
        __syncthreads();

        // S = q·Kᵀ for 16 queries × 64 keys: NT tiles of 8 keys.
        float s[NT][4];
#pragma unroll
        for (int j = 0; j < NT; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            const T* kr = ks + (j * 8 + g) * KS + 2 * t;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++)
                Mma<T>::run(s[j], qa[kk], word(kr + kk * 16), word(kr + kk * 16 + 8));
        }
        // Scale, mask, and the chunk's row maxima (a row's four lanes are a quad).
        float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const float mk0 = ms[j * 8 + 2 * t], mk1 = ms[j * 8 + 2 * t + 1];
            s[j][0] = s[j][0] * sl2 + mk0;
            s[j][1] = s[j][1] * sl2 + mk1;
            s[j][2] = s[j][2] * sl2 + mk0;
            s[j][3] = s[j][3] * sl2 + mk1;
            x0 = fmaxf(x0, fmaxf(s[j][0], s[j][1]));
            x1 = fmaxf(x1, fmaxf(s[j][2], s[j][3]));
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, off));
            x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, off));
        }
        const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
        // While every key so far is masked the max is −∞; subtracting 0 instead keeps
        // exp2(−∞ − max) at 0 rather than NaN.
        const float b0 = n0 == -INFINITY ? 0.f : n0, b1 = n1 == -INFINITY ? 0.f : n1;
        const float a0 = exp2f(m0 - b0), a1 = exp2f(m1 - b1);
        m0 = n0, m1 = n1;
        l0 *= a0, l1 *= a1;
#pragma unroll
        for (int n = 0; n < D / 8; n++) o[n][0] *= a0, o[n][1] *= a0, o[n][2] *= a1, o[n][3] *= a1;

        // P = exp2(S − max), summed, and multiplied by V 16 keys (two S tiles) at a time.
#pragma unroll
        for (int kk = 0; kk < CHUNK / 16; kk++) {
            float p[2][4];
#pragma unroll
            for (int u = 0; u < 2; u++) {
                p[u][0] = exp2f(s[2 * kk + u][0] - b0);
                p[u][1] = exp2f(s[2 * kk + u][1] - b0);
                p[u][2] = exp2f(s[2 * kk + u][2] - b1);
                p[u][3] = exp2f(s[2 * kk + u][3] - b1);
                l0 += p[u][0] + p[u][1];
                l1 += p[u][2] + p[u][3];
            }
            const uint32_t pa[4] = {Mma<T>::pack(p[0][0], p[0][1]), Mma<T>::pack(p[0][2], p[0][3]),
                                    Mma<T>::pack(p[1][0], p[1][1]), Mma<T>::pack(p[1][2], p[1][3])};
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                const T* vr = vt + (n * 8 + g) * VS + kk * 16 + 2 * t;
                Mma<T>::run(o[n], pa, word(vr), word(vr + 8));
            }
        }
        // Chunks past the last key do not exist: c0 + CHUNK >= keys ends the loop.
    }

#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    // Every real row attends at least its [CLS] token, so l > 0; a guard for the rows past the end.
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* out0 = out + ((size_t)b * seq + q0 + g) * hd + h * D + 2 * t;
    T* out1 = out0 + (size_t)8 * hd;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        if (q0 + g < seq)
            *reinterpret_cast<uint32_t*>(out0 + n * 8) = Mma<T>::pack(o[n][0] * i0, o[n][1] * i0);
        if (q0 + g + 8 < seq)
            *reinterpret_cast<uint32_t*>(out1 + n * 8) = Mma<T>::pack(o[n][2] * i1, o[n][3] * i1);
    }
}

#define ATTENTION(T, SUF, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) attention_##D##_##SUF(                     \
        const T* qkv, const T* bias, const uint64_t* row_ptr, const int* row_p, int layer,       \
        const float* mask, float scale, int heads, int seq, int p_max, T* out) {                 \
        attention<T, D>(qkv, bias, row_ptr, row_p, layer, mask, scale, heads, seq, p_max, out); \
    }
ATTENTION(__half, f16, 32)
ATTENTION(__half, f16, 64)
ATTENTION(__nv_bfloat16, bf16, 32)
ATTENTION(__nv_bfloat16, bf16, 64)
