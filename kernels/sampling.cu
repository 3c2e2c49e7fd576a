// Drawing the next token of every sequence on the GPU, so a decode step moves one id per
// sequence to the host instead of a row of logits. CPU reference: crate::sampling::sample
// (src/sampling.rs), through src/backend/cpu/sampling.rs.
//
// The draw is the CPU's inverse CDF: p_i = exp((z_i − max) / τ) in f64, target = u · Σ p, and
// the token is the first i (vocabulary order) whose running sum exceeds the target. The block
// cuts the vocabulary into one contiguous chunk per thread; thread 0 finds the chunk that holds
// the target from the chunk sums, and that chunk's thread walks it. Only the summation order
// differs from the CPU (chunk sums, then their sum), which can move a token only when u lands
// within ~1e-15 of a boundary.
#include "common.cuh"

#define SAMPLE_THREADS 512

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

    // Thread 0 walks the chunk sums in order, as the CPU walks the probabilities: the total,
    // the target u · total, and the first chunk whose running sum passes the target. Sequential
    // sums of non-negative values only grow, so chunks without probability are never chosen.
    // When rounding leaves the target at or past the end, the last chunk with any probability
    // answers with its last kept token, as the CPU does.
    __shared__ double chunk_sums[SAMPLE_THREADS];
    __shared__ double walk_start, walk_target;
    __shared__ int walker;
    chunk_sums[threadIdx.x] = chunk_sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        // (not unrolled: unrolling these two loops spills registers on sm_90)
#pragma unroll 1
        for (int t = 0; t < (int)blockDim.x; t++) { total += chunk_sums[t]; }
        const double u = (double)uniforms[2 * blockIdx.x] + (double)uniforms[2 * blockIdx.x + 1];
        const double target = u * total;
        double cum = 0.0;
        int chosen = -1;
#pragma unroll 1
        for (int t = 0; t < (int)blockDim.x; t++) {
            const double sum = chunk_sums[t];
            if (sum > 0.0) {
                chosen = t;
                walk_start = cum;
                if (target < cum + sum) { break; }
            }
            cum += sum;
        }
        walker = chosen;
        walk_target = target;
    }
    __syncthreads();
    if ((int)threadIdx.x == walker) {
        double cum = walk_start;
        int last_kept = first;
        for (int i = first; i < last; i++) {
            const double p = exp(((double)z[i] - max) * inv_t);
            if (p > 0.0) {
                cum += p;
                last_kept = i;
                if (walk_target < cum) { break; }
            }
        }
        // A walk whose own running sum ends just below the chunk's scanned end answers with the
        // chunk's last kept token.
        out[blockIdx.x] = (float)last_kept;
    }
}
