//! The whole CUDA backend on the CPU: `selfcheck` (every op, the tiny models' log-probs and
//! gradients, recorded decode steps, one GRPO update), a short training run with a resume and
//! SFT run `CudaBackend` over the emulated device of tests/emulation_support, so the backend's own code
//! (shape checks, views, kernel choice, scratch and index caches, decode-step recordings) and the
//! trainer's device paths are checked without a GPU, not only the kernels and their launchers.

mod emulation_support;

use std::path::Path;
use std::sync::Arc;

use emulation_support::emulated_device::EmulatedDevice;
use emulation_support::{demo_inputs, without_timings};
use thinkshort::backend::cpu::CpuBackend;
use thinkshort::backend::TrainBackend;
use thinkshort::commands::bench_step::{self, StepArgs};
use thinkshort::config::ModelConfig;
use thinkshort::cuda::device::Device;
use thinkshort::cuda::launch::Launcher;
use thinkshort::cuda::CudaBackend;
use thinkshort::generate::{generate, GenerationRequest};
use thinkshort::model::Model;
use thinkshort::model_backward::TrainBatch;
use thinkshort::selfcheck::{self, CheckRow, Coverage};
use thinkshort::sft::{train_sft, SftExample, SftOptions};
use thinkshort::train::{train_on, RunControl};
use thinkshort::train_config::TrainConfig;

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
    assert_launches_fit_the_gpus();
}

/// Every kernel launched so far (the selfcheck launches every one), at the largest block and
/// dynamic shared memory it was launched with, fits the GPUs the kernels are built for by
/// ptxas's report of its registers and static shared memory: 64 Ki registers per SM (allocated
/// 8 per thread at a time), and the shared memory a block may opt into (A100 163 KiB, H100 and
/// H200 227 KiB). Past either, the launch fails on the GPU ("too many resources requested").
fn assert_launches_fit_the_gpus() {
    if !thinkshort::cuda::kernels_built() {
        eprintln!("no ptxas report (built without nvcc): the launch resources are not checked");
        return;
    }
    const LIMITS: [(&str, u32); 2] = [("sm_80", 166_912), ("sm_90", 232_448)];
    let shapes = emulation_support::emulated_device::launch_shapes();
    let mut found = std::collections::BTreeSet::new();
    for line in thinkshort::cuda::ptxas_report().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with('#') || fields.len() < 3 {
            continue;
        }
        let (module, function, arch) = (fields[0].trim_end_matches(".cu"), fields[1], fields[2]);
        let name = format!("{module}/{function}");
        let (Some(&(threads, dynamic)), Some(&(_, shared_limit))) =
            (shapes.get(&name), LIMITS.iter().find(|(a, _)| *a == arch))
        else {
            continue;
        };
        let value = |key: &str| -> u32 {
            let v = fields.iter().find_map(|f| f.strip_prefix(key));
            v.and_then(|v| v.trim_end_matches('B').parse().ok())
                .unwrap_or_else(|| panic!("no {key} in the ptxas line {line:?}"))
        };
        let registers = value("registers=").div_ceil(8) * 8;
        let shared = value("smem=") + dynamic;
        assert!(
            registers * threads <= 65_536,
            "{name} on {arch}: {registers} registers × {threads} threads > 64 Ki"
        );
        assert!(
            shared <= shared_limit,
            "{name} on {arch}: {shared} bytes of shared memory > {shared_limit}"
        );
        found.insert(name);
    }
    let missing: Vec<&String> = shapes.keys().filter(|k| !found.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "launched but not in the ptxas report: {missing:?}"
    );
}

/// `train --backend cuda`'s whole loop on the emulated device: rollouts with recorded decode
/// steps, reference log-probs, micro-batched updates with activation checkpointing and the
/// optimizer in host memory, held-out evaluations and checkpoints. Two steps straight equal one
/// step, a checkpoint and one resumed step, bit for bit (weights and every metric but timings):
/// the checkpoint carries the device's weights and moments whole.
/// The demo's settings for a 2-step run of 2 prompts × 4 samples.
fn short_demo_config() -> TrainConfig {
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
    cfg
}

#[test]
fn a_short_demo_run_trains_and_resumes_on_the_cuda_backend_over_the_emulator() {
    let (cfg, inputs) = (short_demo_config(), demo_inputs());
    let dirs = tempfile::tempdir().unwrap();
    let run = |out: &Path, resume: Option<&Path>, stop_after: Option<usize>| {
        let control = RunControl {
            out,
            resume,
            stop_after,
            dry_run: false,
            interrupt: None,
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

/// `train` on a device too small for the run stops before loading or writing anything, with
/// the estimate's message saying what to change.
#[test]
fn a_run_that_does_not_fit_the_device_stops_with_a_clear_error() {
    let device = Arc::new(EmulatedDevice::with_memory(MULTIPROCESSORS, 8 << 20));
    let backend = CudaBackend::with_device(device, "CPU emulator".to_string()).unwrap();
    let out = tempfile::tempdir().unwrap().path().join("run");
    let control = RunControl {
        out: &out,
        resume: None,
        stop_after: None,
        dry_run: false,
        interrupt: None,
    };
    let err = match train_on(backend, &short_demo_config(), &demo_inputs(), &control) {
        Ok(_) => panic!("a run of ~20 MiB trained on a device of 8 MiB"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("GiB on the cuda device but") && err.contains("use a smaller micro_batch"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "a run that does not fit wrote {}",
        out.display()
    );
}

/// A forward pass that runs out of device memory is an error naming it (the backend's first
/// failed op is kept, the ops after it skipped), not a crash or a result read from buffers that
/// were never written.
#[test]
fn running_out_of_device_memory_is_an_error_not_a_crash() {
    let cfg = ModelConfig::from_json_str(
        r#"{"model_type":"qwen2","vocab_size":256,"hidden_size":64,"intermediate_size":192,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "tie_word_embeddings":true}"#,
    )
    .unwrap();
    let device = Arc::new(EmulatedDevice::with_memory(MULTIPROCESSORS, 1 << 20));
    let backend = CudaBackend::with_device(device, "CPU emulator".to_string()).unwrap();
    let model = Model::random(cfg, 1, backend).unwrap();
    let (prompt, completion): (Vec<u32>, Vec<u32>) = ((0..32).collect(), (32..64).collect());
    let seqs = vec![(&prompt[..], &completion[..]); 32];
    let batch = TrainBatch::new(&seqs).unwrap();
    let err = match model.forward_train(&batch, 1.0) {
        Ok(_) => panic!("2048 tokens of activations fitted in what the weights left of 1 MiB"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("out of memory"), "{err}");
}

/// (losses of each step, initial and trained f32 weights) of a few SFT steps of a tiny model on
/// `backend`.
fn sft_run<B: TrainBackend>(backend: B, micro_batch: usize) -> (Vec<f64>, Vec<f32>, Vec<f32>) {
    let cfg = ModelConfig::from_json_str(
        r#"{"model_type":"qwen2","vocab_size":96,"hidden_size":128,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "tie_word_embeddings":true}"#,
    )
    .unwrap();
    let master = Model::random(cfg.clone(), 3, CpuBackend).unwrap().params;
    let mut model = Model::from_host(cfg, &master, backend).unwrap();
    let initial = master.clone();
    let data: Vec<SftExample> = (0..9u32)
        .map(|i| SftExample {
            prompt: (0..4 + i % 5).map(|j| (i * 11 + j) % 96).collect(),
            completion: (0..3 + i % 6).map(|j| (i * 5 + j * 7 + 2) % 96).collect(),
        })
        .collect();
    let opts = SftOptions {
        steps: 4,
        batch_size: 6,
        micro_batch,
        lr: 1e-2,
        warmup_steps: 0,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: 2,
    };
    let mut losses = Vec::new();
    let trained = train_sft(&mut model, master, &data, &opts, |s| losses.push(s.loss)).unwrap();
    (losses, initial, trained)
}

/// `sft --backend cuda` on the emulated device follows the CPU: the same batches, each step's
/// loss within bf16's reach of the CPU's (the device computes from bf16 weights and
/// activations), micro-batches on the device, and the trained f32 weights far closer to the
/// CPU's than to where they started (Adam's normalised steps turn bf16's gradient differences
/// into whole steps on elements whose gradient is near zero, so no tighter bound holds).
#[test]
fn sft_on_the_cuda_backend_follows_the_cpu() {
    let (cpu_losses, initial, cpu_weights) = sft_run(CpuBackend, 0);
    let (cuda_losses, _, cuda_weights) = sft_run(emulated_backend().unwrap(), 4);
    assert!(cpu_losses[3] < cpu_losses[0], "{cpu_losses:?}");
    for (step, (c, g)) in cpu_losses.iter().zip(&cuda_losses).enumerate() {
        assert!(
            (c - g).abs() <= 1e-2 * c,
            "step {step}: loss {g} on cuda, {c} on the cpu"
        );
    }
    let e = emulation_support::rel_err(&cuda_weights, &cpu_weights);
    let moved = emulation_support::rel_err(&initial, &cpu_weights);
    assert!(
        e < moved / 4.0,
        "trained weights differ by {e:.3e} (relative), training moved them by {moved:.3e}"
    );
}

/// `bench step` as `tools/gpu_check.sh` runs it on a GPU (`--profile`, the optimizer offloaded,
/// activation checkpointing, micro-batches, `--json`), here on the emulated device: the steps,
/// the recorded decode steps and the profile tables of both phases come out, and the update's
/// ops count the FLOPs of the model (the MFU's count from the config) and of the checkpointed
/// layers' recomputed forward (each layer's products but its down projection, and its attention).
/// On a device whose pool keeps freed memory, the pool's peaks come out too: the most bytes
/// allocated at once, and at least as many held.
#[test]
fn bench_step_with_its_profile_runs_on_the_emulated_device() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        step: StepArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, json) = (dir.path().join("config.json"), dir.path().join("step.json"));
    std::fs::write(
        &config,
        r#"{"model_type":"qwen2","vocab_size":300,"hidden_size":128,"intermediate_size":256,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "tie_word_embeddings":true}"#,
    )
    .unwrap();
    let cli = <Cli as clap::Parser>::parse_from([
        "step",
        "--model-config",
        config.to_str().unwrap(),
        "--prompts",
        "2",
        "--group",
        "2",
        "--prompt-len",
        "9",
        "--new-tokens",
        "12",
        "--micro-batch",
        "3",
        "--offload",
        "--activation-checkpointing",
        "--steps",
        "1",
        "--profile",
        "--json",
        json.to_str().unwrap(),
    ]);
    let cfg = ModelConfig::from_json_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let device = Arc::new(EmulatedDevice::new(MULTIPROCESSORS).keeping_freed_memory());
    let backend = CudaBackend::with_device(device.clone(), "CPU emulator".to_string()).unwrap();
    bench_step::run_on(&cli.step, &cfg, "emulator", Some(1.0), backend)
        .unwrap_or_else(|e| panic!("bench step on the emulated device: {e:#}"));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(v["result"]["train_tflops"].as_f64().unwrap() > 0.0, "{v}");
    let pool = &v["result"]["pool_peaks"];
    let (used, reserved) = (pool["used"].as_u64(), pool["reserved"].as_u64());
    assert_eq!(used, Some(device.peak_bytes() as u64), "{pool}");
    assert!(reserved > used, "the cache held nothing more: {pool}");
    assert!(v["decode_graph"]["replayed"].as_u64().unwrap() > 0, "{v}");
    for phase in ["rollout_ops", "update_ops"] {
        let ops = v["profile"][phase].as_array().unwrap();
        assert!(
            ops.iter().any(|o| o["op"] == "matmul_forward"),
            "{phase}: {ops:?}"
        );
    }
    let update_ops = v["profile"]["update_ops"].as_array().unwrap();
    assert!(update_ops.iter().any(|o| o["op"] == "sum_squares"), "{v}");
    let (seqs, len, scored) = (4, 9 + 12, 4 * 12);
    let (m, layers, h, i, q, kv) = (seqs * len, 2, 128, 256, 128, 64);
    let attended = seqs * len * (len + 1) / 2;
    let recomputed = layers * (2 * m * (h * q + 2 * h * kv + q * h + 2 * h * i) + 4 * q * attended);
    let expected = bench_step::train_flops(&cfg, seqs, len, scored) + recomputed as f64;
    let flops: f64 = update_ops
        .iter()
        .map(|o| o["flops"].as_f64().unwrap())
        .sum();
    assert!(
        (flops - expected).abs() <= 1e-9 * expected,
        "the update's ops count {flops} FLOPs, expected {expected}"
    );
    let bytes = |op: &str| {
        let row = update_ops.iter().find(|o| o["op"] == op);
        row.map_or(0.0, |o| o["bytes"].as_f64().unwrap())
    };
    // the f32 gradient read and its sum written as [hi, lo] f32 (AdamW runs on the host here)
    assert_eq!(bytes("sum_squares"), 4.0 * cfg.num_params() as f64 + 8.0);
}

/// The emulated device holds recordings to what CUDA allows a captured stream and its graph, so
/// the backend's recordings are checked against those rules: a captured free of memory allocated
/// outside the capture invalidates it, a graph allocation still in use refuses the next launch,
/// and host copies and waits are refused while recording.
#[test]
fn the_emulated_device_refuses_what_a_cuda_graph_refuses() {
    let d = EmulatedDevice::new(MULTIPROCESSORS);
    let before = d.alloc(64).unwrap();
    d.begin_recording().unwrap();
    drop(before);
    let err = d
        .end_recording()
        .err()
        .expect("a foreign free invalidates the capture");
    assert!(format!("{err}").contains("outside the recording"), "{err}");

    d.begin_recording().unwrap();
    let kept = d.alloc(64).unwrap();
    let freed = d.alloc(64).unwrap();
    // SAFETY: both hold 64 bytes.
    unsafe {
        d.fill_zero(kept.ptr(), 64).unwrap();
        d.fill_zero(freed.ptr(), 64).unwrap();
    }
    drop(freed);
    let graph = d.end_recording().unwrap().expect("work was recorded");
    graph.launch().unwrap();
    assert!(
        graph.launch().is_err(),
        "relaunched with an allocation in use"
    );
    drop(kept);
    graph.launch().unwrap();

    d.begin_recording().unwrap();
    assert!(d.synchronize().is_err());
    // SAFETY: never reached with a bad pointer: the copies are refused while recording.
    unsafe {
        assert!(d.copy_to_device(0, &[0u8; 4]).is_err());
        assert!(d.copy_to_host(&mut [0u8; 4], 0).is_err());
    }
    assert!(d.end_recording().unwrap().is_none());
}

/// (kernel launches, GEMMs) of `generate` on the emulated device: 4 samples of one prompt, each
/// making exactly `cap` new tokens, on a model of `model_type` (qwen2, qwen3) with `layers` layers.
fn generate_work(model_type: &str, layers: usize, cap: usize) -> (usize, usize) {
    let cfg = ModelConfig::from_json_str(&format!(
        r#"{{"model_type":"{model_type}","vocab_size":300,"hidden_size":128,"intermediate_size":256,
        "num_hidden_layers":{layers},"num_attention_heads":4,"num_key_value_heads":2,
        "tie_word_embeddings":true}}"#
    ))
    .unwrap();
    let device = Arc::new(EmulatedDevice::new(MULTIPROCESSORS));
    let backend = CudaBackend::with_device(device.clone(), "CPU emulator".to_string()).unwrap();
    let model = Model::random(cfg, 1, backend).unwrap();
    let request = GenerationRequest {
        prompt: (1..20).collect(),
        max_new_tokens: cap,
    };
    let config = emulation_support::sampling_to_the_cap();
    let (launches, gemms) = device.work_run();
    let out = generate(&model, &vec![request; 4], &config, None).unwrap();
    assert!(out.iter().all(|c| c.tokens.len() == cap));
    let (l, g) = device.work_run();
    (l - launches, g - gemms)
}

/// A decode step is bound by its launches on a GPU (a 0.5B model's weights take ~0.25 ms to read,
/// a step ~3 ms op by op), so their number is held here, counted as the emulated device runs a
/// step (a recorded step's replay counts what it replays): per layer 6 kernels (q/k/v bias and
/// rotation, the cache write, decode attention, the two residual adds fused with the next norm,
/// SwiGLU) and 4 GEMMs (q, k and v in one, and gate and up in one: their weights lie side by
/// side; o, down);
/// per step 6 kernels (the embedding of the sampled ids, the first
/// layer's input norm, the head's gather and norm, advancing the recorded positions, and the
/// sampling after the step) and the head's GEMM. Qwen3's per-head q/k norms are inside the
/// rotation's kernel: the same counts. A change that adds launches fails here and should say why.
#[test]
fn a_decode_step_makes_10_device_calls_per_layer_and_7_more() {
    for model_type in ["qwen2", "qwen3"] {
        let per_step = |layers| {
            let short = generate_work(model_type, layers, 9);
            let long = generate_work(model_type, layers, 25);
            // 16 more steps: two whole windows between host syncs
            ((long.0 - short.0) / 16, (long.1 - short.1) / 16)
        };
        let (two, four) = (per_step(2), per_step(4));
        let per_layer = ((four.0 - two.0) / 2, (four.1 - two.1) / 2);
        let fixed = (two.0 - 2 * per_layer.0, two.1 - 2 * per_layer.1);
        assert_eq!(
            per_layer,
            (6, 4),
            "{model_type}: (kernels, GEMMs) per layer of a decode step"
        );
        assert_eq!(
            fixed,
            (6, 1),
            "{model_type}: (kernels, GEMMs) of a decode step besides its layers"
        );
    }
}
