// The PTX wrappers of kernels/mma.cuh (mma.sync m16n8k16, ldmatrix, cp.async, ex2, red) for the
// CPU emulator, with the same signatures. The fragment layouts are transcribed from the PTX ISA
// ("Matrix fragments for mma.m16n8k16 with floating point type", "ldmatrix"), independently of
// the kernels that rely on them: each lane rebuilds the whole 16x16 A and 16x8 B operand from the
// warp's deposits and computes its own four outputs in fp32.
#pragma once

namespace emu {

inline float bf16_half(uint32_t pair, int high) { return bf16_bits_to_f32((uint16_t)(pair >> (16 * high))); }

// A[row][k] of a 16x16 operand, from the 32 lanes' a[4] (lane 4 * g + t holds rows g and g + 8,
// columns 2t, 2t + 1 and 2t + 8, 2t + 9; a[0]: (g, 2t..), a[1]: (g + 8, 2t..),
// a[2]: (g, 2t + 8..), a[3]: (g + 8, 2t + 8..)).
inline float mma_a(const unsigned char* d, int row, int k) {
    const int lane = 4 * (row % 8) + (k % 8) / 2;
    const int reg = (row < 8 ? 0 : 1) + (k < 8 ? 0 : 2);
    const uint32_t* a = reinterpret_cast<const uint32_t*>(d + lane * DEPOSIT_BYTES);
    return bf16_half(a[reg], k % 2);
}

// B[k][n] of a 16x8 operand, from the lanes' b[2] (lane 4 * g + t holds column g, rows 2t, 2t + 1
// in b[0] and 2t + 8, 2t + 9 in b[1]), stored after a[4] in the deposit.
inline float mma_b(const unsigned char* d, int k, int n) {
    const int lane = 4 * n + (k % 8) / 2;
    const uint32_t* b = reinterpret_cast<const uint32_t*>(d + lane * DEPOSIT_BYTES) + 4;
    return bf16_half(b[k < 8 ? 0 : 1], k % 2);
}

// The 16-byte-aligned shared-memory row address of an ldmatrix lane, checked.
inline const unsigned char* ldmatrix_row(const unsigned char* d, int lane) {
    const unsigned char* p;
    memcpy(&p, d + lane * DEPOSIT_BYTES, sizeof(p));
    return p;
}

inline void ldmatrix_deposit(uint32_t r[4], const __nv_bfloat16* row, bool transposed) {
    if (((uintptr_t)row & 15) != 0) { fail("ldmatrix: a row address is not 16-byte aligned"); }
    if (!in_dynamic_shared(row, 16)) { fail("ldmatrix: a row lies outside dynamic shared memory"); }
    const unsigned char* d = warp_exchange(transposed ? "ldmatrix.trans" : "ldmatrix", &row, sizeof(row));
    const int g = lane_id() / 4, t = lane_id() % 4;
    for (int i = 0; i < 4; i++) {
        if (!transposed) {
            // r[i] = M_i[g][2t, 2t + 1]: lane 8i + g gave row g of matrix i
            memcpy(&r[i], ldmatrix_row(d, 8 * i + g) + 4 * t, 4);
        } else {
            // r[i] = (M_i[2t][g], M_i[2t + 1][g])
            uint16_t lo, hi;
            memcpy(&lo, ldmatrix_row(d, 8 * i + 2 * t) + 2 * g, 2);
            memcpy(&hi, ldmatrix_row(d, 8 * i + 2 * t + 1) + 2 * g, 2);
            r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}

}  // namespace emu

inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const unsigned char* dep = emu::warp_exchange("mma.m16n8k16", mine, sizeof(mine));
    const int g = emu::lane_id() / 4, t = emu::lane_id() % 4;
    for (int e = 0; e < 4; e++) {
        const int row = g + 8 * (e / 2), col = 2 * t + (e % 2);
        float acc = d[e];
        for (int k = 0; k < 16; k++) { acc += emu::mma_a(dep, row, k) * emu::mma_b(dep, k, col); }
        d[e] = acc;
    }
}

inline void ldmatrix_x4(uint32_t r[4], const __nv_bfloat16* row) { emu::ldmatrix_deposit(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t r[4], const __nv_bfloat16* row) { emu::ldmatrix_deposit(r, row, true); }

inline void copy_async16(__nv_bfloat16* dst, const __nv_bfloat16* src, bool valid) {
    emu::copy_async16(dst, src, valid);
}
inline void copy_async_commit() { emu::copy_async_commit(); }
template <int pending>
inline void copy_async_wait() { emu::copy_async_wait(pending); }

// ex2.approx.ftz.f32: the emulator computes 2^x exactly rounded (the GPU's is within ~2^-22) and
// flushes a subnormal input and result to 0, as .ftz does.
inline float exp2_approx(float x) {
    if (fpclassify(x) == FP_SUBNORMAL) { x = 0.0f; }
    const float y = exp2f(x);
    return fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// red.global.add.v2.f32 (sm_90) or two atomicAdds: each element once, at an 8-byte aligned
// address as the vector reduction needs.
inline void reduce_add_f32x2(float* dst, float x, float y) {
    if (((uintptr_t)dst & 7) != 0) { emu::fail("reduce_add_f32x2: the address is not 8-byte aligned"); }
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
}
