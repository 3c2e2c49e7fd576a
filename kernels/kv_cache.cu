// Writing the new keys and values of one layer into the slotted KV cache.
//
//   cache_k[slots[i], positions[i], :] = key[i, :]
//   cache_v[slots[i], positions[i], :] = value[i, :]      for i in 0..m
//
// cache_k, cache_v: (n_slots, capacity, kv_dim) bf16; key, value: (m, kv_dim) bf16;
// slots, positions: u32 (m). The host (the backend) validates slot < n_slots and
// position < capacity, so the kernel trusts them. The cache offset
// (slot * capacity + position) * kv_dim is size_t: a cache easily exceeds 2^31 elements.
//
// Parallelisation (src/cuda/ops/kv_cache.rs): grid.x strides over the kv_dim columns, in 8-element
// 16-byte vectors when kv_dim % 8 == 0 and all four tensors are 16-byte aligned, element by element
// otherwise; grid.y strides over the m tokens. Each thread copies the same columns of the key and
// of the value, so one launch writes both caches.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256)
kv_cache_write(__nv_bfloat16* cache_k, __nv_bfloat16* cache_v, const __nv_bfloat16* key,
               const __nv_bfloat16* value, const uint32_t* slots, const uint32_t* positions,
               int m, int capacity, int kv_dim) {
    constexpr int VEC = x128::size;
    const bool vectorised = (kv_dim % VEC == 0) && is_aligned16(cache_k) && is_aligned16(cache_v) &&
                            is_aligned16(key) && is_aligned16(value);
    const int step = vectorised ? VEC : 1;
    const size_t first = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * step;
    const size_t stride = (size_t)gridDim.x * blockDim.x * step;
    for (int i = blockIdx.y; i < m; i += gridDim.y) {
        const size_t dst = ((size_t)slots[i] * capacity + positions[i]) * kv_dim;
        const size_t src = (size_t)i * kv_dim;
        if (vectorised) {
            // key/value are read once (streaming); the cache is read soon by attention (cached store)
            for (size_t c = first; c < (size_t)kv_dim; c += stride) {
                store128(cache_k + dst + c, load128cs(key + src + c));
                store128(cache_v + dst + c, load128cs(value + src + c));
            }
        } else {
            for (size_t c = first; c < (size_t)kv_dim; c += stride) {
                cache_k[dst + c] = key[src + c];
                cache_v[dst + c] = value[src + c];
            }
        }
    }
}

// The gradient of kv_cache_write for one cache: dx[i, :] = dcache[slots[i], positions[i], :]
// (CPU reference: backend::cpu::attention::kv_cache_gather). Same grid as kv_cache_write.
extern "C" __global__ void __launch_bounds__(256)
kv_cache_gather(__nv_bfloat16* dx, const __nv_bfloat16* dcache, const uint32_t* slots,
                const uint32_t* positions, int m, int capacity, int kv_dim) {
    const size_t first = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (int i = blockIdx.y; i < m; i += gridDim.y) {
        const size_t src = ((size_t)slots[i] * capacity + positions[i]) * kv_dim;
        const size_t dst = (size_t)i * kv_dim;
        for (size_t c = first; c < (size_t)kv_dim; c += stride) { dx[dst + c] = dcache[src + c]; }
    }
}

// positions[i] += 1 for i < m: the last node of a recorded decode step (src/cuda/backend/decode_graph.rs),
// so each replay of the recording writes and attends one position further on, as the host's
// placement for that step says (the host checks that it does before replaying).
extern "C" __global__ void __launch_bounds__(256) advance_positions(uint32_t* positions, int m) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < m) { positions[i] += 1; }
}
