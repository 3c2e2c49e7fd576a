//! `thinkshort eval`: zero-shot accuracy and generated length on the math benchmarks
//! (METHOD.md §7), greedy by default, at one prompt budget or at several (`--budgets`) to trace
//! the length/accuracy frontier (one table row per set and budget).

use crate::any_model::AnyModel;
use crate::backend::BackendKind;
use crate::datasets::{self, Dataset, DEFAULT_DATA_DIR};
use crate::generate::{GenerateConfig, GenerationRequest};
use crate::paired::PairedChange;
use crate::prompt::PromptTemplate;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::verify::{verify, ExtractOptions};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated benchmarks (gsm8k, math500, svamp, college_math, gsm_plus) or paths to
    /// `{question, answer}` JSONL files.
    #[arg(long, default_value = "gsm8k,math500,svamp,college_math,gsm_plus")]
    pub datasets: String,
    /// Folder of the benchmark files.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Evaluate only the first N items of each set.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Token budget written into the prompt (METHOD.md §7: the final training budget).
    #[arg(long, default_value_t = 87)]
    pub budget: usize,
    /// Several budgets, comma-separated (e.g. 32,64,128,256): one evaluation per budget, each
    /// with its own rows (accuracy against mean tokens: the frontier); instead of --budget.
    #[arg(long, value_delimiter = ',', conflicts_with = "budget")]
    pub budgets: Vec<usize>,
    /// Cap on new tokens per response.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Prompts generated together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Prompt format: `paper`, `chat`, `raw`, or a template file (as in `generate`).
    #[arg(long, default_value = "paper")]
    pub template: String,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed of the sampler when the temperature is above 0.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// End a response once its text contains this text (repeatable), besides the model's EOS.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Folder for results.json, results.md and items.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// An earlier evaluation's --out folder (e.g. of the model before training): its
    /// items.jsonl is compared with this run item by item (same set, id and budget).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
}

/// One benchmark at one budget.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub dataset: String,
    pub budget: usize,
    pub items: usize,
    pub accuracy: f64,
    pub mean_tokens: f64,
    pub truncated: f64,
    /// Part of the average row (GSM+'s `None` items are not).
    pub in_average: bool,
}

#[derive(Serialize)]
struct ItemRecord<'a> {
    dataset: &'a str,
    id: &'a str,
    budget: usize,
    gold: &'a str,
    response: String,
    extracted: Option<String>,
    correct: bool,
    tokens: usize,
    truncated: bool,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let device = super::resolve_backend(args.backend)?;
    let budgets = if args.budgets.is_empty() {
        vec![args.budget]
    } else {
        args.budgets.clone()
    };
    if budgets.contains(&0) {
        bail!("--budget and --budgets must be at least 1");
    }
    if let Some(twice) = budgets
        .iter()
        .find(|&&b| budgets.iter().filter(|&&c| c == b).count() > 1)
    {
        bail!("--budgets lists {twice} twice");
    }
    if args.batch_size == 0 || args.max_new_tokens == 0 {
        bail!("--batch-size and --max-new-tokens must be at least 1");
    }
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: 0,
        top_p: 1.0,
    };
    sampling.validate()?;
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    // Every set is read before the model loads, so a bad line fails at once.
    let mut sets: Vec<Dataset> = Vec::new();
    let mut spec_of_set: HashMap<String, &str> = HashMap::new();
    for spec in args
        .datasets
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        for mut set in datasets::load(spec, &args.data_dir)? {
            if let Some(n) = args.limit {
                set.items.truncate(n);
            }
            if set.items.is_empty() {
                bail!("dataset {spec} holds no items");
            }
            // items.jsonl and a baseline comparison tell items apart by set name and id
            if let Some(first) = spec_of_set.insert(set.name.clone(), spec) {
                bail!(
                    "--datasets: {first} and {spec} are both named `{}`: list a set once, and \
                     give files of the same name different names",
                    set.name
                );
            }
            sets.push(set);
        }
    }
    if sets.is_empty() {
        bail!("--datasets names no dataset");
    }
    let baseline = args.baseline.as_deref().map(read_baseline).transpose()?;
    if let (Some(b), Some(dir)) = (&baseline, &args.baseline) {
        let judged = |set: &Dataset, budget: usize| {
            set.items
                .iter()
                .any(|i| b.contains_key(&(set.name.clone(), i.id.clone(), budget)))
        };
        if !budgets.iter().any(|&n| sets.iter().any(|s| judged(s, n))) {
            bail!(
                "--baseline {}: its items.jsonl judged none of these sets' items at these budgets",
                dir.display()
            );
        }
    }
    let template = match args.template.as_str() {
        "raw" => None,
        "paper" => Some(PromptTemplate::paper()),
        "chat" => Some(PromptTemplate::default_chat()),
        path => Some(PromptTemplate::from_file(Path::new(path))?),
    };
    let tokenizer = Tokenizer::from_model_dir(&args.model)?;
    let model = AnyModel::load(&args.model, device)?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --out {}", dir.display()))?;
    }
    let mut items_out = match &args.out {
        Some(dir) => {
            let p = dir.join("items.jsonl");
            let f = std::fs::File::create(&p)
                .with_context(|| format!("cannot create {}", p.display()))?;
            Some(std::io::BufWriter::new(f))
        }
        None => None,
    };

    // the text the verifier reads (special tokens left out)
    let detokenize = |ids: &[u32]| tokenizer.decode(ids, true);
    let config = GenerateConfig {
        sampling,
        seed: args.seed,
        first_stream: 0,
        eos_ids: tokenizer.eos_token_ids().to_vec(),
        stop_strings: args.stop.clone(),
        sync_every: None,
        keep_ended_rows: None,
    };
    let total: usize = budgets.len() * sets.iter().map(|s| s.items.len()).sum::<usize>();
    let mut done = 0;
    let start = Instant::now();
    let mut rows = Vec::new();
    let mut paired = Vec::new();
    for &budget in &budgets {
        for set in &sets {
            let (mut correct, mut tokens, mut truncated) = (0usize, 0usize, 0usize);
            // (baseline verdict, this run's) of the items the baseline judged too
            let mut verdicts = Vec::new();
            for (b, batch) in set.items.chunks(args.batch_size).enumerate() {
                let mut requests = Vec::with_capacity(batch.len());
                for item in batch {
                    let text = match &template {
                        Some(t) => t.render(&item.question, Some(budget), &tokenizer)?,
                        None => item.question.clone(),
                    };
                    requests.push(GenerationRequest {
                        prompt: tokenizer.encode(&text)?,
                        max_new_tokens: args.max_new_tokens,
                    });
                }
                // Streams follow the item index, so sampled runs do not depend on --batch-size.
                let config = GenerateConfig {
                    first_stream: (b * args.batch_size) as u64,
                    ..config.clone()
                };
                let completions = model.generate(&requests, &config, Some(&detokenize))?;
                for (item, c) in batch.iter().zip(completions) {
                    let response = tokenizer.decode(&c.tokens, true)?;
                    let v = verify(&response, &item.gold, &ExtractOptions::default());
                    correct += v.correct as usize;
                    let key = || (set.name.clone(), item.id.clone(), budget);
                    if let Some(&was) = baseline.as_ref().and_then(|b| b.get(&key())) {
                        verdicts.push((was, v.correct));
                    }
                    tokens += c.len;
                    truncated += c.truncated as usize;
                    if let Some(w) = items_out.as_mut() {
                        let rec = ItemRecord {
                            dataset: &set.name,
                            id: &item.id,
                            budget,
                            gold: &item.gold,
                            response,
                            extracted: v.extracted,
                            correct: v.correct,
                            tokens: c.len,
                            truncated: c.truncated,
                        };
                        writeln!(w, "{}", serde_json::to_string(&rec)?)?;
                    }
                }
                done += batch.len();
                progress(done, total, &set.name, budget, start);
            }
            if let Some(change) = PairedChange::new(verdicts) {
                paired.push(PairedRow {
                    dataset: set.name.clone(),
                    budget,
                    change,
                });
            }
            let n = set.items.len().max(1) as f64;
            rows.push(Row {
                dataset: set.name.clone(),
                budget,
                items: set.items.len(),
                accuracy: 100.0 * correct as f64 / n,
                mean_tokens: tokens as f64 / n,
                truncated: 100.0 * truncated as f64 / n,
                in_average: set.in_average,
            });
        }
    }
    eprintln!();
    let rows = with_averages(rows, &budgets);
    let paired = with_pooled(paired, &sets, &budgets);
    let mut table = markdown_table(&rows);
    if let Some(dir) = &args.baseline {
        table += &format!(
            "\nAgainst the baseline {}, item by item:\n\n{}",
            dir.display(),
            paired_table(&paired)
        );
    }
    print!("{table}");
    if let Some(dir) = &args.out {
        if let Some(mut w) = items_out.take() {
            w.flush()?;
        }
        let report = serde_json::json!({
            "model": args.model.display().to_string(),
            "template": args.template,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "stop": args.stop,
            "limit": args.limit,
            "budgets": budgets,
            "rows": rows,
            "baseline": args.baseline.as_ref().map(|d| d.display().to_string()),
            "paired": paired,
        });
        write_file(
            &dir.join("results.json"),
            &serde_json::to_string_pretty(&report)?,
        )?;
        let stops = if args.stop.is_empty() {
            String::new()
        } else {
            format!(", stop strings {:?}", args.stop)
        };
        let md = format!(
            "# Evaluation of {}\n\nTemplate `{}`, cap {} new tokens, temperature {} (seed {}){stops}.\n\n{table}",
            args.model.display(),
            args.template,
            args.max_new_tokens,
            args.temperature,
            args.seed
        );
        write_file(&dir.join("results.md"), &md)?;
        if budgets.len() > 1 {
            crate::plot::plot_frontier(&frontier(&rows), &dir.join("frontier.png"))?;
        }
        eprintln!(
            "wrote results.json, results.md and items.jsonl to {}",
            dir.display()
        );
    }
    Ok(())
}

/// (dataset, [(mean tokens, accuracy %)] in budget order) for the frontier plot.
fn frontier(rows: &[Row]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(usize, f64, f64)>)> = Vec::new();
    for r in rows {
        match series.iter_mut().find(|(name, _)| *name == r.dataset) {
            Some((_, pts)) => pts.push((r.budget, r.mean_tokens, r.accuracy)),
            None => series.push((
                r.dataset.clone(),
                vec![(r.budget, r.mean_tokens, r.accuracy)],
            )),
        }
    }
    series
        .into_iter()
        .map(|(name, mut pts)| {
            pts.sort_by_key(|p| p.0);
            (name, pts.into_iter().map(|(_, x, y)| (x, y)).collect())
        })
        .collect()
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// One set at one budget against the baseline.
#[derive(Debug, Serialize)]
struct PairedRow {
    dataset: String,
    budget: usize,
    change: PairedChange,
}

/// Appends, per budget with two or more compared sets in the average, their items pooled (`all`):
/// the counts add up, so its change is over items, not the unweighted mean of the sets'.
fn with_pooled(rows: Vec<PairedRow>, sets: &[Dataset], budgets: &[usize]) -> Vec<PairedRow> {
    let averaged = |name: &str| sets.iter().any(|s| s.name == name && s.in_average);
    with_summary_rows(
        rows,
        budgets,
        |r| r.budget,
        |r| averaged(&r.dataset),
        |budget, counted| PairedRow {
            dataset: "all".into(),
            budget,
            change: counted.iter().map(|r| r.change).sum(),
        },
    )
}

/// (set, id, budget) → verdict of every line of `<dir>/items.jsonl`.
fn read_baseline(dir: &Path) -> Result<HashMap<(String, String, usize), bool>> {
    #[derive(serde::Deserialize)]
    struct Line {
        dataset: String,
        id: String,
        budget: usize,
        correct: bool,
    }
    let path = dir.join("items.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--baseline: cannot read {} (the items of an `eval --out` folder)",
            path.display()
        )
    })?;
    let mut verdicts = HashMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let l: Line = serde_json::from_str(line).with_context(|| {
            format!(
                "--baseline: {} line {}: not an item line (dataset, id, budget, correct)",
                path.display(),
                n + 1
            )
        })?;
        let item = format!("({}, {}, budget {})", l.dataset, l.id, l.budget);
        if verdicts
            .insert((l.dataset, l.id, l.budget), l.correct)
            .is_some()
        {
            bail!(
                "--baseline: {} line {}: item {item} is judged twice: not the items.jsonl of one \
                 `eval --out` run",
                path.display(),
                n + 1
            );
        }
    }
    Ok(verdicts)
}

/// The comparison with the baseline: items judged by both, how many became right and wrong,
/// and the accuracy change with its paired 95 % interval, in points.
fn paired_table(rows: &[PairedRow]) -> String {
    let mut s = String::from(
        "| dataset | budget | items | became right | became wrong | accuracy change | 95 % interval |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let c = &r.change;
        let interval = match c.interval95() {
            None => "no item changed".to_string(),
            Some((lo, hi)) => format!("{:+.1} to {:+.1}", 100.0 * lo, 100.0 * hi),
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {:+.1} | {interval} |\n",
            r.dataset,
            r.budget,
            c.problems,
            c.gained,
            c.lost,
            100.0 * c.change()
        );
    }
    s
}

/// `[#####.....] 120/500 gsm8k @87  12.3 s`, redrawn in place on stderr.
fn progress(done: usize, total: usize, set: &str, budget: usize, start: Instant) {
    const WIDTH: usize = 30;
    let filled = WIDTH * done / total.max(1);
    eprint!(
        "\r[{}{}] {done}/{total} {set} @{budget}  {:.1} s   ",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        start.elapsed().as_secs_f64()
    );
}

/// Appends, per budget, the unweighted mean over the sets counted in the average.
fn with_averages(rows: Vec<Row>, budgets: &[usize]) -> Vec<Row> {
    with_summary_rows(
        rows,
        budgets,
        |r| r.budget,
        |r| r.in_average,
        |budget, counted| {
            let mean = |field: fn(&Row) -> f64| {
                counted.iter().map(|r| field(r)).sum::<f64>() / counted.len() as f64
            };
            Row {
                dataset: "average".into(),
                budget,
                items: counted.iter().map(|r| r.items).sum(),
                accuracy: mean(|r| r.accuracy),
                mean_tokens: mean(|r| r.mean_tokens),
                truncated: mean(|r| r.truncated),
                in_average: false,
            }
        },
    )
}

/// Appends, for each budget with two or more rows that `counted` keeps, the row `combine` makes
/// of them, right after that budget's rows (the rows end up ordered by budget; the sort is
/// stable).
fn with_summary_rows<R>(
    mut rows: Vec<R>,
    budgets: &[usize],
    budget_of: impl Fn(&R) -> usize,
    counted: impl Fn(&R) -> bool,
    combine: impl Fn(usize, &[&R]) -> R,
) -> Vec<R> {
    for &budget in budgets {
        let kept: Vec<&R> = rows
            .iter()
            .filter(|r| budget_of(r) == budget && counted(r))
            .collect();
        if kept.len() >= 2 {
            let summary = combine(budget, &kept);
            rows.push(summary);
        }
    }
    rows.sort_by_key(|r| budget_of(r));
    rows
}

/// The report table; it is valid Markdown and readable as plain text.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| dataset | budget | items | accuracy % | mean tokens | truncated % |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.1} |\n",
            r.dataset, r.budget, r.items, r.accuracy, r.mean_tokens, r.truncated
        ));
    }
    s
}
