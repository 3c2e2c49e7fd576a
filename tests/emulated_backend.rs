//! The whole CUDA backend on the CPU: `selfcheck` (every op, the tiny models' log-probs and
//! gradients, recorded decode steps, one GRPO update) and a short training run with a resume run
//! `CudaBackend` over the emulated device of tests/emulation_support, so the backend's own code
//! (shape checks, views, kernel choice, scratch and index caches, decode-step recordings) and the
//! trainer's device paths are checked without a GPU, not only the kernels and their launchers.

mod emulation_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use emulation_support::emulated_device::EmulatedDevice;
use thinkshort::cuda::CudaBackend;
use thinkshort::prompt::PromptTemplate;
use thinkshort::selfcheck::{self, CheckRow, Coverage};
use thinkshort::train::{train_on, Example, RunControl, TrainInputs};

/// SMs of the emulated device: few, so that decode attention splits its keys.
const MULTIPROCESSORS: usize = 4;

fn emulated_backend() -> anyhow::Result<CudaBackend> {
    let device = Arc::new(EmulatedDevice::new(MULTIPROCESSORS));
    CudaBackend::with_device(device, "CPU emulator".to_string())
}

#[test]
fn selfcheck_passes_on_the_cuda_backend_over_the_emulator() {
    let started = std::time::Instant::now();
    let mut failed: Vec<CheckRow> = Vec::new();
    let report = selfcheck::run(&emulated_backend, 0, Coverage::Quick, &mut |row| {
        if !row.pass {
            failed.push(row.clone());
        }
    })
    .unwrap_or_else(|e| panic!("selfcheck stopped: {e:#}"));
    let lines: Vec<String> = failed
        .iter()
        .map(|r| {
            format!(
                "{} {}: error {:.3e}, tolerance {:.1e}{}",
                r.op,
                r.shape,
                r.error,
                r.tolerance,
                r.message
                    .as_ref()
                    .map_or(String::new(), |m| format!(" ({m})"))
            )
        })
        .collect();
    eprintln!(
        "{} rows in {:.1} s; info: {:?}",
        report.rows.len(),
        started.elapsed().as_secs_f64(),
        report.info
    );
    assert!(
        lines.is_empty(),
        "{} of {} rows failed:\n{}",
        lines.len(),
        report.rows.len(),
        lines.join("\n")
    );
}

/// Problems of the demo task, as `thinkshort train` makes them.
fn demo_examples(seed: u64, count: u64) -> Vec<Example> {
    thinkshort::demo::task::problems(seed, count)
        .into_iter()
        .map(|p| Example {
            gold: p.gold(),
            question: p.question,
        })
        .collect()
}

/// Every metric except the timings.
fn without_timings(line: &str) -> serde_json::Value {
    let mut m: serde_json::Value = serde_json::from_str(line).unwrap();
    for k in ["tokens_per_s", "step_s", "rollout_s", "update_s"] {
        m.as_object_mut().unwrap().remove(k);
    }
    m
}

/// `train --backend cuda`'s whole loop on the emulated device: rollouts with recorded decode
/// steps, reference log-probs, micro-batched updates with activation checkpointing and the
/// optimizer in host memory, held-out evaluations and checkpoints. Two steps straight equal one
/// step, a checkpoint and one resumed step, bit for bit (weights and every metric but timings):
/// the checkpoint carries the device's weights and moments whole.
#[test]
fn a_short_demo_run_trains_and_resumes_on_the_cuda_backend_over_the_emulator() {
    let mut cfg = thinkshort::commands::train::demo_config();
    let settings = [
        ("steps", "2"),
        ("prompts_per_step", "2"),
        ("group_size", "4"),
        ("micro_batch", "3"),
        ("eval_every", "2"),
        ("eval_size", "4"),
        ("eval_max_tokens", "48"),
        ("activation_checkpointing", "true"),
        ("optim.offload", "true"),
    ];
    cfg.set_all(&settings).unwrap();
    let inputs = TrainInputs {
        model_dir: PathBuf::from(thinkshort::commands::train::DEMO_MODEL),
        template: PromptTemplate::plain(thinkshort::demo::task::PROMPT_TEMPLATE).unwrap(),
        train: demo_examples(2, 100),
        eval: demo_examples(3, 4),
        is_correct: thinkshort::train::answer_is_correct,
    };
    let dirs = tempfile::tempdir().unwrap();
    let run = |out: &Path, resume: Option<&Path>, stop_after: Option<usize>| {
        let control = RunControl {
            out,
            resume,
            stop_after,
            dry_run: false,
        };
        train_on(emulated_backend().unwrap(), &cfg, &inputs, &control)
            .unwrap_or_else(|e| panic!("training on the emulated device: {e:#}"))
    };
    let (straight, resumed) = (dirs.path().join("straight"), dirs.path().join("resumed"));
    let summary = run(&straight, None, None);
    assert_eq!(summary.metrics.len(), 2);
    for m in &summary.metrics {
        assert!(
            !m.skipped && m.loss.is_finite() && m.grad_norm > 0.0,
            "{m:?}"
        );
    }
    assert!(summary.before.is_some() && summary.after.is_some());
    run(&resumed, None, Some(1));
    run(&resumed, Some(&resumed.join("step-000001")), None);

    let read = |dir: &Path, file: &str| std::fs::read(dir.join(file)).unwrap();
    let metrics = |dir: &Path| -> Vec<serde_json::Value> {
        String::from_utf8(read(dir, "metrics.jsonl"))
            .unwrap()
            .lines()
            .map(without_timings)
            .collect()
    };
    assert_eq!(metrics(&straight), metrics(&resumed));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            read(&straight.join("step-000002"), file) == read(&resumed.join("step-000002"), file),
            "step-000002/{file} differs between the straight and the resumed run"
        );
    }
}
