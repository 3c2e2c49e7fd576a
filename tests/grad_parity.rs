//! The whole model's parameter gradients for a fixed GRPO loss against PyTorch autograd
//! (fixtures from tools/make_grad_fixture.py): relative error per tensor ≤ 1e-4.

use serde_json::Value;
use std::path::{Path, PathBuf};
use thinkshort::backend::cpu::CpuBackend;
use thinkshort::model::Model;
use thinkshort::model_backward::TrainBatch;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// d(loss)/d(logp) of the fixture's loss (METHOD.md §5, seq-mean-token-mean), in f64.
fn dloss_dlogp(case: &Value, logp: &[f32], lens: &[usize]) -> (f64, Vec<f32>) {
    let (old, refp, adv) = (
        f64s(&case["old_logp"]),
        f64s(&case["ref_logp"]),
        f64s(&case["advantages"]),
    );
    let (lo, hi, beta) = (
        case["eps_low"].as_f64().unwrap(),
        case["eps_high"].as_f64().unwrap(),
        case["beta"].as_f64().unwrap(),
    );
    let mut grad = vec![0.0f32; logp.len()];
    let mut loss = 0.0;
    let mut t = 0;
    for (s, &len) in lens.iter().enumerate() {
        let w = 1.0 / (len as f64 * lens.len() as f64);
        for _ in 0..len {
            let lp = logp[t] as f64;
            let rho = (lp - old[t]).exp();
            let a = adv[s];
            let clipped = rho.clamp(1.0 - lo, 1.0 + hi);
            let surrogate = (rho * a).min(clipped * a);
            let kl = (refp[t] - lp).exp() - (refp[t] - lp) - 1.0;
            loss += w * (-surrogate + beta * kl);
            // The unclipped branch carries the gradient only when it is the minimum.
            let d_sur = if rho * a <= clipped * a { a * rho } else { 0.0 };
            grad[t] = (w * (-d_sur + beta * (1.0 - (refp[t] - lp).exp()))) as f32;
            t += 1;
        }
    }
    (loss, grad)
}

#[test]
fn grpo_loss_gradients_match_pytorch_autograd() {
    for name in ["qwen2_tied", "llama_untied_bf16", "qwen3_qknorm"] {
        let model = Model::load(&dir(name), CpuBackend).unwrap();
        let case: Value = serde_json::from_str(
            &std::fs::read_to_string(dir(name).join("grad_case.json")).unwrap(),
        )
        .unwrap();
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = case["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (u32s(&s["prompt_ids"]), u32s(&s["completion_ids"])))
            .collect();
        let refs: Vec<(&[u32], &[u32])> = seqs
            .iter()
            .map(|(p, c)| (p.as_slice(), c.as_slice()))
            .collect();
        let batch = TrainBatch::new(&refs).unwrap();
        let tau = case["temperature"].as_f64().unwrap() as f32;

        let out = model.forward_train(&batch, tau).unwrap();
        for (g, w) in out.logp.iter().zip(f64s(&case["logp"])) {
            assert!((*g as f64 - w).abs() < 1e-4, "{name}: logp {g} vs {w}");
        }
        let lens: Vec<usize> = seqs.iter().map(|(_, c)| c.len()).collect();
        let (loss, dlogp) = dloss_dlogp(&case, &out.logp, &lens);
        let want_loss = case["loss"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
            "{name}: loss {loss} vs {want_loss}"
        );

        let mut grads = vec![0.0f32; model.layout.total_len()];
        model
            .backward(&batch, &out.acts, &dlogp, &mut grads)
            .unwrap();

        let bytes = std::fs::read(dir(name).join("grads.safetensors")).unwrap();
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(
            reference.names().len(),
            model.layout.specs.len(),
            "{name}: tensor count"
        );
        for spec in &model.layout.specs {
            let t = reference.tensor(&spec.name).unwrap();
            let want: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let got = &grads[spec.range()];
            let diff: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                norm > 0.0,
                "{name}: {} has a zero reference gradient",
                spec.name
            );
            assert!(
                diff / norm <= 1e-4,
                "{name}: {} relative error {:.2e}",
                spec.name,
                diff / norm
            );
        }
    }
}
