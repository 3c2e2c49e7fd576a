//! Causal grouped-query attention over a slotted KV cache.
//!
//! The cache holds, per sequence slot, keys and values for positions 0..capacity. A token at
//! position p of slot s attends to positions 0..=p of that slot, so a prefill (all prompt tokens
//! written first) and a decode step (one new token per sequence) are the same computation.

use super::product::{product_into, Strided, Threads};
use crate::backend::{check_attention_heads, TokenPlacement};
use crate::exp::exp_in_place;
use rayon::prelude::*;
use std::ops::Range;

/// Copies x[m] to cache[slot[m], pos[m]].  x: [M, kv_dim]; cache: [slots, capacity, kv_dim].
pub fn kv_cache_write(
    cache: &mut [f32],
    x: &[f32],
    place: &TokenPlacement,
    capacity: usize,
    kv_dim: usize,
) {
    for ((row, &slot), &pos) in x
        .chunks_exact(kv_dim)
        .zip(&place.slots)
        .zip(&place.positions)
    {
        let at = (slot as usize * capacity + pos as usize) * kv_dim;
        cache[at..at + kv_dim].copy_from_slice(row);
    }
}

/// Query tokens of a slot at or above which attention uses matrix products (prefill); below it
/// (decode: one token per slot) the group's query heads meet each key and value row together.
const GEMM_MIN_TOKENS: usize = 8;
/// Query rows per GEMM block.
const QUERY_BLOCK: usize = 64;

/// q, out: [M, n_heads * head_dim]; cache_k, cache_v: [slots, capacity, n_kv_heads * head_dim];
/// lse (when given): [M, n_heads], the log-sum-exp of each row's scaled scores, which the
/// backward uses to recompute the probabilities.
///
/// A slot's query rows Q [n, hd] of one head see keys 0..=max position: S = scale · Q·Kᵀ [n, L],
/// row i masked beyond position i, softmax per row, O = P·V [n, hd]. Prefill runs those as two
/// GEMMs on the cache in place (K and V rows are strided by kv_dim), a task per (slot, head); a
/// slot with few tokens (decode) takes the same steps token by token, a task per (slot, KV head)
/// with all query heads of the group at once (`attend_dots`).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
    lse: Option<&mut [f32]>,
    q: &[f32],
    cache_k: &[f32],
    cache_v: &[f32],
    place: &TokenPlacement,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) {
    let q_dim = n_heads * head_dim;
    assert_eq!(
        q.len(),
        place.slots.len() * q_dim,
        "attention_forward: q is not [M, n_heads * head_dim]"
    );
    assert_eq!(
        out.len(),
        q.len(),
        "attention_forward: out and q differ in size"
    );
    let shape = AttentionShape::new("attention_forward", capacity, n_heads, n_kv_heads, head_dim);
    let slots = cache_k.len() / (capacity * shape.kv_dim());
    let by_slot = tokens_by_slot(place, slots);
    let group = n_heads / n_kv_heads;
    // A decode slot's task takes a KV head's whole group of query heads (they share each key
    // and value row); a prefill slot's, one query head (finer tasks balance the threads).
    let tasks: Vec<(usize, Range<usize>)> = (0..by_slot.len())
        .filter(|&s| !by_slot[s].is_empty())
        .flat_map(|s| {
            let per_task = if by_slot[s].len() < GEMM_MIN_TOKENS {
                group
            } else {
                1
            };
            (0..n_heads)
                .step_by(per_task)
                .map(move |h| (s, h..h + per_task))
        })
        .collect();
    // Each task returns, per query head of its range, the head's outputs [n, hd] and
    // log-sum-exps [n]; they are scattered into `out` and `lse` afterwards.
    let results: Vec<Vec<(Vec<f32>, Vec<f32>)>> = tasks
        .par_iter()
        .map(|(slot, heads)| {
            let tokens = &by_slot[*slot];
            let positions: Vec<usize> = tokens
                .iter()
                .map(|&m| place.positions[m] as usize)
                .collect();
            let keys = shape.head_of_slot(cache_k, *slot, heads.start);
            let values = shape.head_of_slot(cache_v, *slot, heads.start);
            if tokens.len() < GEMM_MIN_TOKENS {
                let q_groups: Vec<&[f32]> = tokens
                    .iter()
                    .map(|&m| &q[m * q_dim + heads.start * head_dim..][..heads.len() * head_dim])
                    .collect();
                return attend_dots(&q_groups, &positions, keys, values, &shape);
            }
            let q_rows: Vec<&[f32]> = tokens
                .iter()
                .map(|&m| &q[m * q_dim + heads.start * head_dim..][..head_dim])
                .collect();
            // Blocks of query rows, each multiplying only the keys up to its own last position:
            // a prefill (positions ascending) skips most of the masked triangle.
            let (mut o, mut l) = (Vec::new(), Vec::new());
            for (q, p) in q_rows
                .chunks(QUERY_BLOCK)
                .zip(positions.chunks(QUERY_BLOCK))
            {
                let (ob, lb) = attend_gemm(q, p, keys, values, &shape);
                o.extend(ob);
                l.extend(lb);
            }
            vec![(o, l)]
        })
        .collect();
    let mut lse = lse;
    for ((slot, heads), per_head) in tasks.iter().zip(&results) {
        for (h, (o, l)) in heads.clone().zip(per_head) {
            for ((&m, row), &row_lse) in by_slot[*slot].iter().zip(o.chunks_exact(head_dim)).zip(l)
            {
                out[m * q_dim + h * head_dim..][..head_dim].copy_from_slice(row);
                if let Some(lse) = lse.as_deref_mut() {
                    lse[m * n_heads + h] = row_lse;
                }
            }
        }
    }
}

struct AttentionShape {
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl AttentionShape {
    /// Panics, naming `op`, where `check_attention_heads` refuses the sizes (as the CUDA
    /// launchers return an error).
    fn new(op: &str, capacity: usize, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        if let Err(e) = check_attention_heads(op, capacity, n_heads, n_kv_heads, head_dim) {
            panic!("{e}");
        }
        AttentionShape {
            capacity,
            n_heads,
            n_kv_heads,
            head_dim,
        }
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The scores' factor 1 / sqrt(head_dim).
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// The cache of one slot from query head h's KV head on: row j starts at j · kv_dim. It ends
    /// with the slot, so a position past the capacity fails the operands' bounds checks instead
    /// of reading the next slot.
    fn head_of_slot<'a>(&self, cache: &'a [f32], slot: usize, h: usize) -> &'a [f32] {
        let kv_head = h / (self.n_heads / self.n_kv_heads);
        let slot_len = self.capacity * self.kv_dim();
        &cache[slot * slot_len..(slot + 1) * slot_len][kv_head * self.head_dim..]
    }
}

/// The batch rows m of each of `slots` cache slots, in batch order.
fn tokens_by_slot(place: &TokenPlacement, slots: usize) -> Vec<Vec<usize>> {
    let mut by_slot = vec![Vec::new(); slots];
    for (m, &s) in place.slots.iter().enumerate() {
        assert!(
            (s as usize) < slots,
            "attention: token {m} is in slot {s} of a cache with {slots} slots"
        );
        by_slot[s as usize].push(m);
    }
    by_slot
}

/// Softmax of scores[0..len] in place (shifted by the max, f32); returns log Σ exp(scores).
fn softmax_prefix(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    scores.iter_mut().for_each(|s| *s -= max);
    exp_in_place(scores);
    let denom: f32 = scores.iter().sum();
    scores.iter_mut().for_each(|s| *s /= denom);
    max + denom.ln()
}

/// Attention of a few tokens' query heads that share one KV head (decode: one token), the
/// scores of all of them against each key at once and each value row read once for all.
/// q_groups[t]: token t's group of query rows, [group, hd]. Returns per head of the group
/// O: [n, hd] and lse: [n].
fn attend_dots(
    q_groups: &[&[f32]],
    positions: &[usize],
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let (hd, kv_dim, scale) = (shape.head_dim, shape.kv_dim(), shape.scale());
    let group = shape.n_heads / shape.n_kv_heads;
    let n = q_groups.len();
    let mut per_head = vec![(vec![0.0f32; n * hd], vec![0.0f32; n]); group];
    let mut scores = Vec::new(); // [group, len]
    let mut out_group = Vec::new(); // [group, hd]
    for (t, (q_group, &pos)) in q_groups.iter().zip(positions).enumerate() {
        let len = pos + 1;
        scores.clear();
        scores.resize(group * len, 0.0);
        group_scores(&mut scores, q_group, keys, len, hd, kv_dim);
        for (row, (_, lse)) in scores.chunks_exact_mut(len).zip(&mut per_head) {
            row.iter_mut().for_each(|s| *s *= scale);
            lse[t] = softmax_prefix(row);
        }
        out_group.clear();
        out_group.resize(group * hd, 0.0);
        group_values(&mut out_group, &scores, values, len, hd, kv_dim);
        for (row, (o, _)) in out_group.chunks_exact(hd).zip(&mut per_head) {
            o[t * hd..][..hd].copy_from_slice(row);
        }
    }
    per_head
}

/// out_group[c, :] += Σ_j probs[c, j] · value j for values 0..len. probs: [group, len];
/// values: row j at j · kv_dim; out_group: [group, hd].
fn group_values(
    out_group: &mut [f32],
    probs: &[f32],
    values: &[f32],
    len: usize,
    hd: usize,
    kv_dim: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if super::matmul_few_rows::available() {
        use super::matmul_few_rows::{accumulate_weighted_rows, Rows};
        let p = Rows::new(probs, probs.len() / len, len, len);
        return accumulate_weighted_rows(out_group, p, Rows::new(values, len, hd, kv_dim));
    }
    for (o, p) in out_group.chunks_exact_mut(hd).zip(probs.chunks_exact(len)) {
        for (j, p) in p.iter().enumerate() {
            let v = &values[j * kv_dim..][..hd];
            o.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
        }
    }
}

/// scores[c, j] = q_group row c · key j for keys 0..len. q_group: [group, hd]; keys: row j
/// at j · kv_dim; scores: [group, len].
fn group_scores(
    scores: &mut [f32],
    q_group: &[f32],
    keys: &[f32],
    len: usize,
    hd: usize,
    kv_dim: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if super::matmul_few_rows::available() {
        use super::matmul_few_rows::{products_of_rows, Rows};
        let q = Rows::new(q_group, q_group.len() / hd, hd, hd);
        return products_of_rows(scores, q, Rows::new(keys, len, hd, kv_dim));
    }
    for (row, q) in scores.chunks_exact_mut(len).zip(q_group.chunks_exact(hd)) {
        for (j, s) in row.iter_mut().enumerate() {
            *s = dot(q, &keys[j * kv_dim..][..hd]);
        }
    }
}

/// a · b, summed in 8 interleaved partial sums so the compiler can keep them in vector
/// registers (a single running sum is a chain of dependent adds).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut partial = [0.0f32; LANES];
    let (a_body, b_body) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_body
        .remainder()
        .iter()
        .zip(b_body.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_body.zip(b_body) {
        for lane in 0..LANES {
            partial[lane] += a[lane] * b[lane];
        }
    }
    partial.iter().sum::<f32>() + tail
}

/// Attention of many query rows as two GEMMs over the strided cache.  Returns O: [n, hd] and
/// lse: [n].
fn attend_gemm(
    q_rows: &[&[f32]],
    positions: &[usize],
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    let (n, hd, kv_dim) = (q_rows.len(), shape.head_dim, shape.kv_dim());
    let len = positions.iter().max().map_or(0, |p| p + 1); // keys 0..len
    let q = q_rows.concat(); // [n, hd]
    let k = Strided::with_strides(keys, len, hd, kv_dim, 1); // [len, hd]
    let v = Strided::with_strides(values, len, hd, kv_dim, 1); // [len, hd]

    let mut scores = vec![0.0f32; n * len]; // S = scale · Q · Kᵀ: [n, len]
    product_into(
        &mut scores,
        false,
        shape.scale(),
        Strided::rows(&q, n, hd),
        k.t(),
        Threads::Caller,
    );
    // Causal mask: row i sees keys 0..=positions[i]; softmax over those, zeros beyond.
    let mut lse = Vec::with_capacity(n);
    for (row, &pos) in scores.chunks_exact_mut(len).zip(positions) {
        lse.push(softmax_prefix(&mut row[..=pos]));
        row[pos + 1..].fill(0.0);
    }
    let mut out = vec![0.0f32; n * hd]; // O = P · V: [n, hd]
    product_into(
        &mut out,
        false,
        1.0,
        Strided::rows(&scores, n, len),
        v,
        Threads::Caller,
    );
    (out, lse)
}

/// The gradient of `kv_cache_write`: dx[m] = dcache[slot[m], pos[m]].
pub fn kv_cache_gather(
    dx: &mut [f32],
    dcache: &[f32],
    place: &TokenPlacement,
    capacity: usize,
    kv_dim: usize,
) {
    for ((row, &slot), &pos) in dx
        .chunks_exact_mut(kv_dim)
        .zip(&place.slots)
        .zip(&place.positions)
    {
        let at = (slot as usize * capacity + pos as usize) * kv_dim;
        row.copy_from_slice(&dcache[at..at + kv_dim]);
    }
}

/// One query block's rows of one head, gathered: q, dout, out [n, hd]; lse, positions [n].
struct BlockRows {
    q: Vec<f32>,
    dout: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    positions: Vec<usize>,
}

/// The backward of one query block against keys and values 0..len_b (len_b = its last
/// position + 1; rows strided by kv_dim): adds to dk, dv [len, hd] and returns dQ [n, hd].
fn block_backward(
    rows: &BlockRows,
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
    dk: &mut [f32],
    dv: &mut [f32],
) -> Vec<f32> {
    let (n, hd, kv_dim) = (rows.positions.len(), shape.head_dim, shape.kv_dim());
    let len_b = rows.positions.iter().max().map_or(0, |p| p + 1);
    let k = Strided::with_strides(keys, len_b, hd, kv_dim, 1); // [len_b, hd]
    let v = Strided::with_strides(values, len_b, hd, kv_dim, 1); // [len_b, hd]
    let (q, dout) = (
        Strided::rows(&rows.q, n, hd),
        Strided::rows(&rows.dout, n, hd),
    );

    // P = exp(scale · Q·Kᵀ − lse), zero beyond each row's position: [n, len_b]
    let mut p = vec![0.0f32; n * len_b];
    product_into(&mut p, false, shape.scale(), q, k.t(), Threads::Caller);
    for ((row, &pos), &row_lse) in p
        .chunks_exact_mut(len_b)
        .zip(&rows.positions)
        .zip(&rows.lse)
    {
        row[..=pos].iter_mut().for_each(|s| *s -= row_lse);
        exp_in_place(&mut row[..=pos]);
        row[pos + 1..].fill(0.0);
    }
    let p_t = Strided::rows(&p, n, len_b).t();
    product_into(&mut dv[..len_b * hd], true, 1.0, p_t, dout, Threads::Caller);
    // dS = P ∘ (dO·Vᵀ − D) with D = rowsum(dO ∘ O): [n, len_b]
    let mut ds = vec![0.0f32; n * len_b];
    product_into(&mut ds, false, 1.0, dout, v.t(), Threads::Caller);
    let row_pairs = rows.dout.chunks_exact(hd).zip(rows.out.chunks_exact(hd));
    for ((ds_row, p_row), (go, o)) in ds
        .chunks_exact_mut(len_b)
        .zip(p.chunks_exact(len_b))
        .zip(row_pairs)
    {
        let d: f32 = go.iter().zip(o).map(|(g, o)| g * o).sum();
        ds_row
            .iter_mut()
            .zip(p_row)
            .for_each(|(ds, &p)| *ds = p * (*ds - d));
    }
    let ds = Strided::rows(&ds, n, len_b);
    let mut dq = vec![0.0f32; n * hd];
    product_into(&mut dq, false, shape.scale(), ds, k, Threads::Caller);
    product_into(
        &mut dk[..len_b * hd],
        true,
        shape.scale(),
        ds.t(),
        q,
        Threads::Caller,
    );
    dq
}

/// Backward of `attention_forward`, as FlashAttention computes it: the probabilities are
/// recomputed from the forward's log-sum-exp, P = exp(S − lse) with S = scale · Q·Kᵀ, and with
/// D = rowsum(dO ∘ O) (= Σ_j p_j dp_j):  dV += Pᵀ·dO;  dP = dO·Vᵀ;  dS = P ∘ (dP − D);
/// dQ = scale · dS·K;  dK += scale · dSᵀ·Q.
/// dq, dout, out: [M, n_heads * head_dim] (dq overwritten); lse: [M, n_heads];
/// dcache_k, dcache_v: [slots, capacity, kv_dim] (accumulated).
///
/// One task per (slot, KV head): the group's query heads in turn, each in blocks of query rows
/// that see only the keys up to their own last position (as the forward), every step a GEMM.
/// A task sums its dK/dV in its own [len, hd] buffers, added to the cache gradients afterwards.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dcache_k: &mut [f32],
    dcache_v: &mut [f32],
    dout: &[f32],
    out: &[f32],
    lse: &[f32],
    q: &[f32],
    cache_k: &[f32],
    cache_v: &[f32],
    place: &TokenPlacement,
    capacity: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
) {
    let shape = AttentionShape::new(
        "attention_backward",
        capacity,
        n_heads,
        n_kv_heads,
        head_dim,
    );
    let (q_dim, kv_dim, hd) = (n_heads * head_dim, shape.kv_dim(), head_dim);
    let group = n_heads / n_kv_heads;
    let slot_len = capacity * kv_dim;
    assert_eq!(
        dcache_v.len(),
        dcache_k.len(),
        "attention_backward: dcache_k and dcache_v differ"
    );
    let slots = dcache_k.len() / slot_len;
    let by_slot = tokens_by_slot(place, slots);
    let tasks: Vec<(usize, usize)> = (0..slots)
        .filter(|&s| !by_slot[s].is_empty())
        .flat_map(|s| (0..n_kv_heads).map(move |g| (s, g)))
        .collect();
    let head_rows = |x: &'_ [f32], tokens: &[usize], h: usize| -> Vec<f32> {
        tokens
            .iter()
            .flat_map(|&m| &x[m * q_dim + h * hd..][..hd])
            .copied()
            .collect()
    };

    // Each task: (dq of the group's heads [group, n, hd], dK [len, hd], dV [len, hd]).
    let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(slot, kv_head)| {
            let tokens = &by_slot[slot];
            let len = tokens
                .iter()
                .map(|&m| place.positions[m] as usize + 1)
                .max()
                .unwrap_or(0);
            let keys = shape.head_of_slot(cache_k, slot, kv_head * group);
            let values = shape.head_of_slot(cache_v, slot, kv_head * group);
            let (mut dk, mut dv) = (vec![0.0f32; len * hd], vec![0.0f32; len * hd]);
            let mut dq_group = Vec::with_capacity(group * tokens.len() * hd);
            for h in kv_head * group..(kv_head + 1) * group {
                for block in tokens.chunks(QUERY_BLOCK) {
                    let rows = BlockRows {
                        q: head_rows(q, block, h),
                        dout: head_rows(dout, block, h),
                        out: head_rows(out, block, h),
                        lse: block.iter().map(|&m| lse[m * n_heads + h]).collect(),
                        positions: block.iter().map(|&m| place.positions[m] as usize).collect(),
                    };
                    dq_group.extend(block_backward(
                        &rows, keys, values, &shape, &mut dk, &mut dv,
                    ));
                }
            }
            (dq_group, dk, dv)
        })
        .collect();

    for (&(slot, kv_head), (dq_group, dk, dv)) in tasks.iter().zip(&results) {
        let tokens = &by_slot[slot];
        for (i, h) in (kv_head * group..(kv_head + 1) * group).enumerate() {
            let rows = dq_group[i * tokens.len() * hd..].chunks_exact(hd);
            for (&m, row) in tokens.iter().zip(rows) {
                dq[m * q_dim + h * hd..][..hd].copy_from_slice(row);
            }
        }
        let base = slot * slot_len + kv_head * hd;
        for (j, (k_row, v_row)) in dk.chunks_exact(hd).zip(dv.chunks_exact(hd)).enumerate() {
            let at = base + j * kv_dim;
            dcache_k[at..at + hd]
                .iter_mut()
                .zip(k_row)
                .for_each(|(a, b)| *a += b);
            dcache_v[at..at + hd]
                .iter_mut()
                .zip(v_row)
                .for_each(|(a, b)| *a += b);
        }
    }
}
