//! Launcher for `kernels/kv_cache.cu`: writes one layer's new keys and values into the slotted
//! cache. grid.x covers kv_dim, grid.y the tokens ([`rows_config`]); one launch writes both caches.

use anyhow::{ensure, Result};

use super::elementwise::{aligned16, rows_config, BF16_VEC};
use crate::cuda::launch::{grid_1d, to_i32, KernelLaunch, Launcher};

const MODULE: &str = "kv_cache";

/// Checks the shapes; returns (m, capacity, kv_dim) as the kernel's ints.
fn check_shapes(op: &str, m: usize, capacity: usize, kv_dim: usize) -> Result<(i32, i32, i32)> {
    ensure!(capacity > 0, "{op}: capacity must be positive");
    ensure!(kv_dim > 0, "{op}: kv_dim must be positive");
    Ok((
        to_i32(op, "m", m)?,
        to_i32(op, "capacity", capacity)?,
        to_i32(op, "kv_dim", kv_dim)?,
    ))
}

/// cache_k[slots[i], positions[i], :] = key[i, :] and the same for the values, i < m.
/// cache_k, cache_v: bf16 [slots, capacity, kv_dim] (one layer); key, value: bf16 [m, kv_dim];
/// slots, positions: u32 [m], validated by the caller (slot < slots, position < capacity).
#[allow(clippy::too_many_arguments)]
pub fn kv_cache_write(
    k: &dyn Launcher,
    cache_k: u64,
    cache_v: u64,
    key: u64,
    value: u64,
    slots: u64,
    positions: u64,
    m: usize,
    capacity: usize,
    kv_dim: usize,
) -> Result<()> {
    let (m_i, capacity_i, kv_dim_i) = check_shapes("kv_cache_write", m, capacity, kv_dim)?;
    if m == 0 {
        return Ok(());
    }
    let vectorised = kv_dim.is_multiple_of(BF16_VEC) && aligned16(&[cache_k, cache_v, key, value]);
    let cfg = rows_config(m, kv_dim, vectorised);
    let l = KernelLaunch::new(MODULE, "kv_cache_write", cfg)
        .ptr(cache_k)
        .ptr(cache_v)
        .ptr(key)
        .ptr(value)
        .ptr(slots)
        .ptr(positions)
        .i32(m_i)
        .i32(capacity_i)
        .i32(kv_dim_i);
    // SAFETY: matches `(bf16* cache_k, bf16* cache_v, const bf16* key, const bf16* value,
    // const u32* slots, const u32* positions, int m, int capacity, int kv_dim)`; the caller owns
    // key/value of m * kv_dim bf16, slots/positions of m u32 with every (slot, position) inside
    // the caches.
    unsafe { k.launch(&l) }
}

/// dx[i] = dcache[slots[i], positions[i]]: dx bf16 [m, kv_dim], dcache bf16 [slots, capacity,
/// kv_dim] (one cache of one layer); slots and positions checked by the caller.
#[allow(clippy::too_many_arguments)]
pub fn kv_cache_gather(
    k: &dyn Launcher,
    dx: u64,
    dcache: u64,
    slots: u64,
    positions: u64,
    m: usize,
    capacity: usize,
    kv_dim: usize,
) -> Result<()> {
    let (m_i, capacity_i, kv_dim_i) = check_shapes("kv_cache_gather", m, capacity, kv_dim)?;
    if m == 0 {
        return Ok(());
    }
    let cfg = rows_config(m, kv_dim, false);
    let l = KernelLaunch::new(MODULE, "kv_cache_gather", cfg)
        .ptr(dx)
        .ptr(dcache)
        .ptr(slots)
        .ptr(positions)
        .i32(m_i)
        .i32(capacity_i)
        .i32(kv_dim_i);
    // SAFETY: matches `(bf16* dx, const bf16* dcache, const u32* slots, const u32* positions,
    // int m, int capacity, int kv_dim)`; the caller checked every slot and position.
    unsafe { k.launch(&l) }
}

const ADVANCE_POSITIONS: &str = "advance_positions";

/// Loads `advance_positions` ahead of a recording: it is the one kernel that only ever runs
/// inside recorded decode steps.
pub fn prepare_advance_positions(k: &dyn Launcher) -> Result<()> {
    k.prepare(MODULE, ADVANCE_POSITIONS)
}

/// positions[i] += 1 for i < m (u32): a recorded decode step's positions move on by one.
pub fn advance_positions(k: &dyn Launcher, positions: u64, m: usize) -> Result<()> {
    let m_i = to_i32(ADVANCE_POSITIONS, "m", m)?;
    if m == 0 {
        return Ok(());
    }
    let l = KernelLaunch::new(MODULE, ADVANCE_POSITIONS, grid_1d(m, 256))
        .ptr(positions)
        .i32(m_i);
    // SAFETY: matches `(u32* positions, int m)`; the caller owns m u32 at `positions`.
    unsafe { k.launch(&l) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert_eq!(
            check_shapes("kv_cache_write", 4, 1024, 128).unwrap(),
            (4, 1024, 128)
        );
        assert!(check_shapes("kv_cache_write", 0, 1024, 128).is_ok());
        assert!(check_shapes("kv_cache_write", 4, 0, 128).is_err());
        assert!(check_shapes("kv_cache_write", 4, 1024, 0).is_err());
        assert!(check_shapes("kv_cache_gather", 1 << 31, 1024, 128).is_err());
    }
}
