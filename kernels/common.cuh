// Shared helpers for the thinkshort kernels (in the spirit of llm.c's cuda_common.h / cuda_utils.cuh).
//
// Every kernel file includes this header. Kernels are launched from Rust (cudarc), so there is no
// host-side code and no CUDA_CHECK here: error checking happens at the launch site in Rust.
//
// Conventions used by all kernels:
//   - bf16 tensors are `__nv_bfloat16`, f32 tensors are `float`, both row-major and contiguous.
//   - all accumulation (sums, means, softmax statistics) is done in fp32.
//   - a "row" is the last (contiguous) dimension; row offsets are computed in size_t so that
//     rows * dim may exceed 2^31.
//   - blockDim.x is a multiple of 32 and at most 1024 (the block reductions rely on full warps).
#pragma once

#ifndef THINKSHORT_EMULATION  // the tests' CPU emulator brings its own (tests/cuda_emulator)
#include <cuda_bf16.h>
#endif
#include <stdint.h>

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// The block's dynamic shared memory (its size is set at launch) as `type* name`.
#ifndef THINKSHORT_EMULATION
#define DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

// log2(e) and ln(2): softmax in exp2 units (mma.cuh's exp2_approx is one instruction)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// ----------------------------------------------------------------------------
// bf16 <-> f32 conversion

__device__ __forceinline__ float bf16_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// round-to-nearest-even, the same rounding PyTorch uses for .to(torch.bfloat16)
__device__ __forceinline__ __nv_bfloat16 f32_to_bf16(float v) { return __float2bfloat16_rn(v); }

// Type-generic versions, so that one templated kernel body serves the bf16 and the f32 variant:
//   to_f32(v)            widen a storage value to fp32 (identity for float)
//   from_f32<T>(v)       narrow an fp32 value to the storage type (identity for float)
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return bf16_to_f32(v); }

template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return f32_to_bf16(v); }

// ----------------------------------------------------------------------------
// 128-bit (16-byte) packed loads and stores, as in llm.c's Packed128.
// A Packed128<__nv_bfloat16> holds 8 values, a Packed128<float> holds 4. Loading through an int4
// makes the compiler emit a single LDG.E.128 / STG.E.128 instead of several narrower accesses.
// The address must be 16-byte aligned (the callers check this before taking the vector path).

template <class ElementType>
struct alignas(16) Packed128 {
    static constexpr int size = sizeof(int4) / sizeof(ElementType);
    ElementType payload[size];

    Packed128() = default;
    __device__ explicit Packed128(int4 bits) {
        static_assert(sizeof(bits) == sizeof(payload), "Size mismatch.");
        memcpy(&payload, &bits, sizeof(bits));
    }
    __device__ static Packed128 zeros() {
        Packed128 result;
        for (int k = 0; k < size; k++) { result.payload[k] = ElementType(0.0f); }
        return result;
    }
    __device__ ElementType& operator[](int index) { return payload[index]; }
    __device__ const ElementType& operator[](int index) const { return payload[index]; }
    __device__ int4 get_bits() const {
        int4 bits;
        static_assert(sizeof(bits) == sizeof(payload), "Size mismatch.");
        memcpy(&bits, &payload, sizeof(bits));
        return bits;
    }
};

typedef Packed128<__nv_bfloat16> x128;  // 8 x bf16
typedef Packed128<float> f128;          // 4 x f32

// ordinary load (cached in L1/L2: use for data that is read again, e.g. weights)
template <class ElementType>
__device__ __forceinline__ Packed128<ElementType> load128(const ElementType* address) {
    return Packed128<ElementType>{*reinterpret_cast<const int4*>(address)};
}
// streaming load (cache-streaming hint: use for data read exactly once)
template <class ElementType>
__device__ __forceinline__ Packed128<ElementType> load128cs(const ElementType* address) {
    return Packed128<ElementType>{__ldcs(reinterpret_cast<const int4*>(address))};
}
// ordinary store
template <class ElementType>
__device__ __forceinline__ void store128(ElementType* target, Packed128<ElementType> value) {
    *reinterpret_cast<int4*>(target) = value.get_bits();
}
// streaming store (the output is not read again by this kernel)
template <class ElementType>
__device__ __forceinline__ void store128cs(ElementType* target, Packed128<ElementType> value) {
    __stcs(reinterpret_cast<int4*>(target), value.get_bits());
}

// RMSNorm's per-element epilogue, as Hugging Face rounds it: normalise, cast to the storage
// dtype, scale by the weight, cast (rmsnorm.cu, and the per-head norms of rope.cu)
template <class T>
__device__ __forceinline__ T rmsnorm_apply(T x, float rstd, T w) {
    const T normed = from_f32<T>(to_f32(x) * rstd);  // hidden_states.to(input_dtype)
    return from_f32<T>(to_f32(w) * to_f32(normed));   // self.weight * (...)
}

// true when every pointer is 16-byte aligned, i.e. the 128-bit path may be taken
__device__ __forceinline__ bool is_aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ----------------------------------------------------------------------------
// reductions

// sum over the 32 lanes of a warp; every lane receives the result
__device__ __forceinline__ float warp_reduce_sum(float val) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        val += __shfl_xor_sync(FULL_MASK, val, offset);
    }
    return val;
}

// max over the 32 lanes of a warp; every lane receives the result
__device__ __forceinline__ float warp_reduce_max(float val) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        val = fmaxf(val, __shfl_xor_sync(FULL_MASK, val, offset));
    }
    return val;
}

// Sum over all threads of the block; every thread receives the result.
// Requires blockDim.x to be a multiple of 32 (at most 1024) and every thread of the block to call
// it (it contains __syncthreads). Pass final_sync = true when the function is called more than
// once in the same kernel, so that the shared scratch is not overwritten while still being read.
__device__ __forceinline__ float block_reduce_sum(float val, bool final_sync = false) {
    __shared__ float shared_val[WARP_SIZE];
    const int lane_id = threadIdx.x % WARP_SIZE;
    const int warp_id = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;

    float warp_val = warp_reduce_sum(val);
    if (lane_id == 0) { shared_val[warp_id] = warp_val; }
    __syncthreads();
    warp_val = (lane_id < num_warps) ? shared_val[lane_id] : 0.0f;
    float block_val = warp_reduce_sum(warp_val);
    if (final_sync) { __syncthreads(); }
    return block_val;
}

// block_reduce_sum of two values at once (one barrier instead of two): every thread receives
// both sums. Same requirements and final_sync rule as block_reduce_sum (its own scratch).
__device__ __forceinline__ float2 block_reduce_sum2(float2 val, bool final_sync = false) {
    __shared__ float2 shared_val[WARP_SIZE];
    const int lane_id = threadIdx.x % WARP_SIZE;
    const int warp_id = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;

    float2 warp_val = make_float2(warp_reduce_sum(val.x), warp_reduce_sum(val.y));
    if (lane_id == 0) { shared_val[warp_id] = warp_val; }
    __syncthreads();
    warp_val = (lane_id < num_warps) ? shared_val[lane_id] : make_float2(0.0f, 0.0f);
    const float2 block_val = make_float2(warp_reduce_sum(warp_val.x), warp_reduce_sum(warp_val.y));
    if (final_sync) { __syncthreads(); }
    return block_val;
}

// ----------------------------------------------------------------------------
// misc

template <class T>
__host__ __device__ constexpr T ceil_div(T dividend, T divisor) {
    return (dividend + divisor - 1) / divisor;
}

// Max over all threads of the block; every thread receives the result. Same requirements and
// final_sync rule as block_reduce_sum (its own shared scratch, so the two may be interleaved).
// Threads with nothing to contribute pass -INFINITY.
__device__ __forceinline__ float block_reduce_max(float val, bool final_sync = false) {
    __shared__ float shared_val[WARP_SIZE];
    const int lane_id = threadIdx.x % WARP_SIZE;
    const int warp_id = threadIdx.x / WARP_SIZE;
    const int num_warps = blockDim.x / WARP_SIZE;

    float warp_val = warp_reduce_max(val);
    if (lane_id == 0) { shared_val[warp_id] = warp_val; }
    __syncthreads();
    warp_val = (lane_id < num_warps) ? shared_val[lane_id] : -INFINITY;
    float block_val = warp_reduce_max(warp_val);
    if (final_sync) { __syncthreads(); }
    return block_val;
}
