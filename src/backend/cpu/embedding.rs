//! Row copies: the embedding lookup, row gathers and the residual add.

use super::ELEMENTS_PER_TASK;
use rayon::prelude::*;

/// out[m, :] = table[ids[m], :].  table: [V, dim]; out: [M, dim].
pub fn embedding_forward(out: &mut [f32], table: &[f32], ids: &[u32], dim: usize) {
    assert_eq!(
        out.len(),
        ids.len() * dim,
        "embedding_forward: out is not [M, dim]"
    );
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(row, &id)| {
            let id = id as usize;
            row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
        });
}

/// out[m, :] = table[sampled[rows[m]], :], NaN where that id is not a row of the table.
/// table: [V, dim]; sampled: [R] f32 ids; rows: [M]; out: [M, dim].
pub fn embedding_forward_sampled(
    out: &mut [f32],
    table: &[f32],
    sampled: &[f32],
    rows: &[u32],
    dim: usize,
) {
    assert_eq!(
        out.len(),
        rows.len() * dim,
        "embedding_forward_sampled: out is not [M, dim]"
    );
    let vocab = table.len() / dim;
    out.par_chunks_mut(dim)
        .zip(rows.par_iter())
        .for_each(|(row, &r)| {
            let id = sampled[r as usize];
            if id >= 0.0 && id < vocab as f32 {
                let id = id as usize;
                row.copy_from_slice(&table[id * dim..(id + 1) * dim]);
            } else {
                row.fill(f32::NAN);
            }
        });
}

/// out[r, :] = x[rows[r], :].  x: [M, dim]; out: [R, dim].
pub fn gather_rows(out: &mut [f32], x: &[f32], rows: &[usize], dim: usize) {
    assert_eq!(
        out.len(),
        rows.len() * dim,
        "gather_rows: out is not [R, dim]"
    );
    for (o, &r) in out.chunks_exact_mut(dim).zip(rows) {
        o.copy_from_slice(&x[r * dim..(r + 1) * dim]);
    }
}

/// x += y.
pub fn residual_add(x: &mut [f32], y: &[f32]) {
    assert_eq!(x.len(), y.len(), "residual_add: size mismatch");
    x.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(y.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(x, y)| *x += y));
}

/// Backward of `embedding_forward`: dtable[ids[m], :] += dout[m, :]. Repeated ids accumulate.
pub fn embedding_backward(dtable: &mut [f32], dout: &[f32], ids: &[u32], dim: usize) {
    assert_eq!(
        dout.len(),
        ids.len() * dim,
        "embedding_backward: dout is not [M, dim]"
    );
    for (row, &id) in dout.chunks_exact(dim).zip(ids) {
        let id = id as usize;
        dtable[id * dim..(id + 1) * dim]
            .iter_mut()
            .zip(row)
            .for_each(|(d, g)| *d += g);
    }
}

/// Backward of `gather_rows`: dx[rows[r], :] += dout[r, :].
pub fn scatter_add_rows(dx: &mut [f32], dout: &[f32], rows: &[usize], dim: usize) {
    assert_eq!(
        dout.len(),
        rows.len() * dim,
        "scatter_add_rows: dout is not [R, dim]"
    );
    for (g, &r) in dout.chunks_exact(dim).zip(rows) {
        dx[r * dim..(r + 1) * dim]
            .iter_mut()
            .zip(g)
            .for_each(|(d, g)| *d += g);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_embedding_reads_the_ids_of_the_listed_rows() {
        let table: Vec<f32> = (0..12).map(|x| x as f32).collect(); // [4, 3]: row v = 3v..3v+2
        let sampled = [2.0f32, 0.0, 3.0, 7.0, -1.0];
        let mut out = vec![0.0; 9];
        embedding_forward_sampled(&mut out, &table, &sampled, &[2, 0, 2], 3);
        assert_eq!(out, [9.0, 10.0, 11.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        // Ids outside the table (7, -1) give NaN rows, not a neighbouring row.
        let mut bad = vec![0.0; 6];
        embedding_forward_sampled(&mut bad, &table, &sampled, &[3, 4], 3);
        assert!(bad.iter().all(|x| x.is_nan()));
    }
}
