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

/// q, out: [M, n_heads * head_dim]; cache_k, cache_v: [slots, capacity, n_kv_heads * head_dim].
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    out: &mut [f32],
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
    let group = n_heads / n_kv_heads; // query heads sharing one KV head
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
    let scale = 1.0 / (head_dim as f32).sqrt();

    // One task per (token, head): out[m, h*hd..(h+1)*hd].
    out.par_chunks_mut(head_dim).enumerate().for_each_init(
        Vec::new,
        |scores: &mut Vec<f32>, (mh, o)| {
            let (m, h) = (mh / n_heads, mh % n_heads);
            let (slot, pos) = (place.slots[m] as usize, place.positions[m] as usize);
            let qh = &q[m * q_dim + h * head_dim..][..head_dim];
            let kv_off = (h / group) * head_dim;
            let base = slot * capacity * kv_dim;

            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..=pos {
                let k = &cache_k[base + j * kv_dim + kv_off..][..head_dim];
                let s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(s);
                scores.push(s);
            }
            let mut denom = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                denom += *s;
            }
            o.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let v = &cache_v[base + j * kv_dim + kv_off..][..head_dim];
                let w = p / denom;
                o.iter_mut().zip(v).for_each(|(o, v)| *o += w * v);
            }
        },
    );
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

/// Backward of `attention_forward`. Probabilities are recomputed from q and the cached keys.
/// With p = softmax(s), s_j = scale · q·k_j:  dv_j += p_j · dout;  dp_j = dout·v_j;
/// ds_j = p_j (dp_j − Σ_i p_i dp_i);  dq = scale Σ_j ds_j k_j;  dk_j += scale · ds_j · q.
/// dq: [M, n_heads * head_dim] (overwritten); dcache_k, dcache_v: [slots, capacity, kv_dim]
/// (accumulated).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dcache_k: &mut [f32],
    dcache_v: &mut [f32],
    dout: &[f32],
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
            let mut p = Vec::new();
            let mut dp = Vec::new();
            tokens
                .iter()
                .map(|&m| {
                    let pos = place.positions[m] as usize;
                    let mut dq_row = vec![0.0f32; q_dim];
                    for h in 0..n_heads {
                        let off = (h / group) * head_dim;
                        let qh = &q[m * q_dim + h * head_dim..][..head_dim];
                        let go = &dout[m * q_dim + h * head_dim..][..head_dim];
                        p.clear();
                        dp.clear();
                        let mut max = f32::NEG_INFINITY;
                        for j in 0..=pos {
                            let k = &ck[j * kv_dim + off..][..head_dim];
                            let s = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
                            max = max.max(s);
                            p.push(s);
                        }
                        let mut denom = 0.0;
                        for s in p.iter_mut() {
                            *s = (*s - max).exp();
                            denom += *s;
                        }
                        let mut p_dot_dp = 0.0;
                        for (j, pj) in p.iter_mut().enumerate() {
                            *pj /= denom;
                            let v = &cv[j * kv_dim + off..][..head_dim];
                            let d = go.iter().zip(v).map(|(a, b)| a * b).sum::<f32>();
                            dp.push(d);
                            p_dot_dp += *pj * d;
                            dv[j * kv_dim + off..][..head_dim]
                                .iter_mut()
                                .zip(go)
                                .for_each(|(dv, g)| *dv += *pj * g);
                        }
                        let dqh = &mut dq_row[h * head_dim..(h + 1) * head_dim];
                        for j in 0..=pos {
                            let ds = p[j] * (dp[j] - p_dot_dp) * scale;
                            let k = &ck[j * kv_dim + off..][..head_dim];
                            dqh.iter_mut().zip(k).for_each(|(d, k)| *d += ds * k);
                            dk[j * kv_dim + off..][..head_dim]
                                .iter_mut()
                                .zip(qh)
                                .for_each(|(d, q)| *d += ds * q);
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
