// Tensor-core tiles for the attention kernels: the m16n8k16 bf16 matrix-multiply-accumulate of
// PTX (`mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`, sm_80 and later), the ldmatrix
// loads that build its fragments from shared-memory tiles, cp.async copies into those tiles, and
// the softmax's one-instruction exp2 and the fused backward's vector reduction.
//
// One warp computes D[16x8] += A[16x16] * B[16x8]. With lane = 4 * g + t (g = lane / 4 in 0..8,
// t = lane % 4 in 0..4), each thread holds (PTX ISA, "Matrix fragments for mma.m16n8k16"):
//   A: 4 registers of 2 bf16:  a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                              a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B: 2 registers of 2 bf16:  b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   C, D: 4 floats:            c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// The lower-indexed element of a pair sits in the low 16 bits.
//
// Two facts the kernels lean on:
//   - The C fragments of two neighbouring 16x8 tiles (columns 0..8 and 8..16) are, rounded to
//     bf16 and paired, exactly the A fragment of the 16x16 tile they form: a score tile computed
//     by one mma feeds the next mma (P times V) without leaving registers.
//   - Shared-memory tiles are row-major with rows of D + TILE_PAD bf16. For every D used here
//     (32, 64, 128) the row stride in 4-byte words is 4 mod 8, so the 32 lanes of a fragment load
//     (g rows apart, t words apart) hit 32 different banks, and so do ldmatrix's row reads.
#pragma once

#include "common.cuh"

// bf16 padding at the end of every shared-memory tile row (16 bytes: rows stay 16-byte aligned).
#define TILE_PAD 8

// Two floats rounded to bf16 (round-to-nearest-even) in one register, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The PTX instructions. The tests' CPU emulator (tests/cuda_emulator) defines the same functions.
#ifdef THINKSHORT_EMULATION
#include "ptx_emulation.h"
#else

// d += a * b for one m16n8k16 tile (fp32 accumulators).
__device__ __forceinline__ void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The shared-memory address of a generic pointer into shared memory (for ldmatrix, cp.async).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix: four 8x8 bf16 matrices M0..M3 from shared memory, lanes 8i..8i+7 giving the addresses
// of the 8 rows (16 bytes each, 16-byte aligned) of M_i. Plain: r[i] = M_i[g][2t, 2t+1];
// transposed: r[i] = (M_i[2t][g], M_i[2t+1][g]). One instruction replaces four 4-byte loads per
// thread (or eight 2-byte loads for the transposed pairs). The rows of one matrix are a tile's
// rows: with the row stride 4 mod 8 words they fall in 8 different groups of 4 banks.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const __nv_bfloat16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const __nv_bfloat16* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row)));
}

// cp.async: 16 bytes global -> shared without passing through registers, so the copy of the
// next tile overlaps the math on this one. With valid = false nothing is read and the 16 bytes
// are zero-filled (src must still be a valid address).
__device__ __forceinline__ void copy_async16(__nv_bfloat16* dst, const __nv_bfloat16* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 ::"r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0));
}
// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void copy_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending)); }

// 2^x in one instruction of the special-function unit (ex2.approx.ftz: relative error about
// 2^-22, results below 2^-126 flushed to 0). exp2f is four instructions here (the kernels are not
// built with --use_fast_math: a range check and two scalings keep its subnormal results), which a
// softmax, whose largest term is 1, does not need.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// dst[0] += x, dst[1] += y in global memory (8-byte aligned), without waiting for the result:
// one vector reduction on sm_90, two scalar ones before it.
__device__ __forceinline__ void reduce_add_f32x2(float* dst, float x, float y) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(x), "f"(y) : "memory");
#else
    atomicAdd(dst, x);
    atomicAdd(dst + 1, y);
#endif
}

#endif  // THINKSHORT_EMULATION

// A fragment of the 16x16 block at (row0, col0) of a row-major tile: the operand is the tile
// itself (A[i][k] = tile[row0 + i][col0 + k]). M0..M3 = the blocks (+0, +0), (+8, +0), (+0, +8),
// (+8, +8): exactly a[0..3].
__device__ __forceinline__ void load_a(uint32_t a[4], const __nv_bfloat16* tile, int stride,
                                       int row0, int col0, int lane) {
    const int i = lane / 8, r = lane % 8;
    ldmatrix_x4(a, tile + (row0 + (i % 2) * 8 + r) * stride + col0 + (i / 2) * 8);
}

// B fragments of two neighbouring 16x8 blocks (n0 and n0 + 8) of the TRANSPOSE of a row-major
// tile: B[k][n] = tile[n0 + n][k0 + k] (e.g. B = K^T for S = Q K^T, K stored one key per row).
// b[j][0] = tile[n0 + 8j + g][k0 + 2t, +1], b[j][1] the same at k0 + 8: M0..M3 = the blocks
// (rows +0, cols +0), (+0, +8), (+8, +0), (+8, +8).
__device__ __forceinline__ void load_b_transposed_x2(uint32_t b[2][2], const __nv_bfloat16* tile,
                                                     int stride, int n0, int k0, int lane) {
    const int i = lane / 8, r = lane % 8;
    uint32_t m[4];
    ldmatrix_x4(m, tile + (n0 + (i / 2) * 8 + r) * stride + k0 + (i % 2) * 8);
    b[0][0] = m[0];
    b[0][1] = m[1];
    b[1][0] = m[2];
    b[1][1] = m[3];
}

// B fragments of two neighbouring 16x8 blocks (n0 and n0 + 8) of a row-major tile itself:
// B[k][n] = tile[k0 + k][n0 + n] (e.g. B = V for O = P V, V stored one key per row): the
// transposed load of the blocks (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8).
__device__ __forceinline__ void load_b_x2(uint32_t b[2][2], const __nv_bfloat16* tile, int stride,
                                          int k0, int n0, int lane) {
    const int i = lane / 8, r = lane % 8;
    uint32_t m[4];
    ldmatrix_x4_trans(m, tile + (k0 + (i % 2) * 8 + r) * stride + n0 + (i / 2) * 8);
    b[0][0] = m[0];
    b[0][1] = m[1];
    b[1][0] = m[2];
    b[1][1] = m[3];
}

// o[i] [16, D] += a[i] [16, 16] times rows k0 .. k0 + 16 of a row-major [rows, D] tile, for M
// slabs of 16 rows i (e.g. P V with V stored one key per row): D / 8 accumulator tiles per slab,
// two per B load, each B load shared by the M slabs.
template <int D, int M>
__device__ __forceinline__ void mma_accumulate_rows(float (&o)[M][D / 8][4], const uint32_t (&a)[M][4],
                                                    const __nv_bfloat16* tile, int stride, int k0,
                                                    int lane) {
#pragma unroll
    for (int dn = 0; dn < D / 8; dn += 2) {
        uint32_t b[2][2];
        load_b_x2(b, tile, stride, k0, dn * 8, lane);
#pragma unroll
        for (int i = 0; i < M; i++) {
            mma_m16n8k16(o[i][dn], a[i], b[0]);
            mma_m16n8k16(o[i][dn + 1], a[i], b[1]);
        }
    }
}

// A fragment of the 16x16 block [16 rows, keys 16*kk .. 16*kk + 16) from accumulator tiles
// c[2kk] (columns 0..8) and c[2kk + 1] (columns 8..16), rounded to bf16 (see the header).
__device__ __forceinline__ void accumulators_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// One step of the online softmax of an m16 score tile, for this thread's two rows (g and g + 8):
// s holds NT [16, 8] accumulator tiles of raw scores q . k (-inf where masked), which become
// exp2(score * scale_log2 - max) with the running max in log2 units (scale_log2 = softmax scale
// times log2(e)); the running max, this thread's share of the running sum and the output
// accumulator o (DN [16, 8] tiles) are rescaled to the new max. The 4 threads of a row (same g)
// hold its scores between them. A row with no finite score so far stays empty (max -inf, sum
// and o 0): the exponent base is then 0, not -inf, which would give NaN.
template <int NT, int DN>
__device__ __forceinline__ void online_softmax_step(float (&s)[NT][4], float (&o)[DN][4],
                                                    float row_max[2], float row_sum[2],
                                                    float scale_log2) {
    for (int i = 0; i < 2; i++) {
        float mx = -INFINITY;  // of the raw scores: scaling by a positive factor keeps the order
        for (int nt = 0; nt < NT; nt++) { mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1])); }
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
        mx = fmaxf(row_max[i], mx * scale_log2);
        const float base = mx == -INFINITY ? 0.0f : mx;
        const float correction = exp2_approx(row_max[i] - base);  // 0 while the row was empty
        row_max[i] = mx;
        float sum = 0.0f;
        for (int nt = 0; nt < NT; nt++) {  // exp2(score * scale_log2 - base): one FFMA, one MUFU
            s[nt][2 * i] = exp2_approx(fmaf(s[nt][2 * i], scale_log2, -base));
            s[nt][2 * i + 1] = exp2_approx(fmaf(s[nt][2 * i + 1], scale_log2, -base));
            sum += s[nt][2 * i] + s[nt][2 * i + 1];
        }
        row_sum[i] = row_sum[i] * correction + sum;
        for (int dn = 0; dn < DN; dn++) {
            o[dn][2 * i] *= correction;
            o[dn][2 * i + 1] *= correction;
        }
    }
}

// One turn of a two-stage cp.async pipeline over `steps` steps: starts copying step + 1 (when
// there is one) into the other stage with `prefetch`, waits for this step's copies and makes
// them visible to the whole block.
template <class Prefetch>
__device__ __forceinline__ void pipeline_advance(int step, int steps, Prefetch prefetch) {
    if (step + 1 < steps) {
        prefetch(step + 1);
        copy_async_wait<1>();
    } else {
        copy_async_wait<0>();
    }
    __syncthreads();
}

// Starts copying rows [0, valid) of a global matrix (row r at src + r * src_stride, D bf16 each,
// 16-byte aligned, valid >= 1) into a shared tile of ROWS rows of D + TILE_PAD bf16, zero-filling
// rows valid..ROWS; all THREADS threads of the block (its blockDim.x) take part. The caller
// commits, waits and synchronises before reading the tile.
// Thread i copies the 16-byte column i % (D / 8) of rows i / (D / 8) + k * (THREADS / (D / 8)): its
// column is fixed, its rows a constant apart and their number known, so the copies unroll into a
// pointer increment each (striding by a runtime blockDim.x cost ~25 instructions of index
// arithmetic a copy).
template <int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async(__nv_bfloat16* tile, const __nv_bfloat16* src,
                                                size_t src_stride, int valid) {
    constexpr int VECS = D / 8;  // 16-byte vectors per row
    static_assert(THREADS % VECS == 0, "a thread keeps one column");
    constexpr int ROW_STEP = THREADS / VECS;  // rows between a thread's copies
    const int r0 = threadIdx.x / VECS, c = (threadIdx.x % VECS) * 8;  // r0 < ROW_STEP
    // (`from` may step past the source's last row; it is read only for rows < valid. An integer
    // offset instead of the pointer made ptxas keep more in registers: 228 against 175 in the
    // forward at d = 128)
    const __nv_bfloat16* from = src + r0 * src_stride + c;
    const size_t from_step = ROW_STEP * src_stride;
#pragma unroll
    for (int k = 0; k < (ROWS + ROW_STEP - 1) / ROW_STEP; k++, from += from_step) {
        const int r = r0 + k * ROW_STEP;
        if (ROWS % ROW_STEP != 0 && r >= ROWS) { break; }
        const bool in = r < valid;
        copy_async16(tile + r * (D + TILE_PAD) + c, in ? from : src, in);
    }
}

// Fragments of a [16 rows, D] slab of a global bf16 matrix (row r at base + r * stride), as the A
// operand of Q K^T-like products; rows at or beyond `valid` read as zeros.
template <int D>
__device__ __forceinline__ void load_rows_as_a(uint32_t frag[D / 16][4], const __nv_bfloat16* base,
                                               size_t stride, int row0, int valid, int g, int t) {
    const int r0 = row0 + g, r1 = row0 + g + 8;
    for (int kk = 0; kk < D / 16; kk++) {
        const int c = kk * 16 + 2 * t;
        frag[kk][0] = r0 < valid ? *reinterpret_cast<const uint32_t*>(base + r0 * stride + c) : 0u;
        frag[kk][1] = r1 < valid ? *reinterpret_cast<const uint32_t*>(base + r1 * stride + c) : 0u;
        frag[kk][2] = r0 < valid ? *reinterpret_cast<const uint32_t*>(base + r0 * stride + c + 8) : 0u;
        frag[kk][3] = r1 < valid ? *reinterpret_cast<const uint32_t*>(base + r1 * stride + c + 8) : 0u;
    }
}
