// RMSNorm, as used by the Qwen2 and Llama families (Hugging Face Qwen2RMSNorm / LlamaRMSNorm):
//
//     rstd = 1 / sqrt(mean(x^2) + eps)          (computed in fp32)
//     out  = weight * cast(x * rstd)            (cast to the storage dtype, then scaled)
//
// In PyTorch the normalised value is cast back to the input dtype *before* the multiplication by
// the weight (`self.weight * hidden_states.to(input_dtype)`), and the bf16 * bf16 product is
// computed in fp32 and rounded once more. The bf16 kernel reproduces exactly that double
// rounding, so it matches transformers bit-for-bit up to the order of the fp32 sum (the f32 CPU
// reference computes out = weight * (x * rstd) with no intermediate rounding).
//
// Layout: x and out are (rows, dim) row-major and contiguous, weight is (dim).
// Parallelisation: one thread block per row (grid = rows). blockDim.x must be a multiple of 32,
// at most 1024; the host picks about one 16-byte vector per thread (src/cuda/ops/rmsnorm.rs). Each
// thread walks the row with stride blockDim.x:
//   pass 1: sum of squares in fp32, reduced over the block -> rstd
//   pass 2: re-read x (it is still in L1/L2: a row is a few KB), normalise, scale, store.
// Rows whose length is a multiple of the vector width (8 for bf16, 4 for f32) and whose pointers
// are 16-byte aligned use 128-bit loads and stores; anything else takes the scalar path.
// out may alias x (in-place): every element is read by the thread that writes it, and all reads of
// pass 1 finish before the block reduction's barrier. add_rmsnorm_forward first adds a residual
// row into x (x += residual, the residual_add of the model), in the same pass 1.

#include "common.cuh"

// ----------------------------------------------------------------------------
// kernel body (templated on the storage type; only the bf16 instance has an entry point)

// With `residual` (not null), x is the residual stream: pass 1 first adds the row of residual
// to it (rounded to T once, as residual_add does) and stores the sum back into x, which pass 2
// then re-reads (each thread reads back only what it wrote).
template <class T>
__device__ __forceinline__ void rmsnorm_forward_block(T* out, T* x, const T* residual, const T* weight,
                                                      int rows, int dim, float eps) {
    constexpr int VEC = Packed128<T>::size;  // elements per 16-byte vector
    const int row = blockIdx.x;
    if (row >= rows) { return; }  // uniform over the block, so no thread misses a barrier

    T* x_row = x + (size_t)row * dim;
    const T* residual_row = residual ? residual + (size_t)row * dim : nullptr;
    T* out_row = out + (size_t)row * dim;

    // The 128-bit path needs every row start to be 16-byte aligned: true when the base pointers
    // are aligned and dim is a multiple of the vector width. Uniform over the grid.
    const bool vectorised = (dim % VEC == 0) && is_aligned16(x) && is_aligned16(out) && is_aligned16(weight) &&
                            (residual == nullptr || is_aligned16(residual));

    // pass 1: sum of squares, accumulated in fp32
    float sum_sq = 0.0f;
    if (vectorised) {
        for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
            Packed128<T> packed_x = load128(x_row + i);
            if (residual_row) {
                const Packed128<T> packed_r = load128cs(residual_row + i);  // not read again
                for (int k = 0; k < VEC; k++) { packed_x[k] = from_f32<T>(to_f32(packed_x[k]) + to_f32(packed_r[k])); }
                store128(x_row + i, packed_x);
            }
            for (int k = 0; k < VEC; k++) {
                const float v = to_f32(packed_x[k]);
                sum_sq += v * v;
            }
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            if (residual_row) { x_row[i] = from_f32<T>(to_f32(x_row[i]) + to_f32(residual_row[i])); }
            const float v = to_f32(x_row[i]);
            sum_sq += v * v;
        }
    }
    sum_sq = block_reduce_sum(sum_sq);
    // 1 / sqrt (both IEEE-rounded) rather than rsqrtf (2 ulp): once per row, and it is exactly
    // what the CPU reference computes
    const float rstd = 1.0f / sqrtf(sum_sq / (float)dim + eps);

    // pass 2: normalise, scale and store
    if (vectorised) {
        for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
            const Packed128<T> packed_x = load128(x_row + i);
            const Packed128<T> packed_w = load128(weight + i);
            Packed128<T> packed_out;
            for (int k = 0; k < VEC; k++) {
                packed_out[k] = rmsnorm_apply(packed_x[k], rstd, packed_w[k]);
            }
            store128(out_row + i, packed_out);
        }
    } else {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            out_row[i] = rmsnorm_apply(x_row[i], rstd, weight[i]);
        }
    }
}

// ----------------------------------------------------------------------------
// entry point (launched from src/cuda/ops/rmsnorm.rs: grid = (rows, 1, 1), block = (threads, 1, 1))

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_forward(__nv_bfloat16* out, const __nv_bfloat16* x, const __nv_bfloat16* weight,
                int rows, int dim, float eps) {
    // x is only read when there is no residual
    rmsnorm_forward_block<__nv_bfloat16>(out, const_cast<__nv_bfloat16*>(x), nullptr, weight, rows, dim, eps);
}

// x += residual, then out = rmsnorm(x): the residual add that closes the attention block and the
// norm that opens the MLP, in one launch (CPU reference: backend::cpu::rmsnorm::add_rmsnorm_forward).
extern "C" __global__ void __launch_bounds__(1024)
add_rmsnorm_forward(__nv_bfloat16* out, __nv_bfloat16* x, const __nv_bfloat16* residual,
                    const __nv_bfloat16* weight, int rows, int dim, float eps) {
    rmsnorm_forward_block<__nv_bfloat16>(out, x, residual, weight, rows, dim, eps);
}

// ----------------------------------------------------------------------------
// backward (the CPU reference is src/backend/cpu/rmsnorm.rs: rmsnorm_backward), with
// r = 1 / sqrt(mean(x^2) + eps) and g = weight * dout:
//     dx = r * g - x * r^3 * sum(g * x) / dim          (bf16, overwritten; with `accumulate`
//                                                       added to dx in fp32, rounded once)
//     dweight += sum over rows of dout * x * r          (f32: a parameter gradient)
// A block takes `rows_per_block` consecutive rows one after the other and sums its rows' dweight
// terms, each thread owning the same columns in every row; it writes that sum to
// partials[block, :], which add_column_sums (elementwise.cu) adds to dweight in an order fixed by
// the sizes: no atomics, the same result run to run. Two kernels:
//   rmsnorm_backward_vec (dim % 8 == 0, dim <= 8 * 1024, 16-byte aligned tensors): thread t owns
//       the 8 columns of one 16-byte vector (blockDim.x = dim / 8 rounded up to whole warps), so
//       its weight and dweight terms stay in registers; one block reduction per row.
//   rmsnorm_backward (any other shape): scalar loads, strided columns, dweight terms in shared
//       memory (dim f32, dynamic), two block reductions per row.

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_backward_vec(__nv_bfloat16* dx, float* partials, const __nv_bfloat16* dout, const __nv_bfloat16* x,
                     const __nv_bfloat16* weight, int rows, int dim, float eps, int rows_per_block,
                     int accumulate) {
    constexpr int VEC = x128::size;
    const int col = threadIdx.x * VEC;
    const bool owner = col < dim;  // the last warp may have threads past the row
    float w[VEC], dweight_sum[VEC];
    const x128 packed_w = owner ? load128(weight + col) : x128::zeros();
    for (int k = 0; k < VEC; k++) {
        w[k] = bf16_to_f32(packed_w[k]);
        dweight_sum[k] = 0.0f;
    }
    const int first = blockIdx.x * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    for (int row = first; row < last; row++) {
        const size_t at = (size_t)row * dim + col;
        // x and dout are read once (streaming); zeros past the row add nothing to the sums
        const x128 packed_x = owner ? load128cs(x + at) : x128::zeros();
        const x128 packed_d = owner ? load128cs(dout + at) : x128::zeros();
        float v[VEC], d[VEC];
        float2 sums = make_float2(0.0f, 0.0f);  // (sum x^2, sum g * x)
        for (int k = 0; k < VEC; k++) {
            v[k] = bf16_to_f32(packed_x[k]);
            d[k] = bf16_to_f32(packed_d[k]);
            sums.x += v[k] * v[k];
            sums.y += w[k] * d[k] * v[k];
        }
        sums = block_reduce_sum2(sums, true);  // final sync: the scratch is reused by the next row
        const float r = 1.0f / sqrtf(sums.x / (float)dim + eps);
        const float c = r * r * r * sums.y / (float)dim;
        if (owner) {
            x128 packed_dx = accumulate ? load128(dx + at) : x128::zeros();
            for (int k = 0; k < VEC; k++) {
                packed_dx[k] = f32_to_bf16(bf16_to_f32(packed_dx[k]) + (r * w[k] * d[k] - c * v[k]));
                dweight_sum[k] += d[k] * v[k] * r;
            }
            store128(dx + at, packed_dx);
        }
    }
    if (owner) {
        f128 low, high;
        for (int k = 0; k < f128::size; k++) {
            low[k] = dweight_sum[k];
            high[k] = dweight_sum[k + f128::size];
        }
        float* out = partials + (size_t)blockIdx.x * dim + col;
        store128(out, low);
        store128(out + f128::size, high);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
rmsnorm_backward(__nv_bfloat16* dx, float* partials, const __nv_bfloat16* dout, const __nv_bfloat16* x,
                 const __nv_bfloat16* weight, int rows, int dim, float eps, int rows_per_block, int accumulate) {
    DYNAMIC_SHARED(float, dweight_sum);  // [dim]
    for (int i = threadIdx.x; i < dim; i += blockDim.x) { dweight_sum[i] = 0.0f; }
    const int first = blockIdx.x * rows_per_block;
    const int last = min(rows, first + rows_per_block);
    for (int row = first; row < last; row++) {
        const __nv_bfloat16* x_row = x + (size_t)row * dim;
        const __nv_bfloat16* d_row = dout + (size_t)row * dim;
        float sum_sq = 0.0f, sum_gx = 0.0f;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = bf16_to_f32(x_row[i]);
            sum_sq += v * v;
            sum_gx += bf16_to_f32(weight[i]) * bf16_to_f32(d_row[i]) * v;
        }
        // final syncs: both reductions share one scratch, reused by the next row
        sum_sq = block_reduce_sum(sum_sq, true);
        sum_gx = block_reduce_sum(sum_gx, true);
        const float r = 1.0f / sqrtf(sum_sq / (float)dim + eps);
        const float c = r * r * r * sum_gx / (float)dim;
        __nv_bfloat16* dx_row = dx + (size_t)row * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            const float v = bf16_to_f32(x_row[i]), d = bf16_to_f32(d_row[i]);
            const float before = accumulate ? bf16_to_f32(dx_row[i]) : 0.0f;
            dx_row[i] = f32_to_bf16(before + (r * bf16_to_f32(weight[i]) * d - c * v));
            dweight_sum[i] += d * v * r;
        }
    }
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        partials[(size_t)blockIdx.x * dim + i] = dweight_sum[i];
    }
}
