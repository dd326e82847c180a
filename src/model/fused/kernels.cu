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

// The training kernels are in kernels/train.cuh and the attention kernel in kernels/attention.cuh,
// included at the end: nvcc compiles this one file into the one PTX module the binary loads.

#include "kernels/common.cuh"

// LayerNorm of one row held in a warp's registers (v[i] is element lane + 32 i), stored as T.
template <typename T, int NV>
__device__ __forceinline__ void ln_store(float (&v)[NV], int n, const T* gamma, const T* beta,
                                         float eps, T* out) {
    const int lane = threadIdx.x & 31;
    float mean, inv;
    row_stats<NV>(v, n, eps, mean, inv);
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
            float mean, inv;
            row_stats<NV>(v, n, eps, mean, inv);
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

#include "kernels/train.cuh"
#include "kernels/attention.cuh"
