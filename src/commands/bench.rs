//! `thinkshort bench`: throughput measurements on models with random weights (`bench step`,
//! the whole GRPO step, lives in bench_step.rs).
//!
//! `bench forward` times the inference forward pass of a model built from a Hugging Face
//! `config.json` alone (no weights): prefill of `batch` prompts of `prompt_len` tokens in one
//! ragged forward into a KV cache, then `decode_steps` forwards of one token per sequence. Every
//! timed region ends with `synchronize`, so device work is inside the clock.

use crate::backend::{cpu::CpuBackend, Backend, BackendKind, TokenPlacement};
use crate::config::ModelConfig;
use crate::cuda::CudaBackend;
use crate::model::{KvCache, Model};
use crate::rng::Philox;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Prefill and decode tokens/s of a random-weight model built from a config.json.
    Forward(ForwardArgs),
    /// One whole GRPO step (rollout, rewards, advantages, update) of a random-weight model:
    /// rollout and training tokens/s, MFU, peak memory.
    Step(super::bench_step::StepArgs),
}

#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// Hugging Face config.json of the model (weights are random; e.g. tools/model_configs/).
    #[arg(long)]
    pub model_config: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Batch sizes (sequences per forward), comma-separated; each is measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Prompt tokens per sequence in the prefill.
    #[arg(long, default_value_t = 256)]
    pub prompt_len: usize,
    /// Timed decode steps (one token per sequence each) after the prefill.
    #[arg(long, default_value_t = 32)]
    pub decode_steps: usize,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the results to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.what {
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Step(a) => super::bench_step::step(a),
    }
}

/// Timed prefill runs; the median is reported.
const PREFILL_RUNS: usize = 3;
/// Untimed decode steps: on CUDA the first runs op by op and the second is recorded as a graph,
/// which the timed steps replay.
const DECODE_WARMUP: usize = 2;

/// One batch size's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardResult {
    pub batch: usize,
    pub prefill_tokens: usize,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Matmul + attention FLOPs of the prefill per second.
    pub prefill_tflops: f64,
    pub decode_ms_per_step: f64,
    pub decode_tokens_per_s: f64,
    /// Bytes a decode step must read at least: the weights (the embedding table only when it is
    /// also the LM head) and the KV cache up to the mean decode position.
    pub decode_weight_bytes: f64,
    pub decode_kv_bytes: f64,
    /// (weights + KV bytes) / decode step time: compare with the device's copy bandwidth.
    pub decode_gb_per_s: f64,
}

fn forward(args: &ForwardArgs) -> Result<()> {
    if let Some(path) = &args.json {
        super::check_output_file(path, "--json")?;
    }
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!(
            "--batch: every batch size must be at least 1, got {:?}",
            args.batch
        );
    }
    if args.prompt_len == 0 || args.decode_steps == 0 {
        bail!("--prompt-len and --decode-steps must be at least 1");
    }
    let cfg = read_config(&args.model_config)?;
    match super::resolve_backend(args.backend)? {
        BackendKind::Cuda => {
            let dev = CudaBackend::new(0)?;
            let device = format!("cuda ({})", dev.device_name());
            report(
                args,
                &cfg,
                &device,
                2,
                Model::random(cfg.clone(), args.seed, dev)?,
            )
        }
        _ => report(
            args,
            &cfg,
            "cpu",
            4,
            Model::random(cfg.clone(), args.seed, CpuBackend)?,
        ),
    }
}

/// `n` token ids drawn uniformly from 0..vocab.
pub(super) fn random_tokens(rng: &mut Philox, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| ((rng.next_uniform() * vocab as f64) as u32).min(vocab as u32 - 1))
        .collect()
}

pub(super) fn read_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read model config {}", path.display()))?;
    ModelConfig::from_json_str(&text)
        .with_context(|| format!("invalid model config {}", path.display()))
}

/// Measures every batch size, prints a table and writes `--json`.
fn report<B: Backend>(
    args: &ForwardArgs,
    cfg: &ModelConfig,
    device: &str,
    bytes_per_param: usize,
    model: Model<B>,
) -> Result<()> {
    let params = cfg.num_params();
    println!(
        "bench forward: {} ({:.1}M parameters, {} layers, hidden {}, heads {}/{}, vocab {}) on {device}; \
         prompt {} tokens, {} decode steps, seed {}",
        args.model_config.display(),
        params as f64 / 1e6,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.vocab_size,
        args.prompt_len,
        args.decode_steps,
        args.seed
    );
    println!(
        "{:>5} {:>11} {:>13} {:>9} {:>13} {:>12} {:>10} {:>11} {:>11}",
        "batch",
        "prefill ms",
        "prefill tok/s",
        "TFLOP/s",
        "decode ms/st",
        "decode tok/s",
        "decode GB/s",
        "weights MB",
        "KV MB/step"
    );
    let mut results = Vec::new();
    for &batch in &args.batch {
        let r = bench_batch(
            &model,
            batch,
            args.prompt_len,
            args.decode_steps,
            args.seed,
            bytes_per_param,
        )?;
        println!(
            "{:>5} {:>11.2} {:>13.1} {:>9.2} {:>13.3} {:>12.1} {:>10.1} {:>11.1} {:>11.2}",
            r.batch,
            r.prefill_ms,
            r.prefill_tokens_per_s,
            r.prefill_tflops,
            r.decode_ms_per_step,
            r.decode_tokens_per_s,
            r.decode_gb_per_s,
            r.decode_weight_bytes / 1e6,
            r.decode_kv_bytes / 1e6
        );
        results.push(r);
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "model_config": args.model_config.display().to_string(),
            "device": device,
            "num_params": params,
            "bytes_per_param": bytes_per_param,
            "prompt_len": args.prompt_len,
            "decode_steps": args.decode_steps,
            "seed": args.seed,
            "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Prefill (median of `PREFILL_RUNS` after one warm-up) and decode (`DECODE_WARMUP` steps, then
/// `steps` steps, each waited for, as sampling would) of `batch` sequences. Decode runs as
/// `generate` does (`Model::decode_step`: recorded as a CUDA graph on CUDA) on fixed random
/// tokens already on the device, and computes the logits of every row.
fn bench_batch<B: Backend>(
    model: &Model<B>,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    seed: u64,
    bytes_per_param: usize,
) -> Result<ForwardResult> {
    let (cfg, b) = (&model.cfg, &model.backend);
    let mut cache = KvCache::new(b, cfg, batch, prompt_len + DECODE_WARMUP + steps)?;
    let mut rng = Philox::new(seed, 1);
    let mut tokens = |n: usize| random_tokens(&mut rng, n, cfg.vocab_size);

    // Prefill: [batch × prompt_len] tokens, logits of each sequence's last token.
    let prompt = tokens(batch * prompt_len);
    let place = TokenPlacement::contiguous(batch, 0, prompt_len);
    let last_rows: Vec<usize> = (0..batch).map(|s| (s + 1) * prompt_len - 1).collect();
    let mut times = Vec::with_capacity(PREFILL_RUNS);
    for run in 0..=PREFILL_RUNS {
        let start = Instant::now();
        let logits = model.forward(&prompt, &place, &mut cache, &last_rows)?;
        b.synchronize()?;
        if run > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
        drop(logits);
    }
    times.sort_by(f64::total_cmp);
    let prefill_s = times[times.len() / 2];

    // Decode: one token per sequence at position prompt_len + i, logits of every row. Each
    // step's ids are copied into `ids`, where the step reads them (as `generate` copies the
    // sampled ids).
    let step_ids: Vec<B::Buf> = (0..DECODE_WARMUP + steps)
        .map(|_| {
            let ids: Vec<f32> = tokens(batch).iter().map(|&t| t as f32).collect();
            b.upload_f32(&ids)
        })
        .collect::<Result<_>>()?;
    let mut ids = b.zeros_f32(batch)?;
    let mut logits = b.zeros_f32(batch * cfg.vocab_size)?;
    let rows: Vec<u32> = (0..batch as u32).collect();
    let mut graph = b.decode_graph();
    let mut start = Instant::now();
    for (i, step) in step_ids.iter().enumerate() {
        if i == DECODE_WARMUP {
            start = Instant::now();
        }
        b.copy(b.full_mut(&mut ids), b.full(step));
        model.decode_step(
            &mut graph,
            &mut logits,
            b.full(&ids),
            &rows,
            &TokenPlacement::contiguous(batch, prompt_len + i, 1),
            &mut cache,
        )?;
        b.synchronize()?;
    }
    let decode_s = start.elapsed().as_secs_f64() / steps as f64;
    drop(graph);

    let embed = cfg.vocab_size * cfg.hidden_size;
    let read_params = cfg.num_params() - if cfg.tie_word_embeddings { 0 } else { embed };
    let weight_bytes = (read_params * bytes_per_param) as f64;
    // Mean attended context of a timed decode step: positions 0..=prompt_len + DECODE_WARMUP + i.
    let mean_ctx = (prompt_len + DECODE_WARMUP) as f64 + (steps as f64 + 1.0) / 2.0;
    let kv_bytes = (2 * cfg.num_layers * batch * cfg.kv_dim() * bytes_per_param) as f64 * mean_ctx;
    let prefill_tokens = batch * prompt_len;
    Ok(ForwardResult {
        batch,
        prefill_tokens,
        prefill_ms: prefill_s * 1e3,
        prefill_tokens_per_s: prefill_tokens as f64 / prefill_s,
        prefill_tflops: prefill_flops(cfg, batch, prompt_len) / prefill_s / 1e12,
        decode_ms_per_step: decode_s * 1e3,
        decode_tokens_per_s: batch as f64 / decode_s,
        decode_weight_bytes: weight_bytes,
        decode_kv_bytes: kv_bytes,
        decode_gb_per_s: (weight_bytes + kv_bytes) / decode_s / 1e9,
    })
}

/// FLOPs of a prefill: 2 per weight per token in the layer matmuls, causal attention (QKᵀ and PV:
/// 4 · q_dim per attended position) and the LM head on one row per sequence.
fn prefill_flops(cfg: &ModelConfig, batch: usize, len: usize) -> f64 {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let (q, kv) = (cfg.q_dim() as f64, cfg.kv_dim() as f64);
    let layer_weights = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let tokens = (batch * len) as f64;
    let attended = batch as f64 * (len * (len + 1) / 2) as f64; // Σ over tokens of (pos + 1)
    let layers = cfg.num_layers as f64;
    layers * (2.0 * layer_weights * tokens + 4.0 * q * attended)
        + 2.0 * h * cfg.vocab_size as f64 * batch as f64
}
