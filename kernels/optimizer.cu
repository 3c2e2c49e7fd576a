// The optimizer's kernels: the sum of squares behind the global gradient norm, the fixed-order
// column sums that reduce the loss statistics, and the fused AdamW update of the f32 master
// weights that also writes the bf16 weights the model computes with. CPU reference:
// src/backend/cpu/optimizer.rs (and AdamWStep::update in src/optim.rs).
#include "common.cuh"

// sum_squares runs with a fixed grid so the order of the additions depends on n only: every
// run sums the same partials in the same order (the CPU's fixed-order sums are what make a
// resumed run repeat an uninterrupted one; atomics would not).
#define SUM_SQUARES_BLOCKS 1024
#define SUM_SQUARES_THREADS 256

__device__ __forceinline__ double warp_reduce_sum_f64(double val) {
    for (int offset = 16; offset > 0; offset /= 2) { val += __shfl_xor_sync(FULL_MASK, val, offset); }
    return val;
}

// The block's sum (blockDim.x a multiple of 32, at most 1024); valid in thread 0.
__device__ double block_reduce_sum_f64(double val) {
    __shared__ double warp_sums[32];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    val = warp_reduce_sum_f64(val);
    if (lane == 0) { warp_sums[warp] = val; }
    __syncthreads();
    const int warps = blockDim.x / WARP_SIZE;
    val = threadIdx.x < warps ? warp_sums[threadIdx.x] : 0.0;
    if (warp == 0) { val = warp_reduce_sum_f64(val); }
    return val;
}

// partials[block] = Σ x[i]² over the block's grid-stride share, in f64.
// x (n) f32; partials (SUM_SQUARES_BLOCKS) f64. grid = SUM_SQUARES_BLOCKS x SUM_SQUARES_THREADS.
extern "C" __global__ void __launch_bounds__(SUM_SQUARES_THREADS)
sum_squares_partial(double* partials, const float* x, long long n) {
    double sum = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const double v = x[i];
        sum += v * v;
    }
    sum = block_reduce_sum_f64(sum);
    if (threadIdx.x == 0) { partials[blockIdx.x] = sum; }
}

// out = [hi, lo] with hi = f32(total), lo = f32(total - hi), total = Σ partials (f64).
// One block of SUM_SQUARES_BLOCKS threads.
extern "C" __global__ void __launch_bounds__(SUM_SQUARES_BLOCKS)
sum_squares_final(float* out, const double* partials) {
    const double total = block_reduce_sum_f64(partials[threadIdx.x]);
    if (threadIdx.x == 0) {
        const float hi = (float)total;
        out[0] = hi;
        out[1] = (float)(total - (double)hi);
    }
}

// out[2j], out[2j + 1] = hi, lo of the f64 sum of column j of x (rows, cols) f32: one block per
// column, each thread a fixed stride of rows, then the block's tree; the order depends on the
// shape only. grid = (cols, 1, 1), block = (SUM_SQUARES_THREADS, 1, 1).
extern "C" __global__ void __launch_bounds__(SUM_SQUARES_THREADS)
column_sums(float* out, const float* x, int rows, int cols) {
    const int col = blockIdx.x;
    double sum = 0.0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) { sum += x[(size_t)r * cols + col]; }
    sum = block_reduce_sum_f64(sum);
    if (threadIdx.x == 0) {
        const float hi = (float)sum;
        out[2 * col] = hi;
        out[2 * col + 1] = (float)(sum - (double)hi);
    }
}

// One AdamW step per element (AdamWStep::update): g = grad · grad_scale;
// m = β1 m + (1 − β1) g; v = β2 v + (1 − β2) g²; w −= lr (m c1 / (√(v c2) + eps) + wd w);
// params = bf16(w). master, m, v, grads (n) f32; params (n) bf16. Grid-stride over n.
extern "C" __global__ void __launch_bounds__(256)
adamw_step(__nv_bfloat16* params, float* master, float* m, float* v, const float* grads,
           long long n, float lr, float beta1, float beta2, float eps, float weight_decay,
           float c1, float c2, float grad_scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = grads[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        float w = master[i];
        w -= lr * ((mi * c1) / (sqrtf(vi * c2) + eps) + weight_decay * w);
        m[i] = mi;
        v[i] = vi;
        master[i] = w;
        params[i] = f32_to_bf16(w);
    }
}
