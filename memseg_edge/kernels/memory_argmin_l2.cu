// MemSeg's memory-bank step, fused (issues 4 and 14; docs/architecture.md "Fused kernel").
//
// Per level l (1 to 3): features x_l [N, D_l] and bank b_l [M, D_l] (D_l = C_l * H_l * W_l, row major, i.e.
// NCHW flattened). Outputs: idx [N] (selection "sum": argmin_m sum_l |x_l[n] - b_l[m]|^2) or [N, L]
// ("per_level": argmin per level), int32; diff_l [N, D_l] = (x_l - b_l[idx])^2. I/O in float or half (half
// carried as its bits and converted with cvt, so no header is needed); all arithmetic and accumulation in
// float, the final sums over the partials in double. reference.py is the definition.
//
// Selection semantics (identical in reference.py): ties go to the lowest m, as numpy's argmin; a NaN
// distance counts as the smallest (numpy and torch argmin return the first NaN), so a NaN anywhere in an
// image's features selects sample 0 and a NaN in bank sample m selects m for every image (the first such m).
//
// Two launches on one stream:
//   1. memseg_l2_<io>_t<TILE>   grid (m-groups, parts, ceil(N / TILE)), MEMSEG_BLOCK threads.
//      A part is a run of slabs inside one level; a slab is MEMSEG_BLOCK x ROWS x (16-byte vectors) elements.
//      The block loads the TILE images' features of a slab into registers once, then streams its group of
//      bank samples through them: every bank element is read from DRAM once for the whole tile (batch
//      <= 32: once per call). The TILE sums of each (sample, warp) are reduced with a warp transpose-
//      reduction (TILE - 1 + log2(32 / TILE) shuffles for TILE values) into shared accumulators; one float
//      per (image, sample, part) goes to the workspace. TILE is a template parameter chosen at launch
//      (1, 2, 4, 8, 16, 32): images past N in the last tile repeat image N - 1 (no predicate in the inner
//      loop) and their sums are not stored.
//   2. memseg_select_diff_<io>  grid (chunks of all levels, N). Every block sums the partials of its image
//      (double, fixed order, so every block of an image picks the same sample), picks the argmin, writes
//      the index once (first chunk of the level), then writes (x - b[idx])^2 for its chunk.
// Levels whose rows are 16-byte aligned (D_l a multiple of the vector, pointers aligned: vec_mask) use
// 16-byte loads and stores; the others the same element layout with scalar accesses.
//
// Memory traffic (bytes, s = element size), batch N <= 32:
//   launch 1: bank M * D * s once + features N * D * s (DRAM once; the m-groups of a part share it in L2)
//   launch 2: N * D * s (x) + N * D * s (chosen bank rows, L2 when the bank fits) + N * D * s (writes)
//   partials: N * M * parts * 4 written once, read once per launch-2 block (L2)

#define MEMSEG_BLOCK 256
#define MEMSEG_WARPS 8            // MEMSEG_BLOCK / 32
#define MEMSEG_ACC_SLOTS 1024     // (samples per group) x TILE; shared accumulators 8 warps x 1024 x 4 B = 32 KB
// ROWS: 16-byte vectors per thread and image in a slab (the features held in registers: TILE x ROWS x 4 words)
#define MEMSEG_ROWS_T1 8
#define MEMSEG_ROWS_T2 8
#define MEMSEG_ROWS_T4 4
#define MEMSEG_ROWS_T8 2
#define MEMSEG_ROWS_T16 1
#define MEMSEG_ROWS_T32 1

typedef unsigned short memseg_half;   // IEEE binary16 bits

// ---------------------------------------------------------------------------------------------- element I/O

#ifndef MEMSEG_HOST_EMULATION   // host_emulation.h defines these five for the CPU replay in the tests
__device__ __forceinline__ float memseg_h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
// The features' conversion sits inside the loop over samples on purpose: volatile keeps the compiler from
// hoisting it out (TILE x ROWS x 8 floats would not fit in registers; packed halves do).
__device__ __forceinline__ float memseg_h2f_kept(unsigned short h) {
    float f;
    asm volatile("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short memseg_f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// 16 bytes through the read-only path (features, chosen bank rows) or streamed (the bank in launch 1: read
// once, evict first, so the features and partials stay in L2).
__device__ __forceinline__ void memseg_ld16(const void* p, unsigned int (&w)[4]) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
__device__ __forceinline__ void memseg_ld16_stream(const void* p, unsigned int (&w)[4]) {
    asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p));
}
__device__ __forceinline__ void memseg_st16_stream(void* p, const unsigned int (&w)[4]) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                 "r"(w[3]) : "memory");
}
#endif

template <typename IO> struct memseg_io;

template <> struct memseg_io<float> {
    static constexpr int E = 4;   // elements per 16 bytes
    static __device__ __forceinline__ float get(const unsigned int (&w)[4], int j) { return __uint_as_float(w[j]); }
    static __device__ __forceinline__ float get_kept(const unsigned int (&w)[4], int j) { return get(w, j); }
    static __device__ __forceinline__ unsigned int bits(const float* p) { return __float_as_uint(*p); }
    static __device__ __forceinline__ void put_word(unsigned int (&w)[4], int j, unsigned int v) { w[j] = v; }
    static __device__ __forceinline__ void store1(float* p, float v) { *p = v; }
    static __device__ __forceinline__ void set(unsigned int (&w)[4], int j, float v) { w[j] = __float_as_uint(v); }
};

template <> struct memseg_io<memseg_half> {
    static constexpr int E = 8;
    static __device__ __forceinline__ unsigned short half_of(const unsigned int (&w)[4], int j) {
        return (unsigned short)(w[j >> 1] >> ((j & 1) * 16));
    }
    static __device__ __forceinline__ float get(const unsigned int (&w)[4], int j) { return memseg_h2f(half_of(w, j)); }
    static __device__ __forceinline__ float get_kept(const unsigned int (&w)[4], int j) {
        return memseg_h2f_kept(half_of(w, j));
    }
    static __device__ __forceinline__ unsigned int bits(const memseg_half* p) { return *p; }
    static __device__ __forceinline__ void put_word(unsigned int (&w)[4], int j, unsigned int v) {
        w[j >> 1] |= (v & 0xffffu) << ((j & 1) * 16);
    }
    static __device__ __forceinline__ void store1(memseg_half* p, float v) { *p = memseg_f2h(v); }
    static __device__ __forceinline__ void set(unsigned int (&w)[4], int j, float v) {
        const unsigned int h = memseg_f2h(v);
        if (j & 1) w[j >> 1] = (w[j >> 1] & 0xffffu) | (h << 16);
        else w[j >> 1] = (w[j >> 1] & 0xffff0000u) | h;
    }
};

// E elements of one row starting at pos (a multiple of E): one 16-byte load (VEC) or E scalar loads
// (elements at or past end read as 0, which adds nothing to a distance).
template <typename IO, bool VEC, bool STREAM>
__device__ __forceinline__ void memseg_load(const IO* row, long long pos, long long end, unsigned int (&w)[4]) {
    typedef memseg_io<IO> io;
    if (VEC) {
        if (pos < end) {
            if (STREAM) memseg_ld16_stream(row + pos, w);
            else memseg_ld16(row + pos, w);
        } else {
            w[0] = w[1] = w[2] = w[3] = 0u;
        }
    } else {
        w[0] = w[1] = w[2] = w[3] = 0u;
#pragma unroll
        for (int j = 0; j < io::E; ++j)
            if (pos + j < end) io::put_word(w, j, io::bits(row + pos + j));
    }
}

// Lanes hold v[0..TILE); afterwards lane L holds the warp's total of v[L % TILE]. Each round (width W =
// TILE/2, ..., 1) halves the values a lane carries: it keeps one half, sends the other to its partner
// (lane ^ W) and adds what comes back. Recursion over W keeps every index a compile-time constant.
template <int W>
struct memseg_transpose_round {
    template <int TILE>
    static __device__ __forceinline__ void run(float (&v)[TILE], int lane) {
        const bool upper = (lane & W) != 0;
#pragma unroll
        for (int i = 0; i < W; ++i) {
            const float send = upper ? v[i] : v[i + W];
            const float keep = upper ? v[i + W] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, W);
        }
        memseg_transpose_round<W / 2>::run(v, lane);
    }
};
template <>
struct memseg_transpose_round<0> {
    template <int TILE>
    static __device__ __forceinline__ void run(float (&)[TILE], int) {}
};

template <int TILE>
__device__ __forceinline__ float memseg_warp_transpose_sum(float (&v)[TILE], int lane) {
    memseg_transpose_round<TILE / 2>::run(v, lane);
    float s = v[0];
#pragma unroll
    for (int off = TILE; off < 32; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}

// ----------------------------------------------------------------------------------------- launch 1

template <typename IO, int TILE, int ROWS, bool VEC>
__device__ __forceinline__ void memseg_l2_part(const IO* x, const IO* b, long long d, long long begin, long long end,
                                               int n0, int n_images, int m0, int m1,
                                               float (*acc)[MEMSEG_ACC_SLOTS]) {
    typedef memseg_io<IO> io;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long slab = (long long)MEMSEG_BLOCK * ROWS * io::E;
    for (long long s0 = begin; s0 < end; s0 += slab) {
        unsigned int xf[TILE][ROWS][4];
#pragma unroll
        for (int t = 0; t < TILE; ++t) {
            const int n = n0 + t < n_images ? n0 + t : n_images - 1;
            const IO* row = x + (long long)n * d;
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                memseg_load<IO, VEC, false>(row, s0 + ((long long)r * MEMSEG_BLOCK + threadIdx.x) * io::E, end,
                                            xf[t][r]);
        }
#pragma unroll 1
        for (int m = m0; m < m1; ++m) {
            const IO* bm = b + (long long)m * d;
            unsigned int bw[ROWS][4];
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
                memseg_load<IO, VEC, true>(bm, s0 + ((long long)r * MEMSEG_BLOCK + threadIdx.x) * io::E, end, bw[r]);
            float sum[TILE];
#pragma unroll
            for (int t = 0; t < TILE; ++t) sum[t] = 0.f;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
#pragma unroll
                for (int j = 0; j < io::E; ++j) {
                    const float bv = io::get(bw[r], j);
#pragma unroll
                    for (int t = 0; t < TILE; ++t) {
                        const float diff = io::get_kept(xf[t][r], j) - bv;
                        sum[t] = fmaf(diff, diff, sum[t]);
                    }
                }
            }
            const float total = memseg_warp_transpose_sum<TILE>(sum, lane);
            if (lane < TILE) acc[warp][(m - m0) * TILE + lane] += total;   // this warp's column only
        }
    }
}

template <typename IO, int TILE, int ROWS>
__device__ __forceinline__ void memseg_l2(const IO* x0, const IO* x1, const IO* x2, const IO* b0, const IO* b1,
                                          const IO* b2, long long d0, long long d1, long long d2, int p1, int p2,
                                          int n_parts, int spp0, int spp1, int spp2, int vec_mask, int n_images,
                                          int n_samples, int m_per_group, float* partial) {
    __shared__ float acc[MEMSEG_WARPS][MEMSEG_ACC_SLOTS];
    typedef memseg_io<IO> io;
    const int part = blockIdx.y;
    const int level = part < p1 ? 0 : (part < p2 ? 1 : 2);
    const int local = part - (level == 0 ? 0 : (level == 1 ? p1 : p2));
    const IO* x = level == 0 ? x0 : (level == 1 ? x1 : x2);
    const IO* b = level == 0 ? b0 : (level == 1 ? b1 : b2);
    const long long d = level == 0 ? d0 : (level == 1 ? d1 : d2);
    const int spp = level == 0 ? spp0 : (level == 1 ? spp1 : spp2);
    const long long span = (long long)spp * MEMSEG_BLOCK * ROWS * io::E;
    const long long begin = (long long)local * span;
    const long long end = begin + span < d ? begin + span : d;
    const int m0 = blockIdx.x * m_per_group;
    const int m1 = m0 + m_per_group < n_samples ? m0 + m_per_group : n_samples;
    const int n0 = blockIdx.z * TILE;
    const int used = (m1 - m0) * TILE;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int s = lane; s < used; s += 32) acc[warp][s] = 0.f;
    __syncwarp();
    if ((vec_mask >> level) & 1) memseg_l2_part<IO, TILE, ROWS, true>(x, b, d, begin, end, n0, n_images, m0, m1, acc);
    else memseg_l2_part<IO, TILE, ROWS, false>(x, b, d, begin, end, n0, n_images, m0, m1, acc);
    __syncthreads();
    for (int s = threadIdx.x; s < used; s += MEMSEG_BLOCK) {
        const int t = s % TILE;
        const int n = n0 + t;
        if (n >= n_images) continue;
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < MEMSEG_WARPS; ++w) total += acc[w][s];
        partial[((long long)n * n_samples + m0 + s / TILE) * n_parts + part] = total;
    }
}

// ----------------------------------------------------------------------------------------- launch 2

// (a, ia) before (b, ib)? NaN first (numpy argmin), then the smaller value, then the lower index; -1: none.
__device__ __forceinline__ bool memseg_before(double a, int ia, double b, int ib) {
    if (ia < 0) return false;
    if (ib < 0) return true;
    const bool an = a != a, bn = b != b;
    if (an || bn) return an && (!bn || ia < ib);
    return a < b || (a == b && ia < ib);
}

template <typename IO, bool VEC>
__device__ __forceinline__ void memseg_diff_chunk(const IO* x, const IO* bm, IO* y, long long begin, long long end) {
    typedef memseg_io<IO> io;
    if (VEC) {
#pragma unroll 4
        for (long long e = begin + (long long)threadIdx.x * io::E; e < end; e += (long long)MEMSEG_BLOCK * io::E) {
            unsigned int xw[4], bw[4], yw[4] = {0u, 0u, 0u, 0u};
            memseg_ld16(x + e, xw);
            memseg_ld16(bm + e, bw);
#pragma unroll
            for (int j = 0; j < io::E; ++j) {
                const float diff = io::get(xw, j) - io::get(bw, j);
                io::set(yw, j, diff * diff);
            }
            memseg_st16_stream(y + e, yw);
        }
    } else {
        for (long long e = begin + threadIdx.x; e < end; e += MEMSEG_BLOCK) {
            unsigned int xw[4] = {io::bits(x + e), 0u, 0u, 0u}, bw[4] = {io::bits(bm + e), 0u, 0u, 0u};
            const float diff = io::get(xw, 0) - io::get(bw, 0);
            io::store1(y + e, diff * diff);
        }
    }
}

template <typename IO>
__device__ __forceinline__ void memseg_select_diff(const IO* x0, const IO* x1, const IO* x2, const IO* b0,
                                                   const IO* b1, const IO* b2, IO* y0, IO* y1, IO* y2, long long d0,
                                                   long long d1, long long d2, int p1, int p2, int n_parts, int q1,
                                                   int q2, int chunk_elems, int vec_mask, int n_levels, int per_level,
                                                   int n_samples, const float* partial, int* index) {
    __shared__ double warp_val[MEMSEG_WARPS];
    __shared__ int warp_idx[MEMSEG_WARPS];
    const int n = blockIdx.y;
    const int chunk = blockIdx.x;
    const int level = chunk < q1 ? 0 : (chunk < q2 ? 1 : 2);
    const int local = chunk - (level == 0 ? 0 : (level == 1 ? q1 : q2));
    const int first[4] = {0, p1, p2, n_parts};
    const int pa = per_level ? first[level] : 0;
    const int pb = per_level ? first[level + 1] : n_parts;

    // The argmin over samples of this image's summed partials (every block of the image computes the same).
    double best = 0.0;
    int best_m = -1;
    for (int m = threadIdx.x; m < n_samples; m += MEMSEG_BLOCK) {
        const float* p = partial + ((long long)n * n_samples + m) * n_parts;
        double s = 0.0;
        for (int q = pa; q < pb; ++q) s += (double)p[q];
        if (memseg_before(s, m, best, best_m)) { best = s; best_m = m; }
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    for (int off = 16; off > 0; off >>= 1) {
        const double v = __shfl_xor_sync(0xffffffffu, best, off);
        const int i = __shfl_xor_sync(0xffffffffu, best_m, off);
        if (memseg_before(v, i, best, best_m)) { best = v; best_m = i; }
    }
    if (lane == 0) { warp_val[warp] = best; warp_idx[warp] = best_m; }
    __syncthreads();
    best = warp_val[0];
    best_m = warp_idx[0];
    for (int w = 1; w < MEMSEG_WARPS; ++w)
        if (memseg_before(warp_val[w], warp_idx[w], best, best_m)) { best = warp_val[w]; best_m = warp_idx[w]; }
    const int m = best_m < 0 ? 0 : best_m;
    if (local == 0 && threadIdx.x == 0) {
        if (per_level) index[n * n_levels + level] = m;
        else if (level == 0) index[n] = m;
    }

    const IO* x = level == 0 ? x0 : (level == 1 ? x1 : x2);
    const IO* b = level == 0 ? b0 : (level == 1 ? b1 : b2);
    IO* y = level == 0 ? y0 : (level == 1 ? y1 : y2);
    const long long d = level == 0 ? d0 : (level == 1 ? d1 : d2);
    const long long begin = (long long)local * chunk_elems;
    const long long end = begin + chunk_elems < d ? begin + chunk_elems : d;
    const long long row = (long long)n * d;
    if ((vec_mask >> level) & 1) memseg_diff_chunk<IO, true>(x + row, b + (long long)m * d, y + row, begin, end);
    else memseg_diff_chunk<IO, false>(x + row, b + (long long)m * d, y + row, begin, end);
}

// ----------------------------------------------------------------------------------------- entry points

#define MEMSEG_L2_ENTRY(NAME, IO, TILE, ROWS)                                                                   \
    extern "C" __global__ void __launch_bounds__(MEMSEG_BLOCK) NAME(                                            \
        const IO* x0, const IO* x1, const IO* x2, const IO* b0, const IO* b1, const IO* b2, long long d0,       \
        long long d1, long long d2, int p1, int p2, int n_parts, int spp0, int spp1, int spp2, int vec_mask,    \
        int n_images, int n_samples, int m_per_group, float* partial) {                                         \
        memseg_l2<IO, TILE, ROWS>(x0, x1, x2, b0, b1, b2, d0, d1, d2, p1, p2, n_parts, spp0, spp1, spp2,       \
                                  vec_mask, n_images, n_samples, m_per_group, partial);                         \
    }

MEMSEG_L2_ENTRY(memseg_l2_f32_t1, float, 1, MEMSEG_ROWS_T1)
MEMSEG_L2_ENTRY(memseg_l2_f32_t2, float, 2, MEMSEG_ROWS_T2)
MEMSEG_L2_ENTRY(memseg_l2_f32_t4, float, 4, MEMSEG_ROWS_T4)
MEMSEG_L2_ENTRY(memseg_l2_f32_t8, float, 8, MEMSEG_ROWS_T8)
MEMSEG_L2_ENTRY(memseg_l2_f32_t16, float, 16, MEMSEG_ROWS_T16)
MEMSEG_L2_ENTRY(memseg_l2_f32_t32, float, 32, MEMSEG_ROWS_T32)
MEMSEG_L2_ENTRY(memseg_l2_f16_t1, memseg_half, 1, MEMSEG_ROWS_T1)
MEMSEG_L2_ENTRY(memseg_l2_f16_t2, memseg_half, 2, MEMSEG_ROWS_T2)
MEMSEG_L2_ENTRY(memseg_l2_f16_t4, memseg_half, 4, MEMSEG_ROWS_T4)
MEMSEG_L2_ENTRY(memseg_l2_f16_t8, memseg_half, 8, MEMSEG_ROWS_T8)
MEMSEG_L2_ENTRY(memseg_l2_f16_t16, memseg_half, 16, MEMSEG_ROWS_T16)
MEMSEG_L2_ENTRY(memseg_l2_f16_t32, memseg_half, 32, MEMSEG_ROWS_T32)

#define MEMSEG_SELECT_DIFF_ENTRY(NAME, IO)                                                                      \
    extern "C" __global__ void __launch_bounds__(MEMSEG_BLOCK) NAME(                                            \
        const IO* x0, const IO* x1, const IO* x2, const IO* b0, const IO* b1, const IO* b2, IO* y0, IO* y1,     \
        IO* y2, long long d0, long long d1, long long d2, int p1, int p2, int n_parts, int q1, int q2,          \
        int chunk_elems, int vec_mask, int n_levels, int per_level, int n_samples, const float* partial,        \
        int* index) {                                                                                           \
        memseg_select_diff<IO>(x0, x1, x2, b0, b1, b2, y0, y1, y2, d0, d1, d2, p1, p2, n_parts, q1, q2,        \
                               chunk_elems, vec_mask, n_levels, per_level, n_samples, partial, index);          \
    }

MEMSEG_SELECT_DIFF_ENTRY(memseg_select_diff_f32, float)
MEMSEG_SELECT_DIFF_ENTRY(memseg_select_diff_f16, memseg_half)
