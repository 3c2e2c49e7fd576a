// Philox4x32-10 on the GPU, the same function as src/rng.rs (Salmon et al., SC'11), so a kernel
// draws exactly the uniforms the CPU draws for (seed, stream, index).
#pragma once

#include <stdint.h>

__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
#pragma unroll
    for (int round = 0; round < 10; round++) {
        if (round > 0) {
            k.x += 0x9E3779B9u;
            k.y += 0xBB67AE85u;
        }
        const unsigned hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    }
    return c;
}

// rng::uniform(seed, stream, index): a double in [0, 1) with 53 random bits.
__device__ __forceinline__ double philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
    const uint4 counter = make_uint4((unsigned)index, (unsigned)(index >> 32), (unsigned)stream,
                                     (unsigned)(stream >> 32));
    const uint4 r = philox4x32(counter, make_uint2((unsigned)seed, (unsigned)(seed >> 32)));
    const uint64_t bits = ((uint64_t)r.x << 21) ^ ((uint64_t)r.y >> 11);
    return (double)bits * (1.0 / 9007199254740992.0);  // 2^-53
}
