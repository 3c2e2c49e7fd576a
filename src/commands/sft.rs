//! `thinkshort sft`: supervised fine-tuning on prompt/completion JSONL, or (`--demo`) building
//! the demo model from scratch on the synthetic arithmetic task.

use crate::backend::{cpu::CpuBackend, BackendKind, TrainBackend};
use crate::checkpoint::{check_replaceable, write_folder_atomically, write_model_files};
use crate::config::ModelConfig;
use crate::cuda::CudaBackend;
use crate::demo::{task, vocab};
use crate::model::Model;
use crate::params::ParamLayout;
use crate::prompt::PromptTemplate;
use crate::sft::{train_sft, SftExample, SftOptions};
use crate::tokenizer::Tokenizer;
use crate::train::memory::{host_available, RunShape, TrainMemory};
use crate::train::progress::Progress;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct SftArgs {
    /// Model folder to start from (not with --demo).
    #[arg(long, required_unless_present = "demo")]
    pub model: Option<PathBuf>,
    /// JSONL of `{"prompt": "..", "completion": ".."}` lines (not with --demo).
    #[arg(long, required_unless_present = "demo")]
    pub data: Option<PathBuf>,
    /// Build the demo model: a fresh tiny Qwen2 with the demo tokenizer, trained on the
    /// synthetic task's long, partly redundant solutions.
    #[arg(long, conflicts_with_all = ["model", "data"])]
    pub demo: bool,
    /// Output model folder (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Examples per forward and backward pass, their gradients added up (0: the whole batch in
    /// one pass); the step is the same, only the activations held at a time shrink.
    #[arg(long, default_value_t = 0)]
    pub micro_batch: usize,
    /// Peak learning rate (AdamW, linear warm-up then cosine decay).
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
}

/// Demo problems come from this seed; the GRPO demo trains and evaluates on other seeds.
pub const DEMO_SFT_SEED: u64 = 1;

pub fn run(args: &SftArgs) -> Result<()> {
    let device = super::resolve_backend(args.backend)?;
    if args.batch_size == 0 || args.steps == 0 {
        bail!("--batch-size and --steps must be at least 1");
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr must be a finite number > 0, got {}", args.lr);
    }
    // before the training, not after it: the output folder must be one sft may replace
    check_replaceable(&args.out).context("--out")?;
    let staging = tempfile_dir(&args.out)?;
    let result = match device {
        BackendKind::Cuda => sft_with_staging(args, &staging, CudaBackend::new(0)?),
        _ => sft_with_staging(args, &staging, CpuBackend),
    };
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The run on `backend`, with `staging` (a scratch folder beside --out, removed by the caller
/// whatever happens) for the demo model's tokenizer and config.
fn sft_with_staging<B: TrainBackend>(args: &SftArgs, staging: &Path, backend: B) -> Result<()> {
    // the f32 weights the run starts from (the optimizer's master weights): the demo's random
    // ones, or the model folder's, read once the step is known to fit
    let (source_dir, cfg, random, data) = if args.demo {
        vocab::write_tokenizer_files(staging)?;
        let tok = Tokenizer::from_model_dir(staging)?;
        let config = vocab::demo_model_config(tok.vocab_size());
        std::fs::write(staging.join("config.json"), &config)?;
        let cfg = ModelConfig::from_json_str(&config)?;
        let random = Model::random(cfg.clone(), args.seed, CpuBackend)?;
        let data = demo_examples(&tok, 20_000)?;
        (staging.to_path_buf(), cfg, Some(random.params), data)
    } else {
        let dir = args
            .model
            .as_ref()
            .expect("clap requires --model without --demo");
        let tok = Tokenizer::from_model_dir(dir)?;
        let cfg = ModelConfig::from_model_dir(dir)?;
        let data_path = args.data.as_ref().expect("clap requires --data");
        let data = read_jsonl(data_path, &tok, cfg.max_position_embeddings)?;
        (dir.clone(), cfg, None, data)
    };
    check_memory(args, &cfg, &data, &backend)?;
    let master = match random {
        Some(params) => params,
        None => crate::weights::load_params(&source_dir, &cfg, &ParamLayout::new(&cfg))?,
    };
    let mut model = Model::from_host(cfg, &master, backend)?;
    eprintln!(
        "sft: {} parameters on the {} backend, {} examples, {} steps of {}",
        model.layout.total_len(),
        model.backend.name(),
        data.len(),
        args.steps,
        args.batch_size
    );
    let opts = SftOptions {
        steps: args.steps,
        batch_size: args.batch_size,
        micro_batch: args.micro_batch,
        lr: args.lr,
        warmup_steps: args.warmup,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: args.seed,
    };
    let progress = Progress::new(args.steps);
    let mut recent = Vec::new();
    let trained = train_sft(&mut model, master, &data, &opts, |s| {
        recent.push(s.loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        let avg = recent.iter().sum::<f64>() / recent.len() as f64;
        progress.update(s.step + 1, &format!("loss {avg:.4} | lr {:.2e}", s.lr));
    })?;
    write_folder_atomically(&args.out, |dir| {
        write_model_files(dir, &source_dir, &model.layout, &trained)
    })?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// Fails, before the weights load, when a step cannot fit: the weights, the f32 master
/// weights, moments and gradients, and one pass over examples as long as the longest prompt and
/// completion (train's estimate, without a rollout). On the CPU the pass holds `--micro-batch`
/// examples and must fit the host's available memory; a device's passes that run out of memory
/// run again at half as many examples, so there one example per pass must fit its free memory.
fn check_memory<B: TrainBackend>(
    args: &SftArgs,
    cfg: &ModelConfig,
    data: &[SftExample],
    backend: &B,
) -> Result<()> {
    let free = backend.free_memory()?;
    let longest = |len: fn(&SftExample) -> usize| data.iter().map(len).max().unwrap_or(0);
    let shape = RunShape {
        sequences: args.batch_size,
        micro_batch: if free.is_some() { 1 } else { args.micro_batch },
        prompt_len: longest(|e| e.prompt.len()),
        cap: longest(|e| e.completion.len()),
        ..RunShape::default()
    };
    let estimate = TrainMemory::estimate(
        cfg,
        backend.storage_bytes(),
        crate::model::HEAD_CHUNK_BYTES,
        &shape,
    );
    let need = TrainMemory {
        rollout: 0,
        eval: 0,
        ..estimate
    }
    .total();
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    match free {
        Some(free) if need > free => bail!(
            "sft needs about {:.2} GiB on the {} device even with one example per pass, but \
             {:.2} GiB are free: shorter examples or a smaller model",
            gib(need),
            backend.name(),
            gib(free)
        ),
        None => match host_available() {
            Some(room) if need > room => bail!(
                "sft needs about {:.2} GiB with {} examples per pass but the host has {:.2} GiB \
                 available: a smaller --batch-size (now {}) or --micro-batch, shorter examples or \
                 a smaller model",
                gib(need),
                estimate.micro_batch,
                gib(room),
                args.batch_size
            ),
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// A scratch folder beside `out` for the demo's generated tokenizer and config.
fn tempfile_dir(out: &Path) -> Result<PathBuf> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = parent.join(format!(".sft-staging-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Demo SFT pairs: the demo prompt at a random budget (so the model first learns to ignore it)
/// and the long solution style.
fn demo_examples(tok: &Tokenizer, count: u64) -> Result<Vec<SftExample>> {
    let template = PromptTemplate::plain(task::PROMPT_TEMPLATE)?;
    (0..count)
        .map(|i| {
            let p = task::problem(DEMO_SFT_SEED, i);
            let budget = 16 + (crate::rng::uniform(DEMO_SFT_SEED, i, 7) * 113.0) as usize; // 16..=128
            let prompt = tok.encode(&template.render(&p.question, Some(budget), tok)?)?;
            let mut completion =
                tok.encode(&task::sft_completion(&p, task::sft_style(DEMO_SFT_SEED, i)))?;
            completion.push(vocab::EOS_ID);
            Ok(SftExample { prompt, completion })
        })
        .collect()
}

/// The examples of a `{prompt, completion}` JSONL file, each completion ending with EOS; an
/// example longer than the model's `positions` is an error naming its line.
fn read_jsonl(path: &Path, tok: &Tokenizer, positions: usize) -> Result<Vec<SftExample>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let eos = tok.eos_token_ids().first().copied();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}: not valid JSON", at()))?;
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .with_context(|| format!("{}: missing string key `{k}`", at()))
        };
        let prompt = tok.encode(get("prompt")?)?;
        let mut completion = tok.encode(get("completion")?)?;
        if prompt.is_empty() || completion.is_empty() {
            bail!("{}: empty prompt or completion", at());
        }
        // The model learns to stop: the completion ends with EOS.
        completion.extend(eos);
        let tokens = prompt.len() + completion.len();
        if tokens > positions {
            bail!(
                "{}: prompt and completion are {tokens} tokens (EOS included), more than the \
                 model's max_position_embeddings of {positions}",
                at()
            );
        }
        out.push(SftExample { prompt, completion });
    }
    if out.is_empty() {
        bail!("{} holds no examples", path.display());
    }
    Ok(out)
}
