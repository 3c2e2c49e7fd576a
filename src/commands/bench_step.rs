//! `thinkshort bench step`: one whole GRPO step on a model with random weights built from a
//! Hugging Face config.json (no weights needed): the rollout (P prompts × G samples of exactly T
//! new tokens: no EOS, so every run does the same work), rewards, group advantages and the
//! update (forward pass, policy loss, backward pass, gradient norm, AdamW). Reports rollout and
//! training tokens/s, the update's model FLOP utilisation and the peak memory.
//! tools/bench_step_torch.py runs the same step in PyTorch for comparison.

use super::bench::{random_tokens, read_config};
use crate::backend::{cpu::CpuBackend, BackendKind, MemoryPeaks, OpTime, TrainBackend};
use crate::config::ModelConfig;
use crate::cuda::CudaBackend;
use crate::generate::{generate, GenerateConfig, GenerationRequest};
use crate::grpo::advantage::AdvantageOptions;
use crate::grpo::policy_loss::LossOptions;
use crate::grpo::reward::{reward, LengthShape, RewardWeights};
use crate::model::Model;
use crate::optim::AdamW;
use crate::rng::{self, Philox};
use crate::sampling::SamplingParams;
use crate::train::memory::{RunShape, TrainMemory};
use crate::train::optimizer::DeviceOptimizer;
use crate::train::update::{policy_update, UpdateBatch, UpdateOptions};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct StepArgs {
    /// Hugging Face config.json of the model (weights are random; e.g. tools/model_configs/).
    #[arg(long)]
    pub model_config: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// P: prompts per step.
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// G: samples per prompt.
    #[arg(long, default_value_t = 8)]
    pub group: usize,
    /// Tokens of each (random) prompt.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// T: new tokens per sample (always all of them: the benchmark never stops at an EOS).
    #[arg(long, default_value_t = 256)]
    pub new_tokens: usize,
    /// Completions per forward and backward pass of the update (0: all of them in one).
    #[arg(long, default_value_t = 0)]
    pub micro_batch: usize,
    /// Keep the f32 master weights and AdamW moments in host memory and step them on the CPU
    /// (`optim.offload` of `train`).
    #[arg(long)]
    pub offload: bool,
    /// Keep only each layer's input in the update and recompute the rest in the backward pass
    /// (`activation_checkpointing` of `train`).
    #[arg(long)]
    pub activation_checkpointing: bool,
    /// Timed steps after one warm-up step; the median is reported.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// The device's dense bf16 peak in TFLOP/s for the MFU; known for A100, H100 and H200.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Seed of the random weights, prompts, samples and rewards.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the result to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// After the timed steps, run one more with every op timed (CUDA: events on the device;
    /// CPU: each call's wall time) and print where the rollout's and the update's time goes,
    /// op by op.
    #[arg(long)]
    pub profile: bool,
}

/// The median step's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub rollout_s: f64,
    /// Sampled tokens (P·G·T) per second of rollout.
    pub rollout_tokens_per_s: f64,
    pub update_s: f64,
    /// Prompt + completion tokens through the update's forward and backward, per second.
    pub train_tokens_per_s: f64,
    /// Model FLOPs of the update (forward + backward: 3× the forward's matmuls and attention).
    pub train_tflops: f64,
    /// train_tflops over the device's peak, when known.
    pub train_mfu: Option<f64>,
    /// The whole step: rollout, rewards, advantages, update.
    pub step_s: f64,
    /// Device memory reserved at the end (CUDA: the pool keeps its high-water mark) or the
    /// process's peak resident memory (CPU), in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// CUDA: the most bytes the run had allocated at once and the most its pool held (freed
    /// memory kept for reuse included), from the pool's high-water marks; their gap is the
    /// pool's fragmentation.
    pub pool_peaks: Option<MemoryPeaks>,
    /// What `train`'s memory estimate (src/train/memory.rs) gives for this step, in bytes: held
    /// against the measured peak, it shows how far the estimate that sizes the update's
    /// micro-batches can be trusted.
    pub memory_estimate_bytes: u64,
}

/// Time by op of one profiled step (`--profile`), per phase.
#[derive(Debug, Clone, Serialize)]
pub struct StepProfile {
    pub rollout_s: f64,
    pub rollout_ops: Vec<OpTime>,
    pub update_s: f64,
    pub update_ops: Vec<OpTime>,
}

pub fn step(args: &StepArgs) -> Result<()> {
    if let Some(path) = &args.json {
        super::check_output_file(path, "--json")?;
    }
    if args.prompts == 0 || args.group == 0 || args.prompt_len == 0 || args.new_tokens == 0 {
        bail!("--prompts, --group, --prompt-len and --new-tokens must be at least 1");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(p) = args.peak_tflops.filter(|p| !(*p > 0.0 && p.is_finite())) {
        bail!("--peak-tflops must be a finite number > 0, got {p}");
    }
    let cfg = read_config(&args.model_config)?;
    match super::resolve_backend(args.backend)? {
        BackendKind::Cuda => {
            let dev = CudaBackend::new(0)?;
            let name = dev.device_name();
            let peak = args.peak_tflops.or_else(|| peak_bf16_tflops(&name));
            // the attention backward kernels (THINKSHORT_FLASH_BACKWARD) belong to what is timed
            let device = format!(
                "cuda ({name}; {} attention backward)",
                dev.flash_backward().name()
            );
            run_on(args, &cfg, &device, peak, dev)
        }
        _ => run_on(args, &cfg, "cpu", args.peak_tflops, CpuBackend),
    }
}

/// The stream of the correctness coin flips, apart from the sampler's (numbered from 0) and
/// from train's prompt picks.
const COIN_STREAM: u64 = rng::PROMPT_PICK_STREAM - 1;

/// `bench step` of model `cfg` on `backend`, named `device` in the output (the tests run the
/// CUDA backend over an emulated device).
pub fn run_on<B: TrainBackend>(
    args: &StepArgs,
    cfg: &ModelConfig,
    device: &str,
    peak_tflops: Option<f64>,
    backend: B,
) -> Result<()> {
    let (p, g, t) = (args.prompts, args.group, args.new_tokens);
    let passes = match args.micro_batch {
        0 => String::new(),
        m => format!(", the update {m} samples per pass"),
    } + if args.offload {
        ", optimizer in host memory"
    } else {
        ""
    } + if args.activation_checkpointing {
        ", activation checkpointing"
    } else {
        ""
    };
    println!(
        "bench step: {} ({:.1}M parameters) on {device}; {p} prompts × {g} samples, prompt {} \
         tokens, {t} new tokens{passes}, seed {}",
        args.model_config.display(),
        cfg.num_params() as f64 / 1e6,
        args.prompt_len,
        args.seed
    );
    let free_before = backend.free_memory()?;
    let estimate = TrainMemory::estimate(
        cfg,
        backend.storage_bytes(),
        crate::model::HEAD_CHUNK_BYTES,
        &RunShape {
            sequences: p * g,
            prompts: p,
            micro_batch: args.micro_batch,
            prompt_len: args.prompt_len,
            cap: t,
            offload: args.offload,
            checkpoint_layers: args.activation_checkpointing,
            ..RunShape::default()
        },
    );
    let mut model = Model::random(cfg.clone(), args.seed, backend)?;
    model.checkpoint_layers = args.activation_checkpointing;
    let host = model.backend.download(model.backend.full(&model.params))?;
    let adam = AdamW::new(host.len(), 0.9, 0.999, 1e-8, 0.0);
    let mut opt = DeviceOptimizer::with_placement(&model.backend, adam, host, args.offload)?;
    if args.profile {
        if !model.backend.start_op_profile() {
            bail!(
                "--profile: the {} backend cannot time its ops",
                model.backend.name()
            );
        }
        model.backend.take_op_profile()?;
    }

    let mut steps = Vec::new();
    for s in 0..=args.steps {
        let (r, _) = one_step(&mut model, &mut opt, args, s as u64, peak_tflops, false)?;
        println!(
            "{} rollout {:.2} s ({:.0} tok/s), update {:.2} s ({:.0} tok/s, {:.2} TFLOP/s{}), step {:.2} s",
            if s == 0 { "warm-up:".to_string() } else { format!("step {s}:") },
            r.rollout_s,
            r.rollout_tokens_per_s,
            r.update_s,
            r.train_tokens_per_s,
            r.train_tflops,
            r.train_mfu.map_or(String::new(), |m| format!(", MFU {:.1} %", 100.0 * m)),
            r.step_s
        );
        if s > 0 {
            steps.push(r);
        }
    }
    steps.sort_by(|a, b| a.step_s.total_cmp(&b.step_s));
    let mut median = steps[steps.len() / 2].clone();
    median.peak_memory_bytes = peak_memory(&model.backend, free_before)?;
    median.pool_peaks = model.backend.memory_peaks()?;
    median.memory_estimate_bytes = estimate.total() as u64;
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    println!(
        "median step: {:.2} s; rollout {:.0} tok/s; training {:.0} tok/s, MFU {}; peak memory {} \
         (train's estimate {})",
        median.step_s,
        median.rollout_tokens_per_s,
        median.train_tokens_per_s,
        median
            .train_mfu
            .map_or("– (peak unknown: --peak-tflops)".to_string(), |m| format!(
                "{:.1} %",
                100.0 * m
            )),
        median.peak_memory_bytes.map_or("–".to_string(), gib),
        gib(median.memory_estimate_bytes),
    );
    if let Some(pool) = median.pool_peaks {
        println!(
            "memory pool: at most {} allocated at once, {} held (the gap: fragmentation)",
            gib(pool.used as u64),
            gib(pool.reserved as u64)
        );
    }
    // Before the profiled step, which runs every decode step op by op.
    let decode_graph = model.backend.decode_graph_stats();
    if let Some(d) = &decode_graph {
        println!(
            "decode steps (all steps above): {} recorded as CUDA graphs, {} replayed, {} op by op{}",
            d.captured,
            d.replayed,
            d.eager,
            d.fallback
                .as_ref()
                .map_or(String::new(), |f| format!(" (recording failed: {f})"))
        );
    }
    let profile = if args.profile {
        let step = args.steps as u64 + 1;
        let (_, profile) = one_step(&mut model, &mut opt, args, step, peak_tflops, true)?;
        let profile = profile.expect("profiled");
        print_profile("rollout", profile.rollout_s, &profile.rollout_ops);
        print_profile("update", profile.update_s, &profile.update_ops);
        Some(profile)
    } else {
        None
    };
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "model_config": args.model_config.display().to_string(),
            "device": device,
            "num_params": cfg.num_params(),
            "prompts": p,
            "group": g,
            "prompt_len": args.prompt_len,
            "new_tokens": t,
            "micro_batch": args.micro_batch,
            "offload": args.offload,
            "activation_checkpointing": args.activation_checkpointing,
            "peak_tflops": peak_tflops,
            "seed": args.seed,
            "result": median,
            "decode_graph": decode_graph,
            "profile": profile,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// One GRPO step; `step` picks the prompts and samples. When `profiled`, each phase's ops are
/// timed (the backend supports it: checked by the caller).
fn one_step<B: TrainBackend>(
    model: &mut Model<B>,
    opt: &mut DeviceOptimizer<B>,
    args: &StepArgs,
    step: u64,
    peak_tflops: Option<f64>,
    profiled: bool,
) -> Result<(StepResult, Option<StepProfile>)> {
    let (p, g, t, vocab) = (
        args.prompts,
        args.group,
        args.new_tokens,
        model.cfg.vocab_size,
    );
    let t0 = Instant::now();
    let mut rng = Philox::new(args.seed, 1_000 + step);
    let requests: Vec<GenerationRequest> = (0..p)
        .flat_map(|_| {
            let prompt = random_tokens(&mut rng, args.prompt_len, vocab);
            std::iter::repeat_n(
                GenerationRequest {
                    prompt,
                    max_new_tokens: t,
                },
                g,
            )
        })
        .collect();
    let config = GenerateConfig {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        },
        seed: args.seed,
        first_stream: step * requests.len() as u64,
        eos_ids: Vec::new(),
        stop_strings: Vec::new(),
        sync_every: None,
        keep_ended_rows: None,
    };
    if profiled {
        model.backend.start_op_profile();
    }
    let completions = generate(model, &requests, &config, None)?;
    let rollout_s = t0.elapsed().as_secs_f64();
    let rollout_ops = if profiled {
        model.backend.take_op_profile()?
    } else {
        Vec::new()
    };

    // Rewards: a random model answers nothing, so correctness is a seeded coin flip; the length
    // reward sees the real lengths against a budget of T/2.
    let totals: Vec<f64> = completions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let correct = rng::uniform(args.seed, COIN_STREAM, step * 1_000_000 + i as u64) < 0.5;
            reward(
                correct,
                c.len,
                t / 2,
                "",
                &RewardWeights::default(),
                LengthShape::Triangular,
            )
            .total
        })
        .collect();

    if profiled {
        model.backend.start_op_profile();
    }
    let t1 = Instant::now();
    let seqs: Vec<(&[u32], &[u32])> = requests
        .iter()
        .zip(&completions)
        .map(|(r, c)| (r.prompt.as_slice(), c.tokens.as_slice()))
        .collect();
    let train_tokens: usize = seqs.iter().map(|(p, c)| p.len() + c.len()).sum();
    let scored_tokens: usize = seqs.iter().map(|(_, c)| c.len()).sum();
    let truncated: Vec<bool> = completions.iter().map(|c| c.truncated).collect();
    let loss = LossOptions {
        beta: 0.0,
        ..LossOptions::default()
    };
    policy_update(
        model,
        opt,
        &UpdateBatch {
            seqs: &seqs,
            rewards: &totals,
            group_size: g,
            truncated: &truncated,
            keep: None,
            ref_logp: None,
            old_logp: None,
        },
        &UpdateOptions {
            loss: &loss,
            advantage: &AdvantageOptions::default(),
            epochs: 1,
            temperature: 1.0,
            lr: 1e-6,
            grad_clip: 1.0,
            micro_batch: args.micro_batch,
            // a benchmark measures the micro-batch it is given
            halve_on_out_of_memory: false,
        },
    )?;
    model.backend.synchronize()?;
    let update_s = t1.elapsed().as_secs_f64();
    let step_s = t0.elapsed().as_secs_f64();
    let profile = if profiled {
        Some(StepProfile {
            rollout_s,
            rollout_ops,
            update_s,
            update_ops: model.backend.take_op_profile()?,
        })
    } else {
        None
    };

    let flops = train_flops(&model.cfg, p * g, args.prompt_len + t, scored_tokens);
    let train_tflops = flops / update_s / 1e12;
    let result = StepResult {
        rollout_s,
        rollout_tokens_per_s: (p * g * t) as f64 / rollout_s,
        update_s,
        train_tokens_per_s: train_tokens as f64 / update_s,
        train_tflops,
        train_mfu: peak_tflops.map(|peak| train_tflops / peak),
        step_s,
        peak_memory_bytes: None,
        pool_peaks: None,
        memory_estimate_bytes: 0,
    };
    Ok((result, profile))
}

/// The ops of one profiled phase, largest time first, each with its rates (`Work`: model
/// FLOPs for the products and attention, operand bytes each moved once for every op). On CUDA
/// the events add host work to every launch, so the wall time here is longer than an
/// unprofiled step's; the sum of the ops' times against it shows how much of the phase is
/// launch gaps and host work (on the CPU: the host work between ops, such as rewards and
/// tokenizing).
fn print_profile(phase: &str, wall_s: f64, ops: &[OpTime]) {
    let total: f64 = ops.iter().map(|o| o.seconds).sum();
    println!(
        "profile {phase}: {:.1} ms in ops of {:.1} ms of wall time (profiled step)",
        1e3 * total,
        1e3 * wall_s
    );
    println!(
        "  {:<44} {:>7} {:>10} {:>10} {:>7} {:>8} {:>8}",
        "op", "calls", "total ms", "mean µs", "share", "TFLOP/s", "GB/s"
    );
    for o in ops {
        let rate = |amount: f64, unit: f64| {
            if o.seconds > 0.0 && amount > 0.0 {
                format!("{:.2}", amount / o.seconds / unit)
            } else {
                "-".to_string()
            }
        };
        println!(
            "  {:<44} {:>7} {:>10.2} {:>10.1} {:>6.1} % {:>8} {:>8}",
            o.label(),
            o.calls,
            1e3 * o.seconds,
            1e6 * o.seconds / o.calls as f64,
            100.0 * o.seconds / total.max(f64::MIN_POSITIVE),
            rate(o.flops, 1e12),
            rate(o.bytes, 1e9),
        );
    }
}

/// Model FLOPs of one update (forward + backward = 3× the forward) over `seqs` sequences of
/// `len` tokens with `scored` scored rows: 2 per weight per token in the layer matmuls, causal
/// attention (QKᵀ and PV: 4 · q_dim per attended position), the LM head on the scored rows.
pub fn train_flops(cfg: &ModelConfig, seqs: usize, len: usize, scored: usize) -> f64 {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let (q, kv) = (cfg.q_dim() as f64, cfg.kv_dim() as f64);
    let layer_weights = h * q + 2.0 * h * kv + q * h + 3.0 * h * i;
    let tokens = (seqs * len) as f64;
    let attended = seqs as f64 * (len * (len + 1) / 2) as f64;
    let layers = cfg.num_layers as f64;
    let forward = layers * (2.0 * layer_weights * tokens + 4.0 * q * attended)
        + 2.0 * h * cfg.vocab_size as f64 * scored as f64;
    3.0 * forward
}

/// Dense bf16 tensor-core peak of the NVIDIA data-center GPUs we know, by device name.
fn peak_bf16_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_uppercase();
    if n.contains("H100") && n.contains("PCIE") {
        Some(756.0)
    } else if n.contains("H100") && n.contains("NVL") {
        Some(835.0)
    } else if n.contains("H100") || n.contains("H200") {
        Some(989.0)
    } else if n.contains("A100") {
        Some(312.0)
    } else {
        None
    }
}

/// Device memory taken since `free_before` (the CUDA pool keeps freed memory, so this is its
/// high-water mark), or the process's peak resident memory where the backend reports none.
fn peak_memory<B: TrainBackend>(b: &B, free_before: Option<usize>) -> Result<Option<u64>> {
    if let (Some(before), Some(after)) = (free_before, b.free_memory()?) {
        return Ok(Some(before.saturating_sub(after) as u64));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024))
}
