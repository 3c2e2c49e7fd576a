//! selfcheck rows for the backward ops of `TrainBackend` (attention's are in `attention.rs`),
//! and the whole tiny model's parameter gradients.
//!
//! Gradients that accumulate (+=) start from random values, so an op that overwrites instead
//! fails. Parameter gradients are f32 buffers (`put_f32`) as in training; activation gradients
//! are stored like activations (bf16 on a bf16 device).

use super::layer_ops::rope_inv_freq;
use super::{
    get, put, put_f32, rel_error, tiny_model_weights, Checker, TINY_MODEL, TOL_BF16, TOL_EXACT,
    TOL_F32,
};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, GradWrite, TokenPlacement, TrainBackend};
use crate::config::ModelConfig;
use crate::model::Model;
use crate::model_backward::TrainBatch;
use anyhow::Result;

/// Relative error of the whole model's parameter gradient (every tensor in one buffer). Both
/// models hold the same bf16 weights; the device also rounds every activation and activation
/// gradient to bf16: simulating that on the CPU (tests/selfcheck.rs, with the attention
/// backward's internal roundings too) gives 8.4e-3 (own head) and 8.7e-3 (tied) on this model.
/// A 5 % error in one forward op (swiglu) gives 3.7e-2, and the mistakes this check is for (a wrong transpose, a missing
/// accumulation, a swapped gradient) give errors of order 1.
pub const TOL_MODEL_GRADIENT: f64 = 2.5e-2;

pub(super) fn checks<D: TrainBackend>(c: &mut Checker<D>) -> Result<()> {
    let cpu = CpuBackend;

    // logprob_backward: dlogits [R, V] (bf16) from dlogp [R] (f32) and logits [R, V].
    for (r, v, f32_logits) in [(3, 151_936, true), (3, 151_936, false), (5, 7, true)] {
        let shape = format!(
            "R={r} V={v} T=0.7 logits={}",
            if f32_logits { "f32" } else { "bf16" }
        );
        c.check("logprob_backward", shape, TOL_BF16, |dev, rand| {
            let host = rand.normal(r * v, 3.0);
            let (logits, logits_h) = if f32_logits {
                put_f32(dev, &host)?
            } else {
                put(dev, &host)?
            };
            let (dlogp, dlogp_h) = put_f32(dev, &rand.normal(r, 1.0))?;
            let targets = rand.ids(r, v);
            let (mut dlogits, _) = put(dev, &rand.normal(r * v, 1.0))?; // overwritten
            dev.logprob_backward(
                dev.full_mut(&mut dlogits),
                dev.full(&dlogp),
                dev.full(&logits),
                &targets,
                v,
                0.7,
            );
            let mut reference = vec![0.0; r * v];
            cpu.logprob_backward(&mut reference, &dlogp_h, &logits_h, &targets, v, 0.7);
            Ok(vec![("", get(dev, &dlogits)?, reference)])
        })?;
    }

    // matmul_backward: dx [M, K] += dout [M, N] · w [N, K]; dw [N, K] += doutᵀ · x. With dx, a
    // bf16 dw (both outputs bf16); without dx, an f32 dw (the parameter-gradient case: f32 from
    // the same inputs).
    // dx starts random: overwriting must not read it, adding must.
    for (m, k, n) in [(1, 896, 4864), (5, 7, 3), (64, 33, 17), (128, 896, 896)] {
        for write in [GradWrite::Add, GradWrite::Overwrite] {
            c.check(
                "matmul_backward",
                format!("M={m} K={k} N={n} dx {write:?}"),
                TOL_BF16,
                |dev, rand| {
                    let (dout, dout_h) = put(dev, &rand.normal(m * n, 1.0))?;
                    let (x, x_h) = put(dev, &rand.normal(m * k, 1.0))?;
                    let (w, w_h) = put(dev, &rand.normal(n * k, 0.05))?;
                    let (mut dx, mut dx_ref) = put(dev, &rand.normal(m * k, 0.1))?;
                    let (mut dw, mut dw_ref) = put(dev, &rand.normal(n * k, 1.0))?;
                    dev.matmul_backward(
                        Some(dev.full_mut(&mut dx)),
                        write,
                        dev.full_mut(&mut dw),
                        dev.full(&dout),
                        dev.full(&x),
                        dev.full(&w),
                        m,
                        k,
                        n,
                    );
                    cpu.matmul_backward(
                        Some(&mut dx_ref),
                        write,
                        &mut dw_ref,
                        &dout_h,
                        &x_h,
                        &w_h,
                        m,
                        k,
                        n,
                    );
                    Ok(vec![
                        ("dx", get(dev, &dx)?, dx_ref),
                        ("dw", get(dev, &dw)?, dw_ref),
                    ])
                },
            )?;
        }
        let shape = format!("M={m} K={k} N={n} dw=f32, no dx");
        c.check("matmul_backward", shape, TOL_F32, |dev, rand| {
            let (dout, dout_h) = put(dev, &rand.normal(m * n, 1.0))?;
            let (x, x_h) = put(dev, &rand.normal(m * k, 1.0))?;
            let (w, w_h) = put(dev, &rand.normal(n * k, 0.05))?;
            let (mut dw, mut dw_ref) = put_f32(dev, &rand.normal(n * k, 1.0))?;
            let (dw_view, dout_view) = (dev.full_mut(&mut dw), dev.full(&dout));
            dev.matmul_backward(
                None,
                GradWrite::Add,
                dw_view,
                dout_view,
                dev.full(&x),
                dev.full(&w),
                m,
                k,
                n,
            );
            cpu.matmul_backward(
                None,
                GradWrite::Add,
                &mut dw_ref,
                &dout_h,
                &x_h,
                &w_h,
                m,
                k,
                n,
            );
            Ok(vec![("dw", get(dev, &dw)?, dw_ref)])
        })?;
    }

    // bias_backward: dbias [N] += column sums of dout [M, N] (f32 result from bf16 inputs).
    // 20000 rows: 79 partial sums per column, more than the 32 lanes that add them up.
    for (m, n) in [(1, 896), (300, 7), (600, 128), (20_000, 40)] {
        c.check(
            "bias_backward",
            format!("M={m} N={n}"),
            TOL_F32,
            |dev, rand| {
                let (dout, dout_h) = put(dev, &rand.normal(m * n, 1.0))?;
                let (mut dbias, mut reference) = put_f32(dev, &rand.normal(n, 1.0))?;
                dev.bias_backward(dev.full_mut(&mut dbias), dev.full(&dout));
                cpu.bias_backward(&mut reference, &dout_h);
                Ok(vec![("", get(dev, &dbias)?, reference)])
            },
        )?;
    }

    // rmsnorm_backward: dx [M, dim] overwritten (bf16), dweight [dim] accumulated (f32). Dims
    // that are multiples of 8 take the vector kernel, 7 and 100 the scalar one; 4999 and 4099
    // rows make blocks of 3 rows, the last one partial, each summing its rows' dweight.
    for (rows, dim) in [(1, 896), (5, 7), (64, 1536), (4999, 896), (4099, 100)] {
        for write in [GradWrite::Overwrite, GradWrite::Add] {
            c.check(
                "rmsnorm_backward",
                format!("rows={rows} dim={dim} dx {write:?}"),
                TOL_BF16,
                |dev, rand| {
                    let (dout, dout_h) = put(dev, &rand.normal(rows * dim, 1.0))?;
                    let (x, x_h) = put(dev, &rand.normal(rows * dim, 1.0))?;
                    let (w, w_h) = put(dev, &rand.normal(dim, 1.0))?;
                    let (mut dx, mut dx_ref) = put(dev, &rand.normal(rows * dim, 1.0))?;
                    let (mut dweight, mut dweight_ref) = put_f32(dev, &rand.normal(dim, 1.0))?;
                    dev.rmsnorm_backward(
                        dev.full_mut(&mut dx),
                        write,
                        dev.full_mut(&mut dweight),
                        dev.full(&dout),
                        dev.full(&x),
                        dev.full(&w),
                        dim,
                        1e-6,
                    );
                    cpu.rmsnorm_backward(
                        &mut dx_ref,
                        write,
                        &mut dweight_ref,
                        &dout_h,
                        &x_h,
                        &w_h,
                        dim,
                        1e-6,
                    );
                    Ok(vec![
                        ("dx", get(dev, &dx)?, dx_ref),
                        ("dweight", get(dev, &dweight)?, dweight_ref),
                    ])
                },
            )?;
        }
    }

    // rope_backward: the gradient rotated back in place, [M, heads * head_dim].
    for (heads, head_dim, positions) in [
        (14, 64, vec![0u32, 1, 7, 255, 4095]),
        (3, 6, vec![5, 100_000]),
    ] {
        let shape = format!("heads={heads} head_dim={head_dim} positions={positions:?}");
        c.check("rope_backward", shape, TOL_BF16, |dev, rand| {
            let m = positions.len();
            let (freq, freq_h) = put_f32(dev, &rope_inv_freq(head_dim, 1e6))?;
            let (mut dx, mut reference) = put(dev, &rand.normal(m * heads * head_dim, 1.0))?;
            dev.rope_backward(
                dev.full_mut(&mut dx),
                &positions,
                dev.full(&freq),
                heads,
                head_dim,
            );
            cpu.rope_backward(&mut reference, &positions, &freq_h, heads, head_dim);
            Ok(vec![("", get(dev, &dx)?, reference)])
        })?;
    }

    // qkv_rope_backward: dq and dk rotated back and dv, side by side in the projections'
    // product's gradient [M, (heads + 2 kv_heads) * head_dim], which starts random.
    for (heads, kv_heads, head_dim, positions) in [
        (14, 2, 64, vec![0u32, 1, 7, 255, 4095]),
        (3, 1, 6, vec![5, 100_000]),
    ] {
        let shape = format!("heads={heads}/{kv_heads} head_dim={head_dim} positions={positions:?}");
        c.check("qkv_rope_backward", shape, TOL_BF16, |dev, rand| {
            let m = positions.len();
            let (freq, freq_h) = put_f32(dev, &rope_inv_freq(head_dim, 1e6))?;
            let (dq, dq_h) = put(dev, &rand.normal(m * heads * head_dim, 1.0))?;
            let (dk, dk_h) = put(dev, &rand.normal(m * kv_heads * head_dim, 1.0))?;
            let (dv, dv_h) = put(dev, &rand.normal(m * kv_heads * head_dim, 1.0))?;
            let rows = m * (heads + 2 * kv_heads) * head_dim;
            let (mut dqkv, mut reference) = put(dev, &rand.normal(rows, 1.0))?;
            dev.qkv_rope_backward(
                dev.full_mut(&mut dqkv),
                [dev.full(&dq), dev.full(&dk), dev.full(&dv)],
                &positions,
                dev.full(&freq),
                heads,
                kv_heads,
                head_dim,
            );
            cpu.qkv_rope_backward(
                &mut reference,
                [&dq_h, &dk_h, &dv_h],
                &positions,
                &freq_h,
                heads,
                kv_heads,
                head_dim,
            );
            Ok(vec![("", get(dev, &dqkv)?, reference)])
        })?;
    }

    // kv_cache_gather: dx [M, kv_dim] = dcache [slot, position] (copies: exact).
    c.check(
        "kv_cache_gather",
        "slots=3 capacity=50 kv_dim=128".into(),
        TOL_EXACT,
        |dev, rand| {
            let (capacity, kv_dim) = (50, 128);
            let place = TokenPlacement {
                slots: vec![2, 0, 2, 1],
                positions: vec![49, 0, 3, 17],
            };
            let (dcache, dcache_h) = put(dev, &rand.normal(3 * capacity * kv_dim, 1.0))?;
            let (mut dx, _) = put(dev, &rand.normal(4 * kv_dim, 1.0))?;
            dev.kv_cache_gather(
                dev.full_mut(&mut dx),
                dev.full(&dcache),
                &place,
                capacity,
                kv_dim,
            );
            let mut reference = vec![0.0; 4 * kv_dim];
            cpu.kv_cache_gather(&mut reference, &dcache_h, &place, capacity, kv_dim);
            Ok(vec![("", get(dev, &dx)?, reference)])
        },
    )?;

    // swiglu_backward: d_gate_up [M, 2 I] (each row gate's, then up's) overwritten.
    for (m, i) in [(1, 4864), (5, 7), (64, 8960)] {
        c.check(
            "swiglu_backward",
            format!("M={m} I={i}"),
            TOL_BF16,
            |dev, rand| {
                let (dout, dout_h) = put(dev, &rand.normal(m * i, 1.0))?;
                let (gate_up, gate_up_h) = put(dev, &rand.normal(m * 2 * i, 1.5))?;
                let (mut d_gate_up, _) = put(dev, &rand.normal(m * 2 * i, 1.0))?;
                dev.swiglu_backward(
                    dev.full_mut(&mut d_gate_up),
                    dev.full(&dout),
                    dev.full(&gate_up),
                    i,
                );
                let mut reference = vec![0.0; m * 2 * i];
                cpu.swiglu_backward(&mut reference, &dout_h, &gate_up_h, i);
                Ok(vec![("d_gate_up", get(dev, &d_gate_up)?, reference)])
            },
        )?;
    }

    // embedding_backward: dtable [V, dim] (f32) += dout rows, ids repeating.
    c.check(
        "embedding_backward",
        "V=1000 dim=896 ids=6 (3 repeats)".into(),
        TOL_F32,
        |dev, rand| {
            let (vocab, dim) = (1000, 896);
            let ids = [4u32, 999, 4, 0, 4, 17];
            let (dout, dout_h) = put(dev, &rand.normal(ids.len() * dim, 1.0))?;
            let (mut dtable, mut reference) = put_f32(dev, &rand.normal(vocab * dim, 1.0))?;
            dev.embedding_backward(dev.full_mut(&mut dtable), dev.full(&dout), &ids, dim);
            cpu.embedding_backward(&mut reference, &dout_h, &ids, dim);
            Ok(vec![("", get(dev, &dtable)?, reference)])
        },
    )?;

    // scatter_add_rows: dx [M, dim] += dout [R, dim] at rows (one repeated).
    c.check(
        "scatter_add_rows",
        "M=40 dim=896 rows=4".into(),
        TOL_BF16,
        |dev, rand| {
            let (m, dim) = (40, 896);
            let rows = [39usize, 0, 7, 7];
            let (dout, dout_h) = put(dev, &rand.normal(rows.len() * dim, 1.0))?;
            let (mut dx, mut reference) = put(dev, &rand.normal(m * dim, 1.0))?;
            dev.scatter_add_rows(dev.full_mut(&mut dx), dev.full(&dout), &rows, dim);
            cpu.scatter_add_rows(&mut reference, &dout_h, &rows, dim);
            Ok(vec![("", get(dev, &dx)?, reference)])
        },
    )?;
    Ok(())
}

/// The tiny selfcheck model with 4 query heads of dimension 32 (as the demo model: the fused
/// attention backward has head dims 32, 64 and 128 only), its LM head tied or not.
pub(super) fn tiny_train_config(tied: bool) -> Result<ModelConfig> {
    let json = TINY_MODEL
        .replace(
            "\"tie_word_embeddings\": false",
            &format!("\"tie_word_embeddings\": {tied}"),
        )
        .replace("\"num_attention_heads\": 8", "\"num_attention_heads\": 4");
    let cfg = ModelConfig::from_json_str(&json)?;
    anyhow::ensure!(
        cfg.tie_word_embeddings == tied && cfg.num_heads == 4,
        "TINY_MODEL must say tie_word_embeddings and num_attention_heads 8"
    );
    Ok(cfg)
}

/// The tiny selfcheck model as Qwen3: RMSNorm on each head of q and k, no biases, 4 heads of 64
/// (q twice as wide as the hidden size), its own LM head (the tied embedding's logits, of std
/// ~11, would turn bf16 rounding into log-prob errors past the model tolerance).
pub(super) fn tiny_qk_norm_config() -> Result<ModelConfig> {
    let json = TINY_MODEL.replace("\"qwen2\"", "\"qwen3\"").replace(
        "\"num_attention_heads\": 8",
        "\"num_attention_heads\": 4, \"head_dim\": 64",
    );
    let cfg = ModelConfig::from_json_str(&json)?;
    anyhow::ensure!(
        cfg.qk_norm && cfg.head_dim == 64 && !cfg.qkv_bias,
        "TINY_MODEL must say qwen2 and num_attention_heads 8"
    );
    Ok(cfg)
}

/// The tiny model's parameter gradient for random d(loss)/d(log p) over a batch of
/// prompt + completion pairs, with a separate LM head and with the head tied to the embedding
/// (whose gradient then sums both uses): one row each, relative error over the whole buffer, one
/// row each that the gradient repeats exactly when computed again (no atomics anywhere) and one
/// that activation checkpointing gives it exactly too; with
/// the device's attention backward `variant` (None: its only one).
pub(super) fn model_gradient_check<D: TrainBackend>(
    c: &mut Checker<D>,
    variant: Option<&str>,
) -> Result<()> {
    for cfg in [
        tiny_train_config(false)?,
        tiny_train_config(true)?,
        tiny_qk_norm_config()?,
    ] {
        let tied = cfg.tie_word_embeddings;
        let host = tiny_model_weights(&cfg, c.seed);
        let cpu_model = Model::from_host(cfg.clone(), &host, CpuBackend)?;
        let mut rand = c.rand(&format!(
            "model gradient tied={tied}{}",
            if cfg.qk_norm { " qk-norm" } else { "" }
        ));
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = [(1, 15), (17, 40), (100, 60)]
            .iter()
            .map(|&(p, q)| (rand.ids(p, cfg.vocab_size), rand.ids(q, cfg.vocab_size)))
            .collect();
        let pairs: Vec<(&[u32], &[u32])> = seqs.iter().map(|(p, q)| (&p[..], &q[..])).collect();
        let batch = TrainBatch::new(&pairs)?;
        let dlogp = rand.normal(batch.rows.len(), 1.0);

        let mut reference = vec![0.0f32; cpu_model.layout.total_len()];
        let out = cpu_model.forward_train(&batch, 1.0)?;
        cpu_model.backward(&batch, &out.acts, &dlogp, &mut reference)?;

        let shape =
            format!(
            "{} layers h={} heads={}/{} V={} {}{}; 3 pairs, {} scored tokens; all {} parameters{}",
            cfg.num_layers,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.vocab_size,
            if tied { "tied head" } else { "own head" },
            if cfg.qk_norm {
                format!(", qwen3 q/k norms, head dim {}", cfg.head_dim)
            } else {
                String::new()
            },
            batch.rows.len(),
            reference.len(),
            variant.map(|v| format!("; {v} attention backward")).unwrap_or_default()
        );
        let result = (|| -> Result<[f64; 3]> {
            let mut dev_model = Model::from_host(cfg.clone(), &host, (c.make_device)()?)?;
            if let Some(v) = variant {
                dev_model.backend.set_attention_backward_variant(v)?;
            }
            // Twice: the second must repeat the first bit for bit (fixed-order reductions);
            // then with activation checkpointing, which recomputes the same values.
            let mut runs = Vec::new();
            for checkpoint in [false, false, true] {
                dev_model.checkpoint_layers = checkpoint;
                let b = &dev_model.backend;
                let mut grads = b.zeros_f32(reference.len())?;
                let out = dev_model.forward_train(&batch, 1.0)?;
                dev_model.backward(&batch, &out.acts, &dlogp, &mut grads)?;
                b.synchronize()?;
                runs.push(b.download(b.full(&grads))?);
            }
            Ok([
                rel_error(&runs[0], &reference),
                rel_error(&runs[1], &runs[0]),
                rel_error(&runs[2], &runs[0]),
            ])
        })();
        let rows = match result {
            Ok(errors) => errors.map(|e| (e, None)),
            Err(e) => [(); 3].map(|_| (f64::NAN, Some(format!("{e:#}")))),
        };
        for ((error, message), (op, tolerance)) in rows.into_iter().zip([
            ("model gradient", TOL_MODEL_GRADIENT),
            ("model gradient repeat", TOL_EXACT),
            ("model gradient checkpointed", TOL_EXACT),
        ]) {
            c.push(
                op.to_string(),
                shape.clone(),
                "rel",
                error,
                tolerance,
                message,
            );
        }
    }
    Ok(())
}
