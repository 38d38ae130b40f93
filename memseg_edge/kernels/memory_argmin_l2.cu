// MemSeg's memory-bank step, fused (issue 4; docs/architecture.md "Fused kernel").
//
// Per level l (up to 3): features x_l [N, D_l] and bank b_l [M, D_l] (D_l = C_l * H_l * W_l, row major,
// i.e. NCHW flattened). Outputs: idx [N] (selection "sum": argmin_m sum_l |x_l[n] - b_l[m]|^2) or [N, L]
// ("per_level": argmin per level), int32, ties to the lowest m; diff_l [N, D_l] = (x_l - b_l[idx])^2.
// I/O in float or half (half carried as its bits, converted with cvt so no header is needed); all
// arithmetic and accumulation in float.
//
// One launch sequence on one stream, three kernels:
//   1. memseg_partial_l2_*  grid (M, chunks of all levels, ceil(N / TILE)). A block loads one chunk of
//      bank sample m once (one read per element) and accumulates the squared differences of TILE images
//      against it; it writes one float partial sum per (image, m, chunk) to the workspace.
//   2. memseg_select        grid (N). Sums the partials per level in a fixed order (double), picks the
//      argmin (strict <, so the lowest index wins a tie).
//   3. memseg_diff_*        grid (chunks of all levels, N). Writes (x - b[idx])^2.
//
// Memory traffic (bytes, s = element size):
//   bank:      M * D * s * ceil(N / TILE)     read once per batch tile of TILE images, not once per image
//   features:  N * D * s from DRAM; the M blocks that share a feature chunk are adjacent in the grid
//              (blockIdx.x = m varies fastest), so the other M - 1 reads of that chunk hit L2
//   phase 3:   N * D * s (x) + N * D * s (chosen bank rows, mostly L2) + N * D * s (diff writes)
//   partials:  N * M * chunks * 4 written and read (chunk = 4096 elements: under 0.1 % of the bank)
// At batch 1 the bank read dominates, so the kernel's speed is the bank's bytes over the copy bandwidth.

#define MEMSEG_TILE 8
#define MEMSEG_MAX_LEVELS 3

typedef unsigned short memseg_half;   // IEEE binary16 bits

__device__ __forceinline__ float memseg_load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float memseg_load(const memseg_half* p, long long i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i]));
    return f;
}
__device__ __forceinline__ void memseg_store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void memseg_store(memseg_half* p, long long i, float v) {
    memseg_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i] = h;
}

// Which level a global chunk index belongs to, and the chunk's index inside that level.
__device__ __forceinline__ int memseg_level_of(int chunk, int c0, int c1, int* local) {
    if (chunk < c0) { *local = chunk; return 0; }
    if (chunk < c0 + c1) { *local = chunk - c0; return 1; }
    *local = chunk - c0 - c1;
    return 2;
}

__device__ __forceinline__ float memseg_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    return v;
}

template <typename T>
__device__ void memseg_partial_l2(const T* x0, const T* x1, const T* x2, const T* b0, const T* b1, const T* b2,
                                  long long d0, long long d1, long long d2, int c0, int c1, int c2,
                                  int n_images, int n_samples, int chunk_elems, float* partial) {
    __shared__ float warp_sums[MEMSEG_TILE][32];
    const int m = blockIdx.x;
    const int chunk = blockIdx.y;
    const int n0 = blockIdx.z * MEMSEG_TILE;
    const int total_chunks = c0 + c1 + c2;
    int local;
    const int level = memseg_level_of(chunk, c0, c1, &local);
    const T* x = level == 0 ? x0 : (level == 1 ? x1 : x2);
    const T* b = level == 0 ? b0 : (level == 1 ? b1 : b2);
    const long long d = level == 0 ? d0 : (level == 1 ? d1 : d2);
    const long long begin = (long long)local * chunk_elems;
    long long end = begin + chunk_elems;
    if (end > d) end = d;
    int tile = n_images - n0;
    if (tile > MEMSEG_TILE) tile = MEMSEG_TILE;

    float acc[MEMSEG_TILE];
#pragma unroll
    for (int t = 0; t < MEMSEG_TILE; ++t) acc[t] = 0.f;
    const T* bm = b + (long long)m * d;
    for (long long e = begin + threadIdx.x; e < end; e += blockDim.x) {
        const float bv = memseg_load(bm, e);   // the bank element: loaded once for the whole tile
#pragma unroll
        for (int t = 0; t < MEMSEG_TILE; ++t) {
            if (t < tile) {
                const float diff = memseg_load(x, (long long)(n0 + t) * d + e) - bv;
                acc[t] = fmaf(diff, diff, acc[t]);
            }
        }
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int t = 0; t < MEMSEG_TILE; ++t) {
        const float s = memseg_warp_sum(acc[t]);
        if (lane == 0) warp_sums[t][warp] = s;
    }
    __syncthreads();
    if (threadIdx.x < tile) {
        float s = 0.f;
        for (int w = 0; w < n_warps; ++w) s += warp_sums[threadIdx.x][w];
        partial[((long long)(n0 + threadIdx.x) * n_samples + m) * total_chunks + chunk] = s;
    }
}

template <typename T>
__device__ void memseg_diff(const T* x0, const T* x1, const T* x2, const T* b0, const T* b1, const T* b2,
                            T* y0, T* y1, T* y2, long long d0, long long d1, long long d2, int c0, int c1,
                            int chunk_elems, const int* index, int n_levels, int per_level) {
    const int n = blockIdx.y;
    int local;
    const int level = memseg_level_of(blockIdx.x, c0, c1, &local);
    const T* x = level == 0 ? x0 : (level == 1 ? x1 : x2);
    const T* b = level == 0 ? b0 : (level == 1 ? b1 : b2);
    T* y = level == 0 ? y0 : (level == 1 ? y1 : y2);
    const long long d = level == 0 ? d0 : (level == 1 ? d1 : d2);
    const int m = per_level ? index[n * n_levels + level] : index[n];
    const long long begin = (long long)local * chunk_elems;
    long long end = begin + chunk_elems;
    if (end > d) end = d;
    const T* bm = b + (long long)m * d;
    const long long row = (long long)n * d;
    for (long long e = begin + threadIdx.x; e < end; e += blockDim.x) {
        const float diff = memseg_load(x, row + e) - memseg_load(bm, e);
        memseg_store(y, row + e, diff * diff);
    }
}

extern "C" {

__global__ void memseg_partial_l2_f32(const float* x0, const float* x1, const float* x2, const float* b0,
                                      const float* b1, const float* b2, long long d0, long long d1, long long d2,
                                      int c0, int c1, int c2, int n_images, int n_samples, int chunk_elems,
                                      float* partial) {
    memseg_partial_l2<float>(x0, x1, x2, b0, b1, b2, d0, d1, d2, c0, c1, c2, n_images, n_samples, chunk_elems,
                             partial);
}

__global__ void memseg_partial_l2_f16(const memseg_half* x0, const memseg_half* x1, const memseg_half* x2,
                                      const memseg_half* b0, const memseg_half* b1, const memseg_half* b2,
                                      long long d0, long long d1, long long d2, int c0, int c1, int c2,
                                      int n_images, int n_samples, int chunk_elems, float* partial) {
    memseg_partial_l2<memseg_half>(x0, x1, x2, b0, b1, b2, d0, d1, d2, c0, c1, c2, n_images, n_samples,
                                   chunk_elems, partial);
}

// One block per image (blockDim.x a power of two <= 256). index: [N] (per_level = 0) or [N, n_levels].
__global__ void memseg_select(const float* partial, int c0, int c1, int c2, int n_levels, int n_samples,
                              int per_level, int* index) {
    __shared__ double best_val[256];
    __shared__ int best_idx[256];
    const int n = blockIdx.x;
    const int total_chunks = c0 + c1 + c2;
    const int counts[MEMSEG_MAX_LEVELS] = {c0, c1, c2};
    const int rounds = per_level ? n_levels : 1;
    for (int r = 0; r < rounds; ++r) {
        double my_val = 0.0;
        int my_idx = -1;
        for (int m = threadIdx.x; m < n_samples; m += blockDim.x) {
            const float* p = partial + ((long long)n * n_samples + m) * total_chunks;
            double s = 0.0;
            int first = 0;
            for (int l = 0; l < n_levels; ++l) {
                if (!per_level || l == r) {
                    for (int c = 0; c < counts[l]; ++c) s += (double)p[first + c];
                }
                first += counts[l];
            }
            if (my_idx < 0 || s < my_val) { my_val = s; my_idx = m; }   // m ascends: ties keep the lowest
        }
        best_val[threadIdx.x] = my_val;
        best_idx[threadIdx.x] = my_idx;
        __syncthreads();
        for (int stride = blockDim.x >> 1; stride > 0; stride >>= 1) {
            if (threadIdx.x < stride) {
                const double v = best_val[threadIdx.x + stride];
                const int i = best_idx[threadIdx.x + stride];
                const int j = best_idx[threadIdx.x];
                if (i >= 0 && (j < 0 || v < best_val[threadIdx.x] || (v == best_val[threadIdx.x] && i < j))) {
                    best_val[threadIdx.x] = v;
                    best_idx[threadIdx.x] = i;
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            if (per_level) index[n * n_levels + r] = best_idx[0];
            else index[n] = best_idx[0];
        }
        __syncthreads();
    }
}

__global__ void memseg_diff_f32(const float* x0, const float* x1, const float* x2, const float* b0,
                                const float* b1, const float* b2, float* y0, float* y1, float* y2, long long d0,
                                long long d1, long long d2, int c0, int c1, int chunk_elems, const int* index,
                                int n_levels, int per_level) {
    memseg_diff<float>(x0, x1, x2, b0, b1, b2, y0, y1, y2, d0, d1, d2, c0, c1, chunk_elems, index, n_levels,
                       per_level);
}

__global__ void memseg_diff_f16(const memseg_half* x0, const memseg_half* x1, const memseg_half* x2,
                                const memseg_half* b0, const memseg_half* b1, const memseg_half* b2,
                                memseg_half* y0, memseg_half* y1, memseg_half* y2, long long d0, long long d1,
                                long long d2, int c0, int c1, int chunk_elems, const int* index, int n_levels,
                                int per_level) {
    memseg_diff<memseg_half>(x0, x1, x2, b0, b1, b2, y0, y1, y2, d0, d1, d2, c0, c1, chunk_elems, index,
                             n_levels, per_level);
}

}  // extern "C"
