//! Loaders for the evaluation benchmarks in `../shared/data` (see its README) and for generic
//! `{question, answer}` JSONL files. Every item becomes a question and a gold answer string.
//! A bad line stops loading with the file, the line number and the key at fault.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// The five benchmarks of the paper's evaluation (METHOD.md §7).
pub const BENCHMARKS: [&str; 5] = ["gsm8k", "math500", "svamp", "college_math", "gsm_plus"];

/// Where the data lives unless `--data-dir` says otherwise (relative to the current directory).
pub const DEFAULT_DATA_DIR: &str = "../shared/data";

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub question: String,
    pub gold: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub items: Vec<Item>,
    /// Counted in the average over sets; false for GSM+'s critical-thinking items (gold `None`),
    /// which are reported on their own.
    pub in_average: bool,
}

/// Loads one dataset by name (`gsm8k`, `math500`, `svamp`, `college_math`, `gsm_plus`) or a path
/// to a `{question, answer}` JSONL file. `gsm_plus` gives two sets: `gsm_plus` and
/// `gsm_plus_none` (the 300 items whose gold answer is `None`).
pub fn load(spec: &str, data_dir: &Path) -> Result<Vec<Dataset>> {
    let file = |rel: &str| data_dir.join(rel);
    let one = |name: &str, items| {
        vec![Dataset {
            name: name.to_string(),
            items,
            in_average: true,
        }]
    };
    Ok(match spec {
        "gsm8k" => one(spec, read(&file("gsm8k/test.jsonl"), gsm8k)?),
        "math500" => one(spec, read(&file("math500/test.jsonl"), math500)?),
        "svamp" => one(spec, read(&file("svamp/test.jsonl"), svamp)?),
        "college_math" => one(spec, read(&file("college_math/test.jsonl"), college_math)?),
        "gsm_plus" => {
            let all = read(&file("gsm_plus/testmini.jsonl"), gsm_plus)?;
            let (none, answered): (Vec<Item>, Vec<Item>) =
                all.into_iter().partition(|it| it.gold == "None");
            vec![
                Dataset {
                    name: "gsm_plus".into(),
                    items: answered,
                    in_average: true,
                },
                Dataset {
                    name: "gsm_plus_none".into(),
                    items: none,
                    in_average: false,
                },
            ]
        }
        path if path.ends_with(".jsonl") => {
            let p = PathBuf::from(path);
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.to_string());
            one(&name, read(&p, generic)?)
        }
        other => bail!(
            "unknown dataset `{other}`: expected one of {} or a path to a .jsonl file",
            BENCHMARKS.join(", ")
        ),
    })
}

/// Reads a JSONL file, turning each object into an item; `n` is the 1-based line number. An
/// item needs a question, a gold answer and an id of its own (items are matched by id against a
/// baseline run's).
fn read(path: &Path, parse: fn(&Map<String, Value>, usize) -> Result<Item>) -> Result<Vec<Item>> {
    let f = std::fs::File::open(path).with_context(|| {
        format!(
            "cannot open {} (set --data-dir to the folder of the benchmark data)",
            path.display()
        )
    })?;
    let mut items = Vec::new();
    let mut line_of_id: HashMap<String, usize> = HashMap::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let at = || format!("{} line {}", path.display(), i + 1);
        let line = line.with_context(at)?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .context("not valid JSON")
            .with_context(at)?;
        let obj = v
            .as_object()
            .context("expected a JSON object")
            .with_context(at)?;
        let item = parse(obj, i + 1).with_context(at)?;
        if item.question.trim().is_empty() {
            bail!("{}: the question is empty", at());
        }
        if item.gold.trim().is_empty() {
            bail!("{}: the answer is empty (no response could match it)", at());
        }
        if let Some(first) = line_of_id.insert(item.id.clone(), i + 1) {
            bail!(
                "{}: id `{}` is line {first}'s too (an item without an `id` takes its line \
                 number): every item needs its own id",
                at(),
                item.id
            );
        }
        items.push(item);
    }
    Ok(items)
}

fn string<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => bail!("key `{key}`: expected a string"),
        None => bail!("missing key `{key}`"),
    }
}

/// A string, or a number written without a trailing `.0` (`145.0` is `145`).
fn string_or_number(obj: &Map<String, Value>, key: &str) -> Result<String> {
    match obj.get(key) {
        Some(Value::Number(n)) => {
            let x = n.as_f64().context("not a finite number")?;
            Ok(if x.fract() == 0.0 && x.abs() < 1e15 {
                format!("{}", x as i64)
            } else {
                x.to_string()
            })
        }
        _ => Ok(string(obj, key)?.to_string()),
    }
}

fn gsm8k(obj: &Map<String, Value>, n: usize) -> Result<Item> {
    let solution = string(obj, "answer")?;
    let (_, gold) = solution
        .rsplit_once("####")
        .context("key `answer`: no `#### N` final answer")?;
    Ok(Item {
        id: format!("gsm8k-{n}"),
        question: string(obj, "question")?.to_string(),
        gold: gold.trim().replace(',', ""),
    })
}

fn math500(obj: &Map<String, Value>, _n: usize) -> Result<Item> {
    Ok(Item {
        id: string(obj, "unique_id")?.to_string(),
        question: string(obj, "problem")?.to_string(),
        gold: string(obj, "answer")?.to_string(),
    })
}

fn svamp(obj: &Map<String, Value>, _n: usize) -> Result<Item> {
    Ok(Item {
        id: string(obj, "ID")?.to_string(),
        question: format!(
            "{} {}",
            string(obj, "Body")?.trim(),
            string(obj, "Question")?.trim()
        ),
        gold: string_or_number(obj, "Answer")?,
    })
}

/// College Math answers are LaTeX inside `$...$`; the dollar signs go (escaped `\$` stays).
fn college_math(obj: &Map<String, Value>, n: usize) -> Result<Item> {
    let raw = string(obj, "answer")?;
    let mut gold = String::with_capacity(raw.len());
    let mut prev = ' ';
    for c in raw.chars() {
        if c != '$' || prev == '\\' {
            gold.push(c);
        }
        prev = c;
    }
    Ok(Item {
        id: format!("college_math-{n}"),
        question: string(obj, "question")?.to_string(),
        gold: gold.trim().to_string(),
    })
}

fn gsm_plus(obj: &Map<String, Value>, n: usize) -> Result<Item> {
    Ok(Item {
        id: format!("gsm_plus-{n}"),
        question: string(obj, "question")?.to_string(),
        gold: string(obj, "answer")?.trim().to_string(),
    })
}

fn generic(obj: &Map<String, Value>, n: usize) -> Result<Item> {
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Number(_)) => v.to_string(),
        _ => n.to_string(),
    };
    Ok(Item {
        id,
        question: string(obj, "question")?.to_string(),
        gold: string_or_number(obj, "answer")?,
    })
}
