// Drawing the next token of every sequence on the GPU, so a decode step moves one id per
// sequence to the host instead of a row of logits. CPU reference: crate::sampling::sample
// (src/sampling.rs), through src/backend/cpu/sampling.rs.
//
// The draw is the CPU's inverse CDF: p_i = exp((z_i − max) / τ) in f64, target = u · Σ p, and
// the token is the first i (vocabulary order) whose running sum exceeds the target. Each warp
// owns one contiguous chunk of the vocabulary (its lanes read 32 consecutive logits at a time);
// thread 0 walks the 32 chunk sums in order to find the chunk that holds the target, and that
// warp walks its chunk tile by tile with a warp scan. Only the summation order differs from the
// CPU, which can move a token only when u lands within ~1e-15 of a boundary.
#include "common.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / WARP_SIZE)

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int offset = 16; offset > 0; offset /= 2) { v += __shfl_xor_sync(FULL_MASK, v, offset); }
    return v;
}

// First maximum of the row (lowest index among equals), by every thread of the block.
__device__ int argmax_row(const float* z, int vocab) {
    __shared__ float values[SAMPLE_THREADS];
    __shared__ int indices[SAMPLE_THREADS];
    float best = -INFINITY;
    int best_i = vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        if (z[i] > best || best_i == vocab) { best = z[i]; best_i = i; }
    }
    values[threadIdx.x] = best;
    indices[threadIdx.x] = best_i;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) {
            const float v = values[threadIdx.x + stride];
            const int j = indices[threadIdx.x + stride];
            const int i = indices[threadIdx.x];
            if (j < vocab && (i == vocab || v > values[threadIdx.x] || (v == values[threadIdx.x] && j < i))) {
                values[threadIdx.x] = v;
                indices[threadIdx.x] = j;
            }
        }
        __syncthreads();
    }
    return indices[0];
}

// out[row] = the drawn token id (as a float: exact below 2^24) for each row of logits.
// logits (rows, vocab) f32; uniforms (rows, 2) f32: u = hi + lo, the f64 draw split in two
// floats; temperature 0 = greedy (argmax, lowest index among equals). grid = rows,
// block = SAMPLE_THREADS (one block per SM at most: ptxas would otherwise aim at two and spill).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, 1)
sample_tokens(float* out, const float* logits, const float* uniforms, int vocab, float temperature) {
    const float* z = logits + (size_t)blockIdx.x * vocab;
    if (temperature == 0.0f) {
        const int token = argmax_row(z, vocab);
        if (threadIdx.x == 0) { out[blockIdx.x] = (float)token; }
        return;
    }
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const int chunk = ceil_div(ceil_div(vocab, SAMPLE_WARPS), WARP_SIZE) * WARP_SIZE;
    const int first = min(vocab, warp * chunk);
    const int last = min(vocab, first + chunk);

    float local_max = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) { local_max = fmaxf(local_max, z[i]); }
    const double max = (double)block_reduce_max(local_max);
    const double inv_t = 1.0 / (double)temperature;

    double lane_sum = 0.0;
    for (int i = first + lane; i < last; i += WARP_SIZE) { lane_sum += exp(((double)z[i] - max) * inv_t); }
    const double chunk_sum = warp_sum_f64(lane_sum);

    // Thread 0 walks the chunk sums in order, as the CPU walks the probabilities. Sequential sums
    // of non-negative values only grow, so a chunk without probability is never chosen; when
    // rounding leaves the target at or past the end, the last chunk with any probability
    // answers with its last kept token, as the CPU does.
    __shared__ double chunk_sums[SAMPLE_WARPS];
    __shared__ double walk_start, walk_target;
    __shared__ int walker;
    if (lane == 0) { chunk_sums[warp] = chunk_sum; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        // (not unrolled: unrolling these two loops spills registers)
#pragma unroll 1
        for (int w = 0; w < SAMPLE_WARPS; w++) { total += chunk_sums[w]; }
        const double u = (double)uniforms[2 * blockIdx.x] + (double)uniforms[2 * blockIdx.x + 1];
        const double target = u * total;
        double cum = 0.0;
        int chosen = -1;
#pragma unroll 1
        for (int w = 0; w < SAMPLE_WARPS; w++) {
            if (chunk_sums[w] > 0.0) {
                chosen = w;
                walk_start = cum;
                if (target < cum + chunk_sums[w]) { break; }
            }
            cum += chunk_sums[w];
        }
        walker = chosen;
        walk_target = target;
    }
    __syncthreads();
    if (warp != walker) { return; }

    // The chosen warp walks its chunk 32 tokens at a time: an inclusive warp scan of the tile's
    // probabilities gives each lane its running sum; the first lane past the target answers.
    double cum = walk_start;
    int last_kept = first;
    for (int base = first; base < last; base += WARP_SIZE) {
        const int i = base + lane;
        const double p = i < last ? exp(((double)z[i] - max) * inv_t) : 0.0;
        double running = p;
        for (int offset = 1; offset < WARP_SIZE; offset *= 2) {
            const double other = __shfl_up_sync(FULL_MASK, running, offset);
            if (lane >= offset) { running += other; }
        }
        const unsigned kept = __ballot_sync(FULL_MASK, p > 0.0);
        const unsigned past = __ballot_sync(FULL_MASK, p > 0.0 && walk_target < cum + running);
        if (past != 0) {
            last_kept = base + __ffs(past) - 1;
            break;
        }
        if (kept != 0) { last_kept = base + (WARP_SIZE - 1 - __clz(kept)); }
        cum += __shfl_sync(FULL_MASK, running, WARP_SIZE - 1);
    }
    // A walk whose own running sum ends just below the chunk's sum answers with the chunk's
    // last kept token.
    if (lane == 0) { out[blockIdx.x] = (float)last_kept; }
}
