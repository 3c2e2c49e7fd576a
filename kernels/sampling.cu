// Drawing the next token of every sequence on the GPU, so a decode step moves one id per
// sequence to the host instead of a row of logits. CPU reference: crate::sampling::sample
// (src/sampling.rs), through src/backend/cpu/sampling.rs.
//
// The draw is the CPU's inverse CDF: p_i = exp((z_i − max) / τ) in f64, target = u · Σ p over
// the kept tokens, and the token is the first kept i (vocabulary order) whose running sum
// exceeds the target. u is given (two floats, hi + lo) or drawn here with Philox from (seed,
// stream, step), the CPU's numbers. The chosen token's log-probability under the whole tempered
// softmax (crate::sampling::token_logprob) comes out too, for GRPO's old log-probs.
//
// Kept tokens: the CPU ranks tokens by logit (descending, ties to the lower index) and keeps a
// ranked prefix (top-k, then top-p). A prefix is "every token ranked at or above a cut-off
// token", and the cut-off is found without sorting: a radix search on the logit's 32-bit rank
// key, two bits per pass, picks the key where the running weight (count for top-k, probability
// for top-p) reaches the target, and a walk in index order picks how many of the tokens tied at
// that key are kept.
//
// Layouts: the radix passes stride the row by the block; the ordered walks (inverse CDF, ties)
// give each warp one contiguous chunk of the vocabulary (its lanes read 32 consecutive logits at
// a time), thread 0 walks the 32 chunk sums in order to find the chunk that holds the target,
// and that warp walks its chunk tile by tile with a warp scan or ballot. Every sum is taken in a
// fixed order (thread, lane tree, warps in order), so a draw does not depend on timing; only the
// summation order (and CUDA's f64 exp, within 1 ulp of the CPU's) differs from the CPU, which can
// move a token only when a running sum lands within ~1e-15 of its target.
#include "common.cuh"
#include "philox.cuh"

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / WARP_SIZE)

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int offset = 16; offset > 0; offset /= 2) { v += __shfl_xor_sync(FULL_MASK, v, offset); }
    return v;
}

// The logit's position in f32 total order (Rust's f32::total_cmp) as an unsigned key: larger
// key = ranked higher.
__device__ __forceinline__ unsigned rank_key(float z) {
    const unsigned bits = __float_as_uint(z);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_logit(unsigned key) {
    return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ double token_prob(float z, double max, double inv_t) {
    return exp(((double)z - max) * inv_t);
}

// The kept set: every token ranked at or above the cut-off token (key, index).
struct Cut {
    unsigned key;
    int index;
};

__device__ __forceinline__ bool is_kept(Cut cut, unsigned key, int i) {
    return key > cut.key || (key == cut.key && i <= cut.index);
}

// The warp's contiguous chunk [first, last) of the vocabulary, a whole number of 32-token tiles.
__device__ __forceinline__ void warp_chunk(int vocab, int* first, int* last) {
    const int chunk = ceil_div(ceil_div(vocab, SAMPLE_WARPS), WARP_SIZE) * WARP_SIZE;
    *first = min(vocab, (int)(threadIdx.x / WARP_SIZE) * chunk);
    *last = min(vocab, *first + chunk);
}

// Whether a logit keeps its row from being drawn from: NaN or +inf (crate::sampling::drawable;
// a row with no finite logit cannot be drawn from either).
__device__ __forceinline__ bool poisons_row(float z) { return isnan(z) || z == INFINITY; }

// First maximum of the row (lowest index among equals), by every thread of the block; -1 when
// the row cannot be drawn from.
__device__ int argmax_row(const float* z, int vocab) {
    __shared__ float values[SAMPLE_THREADS];
    __shared__ int indices[SAMPLE_THREADS];
    float best = -INFINITY, poisoned = 0.0f;
    int best_i = vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float zi = z[i];
        if (poisons_row(zi)) { poisoned = 1.0f; }
        if (zi > best || best_i == vocab) { best = zi; best_i = i; }
    }
    poisoned = block_reduce_max(poisoned, true);
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
    return poisoned > 0.0f || values[0] == -INFINITY ? -1 : indices[0];
}

// Σ of the kept tokens' probabilities, in a fixed order; every thread receives it.
__device__ double kept_mass(const float* z, int vocab, double max, double inv_t, Cut cut) {
    __shared__ double warp_sums[SAMPLE_WARPS];
    __shared__ double total;
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float zi = z[i];
        if (is_kept(cut, rank_key(zi), i)) { sum += token_prob(zi, max, inv_t); }
    }
    sum = warp_sum_f64(sum);
    if (threadIdx.x % WARP_SIZE == 0) { warp_sums[threadIdx.x / WARP_SIZE] = sum; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
#pragma unroll 1
        for (int w = 0; w < SAMPLE_WARPS; w++) { t += warp_sums[w]; }
        total = t;
    }
    __syncthreads();
    return total;
}

// The index of the n-th token (n >= 1, index order) of `within` whose key is `key`; the last
// such token when there are fewer. Every thread receives it.
__device__ int nth_tie(const float* z, int vocab, unsigned key, Cut within, int n) {
    __shared__ int warp_counts[SAMPLE_WARPS];
    __shared__ int walker, walk_n, answer;
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    int first, last;
    warp_chunk(vocab, &first, &last);
    int count = 0;
    for (int i = first + lane; i < last; i += WARP_SIZE) {
        const unsigned k = rank_key(z[i]);
        count += k == key && is_kept(within, k, i);
    }
    for (int offset = 16; offset > 0; offset /= 2) { count += __shfl_xor_sync(FULL_MASK, count, offset); }
    if (lane == 0) { warp_counts[warp] = count; }
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
#pragma unroll 1
        for (int w = 0; w < SAMPLE_WARPS; w++) { total += warp_counts[w]; }
        // n past the last tie (a rounded top-p count can be) asks for the last one
        int left = min(n, total), chosen = 0;
#pragma unroll 1
        for (int w = 0; w < SAMPLE_WARPS; w++) {
            if (warp_counts[w] > 0) {
                chosen = w;
                if (left <= warp_counts[w]) { break; }
                left -= warp_counts[w];
            }
        }
        walker = chosen;
        walk_n = left;
    }
    __syncthreads();
    if (warp == walker) {
        int left = walk_n, found = -1;
        for (int base = first; base < last; base += WARP_SIZE) {
            const int i = base + lane;
            unsigned k = i < last ? rank_key(z[i]) : 0u;
            unsigned ties = __ballot_sync(FULL_MASK, i < last && k == key && is_kept(within, k, i));
            const int c = __popc(ties);
            if (left <= c) {
                for (int j = 1; j < left; j++) { ties &= ties - 1; }  // drop the first left − 1
                found = base + __ffs(ties) - 1;
                break;
            }
            left -= c;
            if (ties != 0) { found = base + (WARP_SIZE - 1 - __clz(ties)); }
        }
        if (lane == 0) { answer = found; }
    }
    __syncthreads();
    return answer;
}

// The cut-off of the shortest ranked prefix of `within` whose weight reaches `target`: weight 1
// per token (top-k, target k) or its probability (top-p, target top_p · mass). Every thread
// receives it. Each pass sums the weight of the tokens that match the key bits chosen so far,
// by their next two bits; thread 0 walks the four digits from the top and keeps the one where
// the running weight reaches the target (or, when rounding leaves the target past the end, the
// last digit with any weight). The tokens tied at the final key share one weight, so the count
// of them still needed is a division.
__device__ Cut select_cut(const float* z, int vocab, bool by_prob, double max, double inv_t,
                          Cut within, double target) {
    __shared__ double digit_sums[SAMPLE_WARPS][4];
    __shared__ unsigned prefix_shared;
    __shared__ double above_shared;  // weight of the tokens whose key is above the prefix
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    if (threadIdx.x == 0) {
        prefix_shared = 0u;
        above_shared = 0.0;
    }
    __syncthreads();
#pragma unroll 1
    for (int shift = 30; shift >= 0; shift -= 2) {
        const unsigned decided = shift == 30 ? 0u : ~0u << (shift + 2);
        const unsigned prefix = prefix_shared;
        double w0 = 0.0, w1 = 0.0, w2 = 0.0, w3 = 0.0;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float zi = z[i];
            const unsigned key = rank_key(zi);
            if ((key & decided) != prefix || !is_kept(within, key, i)) { continue; }
            const double w = by_prob ? token_prob(zi, max, inv_t) : 1.0;
            const unsigned digit = (key >> shift) & 3u;
            w0 += digit == 0 ? w : 0.0;
            w1 += digit == 1 ? w : 0.0;
            w2 += digit == 2 ? w : 0.0;
            w3 += digit == 3 ? w : 0.0;
        }
        w0 = warp_sum_f64(w0);
        w1 = warp_sum_f64(w1);
        w2 = warp_sum_f64(w2);
        w3 = warp_sum_f64(w3);
        if (lane == 0) {
            digit_sums[warp][0] = w0;
            digit_sums[warp][1] = w1;
            digit_sums[warp][2] = w2;
            digit_sums[warp][3] = w3;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double sums[4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll 1
            for (int w = 0; w < SAMPLE_WARPS; w++) {
#pragma unroll
                for (int d = 0; d < 4; d++) { sums[d] += digit_sums[w][d]; }
            }
            double above = above_shared, chosen_above = above_shared;
            unsigned chosen = 0u;
            bool done = false;
#pragma unroll
            for (int d = 3; d >= 0; d--) {
                if (!done && sums[d] > 0.0) {
                    chosen = (unsigned)d;
                    chosen_above = above;
                    if (above + sums[d] >= target) { done = true; }
                    above += sums[d];
                }
            }
            prefix_shared = prefix | (chosen << shift);
            above_shared = chosen_above;
        }
        __syncthreads();
    }
    const unsigned key = prefix_shared;
    const double above = above_shared;
    const double tie_weight = by_prob ? token_prob(key_logit(key), max, inv_t) : 1.0;
    const double needed = ceil((target - above) / tie_weight);
    const int n = (int)fmin(fmax(needed, 1.0), (double)vocab);
    return Cut{key, nth_tie(z, vocab, key, within, n)};
}

// out[row] = the drawn token id (as a float: exact below 2^24) for each row of logits, and
// logp[row] = its log-probability log softmax(z / τ)[id] over the whole vocabulary (0 when
// greedy: the draw is certain); both NaN for a row that cannot be drawn from (a NaN, a +inf,
// or no finite logit: crate::sampling::drawable). logits (rows, vocab) f32. The uniform of a row: uniforms[2 row] + uniforms[2 row + 1] (the f64
// draw split in two floats) when uniforms is given, else Philox's (seed, first_stream +
// streams[row], step). temperature 0 = greedy (argmax, lowest index among equals; top-k and
// top-p do not apply); top_k <= 0 or >= vocab = off; top_p >= 1 = off. grid = rows,
// block = SAMPLE_THREADS (one block per SM at most: ptxas would otherwise aim at two and spill).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS, 1)
sample_tokens(float* out, float* logp, const float* logits, const float* uniforms, const unsigned* streams,
              int vocab, float temperature, int top_k, float top_p, unsigned long long seed,
              unsigned long long first_stream, unsigned long long step) {
    const float* z = logits + (size_t)blockIdx.x * vocab;
    if (temperature == 0.0f) {
        const int token = argmax_row(z, vocab);
        if (threadIdx.x == 0) {
            out[blockIdx.x] = token < 0 ? NAN : (float)token;
            logp[blockIdx.x] = token < 0 ? NAN : 0.0f;
        }
        return;
    }
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    int first, last;
    warp_chunk(vocab, &first, &last);

    // A NaN counts as +inf here, so the maximum is finite exactly when the row can be drawn from.
    float local_max = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float zi = z[i];
        local_max = fmaxf(local_max, poisons_row(zi) ? INFINITY : zi);
    }
    const float row_max = block_reduce_max(local_max, true);
    if (!isfinite(row_max)) {
        if (threadIdx.x == 0) {
            out[blockIdx.x] = NAN;
            logp[blockIdx.x] = NAN;
        }
        return;
    }
    const double max = (double)row_max;
    const double inv_t = 1.0 / (double)temperature;

    Cut cut = Cut{0u, vocab};  // every token
    const bool restricted = (top_k > 0 && top_k < vocab) || top_p < 1.0f;
    // Σ p over the whole vocabulary, for the log-probability (the walk's total when nothing is cut).
    const double softmax_total = restricted ? kept_mass(z, vocab, max, inv_t, cut) : 0.0;
    if (top_k > 0 && top_k < vocab) { cut = select_cut(z, vocab, false, max, inv_t, cut, (double)top_k); }
    if (top_p < 1.0f) {
        const bool cut_by_k = top_k > 0 && top_k < vocab;
        const double mass = cut_by_k ? kept_mass(z, vocab, max, inv_t, cut) : softmax_total;
        cut = select_cut(z, vocab, true, max, inv_t, cut, (double)top_p * mass);
    }

    double lane_sum = 0.0;
    for (int i = first + lane; i < last; i += WARP_SIZE) {
        const float zi = z[i];
        if (is_kept(cut, rank_key(zi), i)) { lane_sum += token_prob(zi, max, inv_t); }
    }
    const double chunk_sum = warp_sum_f64(lane_sum);

    // Thread 0 walks the chunk sums in order, as the CPU walks the probabilities. Sequential sums
    // of non-negative values only grow, so a chunk without probability is never chosen; when
    // rounding leaves the target at or past the end, the last chunk with any probability
    // answers with its last kept token, as the CPU does.
    __shared__ double chunk_sums[SAMPLE_WARPS];
    __shared__ double walk_start, walk_target, log_total;
    __shared__ int walker;
    if (lane == 0) { chunk_sums[warp] = chunk_sum; }
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        // (not unrolled: unrolling these two loops spills registers)
#pragma unroll 1
        for (int w = 0; w < SAMPLE_WARPS; w++) { total += chunk_sums[w]; }
        const double u = uniforms != nullptr
                             ? (double)uniforms[2 * blockIdx.x] + (double)uniforms[2 * blockIdx.x + 1]
                             : philox_uniform(seed, first_stream + streams[blockIdx.x], step);
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
        log_total = log(restricted ? softmax_total : total);
    }
    __syncthreads();
    if (warp != walker) { return; }

    // The chosen warp walks its chunk 32 tokens at a time: an inclusive warp scan of the tile's
    // kept probabilities gives each lane its running sum; the first lane past the target answers.
    double cum = walk_start;
    int last_kept = first;
    for (int base = first; base < last; base += WARP_SIZE) {
        const int i = base + lane;
        double p = 0.0;
        if (i < last) {
            const float zi = z[i];
            if (is_kept(cut, rank_key(zi), i)) { p = token_prob(zi, max, inv_t); }
        }
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
    if (lane == 0) {
        out[blockIdx.x] = (float)last_kept;
        logp[blockIdx.x] = (float)(((double)z[last_kept] - max) * inv_t - log_total);
    }
}
