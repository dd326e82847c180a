#pragma once

#include "common.cuh"

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
// one warp per 16 of them. Keys go through shared memory 64 at a time, values transposed (so that
// both tensor-core operands are read as 32-bit words), rows padded by 8 elements so that a warp's
// 32 reads hit 32 banks. Each warp multiplies its queries by the chunk's keys with
// `mma.sync.m16n8k16` (f32 accumulators), keeps a running max and sum per query (online softmax,
// in base 2), rescales its output accumulators when the max grows, and feeds the probabilities —
// rounded to T, straight from the accumulator registers, whose layout is the next product's A
// operand — into probs·V. The output goes to merged-head rows [B·S, H·D] once, divided by the sum.
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

__device__ __forceinline__ uint32_t word(const void* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

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
