// The CUDA C++ that kernels/*.cu use, for a host C++ compiler: the kernels compile unchanged
// (this header is force-included) and run on the CPU, one emulated GPU thread per fiber
// (src/runtime.cpp). Used by the tests only: they run a kernel's real source on small inputs and
// compare it with the CPU reference, so a wrong index, mask or pipeline step shows without a GPU.
//
// What is emulated, and how:
//   - threadIdx / blockIdx / blockDim / gridDim: the running fiber's coordinates.
//   - __shared__ variables: `static`. Blocks run one after another, so one instance per kernel is
//     one per block. Dynamic shared memory (DYNAMIC_SHARED in kernels/common.cuh) is a buffer of
//     exactly the launch's size, filled with 0xff bytes (a NaN in bf16 and f32) before every block,
//     with an unmapped page right after it.
//   - __syncthreads and the warp collectives (shuffles, ballot, mma, ldmatrix): the fibers
//     meet at a barrier; collectives must be reached by all 32 lanes of the warp (the kernels only
//     use full masks), in the same order, or the launch fails. A barrier nobody can pass fails the
//     launch as a deadlock instead of hanging.
//   - cp.async (ptx_emulation.h): the destination is poisoned (0xff) when the copy is issued and
//     written when the issuing thread waits for its group, the earliest and latest moments the
//     hardware may choose, so reading a tile too early or refilling one still in use reads NaN.
//   - Scheduling (src/runtime.cpp): each warp runs until its lanes wait at __syncthreads or
//     return, then the next; the warp order alternates between rounds and between blocks, so a
//     warp gets ahead of the others in either direction and a missing __syncthreads shows as a
//     stale or poisoned read.
//   - Memory is plain host memory; no data race between threads is detected beyond that. A
//     misaligned 16-byte vector access faults, as it would on the GPU: the test binary ends
//     (SIGSEGV) after a line on stderr naming the block and thread; so does an integer division by
//     zero (SIGFPE), which the GPU would not trap.
#pragma once

#define THINKSHORT_EMULATION 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

// build.rs finds the kernels' entry points by preprocessing each file with THINKSHORT_KERNEL_SCAN,
// where `extern "C" __global__ void name(` becomes `extern "C" thinkshort_kernel void name(`.
#ifdef THINKSHORT_KERNEL_SCAN
#define __global__ thinkshort_kernel
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

// ----------------------------------------------------------------------------
// vector types

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };

inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

using std::max;
using std::min;

// ----------------------------------------------------------------------------
// the emulator's interface (src/runtime.cpp)

namespace emu {

struct Coords {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
// Coordinates of the emulated thread that is running now.
extern const Coords* current;

// Ends the launch with an error (the test sees the message); never returns.
[[noreturn]] void fail(const char* message);

void syncthreads();

// Bytes each lane may contribute to one warp collective.
constexpr size_t DEPOSIT_BYTES = 64;
// One warp collective: every lane of the running thread's warp deposits `bytes` of `in`, and
// when all 32 have, each gets back the deposits of all lanes (lane i's at i * DEPOSIT_BYTES),
// valid until this lane's next collective. `kind` names the collective: lanes reaching different
// ones at the same time fail the launch.
const unsigned char* warp_exchange(const char* kind, const void* in, size_t bytes);

// The block's dynamic shared memory, and whether [p, p + bytes) lies inside it.
unsigned char* dynamic_shared();
bool in_dynamic_shared(const void* p, size_t bytes);

// cp.async of the running thread: issue (16 bytes; zeros when !valid), commit, wait.
void copy_async16(void* dst, const void* src, bool valid);
void copy_async_commit();
void copy_async_wait(int pending);

template <class T>
inline T lane_value(const unsigned char* deposits, int lane) {
    T v;
    memcpy(&v, deposits + lane * DEPOSIT_BYTES, sizeof(T));
    return v;
}

inline int lane_id() { return (int)(current->thread_idx.x % 32); }

}  // namespace emu

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::current->block_idx)
#define blockDim (emu::current->block_dim)
#define gridDim (emu::current->grid_dim)

#define DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(emu::dynamic_shared())

inline void __syncthreads() { emu::syncthreads(); }

// ----------------------------------------------------------------------------
// warp shuffles and votes (full masks only, like every kernel here)

inline void emu_check_full_mask(unsigned mask, const char* what) {
    if (mask != 0xffffffffu) { emu::fail(what); }
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    emu_check_full_mask(mask, "__shfl_xor_sync with a partial mask");
    static_assert(sizeof(T) <= emu::DEPOSIT_BYTES, "shuffled type too large");
    const unsigned char* d = emu::warp_exchange("__shfl_xor_sync", &value, sizeof(T));
    const int lane = emu::lane_id();
    const int src = lane ^ lane_mask;
    // lanes beyond the segment of `width` read their own value
    return emu::lane_value<T>(d, (src / width == lane / width) ? src : lane);
}

template <class T>
inline T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
    emu_check_full_mask(mask, "__shfl_sync with a partial mask");
    const unsigned char* d = emu::warp_exchange("__shfl_sync", &value, sizeof(T));
    const int lane = emu::lane_id();
    return emu::lane_value<T>(d, (lane / width) * width + (src_lane % width));
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    emu_check_full_mask(mask, "__shfl_up_sync with a partial mask");
    const unsigned char* d = emu::warp_exchange("__shfl_up_sync", &value, sizeof(T));
    const int lane = emu::lane_id();
    const int src = lane - (int)delta;
    return emu::lane_value<T>(d, (src >= (lane / width) * width) ? src : lane);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    emu_check_full_mask(mask, "__ballot_sync with a partial mask");
    const int mine = predicate != 0;
    const unsigned char* d = emu::warp_exchange("__ballot_sync", &mine, sizeof(mine));
    unsigned bits = 0;
    for (int lane = 0; lane < 32; lane++) { bits |= (unsigned)emu::lane_value<int>(d, lane) << lane; }
    return bits;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    emu_check_full_mask(mask, "__syncwarp with a partial mask");
    emu::warp_exchange("__syncwarp", nullptr, 0);
}

// ----------------------------------------------------------------------------
// bf16 (cuda_bf16.h's names and rounding)

namespace emu {
inline uint16_t f32_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return (uint16_t)((u >> 16) | 0x40); }  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (uint16_t)(u >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
}  // namespace emu

struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : bits(emu::f32_to_bf16_bits(f)) {}
    operator float() const { return emu::bf16_bits_to_f32(bits); }
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 v) { return emu::bf16_bits_to_f32(v.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return __nv_bfloat162{__nv_bfloat16(lo), __nv_bfloat16(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{(float)v.x, (float)v.y}; }

// ----------------------------------------------------------------------------
// arithmetic intrinsics (IEEE round-to-nearest: what the _rn forms name; the fast forms are
// approximations on the GPU, exact here)

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __expf(float x) { return expf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }

// cache-hinted loads and stores: plain ones
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }

// Atomics and fences: one block runs at a time, and its threads switch only at barriers and
// warp collectives, so a plain read-modify-write is atomic and every write is visible at once.
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
inline int atomicAdd(int* p, int v) { const int old = *p; *p = old + v; return old; }
inline void __threadfence() {}
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { emu::fail("__trap() in a kernel"); }

inline size_t __cvta_generic_to_shared(const void* p) {
    return (size_t)((const unsigned char*)p - emu::dynamic_shared());
}
