//! Launchers for `kernels/embedding.cu`: row gathers (embedding lookup, row selection).
//! grid.x covers the columns of a row, grid.y the rows ([`rows_config`]).

use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

use super::elementwise::{aligned16, rows_config, BF16_VEC, BLOCK_THREADS, MAX_GRID_Y};
use crate::cuda::launch::{to_i32, KernelLaunch, Launcher};

const MODULE: &str = "embedding";

/// Launches `kernel(bf16* out, const bf16* src, const u32* index, int rows, int dim)`.
fn launch_copy_rows(
    k: &dyn Launcher,
    kernel: &'static str,
    out: u64,
    src: u64,
    index: u64,
    rows: usize,
    dim: usize,
) -> Result<()> {
    ensure!(dim > 0, "{kernel}: dim must be positive");
    let rows_i = to_i32(kernel, "rows", rows)?;
    let dim_i = to_i32(kernel, "dim", dim)?;
    if rows == 0 {
        return Ok(());
    }
    let vectorised = dim.is_multiple_of(BF16_VEC) && aligned16(&[out, src]);
    let cfg = rows_config(rows, dim, vectorised);
    let l = KernelLaunch::new(MODULE, kernel, cfg)
        .ptr(out)
        .ptr(src)
        .ptr(index)
        .i32(rows_i)
        .i32(dim_i);
    // SAFETY: matches `(bf16* out, const bf16* src, const u32* index, int rows, int dim)`; the
    // caller owns out of rows * dim bf16 and index of rows u32, each index selecting a row of
    // src (validated on the host).
    unsafe { k.launch(&l) }
}

/// out[r, :] = table[ids[r], :].  out: bf16 [m, dim]; table: bf16 [vocab, dim]; ids: u32 [m].
pub fn embedding_forward(
    k: &dyn Launcher,
    out: u64,
    table: u64,
    ids: u64,
    m: usize,
    dim: usize,
) -> Result<()> {
    launch_copy_rows(k, "embedding_forward", out, table, ids, m, dim)
}

/// out[r, :] = table[sampled[rows[r]], :], a row of NaN where that id is not a row of the table.
/// out: bf16 [m, dim]; table: bf16 [vocab, dim]; sampled: f32 ids; rows: u32 [m].
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward_sampled(
    k: &dyn Launcher,
    out: u64,
    table: u64,
    sampled: u64,
    rows: u64,
    m: usize,
    dim: usize,
    vocab: usize,
) -> Result<()> {
    const KERNEL: &str = "embedding_forward_sampled";
    ensure!(dim > 0, "{KERNEL}: dim must be positive");
    let m_i = to_i32(KERNEL, "rows", m)?;
    let dim_i = to_i32(KERNEL, "dim", dim)?;
    let vocab_i = to_i32(KERNEL, "vocab", vocab)?;
    if m == 0 {
        return Ok(());
    }
    let vectorised = dim.is_multiple_of(BF16_VEC) && aligned16(&[out, table]);
    let cfg = rows_config(m, dim, vectorised);
    let l = KernelLaunch::new(MODULE, KERNEL, cfg)
        .ptr(out)
        .ptr(table)
        .ptr(sampled)
        .ptr(rows)
        .i32(m_i)
        .i32(dim_i)
        .i32(vocab_i);
    // SAFETY: matches `(bf16* out, const bf16* table, const float* sampled, const u32* rows_index,
    // int rows, int dim, int vocab)`; the caller owns out of m * dim bf16, table of vocab * dim
    // bf16, rows of m u32 each selecting an element of sampled (validated on the host); the
    // kernel checks each sampled id against vocab.
    unsafe { k.launch(&l) }
}

/// out[r, :] = x[rows[r], :].  out: bf16 [r, dim]; x: bf16 [*, dim]; rows: u32 [r].
pub fn gather_rows(
    k: &dyn Launcher,
    out: u64,
    x: u64,
    rows: u64,
    r: usize,
    dim: usize,
) -> Result<()> {
    launch_copy_rows(k, "gather_rows", out, x, rows, r, dim)
}

/// Sources grouped by destination row, for the scatter kernels: group g adds the source rows
/// `src_rows[offsets[g]..offsets[g + 1]]` (increasing) to destination row `dst_rows[g]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowGroups {
    pub dst_rows: Vec<u32>,
    pub offsets: Vec<u32>,
    pub src_rows: Vec<u32>,
}

impl RowGroups {
    /// Groups source r = 0..index.len() by its destination index[r].
    pub fn new(index: &[u32]) -> Self {
        let mut order: Vec<u32> = (0..index.len() as u32).collect();
        order.sort_by_key(|&r| (index[r as usize], r));
        let mut groups = RowGroups {
            dst_rows: Vec::new(),
            offsets: vec![0],
            src_rows: order,
        };
        for (k, &r) in groups.src_rows.iter().enumerate() {
            let dst = index[r as usize];
            if groups.dst_rows.last() != Some(&dst) {
                if k > 0 {
                    groups.offsets.push(k as u32);
                }
                groups.dst_rows.push(dst);
            }
        }
        groups.offsets.push(groups.src_rows.len() as u32);
        if groups.dst_rows.is_empty() {
            groups.offsets.truncate(1);
        }
        groups
    }
}

/// Launches one of the grouped scatter kernels `(T* dst, const bf16* dout, const u32* offsets,
/// const u32* src_rows, const u32* dst_rows, int groups, int dim)` with the device copies of a
/// [`RowGroups`]: dst[dst_rows[g]] += Σ dout[src_rows[k]] for each group g.
#[allow(clippy::too_many_arguments)]
fn launch_scatter(
    k: &dyn Launcher,
    kernel: &'static str,
    dst: u64,
    dout: u64,
    (offsets, src_rows, dst_rows): (u64, u64, u64),
    groups: usize,
    dim: usize,
) -> Result<()> {
    let groups_i = to_i32(kernel, "groups", groups)?;
    let dim_i = to_i32(kernel, "dim", dim)?;
    if groups == 0 || dim == 0 {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (
            dim.div_ceil(BLOCK_THREADS as usize) as u32,
            groups.min(MAX_GRID_Y) as u32,
            1,
        ),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let l = KernelLaunch::new(MODULE, kernel, cfg)
        .ptr(dst)
        .ptr(dout)
        .ptr(offsets)
        .ptr(src_rows)
        .ptr(dst_rows)
        .i32(groups_i)
        .i32(dim_i);
    // SAFETY: matches the kernel's `(T* dst, const bf16* dout, const u32* offsets,
    // const u32* src_rows, const u32* dst_rows, int groups, int dim)`; the caller uploaded a
    // RowGroups whose source rows index dout and whose destination rows were checked against
    // dst's rows; one thread per column, the y loop covers the groups past the grid.
    unsafe { k.launch(&l) }
}

/// dtable (f32 [V, dim]) [ids[r]] += dout (bf16 [m, dim]) [r], through the device copies of
/// `RowGroups::new(ids)` (offsets, src_rows, dst_rows); ids checked by the caller.
pub fn embedding_backward(
    k: &dyn Launcher,
    dtable: u64,
    dout: u64,
    groups: (u64, u64, u64),
    count: usize,
    dim: usize,
) -> Result<()> {
    launch_scatter(k, "embedding_backward", dtable, dout, groups, count, dim)
}

/// dx (bf16 [M, dim]) [rows[i]] += dout (bf16 [r, dim]) [i], through the device copies of
/// `RowGroups::new(rows)`; rows checked by the caller.
pub fn scatter_add_rows(
    k: &dyn Launcher,
    dx: u64,
    dout: u64,
    groups: (u64, u64, u64),
    count: usize,
    dim: usize,
) -> Result<()> {
    launch_scatter(k, "scatter_add_rows", dx, dout, groups, count, dim)
}

#[cfg(test)]
mod tests {
    use super::RowGroups;

    #[test]
    fn row_groups_list_each_destination_once_with_its_sources_in_order() {
        let g = RowGroups::new(&[5, 2, 5, 9, 2, 5]);
        assert_eq!(g.dst_rows, vec![2, 5, 9]);
        assert_eq!(g.offsets, vec![0, 2, 5, 6]);
        assert_eq!(g.src_rows, vec![1, 4, 0, 2, 5, 3]);
        let empty = RowGroups::new(&[]);
        assert_eq!((empty.dst_rows.len(), empty.offsets), (0, vec![0]));
    }
}
