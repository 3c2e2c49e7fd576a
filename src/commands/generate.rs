//! `thinkshort generate`: continue one prompt, greedy or sampled, under a token budget.

use crate::any_model::AnyModel;
use crate::backend::BackendKind;
use crate::generate::{GenerateConfig, GenerationRequest};
use crate::prompt::PromptTemplate;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The question (or, with --template raw, the whole prompt text).
    #[arg(long)]
    pub prompt: String,
    /// Token budget written into the prompt template; also sets the default cap (2 × budget).
    #[arg(long, default_value_t = 256)]
    pub budget: usize,
    /// Cap on new tokens per sample [default: 2 × budget].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (runs with the same seed give the same samples).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of samples of the same prompt, generated as one batch.
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// Prompt format: `paper` (METHOD.md §1 template), `chat` (the model's chat template),
    /// `raw` (the prompt as given), or a path to a template file with {question} and {budget}.
    #[arg(long, default_value = "paper")]
    pub template: String,
    /// Stop when the completion contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Print one JSON object per sample instead of plain text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let device = super::resolve_backend(args.backend)?;
    if args.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    if args.budget == 0 {
        bail!("--budget must be at least 1");
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
    };
    sampling.validate()?;
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    let model = AnyModel::load(&args.model, device)?;
    if tokenizer.vocab_size() > model.cfg().vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but config.json `vocab_size` is {}",
            args.model.display(),
            tokenizer.vocab_size(),
            model.cfg().vocab_size
        );
    }

    let text = match args.template.as_str() {
        "raw" => args.prompt.clone(),
        "paper" => PromptTemplate::paper().render(&args.prompt, Some(args.budget), &tokenizer)?,
        "chat" => {
            PromptTemplate::default_chat().render(&args.prompt, Some(args.budget), &tokenizer)?
        }
        path => PromptTemplate::from_file(std::path::Path::new(path))?.render(
            &args.prompt,
            Some(args.budget),
            &tokenizer,
        )?,
    };
    let prompt = tokenizer.encode(&text)?;
    let cap = args.max_new_tokens.unwrap_or(2 * args.budget);
    let requests = vec![
        GenerationRequest {
            prompt: prompt.clone(),
            max_new_tokens: cap
        };
        args.num_samples
    ];
    let config = GenerateConfig {
        sampling,
        seed: args.seed,
        first_stream: 0,
        eos_ids: tokenizer.eos_token_ids().to_vec(),
        stop_strings: args.stop.clone(),
        sync_every: None,
        keep_ended_rows: None,
    };
    let detok = |ids: &[u32]| tokenizer.decode(ids, true);

    let start = Instant::now();
    let completions = model.generate(&requests, &config, Some(&detok))?;
    let secs = start.elapsed().as_secs_f64();

    let mut new_tokens = 0;
    for (i, c) in completions.iter().enumerate() {
        new_tokens += c.tokens.len();
        let text = tokenizer.decode(&c.tokens, true)?;
        if args.json {
            let line = serde_json::json!({
                "sample": i, "text": text, "tokens": c.tokens, "logprobs": c.logprobs,
                "len": c.len, "finished": c.finished, "truncated": c.truncated,
            });
            println!("{line}");
        } else {
            if args.num_samples > 1 {
                println!("--- sample {i} ---");
            }
            println!("{text}");
        }
    }
    let truncated = completions.iter().filter(|c| c.truncated).count();
    eprintln!(
        "prompt {} tokens; {} samples, {} new tokens ({} truncated at the cap of {cap}); {:.2} s, {:.1} tokens/s",
        prompt.len(),
        completions.len(),
        new_tokens,
        truncated,
        secs,
        new_tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
