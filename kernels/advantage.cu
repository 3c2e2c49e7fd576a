// Group-normalised advantages (the CPU reference is src/grpo/advantage.rs: advantages): within
// each group of G rewards, A_i = (r_i - mean) / denom, denom = the group's std + eps, the batch's
// std + eps, or 1; a group whose rewards are all equal gets exact zeros.
//
// Layout: rewards (n) f64 (the host's values, uploaded as they are); out (n) f32.
// One block; each thread takes whole groups. Every sum runs sequentially in index order with
// explicitly rounded f64 operations (no fused multiply-add), so the results are the CPU's bit for
// bit before the final rounding to f32. std_kind: 0 population (divide by n), 1 unbiased (n - 1);
// scale: 0 group, 1 batch, 2 none.

#include "common.cuh"

#define ADVANTAGE_THREADS 256

__device__ __forceinline__ double mean_f64(const double* x, int n) {
    double sum = 0.0;
    for (int i = 0; i < n; i++) { sum = __dadd_rn(sum, x[i]); }
    return sum / (double)n;
}

// sqrt(sum (x - mean)^2 / dof), 0 when there is no degree of freedom (as grpo::advantage::std)
__device__ __forceinline__ double std_f64(const double* x, int n, int std_kind) {
    const double m = mean_f64(x, n);
    double ss = 0.0;
    for (int i = 0; i < n; i++) {
        const double d = __dsub_rn(x[i], m);
        ss = __dadd_rn(ss, __dmul_rn(d, d));
    }
    const int dof = std_kind == 0 ? n : n - 1;
    return dof <= 0 ? 0.0 : sqrt(ss / (double)dof);
}

extern "C" __global__ void __launch_bounds__(ADVANTAGE_THREADS)
group_advantages(float* out, const double* rewards, int n, int group_size, int std_kind,
                 int scale, double eps) {
    __shared__ double batch_std_s;
    if (threadIdx.x == 0) { batch_std_s = scale == 1 ? std_f64(rewards, n, std_kind) : 0.0; }
    __syncthreads();
    for (int g = threadIdx.x; g < n / group_size; g += blockDim.x) {
        const double* r = rewards + (size_t)g * group_size;
        float* a = out + (size_t)g * group_size;
        bool all_equal = true;
        // from i = 0 as the host's all(): a NaN reward is not equal to itself
        for (int i = 0; i < group_size; i++) { all_equal = all_equal && r[i] == r[0]; }
        if (all_equal) {
            for (int i = 0; i < group_size; i++) { a[i] = 0.0f; }
            continue;
        }
        const double m = mean_f64(r, group_size);
        const double denom = scale == 0   ? __dadd_rn(std_f64(r, group_size, std_kind), eps)
                             : scale == 1 ? __dadd_rn(batch_std_s, eps)
                                          : 1.0;
        for (int i = 0; i < group_size; i++) { a[i] = (float)(__dsub_rn(r[i], m) / denom); }
    }
}
