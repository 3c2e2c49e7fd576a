// Drawing the next token of every sequence on the GPU, so a decode step moves one id per
// sequence to the host instead of a row of logits. CPU reference: crate::sampling::sample
// (src/sampling.rs), through src/backend/cpu/sampling.rs.
//
// The draw is the CPU's inverse CDF: p_i = exp((z_i − max) / τ) in f64, target = u · Σ p, and
// the token is the first i (vocabulary order) whose running sum exceeds the target. The block
// cuts the vocabulary into one contiguous chunk per thread, scans the chunk sums, and the thread
// whose chunk holds the target walks it. Only the summation order differs from the CPU (chunk
// sums, then their sum), which can move a token only when u lands within ~1e-15 of a boundary.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define NO_HOLDER 0x7fffffff

// Inclusive prefix sum of `val` over the block's threads (f64).
__device__ double block_inclusive_scan_f64(double val) {
    __shared__ double warp_totals[32];
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    for (int offset = 1; offset < WARP_SIZE; offset *= 2) {
        const double other = __shfl_up_sync(FULL_MASK, val, offset);
        if (lane >= offset) { val += other; }
    }
    if (lane == WARP_SIZE - 1) { warp_totals[warp] = val; }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / WARP_SIZE;
        double w = lane < warps ? warp_totals[lane] : 0.0;
        for (int offset = 1; offset < WARP_SIZE; offset *= 2) {
            const double other = __shfl_up_sync(FULL_MASK, w, offset);
            if (lane >= offset) { w += other; }
        }
        if (lane < warps) { warp_totals[lane] = w; }  // inclusive over warps
    }
    __syncthreads();
    if (warp > 0) { val += warp_totals[warp - 1]; }
    return val;
}

// out[row] = the drawn token id (as a float: exact below 2^24) for each row of logits.
// logits (rows, vocab) f32; uniforms (rows, 2) f32: u = hi + lo, the f64 draw split in two
// floats; temperature 0 = greedy (argmax, lowest index among equals). grid = rows,
// block = SAMPLE_THREADS.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_tokens(float* out, const float* logits, const float* uniforms, int vocab, float temperature) {
    const float* z = logits + (size_t)blockIdx.x * vocab;
    const int chunk = ceil_div(vocab, (int)blockDim.x);
    const int first = min(vocab, (int)threadIdx.x * chunk);
    const int last = min(vocab, first + chunk);

    if (temperature == 0.0f) {
        // First maximum of the chunk, then the block's: larger value, or equal and lower index.
        float best = -INFINITY;
        int best_i = vocab;
        for (int i = first; i < last; i++) {
            if (z[i] > best || best_i == vocab) { best = z[i]; best_i = i; }
        }
        __shared__ float values[SAMPLE_THREADS];
        __shared__ int indices[SAMPLE_THREADS];
        values[threadIdx.x] = best;
        indices[threadIdx.x] = best_i;
        __syncthreads();
        for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
            if (threadIdx.x < stride) {
                const float v = values[threadIdx.x + stride];
                const int j = indices[threadIdx.x + stride];
                const int i = indices[threadIdx.x];
                if (j < vocab && (i == vocab || v > values[threadIdx.x] ||
                                  (v == values[threadIdx.x] && j < i))) {
                    values[threadIdx.x] = v;
                    indices[threadIdx.x] = j;
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) { out[blockIdx.x] = (float)indices[0]; }
        return;
    }

    float local_max = -INFINITY;
    for (int i = first; i < last; i++) { local_max = fmaxf(local_max, z[i]); }
    const double max = (double)block_reduce_max(local_max);
    const double inv_t = 1.0 / (double)temperature;

    double chunk_sum = 0.0;
    for (int i = first; i < last; i++) { chunk_sum += exp(((double)z[i] - max) * inv_t); }
    // Each chunk's interval of the CDF is [previous thread's inclusive sum, its own): the same
    // doubles on both sides of every boundary, so every target in [0, total) lies in one.
    __shared__ double inclusive_sums[SAMPLE_THREADS];
    inclusive_sums[threadIdx.x] = block_inclusive_scan_f64(chunk_sum);
    __syncthreads();
    const double inclusive = inclusive_sums[threadIdx.x];
    const double exclusive = threadIdx.x > 0 ? inclusive_sums[threadIdx.x - 1] : 0.0;
    const double total = inclusive_sums[blockDim.x - 1];
    const double u = (double)uniforms[2 * blockIdx.x] + (double)uniforms[2 * blockIdx.x + 1];
    const double target = u * total;

    // The first chunk whose interval holds the target walks it (the scans round each sum on
    // its own, so neighbouring intervals may overlap by an ulp; the first one is the CPU's
    // answer). When rounding leaves the target at or past the end of the CDF, the last chunk
    // with any probability answers with its last kept token, as the CPU does.
    __shared__ int first_holder, last_nonzero;
    if (threadIdx.x == 0) {
        first_holder = NO_HOLDER;
        last_nonzero = -1;
    }
    __syncthreads();
    if (exclusive <= target && target < inclusive) { atomicMin(&first_holder, (int)threadIdx.x); }
    if (chunk_sum > 0.0) { atomicMax(&last_nonzero, (int)threadIdx.x); }
    __syncthreads();
    const int walker = first_holder != NO_HOLDER ? first_holder : last_nonzero;
    if ((int)threadIdx.x == walker) {
        double cum = exclusive;
        int last_kept = first;
        for (int i = first; i < last; i++) {
            const double p = exp(((double)z[i] - max) * inv_t);
            if (p > 0.0) {
                cum += p;
                last_kept = i;
                if (target < cum) { break; }
            }
        }
        // A walk whose own running sum ends just below the scanned boundary answers with the
        // chunk's last kept token.
        out[blockIdx.x] = (float)last_kept;
    }
}
