// memory_argmin_l2.cu on the CPU, for tests on machines without a GPU (tests/test_kernel.py): every CUDA
// thread of a block is a fiber (ucontext) in one OS thread, so __syncthreads, __syncwarp and the warp
// shuffles are real rendezvous of all the block's or warp's threads, in a deterministic order, and the
// kernels' own source (index arithmetic, tiles, transpose-reduction, selection, vector paths) is what runs.
// Not emulated: the GPU's memory model beyond the barriers, timing, and what the CUDA compiler does
// differently (the GPU check covers those). A misaligned 16-byte access aborts (it would fault on a GPU).
#pragma once

#include <ucontext.h>

#include <math.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define MEMSEG_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static   // one copy per kernel instantiation; blocks run one after another

struct dim3 {
    unsigned int x, y, z;
};
inline dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

namespace memseg_emu {

struct Barrier {
    int expected = 0;
    int count = 0;
    unsigned long generation = 0;
};

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    unsigned int thread = 0;
    bool done = false;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline int current = 0;
inline Barrier block_barrier;
inline Barrier warp_barrier[32];
inline unsigned long long exchange[32][32];   // [warp][lane]: one shuffle's values
inline std::function<void()> body;
inline unsigned long long switches = 0;

inline void yield() {
    if (++switches > 4000000000ull) {
        std::fprintf(stderr, "emulation: no progress (a barrier not reached by every thread?)\n");
        std::abort();
    }
    swapcontext(&fibers[current].context, &scheduler);
}

inline void wait(Barrier& b) {
    const unsigned long generation = b.generation;
    if (++b.count == b.expected) {
        b.count = 0;
        ++b.generation;
        return;
    }
    while (b.generation == generation) yield();
}

inline void trampoline(int id) {
    body();
    fibers[id].done = true;   // returning resumes the scheduler (uc_link)
}

inline void check_aligned(const void* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16) {
        std::fprintf(stderr, "emulation: misaligned 16-byte access at %p\n", p);
        std::abort();
    }
}

// Runs `kernel` (a call with its arguments bound) for every block of `grid`, `threads` threads per block.
inline void launch(dim3 grid, unsigned int threads, const std::function<void()>& kernel) {
    if (threads % 32 || threads > 1024) {
        std::fprintf(stderr, "emulation: %u threads per block\n", threads);
        std::abort();
    }
    body = kernel;
    fibers.resize(threads);
    for (auto& f : fibers)
        if (f.stack.empty()) f.stack.resize(256 * 1024);
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    for (unsigned int z = 0; z < grid.z; ++z)
        for (unsigned int y = 0; y < grid.y; ++y)
            for (unsigned int x = 0; x < grid.x; ++x) {
                blockIdx = dim3{x, y, z};
                block_barrier = Barrier{static_cast<int>(threads)};
                for (auto& w : warp_barrier) w = Barrier{32};
                for (unsigned int i = 0; i < threads; ++i) {
                    Fiber& f = fibers[i];
                    f.thread = i;
                    f.done = false;
                    getcontext(&f.context);
                    f.context.uc_stack.ss_sp = f.stack.data();
                    f.context.uc_stack.ss_size = f.stack.size();
                    f.context.uc_link = &scheduler;
                    makecontext(&f.context, reinterpret_cast<void (*)()>(trampoline), 1, static_cast<int>(i));
                }
                unsigned int remaining = threads;
                while (remaining) {
                    for (unsigned int i = 0; i < threads; ++i) {
                        if (fibers[i].done) continue;
                        current = static_cast<int>(i);
                        threadIdx = dim3{fibers[i].thread, 0, 0};
                        swapcontext(&scheduler, &fibers[i].context);
                        if (fibers[i].done) --remaining;
                    }
                }
            }
}

}  // namespace memseg_emu

inline void __syncthreads() { memseg_emu::wait(memseg_emu::block_barrier); }
inline void __syncwarp(unsigned int = 0xffffffffu) { memseg_emu::wait(memseg_emu::warp_barrier[threadIdx.x / 32]); }

template <typename T>
inline T __shfl_xor_sync(unsigned int, T value, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(&memseg_emu::exchange[warp][lane], &value, sizeof(T));
    __syncwarp();
    T out;
    std::memcpy(&out, &memseg_emu::exchange[warp][lane ^ static_cast<unsigned int>(lane_mask)], sizeof(T));
    __syncwarp();
    return out;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}

// The five primitives the .cu file writes in PTX.
inline float memseg_h2f(unsigned short h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return static_cast<float>(x);
}
inline float memseg_h2f_kept(unsigned short h) { return memseg_h2f(h); }
inline unsigned short memseg_f2h(float f) {
    const _Float16 x = static_cast<_Float16>(f);   // round to nearest even, as cvt.rn.f16.f32
    unsigned short h;
    std::memcpy(&h, &x, 2);
    return h;
}
inline void memseg_ld16(const void* p, unsigned int (&w)[4]) {
    memseg_emu::check_aligned(p);
    std::memcpy(w, p, 16);
}
inline void memseg_ld16_stream(const void* p, unsigned int (&w)[4]) { memseg_ld16(p, w); }
inline void memseg_st16_stream(void* p, const unsigned int (&w)[4]) {
    memseg_emu::check_aligned(p);
    std::memcpy(p, w, 16);
}
