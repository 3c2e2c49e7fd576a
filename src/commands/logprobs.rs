//! `thinkshort logprobs`: per-token log-probabilities of completions given prompts.
//!
//! Input lines: `{"prompt_ids":[..],"completion_ids":[..]}` or `{"prompt":"..","completion":".."}`.
//! Output lines: `{"logprobs":[..]}`, one float per completion token, log p(token | prompt,
//! earlier completion tokens) at the given temperature (default 1).

use crate::any_model::AnyModel;
use crate::backend::BackendKind;
use crate::score::ScoreItem;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct LogprobsArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL file of prompts and completions (ids or text).
    #[arg(long)]
    pub input: PathBuf,
    /// JSONL file to write, one `{"logprobs": [...]}` line per input line (blank lines at
    /// the end of the input get none).
    #[arg(long)]
    pub output: PathBuf,
    /// Log-probs of softmax(logits / temperature).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
}

/// Lines scored per batch (bounds memory and paces the progress display).
const LINES_PER_CHUNK: usize = 64;

pub fn run(args: &LogprobsArgs) -> Result<()> {
    let device = super::resolve_backend(args.backend)?;
    let model = AnyModel::load(&args.model, device)?;
    let mut tokenizer = LazyTokenizer {
        dir: args.model.clone(),
        tok: None,
    };
    let cfg = model.cfg();
    let (vocab, positions) = (cfg.vocab_size, cfg.max_position_embeddings);
    let items = read_items(&args.input, vocab, positions, &mut tokenizer)?;

    // Write to a temporary name and rename, so an error never leaves a half-written output
    // (a pipe or device such as /dev/stdout is written directly; a link's target is replaced,
    // not the link).
    let (target, rename_to) = output_target(&args.output)?;
    let write = || -> Result<()> {
        let file = std::fs::File::create(&target)
            .with_context(|| format!("cannot create {}", target.display()))?;
        let mut w = BufWriter::new(file);
        for (c, chunk) in items.chunks(LINES_PER_CHUNK).enumerate() {
            let scored = model.completion_logprobs(chunk, args.temperature)?;
            for (i, lps) in scored.iter().enumerate() {
                if lps.iter().any(|x| !x.is_finite()) {
                    bail!(
                        "{} line {}: a log-prob is not finite (the temperature or the model's \
                         weights overflow the arithmetic)",
                        args.input.display(),
                        c * LINES_PER_CHUNK + i + 1
                    );
                }
                writeln!(w, "{}", serde_json::json!({ "logprobs": lps }))?;
            }
            eprint!(
                "\rscored {}/{} lines",
                (c * LINES_PER_CHUNK + chunk.len()),
                items.len()
            );
        }
        eprintln!();
        w.flush()
            .with_context(|| format!("cannot write {}", target.display()))?;
        if let Some(path) = &rename_to {
            std::fs::rename(&target, path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    };
    let written = write();
    if written.is_err() && rename_to.is_some() {
        let _ = std::fs::remove_file(&target);
    }
    written
}

/// (the file to write, the path to rename it to): a temporary name beside the output, renamed
/// into place; the output itself, with nothing to rename, when it is a pipe or a device. A link
/// is followed (to a file that may not exist yet), so its target is written and the link stays.
fn output_target(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            // a new file
            return Ok((path.with_extension("jsonl.partial"), Some(path)));
        };
        if meta.file_type().is_symlink() {
            let to = std::fs::read_link(&path)
                .with_context(|| format!("cannot read the link {}", path.display()))?;
            path = path.parent().unwrap_or(Path::new(".")).join(to);
            continue;
        }
        if meta.is_dir() {
            bail!("--output {} is a folder", path.display());
        }
        if !meta.is_file() {
            return Ok((path.clone(), None));
        }
        return Ok((path.with_extension("jsonl.partial"), Some(path)));
    }
    bail!("--output {}: too many levels of links", path.display())
}

/// The tokenizer is only needed for text lines: it is loaded on first use, so id-only inputs
/// work with a model folder that has none.
struct LazyTokenizer {
    dir: PathBuf,
    tok: Option<Tokenizer>,
}

impl LazyTokenizer {
    fn get(&mut self) -> Result<&Tokenizer> {
        if self.tok.is_none() {
            self.tok = Some(Tokenizer::from_model_dir(&self.dir)?);
        }
        Ok(self.tok.as_ref().expect("loaded above"))
    }
}

/// The items of the input file, one per line; every error names the file and line. Output
/// line n scores input line n, so a blank line before an item is an error (blank lines at the
/// end are left out), and so is an item longer than the model's positions.
fn read_items(
    path: &Path,
    vocab: usize,
    positions: usize,
    tokenizer: &mut LazyTokenizer,
) -> Result<Vec<ScoreItem>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open input {}", path.display()))?;
    let mut items = Vec::new();
    let mut blank = None; // the first blank line since the last item
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let at = || format!("{} line {}", path.display(), n + 1);
        let line = line.with_context(at)?;
        if line.trim().is_empty() {
            blank = blank.or(Some(n + 1));
            continue;
        }
        if let Some(b) = blank {
            bail!(
                "{} line {b} is blank: every line must be an item (output line n scores input \
                 line n)",
                path.display()
            );
        }
        let item = parse_line(&line, vocab, tokenizer).with_context(at)?;
        let tokens = item.prompt.len() + item.completion.len();
        if tokens > positions {
            bail!(
                "{}: prompt and completion are {tokens} tokens, more than the model's \
                 max_position_embeddings of {positions}",
                at()
            );
        }
        items.push(item);
    }
    Ok(items)
}

fn parse_line(line: &str, vocab: usize, tokenizer: &mut LazyTokenizer) -> Result<ScoreItem> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    let obj = v.as_object().context("expected a JSON object")?;
    let item = if obj.contains_key("prompt_ids") || obj.contains_key("completion_ids") {
        ScoreItem {
            prompt: ids(obj.get("prompt_ids"), "prompt_ids")?,
            completion: ids(obj.get("completion_ids"), "completion_ids")?,
        }
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        let tok = tokenizer.get()?;
        ScoreItem {
            prompt: tok.encode(text(obj.get("prompt"), "prompt")?)?,
            completion: tok.encode(text(obj.get("completion"), "completion")?)?,
        }
    } else {
        bail!("expected keys `prompt_ids` and `completion_ids`, or `prompt` and `completion`");
    };
    if item.prompt.is_empty() {
        bail!("the prompt is empty; at least one prompt token is needed to score a completion");
    }
    for &id in item.prompt.iter().chain(&item.completion) {
        if id as usize >= vocab {
            bail!("token id {id} is out of range for the model's vocabulary of {vocab} tokens");
        }
    }
    Ok(item)
}

fn ids(v: Option<&Value>, key: &str) -> Result<Vec<u32>> {
    let arr = v
        .and_then(Value::as_array)
        .with_context(|| format!("key `{key}`: expected an array of token ids"))?;
    arr.iter()
        .map(|x| {
            x.as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .map(|i| i as u32)
                .with_context(|| format!("key `{key}`: {x} is not a token id"))
        })
        .collect()
}

fn text<'a>(v: Option<&'a Value>, key: &str) -> Result<&'a str> {
    v.and_then(Value::as_str)
        .with_context(|| format!("key `{key}`: expected a string"))
}
