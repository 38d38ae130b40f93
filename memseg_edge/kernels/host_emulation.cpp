// Replays launch plans of memory_argmin_l2.cu on the CPU (host_emulation.h); built and driven by
// tests/test_kernel.py:  g++ -std=c++20 -O1 host_emulation.cpp -o emu && emu spec.txt
//
// spec.txt, one item a line:
//   B <name> <fake base> <bytes> <input file> <output file>    a buffer: the plan's pointers are fake
//                                                              addresses inside [base, base + bytes)
//   L <kernel> <grid x> <grid y> <grid z> <threads> <n> <arg 1> ... <arg n>   a launch (integers)
// Every buffer is surrounded by 4096 guard bytes; a guard that changed is reported and the exit status is 3.
#include "host_emulation.h"

#include "memory_argmin_l2.cu"

#include <fstream>
#include <map>
#include <sstream>
#include <string>

namespace {

constexpr std::size_t kGuard = 4096;
constexpr unsigned char kGuardByte = 0xA5;

struct Buffer {
    std::string name, in, out;
    std::int64_t fake = 0, bytes = 0;
    unsigned char* alloc = nullptr;
    unsigned char* data() const { return alloc + kGuard; }
};

using Args = std::vector<std::int64_t>;
template <typename T>
T* ptr(std::int64_t v) { return reinterpret_cast<T*>(static_cast<std::intptr_t>(v)); }

template <typename IO>
using L2Fn = void (*)(const IO*, const IO*, const IO*, const IO*, const IO*, const IO*, long long, long long,
                      long long, int, int, int, int, int, int, int, int, int, int, float*);
template <typename IO>
using SelectFn = void (*)(const IO*, const IO*, const IO*, const IO*, const IO*, const IO*, IO*, IO*, IO*, long long,
                          long long, long long, int, int, int, int, int, int, int, int, int, int, const float*, int*);

template <typename IO>
std::function<void()> bind_l2(L2Fn<IO> f, const Args& a) {
    return [f, a] {
        f(ptr<const IO>(a[0]), ptr<const IO>(a[1]), ptr<const IO>(a[2]), ptr<const IO>(a[3]), ptr<const IO>(a[4]),
          ptr<const IO>(a[5]), a[6], a[7], a[8], int(a[9]), int(a[10]), int(a[11]), int(a[12]), int(a[13]),
          int(a[14]), int(a[15]), int(a[16]), int(a[17]), int(a[18]), ptr<float>(a[19]));
    };
}

template <typename IO>
std::function<void()> bind_select(SelectFn<IO> f, const Args& a) {
    return [f, a] {
        f(ptr<const IO>(a[0]), ptr<const IO>(a[1]), ptr<const IO>(a[2]), ptr<const IO>(a[3]), ptr<const IO>(a[4]),
          ptr<const IO>(a[5]), ptr<IO>(a[6]), ptr<IO>(a[7]), ptr<IO>(a[8]), a[9], a[10], a[11], int(a[12]),
          int(a[13]), int(a[14]), int(a[15]), int(a[16]), int(a[17]), int(a[18]), int(a[19]), int(a[20]),
          int(a[21]), ptr<const float>(a[22]), ptr<int>(a[23]));
    };
}

std::function<void()> bind_kernel(const std::string& kernel, const Args& a) {
#define MEMSEG_L2(NAME, IO) \
    if (kernel == #NAME) return bind_l2<IO>(NAME, a);
    MEMSEG_L2(memseg_l2_f32_t1, float) MEMSEG_L2(memseg_l2_f32_t2, float) MEMSEG_L2(memseg_l2_f32_t4, float)
    MEMSEG_L2(memseg_l2_f32_t8, float) MEMSEG_L2(memseg_l2_f32_t16, float) MEMSEG_L2(memseg_l2_f32_t32, float)
    MEMSEG_L2(memseg_l2_f16_t1, memseg_half) MEMSEG_L2(memseg_l2_f16_t2, memseg_half)
    MEMSEG_L2(memseg_l2_f16_t4, memseg_half) MEMSEG_L2(memseg_l2_f16_t8, memseg_half)
    MEMSEG_L2(memseg_l2_f16_t16, memseg_half) MEMSEG_L2(memseg_l2_f16_t32, memseg_half)
#undef MEMSEG_L2
    if (kernel == "memseg_select_diff_f32") return bind_select<float>(memseg_select_diff_f32, a);
    if (kernel == "memseg_select_diff_f16") return bind_select<memseg_half>(memseg_select_diff_f16, a);
    std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
    std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s spec.txt\n", argv[0]);
        return 2;
    }
    std::ifstream spec(argv[1]);
    std::vector<Buffer> buffers;
    std::string line;
    while (std::getline(spec, line)) {
        std::istringstream in(line);
        std::string tag;
        in >> tag;
        if (tag == "B") {
            Buffer b;
            in >> b.name >> b.fake >> b.bytes >> b.in >> b.out;
            b.alloc = static_cast<unsigned char*>(std::aligned_alloc(256, kGuard * 2 + ((b.bytes + 255) / 256) * 256));
            std::memset(b.alloc, kGuardByte, kGuard * 2 + ((b.bytes + 255) / 256) * 256);
            std::ifstream data(b.in, std::ios::binary);
            data.read(reinterpret_cast<char*>(b.data()), b.bytes);
            if (data.gcount() != b.bytes) {
                std::fprintf(stderr, "%s: read %ld of %ld bytes\n", b.in.c_str(), long(data.gcount()), long(b.bytes));
                return 2;
            }
            buffers.push_back(b);
        } else if (tag == "L") {
            std::string kernel;
            unsigned int gx, gy, gz, threads;
            std::size_t n;
            in >> kernel >> gx >> gy >> gz >> threads >> n;
            Args args(n);
            for (auto& v : args) {
                in >> v;
                for (const Buffer& b : buffers)   // a fake address inside a buffer -> the real one
                    if (v >= b.fake && v < b.fake + b.bytes) {
                        v = reinterpret_cast<std::intptr_t>(b.data()) + (v - b.fake);
                        break;
                    }
            }
            memseg_emu::launch(dim3{gx, gy, gz}, threads, bind_kernel(kernel, args));
        }
    }
    int status = 0;
    for (const Buffer& b : buffers) {
        const std::size_t tail = ((b.bytes + 255) / 256) * 256 - b.bytes + kGuard;
        bool broken = false;
        for (std::size_t i = 0; i < kGuard; ++i) broken |= b.alloc[i] != kGuardByte;
        for (std::size_t i = 0; i < tail; ++i) broken |= b.data()[b.bytes + i] != kGuardByte;
        if (broken) {
            std::fprintf(stderr, "guard bytes of %s changed\n", b.name.c_str());
            status = 3;
        }
        std::ofstream out(b.out, std::ios::binary);
        out.write(reinterpret_cast<const char*>(b.data()), b.bytes);
    }
    return status;
}
