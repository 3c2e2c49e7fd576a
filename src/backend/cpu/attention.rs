//! Causal grouped-query attention over a slotted KV cache.
//!
//! The cache holds, per sequence slot, keys and values for positions 0..capacity. A token at
//! position p of slot s attends to positions 0..=p of that slot, so a prefill (all prompt tokens
//! written first) and a decode step (one new token per sequence) are the same computation.

use crate::backend::TokenPlacement;
use rayon::prelude::*;

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
/// (decode: one token per slot) a dot product per key is cheaper than setting up a GEMM.
const GEMM_MIN_TOKENS: usize = 8;
/// Query rows per GEMM block.
const QUERY_BLOCK: usize = 64;

/// q, out: [M, n_heads * head_dim]; cache_k, cache_v: [slots, capacity, n_kv_heads * head_dim];
/// lse (when given): [M, n_heads], the log-sum-exp of each row's scaled scores, which the
/// backward uses to recompute the probabilities.
///
/// One task per (slot, query head). A slot's query rows Q [n, hd] see keys 0..=max position:
/// S = scale · Q·Kᵀ [n, L], row i masked beyond position i, softmax per row, O = P·V [n, hd].
/// Prefill runs those as two GEMMs on the cache in place (K and V rows are strided by kv_dim);
/// a slot with few tokens (decode) takes the same steps one key at a time.
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
    let shape = AttentionShape {
        capacity,
        n_heads,
        n_kv_heads,
        head_dim,
    };
    // Tokens of each slot, in batch order.
    let mut by_slot: Vec<(u32, Vec<usize>)> = Vec::new();
    for (m, &s) in place.slots.iter().enumerate() {
        match by_slot.iter_mut().find(|(slot, _)| *slot == s) {
            Some((_, tokens)) => tokens.push(m),
            None => by_slot.push((s, vec![m])),
        }
    }
    let tasks: Vec<(usize, usize)> = (0..by_slot.len())
        .flat_map(|b| (0..n_heads).map(move |h| (b, h)))
        .collect();
    // Each task returns its head's outputs [n, hd] and log-sum-exps [n]; they are scattered into
    // `out` and `lse` afterwards.
    let results: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map(|&(b, h)| {
            let (slot, tokens) = &by_slot[b];
            let positions: Vec<usize> = tokens
                .iter()
                .map(|&m| place.positions[m] as usize)
                .collect();
            let q_rows: Vec<&[f32]> = tokens
                .iter()
                .map(|&m| &q[m * q_dim + h * head_dim..][..head_dim])
                .collect();
            let keys = shape.head_of_slot(cache_k, *slot as usize, h);
            let values = shape.head_of_slot(cache_v, *slot as usize, h);
            if tokens.len() >= GEMM_MIN_TOKENS {
                // Blocks of query rows, each multiplying only the keys up to its own last
                // position: a prefill (positions ascending) skips most of the masked triangle.
                let (mut o, mut l) = (Vec::new(), Vec::new());
                for (q, p) in q_rows
                    .chunks(QUERY_BLOCK)
                    .zip(positions.chunks(QUERY_BLOCK))
                {
                    let (ob, lb) = attend_gemm(q, p, keys, values, &shape);
                    o.extend(ob);
                    l.extend(lb);
                }
                (o, l)
            } else {
                attend_dots(&q_rows, &positions, keys, values, &shape)
            }
        })
        .collect();
    let mut lse = lse;
    for (&(b, h), (o, l)) in tasks.iter().zip(&results) {
        for ((&m, row), &row_lse) in by_slot[b].1.iter().zip(o.chunks_exact(head_dim)).zip(l) {
            out[m * q_dim + h * head_dim..][..head_dim].copy_from_slice(row);
            if let Some(lse) = lse.as_deref_mut() {
                lse[m * n_heads + h] = row_lse;
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
    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// The cache of one slot from query head h's KV head on: row j starts at j · kv_dim.
    fn head_of_slot<'a>(&self, cache: &'a [f32], slot: usize, h: usize) -> &'a [f32] {
        let kv_head = h / (self.n_heads / self.n_kv_heads);
        &cache[slot * self.capacity * self.kv_dim() + kv_head * self.head_dim..]
    }
}

/// Softmax of scores[0..len] in place (shifted by the max, f32); returns log Σ exp(scores).
fn softmax_prefix(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut denom = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        denom += *s;
    }
    scores.iter_mut().for_each(|s| *s /= denom);
    max + denom.ln()
}

/// Attention of a few query rows, one key at a time.  Returns O: [n, hd] and lse: [n].
fn attend_dots(
    q_rows: &[&[f32]],
    positions: &[usize],
    keys: &[f32],
    values: &[f32],
    shape: &AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0f32; q_rows.len() * hd];
    let mut lse = Vec::with_capacity(q_rows.len());
    let mut scores = Vec::new();
    for ((qh, &pos), o) in q_rows.iter().zip(positions).zip(out.chunks_exact_mut(hd)) {
        scores.clear();
        scores.extend((0..=pos).map(|j| {
            let k = &keys[j * kv_dim..][..hd];
            qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
        }));
        lse.push(softmax_prefix(&mut scores));
        for (j, p) in scores.iter().enumerate() {
            let v = &values[j * kv_dim..][..hd];
            o.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
        }
    }
    (out, lse)
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
    let scale = 1.0 / (hd as f32).sqrt();
    let q: Vec<f32> = q_rows.concat(); // [n, hd]
    assert!(
        keys.len() >= (len - 1) * kv_dim + hd && values.len() >= (len - 1) * kv_dim + hd,
        "attention_forward: positions beyond the cache"
    );

    // S = scale · Q · Kᵀ: [n, len]; Kᵀ element (d, j) is keys[j * kv_dim + d].
    let mut scores = vec![0.0f32; n * len];
    // SAFETY: Q is [n, hd] row-major, K rows j < len lie inside `keys` (asserted above), S is
    // [n, len] row-major; the strides below say exactly that.
    unsafe {
        gemm::gemm(
            n,
            len,
            hd,
            scores.as_mut_ptr(),
            1,
            len as isize,
            false,
            q.as_ptr(),
            1,
            hd as isize,
            keys.as_ptr(),
            kv_dim as isize, // next key j
            1,               // next dim d
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    // Causal mask: row i sees keys 0..=positions[i]; softmax over those, zeros beyond.
    let mut lse = Vec::with_capacity(n);
    for (row, &pos) in scores.chunks_exact_mut(len).zip(positions) {
        lse.push(softmax_prefix(&mut row[..=pos]));
        row[pos + 1..].fill(0.0);
    }
    // O = P · V: [n, hd]; V element (j, d) is values[j * kv_dim + d].
    let mut out = vec![0.0f32; n * hd];
    // SAFETY: P is [n, len] row-major, V rows j < len lie inside `values`, O is [n, hd].
    unsafe {
        gemm::gemm(
            n,
            hd,
            len,
            out.as_mut_ptr(),
            1,
            hd as isize,
            false,
            scores.as_ptr(),
            1,
            len as isize,
            values.as_ptr(),
            1,
            kv_dim as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
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

/// Backward of `attention_forward`, as FlashAttention computes it: the probabilities are
/// recomputed from the forward's log-sum-exp, p_j = exp(s_j − lse) with s_j = scale · q·k_j, and
/// with D = dout·out (= Σ_j p_j dp_j):  dv_j += p_j · dout;  dp_j = dout·v_j;
/// ds_j = p_j (dp_j − D);  dq = scale Σ_j ds_j k_j;  dk_j += scale · ds_j · q.
/// dq, dout, out: [M, n_heads * head_dim] (dq overwritten); lse: [M, n_heads];
/// dcache_k, dcache_v: [slots, capacity, kv_dim] (accumulated).
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
    let q_dim = n_heads * head_dim;
    let kv_dim = n_kv_heads * head_dim;
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let slot_len = capacity * kv_dim;
    let slots = dcache_k.len() / slot_len;
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();

    // Tokens of each slot, so each task owns one slot's dK/dV and writes no shared memory.
    let mut by_slot: Vec<Vec<usize>> = vec![Vec::new(); slots];
    for (m, &s) in place.slots.iter().enumerate() {
        by_slot[s as usize].push(m);
    }
    let dq_rows: Vec<(usize, Vec<f32>)> = dcache_k
        .par_chunks_mut(slot_len)
        .zip(dcache_v.par_chunks_mut(slot_len))
        .zip(by_slot.par_iter())
        .enumerate()
        .flat_map_iter(|(slot, ((dk, dv), tokens))| {
            let base = slot * slot_len;
            let (ck, cv) = (
                &cache_k[base..base + slot_len],
                &cache_v[base..base + slot_len],
            );
            tokens
                .iter()
                .map(|&m| {
                    let pos = place.positions[m] as usize;
                    let mut dq_row = vec![0.0f32; q_dim];
                    for h in 0..n_heads {
                        let off = (h / group) * head_dim;
                        let row = m * q_dim + h * head_dim;
                        let qh = &q[row..][..head_dim];
                        let go = &dout[row..][..head_dim];
                        let d = dot(go, &out[row..][..head_dim]);
                        let row_lse = lse[m * n_heads + h];
                        let dqh = &mut dq_row[h * head_dim..(h + 1) * head_dim];
                        for j in 0..=pos {
                            let k = &ck[j * kv_dim + off..][..head_dim];
                            let v = &cv[j * kv_dim + off..][..head_dim];
                            let p = (dot(qh, k) * scale - row_lse).exp();
                            let ds = p * (dot(go, v) - d) * scale;
                            dv[j * kv_dim + off..][..head_dim]
                                .iter_mut()
                                .zip(go)
                                .for_each(|(dv, g)| *dv += p * g);
                            dqh.iter_mut().zip(k).for_each(|(dq, k)| *dq += ds * k);
                            dk[j * kv_dim + off..][..head_dim]
                                .iter_mut()
                                .zip(qh)
                                .for_each(|(dk, q)| *dk += ds * q);
                        }
                    }
                    (m, dq_row)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for (m, row) in dq_rows {
        dq[m * q_dim..(m + 1) * q_dim].copy_from_slice(&row);
    }
}
