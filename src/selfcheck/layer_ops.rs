//! The forward ops of the layers (embedding, norms, matmul, rotation, KV cache, SwiGLU, residual
//! adds, gathers, attention, log-probs), device against the CPU, shape by shape.

use super::{
    attention, get, placement, put, put_f32, Checker, Coverage, TOL_BF16, TOL_EXACT, TOL_F32,
};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, HeadNorms, TrainBackend};
use anyhow::Result;

pub(super) fn checks<D: TrainBackend>(c: &mut Checker<D>, coverage: Coverage) -> Result<()> {
    let cpu = CpuBackend;

    // embedding_forward: out [M, dim] = table [V, dim] rows.
    for (m, v, dim) in [
        (1, 1001, 896),
        (5, 1001, 7),
        (64, 1001, 33),
        (64, 151936, 64),
    ] {
        c.check(
            "embedding_forward",
            format!("M={m} V={v} dim={dim}"),
            TOL_EXACT,
            |dev, r| {
                let (table, table_h) = put(dev, &r.normal(v * dim, 1.0))?;
                let ids = r.ids(m, v);
                let mut out = dev.zeros(m * dim)?;
                dev.embedding_forward(dev.full_mut(&mut out), dev.full(&table), &ids, dim);
                let mut reference = vec![0.0; m * dim];
                cpu.embedding_forward(&mut reference, &table_h, &ids, dim);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // embedding_forward_sampled: out [M, dim] = table rows of the f32 ids sampled [R] picked by
    // rows [M] (a subset, out of order, one twice).
    for (r_count, v, dim) in [(5, 1001, 7), (64, 151936, 64)] {
        c.check(
            "embedding_forward_sampled",
            format!("R={r_count} V={v} dim={dim}"),
            TOL_EXACT,
            |dev, r| {
                let (table, table_h) = put(dev, &r.normal(v * dim, 1.0))?;
                let ids: Vec<f32> = r.ids(r_count, v).iter().map(|&i| i as f32).collect();
                let (sampled, sampled_h) = put_f32(dev, &ids)?;
                let mut rows: Vec<u32> = (0..r_count as u32).rev().step_by(2).collect();
                rows.push(rows[0]);
                let mut out = dev.zeros(rows.len() * dim)?;
                dev.embedding_forward_sampled(
                    dev.full_mut(&mut out),
                    dev.full(&table),
                    dev.full(&sampled),
                    &rows,
                    dim,
                );
                let mut reference = vec![0.0; rows.len() * dim];
                cpu.embedding_forward_sampled(&mut reference, &table_h, &sampled_h, &rows, dim);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // rmsnorm_forward: x, out [M, dim]; weight [dim].
    for (m, dim) in [(1, 896), (5, 7), (64, 33), (64, 1536)] {
        c.check(
            "rmsnorm_forward",
            format!("M={m} dim={dim}"),
            TOL_BF16,
            |dev, r| {
                let (x, x_h) = put(dev, &r.normal(m * dim, 1.0))?;
                let w_host: Vec<f32> = r.normal(dim, 0.1).iter().map(|d| 1.0 + d).collect();
                let (w, w_h) = put(dev, &w_host)?;
                let mut out = dev.zeros(m * dim)?;
                dev.rmsnorm_forward(
                    dev.full_mut(&mut out),
                    dev.full(&x),
                    dev.full(&w),
                    dim,
                    1e-6,
                );
                let mut reference = vec![0.0; m * dim];
                cpu.rmsnorm_forward(&mut reference, &x_h, &w_h, dim, 1e-6);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // add_rmsnorm_forward: x += residual (the residual stream, compared too), out = rmsnorm(x).
    for (m, dim) in [(1, 896), (5, 7), (64, 1536)] {
        c.check(
            "add_rmsnorm_forward",
            format!("M={m} dim={dim}"),
            TOL_BF16,
            |dev, r| {
                let (mut x, mut x_ref) = put(dev, &r.normal(m * dim, 1.0))?;
                let (residual, residual_h) = put(dev, &r.normal(m * dim, 1.0))?;
                let w_host: Vec<f32> = r.normal(dim, 0.1).iter().map(|d| 1.0 + d).collect();
                let (w, w_h) = put(dev, &w_host)?;
                let mut out = dev.zeros(m * dim)?;
                dev.add_rmsnorm_forward(
                    dev.full_mut(&mut x),
                    dev.full(&residual),
                    dev.full_mut(&mut out),
                    dev.full(&w),
                    dim,
                    1e-6,
                );
                let mut reference = vec![0.0; m * dim];
                cpu.add_rmsnorm_forward(&mut x_ref, &residual_h, &mut reference, &w_h, dim, 1e-6);
                Ok(vec![
                    ("x", get(dev, &x)?, x_ref),
                    ("out", get(dev, &out)?, reference),
                ])
            },
        )?;
    }

    // matmul_forward: out [m, n] = x [m, k] · w [n, k]ᵀ + bias [n]. m = 1 is a decode step; the
    // f32 outputs are logits (zeros_f32), with the vocabulary sizes of real models.
    for (m, k, n, bias, out_f32) in [
        (1, 896, 4864, false, false),
        (1, 896, 128, true, false),
        (5, 33, 7, true, false),
        (64, 896, 896, true, false),
        (64, 4864, 896, false, false),
        (7, 65, 1001, false, true),
        (5, 96, 1001, true, true),
        (1, 896, 32003, false, true),
    ] {
        let out_kind = if out_f32 { "zeros_f32" } else { "zeros" };
        let shape = format!("m={m} k={k} n={n} bias={bias} out={out_kind}");
        let tol = if out_f32 { TOL_F32 } else { TOL_BF16 };
        c.check("matmul_forward", shape, tol, |dev, r| {
            let (x, x_h) = put(dev, &r.normal(m * k, 1.0))?;
            let (w, w_h) = put(dev, &r.normal(n * k, 1.0 / (k as f32).sqrt()))?;
            let (b, b_h) = put(dev, &r.normal(n, 0.5))?;
            let mut out = if out_f32 {
                dev.zeros_f32(m * n)?
            } else {
                dev.zeros(m * n)?
            };
            let bias_view = bias.then(|| dev.full(&b));
            dev.matmul_forward(
                dev.full_mut(&mut out),
                dev.full(&x),
                dev.full(&w),
                bias_view,
                m,
                k,
                n,
            );
            let mut reference = vec![0.0; m * n];
            let bias_h = bias.then_some(b_h.as_slice());
            cpu.matmul_forward(&mut reference, &x_h, &w_h, bias_h, m, k, n);
            Ok(vec![("", get(dev, &out)?, reference)])
        })?;
    }

    // qkv_rope_forward: the projections' product qkv [M, (heads + 2 kv_heads) * head_dim] into
    // q [M, heads * head_dim] and k, v [M, kv_heads * head_dim]: q and k rotated after their
    // biases, v biased (when the biases are given); positions up to 4000. The outputs start
    // random: every value must be written.
    for (m, heads, kv_heads, hd, theta, biased) in [
        (1, 14, 2, 64, 1e6, true),
        (5, 2, 2, 128, 1e4, false),
        (64, 3, 1, 6, 1e4, true),
        (33, 12, 2, 128, 1e6, true),
    ] {
        let shape =
            format!("M={m} heads={heads}/{kv_heads} head_dim={hd} theta={theta:e} bias={biased}");
        c.check("qkv_rope_forward", shape, TOL_BF16, |dev, r| {
            let (mut q, mut q_ref) = put(dev, &r.normal(m * heads * hd, 1.0))?;
            let (mut k, mut k_ref) = put(dev, &r.normal(m * kv_heads * hd, 1.0))?;
            let (mut v, mut v_ref) = put(dev, &r.normal(m * kv_heads * hd, 1.0))?;
            let (qkv, qkv_h) = put(dev, &r.normal(m * (heads + 2 * kv_heads) * hd, 1.0))?;
            let (q_bias, q_bias_h) = put(dev, &r.normal(heads * hd, 0.5))?;
            let (k_bias, k_bias_h) = put(dev, &r.normal(kv_heads * hd, 0.5))?;
            let (v_bias, v_bias_h) = put(dev, &r.normal(kv_heads * hd, 0.5))?;
            let mut positions = r.ids(m, 4001);
            positions[0] = 4000;
            let (inv_freq, inv_freq_h) = put_f32(dev, &rope_inv_freq(hd, theta))?;
            dev.qkv_rope_forward(
                [
                    dev.full_mut(&mut q),
                    dev.full_mut(&mut k),
                    dev.full_mut(&mut v),
                ],
                dev.full(&qkv),
                [&q_bias, &k_bias, &v_bias].map(|b| biased.then(|| dev.full(b))),
                None,
                &positions,
                dev.full(&inv_freq),
                heads,
                kv_heads,
                hd,
            );
            cpu.qkv_rope_forward(
                [&mut q_ref, &mut k_ref, &mut v_ref],
                &qkv_h,
                [&q_bias_h, &k_bias_h, &v_bias_h].map(|b| biased.then_some(&b[..])),
                None,
                &positions,
                &inv_freq_h,
                heads,
                kv_heads,
                hd,
            );
            Ok(vec![
                ("q", get(dev, &q)?, q_ref),
                ("k", get(dev, &k)?, k_ref),
                ("v", get(dev, &v)?, v_ref),
            ])
        })?;
    }

    // qkv_rope_forward with head norms (Qwen3): q [M, heads * head_dim] and k
    // [M, kv_heads * head_dim] from the product's parts plus their biases (when given), each head
    // RMS-normalised, scaled by its norm's weight [head_dim] and rotated; v biased. When kept,
    // q_raw and k_raw receive the parts before their norms.
    for (m, heads, kv_heads, hd, biased, keep_raw) in
        [(1, 16, 8, 128, false, false), (37, 4, 2, 64, true, true)]
    {
        let shape = format!(
            "M={m} heads={heads}/{kv_heads} head_dim={hd} qk norms bias={biased} raw={keep_raw}"
        );
        c.check("qkv_rope_forward", shape, TOL_BF16, |dev, r| {
            let (mut q, mut q_ref) = put(dev, &r.normal(m * heads * hd, 1.0))?;
            let (mut k, mut k_ref) = put(dev, &r.normal(m * kv_heads * hd, 1.0))?;
            let (mut v, mut v_ref) = put(dev, &r.normal(m * kv_heads * hd, 1.0))?;
            let (mut q_raw, mut q_raw_ref) = put(dev, &r.normal(m * heads * hd, 1.0))?;
            let (mut k_raw, mut k_raw_ref) = put(dev, &r.normal(m * kv_heads * hd, 1.0))?;
            let (qkv, qkv_h) = put(dev, &r.normal(m * (heads + 2 * kv_heads) * hd, 2.0))?;
            let (q_norm, q_norm_h) = put(dev, &r.normal(hd, 1.0))?;
            let (k_norm, k_norm_h) = put(dev, &r.normal(hd, 1.0))?;
            let (q_bias, q_bias_h) = put(dev, &r.normal(heads * hd, 0.5))?;
            let (k_bias, k_bias_h) = put(dev, &r.normal(kv_heads * hd, 0.5))?;
            let (v_bias, v_bias_h) = put(dev, &r.normal(kv_heads * hd, 0.5))?;
            let positions = r.ids(m, 4001);
            let (inv_freq, inv_freq_h) = put_f32(dev, &rope_inv_freq(hd, 1e6))?;
            let eps = 1e-6;
            let norms = HeadNorms {
                weights: [dev.full(&q_norm), dev.full(&k_norm)],
                eps,
                raw: keep_raw.then(|| [dev.full_mut(&mut q_raw), dev.full_mut(&mut k_raw)]),
            };
            dev.qkv_rope_forward(
                [
                    dev.full_mut(&mut q),
                    dev.full_mut(&mut k),
                    dev.full_mut(&mut v),
                ],
                dev.full(&qkv),
                [&q_bias, &k_bias, &v_bias].map(|b| biased.then(|| dev.full(b))),
                Some(norms),
                &positions,
                dev.full(&inv_freq),
                heads,
                kv_heads,
                hd,
            );
            let norms = HeadNorms {
                weights: [&q_norm_h[..], &k_norm_h[..]],
                eps,
                raw: keep_raw.then_some([&mut q_raw_ref[..], &mut k_raw_ref[..]]),
            };
            cpu.qkv_rope_forward(
                [&mut q_ref, &mut k_ref, &mut v_ref],
                &qkv_h,
                [&q_bias_h, &k_bias_h, &v_bias_h].map(|b| biased.then_some(&b[..])),
                Some(norms),
                &positions,
                &inv_freq_h,
                heads,
                kv_heads,
                hd,
            );
            Ok(vec![
                ("q", get(dev, &q)?, q_ref),
                ("k", get(dev, &k)?, k_ref),
                ("v", get(dev, &v)?, v_ref),
                ("q_raw", get(dev, &q_raw)?, q_raw_ref),
                ("k_raw", get(dev, &k_raw)?, k_raw_ref),
            ])
        })?;
    }

    // kv_cache_write: k, v [M, kv_dim] into cache [slots, capacity, kv_dim]. The caches start
    // random, so positions that must stay untouched are compared too.
    let kv_cases: [(&str, usize, usize, Vec<usize>, Vec<usize>); 3] = [
        ("prefill", 128, 37, vec![0, 0, 0], vec![20, 0, 5]),
        ("decode", 256, 1000, vec![0, 17, 500, 999], vec![1, 1, 1, 1]),
        ("odd", 7, 9, vec![3, 0], vec![5, 9]),
    ];
    for (kind, kv_dim, capacity, starts, lens) in kv_cases {
        let slots = starts.len();
        let shape =
            format!("{kind} slots={slots} capacity={capacity} kv_dim={kv_dim} lens={lens:?}");
        c.check("kv_cache_write", shape, TOL_EXACT, |dev, r| {
            let place = placement(&starts, &lens);
            let m = place.slots.len();
            let cache_len = slots * capacity * kv_dim;
            let (mut ck, mut ck_ref) = put(dev, &r.normal(cache_len, 1.0))?;
            let (mut cv, mut cv_ref) = put(dev, &r.normal(cache_len, 1.0))?;
            let (k, k_h) = put(dev, &r.normal(m * kv_dim, 1.0))?;
            let (v, v_h) = put(dev, &r.normal(m * kv_dim, 1.0))?;
            dev.kv_cache_write(
                dev.full_mut(&mut ck),
                dev.full_mut(&mut cv),
                dev.full(&k),
                dev.full(&v),
                &place,
                capacity,
                kv_dim,
            );
            cpu.kv_cache_write(
                &mut ck_ref,
                &mut cv_ref,
                &k_h,
                &v_h,
                &place,
                capacity,
                kv_dim,
            );
            Ok(vec![
                ("k", get(dev, &ck)?, ck_ref),
                ("v", get(dev, &cv)?, cv_ref),
            ])
        })?;
    }

    attention::checks(c, coverage)?;

    // swiglu_forward: out [M, I] = silu(gate) · up from gate_up [M, 2 I] (each row gate's, then
    // up's).
    for (m, i) in [(1, 4864), (5, 7), (64, 33), (64, 8960)] {
        c.check(
            "swiglu_forward",
            format!("M={m} I={i}"),
            TOL_BF16,
            |dev, r| {
                let (gate_up, gate_up_h) = put(dev, &r.normal(m * 2 * i, 1.5))?;
                let mut out = dev.zeros(m * i)?;
                dev.swiglu_forward(dev.full_mut(&mut out), dev.full(&gate_up), i);
                let mut reference = vec![0.0; m * i];
                cpu.swiglu_forward(&mut reference, &gate_up_h, i);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // residual_add: x += y, [M, dim].
    for (m, dim) in [(1, 896), (5, 7), (64, 1536)] {
        c.check(
            "residual_add",
            format!("M={m} dim={dim}"),
            TOL_BF16,
            |dev, r| {
                let (mut x, mut reference) = put(dev, &r.normal(m * dim, 1.0))?;
                let (y, y_h) = put(dev, &r.normal(m * dim, 1.0))?;
                dev.residual_add(dev.full_mut(&mut x), dev.full(&y));
                cpu.residual_add(&mut reference, &y_h);
                Ok(vec![("", get(dev, &x)?, reference)])
            },
        )?;
    }

    // gather_rows: out [R, dim] = x [M, dim] rows (repeats allowed).
    for (m, rows_n, dim) in [(64, 5, 7), (64, 1, 33), (300, 8, 896)] {
        c.check(
            "gather_rows",
            format!("M={m} R={rows_n} dim={dim}"),
            TOL_EXACT,
            |dev, r| {
                let (x, x_h) = put(dev, &r.normal(m * dim, 1.0))?;
                let rows = r.below(rows_n, m);
                let mut out = dev.zeros(rows_n * dim)?;
                dev.gather_rows(dev.full_mut(&mut out), dev.full(&x), &rows, dim);
                let mut reference = vec![0.0; rows_n * dim];
                cpu.gather_rows(&mut reference, &x_h, &rows, dim);
                Ok(vec![("", get(dev, &out)?, reference)])
            },
        )?;
    }

    // fill_zero and copy, on whole buffers and on windows (what lies outside must survive), in
    // bf16 and f32 buffers.
    for (len, lo, hi, f32_buf) in [
        (4480, 0, 4480, false),
        (1000, 101, 778, false),
        (333, 7, 300, true),
    ] {
        let shape = format!("len={len} window={lo}..{hi} f32={f32_buf}");
        c.check("fill_zero", shape, TOL_EXACT, |dev, r| {
            let host = r.normal(len, 1.0);
            let (mut buf, mut reference) = if f32_buf {
                put_f32(dev, &host)?
            } else {
                put(dev, &host)?
            };
            dev.fill_zero(dev.view_mut(&mut buf, lo..hi));
            cpu.fill_zero(&mut reference[lo..hi]);
            Ok(vec![("", get(dev, &buf)?, reference)])
        })?;
    }
    for (len, lo, hi, src_lo, f32_buf) in [
        (4480, 0, 4480, 0, false),
        (1000, 7, 40, 100, false),
        (333, 1, 300, 20, true),
    ] {
        let shape = format!("len={len} dst={lo}..{hi} src={src_lo}.. f32={f32_buf}");
        c.check("copy", shape, TOL_EXACT, |dev, r| {
            let put_any = |host: &[f32]| {
                if f32_buf {
                    put_f32(dev, host)
                } else {
                    put(dev, host)
                }
            };
            let (mut dst, mut reference) = put_any(&r.normal(len, 1.0))?;
            let (src, src_h) = put_any(&r.normal(len, 1.0))?;
            let src_hi = src_lo + hi - lo;
            dev.copy(
                dev.view_mut(&mut dst, lo..hi),
                dev.view(&src, src_lo..src_hi),
            );
            cpu.copy(&mut reference[lo..hi], &src_h[src_lo..src_hi]);
            Ok(vec![("", get(dev, &dst)?, reference)])
        })?;
    }

    // logprob_forward: logits [R, V] (f32 as the LM head writes them, or bf16), logp and
    // entropy [R] in f32.
    for (rows, vocab, temperature, logits_f32) in [
        (1, 1001, 1.0, true),
        (5, 1001, 0.7, false),
        (64, 32003, 1.0, true),
        (7, 32003, 0.7, false),
        (3, 151936, 1.0, true),
    ] {
        let kind = if logits_f32 { "zeros_f32" } else { "zeros" };
        let shape = format!("R={rows} V={vocab} T={temperature} logits={kind}");
        c.check("logprob_forward", shape, TOL_F32, |dev, r| {
            let host = r.normal(rows * vocab, 3.0);
            let (logits, logits_h) = if logits_f32 {
                put_f32(dev, &host)?
            } else {
                put(dev, &host)?
            };
            let targets = r.ids(rows, vocab);
            let mut logp = dev.zeros_f32(rows)?;
            let mut entropy = dev.zeros_f32(rows)?;
            dev.logprob_forward(
                dev.full_mut(&mut logp),
                dev.full_mut(&mut entropy),
                dev.full(&logits),
                &targets,
                vocab,
                temperature,
            );
            let (mut logp_ref, mut entropy_ref) = (vec![0.0; rows], vec![0.0; rows]);
            cpu.logprob_forward(
                &mut logp_ref,
                &mut entropy_ref,
                &logits_h,
                &targets,
                vocab,
                temperature,
            );
            Ok(vec![
                ("logp", get(dev, &logp)?, logp_ref),
                ("entropy", get(dev, &entropy)?, entropy_ref),
            ])
        })?;
    }
    Ok(())
}

/// RoPE's inverse frequencies theta^(-2i / head_dim), i < head_dim / 2.
pub(super) fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect()
}
