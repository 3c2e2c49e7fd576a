//! Rotary position embedding, HF `rotate_half` convention: element i pairs with i + head_dim/2.

use rayon::prelude::*;

/// The rows of one product's output qkv: [M, q_dim + 2 kv_dim] (q, then k, then v) into
/// q: [M, q_dim], k and v: [M, kv_dim].
pub fn split_qkv(parts: [&mut [f32]; 3], qkv: &[f32], m: usize) {
    let widths = qkv_widths(parts.each_ref().map(|p| p.len()), qkv.len(), m);
    let pitch: usize = widths.iter().sum();
    let mut start = 0;
    for (part, width) in parts.into_iter().zip(widths) {
        for (row, src) in part.chunks_exact_mut(width).zip(qkv.chunks_exact(pitch)) {
            row.copy_from_slice(&src[start..start + width]);
        }
        start += width;
    }
}

/// The inverse of [`split_qkv`]: q, k and v's rows side by side into qkv.
pub fn join_qkv(qkv: &mut [f32], parts: [&[f32]; 3], m: usize) {
    let widths = qkv_widths(parts.map(<[f32]>::len), qkv.len(), m);
    let pitch: usize = widths.iter().sum();
    let mut start = 0;
    for (part, width) in parts.into_iter().zip(widths) {
        for (row, dst) in part.chunks_exact(width).zip(qkv.chunks_exact_mut(pitch)) {
            dst[start..start + width].copy_from_slice(row);
        }
        start += width;
    }
}

/// The row widths of q, k and v of m rows from their lengths, checked against qkv's.
fn qkv_widths(lens: [usize; 3], qkv_len: usize, m: usize) -> [usize; 3] {
    let widths = lens.map(|len| len / m.max(1));
    assert!(
        qkv_len == m * widths.iter().sum::<usize>() && lens == widths.map(|w| w * m),
        "qkv is not [M, q_dim + 2 kv_dim] for q: [M, q_dim], k and v: [M, kv_dim]"
    );
    widths
}

/// x: [M, n_heads * head_dim], rotated in place; positions: [M]; inv_freq: [head_dim / 2].
pub fn rope_forward(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
) {
    rotate(x, positions, inv_freq, n_heads, head_dim, 1.0);
}

/// Backward of `rope_forward`: the rotation is orthogonal, so the gradient is rotated back by
/// the negative angle, in place. dx: [M, n_heads * head_dim].
pub fn rope_backward(
    dx: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
) {
    rotate(dx, positions, inv_freq, n_heads, head_dim, -1.0);
}

/// Rotates each (i, i + half) pair by `direction` × position × inv_freq[i].
fn rotate(
    x: &mut [f32],
    positions: &[u32],
    inv_freq: &[f32],
    n_heads: usize,
    head_dim: usize,
    direction: f32,
) {
    let half = head_dim / 2;
    assert_eq!(inv_freq.len(), half, "rope: inv_freq is not [head_dim / 2]");
    assert_eq!(
        x.len(),
        positions.len() * n_heads * head_dim,
        "rope: x is not [M, n_heads * head_dim]"
    );
    x.par_chunks_mut(n_heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            // The angle is computed in f32 exactly as HF does (position · inv_freq in float32).
            let cos_sin: Vec<(f32, f32)> = inv_freq
                .iter()
                .map(|f| {
                    let a = pos as f32 * f;
                    (a.cos(), direction * a.sin())
                })
                .collect();
            for head in row.chunks_exact_mut(head_dim) {
                let (lo, hi) = head.split_at_mut(half);
                for ((x1, x2), (c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(&cos_sin) {
                    let (a, b) = (*x1, *x2);
                    *x1 = a * c - b * s;
                    *x2 = b * c + a * s;
                }
            }
        });
}
