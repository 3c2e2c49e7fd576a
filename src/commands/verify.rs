//! `thinkshort verify`: judge model responses against gold answers with the answer verifier.
//!
//! Input lines: `{"id":..,"response":"<full model output>","gold":"<gold answer>"}` (`id` may be
//! any JSON value and is echoed back; `gold` may be a number). Output, one line per input on
//! stdout: `{"id":..,"extracted":".."|null,"correct":true|false}`; a summary goes to stderr.

use crate::verify::{verify, ExtractOptions};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// JSONL file of `{"id", "response", "gold"}` lines.
    #[arg(long)]
    pub input: PathBuf,
    /// Do not fall back to the last `\boxed{}` when a response has no `<answer>` span.
    #[arg(long)]
    pub no_boxed_fallback: bool,
    /// Do not fall back to the last number when a response has no `<answer>` span or box.
    #[arg(long)]
    pub no_number_fallback: bool,
}

/// One output line, keys in the documented order.
#[derive(serde::Serialize)]
struct OutLine {
    id: Value,
    extracted: Option<String>,
    correct: bool,
}

pub fn run(args: &VerifyArgs) -> Result<()> {
    let opts = ExtractOptions {
        boxed_fallback: !args.no_boxed_fallback,
        number_fallback: !args.no_number_fallback,
    };
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("cannot open input {}", args.input.display()))?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let (mut total, mut correct, mut extracted) = (0usize, 0usize, 0usize);
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let at = || format!("{} line {}", args.input.display(), n + 1);
        let line = line.with_context(at)?;
        if line.trim().is_empty() {
            continue;
        }
        let (id, response, gold) = parse_line(&line).with_context(at)?;
        let v = verify(&response, &gold, &opts);
        total += 1;
        correct += v.correct as usize;
        extracted += v.extracted.is_some() as usize;
        let row = OutLine {
            id,
            extracted: v.extracted,
            correct: v.correct,
        };
        writeln!(out, "{}", serde_json::to_string(&row)?)?;
    }
    out.flush()?;
    eprintln!(
        "{correct}/{total} correct ({:.2}%); an answer was extracted from {extracted}",
        100.0 * correct as f64 / total.max(1) as f64
    );
    Ok(())
}

fn parse_line(line: &str) -> Result<(Value, String, String)> {
    let v: Value = serde_json::from_str(line).context("not valid JSON")?;
    let obj = v.as_object().context("expected a JSON object")?;
    let response = match obj.get("response") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => bail!("key `response`: expected a string"),
        None => bail!("missing key `response`"),
    };
    let gold = match obj.get("gold") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(x)) => x.to_string(),
        Some(_) => bail!("key `gold`: expected a string or a number"),
        None => bail!("missing key `gold`"),
    };
    Ok((
        obj.get("id").cloned().unwrap_or(Value::Null),
        response,
        gold,
    ))
}
