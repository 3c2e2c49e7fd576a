//! dst (+)= scale · a · b for f32 matrices of any strides: the one door to the CPU's matrix
//! products (the linear layers, their backward, the attention's GEMMs).
//!
//! On a CPU with AVX-512F the products run our packed kernel (`gemm_avx512`), which doubles the
//! multiply-adds per instruction over the `gemm` crate's AVX2 kernels (the crate's AVX-512
//! kernels need a nightly compiler); elsewhere they run the `gemm` crate.

/// A matrix inside a slice: element (r, c) is data[r · row_stride + c · col_stride], so a
/// transpose or a head's columns of the KV cache need no copy.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub(super) data: &'a [f32],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) col_stride: usize,
}

impl<'a> Strided<'a> {
    /// data as a row-major [rows, cols] matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::with_strides(data, rows, cols, cols, 1)
    }

    /// Panics unless every element lies inside data.
    pub fn with_strides(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        // the largest index read, checked: the unsafe products rely on this bound
        let last = (rows.max(1) - 1)
            .checked_mul(row_stride)
            .zip((cols.max(1) - 1).checked_mul(col_stride))
            .and_then(|(a, b)| a.checked_add(b));
        assert!(
            rows == 0 || cols == 0 || last.is_some_and(|last| last < data.len()),
            "matrix product: a [{rows}, {cols}] operand reaches past its buffer of {}",
            data.len()
        );
        Strided {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        }
    }

    /// The transpose, without a copy.
    pub fn t(self) -> Self {
        Strided {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// Whether a product may use the rayon pool (it still runs on the calling thread when small).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Threads {
    Pool,
    Caller,
}

/// Products below this many multiply-adds run on the calling thread: waking the pool costs
/// ~15 µs here, as much as 2M multiply-adds on one core of the AVX-512 kernel.
#[cfg(target_arch = "x86_64")]
const SERIAL_MACS: usize = 1 << 21;
/// The same for the `gemm` crate (AVX2, half the multiply-adds per instruction), as
/// `matmul_forward` passed it before.
const SERIAL_MACS_GEMM_CRATE: usize = 1 << 15;

/// dst = scale · a · b, or dst += scale · a · b when `accumulate`; dst: row-major
/// [a.rows, b.cols]. On a given CPU the result does not depend on `threads`.
pub fn product_into(
    dst: &mut [f32],
    accumulate: bool,
    scale: f32,
    a: Strided,
    b: Strided,
    threads: Threads,
) {
    check_shapes(dst, a, b);
    let macs = a.rows.saturating_mul(b.cols).saturating_mul(a.cols);
    let pool = |serial_macs| {
        threads == Threads::Pool && macs >= serial_macs && rayon::current_num_threads() > 1
    };
    #[cfg(target_arch = "x86_64")]
    if super::gemm_avx512::available() {
        super::gemm_avx512::gemm(dst, accumulate, scale, a, b, pool(SERIAL_MACS));
        return;
    }
    gemm_crate(dst, accumulate, scale, a, b, pool(SERIAL_MACS_GEMM_CRATE));
}

/// The inner dimensions agree and dst is [a.rows, b.cols].
pub(super) fn check_shapes(dst: &[f32], a: Strided, b: Strided) {
    assert_eq!(a.cols, b.rows, "matrix product: inner dimensions differ");
    assert_eq!(
        Some(dst.len()),
        a.rows.checked_mul(b.cols),
        "matrix product: dst is not [a rows, b cols]"
    );
}

/// `product_into` by the `gemm` crate.
fn gemm_crate(dst: &mut [f32], accumulate: bool, scale: f32, a: Strided, b: Strided, pool: bool) {
    check_shapes(dst, a, b);
    let parallelism = if pool {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `Strided::with_strides` checked that every element of a and b lies inside its
    // slice (a stride past isize::MAX is accepted only on a dimension of length 0 or 1, where
    // it multiplies nothing but 0), and `check_shapes` that dst is [a.rows, b.cols] row-major.
    unsafe {
        gemm::gemm(
            a.rows,
            b.cols,
            a.cols,
            dst.as_mut_ptr(),
            1,
            b.cols as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Philox;

    /// α · a · b (+ dst) in f64.
    fn reference(dst: &[f32], accumulate: bool, alpha: f32, a: Strided, b: Strided) -> Vec<f64> {
        let at =
            |m: Strided, r: usize, c: usize| m.data[r * m.row_stride + c * m.col_stride] as f64;
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let dot: f64 = (0..a.cols).map(|p| at(a, i, p) * at(b, p, j)).sum();
                let before = if accumulate {
                    dst[i * b.cols + j] as f64
                } else {
                    0.0
                };
                out[i * b.cols + j] = before + alpha as f64 * dot;
            }
        }
        out
    }

    fn random(rng: &mut Philox, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| rng.next_uniform() as f32 * 2.0 - 1.0)
            .collect()
    }

    /// The operand layouts the CPU backend uses: row-major, transposed, and a head's columns
    /// inside wider rows; and one where neither rows nor columns are contiguous.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        RowMajor,
        Transposed,
        Padded,
        Scattered,
    }

    fn operand(data: &[f32], rows: usize, cols: usize, layout: Layout) -> Strided<'_> {
        match layout {
            Layout::RowMajor => Strided::rows(data, rows, cols),
            Layout::Transposed => Strided::rows(data, cols, rows).t(),
            Layout::Padded => Strided::with_strides(data, rows, cols, cols + 3, 1),
            Layout::Scattered => Strided::with_strides(data, rows, cols, 2 * cols, 2),
        }
    }

    fn storage(rows: usize, cols: usize, layout: Layout) -> usize {
        match layout {
            Layout::Padded => rows * (cols + 3),
            Layout::Scattered => rows * 2 * cols,
            _ => rows * cols,
        }
    }

    /// Every way to the product on this CPU: the dispatcher, and each implementation (on the
    /// pool and on the calling thread).
    fn implementations() -> Vec<(&'static str, Product)> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut all: Vec<(&str, Product)> = vec![
            ("product_into, pool", |d, acc, s, a, b| {
                product_into(d, acc, s, a, b, Threads::Pool)
            }),
            ("gemm crate", |d, acc, s, a, b| {
                gemm_crate(d, acc, s, a, b, false)
            }),
            ("gemm crate, pool", |d, acc, s, a, b| {
                gemm_crate(d, acc, s, a, b, true)
            }),
        ];
        #[cfg(target_arch = "x86_64")]
        if super::super::gemm_avx512::available() {
            use super::super::gemm_avx512::gemm;
            all.push(("gemm_avx512", |d, acc, s, a, b| {
                gemm(d, acc, s, a, b, false)
            }));
            all.push(("gemm_avx512, pool", |d, acc, s, a, b| {
                gemm(d, acc, s, a, b, true)
            }));
        }
        all
    }

    type Product = fn(&mut [f32], bool, f32, Strided, Strided);

    /// (accumulate, scale): overwriting with a scale, and adding with another.
    const CASES: [(bool, f32); 3] = [(false, 1.0), (false, -0.75), (true, 0.5)];

    /// Checks `product` against `reference` on every element.
    fn assert_close(name: &str, got: &[f32], want: &[f64], k: usize) {
        for (idx, (got, want)) in got.iter().zip(want).enumerate() {
            let tol = 1e-5 * (k as f64).sqrt() + 1e-5 * want.abs();
            assert!(
                (*got as f64 - want).abs() <= tol,
                "{name}: element {idx} is {got}, want {want}"
            );
        }
    }

    #[test]
    fn every_implementation_matches_a_float64_product_across_tiles_blocks_and_layouts() {
        let mut rng = Philox::new(7, 0);
        let layouts = [
            Layout::RowMajor,
            Layout::Transposed,
            Layout::Padded,
            Layout::Scattered,
        ];
        // edges of gemm_avx512's tile (12 × 32), row tasks (96), column tasks (256), packed
        // columns (4096) and inner blocks (256)
        let shapes = [
            (1, 1, 1),
            (12, 32, 256),
            (13, 33, 257),
            (5, 17, 7),
            (97, 257, 600),
            (200, 40, 513),
            (3, 4100, 300),
            (0, 5, 3),
            (4, 0, 3),
            (4, 5, 0),
        ];
        for (m, n, k) in shapes {
            for (la, lb) in layouts.iter().flat_map(|&la| layouts.map(|lb| (la, lb))) {
                let a_data = random(&mut rng, storage(m, k, la));
                let b_data = random(&mut rng, storage(k, n, lb));
                let (a, b) = (operand(&a_data, m, k, la), operand(&b_data, k, n, lb));
                for ((name, product), (accumulate, alpha)) in implementations()
                    .into_iter()
                    .flat_map(|imp| CASES.map(|case| (imp, case)))
                {
                    // overwriting must not read dst: NaN there would show
                    let mut dst = match accumulate {
                        true => random(&mut rng, m * n),
                        false => vec![f32::NAN; m * n],
                    };
                    let want = reference(&dst, accumulate, alpha, a, b);
                    product(&mut dst, accumulate, alpha, a, b);
                    let case = format!(
                        "{name}: [{m}, {k}]·[{k}, {n}] {la:?}·{lb:?} accumulate {accumulate}"
                    );
                    assert_close(&case, &dst, &want, k);
                }
            }
        }
    }

    /// Strides the layouts above lack: every row the same (row stride 0), and rows that
    /// overlap (row and column stride 1: element (r, c) is data[r + c]).
    #[test]
    fn repeated_and_overlapping_rows_match_a_float64_product() {
        let mut rng = Philox::new(9, 0);
        for (m, n, k) in [(13, 33, 257), (25, 17, 40)] {
            let repeated = random(&mut rng, k);
            let overlapping = random(&mut rng, m + k - 1);
            let b_data = random(&mut rng, k * n);
            let b = Strided::rows(&b_data, k, n);
            for (layout, a) in [
                ("repeated", Strided::with_strides(&repeated, m, k, 0, 1)),
                (
                    "overlapping",
                    Strided::with_strides(&overlapping, m, k, 1, 1),
                ),
            ] {
                for ((name, product), (accumulate, alpha)) in implementations()
                    .into_iter()
                    .flat_map(|imp| CASES.map(|case| (imp, case)))
                {
                    let mut dst = random(&mut rng, m * n);
                    let want = reference(&dst, accumulate, alpha, a, b);
                    product(&mut dst, accumulate, alpha, a, b);
                    let case = format!("{name}: {layout} A [{m}, {k}], accumulate {accumulate}");
                    assert_close(&case, &dst, &want, k);
                }
            }
        }
    }

    /// Each implementation, on one thread and on a pool of 3, with a packed A (neither stride
    /// 1, rows not a multiple of the kernel's 12) and accumulation over several blocks of K.
    #[test]
    fn the_thread_count_does_not_change_a_bit() {
        let mut rng = Philox::new(10, 0);
        let (m, n, k) = (301, 70, 700);
        let a_data = random(&mut rng, storage(m, k, Layout::Scattered));
        let b_data = random(&mut rng, k * n);
        let a = operand(&a_data, m, k, Layout::Scattered);
        let b = Strided::rows(&b_data, n, k).t();
        let start = random(&mut rng, m * n);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let run = |product: Product| {
            let mut dst = start.clone();
            product(&mut dst, true, 0.5, a, b);
            dst
        };
        for (name, product) in implementations() {
            let (one, three) = (run(product), pool.install(|| run(product)));
            assert!(
                one.iter()
                    .zip(&three)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: 1 and 3 threads differ"
            );
        }
    }

    #[test]
    fn an_operand_is_accepted_exactly_up_to_the_end_of_its_slice() {
        let data = [0.0; 10];
        let m = Strided::with_strides(&data, 2, 5, 5, 1);
        assert_eq!((m.rows, m.cols), (2, 5));
        let column = Strided::with_strides(&data, 10, 1, 1, usize::MAX);
        assert_eq!((column.rows, column.cols), (10, 1));
    }

    #[test]
    #[should_panic(expected = "reaches past its buffer")]
    fn an_operand_one_past_the_end_of_its_slice_is_refused() {
        Strided::with_strides(&[0.0; 10], 2, 6, 5, 1);
    }

    #[test]
    #[should_panic(expected = "reaches past its buffer")]
    fn an_operand_whose_last_index_overflows_is_refused() {
        Strided::with_strides(&[0.0; 10], 3, 2, usize::MAX / 2, 1);
    }
}
