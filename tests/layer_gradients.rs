//! Every CPU backward op against central finite differences of an independent f64 reference.
//!
//! Each test draws random f32 inputs, defines the scalar loss L = Σ c ⊙ out for a fixed random c,
//! differentiates L numerically in f64 (h = 1e-6) with respect to every input, and compares that
//! with our f32 backward called with dout = c. The f32 forward is checked against the same f64
//! reference. Gradient buffers start pre-filled so accumulate-vs-overwrite is checked too.

use thinkshort::backend::cpu::{
    attention_backward, attention_forward, bias_backward, embedding_backward, embedding_forward,
    gather_rows, kv_cache_gather, kv_cache_write, logprob_backward, logprob_forward,
    matmul_backward, matmul_forward, rmsnorm_backward, rmsnorm_forward, rope_backward,
    rope_forward, scatter_add_rows, swiglu_backward, swiglu_forward,
};
use thinkshort::backend::{GradWrite, TokenPlacement};
use thinkshort::rng::Philox;

/// Finite-difference step; in f64 both truncation (h²) and round-off (ε/h) stay far below 1e-4.
const H: f64 = 1e-6;
const GRAD_TOL: f64 = 1e-4;
const FWD_TOL: f64 = 1e-5;
/// Every gradient buffer starts at this value: accumulating outputs must add to it (the test
/// subtracts it back), overwriting outputs must discard it (the test compares them as they are).
const PREFILL: f32 = 0.25;

/// `n` standard normals; each tensor gets its own Philox stream so they are independent.
fn normals(stream: u64, n: usize) -> Vec<f32> {
    let mut rng = Philox::new(20_240_601, stream);
    (0..n).map(|_| rng.next_normal()).collect()
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// What an accumulating op added on top of `PREFILL`.
fn added(buf: &[f32]) -> Vec<f32> {
    buf.iter().map(|v| v - PREFILL).collect()
}

/// Asserts ‖ours − reference‖ / ‖reference‖ ≤ tol. A zero reference would make any
/// all-zero answer pass, so it is rejected.
fn assert_close(what: &str, ours: &[f32], reference: &[f64], tol: f64) {
    assert_eq!(ours.len(), reference.len(), "{what}: length differs");
    let norm = dot(reference, reference).sqrt();
    assert!(norm > 0.0, "{what}: reference is all zeros");
    let err = ours
        .iter()
        .zip(reference)
        .map(|(&o, r)| (o as f64 - r).powi(2))
        .sum::<f64>()
        .sqrt();
    let rel = err / norm;
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:e}");
}

/// dL/dx for L(x) = Σ c ⊙ f(x), by central differences in f64.
fn fd_grad(x: &[f32], c: &[f32], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let c = f64s(c);
    let loss = |x: &[f64]| dot(&f(x), &c);
    let mut x = f64s(x);
    (0..x.len())
        .map(|i| {
            let x0 = x[i];
            x[i] = x0 + H;
            let up = loss(&x);
            x[i] = x0 - H;
            let down = loss(&x);
            x[i] = x0;
            (up - down) / (2.0 * H)
        })
        .collect()
}

// ---- f64 reference forwards, written from the math ----

/// out[m, n] = Σ_k x[m, k] · w[n, k] + bias[n].
fn ref_matmul(
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = dot(&x[i * k..][..k], &w[j * k..][..k]) + bias.map_or(0.0, |b| b[j]);
        }
    }
    out
}

/// out[m, i] = weight[i] · x[m, i] / sqrt(mean_i x[m, i]² + eps).
fn ref_rmsnorm(x: &[f64], weight: &[f64], dim: usize, eps: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(dim) {
        let rms = (dot(row, row) / dim as f64 + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(x, w)| w * x / rms));
    }
    out
}

/// HF: x·cos + rotate_half(x)·sin with rotate_half(x) = (−x₂, x₁) and θ_i = pos · inv_freq[i].
fn ref_rope(x: &[f64], positions: &[u32], inv_freq: &[f64], head_dim: usize) -> Vec<f64> {
    let half = head_dim / 2;
    let row_len = x.len() / positions.len();
    let mut out = x.to_vec();
    for (m, &pos) in positions.iter().enumerate() {
        for head in (m * row_len..(m + 1) * row_len).step_by(head_dim) {
            for i in 0..half {
                let (sin, cos) = (pos as f64 * inv_freq[i]).sin_cos();
                let (x1, x2) = (x[head + i], x[head + half + i]);
                out[head + i] = x1 * cos - x2 * sin;
                out[head + half + i] = x2 * cos + x1 * sin;
            }
        }
    }
    out
}

/// silu(gate) · up with silu(g) = g / (1 + e^(−g)), from rows of [gate | up] of `inter` each.
fn ref_swiglu(gate_up: &[f64], inter: usize) -> Vec<f64> {
    gate_up
        .chunks(2 * inter)
        .flat_map(|row| {
            let (gate, up) = row.split_at(inter);
            gate.iter()
                .zip(up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Token m, head h: softmax_j(q·k_j / √hd) over positions 0..=pos[m] of its slot, times v_j,
/// with k, v taken from KV head h / (n_heads / n_kv_heads).
#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f64],
    cache_k: &[f64],
    cache_v: &[f64],
    place: &TokenPlacement,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Vec<f64> {
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
    let group = n_heads / n_kv_heads;
    let mut out = vec![0.0; q.len()];
    for (m, (&slot, &pos)) in place.slots.iter().zip(&place.positions).enumerate() {
        for h in 0..n_heads {
            let at = m * q_dim + h * head_dim;
            let kv_at = |j: usize| (slot as usize * capacity + j) * kv_dim + (h / group) * head_dim;
            let weights: Vec<f64> = (0..=pos as usize)
                .map(|j| {
                    let k = &cache_k[kv_at(j)..][..head_dim];
                    (dot(&q[at..][..head_dim], k) / (head_dim as f64).sqrt()).exp()
                })
                .collect();
            let total: f64 = weights.iter().sum();
            for (j, w) in weights.iter().enumerate() {
                for d in 0..head_dim {
                    out[at + d] += w / total * cache_v[kv_at(j) + d];
                }
            }
        }
    }
    out
}

/// lse[m, h] = log Σ_j exp(q[m, h]·k_j / sqrt(head_dim)) over j = 0..=pos[m].
fn ref_attention_lse(
    q: &[f64],
    cache_k: &[f64],
    place: &TokenPlacement,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) -> Vec<f64> {
    let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
    let group = n_heads / n_kv_heads;
    let mut lse = Vec::new();
    for (m, (&slot, &pos)) in place.slots.iter().zip(&place.positions).enumerate() {
        for h in 0..n_heads {
            let at = m * q_dim + h * head_dim;
            let total: f64 = (0..=pos as usize)
                .map(|j| {
                    let k = &cache_k
                        [(slot as usize * capacity + j) * kv_dim + (h / group) * head_dim..]
                        [..head_dim];
                    (dot(&q[at..][..head_dim], k) / (head_dim as f64).sqrt()).exp()
                })
                .sum();
            lse.push(total.ln());
        }
    }
    lse
}

/// The cache after writing x[m] to (slot[m], pos[m]).
fn ref_kv_write(cache: &[f64], x: &[f64], place: &TokenPlacement, capacity: usize) -> Vec<f64> {
    let kv_dim = x.len() / place.slots.len();
    let mut out = cache.to_vec();
    for (m, (&slot, &pos)) in place.slots.iter().zip(&place.positions).enumerate() {
        let at = (slot as usize * capacity + pos as usize) * kv_dim;
        out[at..at + kv_dim].copy_from_slice(&x[m * kv_dim..][..kv_dim]);
    }
    out
}

/// out[r] = x[rows[r]] (also the embedding lookup).
fn ref_gather(x: &[f64], rows: &[usize], dim: usize) -> Vec<f64> {
    rows.iter()
        .flat_map(|&r| x[r * dim..(r + 1) * dim].iter().copied())
        .collect()
}

/// Per row: (log p[target], −Σ p log p) with p = softmax(logits / τ).
fn ref_logprob(logits: &[f64], targets: &[u32], vocab: usize, tau: f64) -> (Vec<f64>, Vec<f64>) {
    logits
        .chunks(vocab)
        .zip(targets)
        .map(|(z, &y)| {
            let lse = z.iter().map(|v| (v / tau).exp()).sum::<f64>().ln();
            let logp: Vec<f64> = z.iter().map(|v| v / tau - lse).collect();
            let entropy = -logp.iter().map(|lp| lp.exp() * lp).sum::<f64>();
            (logp[y as usize], entropy)
        })
        .unzip()
}

// ---- the tests ----

fn check_matmul(with_bias: bool) {
    let (m, k, n) = (5, 7, 3);
    let (x, w, b, c) = (
        normals(1, m * k),
        normals(2, n * k),
        normals(3, n),
        normals(4, m * n),
    );
    let (x64, w64, b64) = (f64s(&x), f64s(&w), f64s(&b));
    let bias64 = with_bias.then_some(b64.as_slice());
    let what = |name: &str| format!("matmul (bias: {with_bias}) {name}");

    let mut out = vec![0.0; m * n];
    matmul_forward(&mut out, &x, &w, with_bias.then_some(&b[..]), m, k, n);
    let expected = ref_matmul(&x64, &w64, bias64, m, k, n);
    assert_close(&what("forward"), &out, &expected, FWD_TOL);

    let (mut dx, mut dw) = (vec![PREFILL; m * k], vec![PREFILL; n * k]);
    matmul_backward(Some(&mut dx), GradWrite::Add, &mut dw, &c, &x, &w, m, k, n);
    let fd_dx = fd_grad(&x, &c, |x| ref_matmul(x, &w64, bias64, m, k, n));
    let fd_dw = fd_grad(&w, &c, |w| ref_matmul(&x64, w, bias64, m, k, n));
    assert_close(&what("dx"), &added(&dx), &fd_dx, GRAD_TOL);
    assert_close(&what("dw"), &added(&dw), &fd_dw, GRAD_TOL);

    // Overwriting dx: the gradient alone, whatever dx held (NaN here).
    let (mut dx_set, mut dw_set) = (vec![f32::NAN; m * k], vec![PREFILL; n * k]);
    matmul_backward(
        Some(&mut dx_set),
        GradWrite::Overwrite,
        &mut dw_set,
        &c,
        &x,
        &w,
        m,
        k,
        n,
    );
    assert_close(&what("dx overwritten"), &dx_set, &fd_dx, GRAD_TOL);

    // Without dx (the first layer's input needs none) dw must come out the same.
    let mut dw_only = vec![PREFILL; n * k];
    matmul_backward(None, GradWrite::Add, &mut dw_only, &c, &x, &w, m, k, n);
    assert_close(&what("dw, dx = None"), &added(&dw_only), &fd_dw, GRAD_TOL);

    if with_bias {
        let mut db = vec![PREFILL; n];
        bias_backward(&mut db, &c);
        let fd_db = fd_grad(&b, &c, |b| ref_matmul(&x64, &w64, Some(b), m, k, n));
        assert_close(&what("dbias"), &added(&db), &fd_db, GRAD_TOL);
    }
}

#[test]
fn matmul_with_bias() {
    check_matmul(true);
}

#[test]
fn matmul_without_bias() {
    check_matmul(false);
}

#[test]
fn rmsnorm() {
    let (m, dim, eps) = (5, 7, 1e-6f32);
    let (x, weight, c) = (normals(5, m * dim), normals(6, dim), normals(7, m * dim));
    let (x64, w64) = (f64s(&x), f64s(&weight));

    let mut out = vec![0.0; m * dim];
    rmsnorm_forward(&mut out, &x, &weight, dim, eps);
    let expected = ref_rmsnorm(&x64, &w64, dim, eps as f64);
    assert_close("rmsnorm forward", &out, &expected, FWD_TOL);

    // dx is overwritten (whatever it held: NaN here) or added to; dweight accumulates.
    let (mut dx, mut dweight) = (vec![f32::NAN; m * dim], vec![PREFILL; dim]);
    rmsnorm_backward(
        &mut dx,
        GradWrite::Overwrite,
        &mut dweight,
        &c,
        &x,
        &weight,
        dim,
        eps,
    );
    let fd_dx = fd_grad(&x, &c, |x| ref_rmsnorm(x, &w64, dim, eps as f64));
    let fd_dw = fd_grad(&weight, &c, |w| ref_rmsnorm(&x64, w, dim, eps as f64));
    assert_close("rmsnorm dx", &dx, &fd_dx, GRAD_TOL);
    assert_close("rmsnorm dweight", &added(&dweight), &fd_dw, GRAD_TOL);
    let (mut dx_add, mut dweight) = (vec![PREFILL; m * dim], vec![PREFILL; dim]);
    rmsnorm_backward(
        &mut dx_add,
        GradWrite::Add,
        &mut dweight,
        &c,
        &x,
        &weight,
        dim,
        eps,
    );
    assert_close("rmsnorm dx added", &added(&dx_add), &fd_dx, GRAD_TOL);
}

#[test]
fn rope() {
    let (n_heads, head_dim) = (3, 6);
    let positions = [0, 3, 1, 17, 40];
    let m = positions.len();
    // A small base so every frequency pair turns noticeably at these positions.
    let inv_freq: Vec<f32> = (0..head_dim / 2)
        .map(|i| 10f32.powf(-((2 * i) as f32) / head_dim as f32))
        .collect();
    let inv_freq64 = f64s(&inv_freq);
    let (x, c) = (
        normals(8, m * n_heads * head_dim),
        normals(9, m * n_heads * head_dim),
    );

    let mut out = x.clone();
    rope_forward(&mut out, &positions, &inv_freq, n_heads, head_dim);
    let expected = ref_rope(&f64s(&x), &positions, &inv_freq64, head_dim);
    assert_close("rope forward", &out, &expected, FWD_TOL);

    // In place: the gradient buffer holds dout on entry and dx on return.
    let mut dx = c.clone();
    rope_backward(&mut dx, &positions, &inv_freq, n_heads, head_dim);
    let fd_dx = fd_grad(&x, &c, |x| ref_rope(x, &positions, &inv_freq64, head_dim));
    assert_close("rope dx", &dx, &fd_dx, GRAD_TOL);
}

/// 5 rows of 7: the gate and up projections' one product, each row gate's then up's.
#[test]
fn swiglu() {
    let (rows, inter) = (5, 7);
    let n = rows * inter;
    let (gate_up, c) = (normals(10, 2 * n), normals(12, n));

    let mut out = vec![0.0; n];
    swiglu_forward(&mut out, &gate_up, inter);
    let expected = ref_swiglu(&f64s(&gate_up), inter);
    assert_close("swiglu forward", &out, &expected, FWD_TOL);

    // The gradient is overwritten.
    let mut d_gate_up = vec![PREFILL; 2 * n];
    swiglu_backward(&mut d_gate_up, &c, &gate_up, inter);
    let fd = fd_grad(&gate_up, &c, |gu| ref_swiglu(gu, inter));
    assert_close("swiglu d_gate_up", &d_gate_up, &fd, GRAD_TOL);
}

/// Five tokens over three slots at assorted positions, two of them at position 0; two tokens
/// share slot 0 and two share slot 2. Slot 1's positions 4 and 5 are never attended to.
fn placement() -> TokenPlacement {
    TokenPlacement {
        slots: vec![2, 0, 2, 1, 0],
        positions: vec![5, 0, 0, 3, 4],
    }
}
const SLOTS: usize = 3;
const CAPACITY: usize = 6;

/// Attention forward against the f64 reference and its backward against finite differences of
/// it, for `place`'s tokens in `slots` cache slots of `capacity` positions.
fn check_attention(
    place: &TokenPlacement,
    slots: usize,
    capacity: usize,
    (n_heads, n_kv_heads, head_dim): (usize, usize, usize),
) {
    let m = place.slots.len();
    let (q_dim, cache_len) = (n_heads * head_dim, slots * capacity * n_kv_heads * head_dim);
    let (q, cache_k, cache_v, c) = (
        normals(13, m * q_dim),
        normals(14, cache_len),
        normals(15, cache_len),
        normals(16, m * q_dim),
    );
    let (q64, k64, v64) = (f64s(&q), f64s(&cache_k), f64s(&cache_v));
    let reference = |q: &[f64], k: &[f64], v: &[f64]| {
        ref_attention(q, k, v, place, capacity, n_heads, n_kv_heads, head_dim)
    };
    let what = |name: &str| format!("attention (group {}) {name}", n_heads / n_kv_heads);

    let mut out = vec![0.0; m * q_dim];
    let mut lse = vec![0.0; m * n_heads];
    attention_forward(
        &mut out,
        Some(&mut lse),
        &q,
        &cache_k,
        &cache_v,
        place,
        capacity,
        n_heads,
        n_kv_heads,
        head_dim,
    );
    assert_close(
        &what("forward"),
        &out,
        &reference(&q64, &k64, &v64),
        FWD_TOL,
    );
    let lse_ref = ref_attention_lse(&q64, &k64, place, capacity, n_heads, n_kv_heads, head_dim);
    assert_close(&what("lse"), &lse, &lse_ref, FWD_TOL);

    // dq is overwritten; the cache gradients accumulate. The backward takes the forward's output
    // and log-sum-exp.
    let mut dq = vec![PREFILL; m * q_dim];
    let (mut dk, mut dv) = (vec![PREFILL; cache_len], vec![PREFILL; cache_len]);
    attention_backward(
        &mut dq, &mut dk, &mut dv, &c, &out, &lse, &q, &cache_k, &cache_v, place, capacity,
        n_heads, n_kv_heads, head_dim,
    );
    let fd_dq = fd_grad(&q, &c, |q| reference(q, &k64, &v64));
    let fd_dk = fd_grad(&cache_k, &c, |k| reference(&q64, k, &v64));
    let fd_dv = fd_grad(&cache_v, &c, |v| reference(&q64, &k64, v));
    assert_close(&what("dq"), &dq, &fd_dq, GRAD_TOL);
    assert_close(&what("dcache_k"), &added(&dk), &fd_dk, GRAD_TOL);
    assert_close(&what("dcache_v"), &added(&dv), &fd_dv, GRAD_TOL);
}

#[test]
fn attention_mha_group_1() {
    check_attention(&placement(), SLOTS, CAPACITY, (6, 6, 3));
}

#[test]
fn attention_gqa_group_3() {
    check_attention(&placement(), SLOTS, CAPACITY, (6, 2, 3));
}

#[test]
fn attention_mqa_group_6() {
    check_attention(&placement(), SLOTS, CAPACITY, (6, 1, 3));
}

/// Prefills long enough for several of the CPU's query blocks (64 rows) and for its GEMM path
/// (8 or more tokens of a slot): slot 0 from position 0, slot 1 after 30 cached positions, the
/// two interleaved in the batch; two KV heads, and a third slot that no token uses (its
/// gradients must stay untouched).
#[test]
fn attention_long_prefills_gqa_group_2() {
    let (mut slots, mut positions) = (Vec::new(), Vec::new());
    for i in 0..90u32 {
        slots.push(0);
        positions.push(i);
        if i < 40 {
            slots.push(1);
            positions.push(30 + i);
        }
    }
    check_attention(&TokenPlacement { slots, positions }, 3, 90, (4, 2, 2));
}

#[test]
fn kv_cache_write_and_gather() {
    let kv_dim = 5;
    let place = placement();
    let m = place.slots.len();
    let cache_len = SLOTS * CAPACITY * kv_dim;
    let (x, old_cache, c) = (
        normals(17, m * kv_dim),
        normals(18, cache_len),
        normals(19, cache_len),
    );
    let old64 = f64s(&old_cache);

    let mut cache = old_cache.clone();
    kv_cache_write(&mut cache, &x, &place, CAPACITY, kv_dim);
    let expected = ref_kv_write(&old64, &f64s(&x), &place, CAPACITY);
    assert_close("kv_cache_write forward", &cache, &expected, FWD_TOL);

    // dx is overwritten.
    let mut dx = vec![PREFILL; m * kv_dim];
    kv_cache_gather(&mut dx, &c, &place, CAPACITY, kv_dim);
    let fd_dx = fd_grad(&x, &c, |x| ref_kv_write(&old64, x, &place, CAPACITY));
    assert_close("kv_cache_gather dx", &dx, &fd_dx, GRAD_TOL);
}

#[test]
fn embedding() {
    let (vocab, dim) = (6, 7);
    // Id 4 appears three times, so its row's gradient must be the sum of three rows of dout.
    let ids = [4u32, 1, 4, 0, 4];
    let rows: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    let (table, c) = (normals(20, vocab * dim), normals(21, ids.len() * dim));

    let mut out = vec![0.0; ids.len() * dim];
    embedding_forward(&mut out, &table, &ids, dim);
    let expected = ref_gather(&f64s(&table), &rows, dim);
    assert_close("embedding forward", &out, &expected, FWD_TOL);

    let mut dtable = vec![PREFILL; vocab * dim];
    embedding_backward(&mut dtable, &c, &ids, dim);
    let fd_dtable = fd_grad(&table, &c, |t| ref_gather(t, &rows, dim));
    assert_close("embedding dtable", &added(&dtable), &fd_dtable, GRAD_TOL);
}

#[test]
fn gather_and_scatter_rows() {
    let (n_rows, dim) = (6, 7);
    let rows = [3usize, 1, 3, 0, 3];
    let (x, c) = (normals(22, n_rows * dim), normals(23, rows.len() * dim));

    let mut out = vec![0.0; rows.len() * dim];
    gather_rows(&mut out, &x, &rows, dim);
    let expected = ref_gather(&f64s(&x), &rows, dim);
    assert_close("gather_rows forward", &out, &expected, FWD_TOL);

    let mut dx = vec![PREFILL; n_rows * dim];
    scatter_add_rows(&mut dx, &c, &rows, dim);
    let fd_dx = fd_grad(&x, &c, |x| ref_gather(x, &rows, dim));
    assert_close("scatter_add_rows dx", &added(&dx), &fd_dx, GRAD_TOL);
}

fn check_logprob(tau: f32) {
    let vocab = 7;
    let targets = [2u32, 6, 0, 2];
    let r = targets.len();
    let (logits, c) = (normals(24, r * vocab), normals(25, r));
    let tau64 = tau as f64;
    let what = |name: &str| format!("logprob (τ = {tau}) {name}");

    let (mut logp, mut entropy) = (vec![0.0; r], vec![0.0; r]);
    logprob_forward(&mut logp, &mut entropy, &logits, &targets, vocab, tau);
    let (ref_logp, ref_entropy) = ref_logprob(&f64s(&logits), &targets, vocab, tau64);
    assert_close(&what("logp"), &logp, &ref_logp, FWD_TOL);
    assert_close(&what("entropy"), &entropy, &ref_entropy, FWD_TOL);

    // dlogits is overwritten. The entropy is only logged, so L involves logp alone.
    let mut dlogits = vec![PREFILL; r * vocab];
    logprob_backward(&mut dlogits, &c, &logits, &targets, vocab, tau);
    let fd_dlogits = fd_grad(&logits, &c, |z| ref_logprob(z, &targets, vocab, tau64).0);
    assert_close(&what("dlogits"), &dlogits, &fd_dlogits, GRAD_TOL);
}

#[test]
fn logprob_temperature_1() {
    check_logprob(1.0);
}

#[test]
fn logprob_temperature_0_7() {
    check_logprob(0.7);
}
