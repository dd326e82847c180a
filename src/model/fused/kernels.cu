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
//   attention           (half precision, opt-in) q·Kᵀ, scale, mask, softmax and ·V on the tensor
//                       cores in one kernel, written straight into merged-head rows
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
#include <mma.h>
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

// Fused attention for half precision on the tensor cores (WMMA, sm_80+), D = 32 or 64.
//
// Why: through cuBLAS, q·Kᵀ and probs·V are thousands of 128×148×32 products that cuBLAS runs
// on an old WMMA kernel, and the [B, H, S, P+S] scores cross memory three times (written, read
// and written by the softmax, read again): 45% of a 512 × 128 bf16 batch (ncu, H200). Here one
// block takes 64 queries of one (row, head); each warp owns 16 of them. Keys and values go
// through shared memory 64 at a time. Pass 1 computes the scores to find each query's max and
// sum; pass 2 recomputes them, forms the probabilities (f32, rounded to T once, as PyTorch's
// kernels do) and accumulates probs·V in tensor-core fragments, so nothing needs rescaling. The
// output goes straight to merged-head rows [B·S, H·D].
namespace fa {
constexpr int WARPS = 4, QROWS = 16, CHUNK = 64;
}

template <typename T, int D>
__device__ void attention(const T* q, const T* k, const T* v, const float* mask, float scale,
                          int heads, int seq, int keys, T* out) {
    using namespace nvcuda;
    using namespace fa;
    __shared__ __align__(32) T ks[CHUNK * D];
    __shared__ __align__(32) T vs[CHUNK * D];
    __shared__ __align__(32) T qs[WARPS][QROWS * D];
    __shared__ __align__(32) T ps[WARPS][QROWS * CHUNK];
    __shared__ __align__(32) float ss[WARPS][QROWS * CHUNK];
    constexpr int V = Pack<T>::N;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int q0 = blockIdx.y * WARPS * QROWS + warp * QROWS;
    const T* qb = q + (size_t)bh * seq * D;
    const T* kb = k + (size_t)bh * keys * D;
    const T* vb = v + (size_t)bh * keys * D;
    const float* mb = mask + (size_t)b * keys;

    // Stage this warp's 16 queries (zeros past the sequence end).
    for (int i = lane; i < QROWS * D / V; i += 32) {
        const int r = i / (D / V), c = i - r * (D / V);
        Pack<T> x;
        if (q0 + r < seq) {
            x = reinterpret_cast<const Pack<T>*>(qb + (size_t)(q0 + r) * D)[c];
        } else {
#pragma unroll
            for (int j = 0; j < V; j++) x.v[j] = from_f<T>(0.f);
        }
        reinterpret_cast<Pack<T>*>(qs[warp] + r * D)[c] = x;
    }
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa[D / 16];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) wmma::load_matrix_sync(qa[kk], qs[warp] + kk * 16, D);

    // Loads keys (and values) c0 .. c0+63 into shared memory, zeros past the last key.
    auto load_chunk = [&](int c0, bool values) {
        for (int i = threadIdx.x; i < CHUNK * D / V; i += blockDim.x) {
            const int r = i / (D / V), c = i - r * (D / V);
            Pack<T> x, y;
            if (c0 + r < keys) {
                x = reinterpret_cast<const Pack<T>*>(kb + (size_t)(c0 + r) * D)[c];
                if (values) y = reinterpret_cast<const Pack<T>*>(vb + (size_t)(c0 + r) * D)[c];
            } else {
#pragma unroll
                for (int j = 0; j < V; j++) x.v[j] = y.v[j] = from_f<T>(0.f);
            }
            reinterpret_cast<Pack<T>*>(ks + r * D)[c] = x;
            if (values) reinterpret_cast<Pack<T>*>(vs + r * D)[c] = y;
        }
    };
    // This warp's 16 × 64 raw scores q·Kᵀ for the chunk in shared memory, into ss[warp].
    auto scores = [&]() {
#pragma unroll
        for (int j = 0; j < CHUNK / 16; j++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                // K is [key, D] row-major: as Kᵀ it is column-major with leading dimension D.
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, ks + j * 16 * D + kk * 16, D);
                wmma::mma_sync(acc, qa[kk], kf, acc);
            }
            wmma::store_matrix_sync(ss[warp] + j * 16, acc, CHUNK, wmma::mem_row_major);
        }
        __syncwarp();
    };
    // Softmax statistics, lane = column: a warp walks its 16 rows, each lane reading columns
    // `lane` and `lane + 32` (consecutive lanes, consecutive banks), reducing across the warp.
    // Every lane ends up holding every row's max and sum (registers: the loops are unrolled).
    // (A first version gave each row two lanes and 32 columns each: every shared-memory read
    // was a 32-way bank conflict, and the kernel ran at half the speed of cuBLAS + softmax.)
    float m[QROWS], l[QROWS];
#pragma unroll
    for (int r = 0; r < QROWS; r++) m[r] = -INFINITY, l[r] = 0.f;
    for (int c0 = 0; c0 < keys; c0 += CHUNK) {
        __syncthreads();
        load_chunk(c0, false);
        __syncthreads();
        scores();
        const float mk0 = c0 + lane < keys ? mb[c0 + lane] : -INFINITY;
        const float mk1 = c0 + 32 + lane < keys ? mb[c0 + 32 + lane] : -INFINITY;
#pragma unroll
        for (int r = 0; r < QROWS; r++) {
            const float s0 = ss[warp][r * CHUNK + lane] * scale + mk0;
            const float s1 = ss[warp][r * CHUNK + 32 + lane] * scale + mk1;
            const float cm = warp_max(fmaxf(s0, s1));
            if (cm == -INFINITY) continue; // the whole chunk masked for every query
            const float nm = fmaxf(m[r], cm);
            l[r] = l[r] * expf(m[r] - nm) + warp_sum(expf(s0 - nm) + expf(s1 - nm));
            m[r] = nm;
        }
        __syncwarp();
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[D / 16];
#pragma unroll
    for (int n = 0; n < D / 16; n++) wmma::fill_fragment(o[n], 0.f);
    for (int c0 = 0; c0 < keys; c0 += CHUNK) {
        __syncthreads();
        load_chunk(c0, true);
        __syncthreads();
        scores();
        const float mk0 = c0 + lane < keys ? mb[c0 + lane] : -INFINITY;
        const float mk1 = c0 + 32 + lane < keys ? mb[c0 + 32 + lane] : -INFINITY;
#pragma unroll
        for (int r = 0; r < QROWS; r++) {
            const float inv = 1.f / l[r];
            const float s0 = ss[warp][r * CHUNK + lane] * scale + mk0;
            const float s1 = ss[warp][r * CHUNK + 32 + lane] * scale + mk1;
            ps[warp][r * CHUNK + lane] = from_f<T>(expf(s0 - m[r]) * inv);
            ps[warp][r * CHUNK + 32 + lane] = from_f<T>(expf(s1 - m[r]) * inv);
        }
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < CHUNK / 16; kk++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
            wmma::load_matrix_sync(pf, ps[warp] + kk * 16, CHUNK);
#pragma unroll
            for (int n = 0; n < D / 16; n++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
                wmma::load_matrix_sync(vf, vs + kk * 16 * D + n * 16, D);
                wmma::mma_sync(o[n], pf, vf, o[n]);
            }
        }
    }
    // Out through shared memory into merged-head rows.
    __syncwarp();
#pragma unroll
    for (int n = 0; n < D / 16; n++)
        wmma::store_matrix_sync(ss[warp] + n * 16, o[n], D, wmma::mem_row_major);
    __syncwarp();
    const int hd = heads * D;
    for (int i = lane; i < QROWS * D; i += 32) {
        const int r = i / D, c = i - r * D;
        if (q0 + r < seq)
            out[((size_t)b * seq + q0 + r) * hd + h * D + c] = from_f<T>(ss[warp][r * D + c]);
    }
}

#define ATTENTION(T, SUF, D)                                                                     \
    extern "C" __global__ void __launch_bounds__(fa::WARPS * 32) attention_##D##_##SUF(         \
        const T* q, const T* k, const T* v, const float* mask, float scale, int heads, int seq, \
        int keys, T* out) {                                                                      \
        attention<T, D>(q, k, v, mask, scale, heads, seq, keys, out);                           \
    }
ATTENTION(__half, f16, 32)
ATTENTION(__half, f16, 64)
ATTENTION(__nv_bfloat16, bf16, 32)
ATTENTION(__nv_bfloat16, bf16, 64)
