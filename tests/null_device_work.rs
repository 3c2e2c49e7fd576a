//! The CUDA backend at the Qwen2.5-0.5B shape on a device that does no work
//! (`emulation_support::null_device`): `bench step --profile` as `tools/gpu_check.sh` runs it
//! (8 prompts × 8 samples, 128 + 256 tokens), so the profile's work per op is what the backend
//! asks of a GPU at that shape, bf16 and f32 buffers as on the GPU.
//!
//! With `THINKSHORT_WORK_DIR=DIR` each test also writes its profile to DIR/<config name>.json
//! (e.g. qwen2.5-0.5b.json), for `tools/update_roofline.py` (the update's time at a device's
//! measured ceilings).
//!
//! One op's work differs from a GPU run's: every sampled token is id 0 here (the null device's
//! copies to the host give zeros), so `embedding_backward` adds into 1 023 distinct rows of the
//! table where a real rollout's 16 384 sampled tokens name about 16 000 (0.1 GB more).

mod emulation_support;

use std::sync::Arc;

use emulation_support::null_device::NullDevice;
use thinkshort::commands::bench_step::{self, StepArgs};
use thinkshort::config::ModelConfig;
use thinkshort::cuda::CudaBackend;

/// Runs `bench step --profile` with `config` (a path under tools/model_configs), `prompts` × 8
/// samples of 128 + 256 tokens, on the null device; returns the JSON it wrote and the config.
fn profile_on_the_null_device(config: &str, prompts: usize) -> (serde_json::Value, ModelConfig) {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        step: StepArgs,
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var_os("THINKSHORT_WORK_DIR").map_or(tmp.path().to_owned(), Into::into);
    let name = std::path::Path::new(config).file_name().unwrap(); // e.g. qwen2.5-0.5b.json
    let json = dir.join(name);
    let json = json.to_str().unwrap();
    let prompts = prompts.to_string();
    let cli = <Cli as clap::Parser>::parse_from([
        "step",
        "--model-config",
        config,
        "--prompts",
        &prompts,
        "--group",
        "8",
        "--prompt-len",
        "128",
        "--new-tokens",
        "256",
        "--steps",
        "1",
        "--profile",
        "--json",
        json,
    ]);
    let cfg = ModelConfig::from_json_str(&std::fs::read_to_string(config).unwrap()).unwrap();
    let backend = CudaBackend::with_device(Arc::new(NullDevice::new(132)), "null".into()).unwrap();
    bench_step::run_on(&cli.step, &cfg, "null device", Some(989.0), backend)
        .unwrap_or_else(|e| panic!("bench step on the null device: {e:#}"));
    let v = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (v, cfg)
}

/// The update's model FLOPs counted op by op, checked against the MFU's count from the config
/// for `seqs` sequences of 128 + 256 tokens; returns the update's ops.
fn update_ops_counting_the_mfus_flops(
    v: &serde_json::Value,
    cfg: &ModelConfig,
    seqs: usize,
) -> Vec<serde_json::Value> {
    let update = v["profile"]["update_ops"].as_array().unwrap().clone();
    let flops: f64 = update.iter().map(|o| o["flops"].as_f64().unwrap()).sum();
    let expected = bench_step::train_flops(cfg, seqs, 128 + 256, seqs * 256);
    assert!(
        (flops - expected).abs() <= 1e-9 * expected,
        "the update's ops: {flops} FLOPs, the MFU's model: {expected}"
    );
    update
}

/// The update's ops on CUDA add up to the MFU's model FLOPs at the real shape (24 layers, GQA
/// 7:1, the head in chunks of 1766 rows over 16384 scored rows), their bytes to the buffers'
/// sizes at the GPU's types, counted here by hand for the largest memory-bound ops: AdamW moves
/// 30 bytes a parameter (bf16 weights, f32 master weights, moments and gradients), SwiGLU 3 and 5
/// bf16 [M, I] tensors, attention its q, out (and their gradients), the f32 log-sum-exp and
/// every cache row of K and V once (the backward adding into bf16 dK and dV).
#[test]
fn the_update_at_the_qwen2_5_0_5b_shape_asks_the_mfus_flops_of_a_gpu() {
    let (v, cfg) = profile_on_the_null_device("tools/model_configs/qwen2.5-0.5b.json", 8);
    let update = update_ops_counting_the_mfus_flops(&v, &cfg, 64);
    let op = |name: &str| update.iter().find(|o| o["op"] == name).unwrap();
    let bytes = |name: &str| op(name)["bytes"].as_f64().unwrap();
    let params = cfg.num_params() as f64;
    assert_eq!(bytes("adamw_step"), 30.0 * params);
    let (layers, m, h, i, heads, kv) = (24.0, 64.0 * 384.0, 896.0, 4864.0, 14.0, 128.0);
    assert_eq!(bytes("swiglu_forward"), layers * 3.0 * m * i * 2.0);
    assert_eq!(bytes("swiglu_backward"), layers * 5.0 * m * i * 2.0);
    let (q, lse, cache_rows) = (m * h * 2.0, m * heads * 4.0, 64.0 * 384.0);
    let forward = 2.0 * q + lse + cache_rows * 2.0 * kv * 2.0;
    assert_eq!(bytes("attention_forward"), layers * forward);
    let backward = 4.0 * q + lse + cache_rows * 2.0 * kv * (2.0 + 2.0 * 2.0);
    assert_eq!(bytes("attention_backward"), layers * backward);
    // the head: ceil(16384 / 1766) = 10 chunks, each a matmul_forward (f32 logits) and a
    // policy_loss_backward
    assert_eq!(op("policy_loss_backward")["calls"].as_u64().unwrap(), 10);
}

/// The same at the Qwen2.5-1.5B shape (4 × 8 samples, as gpu_check runs it).
#[test]
#[ignore = "45 s and 9 GB of host memory: cargo test --release --test null_device_work -- --ignored"]
fn the_update_at_the_qwen2_5_1_5b_shape_asks_the_mfus_flops_of_a_gpu() {
    let (v, cfg) = profile_on_the_null_device("tools/model_configs/qwen2.5-1.5b.json", 4);
    update_ops_counting_the_mfus_flops(&v, &cfg, 32);
}
