// Row gathers: the embedding lookup and the selection of rows of an activation.
//
//   embedding_forward:          out[r, :] = table[ids[r], :]         ids: u32 (rows)
//   embedding_forward_sampled:  out[r, :] = table[sampled[rows[r]], :]  sampled: f32 ids (as
//                               sample_tokens writes them), rows: u32 (rows)
//   gather_rows:                out[r, :] = x[rows[r], :]            x: (*, dim), rows: u32 (rows)
//
// All are the same copy; they have separate entry points so that a profile names the op. The
// u32 indices are validated on the host (the backend), so the kernels trust them; the sampled
// ids never visit the host before the lookup, so an id outside the table gives a row of NaN
// (the decode loop checks every id when it downloads them).
//
// Layout: out is (rows, dim), all bf16, row-major and contiguous.
// Parallelisation (src/cuda/ops/embedding.rs): grid.x strides over the columns of a row, in
// 8-element 16-byte vectors when dim % 8 == 0 and both pointers are 16-byte aligned (then every
// row start is aligned too), element by element otherwise; grid.y strides over the rows. The
// row offsets are size_t: vocab * dim exceeds 2^31 for large vocabularies.

#include "common.cuh"

// The source row of each output row: index[r].
struct ListedRow {
    const uint32_t* index;
    __device__ size_t operator()(int r) const { return index[r]; }
};

// The source row of each output row: the sampled id sampled[rows[r]]; vocab (one past the
// table) when the id is not a valid row.
struct SampledRow {
    const float* sampled;
    const uint32_t* rows;
    int vocab;
    __device__ size_t operator()(int r) const {
        const float id = sampled[rows[r]];
        return (id >= 0.0f && id < (float)vocab) ? (size_t)id : (size_t)vocab;
    }
};

template <class SourceRow>
__device__ __forceinline__ void copy_rows(__nv_bfloat16* out, const __nv_bfloat16* src,
                                          SourceRow source_row, size_t src_rows, int rows, int dim) {
    constexpr int VEC = x128::size;
    const bool vectorised = (dim % VEC == 0) && is_aligned16(out) && is_aligned16(src);
    const int step = vectorised ? VEC : 1;
    // size_t: c + stride must not overflow for dim close to 2^31
    const size_t first = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * step;
    const size_t stride = (size_t)gridDim.x * blockDim.x * step;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const size_t source = source_row(r);
        __nv_bfloat16* out_row = out + (size_t)r * dim;
        if (source >= src_rows) {
            for (size_t c = first / step; c < (size_t)dim; c += stride / step) { out_row[c] = __float2bfloat16(NAN); }
            continue;
        }
        const __nv_bfloat16* src_row = src + source * dim;
        if (vectorised) {
            // ordinary (cached) load: a repeated id or row is served from L2
            for (size_t c = first; c < (size_t)dim; c += stride) { store128(out_row + c, load128(src_row + c)); }
        } else {
            for (size_t c = first; c < (size_t)dim; c += stride) { out_row[c] = src_row[c]; }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
embedding_forward(__nv_bfloat16* out, const __nv_bfloat16* table, const uint32_t* ids, int rows, int dim) {
    copy_rows(out, table, ListedRow{ids}, SIZE_MAX, rows, dim);
}

// vocab: rows of the table.
extern "C" __global__ void __launch_bounds__(256)
embedding_forward_sampled(__nv_bfloat16* out, const __nv_bfloat16* table, const float* sampled,
                          const uint32_t* rows_index, int rows, int dim, int vocab) {
    copy_rows(out, table, SampledRow{sampled, rows_index, vocab}, (size_t)vocab, rows, dim);
}

extern "C" __global__ void __launch_bounds__(256)
gather_rows(__nv_bfloat16* out, const __nv_bfloat16* x, const uint32_t* rows_index, int rows, int dim) {
    copy_rows(out, x, ListedRow{rows_index}, SIZE_MAX, rows, dim);
}

// ----------------------------------------------------------------------------
// backward (CPU reference: backend::cpu::embedding), dst[index[r], :] += dout[r, :]:
//   embedding_backward: dst = dtable f32 (a parameter gradient), index = token ids
//   scatter_add_rows:   dst = dx bf16 (an activation gradient), index = rows
// Indices may repeat, so the host groups the sources by destination (sources in increasing r):
// group g adds the rows src_rows[offsets[g] .. offsets[g + 1]] of dout, in that order, to row
// dst_rows[g] of dst. No atomics: the same result run to run.
// dout (m, dim) bf16; grid = (columns / 256, groups up to 65535; the y loop covers the rest).

template <class T>
__device__ void add_rows_grouped(T* dst, const __nv_bfloat16* dout, const uint32_t* offsets,
                                 const uint32_t* src_rows, const uint32_t* dst_rows, int groups, int dim) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= dim) { return; }
    for (int g = blockIdx.y; g < groups; g += gridDim.y) {
        float sum = 0.0f;
        for (uint32_t k = offsets[g]; k < offsets[g + 1]; k++) {
            sum += bf16_to_f32(dout[(size_t)src_rows[k] * dim + col]);
        }
        T* out = dst + (size_t)dst_rows[g] * dim + col;
        *out = from_f32<T>(to_f32(*out) + sum);
    }
}

extern "C" __global__ void __launch_bounds__(256)
embedding_backward(float* dtable, const __nv_bfloat16* dout, const uint32_t* offsets,
                   const uint32_t* src_rows, const uint32_t* dst_rows, int groups, int dim) {
    add_rows_grouped(dtable, dout, offsets, src_rows, dst_rows, groups, dim);
}

extern "C" __global__ void __launch_bounds__(256)
scatter_add_rows(__nv_bfloat16* dx, const __nv_bfloat16* dout, const uint32_t* offsets,
                 const uint32_t* src_rows, const uint32_t* dst_rows, int groups, int dim) {
    add_rows_grouped(dx, dout, offsets, src_rows, dst_rows, groups, dim);
}
