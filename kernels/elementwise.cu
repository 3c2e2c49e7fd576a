// Elementwise ops on flat tensors: the residual add, the SwiGLU activation, the bias add after a
// GEMM, and bf16 <-> f32 conversions.
//
// All arithmetic is fp32; a bf16 result is rounded once (round to nearest even), so each op matches
// the f32 CPU reference (src/backend/cpu/) followed by a single cast to bf16.
//
// Flat kernels (residual_add, swiglu_forward, swiglu_backward, convert_*): 1-D grid-stride loops. When every pointer
// is 16-byte aligned (and, for SwiGLU, its rows' width a multiple of 8), each step handles one
// 8-element vector (one 128-bit load per bf16 operand, two per f32 operand) over the first
// n - n % 8 elements, and the n % 8 tail is done element by element; otherwise everything takes
// the scalar path. The host sizes the grid for ceil(n / 8)
// vector steps (src/cuda/ops/elementwise.rs); the grid-stride loop stays correct for any grid.
//
// bias_add: out is (m, n) row-major, bias (n). grid.x strides over column vectors (8 columns) or
// single columns, grid.y strides over rows, so each thread loads its bias chunk once and reuses it
// for every row it visits, with no division in the index arithmetic.
//
// Indices are size_t: n (or m * n) may approach 2^31 and i + stride must not overflow.

#include "common.cuh"

constexpr int BF16_VEC = x128::size;  // 8 bf16 per 16-byte vector

// the first element index not covered by the vector path (0 when the scalar path is taken)
__device__ __forceinline__ size_t vector_end(bool vectorised, int n) {
    return vectorised ? (size_t)(n / BF16_VEC) * BF16_VEC : 0;
}

__device__ __forceinline__ size_t global_thread() {
    return (size_t)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ size_t grid_threads() {
    return (size_t)gridDim.x * blockDim.x;
}

// ----------------------------------------------------------------------------
// x[i] += y[i]   x, y: bf16 (n). Sum in fp32, rounded once.

__device__ __forceinline__ __nv_bfloat16 add_bf16(__nv_bfloat16 a, __nv_bfloat16 b) {
    return f32_to_bf16(bf16_to_f32(a) + bf16_to_f32(b));
}

extern "C" __global__ void __launch_bounds__(256)
residual_add(__nv_bfloat16* x, const __nv_bfloat16* y, int n) {
    const bool vectorised = is_aligned16(x) && is_aligned16(y);
    const size_t end = vector_end(vectorised, n);
    for (size_t i = global_thread() * BF16_VEC; i < end; i += grid_threads() * BF16_VEC) {
        const x128 a = load128(x + i);
        const x128 b = load128cs(y + i);  // y (the branch output) is not read again
        x128 r;
        for (int k = 0; k < BF16_VEC; k++) { r[k] = add_bf16(a[k], b[k]); }
        store128(x + i, r);  // x is the residual stream: read again by the next layer
    }
    for (size_t i = end + global_thread(); i < (size_t)n; i += grid_threads()) {
        x[i] = add_bf16(x[i], y[i]);
    }
}

// ----------------------------------------------------------------------------
// out = silu(gate) * up, from the gate and up projections' one product (below).
// Same formula and operation order as the CPU reference: gate / (1 + exp(-gate)) * up, with the
// accurate expf and an IEEE division (the kernels are not built with --use_fast_math). For a very
// negative gate exp overflows to inf and the result is -0, as on the CPU.

__device__ __forceinline__ __nv_bfloat16 swiglu_one(__nv_bfloat16 gate, __nv_bfloat16 up) {
    const float g = bf16_to_f32(gate);
    return f32_to_bf16(g / (1.0f + expf(-g)) * bf16_to_f32(up));
}

// SwiGLU's operands are the rows of the gate and up projections' one product: gate_up
// (rows, 2 width) holds each row's gate then its up. Element i of a (rows, width) tensor has its
// gate at i + (i / width) * width of gate_up and its up width further (n = rows * width is an int).
__device__ __forceinline__ size_t gate_at(size_t i, int width) {
    return i + (size_t)((int)i / width) * width;
}

// out = silu(gate) * up   out: (rows, width) bf16, gate_up: (rows, 2 width) bf16; n = rows * width.
extern "C" __global__ void __launch_bounds__(256)
swiglu_forward(__nv_bfloat16* out, const __nv_bfloat16* gate_up, int n, int width) {
    const bool vectorised = width % BF16_VEC == 0 && is_aligned16(out) && is_aligned16(gate_up);
    const size_t end = vector_end(vectorised, n);
    for (size_t i = global_thread() * BF16_VEC; i < end; i += grid_threads() * BF16_VEC) {
        const size_t g_at = gate_at(i, width);  // a vector stays inside its row
        const x128 g = load128cs(gate_up + g_at);
        const x128 u = load128cs(gate_up + g_at + width);
        x128 r;
        for (int k = 0; k < BF16_VEC; k++) { r[k] = swiglu_one(g[k], u[k]); }
        store128(out + i, r);  // read next by the down projection
    }
    for (size_t i = end + global_thread(); i < (size_t)n; i += grid_threads()) {
        const size_t g_at = gate_at(i, width);
        out[i] = swiglu_one(gate_up[g_at], gate_up[g_at + width]);
    }
}

// ----------------------------------------------------------------------------
// out[r, c] += bias[c]   out: (m, n) bf16 or f32, bias: (n) bf16.
// The vector path needs n % 8 == 0 (so that every row starts 16-byte aligned) and aligned
// pointers; one vector is 8 columns: one x128 of out (bf16) or two f128 (f32).

template <class T>
__device__ __forceinline__ void bias_add_vector(T* out, const __nv_bfloat16* b, size_t at);

template <>
__device__ __forceinline__ void bias_add_vector<__nv_bfloat16>(__nv_bfloat16* out, const __nv_bfloat16* b,
                                                               size_t at) {
    const x128 o = load128(out + at);
    x128 r;
    for (int k = 0; k < BF16_VEC; k++) { r[k] = add_bf16(o[k], b[k]); }
    store128(out + at, r);
}

template <>
__device__ __forceinline__ void bias_add_vector<float>(float* out, const __nv_bfloat16* b, size_t at) {
    for (int half = 0; half < 2; half++) {
        f128 o = load128(out + at + half * f128::size);
        for (int k = 0; k < f128::size; k++) { o[k] += bf16_to_f32(b[half * f128::size + k]); }
        store128(out + at + half * f128::size, o);
    }
}

template <class T>
__device__ __forceinline__ void bias_add_body(T* out, const __nv_bfloat16* bias, int m, int n) {
    const bool vectorised = (n % BF16_VEC == 0) && is_aligned16(out) && is_aligned16(bias);
    if (vectorised) {
        for (size_t c = global_thread() * BF16_VEC; c < (size_t)n; c += grid_threads() * BF16_VEC) {
            const x128 b = load128(bias + c);
            for (int r = blockIdx.y; r < m; r += gridDim.y) {
                bias_add_vector<T>(out, b.payload, (size_t)r * n + c);
            }
        }
    } else {
        for (size_t c = global_thread(); c < (size_t)n; c += grid_threads()) {
            const float b = bf16_to_f32(bias[c]);
            for (int r = blockIdx.y; r < m; r += gridDim.y) {
                T* o = out + (size_t)r * n + c;
                *o = from_f32<T>(to_f32(*o) + b);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
bias_add_bf16(__nv_bfloat16* out, const __nv_bfloat16* bias, int m, int n) {
    bias_add_body<__nv_bfloat16>(out, bias, m, n);
}

extern "C" __global__ void __launch_bounds__(256)
bias_add_f32(float* out, const __nv_bfloat16* bias, int m, int n) {
    bias_add_body<float>(out, bias, m, n);
}

// ----------------------------------------------------------------------------
// conversions   dst, src: (n). f32 -> bf16 rounds to nearest even (NaN stays NaN, overflow goes
// to inf), like PyTorch's .to(torch.bfloat16); bf16 -> f32 is exact.

extern "C" __global__ void __launch_bounds__(256)
convert_f32_to_bf16(__nv_bfloat16* dst, const float* src, int n) {
    const bool vectorised = is_aligned16(dst) && is_aligned16(src);
    const size_t end = vector_end(vectorised, n);
    for (size_t i = global_thread() * BF16_VEC; i < end; i += grid_threads() * BF16_VEC) {
        const f128 lo = load128cs(src + i);
        const f128 hi = load128cs(src + i + f128::size);
        x128 r;
        for (int k = 0; k < f128::size; k++) {
            r[k] = f32_to_bf16(lo[k]);
            r[k + f128::size] = f32_to_bf16(hi[k]);
        }
        store128(dst + i, r);
    }
    for (size_t i = end + global_thread(); i < (size_t)n; i += grid_threads()) {
        dst[i] = f32_to_bf16(src[i]);
    }
}

extern "C" __global__ void __launch_bounds__(256)
convert_bf16_to_f32(float* dst, const __nv_bfloat16* src, int n) {
    const bool vectorised = is_aligned16(dst) && is_aligned16(src);
    const size_t end = vector_end(vectorised, n);
    for (size_t i = global_thread() * BF16_VEC; i < end; i += grid_threads() * BF16_VEC) {
        const x128 s = load128cs(src + i);
        f128 lo, hi;
        for (int k = 0; k < f128::size; k++) {
            lo[k] = bf16_to_f32(s[k]);
            hi[k] = bf16_to_f32(s[k + f128::size]);
        }
        store128(dst + i, lo);
        store128(dst + i + f128::size, hi);
    }
    for (size_t i = end + global_thread(); i < (size_t)n; i += grid_threads()) {
        dst[i] = bf16_to_f32(src[i]);
    }
}

// ----------------------------------------------------------------------------
// backward of swiglu_forward (CPU reference: backend::cpu::swiglu::swiglu_backward), with
// s = sigmoid(gate): dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * gate * s.
// dout: (rows, width) bf16; gate_up and d_gate_up (overwritten): (rows, 2 width) bf16, each row
// gate's then up's, as swiglu_forward; n = rows * width. A flat kernel like swiglu_forward
// (vectors, then the tail); every input is read once and every output written once (streaming
// loads and stores).

__device__ __forceinline__ void swiglu_backward_one(__nv_bfloat16& dgate, __nv_bfloat16& dup, __nv_bfloat16 dout,
                                                    __nv_bfloat16 gate, __nv_bfloat16 up) {
    const float g = bf16_to_f32(gate), d = bf16_to_f32(dout);
    const float s = 1.0f / (1.0f + expf(-g));
    dgate = f32_to_bf16(d * bf16_to_f32(up) * s * (1.0f + g * (1.0f - s)));
    dup = f32_to_bf16(d * g * s);
}

extern "C" __global__ void __launch_bounds__(256)
swiglu_backward(__nv_bfloat16* d_gate_up, const __nv_bfloat16* dout, const __nv_bfloat16* gate_up,
                int n, int width) {
    const bool vectorised = width % BF16_VEC == 0 && is_aligned16(d_gate_up) && is_aligned16(dout) &&
                            is_aligned16(gate_up);
    const size_t end = vector_end(vectorised, n);
    for (size_t i = global_thread() * BF16_VEC; i < end; i += grid_threads() * BF16_VEC) {
        const size_t g_at = gate_at(i, width);  // a vector stays inside its row
        const x128 d = load128cs(dout + i);
        const x128 g = load128cs(gate_up + g_at);
        const x128 u = load128cs(gate_up + g_at + width);
        x128 dg, du;
        for (int k = 0; k < BF16_VEC; k++) { swiglu_backward_one(dg[k], du[k], d[k], g[k], u[k]); }
        store128cs(d_gate_up + g_at, dg);
        store128cs(d_gate_up + g_at + width, du);
    }
    for (size_t i = end + global_thread(); i < (size_t)n; i += grid_threads()) {
        const size_t g_at = gate_at(i, width);
        swiglu_backward_one(d_gate_up[g_at], d_gate_up[g_at + width], dout[i], gate_up[g_at],
                            gate_up[g_at + width]);
    }
}

// Column sums of dout (m, n) bf16 in two deterministic passes (the order of the additions depends
// on m only, so gradients repeat bit for bit run to run; CPU reference:
// backend::cpu::matmul::bias_backward):
//   bias_backward_partial: partials[chunk, j] = sum of dout[row, j] over the chunk's
//       BIAS_ROWS_PER_THREAD rows; grid = (columns / 256, chunks), one thread per (column,
//       chunk), coalesced across the threads of a warp.
//   add_column_sums: out[j] += sum over chunks of partials[chunk, j], in an order fixed by the
//       sizes (below).
#define BIAS_ROWS_PER_THREAD 256

extern "C" __global__ void __launch_bounds__(256)
bias_backward_partial(float* partials, const __nv_bfloat16* dout, int m, int n) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= n) { return; }
    const int first = blockIdx.y * BIAS_ROWS_PER_THREAD;
    const int last = min(m, first + BIAS_ROWS_PER_THREAD);
    float sum = 0.0f;
    for (int row = first; row < last; row++) { sum += bf16_to_f32(dout[(size_t)row * n + col]); }
    partials[(size_t)blockIdx.y * n + col] = sum;
}

// out (n) f32 += column sums of partials (chunks, n) f32. Block (32, COLUMN_SUM_LANES) takes 32
// columns: thread (x, y) sums chunks y, y + LANES, y + 2 LANES, ... of column x in order
// (a warp reads 32 adjacent columns of one chunk), then the LANES sums of a column are added in
// a fixed tree in shared memory. Many threads per column keep enough loads in flight (one thread
// per column waited on a thousand dependent loads); the order depends on chunks and n only.
#define COLUMN_SUM_LANES 32

extern "C" __global__ void __launch_bounds__(32 * COLUMN_SUM_LANES)
add_column_sums(float* out, const float* partials, int chunks, int n) {
    __shared__ float lane_sums[COLUMN_SUM_LANES][WARP_SIZE + 1];  // +1: no bank conflicts
    const int col = blockIdx.x * WARP_SIZE + threadIdx.x;
    float sum = 0.0f;
    if (col < n) {
        for (int c = threadIdx.y; c < chunks; c += COLUMN_SUM_LANES) { sum += partials[(size_t)c * n + col]; }
    }
    lane_sums[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    for (int half = COLUMN_SUM_LANES / 2; half > 0; half /= 2) {
        if (threadIdx.y < half) { lane_sums[threadIdx.y][threadIdx.x] += lane_sums[threadIdx.y + half][threadIdx.x]; }
        __syncthreads();
    }
    if (threadIdx.y == 0 && col < n) { out[col] += lane_sums[0][threadIdx.x]; }
}
